"""RQ jobs: one training round per project (export -> label prior synced -> derive -> snapshot -> [train ->
evaluate -> promote]) and the periodic reconcile that catches triggers Label Studio never delivered: annotations
whose webhooks were lost (a training round) and, in ranking projects, imported tasks whose TASKS_CREATED
was lost and so never got candidates (a prelabel job for those tasks).

Runs inside `dataengine worker`. One round per project at a time (a Redis lock); a trigger that
arrives while a round runs asks for a rerun and the round goes once more (coalesced, not lost). The Redis keys
and job names are backend/queue.py's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job

from backend.label_prior import LabelPriors
from backend.label_studio import client, credentials
from backend.metrics import record_training_job
from backend.protocol import PrelabelRequest
from backend.queue import (
    FeedbackQueue,
    enqueue_prelabel,
    prelabel_pending,
    projects_key,
    rerun_key,
    schedule_reconcile,
    seen_annotations_key,
    train_lock_key,
)
from backend.ranking import ranking_config_of
from backend.settings import Settings, get_settings

from .export import export_project
from .locks import renewed_lock
from .preferences import derive
from .rounds import RoundInputs, learn
from .snapshot import label_config_hash, write_snapshot

log = logging.getLogger(__name__)
MAX_ROUNDS_PER_JOB = 5
WORKER_NEEDS_LABEL_STUDIO = "for the worker to export annotations"


def report_progress(stage: str, **detail: Any) -> None:
    """Progress visible in GET /jobs/<id> and `dataengine jobs`."""
    job = get_current_job()
    log.info("progress: %s %s", stage, detail)
    if job is not None:
        job.meta["progress"] = {"stage": stage, "at": time.time(), **detail}
        job.save_meta()


def run_training_round(project: str, reason: str = "manual", settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    redis = Redis.from_url(settings.redis_url)
    started = time.monotonic()
    outcome = "failed"
    try:
        with renewed_lock(redis, train_lock_key(project), ttl=settings.lock_ttl, wait=settings.job_timeout):
            rounds = []
            for _ in range(MAX_ROUNDS_PER_JOB):
                redis.delete(rerun_key(project))
                rounds.append(_one_round(project, settings, redis))
                if not redis.get(rerun_key(project)):
                    break
                report_progress("rerun", reason="feedback arrived during the round")
        outcome = job_outcome(rounds)
    finally:
        _record_metrics(redis, outcome, time.monotonic() - started)
    return {"project": project, "reason": reason, "rounds": rounds}


def job_outcome(rounds: list[dict[str, Any]]) -> str:
    """promoted if any round promoted a version; else what the last round did (rejected or skipped)."""
    learned = [r.get("learning") or {} for r in rounds]
    if any(step.get("promoted") for step in learned):
        return "promoted"
    return "skipped" if not learned or "skipped" in learned[-1] else "rejected"


def _record_metrics(redis: Redis, outcome: str, seconds: float) -> None:
    """Job duration and outcome for /metrics (held in Redis: see backend/metrics.py). Never fails the job."""
    try:
        record_training_job(redis, outcome, seconds)
    except RedisError as exc:  # Redis down: the job's own result matters more than its metric
        log.warning("could not record training-job metrics: %s", exc)


def _one_round(project: str, settings: Settings, redis: Redis) -> dict[str, Any]:
    url, api_key = credentials(settings, WORKER_NEEDS_LABEL_STUDIO)
    report_progress("export", tasks=0)
    exported = export_project(url, api_key, project, progress=lambda n: report_progress("export", tasks=n))
    LabelPriors(redis).sync_from_export(project, exported.tasks)
    report_progress("derive", tasks=len(exported.tasks))
    derived = derive(exported.tasks, exported.label_config, exported.instructions)
    project_dir = Path(settings.projects_dir) / project
    snapshot = write_snapshot(
        project_dir,
        derived,
        {"source": url, "label_config_hash": label_config_hash(exported.label_config), "annotations": exported.annotation_count},
    )
    redis.set(seen_annotations_key(project), exported.annotation_count)  # what reconcile compares with
    report_progress("snapshot", round=snapshot.round, pairs=derived.counts.get("pairs", len(derived.pairs)))
    learned = learn(RoundInputs(project, exported, derived, snapshot), settings, report_progress)
    return {
        "snapshot": str(snapshot.path),
        "round": snapshot.round,
        "hash": snapshot.content_hash,
        "counts": snapshot.counts,
        "learning": learned,
    }


def reconcile(settings: Settings | None = None) -> dict[str, Any]:
    """For each known project, read its tasks in Label Studio once: train where the annotation count differs
    from the latest snapshot's by at least DATAENGINE_TRAIN_EVERY, and fill ranking tasks that have no
    candidates (unless a prelabel job of the project is queued or running); then schedule the next pass,
    also when this one failed."""
    settings = settings or get_settings()
    queue = FeedbackQueue.from_settings(settings)
    try:
        return _reconcile_projects(queue, settings)
    finally:
        if settings.reconcile_interval:
            schedule_reconcile(queue, delay=settings.reconcile_interval)


def _reconcile_projects(queue: FeedbackQueue, settings: Settings) -> dict[str, Any]:
    triggered, filling = [], []
    for raw in queue.redis.smembers(projects_key()):
        project = raw.decode()
        try:
            state = _read_project(project, settings)
            seen = int(queue.redis.get(seen_annotations_key(project)) or 0)
            if abs(state.annotations - seen) >= settings.train_every:
                triggered.append(queue.request_training(project, reason="reconcile"))
            if state.unfilled and not prelabel_pending(queue, project):
                request = PrelabelRequest(project, task_ids=state.unfilled, reason="reconcile")
                filling.append(enqueue_prelabel(queue, request, settings.job_timeout))
        except Exception as exc:  # one unreachable project must not stop the others
            log.warning("reconcile of project %s failed: %s", project, exc)
    return {"triggered": triggered, "filling": filling}


@dataclass(frozen=True)
class ProjectState:
    annotations: int  # in Label Studio now
    unfilled: tuple[int, ...]  # ranking projects: tasks without candidates


def _read_project(project: str, settings: Settings) -> ProjectState:
    ls = client(*credentials(settings, WORKER_NEEDS_LABEL_STUDIO))
    xml = ls.projects.get(id=int(project)).label_config or ""
    ranking = ranking_config_of(xml, settings=settings)
    annotations, unfilled = 0, []
    for task in ls.tasks.list(project=int(project), fields="all"):
        annotations += len(task.annotations or [])
        if ranking is not None and not ranking.has_candidates({"data": task.data}):
            unfilled.append(int(task.id))
    return ProjectState(annotations, tuple(unfilled))
