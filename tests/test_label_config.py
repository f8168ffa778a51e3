"""Label-config compiler: parsing, constraints and answer reading, without the engine."""
from __future__ import annotations

import json

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.errors import InvalidTaskData, PayloadTooLarge, UnsupportedLabelConfig
from backend.label_config import (
    ChoicesControl,
    InvalidAnswer,
    SpanLabelsControl,
    compile_label_config,
    locate_spans,
    word_ngrams,
)
from tests.conftest import load_config, shipped_configs

MULTI = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text"><Choice value="Pos"/><Choice value="Neg"/></Choices>
  <Choices name="topics" toName="text" choice="multiple"><Choice value="A"/><Choice value="B"/></Choices>
  <Rating name="stars" toName="text" maxRating="4"/>
  <Number name="score" toName="text" min="0" max="10"/>
  <TextArea name="note" toName="text"/>
  <Labels name="ner" toName="text"><Label value="PER" hint="a person"/></Labels>
</View>"""


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_compiles_and_reads_its_sample_tasks(name):
    xml, tasks = load_config(name)
    config = compile_label_config(xml)
    assert config.controls
    for task in tasks:
        texts = config.read_task(task, 10_000)
        schema = config.schema(texts)
        assert set(schema["required"]) == {c.name for c in config.controls}


def test_multi_control_config_round_trip_is_accepted_by_label_studio():
    config = compile_label_config(MULTI)
    text = "Ann met Bob. Ann left."
    answer = {
        "sentiment": "Pos",
        "topics": ["B", "A", "B"],
        "stars": 3,
        "score": 2.5,
        "note": " short ",
        "ner": [{"text": "Ann", "label": "PER"}, {"text": "Zed", "label": "PER"}],
    }
    result = config.parse(json.dumps(answer), {"text": text})
    by_name = {}
    for region in result:
        by_name.setdefault(region["from_name"], []).append(region["value"])
    assert by_name["topics"] == [{"choices": ["A", "B"]}]  # config order, duplicates merged
    assert by_name["note"] == [{"text": ["short"]}]
    spans = by_name["ner"]
    assert [(s["start"], s["end"]) for s in spans] == [(0, 3), (13, 16)]  # both mentions, "Zed" dropped
    assert all(text[s["start"] : s["end"]] == s["text"] == "Ann" for s in spans)
    assert LabelInterface(MULTI).validate_prediction({"result": result})


@pytest.mark.parametrize(
    "answer",
    [
        {"sentiment": "Maybe"},
        {"topics": ["C"]},
        {"stars": 5},
        {"stars": 0},
        {"score": 11},
        {"score": True},
        {"note": "  "},
        {"ner": [{"text": "Ann", "label": "ORG"}]},
    ],
)
def test_answers_outside_the_config_are_rejected(answer):
    config = compile_label_config(MULTI)
    full = {"sentiment": "Pos", "topics": [], "stars": 1, "score": 1, "note": "x", "ner": []}
    full.update(answer)
    with pytest.raises(InvalidAnswer):
        config.parse(json.dumps(full), {"text": "Ann"})


@pytest.mark.parametrize("raw", ['{"sentiment": "Pos"', "not json", "[]", '{"sentiment":"Pos"}'])
def test_unparsable_or_incomplete_output_is_invalid(raw):
    config = compile_label_config(MULTI)
    with pytest.raises(InvalidAnswer):
        config.parse(raw, {"text": "Ann"})


@pytest.mark.parametrize(
    "xml, tag",
    [
        ('<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img"><Label value="Car"/></RectangleLabels></View>', "RectangleLabels"),
        ('<View><Text name="t" value="$t"/><Taxonomy name="tax" toName="t"><Choice value="A"/></Taxonomy></View>', "Taxonomy"),
        # Choices/Rating/TextArea over <Image> are supported (issue 8); other controls over it are not
        ('<View><Image name="img" value="$image"/><Number name="n" toName="img"/></View>', "Image"),
        ('<View><HyperText name="h" value="$html"/><Labels name="l" toName="h"><Label value="A"/></Labels></View>', "HyperText"),
    ],
)
def test_unsupported_tags_are_named(xml, tag):
    with pytest.raises(UnsupportedLabelConfig) as err:
        compile_label_config(xml)
    assert tag in err.value.message
    assert err.value.status == 422


@pytest.mark.parametrize("xml", ["", "<View><Text name='t'", "<View><Text name='t' value='$t'/></View>"])
def test_broken_or_empty_configs_are_4xx(xml):
    with pytest.raises(UnsupportedLabelConfig):
        compile_label_config(xml)


def test_hyper_text_is_prompted_as_plain_text():
    config = compile_label_config(
        '<View><HyperText name="h" value="$html"/><Choices name="c" toName="h"><Choice value="A"/></Choices></View>'
    )
    obj = config.objects[0]
    assert obj.prompt_text("<p>Hello <b>world</b> &amp; co</p>") == "Hello world & co"


def test_task_data_errors_name_the_field_and_limit():
    config = compile_label_config(MULTI)
    with pytest.raises(InvalidTaskData, match="'text'"):
        config.read_task({"id": 7, "data": {"body": "x"}}, 100)
    with pytest.raises(PayloadTooLarge, match="DATAENGINE_MAX_TEXT_CHARS"):
        config.read_task({"id": 7, "data": {"text": "x" * 101}}, 100)
    with pytest.raises(InvalidTaskData):
        config.read_task({"id": 7, "data": {"text": {"nested": 1}}}, 100)


def test_only_single_closed_sets_are_enumerated():
    sentiment = compile_label_config(load_config("sentiment")[0])
    assert isinstance(sentiment.enumerable_control(16), ChoicesControl)
    assert sentiment.enumerable_control(2) is None  # 3 labels > threshold: sample instead
    assert compile_label_config(load_config("topics")[0]).enumerable_control(16) is None  # multi-label
    assert compile_label_config(MULTI).enumerable_control(16) is None  # several controls


def test_label_hints_and_control_hints_reach_the_description():
    config = compile_label_config(load_config("ner")[0])
    control = config.controls[0]
    assert isinstance(control, SpanLabelsControl)
    assert "a person's name" in control.describe()


def test_span_location_is_exact_and_whole_word():
    text = "Paris Hilton visited Paris. paris? Parisian"
    assert locate_spans(text, "Paris") == [(0, 5), (21, 26)]
    assert locate_spans(text, "PARIS HILTON") == [(0, 12)]  # case-insensitive fallback, exact offsets
    assert locate_spans(text, "Berlin") == []
    assert locate_spans(text, "  ") == []


def test_overlapping_spans_keep_the_first():
    config = compile_label_config(load_config("ner")[0])
    text = "New York City is big"
    result = config.parse(
        json.dumps({"label": [{"text": "New York City", "label": "LOC"}, {"text": "York", "label": "ORG"}]}),
        {"text": text},
    )
    assert [(r["value"]["text"], r["value"]["labels"]) for r in result] == [("New York City", ["LOC"])]


def test_ngrams_constrain_entity_strings_to_the_text():
    grams = word_ngrams("Angela Merkel met Siemens.", 2)
    assert grams == ["Angela", "Angela Merkel", "Merkel", "Merkel met", "met", "met Siemens", "Siemens"]
    control = compile_label_config(load_config("ner")[0]).controls[0]
    schema = control.schema("Angela Merkel met Siemens.")
    assert "Angela Merkel" in schema["items"]["properties"]["text"]["enum"]
