"""Reranking candidates with a project's reward model, so feedback helps before RL finishes.

Loaded lazily and only when a promoted version has a reward model: `backend.reward_scoring` inference, the
same tokenization the trainer used (the answer is never cut off a long input). The final score blends the
reward model's preference among the candidates (softmax of its scores) with the vote/log-probability score.
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache

from .candidates import Candidate, sort_candidates
from .reward_scoring import RewardModel


class RewardScorer:
    """A saved reward model shared by the serving threads; higher = preferred."""

    def __init__(self, path: str):
        self.model = RewardModel.load(path)
        self._lock = threading.Lock()  # one forward pass at a time per model (threads share it)

    def score(self, texts: list[str]) -> list[float]:
        with self._lock:
            return self.model.score(texts)


@lru_cache(maxsize=8)
def load_scorer(path: str) -> RewardScorer:
    return RewardScorer(path)


def rerank(candidates: list[Candidate], texts: list[str], scorer: RewardScorer, weight: float) -> list[Candidate]:
    """Each candidate's score blended with the reward model's preference (`blend_scores`); re-sorted."""
    if len(candidates) < 2:
        return candidates
    blended = blend_scores([c.score for c in candidates], scorer.score(texts), weight)
    for candidate, score in zip(candidates, blended):
        candidate.score = score
    return sort_candidates(candidates)


def blend_scores(scores: list[float], rewards: list[float], weight: float) -> list[float]:
    """weight * softmax(rewards) + (1 - weight) * score, clipped to [0, 1]."""
    peak = max(rewards)
    exps = [math.exp(r - peak) for r in rewards]
    total = sum(exps)
    return [min(1.0, max(0.0, weight * share / total + (1 - weight) * score)) for score, share in zip(scores, exps)]
