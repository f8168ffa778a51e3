"""Candidates for ranking projects (`<Ranker>`/`<Pairwise>` configs, read by backend/ranking.py): one task's N
candidates generated through the Predictor (the same engine path as /predict), reordered by the project's reward
model once it has one, and written as the task's new data plus the model's Ranker order or Pairwise pick as a
prediction. `training/prelabel.py` runs it over whole projects.

Item ids are a hash of the candidate's text (stable across refills); items are stored in id order, so
the list's display order does not give away the model's ranking.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import InvalidTaskData
from .label_config import CompiledConfig
from .predictor import PredictRequest, Predictor, TaskFailure
from .prompts import reward_text
from .ranking import PairwiseSpec, RankerSpec, RankingConfig, comparison_prompt
from .registry import ServingVersion
from .usage import Usage


@dataclass(frozen=True)
class Item:
    id: str
    body: str
    score: float

    def as_data(self, title: str) -> dict[str, str]:
        return {"id": self.id, "title": title, "body": self.body}


@dataclass(frozen=True)
class FilledTask:
    """One task's candidates: its new data (the old fields kept) and the model's ranking as a prediction."""

    task_id: Any
    data: dict[str, Any]
    prediction: dict[str, Any]  # {"result", "score", "model_version"}
    items: tuple[Item, ...]  # the model's order, best first
    usage: Usage = field(default_factory=Usage)  # the engine work it took


# --- candidates -------------------------------------------------------------------------------------


def item_id(body: str) -> str:
    return "c" + hashlib.sha1(body.encode("utf-8")).hexdigest()[:10]


def render(config: CompiledConfig, result: list[dict[str, Any]], texts: dict[str, str]) -> str:
    """A candidate annotation as an annotator reads it: one line per control."""
    answer = config.answer_from_results(result, texts)
    lines = []
    for control in config.controls:
        value = answer.get(control.name)
        lines.append(f"{control.name}: {_readable(value)}")
    return "\n".join(lines)


def _readable(value: Any) -> str:
    if value is None or value == []:
        return "(none)"
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):  # NER entities
        return "; ".join(f"{v.get('label')}: {v.get('text')}" for v in value)
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def response_text(result: list[dict[str, Any]]) -> str:
    texts = [t for region in result for t in (region.get("value") or {}).get("text", [])]
    return "\n".join(texts)


def most_different_pair(items: list[Item]) -> tuple[Item, Item]:
    """The two candidates whose texts differ most (lowest difflib similarity); ties go to higher scores."""
    if len(items) < 2:
        raise InvalidTaskData(f"pairwise needs two different candidates, the model gave {len(items)}")
    best = None
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            a, b = items[i], items[j]
            similarity = difflib.SequenceMatcher(None, a.body, b.body, autojunk=False).ratio()
            key = (similarity, -(a.score + b.score), i, j)
            if best is None or key < best[0]:
                best = (key, a, b)
    return best[1], best[2]


def ranker_result(spec: RankerSpec, ordered_ids: list[str]) -> dict[str, Any]:
    """Plain ranking: `{<ranker name>: ids}`; bucket mode: the order split evenly over the buckets, best first."""
    if not spec.buckets:
        ranking = {spec.name: list(ordered_ids)}
    else:
        ranking = {bucket: [] for bucket in spec.buckets}
        count = len(ordered_ids)
        for rank, identifier in enumerate(ordered_ids):
            ranking[spec.buckets[min(len(spec.buckets) - 1, rank * len(spec.buckets) // count)]].append(identifier)
    return {"from_name": spec.name, "to_name": spec.items.name, "type": "ranker", "value": {"ranker": ranking}}


def pairwise_result(spec: PairwiseSpec, left: Item, right: Item) -> dict[str, Any]:
    selected = "left" if left.score >= right.score else "right"
    return {"from_name": spec.name, "to_name": spec.left.name, "type": "pairwise", "value": {"selected": selected}}


# A sampled answer can be cut off by the token limit or come out empty and is dropped; sampling again (up to this
# many requests) tops the task up to the candidates the annotators were promised.
SAMPLING_ROUNDS = 3


class CandidateFiller:
    """Generates one task's candidates through the Predictor (same engine path as /predict). Once the project
    has a reward model (trained on its annotators' rankings), it reorders the candidates: the model reads each
    candidate's body after the prompt, as it did in training."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def fill(
        self,
        config: RankingConfig,
        task: dict[str, Any],
        *,
        version: ServingVersion,
        candidates: int,
        temperature: float,
        instructions: str = "",
    ) -> FilledTask | TaskFailure:
        request = PredictRequest(
            # the predictor would rerank answers in /predict's reward text; the items are reranked below instead
            config=config.answer, tasks=[task], version=replace(version, reward_model_path=None), candidates=candidates,
            temperature=temperature, instructions=instructions,
        )
        usage = Usage()
        try:
            items = self._sampled_items(config, task, request, usage)
            if isinstance(items, TaskFailure):
                return replace(items, usage=usage)
            if version.reward_model_path and len(items) > 1:
                weight = version.rm_weight if version.rm_weight is not None else self.predictor.settings.rm_weight
                items = self._rerank(config, task, items, version.reward_model_path, weight)
            return replace(build_filled_task(config, task, items, version.name), usage=usage)
        except InvalidTaskData as exc:
            return TaskFailure(0, task.get("id"), exc, usage)

    def _sampled_items(
        self, config: RankingConfig, task: dict[str, Any], request: PredictRequest, usage: Usage
    ) -> list[Item] | TaskFailure:
        """Up to `request.candidates` distinct items, best first, sampling again while some are missing."""
        texts = config.answer.read_task(task, self.predictor.settings.max_text_chars)
        items: dict[str, Item] = {}
        closed_set = request.config.enumerable_control(self.predictor.settings.enumerate_max) is not None
        for _ in range(1 if closed_set else SAMPLING_ROUNDS):  # a closed label set is scored whole, not sampled
            outcome = self.predictor.predict_each(request)
            usage.add(outcome.usage)
            if outcome.failures:
                return outcome.failures[0]
            for item in self._items(config, texts, outcome.predictions[0]):
                items.setdefault(item.id, item)
            if len(items) >= request.candidates:
                break
        if not items:
            raise InvalidTaskData(f"task {task.get('id')}: the model produced no usable candidate")
        return sorted(items.values(), key=lambda item: -item.score)[: request.candidates]

    def _items(self, config: RankingConfig, texts: dict[str, str], predictions: list[dict[str, Any]]) -> list[Item]:
        items = []
        for prediction in predictions:  # best first
            body = render(config.answer, prediction["result"], texts) if config.label_candidates else response_text(prediction["result"])
            if body.strip():
                items.append(Item(item_id(body), body, float(prediction["score"])))
        return items

    def _rerank(self, config: RankingConfig, task: dict[str, Any], items: list[Item], reward_model_path: str,
                weight: float) -> list[Item]:
        from .reranker import blend_scores, load_scorer

        messages = comparison_prompt(config.prompt_objects, task)
        rewards = load_scorer(reward_model_path).score([reward_text(messages, item.body) for item in items])
        scores = blend_scores([item.score for item in items], rewards, weight)
        return sorted((replace(item, score=score) for item, score in zip(items, scores)), key=lambda item: -item.score)


def build_filled_task(config: RankingConfig, task: dict[str, Any], items: list[Item], model_version: str) -> FilledTask:
    """The task's new data and prediction from its candidates, best first."""
    data = dict(task.get("data") or {})
    results = []
    chosen = items
    if config.pairwise is not None:
        a, b = sorted(most_different_pair(items), key=lambda item: item.id)
        data[config.pairwise.left.data_key], data[config.pairwise.right.data_key] = a.body, b.body
        results.append(pairwise_result(config.pairwise, a, b))
        if config.ranker is None:
            chosen = sorted((a, b), key=lambda item: -item.score)
    stored = sorted(chosen, key=lambda item: item.id)  # display order: blind to the model's ranking
    data[config.candidates_key] = [item.as_data(f"Answer {i + 1}") for i, item in enumerate(stored)]
    if config.ranker is not None:
        results.insert(0, ranker_result(config.ranker, [item.id for item in chosen]))
    prediction = {"result": results, "score": round(chosen[0].score, 6), "model_version": model_version}
    return FilledTask(task.get("id"), data, prediction, tuple(chosen))
