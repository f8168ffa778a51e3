"""Flask app factory: Label Studio's ML backend protocol (/health, /setup, /predict) plus /metrics."""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

import httpx
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import label_studio, metrics, quality
from .engine_client import EngineClient
from .errors import BadRequest, PayloadTooLarge, RequestError
from .feedback import HANDLED_ACTIONS, parse_webhook
from .label_config import compile_label_config
from .predictor import PredictRequest, Predictor
from .protocol import PrelabelRequest
from .projects import ProjectSettings, ProjectStore, project_id_from
from .queue import FeedbackQueue, enqueue_prelabel
from .ranking import compile_ranking_config, is_comparison_config
from .registry import VersionReader
from .settings import Settings, get_settings
from .usage import UsageStore

log = logging.getLogger(__name__)
OPEN_ENDPOINTS = {"health"}  # reachable without basic auth (container health checks)
SECRET_HEADER = "X-Dataengine-Secret"
MAX_JSON_DEPTH = 64  # Label Studio's bodies nest about 8 deep; deeper is refused before any code walks it


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> Flask:
    settings = settings or get_settings()
    engine = EngineClient.from_settings(settings) if engine is None else engine
    app = Flask("dataengine")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["dataengine"] = services = Services(settings, engine)
    _install_hooks(app, settings)
    _install_error_handlers(app)
    _install_routes(app, services)
    return app


class Services:
    """What the routes share; built once per process (never per request)."""

    def __init__(self, settings: Settings, engine: EngineClient):
        self.settings = settings
        self.engine = engine
        self.projects = ProjectStore(settings.projects_dir)
        self.versions = VersionReader(settings.projects_dir, settings.model_name)
        self.predictor = Predictor(settings, engine)
        self.queue = FeedbackQueue.from_settings(settings)
        self.usage = UsageStore(self.queue.redis, settings.max_projects)


