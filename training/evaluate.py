"""Evaluation gate: score the current and the candidate version on held-out human-labelled tasks through
the same Predictor that serves /predict, and promote only if the candidate is not worse.

Metric: top-1 agreement (the first candidate equals the human result) for every config; span F1 of the
top candidate as well when the config has span labels (NER).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from backend.candidates import canonical_key
from backend.engine_client import EngineClient
from backend.label_config import CompiledConfig
from backend.predictor import PredictRequest, Predictor
from backend.registry import ServingVersion
from backend.settings import Settings

from .reward_model import heldout_unit

HELDOUT_FRACTION = 0.2


def is_heldout(task_id: Any, fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable split by task (never by pair): the same hash the reward model's own held-out split uses."""
    return heldout_unit(task_id) < fraction


@dataclass(frozen=True)
class EvalTask:
    task: dict[str, Any]
    human_result: list[dict[str, Any]]


@dataclass(frozen=True)
class Evaluation:
    version: str
    tasks: int
    top1: float
    span_f1: float | None

    @property
    def score(self) -> float:
        return self.span_f1 if self.span_f1 is not None else self.top1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}


def evaluate(
    settings: Settings, config: CompiledConfig, version: ServingVersion, tasks: list[EvalTask], instructions: str = ""
) -> Evaluation:
    if not tasks:
        return Evaluation(version=version.name, tasks=0, top1=0.0, span_f1=None)
    engine = EngineClient(_engine_url(settings), settings.model_name, settings.engine_request_timeout)
    predictor = Predictor(settings, engine)
    try:
        request = PredictRequest(
            config=config,
            tasks=[t.task for t in tasks],
            version=version,
            candidates=settings.candidates,
            temperature=settings.temperature,
            instructions=instructions,
        )
        ranked = predictor.predict(request)
    finally:
        predictor.close()
        engine.close()
    tops = [predictions[0]["result"] if predictions else [] for predictions in ranked]
    top1 = sum(canonical_key(top) == canonical_key(t.human_result) for top, t in zip(tops, tasks)) / len(tasks)
    has_spans = any(c.result_type == "labels" for c in config.controls)
    f1 = _mean([span_f1(top, t.human_result) for top, t in zip(tops, tasks)]) if has_spans else None
    return Evaluation(version=version.name, tasks=len(tasks), top1=round(top1, 4), span_f1=None if f1 is None else round(f1, 4))


def span_f1(predicted: list[dict[str, Any]], human: list[dict[str, Any]]) -> float:
    """Exact-match span F1 (start, end, label); two empty sets agree perfectly."""
    def spans(result):
        return {
            (r["value"]["start"], r["value"]["end"], tuple(r["value"].get("labels", [])))
            for r in result
            if r.get("type") == "labels"
        }

    p, h = spans(predicted), spans(human)
    if not p and not h:
        return 1.0
    hits = len(p & h)
    precision = hits / len(p) if p else 0.0
    recall = hits / len(h) if h else 0.0
    return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)


def should_promote(candidate: Evaluation, current: Evaluation, margin: float, min_tasks: int) -> tuple[bool, str]:
    if candidate.tasks < min_tasks:
        return True, f"promoted unevaluated: {candidate.tasks} held-out tasks < {min_tasks} (DATAENGINE_EVAL_MIN_TASKS)"
    if candidate.score + margin >= current.score:
        return True, f"candidate {candidate.score:.3f} >= current {current.score:.3f} - margin {margin}"
    return False, f"candidate {candidate.score:.3f} < current {current.score:.3f} - margin {margin}"


def _engine_url(settings: Settings) -> str:
    if not settings.engine_url:
        raise RuntimeError("the worker needs DATAENGINE_ENGINE_URL to evaluate versions (`dataengine serve` passes it)")
    return settings.engine_url


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
