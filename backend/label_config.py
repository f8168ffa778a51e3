"""Label-config compiler: from a Label Studio labeling config, what to ask the model and how to read it.

`compile_label_config(xml)` parses the config with `label_studio_sdk.label_interface.LabelInterface` and
returns a `CompiledConfig`: one `Control` per supported control tag. Each control knows
  * how to describe itself in the prompt (`describe`),
  * the JSON-schema fragment that constrains the engine's output for it (`schema`),
  * how to turn the model's answer into Label Studio result regions (`to_results`), rejecting anything
    outside the config (an invalid candidate is dropped, never shown as a label).
The engine is asked for one JSON object with a key per control, so several controls in one config work.
"""
from __future__ import annotations

import html
import json
import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from .bounded_cache import bytes_bounded_cache
from .errors import InvalidTaskData, PayloadTooLarge, UnsupportedLabelConfig

CONFIG_CACHE_BYTES = 64 * 1024 * 1024  # compiled configs kept, weighed by their XML (clients send configs)
TEXT_OBJECT_TAGS = {"Text", "HyperText"}
IMAGE_OBJECT_TAGS = {"Image"}
IMAGE_CONTROLS = ("Choices", "Rating", "TextArea")  # what an <Image> can be pre-annotated with
SPAN_NGRAM_MAX_WORDS = 4
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WORD = re.compile(r"\w[\w'’.-]*\w|\w", re.UNICODE)


class InvalidAnswer(ValueError):
    """The model's answer does not fit the config; the candidate is dropped."""


@dataclass(frozen=True)
class TextObject:
    """A `<Text>`/`<HyperText>` object and the task data key it reads."""

    name: str
    tag: str
    data_key: str

    def read(self, task: dict[str, Any], max_chars: int) -> str:
        data = task.get("data")
        task_id = task.get("id", "?")
        if not isinstance(data, dict):
            raise InvalidTaskData(f"task {task_id} has no 'data' object")
        if self.data_key not in data:
            raise InvalidTaskData(
                f"task {task_id} is missing data field '{self.data_key}' that <{self.tag} name=\"{self.name}\"> "
                f"reads (value=\"${self.data_key}\"); fields present: {sorted(data)}"
            )
        value = data[self.data_key]
        if isinstance(value, (dict, list)) or value is None:
            raise InvalidTaskData(f"task {task_id} field '{self.data_key}' must be text, got {type(value).__name__}")
        text = str(value)
        if len(text) > max_chars:
            raise PayloadTooLarge(
                f"task {task_id} field '{self.data_key}' has {len(text)} characters; the limit is {max_chars} "
                f"(DATAENGINE_MAX_TEXT_CHARS)"
            )
        return text

    def prompt_text(self, raw: str) -> str:
        return html_to_text(raw) if self.tag == "HyperText" else raw

    @property
    def is_image(self) -> bool:
        return False


@dataclass(frozen=True)
class ImageObject(TextObject):
    """An `<Image value="$field">`: the task field holds the image reference (URL, data URI, Label Studio
    path). `read` returns that reference; the predictor fetches and validates the bytes (backend/images.py),
    and training keeps the reference (preference pairs and SFT prompts point at the task's image)."""

    def read(self, task: dict[str, Any], max_chars: int) -> str:
        reference = super().read(task, sys.maxsize)  # data URIs are long: images have byte limits (images.py)
        if not reference.strip():
            raise InvalidTaskData(f"task {task.get('id', '?')} field '{self.data_key}' (<Image name=\"{self.name}\">) is empty")
        return reference.strip()

    def prompt_text(self, raw: str) -> str:
        return f"(image {self.name!r}, attached)"

    @property
    def is_image(self) -> bool:
        return True


