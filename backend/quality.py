"""Production quality signal: do annotators keep the top candidate unchanged?

Label Studio's ANNOTATION_CREATED webhook carries the annotation (its `result` and `parent_prediction`, a
Label Studio prediction id) and the task's own fields, but not the task's predictions, so the payload
alone cannot say which candidate was on top. The backend therefore remembers what it served: at
/predict, for each task with an id, the model version and a fingerprint of each ranked candidate
(`served:<project>:<task>` in Redis, 30 days: backend/queue.py). When an annotation is created, its result is compared with
them and counted in `dataengine_annotations_total{project, model_version, outcome}`:
  top        equal to the top candidate (region ids, `origin` and other UI fields ignored)
  candidate  equal to a lower-ranked candidate
  edited     equal to none of them
Annotations of tasks the backend never pre-annotated, and cancelled (skipped) ones, are not counted. If a
task was pre-annotated more than once, the last /predict wins.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from . import metrics
from .candidates import canonical_key
from .queue import SERVED_TTL, RedisBackoff, served_key

log = logging.getLogger(__name__)
CREATED_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED"}
_backoff = RedisBackoff()  # after a failed write, /predict skips this bookkeeping for a while


def fingerprint(result: Any) -> str:
    """A short hash of `canonical_key`: what /predict stores per candidate and annotations are compared with."""
    return hashlib.sha1(canonical_key(result).encode()).hexdigest()[:16]


def remember_served(redis: Redis, project: str, tasks: list[Any], ranked: list[list[dict[str, Any]]], version: str) -> None:
    """Record what /predict returned per task. Never fails the request: Redis trouble is logged and skipped."""
    if _backoff.active():
        return
    entries = {}
    for task, predictions in zip(tasks, ranked):
        task_id = task.get("id") if isinstance(task, dict) else None
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not predictions:
            continue
        entries[served_key(project, task_id)] = json.dumps(
            {"version": version, "candidates": [fingerprint(p.get("result")) for p in predictions]}
        )
    if not entries:
        return
    try:
        with redis.pipeline(transaction=False) as pipe:
            for name, value in entries.items():
                pipe.set(name, value, ex=SERVED_TTL)
            pipe.execute()
    except RedisError as exc:
        _backoff.failed()
        log.warning("quality signal: cannot record served candidates (%s); retrying in %.0f s", exc, _backoff.seconds)


@dataclass(frozen=True)
class CreatedAnnotation:
    task_id: int
    result: Any

    def served_key(self, project: str) -> str:
        return served_key(project, self.task_id)


def created_annotations(body: dict[str, Any]) -> list[CreatedAnnotation]:
    """The annotations a webhook payload creates (cancelled/skipped ones excluded), with their task ids."""
    if body.get("action") not in CREATED_ACTIONS:
        return []
    annotations = body.get("annotations", body.get("annotation"))
    annotations = [annotations] if isinstance(annotations, dict) else annotations
    task = body.get("task")
    default_task = task.get("id") if isinstance(task, dict) else None
    created = []
    for annotation in annotations if isinstance(annotations, list) else []:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        task_id = annotation.get("task") if isinstance(annotation.get("task"), int) else default_task
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            created.append(CreatedAnnotation(task_id, annotation.get("result")))
    return created


def count_outcomes(project: str, created: list[CreatedAnnotation], served: list[bytes | None]) -> int:
    """Count top/candidate/edited for each annotation whose task we served (`served`: the stored records,
    read by the caller, in the order of `created`); returns how many were counted."""
    counted = 0
    for annotation, raw in zip(created, served):
        if raw is None:
            continue
        record = json.loads(raw)
        candidates = record.get("candidates") or []
        mark = fingerprint(annotation.result)
        outcome = "top" if candidates[:1] == [mark] else "candidate" if mark in candidates else "edited"
        metrics.ANNOTATIONS.labels(project, record.get("version", ""), outcome).inc()
        counted += 1
    return counted

