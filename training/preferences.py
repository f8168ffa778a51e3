"""Label Studio export -> preference pairs and SFT examples (pure data, no I/O).

Two kinds of project:
  * answer projects (Choices, Labels, Rating, Number, TextArea — what `backend.label_config` compiles):
    the human's final result beats every prediction it differs from ("annotation>prediction"), and the
    candidate the annotator started from (`parent_prediction`) beats the other candidates
    ("picked>unpicked"). Texts are the canonical JSON answer, the same shape the policy generates.
  * comparison projects (`<List>` + `<Ranker>`, or `<Pairwise>`): pairs are read from the ranking or the
    pick itself; texts are the candidates' own text and the prompt is the task's prompt field.

With several annotators per task the consensus (most common result) stands for the task, weighted by how
many agree; annotators who rarely agree with consensus are left out first.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from backend.candidates import REGION_CONTENT, canonical_key
from backend.errors import InvalidTaskData, UnsupportedLabelConfig
from backend.label_config import CompiledConfig, compile_label_config, html_to_text
from backend.prompts import build_messages
from backend.ranking import (
    COMPARISON_TAGS, UNPLACED_BUCKET, DataObject, PairwiseSpec, RankerSpec, comparison_prompt, parse_comparison_tags,
)

SOURCE_ANNOTATION = "annotation>prediction"
SOURCE_PICKED = "picked>unpicked"
SOURCE_RANKER = "ranker"
SOURCE_BUCKETS = "ranker-buckets"
SOURCE_PAIRWISE = "pairwise"

PICKED_MARGIN = 0.5
COUNT_KEYS = (
    "tasks", "annotations", "cancelled", "empty", "excluded_annotations", "invalid_tasks",
    "ties", "dropped_low_agreement", "pairs", "sft",
)


# --- domain objects --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    task_id: Any
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    chosen_result: list[dict[str, Any]]
    rejected_result: list[dict[str, Any]]
    margin: float
    weight: float
    source: str


@dataclass(frozen=True)
class SftExample:
    task_id: Any
    prompt: list[dict[str, str]]
    completion: str
    result: list[dict[str, Any]]
    weight: float


@dataclass
class AgreementStats:
    per_task: dict[Any, float] = field(default_factory=dict)
    per_annotator: dict[Any, float] = field(default_factory=dict)
    excluded_annotators: list[Any] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": len(self.per_task),
            "mean_task_agreement": _mean(self.per_task.values()),
            "annotators": len(self.per_annotator),
            "mean_annotator_agreement": _mean(self.per_annotator.values()),
            "excluded_annotators": list(self.excluded_annotators),
        }


@dataclass
class DerivedData:
    pairs: list[PreferencePair]
    sft: list[SftExample]
    stats: AgreementStats
    counts: dict[str, Any]


@dataclass(frozen=True)
class HumanAnnotation:
    id: Any
    annotator: Any
    result: list[dict[str, Any]]
    key: str
    parent_prediction: Any
    updated_at: str


@dataclass(frozen=True)
class KeyedResult:
    """A result with its identity (`key`); `id` is the prediction's id, None for a human result."""

    id: Any
    result: list[dict[str, Any]]
    key: str


@dataclass(frozen=True)
class TaskRecord:
    id: Any
    task: dict[str, Any]
    annotations: tuple[HumanAnnotation, ...]  # oldest first, one per annotator
    predictions: tuple[KeyedResult, ...]


@dataclass(frozen=True)
class Verdict:
    """What the humans settled on for one task."""

    result: list[dict[str, Any]]
    weight: float
    parent_prediction: Any  # the candidate they started from, when they agree on one


@dataclass(frozen=True)
class Consensus:
    key: str | None  # None: a tie, no consensus
    agreeing: tuple[HumanAnnotation, ...]
    agreement: float


# --- entry point -----------------------------------------------------------------------------------


