"""The queue contract: every Redis key, RQ job function name, job-id prefix and TTL, and the enqueue side.

The serving side records feedback in Redis and schedules jobs on RQ here; the worker side (training/) reads the
same keys through the builders below. Jobs are enqueued by dotted name ("training.jobs...."), so the backend
never imports training code. Two RQ queues, so that a long training round never delays candidate filling:
`<DATAENGINE_QUEUE_NAME>-training` (training rounds) and `<DATAENGINE_QUEUE_NAME>-prelabel` (pre-labelling,
candidate filling, the reconcile pass). A worker listens to one or both (`dataengine worker --queues
training,prelabel`).

Redis layout (prefix `dataengine:`):
  events:<project>            stream of every webhook event received (capped), the audit trail
  changes:<project>           annotation changes since the last training trigger
  projects                    set of projects we have heard of (the reconcile job walks it)
  train-job:<project>         id of the project's latest training job (coalescing)
  rerun:<project>             set when a trigger arrives while training runs; the job runs one more round
  enqueue-lock:<project>      held while a training job is enqueued or joined
  train-lock:<project>        held (and renewed) while a training round runs: one round per project
  prelabel-lock:<project>     held (and renewed) while a prelabel run writes the project
  seen-annotations:<project>  annotations the latest snapshot held (reconcile compares Label Studio with it)
  reconcile-schedule-lock     held while a worker checks that one reconcile chain is scheduled
  served:<project>:<task>     what /predict served for the task (quality signal, 30 days)
  metrics:training:<outcome>  training-job duration histogram (hash) for /metrics
  usage:<project>, usage:projects  engine usage per project and version; admitted projects (backend/usage.py)
RQ's own keys (`rq:...`) hold the jobs.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus, validate_job_id

from .errors import BadRequest, RequestError
from .feedback import FeedbackEvent
from .protocol import PrelabelRequest

PREFIX = "dataengine:"
# RQ job functions, enqueued by dotted name (the backend never imports training/)
TRAIN_FUNC = "training.jobs.run_training_round"
RECONCILE_FUNC = "training.jobs.reconcile"
PRELABEL_FUNC = "training.prelabel.run_prelabel"
# Job ids: <prefix><project>-<enqueue time in ms> (reconcile: <prefix><ms>), a fresh id per job
TRAIN_JOB_PREFIX, PRELABEL_JOB_PREFIX, RECONCILE_JOB_PREFIX = "train-", "prelabel-", "reconcile-"
JOB_RESULT_TTL = 7 * 24 * 3600  # finished and failed jobs stay visible in GET /jobs this long
SERVED_TTL = 30 * 24 * 3600
EVENTS_MAXLEN = 100_000
ENQUEUE_LOCK_TIMEOUT, ENQUEUE_LOCK_WAIT = 10, 5
RECONCILE_SCHEDULE_LOCK_TIMEOUT = 10
ACTIVE = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED}
TRAINING, PRELABEL = "training", "prelabel"
QUEUE_KINDS = (TRAINING, PRELABEL)

# Admit a project: already known, or room for one more (then it is added); returns 1 when admitted.
ADMIT_PROJECT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

# Atomically add to the change counter and reset it when it reaches the threshold; returns 1 on trigger.
_COUNT_AND_TRIGGER = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n >= tonumber(ARGV[2]) then redis.call('SET', KEYS[1], 0) return 1 end
return 0
"""


# --- bookkeeping on Redis ----------------------------------------------------------------------------


REDIS_BACKOFF_S = 30.0


@dataclass
class RedisBackoff:
    """Bookkeeping that must never slow a request: after a Redis failure it skips Redis for `seconds` (no 1 s
    connect stall per /predict while Redis is down)."""

    seconds: float = REDIS_BACKOFF_S
    until: float = 0.0

    def active(self) -> bool:
        return time.monotonic() < self.until

    def failed(self) -> None:
        self.until = time.monotonic() + self.seconds


# --- keys -----------------------------------------------------------------------------------------------


def key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def events_key(project: str) -> str:
    return key("events", project)


def changes_key(project: str) -> str:
    return key("changes", project)


def projects_key() -> str:
    return key("projects")


def train_job_key(project: str) -> str:
    return key("train-job", project)


def rerun_key(project: str) -> str:
    return key("rerun", project)


def enqueue_lock_key(project: str) -> str:
    return key("enqueue-lock", project)