@dataclass(frozen=True)
class Control:
    """Base for supported controls. `kind` names the answer shape; subclasses implement the rest."""

    name: str
    tag: str
    target: TextObject
    hint: str = ""

    @property
    def result_type(self) -> str:
        return self.tag.lower()

    def region(self, value: dict[str, Any]) -> dict[str, Any]:
        return {"from_name": self.name, "to_name": self.target.name, "type": self.result_type, "value": value}

    # --- interface -------------------------------------------------------------------------------
    def describe(self) -> str:
        raise NotImplementedError

    def schema(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def max_answer_chars(self, text: str) -> int:
        """Upper bound on the JSON length of this control's answer; sizes `max_tokens`."""
        raise NotImplementedError

    def to_results(self, answer: Any, text: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def options(self) -> list[Any] | None:
        """Every possible answer when the set is closed and single-valued (scored exhaustively), else None."""
        return None

    def to_answer(self, regions: list[dict[str, Any]], text: str) -> Any:
        """Inverse of `to_results`: this control's regions of a result -> its answer; None when it has none."""
        raise NotImplementedError

    def describe_option(self, option: Any) -> str:
        return str(option)

    def _with_hint(self, line: str) -> str:
        return f"{line} Hint: {self.hint}" if self.hint else line


def _quoted(labels: tuple[str, ...], hints: dict[str, str]) -> str:
    return ", ".join(f"{json.dumps(label)}" + (f" ({hints[label]})" if hints.get(label) else "") for label in labels)


@dataclass(frozen=True)
class ChoicesControl(Control):
    labels: tuple[str, ...] = ()
    label_hints: dict[str, str] = field(default_factory=dict)
    multiple: bool = False

    def describe(self) -> str:
        how = "a list of zero or more of" if self.multiple else "exactly one of"
        return self._with_hint(f'"{self.name}": {how} {_quoted(self.labels, self.label_hints)}.')

    def schema(self, text: str) -> dict[str, Any]:
        enum = {"type": "string", "enum": list(self.labels)}
        if not self.multiple:
            return enum
        # no "uniqueItems": xgrammar rejects it; duplicates are merged when parsing
        return {"type": "array", "items": enum, "maxItems": len(self.labels)}

    def max_answer_chars(self, text: str) -> int:
        longest = max(len(json.dumps(label)) for label in self.labels)
        return (longest + 1) * (len(self.labels) if self.multiple else 1) + 2

    def to_results(self, answer: Any, text: str) -> list[dict[str, Any]]:
        chosen = answer if self.multiple else [answer]
        if not isinstance(chosen, list) or any(label not in self.labels for label in chosen):
            raise InvalidAnswer(f"{self.name}: {answer!r} is not in {list(self.labels)}")
        ordered = [label for label in self.labels if label in set(chosen)]  # config order, no duplicates
        if not ordered:
            return []
        return [self.region({"choices": ordered})]

    def options(self) -> list[Any] | None:
        return None if self.multiple else list(self.labels)

    def to_answer(self, regions: list[dict[str, Any]], text: str) -> Any:
        picked = [label for region in regions for label in region["value"].get("choices", [])]
        # config order, like to_results; a label the config no longer has is kept (it is what the human chose)
        ordered = [label for label in self.labels if label in picked]
        ordered += [label for label in dict.fromkeys(picked) if label not in self.labels]
        if self.multiple:
            return ordered
        return ordered[0] if ordered else None

    def describe_option(self, option: Any) -> str:
        hint = self.label_hints.get(option)
        return f"{option} ({hint})" if hint else str(option)


@dataclass(frozen=True)
class RatingControl(Control):
    max_rating: int = 5

    def describe(self) -> str:
        return self._with_hint(f'"{self.name}": an integer rating from 1 to {self.max_rating}.')

    def schema(self, text: str) -> dict[str, Any]:
        return {"type": "integer", "minimum": 1, "maximum": self.max_rating}

    def max_answer_chars(self, text: str) -> int:
        return len(str(self.max_rating)) + 1

    def to_results(self, answer: Any, text: str) -> list[dict[str, Any]]:
        if isinstance(answer, bool) or not isinstance(answer, int) or not 1 <= answer <= self.max_rating:
            raise InvalidAnswer(f"{self.name}: rating {answer!r} outside 1..{self.max_rating}")
        return [self.region({"rating": answer})]

    def options(self) -> list[Any] | None:
        return list(range(1, self.max_rating + 1))

    def to_answer(self, regions: list[dict[str, Any]], text: str) -> Any:
        return regions[0]["value"].get("rating") if regions else None


@dataclass(frozen=True)
class NumberControl(Control):
    minimum: float | None = None
    maximum: float | None = None

    def describe(self) -> str:
        bounds = []
        if self.minimum is not None:
            bounds.append(f"at least {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"at most {self.maximum:g}")
        return self._with_hint(f'"{self.name}": a number' + (f" ({', '.join(bounds)})" if bounds else "") + ".")

    def schema(self, text: str) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema

    def max_answer_chars(self, text: str) -> int:
        return 24

    def to_results(self, answer: Any, text: str) -> list[dict[str, Any]]:
        if isinstance(answer, bool) or not isinstance(answer, (int, float)):
            raise InvalidAnswer(f"{self.name}: {answer!r} is not a number")
        if (self.minimum is not None and answer < self.minimum) or (self.maximum is not None and answer > self.maximum):
            raise InvalidAnswer(f"{self.name}: {answer!r} outside [{self.minimum}, {self.maximum}]")
        return [self.region({"number": answer})]

    def to_answer(self, regions: list[dict[str, Any]], text: str) -> Any:
        return regions[0]["value"].get("number") if regions else None


@dataclass(frozen=True)
class TextAreaControl(Control):
    max_chars: int = 400

    def describe(self) -> str:
        return self._with_hint(f'"{self.name}": free text, at most {self.max_chars} characters.')

    def schema(self, text: str) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": self.max_chars}

    def max_answer_chars(self, text: str) -> int:
        # JSON escapes can grow a character to 6 (\uXXXX); the random-model case needs the headroom.
        return self.max_chars * 2 + 2

    def to_results(self, answer: Any, text: str) -> list[dict[str, Any]]:
        if not isinstance(answer, str) or len(answer) > self.max_chars:
            raise InvalidAnswer(f"{self.name}: expected text of at most {self.max_chars} characters")
        cleaned = _CONTROL_CHARS.sub(" ", answer).strip()
        if not cleaned:
            raise InvalidAnswer(f"{self.name}: empty text")
        return [self.region({"text": [cleaned]})]

    def to_answer(self, regions: list[dict[str, Any]], text: str) -> Any:
        lines = []
        for region in regions:
            value = region["value"].get("text", [])
            lines.extend([value] if isinstance(value, str) else value)
        return "\n".join(lines) if lines else None


@dataclass(frozen=True)
class SpanLabelsControl(Control):
    """NER over `<Text>`: the model names (entity string, label); the backend finds the offsets."""

    labels: tuple[str, ...] = ()
    label_hints: dict[str, str] = field(default_factory=dict)
    max_entities: int = 16
    ngram_enumerate_max: int = 600

    def describe(self) -> str:
        return self._with_hint(
            f'"{self.name}": a list of entities found in the text, each {{"text": the exact words copied from '
            f'the text, "label": one of {_quoted(self.labels, self.label_hints)}}}; an empty list if none.'
        )

    def _entity_text_schema(self, text: str) -> dict[str, Any]:
        # Constraining entity strings to the text's own n-grams makes every span locatable by construction
        # and helps small models; very long texts fall back to a bounded free string.
        ngrams = word_ngrams(text, SPAN_NGRAM_MAX_WORDS)
        if 0 < len(ngrams) <= self.ngram_enumerate_max:
            return {"type": "string", "enum": ngrams}
        return {"type": "string", "minLength": 1, "maxLength": 100}

    def schema(self, text: str) -> dict[str, Any]:
        entity = {
            "type": "object",
            "properties": {"text": self._entity_text_schema(text), "label": {"type": "string", "enum": list(self.labels)}},
            "required": ["text", "label"],
            "additionalProperties": False,
        }
        return {"type": "array", "items": entity, "maxItems": self.max_entities}

    def max_answer_chars(self, text: str) -> int:
        longest_label = max(len(json.dumps(label)) for label in self.labels)
        ngrams = word_ngrams(text, SPAN_NGRAM_MAX_WORDS)
        longest_text = max((len(json.dumps(g)) for g in ngrams), default=0) if len(ngrams) <= self.ngram_enumerate_max else 202
        return self.max_entities * (longest_text + longest_label + len('{"text":,"label":},')) + 2

    def to_results(self, answer: Any, text: str) -> list[dict[str, Any]]:
        if not isinstance(answer, list):
            raise InvalidAnswer(f"{self.name}: expected a list of entities")
        taken: list[tuple[int, int]] = []
        regions = []
        for entity in answer:
            if not isinstance(entity, dict) or entity.get("label") not in self.labels:
                raise InvalidAnswer(f"{self.name}: entity {entity!r} has no label from {list(self.labels)}")
            for start, end in locate_spans(text, str(entity.get("text", ""))):
                if any(start < t_end and t_start < end for t_start, t_end in taken):
                    continue
                taken.append((start, end))
                regions.append(
                    self.region({"start": start, "end": end, "text": text[start:end], "labels": [entity["label"]]})
                )
        regions.sort(key=lambda r: r["value"]["start"])
        return regions

    def to_answer(self, regions: list[dict[str, Any]], text: str) -> Any:
        """Entities in offset order, one per (text, label): the model names a string once and
        `to_results` marks every mention, so repeated mentions collapse here."""
        entities: dict[tuple[str, str], None] = {}
        for region in sorted(regions, key=lambda r: (r["value"]["start"], r["value"]["end"])):
            value = region["value"]
            span_text = value.get("text") or text[value["start"] : value["end"]]
            for label in value.get("labels", []):
                entities.setdefault((span_text, label), None)
        return [{"text": span_text, "label": label} for span_text, label in entities]


@dataclass(frozen=True)
class CompiledConfig:
    controls: tuple[Control, ...]
    objects: tuple[TextObject, ...]  # what the prompt shows: control targets, plus context text in image configs
    instructions: str = ""

    @property
    def image_objects(self) -> tuple[TextObject, ...]:
        return tuple(obj for obj in self.objects if obj.is_image)

    def read_task(self, task: dict[str, Any], max_chars: int) -> dict[str, str]:
        """The text of every object the controls target, keyed by object name; raises a 4xx error."""
        if not isinstance(task, dict):
            raise InvalidTaskData(f"each task must be a JSON object, got {type(task).__name__}")
        return {obj.name: obj.read(task, max_chars) for obj in self.objects}

    def enumerable_control(self, enumerate_max: int) -> Control | None:
        """The single closed-set control to score exhaustively, when the config is just that."""
        if len(self.controls) != 1:
            return None
        options = self.controls[0].options()
        return self.controls[0] if options is not None and 0 < len(options) <= enumerate_max else None

    def schema(self, texts: dict[str, str]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {c.name: c.schema(texts[c.target.name]) for c in self.controls},
            "required": [c.name for c in self.controls],
            "additionalProperties": False,
        }

    def max_answer_chars(self, texts: dict[str, str]) -> int:
        return sum(c.max_answer_chars(texts[c.target.name]) + len(c.name) + 4 for c in self.controls) + 2

    def parse(self, raw: str, texts: dict[str, str]) -> list[dict[str, Any]]:
        """Model output (JSON text) -> Label Studio result list; raises InvalidAnswer."""
        try:
            # strict=False: the engine's JSON grammar lets raw control characters into strings
            answer = json.loads(raw, strict=False)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InvalidAnswer(f"not JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise InvalidAnswer("answer is not a JSON object")
        return self.results_from_answer(answer, texts)

    def results_from_answer(self, answer: dict[str, Any], texts: dict[str, str]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for control in self.controls:
            if control.name not in answer:
                raise InvalidAnswer(f"answer lacks {control.name!r}")
            results.extend(control.to_results(answer[control.name], texts[control.target.name]))
        return results

    def answer_from_results(self, results: list[dict[str, Any]], texts: dict[str, str]) -> dict[str, Any]:
        """Inverse of `results_from_answer`: a Label Studio result (human or predicted) -> the JSON answer
        the model would have given, keyed in control order. A control without a region is left out."""
        answer: dict[str, Any] = {}
        for control in self.controls:
            regions = [r for r in results if r.get("from_name") == control.name and isinstance(r.get("value"), dict)]
            value = control.to_answer(regions, texts.get(control.target.name, ""))
            if value is not None:
                answer[control.name] = value
        return answer


# --- compiling -------------------------------------------------------------------------------------


def compile_label_config(xml: str, instructions: str = "", *, settings=None) -> CompiledConfig:
    """Parse and compile; raises UnsupportedLabelConfig (4xx) naming the offending tag."""
    from .settings import get_settings

    settings = settings or get_settings()
    return _compile_cached(
        xml,
        instructions or "",
        settings.textarea_max_chars,
        settings.max_entities,
        settings.span_enumerate_max,
    )


@bytes_bounded_cache(CONFIG_CACHE_BYTES)
def _compile_cached(xml: str, instructions: str, textarea_max: int, max_entities: int, ngram_max: int) -> CompiledConfig:
    if not isinstance(xml, str) or not xml.strip():
        raise UnsupportedLabelConfig("label_config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several XML/parsing error types
        raise UnsupportedLabelConfig(f"label_config is not a valid Label Studio config: {exc}") from exc
    objects = {o.name: o for o in interface.objects}
    controls = [
        _compile_control(c, objects, textarea_max=textarea_max, max_entities=max_entities, ngram_max=ngram_max)
        for c in interface.controls
    ]
    if not controls:
        raise UnsupportedLabelConfig("label_config has no control tags (Choices, Labels, Rating, Number, TextArea)")
    targets = {c.target.name: c.target for c in controls}
    if any(target.is_image for target in targets.values()):
        targets.update(_context_objects(interface, targets))
    return CompiledConfig(controls=tuple(controls), objects=tuple(targets.values()), instructions=instructions)


def _context_objects(interface, targets: dict) -> dict[str, TextObject]:
    """Text objects no control targets, shown to the model beside the image (visual QA: the question)."""
    context = {}
    for obj in interface.objects:
        value = obj.value or ""
        if obj.name not in targets and obj.tag in TEXT_OBJECT_TAGS and value.startswith("$") and len(value) > 1:
            context[obj.name] = TextObject(name=obj.name, tag=obj.tag, data_key=value[1:])
    return context


SUPPORTED_CONTROLS = ("Choices", "Labels", "Rating", "Number", "TextArea")


def _compile_control(tag, objects: dict, *, textarea_max: int, max_entities: int, ngram_max: int) -> Control:
    if tag.tag not in SUPPORTED_CONTROLS:
        raise UnsupportedLabelConfig(
            f"<{tag.tag} name=\"{tag.name}\"> is not supported; supported controls: {', '.join(SUPPORTED_CONTROLS)}"
        )
    if _truthy(tag.attr.get("perRegion")):
        raise UnsupportedLabelConfig(f"<{tag.tag} name=\"{tag.name}\" perRegion> is not supported")
    target = _target_object(tag, objects)
    if target.is_image and tag.tag not in IMAGE_CONTROLS:
        raise UnsupportedLabelConfig(
            f"<{tag.tag} name=\"{tag.name}\"> over <Image name=\"{target.name}\"> is not supported; images work with "
            f"{', '.join(IMAGE_CONTROLS)}"
        )
    common = {"name": tag.name, "tag": tag.tag, "target": target, "hint": tag.attr.get("hint", "")}
    if tag.tag == "Choices":
        labels, hints = _labels_and_hints(tag)
        multiple = tag.attr.get("choice", "single") in ("multiple", "multiple-choice")
        return ChoicesControl(**common, labels=labels, label_hints=hints, multiple=multiple)
    if tag.tag == "Rating":
        return RatingControl(**common, max_rating=_int_attr(tag, "maxRating", 5))
    if tag.tag == "Number":
        return NumberControl(**common, minimum=_float_attr(tag, "min"), maximum=_float_attr(tag, "max"))
    if tag.tag == "TextArea":
        limit = _int_attr(tag, "maxLength", textarea_max) if "maxLength" in tag.attr else textarea_max
        return TextAreaControl(**common, max_chars=min(limit, textarea_max))
    if target.tag != "Text":
        raise UnsupportedLabelConfig(
            f"<Labels name=\"{tag.name}\"> over <{target.tag}> is not supported; span labels work over <Text>"
        )
    labels, hints = _labels_and_hints(tag)
    return SpanLabelsControl(**common, labels=labels, label_hints=hints, max_entities=max_entities, ngram_enumerate_max=ngram_max)


def _target_object(tag, objects: dict) -> TextObject:
    names = tag.to_name or []
    if not names or names[0] not in objects:
        raise UnsupportedLabelConfig(f"<{tag.tag} name=\"{tag.name}\"> has toName={names!r} matching no object tag")
    obj = objects[names[0]]
    if obj.tag not in TEXT_OBJECT_TAGS | IMAGE_OBJECT_TAGS:
        raise UnsupportedLabelConfig(
            f"<{tag.tag} name=\"{tag.name}\"> targets <{obj.tag} name=\"{obj.name}\">, which is not supported; "
            f"supported objects: {', '.join(sorted(TEXT_OBJECT_TAGS | IMAGE_OBJECT_TAGS))}"
        )
    value = obj.value or ""
    if not value.startswith("$") or len(value) < 2:
        raise UnsupportedLabelConfig(f"<{obj.tag} name=\"{obj.name}\"> must read a task field (value=\"$field\")")
    kind = ImageObject if obj.tag in IMAGE_OBJECT_TAGS else TextObject
    return kind(name=obj.name, tag=obj.tag, data_key=value[1:])


def _labels_and_hints(tag) -> tuple[tuple[str, ...], dict[str, str]]:
    labels = tuple(tag.labels or ())
    if not labels:
        raise UnsupportedLabelConfig(f"<{tag.tag} name=\"{tag.name}\"> has no labels")
    attrs = getattr(tag, "labels_attrs", None) or {}
    hints = {label: attrs[label].attr.get("hint", "") for label in labels if label in attrs and attrs[label].attr.get("hint")}
    return labels, hints


def _int_attr(tag, name: str, default: int) -> int:
    try:
        value = int(tag.attr.get(name, default))
    except (TypeError, ValueError) as exc:
        raise UnsupportedLabelConfig(f"<{tag.tag} name=\"{tag.name}\"> has a non-integer {name}") from exc
    if value < 1:
        raise UnsupportedLabelConfig(f"<{tag.tag} name=\"{tag.name}\"> needs {name} >= 1")
    return value


def _float_attr(tag, name: str) -> float | None:
    raw = tag.attr.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise UnsupportedLabelConfig(f"<{tag.tag} name=\"{tag.name}\"> has a non-numeric {name}={raw!r}") from exc


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1", "yes")


# --- text helpers ----------------------------------------------------------------------------------


def word_ngrams(text: str, max_words: int) -> list[str]:
    """Distinct contiguous 1..max_words word sequences of `text`, as they appear (first-seen order)."""
    words = [m for m in _WORD.finditer(text)]
    seen: dict[str, None] = {}
    for i in range(len(words)):
        for j in range(i, min(i + max_words, len(words))):
            seen.setdefault(text[words[i].start() : words[j].end()], None)
    return list(seen)


def locate_spans(text: str, entity: str) -> list[tuple[int, int]]:
    """Every whole-word occurrence of `entity` in `text` (exact case first, else case-insensitive)."""
    entity = entity.strip()
    if not entity:
        return []
    pattern = r"(?<!\w)" + re.escape(entity) + r"(?!\w)"
    spans = [m.span() for m in re.finditer(pattern, text)]
    if not spans:
        spans = [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    return spans


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    return html.unescape(" ".join(" ".join(parser.parts).split()))
