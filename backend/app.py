"""Flask app factory: Label Studio's ML backend protocol (/health, /setup, /predict) plus /metrics."""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import metrics
from .engine_client import EngineClient
from .errors import BadRequest, RequestError
from .projects import project_id_from
from .protocol import PredictTasksRequest, PrelabelRequest, SetupRequest
from .services import Services
from .settings import Settings, get_settings

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


def _install_hooks(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _start_and_authenticate():
        g.started = time.perf_counter()
        if not settings.auth_configured or request.endpoint in OPEN_ENDPOINTS or _webhook_secret_ok(settings):
            return None
        if _basic_auth_ok(settings):
            return None
        response = jsonify(error="authentication required (BASIC_AUTH_USER/BASIC_AUTH_PASS)")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="dataengine"'
        return response

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unknown"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        if "started" in g:
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
        return response


def _webhook_secret_ok(settings: Settings) -> bool:
    """A webhook carrying the shared secret needs no basic auth (Label Studio sends the header it is given)."""
    return bool(
        request.endpoint == "webhook"
        and settings.webhook_secret
        and _secret_header_matches(settings.webhook_secret)
    )


def _secret_header_matches(secret: str) -> bool:
    return hmac.compare_digest(request.headers.get(SECRET_HEADER, "").encode(), secret.encode())


def _basic_auth_ok(settings: Settings) -> bool:
    auth = request.authorization
    return (
        auth is not None
        and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    )


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
        model_version = services.setup.setup(SetupRequest.from_body(read_json_object()))
        return jsonify(model_version=model_version)

    @app.post("/predict")
    def predict():
        reply = services.predictions.predict(PredictTasksRequest.from_body(read_json_object(), settings.max_predict_tasks))
        return jsonify(reply.body), reply.status

    @app.post("/webhook")
    def webhook():
        _check_webhook_secret(settings.webhook_secret)
        return jsonify(services.webhooks.receive(read_json_object())), 200

    @app.post("/prelabel")
    def prelabel():
        prelabel_request = PrelabelRequest.from_body(read_json_object())
        job_id = services.prelabel.enqueue(prelabel_request)
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


def _check_webhook_secret(secret: str) -> None:
    if secret and not _secret_header_matches(secret):
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
