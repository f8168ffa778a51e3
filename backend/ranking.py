"""Ranking projects: `<List>` + `<Ranker>` and `<Pairwise>` configs, whose candidates live in the task data.

A Label Studio prediction cannot add items to a `<List>`, so for these projects the backend writes the N
generated candidates into each task (`candidates: [{id, title, body}]`) and stores the model's opinion
as a prediction: a Ranker order (bucket mode: the order split over the buckets) or a Pairwise pick.
This module reads such a config, generates one task's candidates through the Predictor, and builds the
task's new data and its prediction; `training/prelabel.py` runs it over whole projects. The config's tags
(`parse_comparison_tags`) and the readers of a Ranker/Pairwise result live here too, next to the builders:
`training/preferences.py` reads the annotators' rankings with them.

Two generation modes, chosen by the config:
  * responses: no answer control besides the Ranker/Pairwise; each candidate is a free-text response
    to the prompt (the task's `<Text>` fields), sampled under a TextArea constraint.
  * label candidates: the config also holds answer controls (Choices, Labels, ...; usually inside a
    hidden `<View>`), compiled as usual; each candidate is one predicted annotation, rendered readably.
Item ids are a hash of the candidate's text (stable across refills); items are stored in id order, so
the list's display order does not give away the model's ranking.
"""
from __future__ import annotations

import difflib
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from typing import Any

from .bounded_cache import bytes_bounded_cache
from .errors import InvalidTaskData, UnsupportedLabelConfig
from .label_config import CONFIG_CACHE_BYTES, SUPPORTED_CONTROLS, CompiledConfig, TextAreaControl, TextObject, compile_label_config, html_to_text
from .predictor import PredictRequest, Predictor, TaskFailure
from .prompts import reward_text
from .registry import ServingVersion
from .usage import Usage

COMPARISON_TAGS = ("ranker", "pairwise")
LAYOUT_TAGS = {"list", "ranker", "pairwise", "bucket"}
PROMPT_TAGS = {"Text": "Text", "HyperText": "HyperText"}
CANDIDATES_KEY = "candidates"  # where candidates go when the config has no <List> (pairwise only)
RESPONSE_CONTROL = "response"
RESPONSE_HINT = "your answer to the prompt, as the assistant"
UNPLACED_BUCKET = "_"  # Label Studio's pool of items not moved into any bucket
PROMPT_KINDS = ("text", "hypertext", "paragraphs")  # data objects that can hold what the candidates answer


@dataclass(frozen=True)
class DataObject:
    """A tag that reads a task field (`value="$field"`): `<Text>`, `<HyperText>`, `<Paragraphs>`, `<List>`..."""

    name: str
    tag: str  # as written in the config
    data_key: str
    attrs: dict[str, str]

    @property
    def kind(self) -> str:
        return self.tag.lower()

    def read_text(self, task: dict[str, Any]) -> str:
        value = (task.get("data") or {}).get(self.data_key)
        if value is None:
            return ""
        if self.kind == "paragraphs" and isinstance(value, list):
            return _paragraphs_text(value, self.attrs.get("nameKey", "author"), self.attrs.get("textKey", "text"))
        if isinstance(value, (dict, list)):
            raise InvalidTaskData(f"task field '{self.data_key}' read by <{self.kind} name=\"{self.name}\"> is not text")
        return html_to_text(str(value)) if self.kind == "hypertext" else str(value)


@dataclass(frozen=True)
class RankerSpec:
    name: str
    items: DataObject  # the <List> it orders
    buckets: tuple[str, ...]  # config order, best first; empty: plain ranking

    def ranking(self, result: list[dict[str, Any]]) -> dict[str, list] | None:
        """This Ranker's value in a result: ids keyed by the Ranker's name (plain) or by bucket."""
        for region in result:
            if region.get("type") == "ranker" and region.get("from_name") == self.name:
                ranking = (region.get("value") or {}).get("ranker")
                if isinstance(ranking, dict):
                    return ranking
        return None

    def ranked_ids(self, ranking: dict[str, list]) -> list:
        """A plain ranking's ids, best first. Label Studio keys it by the Ranker's name; a lone other key is
        accepted too."""
        if self.name in ranking:
            return list(ranking[self.name])
        named = [ids for key, ids in ranking.items() if key != UNPLACED_BUCKET]
        return list(named[0]) if len(named) == 1 else []


