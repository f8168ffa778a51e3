"""Enqueueing pre-labelling runs on RQ (`POST /prelabel`, and TASKS_CREATED in ranking projects), on the
prelabel queue: a training round running on the training queue never delays them.

The job is `training.prelabel.run_prelabel`, enqueued by dotted name: the backend never imports training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from .errors import BadRequest
from .jobs import FeedbackQueue, QueueUnavailable
from .projects import project_id_from

PRELABEL_FUNC = "training.prelabel.run_prelabel"
MAX_TASK_IDS = 100_000


@dataclass(frozen=True)
class PrelabelRequest:
    project: str
    force: bool = False
    limit: int | None = None
    task_ids: tuple[int, ...] = ()
    reason: str = "api"

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "PrelabelRequest":
        """`POST /prelabel` body: {"project": ID, "force"?: bool, "limit"?: int >= 1, "tasks"?: [task ids]}."""
        raw = body.get("project")
        if raw in (None, ""):
            raise BadRequest("'project' is required: the Label Studio project id to pre-label")
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit():
            raise BadRequest(f"'project' must be a numeric Label Studio project id, got {str(raw)[:80]!r}")
        project = project_id_from(raw)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise BadRequest(f"'force' must be true or false, got {force!r}")
        limit = body.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BadRequest(f"'limit' must be a positive integer, got {limit!r}")
        tasks = body.get("tasks", [])
        if not isinstance(tasks, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tasks):
            raise BadRequest("'tasks' must be a list of integer task ids")
        if len(tasks) > MAX_TASK_IDS:
            raise BadRequest(f"'tasks' lists {len(tasks)} ids; at most {MAX_TASK_IDS} (leave it out for the whole project)")
        return cls(project, force, limit, tuple(tasks))


def enqueue_prelabel(queue: FeedbackQueue, request: PrelabelRequest, job_timeout: int) -> str:
    """Enqueue a run; returns the RQ job id. Raises QueueUnavailable (503) when Redis is down."""
    try:
        job = queue.prelabel.enqueue(
            PRELABEL_FUNC,
            request.project,
            request.force,
            request.limit,
            list(request.task_ids),
            job_id=f"prelabel-{request.project}-{int(time.time() * 1000)}",
            job_timeout=job_timeout,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
            meta={"project": request.project, "reason": request.reason, "kind": "prelabel"},
            description=f"pre-label project {request.project} ({request.reason}"
            + (f", {len(request.task_ids)} tasks" if request.task_ids else "")
            + (", forced" if request.force else "")
            + ")",
        )
    except RedisError as exc:
        raise QueueUnavailable(f"Redis is unreachable ({exc.__class__.__name__}): pre-labelling not queued, retry later") from exc
    return job.id
