"""Reranking candidates with a project's reward model, so feedback helps before RL finishes.

Loaded lazily and only when a promoted version has a reward model: torch/transformers inference only
(no training libraries). The final score blends the reward model's preference among the candidates
(softmax of its scores) with the vote/log-probability score.
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache

from .candidates import Candidate, sort_candidates


class RewardScorer:
    """A sequence-classification model with one output; higher = preferred."""

    def __init__(self, path: str, max_length: int = 256):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.max_length = max_length
        self._lock = threading.Lock()  # one forward pass at a time per model (threads share it)

    def score(self, texts: list[str]) -> list[float]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with self._lock, self._torch.no_grad():
            logits = self.model(**batch).logits
        return [float(x) for x in logits[:, 0]]


@lru_cache(maxsize=8)
def load_scorer(path: str) -> RewardScorer:
    return RewardScorer(path)


def rerank(candidates: list[Candidate], texts: list[str], scorer: RewardScorer, weight: float) -> list[Candidate]:
    """Blend: weight * softmax(reward scores) + (1 - weight) * current score; re-sorted."""
    if len(candidates) < 2:
        return candidates
    rewards = scorer.score(texts)
    peak = max(rewards)
    exps = [math.exp(r - peak) for r in rewards]
    total = sum(exps)
    for candidate, share in zip(candidates, exps):
        candidate.score = min(1.0, max(0.0, weight * share / total + (1 - weight) * candidate.score))
    return sort_candidates(candidates)