def derive(
    tasks: Iterable[dict[str, Any]],
    label_config_xml: str,
    instructions: str = "",
    *,
    min_annotator_agreement: float = 0.5,
    min_task_agreement: float = 0.5,
) -> DerivedData:
    project = load_project(label_config_xml, instructions)
    counts: Counter = Counter()
    tasks = sorted(tasks, key=_id_order)  # the output (and a snapshot's hash) must not depend on export order
    counts["tasks"] = len(tasks)
    records = [read_task(task, project, counts) for task in tasks]
    stats = AgreementStats(per_annotator=annotator_agreement(records))
    stats.excluded_annotators = sorted(
        (a for a, score in stats.per_annotator.items() if score < min_annotator_agreement), key=str
    )
    pairs: list[PreferencePair] = []
    sft: list[SftExample] = []
    for record in records:
        verdict = decide(record, stats, min_task_agreement, counts)
        if verdict is None:
            continue
        try:
            pairs.extend(project.pairs(record, verdict))
            example = project.sft(record, verdict)
        except InvalidTaskData:
            counts["invalid_tasks"] += 1
            continue
        if example is not None:
            sft.append(example)
    counts["pairs"], counts["sft"] = len(pairs), len(sft)
    return DerivedData(pairs=pairs, sft=sft, stats=stats, counts=_finish_counts(counts, pairs))


def _finish_counts(counts: Counter, pairs: list[PreferencePair]) -> dict[str, Any]:
    finished: dict[str, Any] = {key: counts.get(key, 0) for key in COUNT_KEYS}
    finished["pairs_by_source"] = dict(sorted(Counter(p.source for p in pairs).items()))
    return finished


# --- reading the export ----------------------------------------------------------------------------


def read_task(task: dict[str, Any], project: "Project", counts: Counter) -> TaskRecord:
    raw = task.get("annotations") or []
    counts["annotations"] += len(raw)
    annotations = []
    for annotation in raw:
        if annotation.get("was_cancelled"):
            counts["cancelled"] += 1
        elif not annotation.get("result"):
            counts["empty"] += 1
        else:
            annotations.append(_human_annotation(annotation, project))
    predictions = tuple(
        KeyedResult(id=p.get("id"), result=p["result"], key=project.identity(p["result"]))
        for p in task.get("predictions") or []
        if isinstance(p, dict) and p.get("result")  # an empty prediction is no candidate to compare
    )
    return TaskRecord(task.get("id"), task, _latest_per_annotator(annotations), predictions)


def _human_annotation(annotation: dict[str, Any], project: "Project") -> HumanAnnotation:
    return HumanAnnotation(
        id=annotation.get("id"),
        annotator=annotator_id(annotation.get("completed_by")),
        result=annotation["result"],
        key=project.identity(annotation["result"]),
        parent_prediction=annotation.get("parent_prediction"),
        updated_at=str(annotation.get("updated_at") or annotation.get("created_at") or ""),
    )


def annotator_id(completed_by: Any) -> Any:
    """`completed_by` is an id in exports and a user object in some API payloads."""
    return completed_by.get("id") if isinstance(completed_by, dict) else completed_by


def _latest_per_annotator(annotations: list[HumanAnnotation]) -> tuple[HumanAnnotation, ...]:
    """One vote per person: an annotator who re-submitted counts with their latest result."""
    ordered = sorted(annotations, key=lambda a: a.updated_at)
    latest = {(a.annotator if a.annotator is not None else ("annotation", a.id)): a for a in ordered}
    return tuple(sorted(latest.values(), key=lambda a: a.updated_at))


# --- agreement ------------------------------------------------------------------------------------


def find_consensus(annotations: tuple[HumanAnnotation, ...] | list[HumanAnnotation]) -> Consensus:
    votes = Counter(a.key for a in annotations).most_common()
    top_key, top = votes[0]
    if len(votes) > 1 and votes[1][1] == top:
        return Consensus(key=None, agreeing=(), agreement=0.0)
    agreeing = tuple(a for a in annotations if a.key == top_key)
    return Consensus(key=top_key, agreeing=agreeing, agreement=top / len(annotations))


