"""Reranking candidates with a project's reward model, so feedback helps before RL finishes.

Loaded lazily and only when a promoted version has a reward model: `backend.reward_scoring` inference, the
same tokenization the trainer used (the answer is never cut off a long input). The final score blends the
reward model's preference among the candidates (softmax of its scores) with the vote/log-probability score.
"""
from __future__ import annotations

import math
import threading

from .reward_scoring import RewardModel


class RewardScorer:
    """A saved reward model shared by the serving threads; higher = preferred."""

    def __init__(self, path: str):
        self.model = RewardModel.load(path)
        self._lock = threading.Lock()  # one forward pass at a time per model (threads share it)

    def score(self, texts: list[str]) -> list[float]:
        with self._lock:
            return self.model.score(texts)


_loaded: dict[str, RewardScorer] = {}
_load_lock = threading.Lock()
MAX_LOADED = 8


def load_scorer(path: str) -> RewardScorer:
    """The reward model at `path`, loaded once per process. Concurrent first requests wait for the one load
    (under a lock) instead of racing it: transformers' lazy imports fail when many threads trigger them at
    once (`cannot import name 'AutoTokenizer'`), which made a whole batch answer 500 right after a promotion."""
    scorer = _loaded.get(path)
    if scorer is not None:
        return scorer
    with _load_lock:
        scorer = _loaded.get(path)
        if scorer is None:
            scorer = RewardScorer(path)
            while len(_loaded) >= MAX_LOADED:
                _loaded.pop(next(iter(_loaded)))
            _loaded[path] = scorer
        return scorer


def blend_scores(scores: list[float], rewards: list[float], weight: float) -> list[float]:
    """weight * softmax(rewards) + (1 - weight) * score, clipped to [0, 1]."""
    peak = max(rewards)
    exps = [math.exp(r - peak) for r in rewards]
    total = sum(exps)
    return [min(1.0, max(0.0, weight * share / total + (1 - weight) * score)) for score, share in zip(scores, exps)]