def train_lock_key(project: str) -> str:
    return key("train-lock", project)


def prelabel_lock_key(project: str) -> str:
    return key("prelabel-lock", project)


def seen_annotations_key(project: str) -> str:
    return key("seen-annotations", project)


def reconcile_schedule_lock_key() -> str:
    return key("reconcile-schedule-lock")


def served_key(project: str, task_id: int) -> str:
    return key("served", project, str(task_id))


def training_metrics_key(outcome: str) -> str:
    return key("metrics", "training", outcome)


def usage_key(project: str) -> str:
    return key("usage", project)


def usage_projects_key() -> str:
    return key("usage", "projects")


# --- job ids --------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def train_job_id(project: str) -> str:
    return f"{TRAIN_JOB_PREFIX}{project}-{_now_ms()}"


def prelabel_job_id(project: str) -> str:
    return f"{PRELABEL_JOB_PREFIX}{project}-{_now_ms()}"


def is_prelabel_job_of(job_id: str, project: str) -> bool:
    return job_id.startswith(f"{PRELABEL_JOB_PREFIX}{project}-")


def reconcile_job_id() -> str:
    return f"{RECONCILE_JOB_PREFIX}{_now_ms()}"


def is_reconcile_job(job_id: str) -> bool:
    return job_id.startswith(RECONCILE_JOB_PREFIX)


class QueueUnavailable(RequestError):
    status = 503


@contextmanager
def redis_needed(what: str):
    """Redis errors inside become a 503 naming what could not be done."""
    try:
        yield
    except RedisError as exc:
        raise QueueUnavailable(f"Redis is unreachable ({exc.__class__.__name__}): {what}, retry later") from exc


@dataclass(frozen=True)
class Recorded:
    event_id: str
    training_job: str | None  # id of the job this event started or joined, if any
    read_values: list = field(default_factory=list)  # values of the keys `record` was asked to read


def queue_names(prefix: str) -> dict[str, str]:
    """The RQ queue of each kind of job: `<prefix>-training`, `<prefix>-prelabel`."""
    return {kind: f"{prefix}-{kind}" for kind in QUEUE_KINDS}


def parse_queue_kinds(raw: str) -> tuple[str, ...]:
    """`training,prelabel` (any order, either alone) -> the kinds; a ValueError naming what is wrong."""
    kinds = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    unknown = [kind for kind in kinds if kind not in QUEUE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"queues {raw!r}: name one or both of {', '.join(QUEUE_KINDS)}")
    return kinds