def annotator_agreement(records: list[TaskRecord]) -> dict[Any, float]:
    """Per annotator: share of their multi-annotated tasks where they match consensus (ties don't count:
    with no consensus there is nothing to agree with)."""
    matches: dict[Any, list[bool]] = defaultdict(list)
    for record in records:
        if len(record.annotations) < 2:
            continue
        consensus = find_consensus(record.annotations)
        if consensus.key is None:
            continue
        for annotation in record.annotations:
            if annotation.annotator is not None:
                matches[annotation.annotator].append(annotation.key == consensus.key)
    return {annotator: sum(hits) / len(hits) for annotator, hits in matches.items()}


def decide(record: TaskRecord, stats: AgreementStats, min_task_agreement: float, counts: Counter) -> Verdict | None:
    """The task's accepted result and its weight, or None when the task yields nothing."""
    excluded = set(stats.excluded_annotators)
    kept = [a for a in record.annotations if a.annotator not in excluded]
    counts["excluded_annotations"] += len(record.annotations) - len(kept)
    if not kept:
        if record.annotations:
            counts["dropped_low_agreement"] += 1
        return None
    if len(kept) == 1:
        only = kept[0]
        return Verdict(only.result, stats.per_annotator.get(only.annotator, 1.0), only.parent_prediction)
    consensus = find_consensus(kept)
    if consensus.key is None:
        counts["ties"] += 1
        return None
    stats.per_task[record.id] = consensus.agreement
    if consensus.agreement < min_task_agreement:
        counts["dropped_low_agreement"] += 1
        return None
    representative = consensus.agreeing[-1]  # the most recently updated of the agreeing annotations
    return Verdict(representative.result, consensus.agreement, _shared_parent(consensus.agreeing))


def _shared_parent(annotations: tuple[HumanAnnotation, ...]) -> Any:
    parents = {a.parent_prediction for a in annotations if a.parent_prediction is not None}
    return parents.pop() if len(parents) == 1 else None


# --- projects -------------------------------------------------------------------------------------