@dataclass(frozen=True)
class PairwiseSpec:
    name: str
    left: DataObject
    right: DataObject

    def selected(self, result: list[dict[str, Any]]) -> str | None:
        """"left" or "right": the side this Pairwise picked in a result, None when it picked none."""
        for region in result:
            if region.get("type") == "pairwise" and region.get("from_name") == self.name:
                selected = (region.get("value") or {}).get("selected")
                return selected if selected in ("left", "right") else None
        return None


@dataclass(frozen=True)
class ComparisonTags:
    """What a comparison config declares; the backend compiles it for generation, training reads results with it."""

    objects: dict[str, DataObject]  # by name
    ranker: RankerSpec | None
    pairwise: PairwiseSpec | None

    def unpaired_objects(self) -> list[DataObject]:
        """The data objects other than the Pairwise sides (where the prompt is)."""
        sides = {self.pairwise.left.name, self.pairwise.right.name} if self.pairwise else set()
        return [o for o in self.objects.values() if o.name not in sides]

    def prompt_objects(self) -> tuple[DataObject, ...]:
        """The texts the candidates answer (not the <List> of candidates, not the Pairwise sides)."""
        return tuple(o for o in self.unpaired_objects() if o.kind in PROMPT_KINDS)


def comparison_prompt(objects: tuple[DataObject, ...], task: dict[str, Any]) -> list[dict[str, str]]:
    """A comparison task's prompt as chat messages: what the reward model reads before each candidate, in
    training (`training.preferences`) and when candidates are reranked here -- the same text both times."""
    text = "\n\n".join(t for t in (o.read_text(task) for o in objects) if t)
    return [{"role": "user", "content": text}] if text else []


@dataclass(frozen=True)
class RankingConfig:
    answer: CompiledConfig  # what the engine is asked for, once per candidate
    candidates_key: str  # task field holding [{id, title, body}]
    ranker: RankerSpec | None
    pairwise: PairwiseSpec | None
    label_candidates: bool  # True: candidates are annotations of the answer controls; False: free text
    prompt_objects: tuple[DataObject, ...] = ()  # what the reward model reads as the prompt

    def has_candidates(self, task: dict[str, Any]) -> bool:
        items = (task.get("data") or {}).get(self.candidates_key)
        return isinstance(items, list) and len(items) > 0


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


# --- config -----------------------------------------------------------------------------------------


def is_comparison_config(xml: str) -> bool:
    """A config with a <Ranker> or <Pairwise>: its candidates are written into the tasks."""
    return bool(xml) and _has_comparison_tag(xml)


@bytes_bounded_cache(CONFIG_CACHE_BYTES, weigh=lambda args: 256)  # keyed by the XML's digest, holds a bool
def _has_comparison_tag(xml: str) -> bool:
    lowered = xml.lower()
    return any(f"<{tag}" in lowered for tag in COMPARISON_TAGS)


def compile_ranking_config(xml: str, *, settings=None) -> RankingConfig:
    """Parse a ranking/pairwise config; raises UnsupportedLabelConfig (422) naming what is wrong."""
    from .settings import get_settings

    settings = settings or get_settings()
    return _compile_cached(xml, settings.textarea_max_chars, settings.max_entities, settings.span_enumerate_max)


@bytes_bounded_cache(CONFIG_CACHE_BYTES)
def _compile_cached(xml: str, textarea_max: int, max_entities: int, ngram_max: int) -> RankingConfig:
    root = _parse(xml)
    tags = parse_comparison_tags(root)
    ranker, pairwise = tags.ranker, tags.pairwise
    if ranker is None and pairwise is None:
        raise UnsupportedLabelConfig("a ranking config needs a <Ranker> (over a <List>) or a <Pairwise>")
    _check_generatable(tags)
    key = ranker.items.data_key if ranker else CANDIDATES_KEY
    has_controls = any(element.tag in SUPPORTED_CONTROLS for element in root.iter())
    if has_controls:
        stripped = _without_layout_tags(root)
        settings = _CompileSettings(textarea_max, max_entities, ngram_max)
        answer = compile_label_config(stripped, settings=settings)
    else:
        answer = _response_config(tags, textarea_max)
    return RankingConfig(answer, key, ranker, pairwise, label_candidates=has_controls, prompt_objects=tags.prompt_objects())


@dataclass(frozen=True)
class _CompileSettings:
    textarea_max_chars: int
    max_entities: int
    span_enumerate_max: int


