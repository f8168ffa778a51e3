"""RQ jobs: one training round per project (export -> derive -> snapshot -> [train -> evaluate ->
promote]) and the periodic reconcile that catches triggers Label Studio never delivered.

Runs inside `dataengine worker`. One round per project at a time (a Redis lock); a trigger that
arrives while a round runs sets `rerun:<project>` and the round goes once more (coalesced, not lost).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job

from backend.jobs import FeedbackQueue, key
from backend.metrics import record_training_job
from backend.settings import Settings, get_settings

from .export import export_project
from .preferences import derive
from .rounds import RoundInputs, learn
from .snapshot import label_config_hash, write_snapshot

log = logging.getLogger(__name__)
MAX_ROUNDS_PER_JOB = 5


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
        with redis.lock(key("train-lock", project), timeout=settings.job_timeout, blocking_timeout=settings.job_timeout):
            rounds = []
            for _ in range(MAX_ROUNDS_PER_JOB):
                redis.delete(key("rerun", project))
                rounds.append(_one_round(project, settings, redis))
                if not redis.get(key("rerun", project)):
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
    url, api_key = _label_studio_credentials(settings)
    report_progress("export", tasks=0)
    exported = export_project(url, api_key, project, progress=lambda n: report_progress("export", tasks=n))
    report_progress("derive", tasks=len(exported.tasks))
    derived = derive(exported.tasks, exported.label_config, exported.instructions)
    project_dir = Path(settings.projects_dir) / project
    snapshot = write_snapshot(
        project_dir,
        derived,
        {"source": url, "label_config_hash": label_config_hash(exported.label_config), "annotations": exported.annotation_count},
    )
    redis.set(key("seen-annotations", project), exported.annotation_count)  # what reconcile compares with
    report_progress("snapshot", round=snapshot.round, pairs=derived.counts.get("pairs", len(derived.pairs)))
    learned = learn(RoundInputs(project, exported, derived, snapshot), settings, report_progress)
    return {
        "snapshot": str(snapshot.path),
        "round": snapshot.round,
        "hash": snapshot.content_hash,
        "counts": snapshot.counts,
        "learning": learned,
    }


def _label_studio_credentials(settings: Settings) -> tuple[str, str]:
    if not (settings.label_studio_url and settings.label_studio_api_key):
        raise RuntimeError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set for the worker to export annotations")
    return settings.label_studio_url, settings.label_studio_api_key


def reconcile(settings: Settings | None = None) -> dict[str, Any]:
    """Compare each known project's annotation count in Label Studio with the latest snapshot's; train
    where they differ by at least DATAENGINE_TRAIN_EVERY (webhooks may have been lost), then reschedule."""
    settings = settings or get_settings()
    queue = FeedbackQueue.from_settings(settings)
    triggered = []
    for raw in queue.redis.smembers(key("projects")):
        project = raw.decode()
        try:
            if _needs_training(project, settings, queue.redis):
                triggered.append(queue.request_training(project, reason="reconcile"))
        except Exception as exc:  # one unreachable project must not stop the others
            log.warning("reconcile of project %s failed: %s", project, exc)
    if settings.reconcile_interval:
        from datetime import timedelta

        queue.queue.enqueue_in(timedelta(seconds=settings.reconcile_interval), "training.jobs.reconcile", job_id="reconcile-next")
    return {"triggered": triggered}


def _needs_training(project: str, settings: Settings, redis: Redis) -> bool:
    url, api_key = _label_studio_credentials(settings)
    total = _annotation_count(url, api_key, project)
    seen = int(redis.get(key("seen-annotations", project)) or 0)
    return abs(total - seen) >= settings.train_every


def _annotation_count(url: str, api_key: str, project: str) -> int:
    from backend.label_studio import client

    ls = client(url, api_key)
    return sum(len(t.annotations or []) for t in ls.tasks.list(project=int(project), fields="all"))
