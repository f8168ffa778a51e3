"""Ranking projects: `<List>` + `<Ranker>` and `<Pairwise>` configs, whose candidates live in the task data.

A Label Studio prediction cannot add items to a `<List>`, so for these projects the backend writes the N
generated candidates into each task (`candidates: [{id, title, body}]`) and stores the model's opinion
as a prediction: a Ranker order (bucket mode: the order split over the buckets) or a Pairwise pick.
This module reads such a config (`compile_ranking_config`; `compile_any` for a config of either kind), its
tags (`parse_comparison_tags`) and a Ranker/Pairwise result: `training/preferences.py` reads the annotators'
rankings with them. Generating a task's candidates and its prediction is backend/candidate_fill.py's.

Two generation modes, chosen by the config (`RankingConfig.label_candidates`):
  * responses: no answer control besides the Ranker/Pairwise; each candidate is a free-text response
    to the prompt (the task's `<Text>` fields), sampled under a TextArea constraint.
  * label candidates: the config also holds answer controls (Choices, Labels, ...; usually inside a
    hidden `<View>`), compiled as usual; each candidate is one predicted annotation, rendered readably.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from .bounded_cache import bytes_bounded_cache
from .errors import InvalidTaskData, UnsupportedLabelConfig
from .label_config import CONFIG_CACHE_BYTES, SUPPORTED_CONTROLS, CompiledConfig, TextAreaControl, TextObject, compile_label_config, html_to_text

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


# --- config -----------------------------------------------------------------------------------------


def is_comparison_config(xml: str) -> bool:
    """A config with a <Ranker> or <Pairwise>: its candidates are written into the tasks."""
    return bool(xml) and _has_comparison_tag(xml)


@bytes_bounded_cache(CONFIG_CACHE_BYTES, weigh=lambda args: 256)  # keyed by the XML's digest, holds a bool
def _has_comparison_tag(xml: str) -> bool:
    lowered = xml.lower()
    return any(f"<{tag}" in lowered for tag in COMPARISON_TAGS)


def compile_any(xml: str, *, settings=None) -> CompiledConfig | RankingConfig:
    """A config of either kind, compiled: a RankingConfig for <Ranker>/<Pairwise> configs, else the answer config
    /predict serves (label_config.py). Raises UnsupportedLabelConfig (422) naming what is wrong."""
    return ranking_config_of(xml, settings=settings) or compile_label_config(xml, settings=settings)


def ranking_config_of(xml: str, *, settings=None) -> RankingConfig | None:
    """The compiled ranking config when `xml` is one; None for an answer config, which is left uncompiled."""
    return compile_ranking_config(xml, settings=settings) if is_comparison_config(xml) else None


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
