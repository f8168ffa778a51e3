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
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

PRIOR_WEIGHT = 1.0  # pseudo-tasks of zero bias in the mean
WINDOW = 2000  # distinct tasks remembered per estimate (the oldest are forgotten first)
MAX_KEYS = 256  # (project, version, control) estimates kept per process


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

    def bias(self) -> list[float]:
        return [t / (len(self.rows) + PRIOR_WEIGHT) for t in self.totals]


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
            bias = estimate.bias()
        return [[value - b for value, b in zip(row, bias)] for _, row in rows]