# --- request plumbing ------------------------------------------------------------------------------


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx naming what is wrong with it. Only `application/json`:
    a cross-site HTML form can post text/plain, urlencoded or multipart bodies, never JSON."""
    raw = request.get_data(cache=False)
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    if request.mimetype != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}", 415)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start}): send JSON encoded as UTF-8") from exc
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise BadRequest(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from exc
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a deep value must not exhaust the stack here either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def text_field(body: dict[str, Any], *names: str) -> str:
    """The first of `names` the body holds (absent, null or "": ""); a 400 naming it when it is not a string."""
    for name in names:
        value = body.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string, got {type(value).__name__}")
        return value
    return ""


def _install_hooks(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _start_and_authenticate():
        g.started = time.perf_counter()
        secret_ok = (
            request.endpoint == "webhook"
            and settings.webhook_secret
            and hmac.compare_digest(request.headers.get(SECRET_HEADER, "").encode(), settings.webhook_secret.encode())
        )
        if settings.auth_configured and request.endpoint not in OPEN_ENDPOINTS and not secret_ok:
            auth = request.authorization
            ok = (
                auth is not None
                and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
                and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
            )
            if not ok:
                response = jsonify(error="authentication required (BASIC_AUTH_USER/BASIC_AUTH_PASS)")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Basic realm="dataengine"'
                return response
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unknown"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        if "started" in g:
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
        return response


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError):
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes (DATAENGINE_MAX_REQUEST_BYTES)"
        return jsonify(error=message), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error: {exc.__class__.__name__}; see the backend log"), 500


# --- routes ----------------------------------------------------------------------------------------


def _install_routes(app: Flask, services: Services) -> None:
    settings = services.settings

    @app.get("/")
    @app.get("/health")
    def health():
        engines = services.engine.health()
        status = "UP" if any(engines.values()) else "DEGRADED"
        return jsonify(status=status, model_class="dataengine", engine=engines, redis=services.queue.ping())

    @app.post("/setup")
    def setup():
        body = read_json_object()
        project = project_id_from(body.get("project"))
        services.projects.check_room_for(project, settings.max_projects)
        stored = services.projects.get(project)
        schema = text_field(body, "schema", "label_config") or stored.label_config
        hostname, access_token = text_field(body, "hostname"), text_field(body, "access_token")
        if schema:
            _compile_any(schema, settings)  # 4xx now, not at the first /predict
        overrides = _parse_extra_params(body.get("extra_params"))
        hostname, access_token = bind_token(stored, hostname, access_token)
        access = label_studio.access_for(settings, hostname, access_token)
        guarded = not (access.trusted or settings.allow_private_urls)
        instructions = label_studio.fetch_instructions(access.url, access.token, project, guarded=guarded)
        updated = ProjectSettings(
            candidates=overrides.get("candidates", stored.candidates),
            temperature=overrides.get("temperature", stored.temperature),
            instructions=stored.instructions if instructions is None else instructions,
            label_config=schema or "",
            extra={**stored.extra, **overrides},
            label_studio_hostname=hostname,
            label_studio_token=access_token,
        )
        if updated != stored:
            services.projects.save(project, updated)
        return jsonify(model_version=services.versions.current(project).name)

    @app.post("/predict")
    def predict():
        body = read_json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of Label Studio tasks")
        if len(tasks) > settings.max_predict_tasks:
            raise PayloadTooLarge(
                f"{len(tasks)} tasks in one /predict; the limit is {settings.max_predict_tasks} "
                "(DATAENGINE_MAX_PREDICT_TASKS): pre-label a whole project with POST /prelabel or `dataengine prelabel`"
            )
        project = project_id_from(body.get("project"))
        stored = services.projects.get(project)
        schema = text_field(body, "label_config") or stored.label_config
        if not schema:
            raise BadRequest("'label_config' is missing and /setup has not been called for this project")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        if is_comparison_config(schema):
            return _comparison_predict(schema, tasks, params, services.versions.current(project).name, settings)
        config = compile_label_config(schema, settings=settings)
        overrides = _parse_extra_params(params.get("extra_params")) if params.get("extra_params") else {}
        predict_request = PredictRequest(
            config=config,
            tasks=tasks,
            version=services.versions.current(project),
            candidates=overrides.get("candidates") or stored.candidates or settings.candidates,
            temperature=overrides.get("temperature") or stored.temperature or settings.temperature,
            instructions=stored.instructions,
            label_studio=label_studio.access_for(settings, stored.label_studio_hostname, stored.label_studio_token),
            project=project,
        )
        outcome = services.predictor.predict_each(predict_request)
        services.usage.record(project, predict_request.version.name, "predict", outcome.usage,
                              tasks=len(tasks) - len(outcome.failures))
        if len(outcome.failures) == len(tasks):  # nothing to pre-annotate: answer with the (first) task's 4xx
            first = outcome.failures[0].error
            return jsonify(error=first.message, errors=[f.as_dict() for f in outcome.failures]), first.status
        results = outcome.predictions
        metrics.TASKS.inc(len(tasks) - len(outcome.failures))
        quality.remember_served(services.queue.redis, project, tasks, results, predict_request.version.name)
        if params.get("context") is not None:
            # Interactive pre-annotation: Label Studio hands results[0] to its UI, which reads `.result`
            # of ONE prediction; batch retrieval (context null) stores the whole ranked list.
            results = [ranked[0] if ranked else _empty_prediction(predict_request.version.name) for ranked in results]
        body = {"results": results, "model_version": predict_request.version.name}
        if outcome.failures:  # per task: those tasks get no predictions, the others do
            body["errors"] = [f.as_dict() for f in outcome.failures]
        return jsonify(body)

    @app.post("/webhook")
    def webhook():
        _check_webhook_secret(settings.webhook_secret)
        payload = read_json_object()
        event = parse_webhook(payload)
        metrics.count_webhook(event.action)
        created = quality.created_annotations(payload)
        recorded = services.queue.record(event, read_keys=[a.served_key(event.project) for a in created])
        _count_quality(event.project, created, recorded.read_values)
        body = {"status": "ok", "event": recorded.event_id, "training_job": recorded.training_job}
        if event.action not in HANDLED_ACTIONS:
            body["note"] = f"event {event.action} recorded; it does not affect training"
        if event.action == "TASKS_CREATED" and event.task_ids and is_comparison_config(services.projects.get(event.project).label_config):
            # ranking projects: the new tasks get their candidates written in by a prelabel job
            request_ = PrelabelRequest(event.project, task_ids=event.task_ids, reason="TASKS_CREATED")
            body["prelabel_job"] = enqueue_prelabel(services.queue, request_, settings.job_timeout)
        return jsonify(body), 200

    @app.post("/prelabel")
    def prelabel():
        prelabel_request = PrelabelRequest.from_body(read_json_object())
        job_id = enqueue_prelabel(services.queue, prelabel_request, settings.job_timeout)
        return jsonify(job=job_id, project=prelabel_request.project), 202

    @app.get("/events")
    def events():
        project = project_id_from(request.args.get("project"))
        limit = _int_arg("limit", 100, 1, 10_000)
        return jsonify(project=project, events=services.queue.recent_events(project, limit))

    @app.get("/jobs")
    def jobs():
        return jsonify(jobs=services.queue.list_jobs(_int_arg("limit", 50, 1, 1000)))

    @app.get("/jobs/<path:job_id>")
    def job(job_id: str):
        found = services.queue.get_job(job_id)
        if found is None:
            return jsonify(error=f"no job {job_id!r}"), 404
        return jsonify(found)

    @app.get("/versions")
    def versions():
        project = request.args.get("project")
        projects = [project_id_from(project)] if project else services.versions.projects()
        return jsonify(
            projects={
                p: {"current": services.versions.current(p).name, "versions": services.versions.versions(p)} for p in projects
            }
        )

    @app.get("/metrics")
    def prometheus_metrics():
        payload, content_type = metrics.render(services.queue.redis, [q.name for q in services.queue.queues.values()])
        return Response(payload, content_type=content_type)


def _compile_any(schema: str, settings: Settings) -> None:
    """Validate a config of either kind: answer configs (label_config.py) or ranking configs (ranking.py)."""
    if is_comparison_config(schema):
        compile_ranking_config(schema, settings=settings)
    else:
        compile_label_config(schema, settings=settings)


def _comparison_predict(schema: str, tasks: list, params: dict, model_version: str, settings: Settings):
    """Ranking projects: a prediction cannot add <List> items, so /predict has nothing to add; the candidates and
    the model's order are written by the prelabel job (TASKS_CREATED webhook, POST /prelabel)."""
    compile_ranking_config(schema, settings=settings)  # a broken config still gets its 422
    if params.get("context") is not None:
        results = [_empty_prediction(model_version) for _ in tasks]
    else:
        results = [[] for _ in tasks]
    note = "ranking project: candidates are written into the tasks by the prelabel job (TASKS_CREATED, POST /prelabel)"
    return jsonify(results=results, model_version=model_version, note=note)


