"""Calibrating a closed label set's option scores when the model was never trained on the project.

A small instruction model scored on its own prefers one label for nearly every task (SmolLM2-135M called
every review "Positive"), although the gap between its option log-probabilities still ranks the tasks.
Batch calibration (Zhou et al., "Batch Calibration: Rethinking Calibration for In-Context Learning and Prompt
Engineering", ICLR 2024) removes that contextual bias by subtracting the per-option mean log-probability
over the tasks being labelled. Here the mean runs over the distinct tasks this process has scored for a
(project, version, control), this request's included, so a single interactive task also benefits from the
ones before it. Tasks count once however often they are asked for, so asking again for the same tasks
gives the same scores. The mean is shrunk towards zero by `PRIOR_WEIGHT` pseudo-tasks: with one task alone
it only damps that task's scores and never changes their order.

Trained versions are not calibrated this way: their adapter has learned the project's labels, label prior
included, and a skewed project would be pulled towards uniform.

`SharedBatchCalibration` keeps the estimate in Redis, so every HTTP worker and prelabel job of a deployment
calibrates a task the same way (one Lua script per batch: each distinct task's row is added once, atomically).
It stops adding tasks once it holds `WINDOW` of them (a bias estimated from 2,000 tasks is settled), and falls
back to its process's own estimate while Redis is unreachable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import RedisError

from .queue import RedisBackoff
from .queue import key as redis_key

log = logging.getLogger(__name__)

PRIOR_WEIGHT = 1.0  # pseudo-tasks of zero bias in the mean
WINDOW = 2000  # distinct tasks remembered per estimate (the oldest are forgotten first)
MAX_KEYS = 256  # (project, version, control) estimates kept per process
SHARED_TTL = 30 * 24 * 3600  # seconds an estimate unused for that long stays in Redis


@dataclass
class _TaskMean:
    """The mean of the distinct tasks' centered log-probabilities, kept incrementally."""

    width: int
    rows: OrderedDict = field(default_factory=OrderedDict)  # task key -> centered row
    totals: list[float] = field(default_factory=list)

    def add(self, task_key: str, row: list[float]) -> None:
        if not self.totals:
            self.totals = [0.0] * self.width
        previous = self.rows.pop(task_key, None)
        if previous is not None:
            self.totals = [t - v for t, v in zip(self.totals, previous)]
        self.rows[task_key] = row
        self.totals = [t + v for t, v in zip(self.totals, row)]
        while len(self.rows) > WINDOW:
            _, old = self.rows.popitem(last=False)
            self.totals = [t - v for t, v in zip(self.totals, old)]


def centered(logprobs: list[float]) -> list[float]:
    mean = sum(logprobs) / len(logprobs)
    return [lp - mean for lp in logprobs]


class BatchCalibration:
    """Per-process estimates of each option's contextual bias; thread-safe, bounded."""

    def __init__(self) -> None:
        self._estimates: OrderedDict[tuple, _TaskMean] = OrderedDict()
        self._lock = threading.Lock()

    def calibrate(self, key: tuple, batch: list[tuple[str, list[float]]]) -> list[list[float]]:
        """Each task's option log-probabilities (`(task_key, logprobs)`; rows of one control's options) minus
        the bias estimated from the distinct tasks seen under `key`, this batch included."""
        if not batch:
            return []
        rows = [(task_key, centered(logprobs)) for task_key, logprobs in batch]
        width = len(rows[0][1])
        with self._lock:
            estimate = self._estimates.pop(key, None)
            if estimate is None or estimate.width != width:
                estimate = _TaskMean(width)
            for task_key, row in rows:
                estimate.add(task_key, row)
            self._estimates[key] = estimate
            while len(self._estimates) > MAX_KEYS:
                self._estimates.popitem(last=False)
            totals, tasks = list(estimate.totals), len(estimate.rows)
        return _debiased([row for _, row in rows], totals, tasks)


def _debiased(rows: list[list[float]], totals: list[float], tasks: int) -> list[list[float]]:
    bias = [t / (tasks + PRIOR_WEIGHT) for t in totals]
    return [[value - b for value, b in zip(row, bias)] for row in rows]


# KEYS: the totals hash, the set of task keys counted. ARGV: width, window, ttl, then per task its key and row.
_ADD_ROWS = """
local width, window, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, width + 1 do
  if redis.call('SCARD', KEYS[2]) < window and redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    for j = 1, width do redis.call('HINCRBYFLOAT', KEYS[1], j, ARGV[i + j]) end
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local out = {redis.call('SCARD', KEYS[2])}
for j = 1, width do out[j + 1] = redis.call('HGET', KEYS[1], j) or '0' end
return out
"""


class SharedBatchCalibration:
    """`BatchCalibration` with the estimate in Redis, shared by every process of a deployment."""

    def __init__(self, redis: Redis):
        self.redis = redis
        self.local = BatchCalibration()  # while Redis is unreachable
        self._backoff = RedisBackoff()
        self._add_rows = redis.register_script(_ADD_ROWS)

    def calibrate(self, key: tuple, batch: list[tuple[str, list[float]]]) -> list[list[float]]:
        if not batch:
            return []
        rows = [centered(logprobs) for _, logprobs in batch]
        width = len(rows[0])
        digest = hashlib.sha1(json.dumps([str(part) for part in key]).encode()).hexdigest()
        args = [width, WINDOW, SHARED_TTL]
        for (task_key, _), row in zip(batch, rows):
            args += [task_key, *(repr(value) for value in row)]
        if self._backoff.active():
            return self.local.calibrate(key, batch)
        try:
            reply = self._add_rows(keys=[redis_key("calibration", digest), redis_key("calibration", digest, "tasks")], args=args)
        except RedisError as exc:
            self._backoff.failed()
            log.warning("closed-set calibration: Redis unreachable (%s); this process's own estimate for %.0f s", exc,
                        self._backoff.seconds)
            return self.local.calibrate(key, batch)
        return _debiased(rows, [float(total) for total in reply[1:]], int(reply[0]))