class Project:
    """How one kind of project turns a task's verdict into pairs and an SFT example."""

    def identity(self, result: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def pairs(self, record: TaskRecord, verdict: Verdict) -> list[PreferencePair]:
        raise NotImplementedError

    def sft(self, record: TaskRecord, verdict: Verdict) -> SftExample | None:
        raise NotImplementedError


def load_project(label_config_xml: str, instructions: str = "") -> Project:
    try:
        root = ET.fromstring(label_config_xml)
    except ET.ParseError as exc:
        raise UnsupportedLabelConfig(f"label_config is not valid XML: {exc}") from exc
    if any(element.tag.lower() in COMPARISON_TAGS for element in root.iter()):
        return ComparisonProject.from_xml(root)
    return AnswerProject(compile_label_config(label_config_xml, instructions), instructions)


def _region_content(region: dict[str, Any]) -> dict[str, Any]:
    """A region without what Label Studio adds around the content (id, origin, score, readonly...)."""
    return {key: region[key] for key in REGION_CONTENT if key in region}


class AnswerProject(Project):
    def __init__(self, config: CompiledConfig, instructions: str = ""):
        self.config = config
        self.instructions = instructions

    def identity(self, result: list[dict[str, Any]]) -> str:
        return canonical_key([_region_content(region) for region in result])

    def _texts(self, task: dict[str, Any]) -> dict[str, str]:
        return self.config.read_task(task, sys.maxsize)

    def answer_text(self, result: list[dict[str, Any]], texts: dict[str, str]) -> str:
        return canonical_json(self.config.answer_from_results(result, texts))

    def sft(self, record: TaskRecord, verdict: Verdict) -> SftExample:
        texts = self._texts(record.task)
        return SftExample(
            task_id=record.id,
            prompt=build_messages(self.config, texts, self.instructions),
            completion=self.answer_text(verdict.result, texts),
            result=verdict.result,
            weight=verdict.weight,
        )

    def pairs(self, record: TaskRecord, verdict: Verdict) -> list[PreferencePair]:
        texts = self._texts(record.task)
        builder = _PairBuilder(record.id, build_messages(self.config, texts, self.instructions), verdict.weight)
        human = KeyedResult(id=None, result=verdict.result, key=self.identity(verdict.result))
        for prediction in record.predictions:
            builder.add(human, prediction, self.answer_text, texts, 1.0, SOURCE_ANNOTATION)
        picked = next((p for p in record.predictions if p.id == verdict.parent_prediction), None)
        if picked is not None:
            for other in record.predictions:
                # a candidate equal to the human's answer never loses to the one they started from
                if other is not picked and other.key != human.key:
                    builder.add(picked, other, self.answer_text, texts, PICKED_MARGIN, SOURCE_PICKED)
        return builder.pairs


class _PairBuilder:
    """Collects one task's pairs, skipping repeats (same chosen/rejected results) and non-preferences."""

    def __init__(self, task_id: Any, prompt: list[dict[str, str]], weight: float):
        self.task_id, self.prompt, self.weight = task_id, prompt, weight
        self.pairs: list[PreferencePair] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, chosen: KeyedResult, rejected: KeyedResult, render, texts, margin: float, source: str) -> None:
        if chosen.key == rejected.key or (chosen.key, rejected.key) in self._seen:
            return
        self._seen.add((chosen.key, rejected.key))
        chosen_text, rejected_text = render(chosen.result, texts), render(rejected.result, texts)
        if chosen_text == rejected_text:  # different regions, same answer (e.g. one NER mention vs all)
            return
        self.pairs.append(
            PreferencePair(
                task_id=self.task_id, prompt=self.prompt, chosen=chosen_text, rejected=rejected_text,
                chosen_result=chosen.result, rejected_result=rejected.result,
                margin=margin, weight=self.weight, source=source,
            )
        )


def canonical_json(answer: Any) -> str:
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


# --- comparison projects (Ranker / Pairwise) -------------------------------------------------------


