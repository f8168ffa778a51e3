"""What the routes call: one service per concern, built once per process and held by `Services`.

The routes in backend/app.py parse a body (backend/protocol.py), call one method here and turn its answer into
JSON; the rules (which config kind, which sampling, what to count, when to enqueue) are written here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from . import label_studio, metrics, quality
from .calibration import SharedBatchCalibration
from .engine_client import EngineClient
from .errors import BadRequest
from .feedback import HANDLED_ACTIONS, parse_webhook
from .label_prior import LabelPriors, update_from_webhook
from .predictor import PredictOutcome, PredictRequest, Predictor
from .projects import ProjectSettings, ProjectStore, Sampling
from .protocol import PredictTasksRequest, PrelabelRequest, SetupRequest
from .queue import FeedbackQueue, enqueue_prelabel
from .ranking import RankingConfig, compile_any, is_comparison_config
from .registry import ServingVersion, VersionReader
from .settings import Settings
from .usage import UsageStore

log = logging.getLogger(__name__)
RANKING_PREDICT_NOTE = "ranking project: candidates are written into the tasks by the prelabel job (TASKS_CREATED, POST /prelabel)"


@dataclass(frozen=True)
class Reply:
    """A JSON answer and its HTTP status."""

    body: dict[str, Any]
    status: int = 200


class Services:
    """What the routes share; built once per process (never per request)."""

    def __init__(self, settings: Settings, engine: EngineClient):
        self.settings = settings
        self.engine = engine
        self.projects = ProjectStore(settings.projects_dir)
        self.versions = VersionReader(settings.projects_dir, settings.model_name)
        self.queue = FeedbackQueue.from_settings(settings)
        self.predictor = Predictor(settings, engine, SharedBatchCalibration(self.queue.redis))
        self.usage = UsageStore(self.queue.redis, settings.max_projects)
        self.label_priors = LabelPriors(self.queue.redis)
        self.prelabel = PrelabelJobs(settings, self.queue)
        self.setup = ProjectSetup(settings, self.projects, self.versions)
        self.predictions = Predictions(self)
        self.webhooks = Webhooks(settings, self.queue, self.projects, self.prelabel, self.label_priors)


class PrelabelJobs:
    def __init__(self, settings: Settings, queue: FeedbackQueue):
        self.settings, self.queue = settings, queue

    def enqueue(self, request: PrelabelRequest) -> str:
        return enqueue_prelabel(self.queue, request, self.settings.job_timeout)


# --- /setup ---------------------------------------------------------------------------------------------


class ProjectSetup:
    def __init__(self, settings: Settings, projects: ProjectStore, versions: VersionReader):
        self.settings, self.projects, self.versions = settings, projects, versions

    def setup(self, request: SetupRequest) -> str:
        """Check and store the project's config, overrides, instructions and Label Studio token; returns the
        project's model version."""
        self.projects.check_room_for(request.project, self.settings.max_projects)
        stored = self.projects.get(request.project)
        schema = request.schema or stored.label_config
        if schema:
            compile_any(schema, settings=self.settings)  # 4xx now, not at the first /predict
        overrides = request.overrides()
        hostname, token = bind_token(stored, request.hostname, request.access_token)
        instructions = self._instructions(request.project, hostname, token)
        updated = ProjectSettings(
            candidates=overrides.get("candidates", stored.candidates),
            temperature=overrides.get("temperature", stored.temperature),
            instructions=stored.instructions if instructions is None else instructions,
            label_config=schema or "",
            extra={**stored.extra, **overrides},
            label_studio_hostname=hostname,
            label_studio_token=token,
        )
        if updated != stored:
            self.projects.save(request.project, updated)
        return self.versions.current(request.project).name

    def _instructions(self, project: str, hostname: str, token: str) -> str | None:
        access = label_studio.access_for(self.settings, hostname, token)
        guarded = not (access.trusted or self.settings.allow_private_urls)
        return label_studio.fetch_instructions(access.url, access.token, project, guarded=guarded)


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


# --- /predict -------------------------------------------------------------------------------------------