class FeedbackQueue:
    @classmethod
    def from_settings(cls, settings) -> "FeedbackQueue":
        return cls(
            settings.redis_url,
            train_every=settings.train_every,
            job_timeout=settings.job_timeout,
            queue_name=settings.queue_name,
            retry_intervals=settings.retry_schedule,
            max_projects=settings.max_projects,
        )

    def __init__(
        self,
        redis_url: str,
        *,
        train_every: int,
        job_timeout: int,
        queue_name: str = "dataengine",
        retry_intervals: list[int] | None = None,
        max_projects: int = 1000,
    ):
        self.redis = Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self.queues = {kind: Queue(name, connection=self.redis) for kind, name in queue_names(queue_name).items()}
        self.training = self.queues[TRAINING]  # training rounds
        self.prelabel = self.queues[PRELABEL]  # pre-labelling, candidate filling, reconcile
        self.train_every = train_every
        self.job_timeout = job_timeout
        self.retry_intervals = retry_intervals if retry_intervals is not None else [10, 60, 300]
        self.max_projects = max_projects
        self._admitted: set[str] = set()  # projects this process saw admitted (no round trip for them)

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except RedisError:
            return False

    # --- events --------------------------------------------------------------------------------------
    def record(self, event: FeedbackEvent, read_keys: Sequence[str] = ()) -> Recorded:
        """Store the event and enqueue training when due. Raises QueueUnavailable if Redis is down.

        `read_keys` are read (MGET) in the same round trip, for bookkeeping that needs them (quality signal):
        a webhook costs one round trip to Redis unless it starts a training job."""
        try:
            self._admit(event.project)
            event_id, triggered, values = self._append(event, list(read_keys))
            due = event.action == "START_TRAINING" or triggered
            job_id = self.request_training(event.project, reason=event.action) if due else None
        except RedisError as exc:
            raise QueueUnavailable(f"Redis is unreachable ({exc.__class__.__name__}): event not recorded, retry later") from exc
        return Recorded(event_id=event_id, training_job=job_id, read_values=values)

    def _admit(self, project: str) -> None:
        """A 403 for a project beyond DATAENGINE_MAX_PROJECTS (each known project holds an event stream)."""
        if project in self._admitted:
            return
        if not self.redis.eval(ADMIT_PROJECT, 1, projects_key(), project, self.max_projects):
            raise RequestError(
                f"project {project} is new and {self.max_projects} projects are known already; the limit is "
                f"{self.max_projects} (DATAENGINE_MAX_PROJECTS)", 403,
            )
        self._admitted.add(project)

    def _append(self, event: FeedbackEvent, read_keys: list[str]) -> tuple[str, bool, list]:
        """(event id, training due, values of `read_keys`). No MULTI/EXEC: if the connection drops halfway, the
        event may be stored and its changes not counted, which the periodic reconcile makes up for.
        EVAL, not EVALSHA: a pipeline holding a registered script first asks Redis whether it knows it."""
        record = {k: json.dumps(v) for k, v in event.to_record().items()}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(events_key(event.project), record, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.sadd(projects_key(), event.project)
            if read_keys:
                pipe.mget(read_keys)
            if event.changes:
                pipe.eval(_COUNT_AND_TRIGGER, 1, changes_key(event.project), event.changes, self.train_every)
            event_id, _, *rest = pipe.execute()
        values = rest.pop(0) if read_keys else []
        event_id = event_id.decode() if isinstance(event_id, bytes) else str(event_id)
        return event_id, bool(rest and rest[0]), values

    def recent_events(self, project: str, limit: int = 100) -> list[dict[str, Any]]:
        with redis_needed("events not read"):
            entries = self.redis.xrevrange(events_key(project), count=limit)
        events = []
        for event_id, fields in reversed(entries):
            record = {k.decode(): _decode_field(v) for k, v in fields.items()}
            record["id"] = event_id.decode()
            events.append(record)
        return events

    def event_count(self, project: str) -> int:
        return int(self.redis.xlen(events_key(project)))

    # --- training jobs -------------------------------------------------------------------------------
    def request_training(self, project: str, reason: str) -> str:
        """Enqueue a training round, or join the one already queued/running (coalesced, never lost)."""
        with self.redis.lock(enqueue_lock_key(project), timeout=ENQUEUE_LOCK_TIMEOUT, blocking_timeout=ENQUEUE_LOCK_WAIT):
            current = self._latest_job(project)
            if current is not None:
                status = current.get_status(refresh=True)
                if status == JobStatus.STARTED:
                    self.redis.set(rerun_key(project), reason)  # the running job does one more round
                    return current.id
                if status in ACTIVE:
                    return current.id  # queued: it will read everything when it starts
            job = self.training.enqueue(
                TRAIN_FUNC,
                project,
                reason,
                job_id=train_job_id(project),
                job_timeout=self.job_timeout,
                result_ttl=JOB_RESULT_TTL,
                failure_ttl=JOB_RESULT_TTL,
                retry=Retry(max=len(self.retry_intervals), interval=self.retry_intervals) if self.retry_intervals else None,
                meta={"project": project, "reason": reason, "kind": "train"},
                description=f"training round for project {project} ({reason})",
            )
            self.redis.set(train_job_key(project), job.id)
            return job.id

    def _latest_job(self, project: str) -> Job | None:
        job_id = self.redis.get(train_job_key(project))
        if not job_id:
            return None
        try:
            return Job.fetch(job_id.decode(), connection=self.redis)
        except NoSuchJobError:
            return None

    # --- job views ------------------------------------------------------------------------------------
    def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        with redis_needed("jobs not listed"):
            return self._list_jobs(limit)

    def _list_jobs(self, limit: int) -> list[dict[str, Any]]:
        ids: list[str] = []
        for queue in self.queues.values():
            registries = [
                queue.started_job_registry,
                queue.deferred_job_registry,
                queue.scheduled_job_registry,
                queue.failed_job_registry,
                queue.finished_job_registry,
            ]
            ids.extend(queue.get_job_ids())
            for registry in registries:
                ids.extend(registry.get_job_ids())
        jobs = [job for job in Job.fetch_many(list(dict.fromkeys(ids)), connection=self.redis) if job is not None]
        jobs.sort(key=lambda j: j.enqueued_at or j.created_at, reverse=True)
        return [describe_job(job) for job in jobs[:limit]]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The job's view; None when there is no such job; a 400 when `job_id` cannot be a job id."""
        try:
            validate_job_id(job_id)
        except ValueError as exc:
            raise BadRequest(f"malformed job id {job_id[:80]!r}: {exc}") from exc
        try:
            with redis_needed("job not read"):
                return describe_job(Job.fetch(job_id, connection=self.redis))
        except NoSuchJobError:
            return None


# --- prelabel and reconcile jobs ---------------------------------------------------------------------------


def enqueue_prelabel(queue: FeedbackQueue, request: PrelabelRequest, job_timeout: int) -> str:
    """Enqueue a pre-labelling run (`POST /prelabel`, TASKS_CREATED in ranking projects, reconcile, the CLI) on the
    prelabel queue; returns the RQ job id. Raises QueueUnavailable (503) when Redis is down."""
    try:
        job = queue.prelabel.enqueue(
            PRELABEL_FUNC,
            request.project,
            request.force,
            request.limit,
            list(request.task_ids),
            job_id=prelabel_job_id(request.project),
            job_timeout=job_timeout,
            result_ttl=JOB_RESULT_TTL,
            failure_ttl=JOB_RESULT_TTL,
            meta={"project": request.project, "reason": request.reason, "kind": "prelabel"},
            description=request.describe(),
        )
    except RedisError as exc:
        raise QueueUnavailable(f"Redis is unreachable ({exc.__class__.__name__}): pre-labelling not queued, retry later") from exc
    return job.id


def prelabel_pending(queue: FeedbackQueue, project: str) -> bool:
    """A prelabel job of the project is queued or running: it may be filling those very tasks."""
    waiting = queue.prelabel.get_job_ids() + queue.prelabel.started_job_registry.get_job_ids()
    return any(is_prelabel_job_of(job_id, project) for job_id in waiting)


def schedule_reconcile(queue: FeedbackQueue, delay: int = 0) -> str:
    """Enqueue a reconcile pass `delay` seconds from now under a fresh job id, on the prelabel queue (a pass is
    short, and the candidate filling it starts must not wait for a training round). (Reusing one id made RQ store the
    running pass's result, with its 500 s TTL, over the hash of the successor it had just scheduled: the
    successor was dropped when due, after 600 s.)"""
    job_id = reconcile_job_id()
    options = dict(job_id=job_id, description="reconcile: lost webhooks, unfilled ranking tasks", meta={"kind": "reconcile"})
    if delay:
        queue.prelabel.enqueue_in(timedelta(seconds=delay), RECONCILE_FUNC, **options)
    else:
        queue.prelabel.enqueue(RECONCILE_FUNC, **options)
    return job_id


def ensure_reconcile_scheduled(queue: FeedbackQueue) -> str | None:
    """At worker start: enqueue a pass now unless one is already queued, scheduled or running (one chain,
    however many workers start); returns the new job's id, or None."""
    lock = queue.redis.lock(reconcile_schedule_lock_key(), timeout=RECONCILE_SCHEDULE_LOCK_TIMEOUT,
                            blocking_timeout=RECONCILE_SCHEDULE_LOCK_TIMEOUT)
    with lock:
        registries = (queue.prelabel.scheduled_job_registry, queue.prelabel.started_job_registry)
        pending = queue.prelabel.get_job_ids() + [i for r in registries for i in r.get_job_ids()]
        if any(is_reconcile_job(job_id) for job_id in pending):
            return None
        return schedule_reconcile(queue)


def _decode_field(raw: bytes) -> Any:
    """Event fields are JSON; events written before that format stay readable as plain text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def describe_job(job: Job) -> dict[str, Any]:
    status = job.get_status(refresh=False)
    error = None
    if status == JobStatus.FAILED:
        exc_info = job.latest_result().exc_string if job.latest_result() else (job.exc_info or "")
        error = (exc_info or "").strip().splitlines()[-1] if exc_info else "failed"
    return {
        "id": job.id,
        "function": job.func_name,
        "status": str(status.value if hasattr(status, "value") else status),
        "project": job.meta.get("project"),
        "progress": job.meta.get("progress"),
        "description": job.description,
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "retries_left": job.retries_left,
        "error": error,
    }


def _iso(value) -> str | None:
    return value.isoformat() if value else None
