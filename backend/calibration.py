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

    def calibrate(self, key: tuple, batch: list[tuple[str, list[float]]], prior: list[float] | None = None) -> list[list[float]]:
        """Each task's option log-probabilities (`(task_key, logprobs)`; rows of one control's options) minus
        the bias estimated from the distinct tasks seen under `key`, this batch included: their mean, or with a
        label `prior` (probabilities per option) the bias that matches it (`prior_matched_bias`)."""
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
            seen = list(estimate.rows.values()) if prior else []
        if prior:
            return _shifted([row for _, row in rows], prior_matched_bias(seen, prior))
        return _debiased([row for _, row in rows], totals, tasks)


def _debiased(rows: list[list[float]], totals: list[float], tasks: int) -> list[list[float]]:
    return _shifted(rows, [t / (tasks + PRIOR_WEIGHT) for t in totals])


def _shifted(rows: list[list[float]], bias: list[float]) -> list[list[float]]:
    return [[value - b for value, b in zip(row, bias)] for row in rows]


SHARPNESS = 0.1  # prior matching fits on the rows scaled to 10x their spread: shares of the top option, not of mass
MATCH_MIN_TASKS = 20


def prior_matched_bias(rows: list[list[float]], prior: list[float], iterations: int = 300) -> list[float]:
    """The bias b for which each option is the top one, argmax(row - b), for its `prior` share of the tasks:
    label-shift adaptation with the label prior known (the fixed point of Saerens et al., 2002, with the prior
    given, on rows sharpened by SHARPNESS so that it matches top-option shares rather than probability mass).
    Unlike adding log(prior) to the mean-calibrated scores, this holds however small the model's margins are: a
    weak model's options split the tasks in the prior's shares, ranked by its margins, instead of the prior
    deciding every task (measured: README "Closed label sets")."""
    import numpy as np

    if not rows:
        return [0.0] * len(prior)
    scores = np.asarray(rows, dtype=float)
    spread = float(scores.std(axis=0).mean())
    # shares of a handful of tasks mean little: below MATCH_MIN_TASKS the probability mass is matched instead
    scale = spread * SHARPNESS if spread > 0 and len(rows) >= MATCH_MIN_TASKS else 1.0
    sharpened = scores / scale
    target = np.asarray(prior, dtype=float)
    bias = np.zeros(scores.shape[1])
    for _ in range(iterations):
        shifted = sharpened - bias
        weights = np.exp(shifted - shifted.max(axis=1, keepdims=True))
        share = np.maximum((weights / weights.sum(axis=1, keepdims=True)).mean(axis=0), 1e-12)
        step = np.clip(np.log(share / target), -5.0, 5.0)
        bias += step
        if np.abs(step).max() < 1e-4:
            break
    return ((bias - bias.mean()) * scale).tolist()


# KEYS: the per-option sums, task key -> its row (each task counted once: HSETNX). ARGV: width, window, ttl,
# then per task its key and row.
_ADD_ROWS = """
local width, window, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, width + 1 do
  if redis.call('HLEN', KEYS[2]) < window then
    local row = {}
    for j = 1, width do row[j] = ARGV[i + j] end
    if redis.call('HSETNX', KEYS[2], ARGV[i], table.concat(row, ',')) == 1 then
      for j = 1, width do redis.call('HINCRBYFLOAT', KEYS[1], j, ARGV[i + j]) end
    end
  end
end
for _, name in ipairs(KEYS) do redis.call('EXPIRE', name, ttl) end
local out = {redis.call('HLEN', KEYS[2])}
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
        self._matched: OrderedDict[tuple, list[float]] = OrderedDict()  # (estimate, its size, prior) -> bias
        self._lock = threading.Lock()

    def calibrate(self, key: tuple, batch: list[tuple[str, list[float]]], prior: list[float] | None = None) -> list[list[float]]:
        if not batch:
            return []
        rows = [centered(logprobs) for _, logprobs in batch]
        width = len(rows[0])
        digest = hashlib.sha1(json.dumps([str(part) for part in key]).encode()).hexdigest()
        args = [width, WINDOW, SHARED_TTL]
        for (task_key, _), row in zip(batch, rows):
            args += [task_key, *(repr(value) for value in row)]
        names = [redis_key("calibration", digest, part) for part in ("sums", "rows")]
        if self._backoff.active():
            return self.local.calibrate(key, batch, prior)
        try:
            reply = self._add_rows(keys=names, args=args)
            if prior:
                return _shifted(rows, self._prior_matched(names[1], (digest, int(reply[0]), tuple(prior)), prior))
        except RedisError as exc:
            self._backoff.failed()
            log.warning("closed-set calibration: Redis unreachable (%s); this process's own estimate for %.0f s", exc,
                        self._backoff.seconds)
            return self.local.calibrate(key, batch, prior)
        return _debiased(rows, [float(total) for total in reply[1:]], int(reply[0]))

    def _prior_matched(self, rows_key: str, cache_key: tuple, prior: list[float]) -> list[float]:
        """The bias matching `prior` on every row the shared estimate holds; fitted again only when the estimate
        or the prior changed, so every process computes the same bias from the same rows."""
        with self._lock:
            cached = self._matched.get(cache_key)
        if cached is not None:
            return cached
        seen = [[float(value) for value in raw.split(b",")] for raw in self.redis.hvals(rows_key)]
        bias = prior_matched_bias(seen, prior)
        with self._lock:
            self._matched[cache_key] = bias
            while len(self._matched) > MAX_KEYS:
                self._matched.popitem(last=False)
        return bias
