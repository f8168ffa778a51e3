"""What labelling costs: engine tokens and engine seconds per task, per project and model version.

Counted from the engine's own answers: every chat completion vLLM returns carries `usage.prompt_tokens` and
`usage.completion_tokens` (n samples: the prompt once, the completions of all n). vLLM does not return a
request's timing in the OpenAI response (its `--enable-per-request-metrics` leaves it out for n > 1, which
sampling uses), so `engine_seconds` is the wall time of each engine call as EngineClient sees it. For
requests that run concurrently this is latency, not exclusive engine time: the engine batches them, so the
sum over tasks is more than the wall time of a run.

Where the counts live: Redis (`usage:<project>` in backend/queue.py, one hash per project, a field per (model
version, source, counter)), because they come from several processes: /predict in the HTTP workers,
`dataengine prelabel` in a CLI process or an RQ work horse. (The evaluation gate's engine work is training
cost, not labelling cost: its RankedTasks carry their usage, which is not counted here.) /metrics reads
them at scrape time (`metrics.RedisCollector`, the same totals on every replica: `max`, not `sum`) and
`dataengine report` prints them per version. Projects are admitted into a set (`usage:projects`) up to
DATAENGINE_MAX_PROJECTS; usage of projects beyond that is counted under project "other", so the series
stay bounded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

from redis import Redis
from redis.exceptions import RedisError

from .queue import ADMIT_PROJECT, RedisBackoff, usage_key, usage_projects_key

log = logging.getLogger(__name__)

OVERFLOW_PROJECT = "other"
SOURCES = ("predict", "prelabel")
COUNTERS = ("tasks", "requests", "prompt_tokens", "completion_tokens", "engine_seconds")



@dataclass
class Usage:
    """Engine work, accumulated one engine answer at a time (one task's calls run one after another)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    def add_response(self, body: dict[str, Any], seconds: float) -> None:
        """One engine answer: its `usage` field (vLLM's token counts) and how long the call took."""
        counts = body.get("usage") if isinstance(body, dict) else None
        counts = counts if isinstance(counts, dict) else {}
        self.requests += 1
        self.prompt_tokens += int(counts.get("prompt_tokens") or 0)
        self.completion_tokens += int(counts.get("completion_tokens") or 0)
        self.engine_seconds += seconds

    def add(self, other: "Usage") -> None:
        for f in fields(Usage):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Usage)))

    @staticmethod
    def total(items: Iterable["Usage"]) -> "Usage":
        return sum(items, Usage())

    def summary(self, tasks: int, wall_seconds: float | None = None) -> dict[str, Any]:
        """The counts and what 1,000 tasks cost at this rate (engine seconds: summed request latencies)."""
        out: dict[str, Any] = {**asdict(self), "engine_seconds": round(self.engine_seconds, 3), "tasks": tasks}
        out["per_1000_tasks"] = per_1000_tasks(tasks, self.prompt_tokens, self.completion_tokens, self.engine_seconds,
                                               wall_seconds)
        return out


def per_1000_tasks(tasks: int, prompt_tokens: float, completion_tokens: float, engine_seconds: float,
                   wall_seconds: float | None = None) -> dict[str, float] | None:
    if tasks <= 0:
        return None
    scale = 1000.0 / tasks
    out = {
        "prompt_tokens": round(prompt_tokens * scale, 1),
        "completion_tokens": round(completion_tokens * scale, 1),
        "engine_seconds": round(engine_seconds * scale, 2),
    }
    if wall_seconds is not None:
        out["wall_seconds"] = round(wall_seconds * scale, 2)  # at the run's measured tasks/s
    return out


@dataclass(frozen=True)
class UsageRow:
    """One (project, model version, source) total as stored."""

    project: str
    model_version: str
    source: str
    tasks: float = 0.0
    requests: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    engine_seconds: float = 0.0


class UsageStore:
    """The Redis-held totals. `record` never raises: cost accounting must not fail a /predict or a prelabel
    run (a Redis error is logged, and recording pauses for a while: RedisBackoff)."""

    def __init__(self, redis: Redis, max_projects: int):
        self.redis = redis
        self.max_projects = max_projects
        self._admitted: set[str] = set()
        self._backoff = RedisBackoff()

    def record(self, project: str, model_version: str, source: str, usage: Usage, tasks: int) -> bool:
        if source not in SOURCES:
            raise ValueError(f"unknown usage source {source!r}; expected one of {SOURCES}")
        if (usage.requests == 0 and tasks == 0) or self._backoff.active():
            return False
        try:
            name = usage_key(self._admit(project))
            values = {"tasks": tasks, **asdict(usage)}
            with self.redis.pipeline(transaction=True) as pipe:  # a scrape never sees half an update
                for counter, value in values.items():
                    field = json.dumps([model_version, source, counter])
                    if isinstance(value, float):
                        pipe.hincrbyfloat(name, field, value)
                    else:
                        pipe.hincrby(name, field, value)
                pipe.execute()
        except RedisError as exc:
            self._backoff.failed()
            log.warning("engine usage not recorded for project %s (%s); retrying in %.0f s", project, exc, self._backoff.seconds)
            return False
        return True

    def _admit(self, project: str) -> str:
        if project in self._admitted:
            return project
        if not self.redis.eval(ADMIT_PROJECT, 1, usage_projects_key(), project, self.max_projects):
            return OVERFLOW_PROJECT
        self._admitted.add(project)
        return project


def usage_rows(redis: Redis, projects: Iterable[str] | None = None) -> list[UsageRow]:
    """Every stored total (of `projects`, default all); raises RedisError when Redis is down."""
    if projects is None:
        projects = [*sorted(p.decode() for p in redis.smembers(usage_projects_key())), OVERFLOW_PROJECT]
    names = list(projects)
    with redis.pipeline(transaction=False) as pipe:
        for project in names:
            pipe.hgetall(usage_key(project))
        stored = pipe.execute()
    rows: list[UsageRow] = []
    for project, raw in zip(names, stored):
        totals: dict[tuple[str, str], dict[str, float]] = {}
        for field, value in raw.items():
            version, source, counter = json.loads(field)
            if counter in COUNTERS:
                totals.setdefault((version, source), {})[counter] = float(value)
        rows += [UsageRow(project, version, source, **counts) for (version, source), counts in sorted(totals.items())]
    return rows


def by_version(rows: Iterable[UsageRow]) -> dict[str, dict[str, Any]]:
    """Per model version (all sources together, and per source): totals and the cost of 1,000 tasks."""
    versions: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = versions.setdefault(row.model_version, {"sources": {}})
        entry["sources"][row.source] = _costs(row.tasks, row.requests, row.prompt_tokens, row.completion_tokens, row.engine_seconds)
    for entry in versions.values():
        sources = entry["sources"].values()
        entry.update(_costs(*(sum(s[c] for s in sources) for c in COUNTERS)))
    return versions


def _costs(tasks: float, requests: float, prompt_tokens: float, completion_tokens: float, engine_seconds: float) -> dict[str, Any]:
    return {
        "tasks": int(tasks), "requests": int(requests), "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens), "engine_seconds": round(engine_seconds, 3),
        "per_1000_tasks": per_1000_tasks(int(tasks), prompt_tokens, completion_tokens, engine_seconds),
    }
