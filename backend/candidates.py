"""Turning engine output into ranked candidates: drop invalid, merge identical (votes), score, sort."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from .engine_client import Sample
from .label_config import InvalidAnswer

# Sampled candidates: score = VOTE_WEIGHT * vote share + (1 - VOTE_WEIGHT) * geometric-mean token probability.
VOTE_WEIGHT = 0.5


@dataclass
class Candidate:
    result: list[dict[str, Any]]
    score: float
    votes: int = 1
    mean_logprob: float | None = None

    @property
    def key(self) -> str:
        return canonical_key(self.result)


@dataclass(frozen=True)
class SampleOutcome:
    """What became of one engine request's samples; feeds the metrics."""

    candidates: list[Candidate]
    invalid: int


REGION_CONTENT = ("from_name", "to_name", "type", "value")


def canonical_key(result: Any) -> str:
    """Identity of a result: region content only; region ids, order and UI fields (`origin`, scores) ignored."""
    regions = [{k: r.get(k) for k in REGION_CONTENT} for r in result if isinstance(r, dict)] if isinstance(result, list) else []
    return json.dumps(sorted(json.dumps(r, sort_keys=True, default=str) for r in regions))


def rank_samples(samples: list[Sample], parse: Callable[[str], list[dict[str, Any]]]) -> SampleOutcome:
    """Parse each sample; invalid ones (unparsable, truncated, outside the config) are dropped."""
    merged: dict[str, Candidate] = {}
    invalid = 0
    for sample in samples:
        if sample.finish_reason == "length":
            invalid += 1  # cut off mid-answer: never show a truncated label
            continue
        try:
            result = parse(sample.text)
        except InvalidAnswer:
            invalid += 1
            continue
        key = canonical_key(result)
        if key in merged:
            existing = merged[key]
            existing.votes += 1
            existing.mean_logprob = max(existing.mean_logprob, sample.mean_logprob)
        else:
            merged[key] = Candidate(result=result, score=0.0, votes=1, mean_logprob=sample.mean_logprob)
    total = max(len(samples), 1)
    for candidate in merged.values():
        confidence = math.exp(candidate.mean_logprob) if math.isfinite(candidate.mean_logprob) else 0.0
        candidate.score = _clip(VOTE_WEIGHT * candidate.votes / total + (1 - VOTE_WEIGHT) * confidence)
    return SampleOutcome(candidates=sort_candidates(list(merged.values())), invalid=invalid)


def rank_options(results: list[list[dict[str, Any]]], logprobs: list[float], temperature: float = 1.0) -> list[Candidate]:
    """Exhaustively scored closed set: score = softmax of the total log-probabilities over `temperature` (sums
    to 1); each candidate keeps its own log-probability."""
    peak = max(logprobs)
    weights = [math.exp((lp - peak) / temperature) for lp in logprobs]
    total = sum(weights)
    candidates = [
        Candidate(result=result, score=_clip(w / total), votes=0, mean_logprob=lp)
        for result, w, lp in zip(results, weights, logprobs)
    ]
    return sort_candidates(candidates)


def sort_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Best first; ties broken by log-probability, then content, so the order is deterministic."""
    return sorted(candidates, key=lambda c: (-c.score, -(c.mean_logprob or -math.inf), c.key))


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))