def _parse(xml: str) -> ET.Element:
    if not isinstance(xml, str) or not xml.strip():
        raise UnsupportedLabelConfig("label_config is empty")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UnsupportedLabelConfig(f"label_config is not valid XML: {exc}") from exc


def parse_comparison_tags(root: ET.Element) -> ComparisonTags:
    """The config's data objects, <Ranker> and <Pairwise>; raises UnsupportedLabelConfig when one of them
    does not point at objects that read task data."""
    objects = _data_objects(root)
    return ComparisonTags(objects, _ranker_spec(root, objects), _pairwise_spec(root, objects))


def _data_objects(root: ET.Element) -> dict[str, DataObject]:
    objects = {}
    for element in root.iter():
        name, value = element.get("name"), element.get("value") or ""
        if name and value.startswith("$") and len(value) > 1:
            objects[name] = DataObject(name, element.tag, value[1:], dict(element.attrib))
    return objects


def _ranker_spec(root: ET.Element, objects: dict[str, DataObject]) -> RankerSpec | None:
    tag = next((e for e in root.iter() if e.tag.lower() == "ranker"), None)
    if tag is None:
        return None
    name, target = tag.get("name") or "", objects.get(tag.get("toName") or "")
    if target is None or target.kind != "list":
        raise UnsupportedLabelConfig(_RANKER_NEEDS.format(name=name))
    buckets = tuple(b.get("name") for b in tag if b.tag.lower() == "bucket" and b.get("name"))
    return RankerSpec(name=name, items=target, buckets=buckets)


def _pairwise_spec(root: ET.Element, objects: dict[str, DataObject]) -> PairwiseSpec | None:
    tag = next((e for e in root.iter() if e.tag.lower() == "pairwise"), None)
    if tag is None:
        return None
    name = tag.get("name") or ""
    names = [n.strip() for n in (tag.get("toName") or "").split(",")]
    if len(names) != 2 or not all(n in objects for n in names):
        raise UnsupportedLabelConfig(_PAIRWISE_NEEDS.format(name=name))
    return PairwiseSpec(name=name, left=objects[names[0]], right=objects[names[1]])


_RANKER_NEEDS = '<Ranker name="{name}"> needs a name and toName naming a <List value="$candidates"> that reads task data'
_PAIRWISE_NEEDS = '<Pairwise name="{name}"> needs toName="left,right" naming two <Text value="$field"> objects'


def _check_generatable(tags: ComparisonTags) -> None:
    """What generation needs beyond what training reads: a named Ranker, and Pairwise sides that are texts."""
    if tags.ranker is not None and not tags.ranker.name:
        raise UnsupportedLabelConfig(_RANKER_NEEDS.format(name=""))
    if tags.pairwise is not None and not all(s.tag in PROMPT_TAGS for s in (tags.pairwise.left, tags.pairwise.right)):
        raise UnsupportedLabelConfig(_PAIRWISE_NEEDS.format(name=tags.pairwise.name))


def _without_layout_tags(root: ET.Element) -> str:
    """The config minus List/Ranker/Pairwise: what label_config.py compiles for the answer controls."""
    copy = ET.fromstring(ET.tostring(root))
    for parent in copy.iter():
        for child in list(parent):
            if child.tag.lower() in LAYOUT_TAGS:
                parent.remove(child)
    return ET.tostring(copy, encoding="unicode")


def _response_config(tags: ComparisonTags, textarea_max: int) -> CompiledConfig:
    prompts = tuple(
        TextObject(name=o.name, tag=o.tag, data_key=o.data_key) for o in tags.unpaired_objects() if o.tag in PROMPT_TAGS
    )
    if not prompts:
        raise UnsupportedLabelConfig(
            "a response-ranking config needs a prompt: a <Text name=\"prompt\" value=\"$prompt\"> besides the candidates"
        )
    control = TextAreaControl(name=RESPONSE_CONTROL, tag="TextArea", target=prompts[0], hint=RESPONSE_HINT, max_chars=textarea_max)
    return CompiledConfig(controls=(control,), objects=prompts)


def _paragraphs_text(paragraphs: list, name_key: str, text_key: str) -> str:
    lines = []
    for paragraph in paragraphs:
        if isinstance(paragraph, dict):
            speaker, said = paragraph.get(name_key), paragraph.get(text_key, "")
            lines.append(f"{speaker}: {said}" if speaker else str(said))
    return "\n".join(lines)


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