def _count_quality(project: str, created: list[quality.CreatedAnnotation], served: list) -> None:
    """The quality signal is bookkeeping: it never fails a webhook that was recorded."""
    try:
        quality.count_outcomes(project, created, served)
    except ValueError as exc:
        log.warning("quality signal: annotation outcome not counted: %s", exc)


def bind_token(stored: ProjectSettings, hostname: str, token: str) -> tuple[str, str]:
    """The (hostname, token) pair to keep from a /setup: a token stays bound to the Label Studio it came with,
    so a /setup naming another host without a token of its own drops the stored one."""
    if hostname and _origin(hostname) != _origin(stored.label_studio_hostname):
        return hostname, token
    return hostname or stored.label_studio_hostname, token or stored.label_studio_token


def _origin(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii').lower()}"


def _empty_prediction(model_version: str) -> dict[str, Any]:
    return {"result": [], "score": 0.0, "model_version": model_version}


def _check_webhook_secret(secret: str) -> None:
    if secret and not hmac.compare_digest(request.headers.get(SECRET_HEADER, "").encode(), secret.encode()):
        raise RequestError(f"missing or wrong {SECRET_HEADER} header (DATAENGINE_WEBHOOK_SECRET)", 401)


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, default)
    try:
        value = int(raw)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"query parameter {name!r} must be an integer") from exc
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name!r} must be between {low} and {high}")
    return value


def _parse_extra_params(raw: Any) -> dict[str, Any]:
    """Per-project overrides from the ML backend's "extra params" (a JSON object, or its text)."""
    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"extra_params is not valid JSON: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise BadRequest("extra_params must be a JSON object, e.g. {\"candidates\": 6}")
    overrides: dict[str, Any] = {}
    if "candidates" in raw:
        value = raw["candidates"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
            raise BadRequest(f"extra_params.candidates must be an integer from 1 to 32, got {value!r}")
        overrides["candidates"] = value
    if "temperature" in raw:
        value = raw["temperature"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 2:
            raise BadRequest(f"extra_params.temperature must be a number in (0, 2], got {value!r}")
        overrides["temperature"] = float(value)
    return overrides
