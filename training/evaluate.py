"""Evaluation gate: score the current and the candidate version on held-out human-labelled tasks through
the same Predictor that serves /predict, and promote only if the candidate is not worse.

Metric: top-1 agreement (the first candidate equals the human result) for every config; span F1 of the
top candidate as well when the config has span labels (NER). Ranking projects (<Ranker>/<Pairwise>), whose
annotators order candidates rather than write an answer, are scored by pair accuracy instead: the share of
held-out human preference pairs whose preferred candidate the version's reward model scores higher
(`evaluate_pairs`); a version without a reward model keeps the order it generated, which knows nothing of
these pairs: chance, 0.5.
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

from .preferences import PreferencePair
from .reward_model import default_render, heldout_unit, pairwise_accuracy

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
    top1: float | None
    span_f1: float | None
    pair_accuracy: float | None = None  # ranking projects

    @property
    def metric(self) -> str:
        return next(name for name in ("pair_accuracy", "span_f1", "top1") if getattr(self, name) is not None)

    @property
    def score(self) -> float:
        return getattr(self, self.metric)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metric": self.metric, "score": self.score}


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


def evaluate_pairs(version: ServingVersion, pairs: list[PreferencePair]) -> Evaluation:
    """Ranking projects: pair accuracy of the version's reward model on held-out pairs, measured as the
    reward model's own held-out metric is (same texts, same accuracy)."""
    tasks = len({pair.task_id for pair in pairs})
    if not pairs or not version.reward_model_path:
        return Evaluation(version=version.name, tasks=tasks, top1=None, span_f1=None, pair_accuracy=0.5)
    from backend.reward_scoring import RewardModel

    model = RewardModel.load(version.reward_model_path)
    chosen_texts, rejected_texts = zip(*(default_render(pair) for pair in pairs))
    agreed = pairwise_accuracy(model.score(chosen_texts), model.score(rejected_texts))
    return Evaluation(version=version.name, tasks=tasks, top1=None, span_f1=None, pair_accuracy=round(agreed, 4))


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