class ComparisonProject(Project):
    def __init__(self, ranker: RankerSpec | None, pairwise: PairwiseSpec | None, prompt_objects: tuple[DataObject, ...]):
        self.ranker, self.pairwise, self.prompt_objects = ranker, pairwise, prompt_objects

    @classmethod
    def from_xml(cls, root: ET.Element) -> "ComparisonProject":
        tags = parse_comparison_tags(root)
        return cls(tags.ranker, tags.pairwise, tags.prompt_objects())

    # identity: what counts as "the same answer" for consensus
    def identity(self, result: list[dict[str, Any]]) -> str:
        return canonical_key([self._comparable(region) for region in result])

    def _comparable(self, region: dict[str, Any]) -> dict[str, Any]:
        content = _region_content(region)
        ranking = (content.get("value") or {}).get("ranker")
        if self.ranker and self.ranker.buckets and isinstance(ranking, dict):
            # bucket mode: membership matters, order inside a bucket and the unplaced pool don't
            buckets = {b: sorted(map(str, ids)) for b, ids in ranking.items() if b != UNPLACED_BUCKET and ids}
            content = {**content, "value": {**content["value"], "ranker": buckets}}
        return content

    def prompt(self, task: dict[str, Any]) -> list[dict[str, str]]:
        return comparison_prompt(self.prompt_objects, task)

    def pairs(self, record: TaskRecord, verdict: Verdict) -> list[PreferencePair]:
        comparisons = self._comparisons(record.task, verdict.result)
        prompt = self.prompt(record.task)
        return [
            PreferencePair(
                task_id=record.id, prompt=prompt, chosen=chosen, rejected=rejected,
                chosen_result=verdict.result, rejected_result=verdict.result,
                margin=margin, weight=verdict.weight, source=source,
            )
            for chosen, rejected, margin, source in comparisons
            if chosen != rejected
        ]

    def sft(self, record: TaskRecord, verdict: Verdict) -> SftExample | None:
        best = self._best(record.task, verdict.result)
        if not best:
            return None
        return SftExample(record.id, self.prompt(record.task), best, verdict.result, verdict.weight)

    # reading the human result
    def _comparisons(self, task: dict[str, Any], result: list[dict[str, Any]]) -> list[tuple[str, str, float, str]]:
        found = []
        ranking = self._ranking(result)
        if ranking is not None:
            found += self._ranking_pairs(task, ranking)
        selected = self._selected_side(result)
        if selected is not None:
            left, right = self.pairwise.left.read_text(task), self.pairwise.right.read_text(task)
            chosen, rejected = (left, right) if selected == "left" else (right, left)
            found.append((chosen, rejected, 1.0, SOURCE_PAIRWISE))
        return found

    def _ranking_pairs(self, task: dict[str, Any], ranking: dict[str, list]) -> list[tuple[str, str, float, str]]:
        items = _list_items(self.ranker.items, task)
        if self.ranker.buckets:
            return _bucket_pairs(ranking, self.ranker.buckets, items)
        return _rank_pairs(self.ranker.ranked_ids(ranking), items)

    def _best(self, task: dict[str, Any], result: list[dict[str, Any]]) -> str | None:
        ranking = self._ranking(result)
        if ranking is not None:
            items = _list_items(self.ranker.items, task)
            ordered = ranking.get(self.ranker.buckets[0], []) if self.ranker.buckets else self.ranker.ranked_ids(ranking)
            top = [items[i] for i in ordered if i in items]
            return top[0] if top else None
        selected = self._selected_side(result)
        if selected is not None:
            return (self.pairwise.left if selected == "left" else self.pairwise.right).read_text(task)
        return None

    def _ranking(self, result: list[dict[str, Any]]) -> dict[str, list] | None:
        return self.ranker.ranking(result) if self.ranker else None

    def _selected_side(self, result: list[dict[str, Any]]) -> str | None:
        return self.pairwise.selected(result) if self.pairwise else None


def _rank_pairs(ranked_ids: list, items: dict[Any, str]) -> list[tuple[str, str, float, str]]:
    ranked = [items[i] for i in ranked_ids if i in items]
    span = max(len(ranked) - 1, 1)
    return [
        (ranked[i], ranked[j], (j - i) / span, SOURCE_RANKER)
        for i in range(len(ranked))
        for j in range(i + 1, len(ranked))
    ]


def _bucket_pairs(ranking: dict[str, list], buckets: tuple[str, ...], items: dict[Any, str]) -> list[tuple[str, str, float, str]]:
    span = max(len(buckets) - 1, 1)
    members = [[items[i] for i in ranking.get(bucket) or [] if i in items] for bucket in buckets]
    return [
        (better, worse, (lower - upper) / span, SOURCE_BUCKETS)
        for upper in range(len(buckets))
        for lower in range(upper + 1, len(buckets))
        for better in members[upper]
        for worse in members[lower]
    ]


def _list_items(list_object: DataObject, task: dict[str, Any]) -> dict[Any, str]:
    """`<List>` items by id -> the candidate's text (body, else title, else html)."""
    items = (task.get("data") or {}).get(list_object.data_key)
    if not isinstance(items, list):
        raise InvalidTaskData(f"task field '{list_object.data_key}' read by <List name=\"{list_object.name}\"> is not a list")
    texts = {}
    for item in items:
        if isinstance(item, dict) and "id" in item:
            text = item.get("body") or item.get("title") or html_to_text(str(item.get("html") or ""))
            texts[item["id"]] = str(text)
    return texts


# --- small helpers ---------------------------------------------------------------------------------


def _id_order(task: dict[str, Any]) -> tuple[int, Any]:
    task_id = task.get("id") if isinstance(task, dict) else None
    return (0, task_id) if isinstance(task_id, int) else (1, str(task_id))


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