class Predictions:
    def __init__(self, services: Services):
        self.settings, self.projects, self.versions = services.settings, services.projects, services.versions
        self.predictor, self.usage, self.redis = services.predictor, services.usage, services.queue.redis
        self.label_priors = services.label_priors

    def predict(self, request: PredictTasksRequest) -> Reply:
        stored = self.projects.get(request.project)
        schema = request.label_config or stored.label_config
        if not schema:
            raise BadRequest("'label_config' is missing and /setup has not been called for this project")
        version = self.versions.current(request.project)
        config = compile_any(schema, settings=self.settings)
        if isinstance(config, RankingConfig):
            return _nothing_to_add(request, version.name)
        predict_request = self._predict_request(request, config, stored, version)
        outcome = self.predictor.predict_each(predict_request)
        served = len(request.tasks) - len(outcome.failures)
        self.usage.record(request.project, version.name, "predict", outcome.usage, tasks=served)
        if not served:  # nothing to pre-annotate: answer with the (first) task's 4xx
            first = outcome.failures[0].error
            return Reply({"error": first.message, "errors": [f.as_dict() for f in outcome.failures]}, first.status)
        metrics.TASKS.inc(served)
        quality.remember_served(self.redis, request.project, request.tasks, outcome.predictions, version.name)
        return Reply(_predictions_body(request, outcome, version.name))

    def _predict_request(self, request: PredictTasksRequest, config, stored: ProjectSettings,
                         version: ServingVersion) -> PredictRequest:
        sampling = Sampling.resolve(self.settings, stored, request.overrides())
        return PredictRequest(
            config=config,
            tasks=request.tasks,
            version=version,
            candidates=sampling.candidates,
            temperature=sampling.temperature,
            instructions=stored.instructions,
            label_studio=label_studio.access_for(self.settings, stored.label_studio_hostname, stored.label_studio_token),
            project=request.project,
            label_prior=self.label_priors.for_prediction(request.project, config, version, self.settings.enumerate_max),
        )


def _predictions_body(request: PredictTasksRequest, outcome: PredictOutcome, model_version: str) -> dict[str, Any]:
    results = outcome.predictions
    if request.interactive:
        # Interactive pre-annotation: Label Studio hands results[0] to its UI, which reads `.result`
        # of ONE prediction; batch retrieval (context null) stores the whole ranked list.
        results = [ranked[0] if ranked else empty_prediction(model_version) for ranked in results]
    body = {"results": results, "model_version": model_version}
    if outcome.failures:  # per task: those tasks get no predictions, the others do
        body["errors"] = [f.as_dict() for f in outcome.failures]
    return body


def _nothing_to_add(request: PredictTasksRequest, model_version: str) -> Reply:
    """Ranking projects: a prediction cannot add <List> items, so /predict has nothing to add; the candidates and
    the model's order are written by the prelabel job (TASKS_CREATED webhook, POST /prelabel)."""
    if request.interactive:
        results = [empty_prediction(model_version) for _ in request.tasks]
    else:
        results = [[] for _ in request.tasks]
    return Reply({"results": results, "model_version": model_version, "note": RANKING_PREDICT_NOTE})


def empty_prediction(model_version: str) -> dict[str, Any]:
    return {"result": [], "score": 0.0, "model_version": model_version}


# --- /webhook -------------------------------------------------------------------------------------------


class Webhooks:
    def __init__(self, settings: Settings, queue: FeedbackQueue, projects: ProjectStore, prelabel: PrelabelJobs,
                 label_priors: LabelPriors):
        self.settings, self.queue, self.projects, self.prelabel = settings, queue, projects, prelabel
        self.label_priors = label_priors

    def receive(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Record a Label Studio event (training starts when due), count the quality signal of the annotations
        it creates, keep the project's label counts, and have a ranking project's new tasks filled with candidates."""
        event = parse_webhook(payload)
        metrics.count_webhook(event.action)
        created = quality.created_annotations(payload)
        recorded = self.queue.record(event, read_keys=[a.served_key(event.project) for a in created])
        _count_quality(event.project, created, recorded.read_values)
        self.label_priors.apply(update_from_webhook(event.project, payload))
        body = {"status": "ok", "event": recorded.event_id, "training_job": recorded.training_job}
        if event.action not in HANDLED_ACTIONS:
            body["note"] = f"event {event.action} recorded; it does not affect training"
        if event.action == "TASKS_CREATED" and event.task_ids and self._is_ranking_project(event.project):
            # ranking projects: the new tasks get their candidates written in by a prelabel job
            fill = PrelabelRequest(event.project, task_ids=event.task_ids, reason="TASKS_CREATED")
            body["prelabel_job"] = self.prelabel.enqueue(fill)
        return body

    def _is_ranking_project(self, project: str) -> bool:
        return is_comparison_config(self.projects.get(project).label_config)


def _count_quality(project: str, created: list[quality.CreatedAnnotation], served: list) -> None:
    """The quality signal is bookkeeping: it never fails a webhook that was recorded."""
    try:
        quality.count_outcomes(project, created, served)
    except ValueError as exc:
        log.warning("quality signal: annotation outcome not counted: %s", exc)
