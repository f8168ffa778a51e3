"""/predict against the REAL vLLM engine server serving a tiny random model.

The model is random, so these tests check what must hold whatever it says: every prediction is valid
for the config (the structured-output constraint binds), lists are sorted, offsets are exact.
"""
from __future__ import annotations

import httpx
import pytest
from label_studio_sdk.label_interface import LabelInterface

from tests.conftest import TINY_NAME, load_config, shipped_configs

pytestmark = pytest.mark.engine


def predict(client, xml, tasks, **extra):
    response = client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "1.1700000000", **extra})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_configs_get_valid_ranked_predictions(client, settings, name):
    xml, tasks = load_config(name)
    interface = LabelInterface(xml)
    results = predict(client, xml, tasks)
    assert len(results) == len(tasks) == 3
    for task, predictions in zip(tasks, results):
        assert isinstance(predictions, list)
        assert 1 <= len(predictions) <= settings.candidates
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        for prediction in predictions:
            assert prediction["model_version"] == f"{TINY_NAME}-base"
            assert interface.validate_prediction({"result": prediction["result"]}), prediction
            for region in prediction["result"]:
                if region["type"] == "labels":
                    value = region["value"]
                    assert task["data"]["text"][value["start"] : value["end"]] == value["text"]


def test_candidates_are_distinct(client):
    xml, tasks = load_config("topics")
    for predictions in predict(client, xml, tasks):
        keys = [str(sorted(str(r) for r in p["result"])) for p in predictions]
        assert len(keys) == len(set(keys))


def test_closed_label_sets_are_scored_exhaustively_and_deterministically(client):
    xml, tasks = load_config("sentiment")
    first = predict(client, xml, tasks)
    second = predict(client, xml, tasks)
    assert first == second
    for predictions in first:
        labels = {p["result"][0]["value"]["choices"][0] for p in predictions}
        assert labels == {"Positive", "Negative", "Neutral"}  # every option scored, none missing
        assert abs(sum(p["score"] for p in predictions) - 1.0) < 1e-3


def test_rating_is_enumerated_from_one(client):
    xml = '<View><Text name="t" value="$t"/><Rating name="stars" toName="t" maxRating="3"/></View>'
    predictions = predict(client, xml, [{"id": 1, "data": {"t": "fine"}}])[0]
    assert sorted(p["result"][0]["value"]["rating"] for p in predictions) == [1, 2, 3]


def test_structured_constraint_binds(client, engine_url):
    """Labels a random model would never write by chance: unconstrained it misses them, constrained it can't."""
    labels = ["zq-Alpha-7", "xv Beta_9", "ww.Gamma"]
    choices = "".join(f'<Choice value="{label}"/>' for label in labels)
    xml = f'<View><Text name="t" value="$t"/><Choices name="c" toName="t" choice="multiple">{choices}</Choices></View>'
    tasks = [{"id": i, "data": {"t": f"sample text number {i}"}} for i in range(3)]
    results = predict(client, xml, tasks, params={"extra_params": {"candidates": 8}})
    seen = set()
    for predictions in results:
        assert predictions, "constrained sampling must yield at least one valid candidate"
        for prediction in predictions:
            for region in prediction["result"]:
                assert set(region["value"]["choices"]) <= set(labels)
                seen.update(region["value"]["choices"])
    assert seen, "the model never picked a label"

    # Same prompt without the constraint: the random model's free text is not a valid answer.
    unconstrained = httpx.post(
        f"{engine_url}/v1/chat/completions",
        json={"model": TINY_NAME, "messages": [{"role": "user", "content": "pick"}], "n": 8, "max_tokens": 30, "temperature": 1.0},
        timeout=60,
    ).json()
    texts = [choice["message"]["content"] for choice in unconstrained["choices"]]
    assert not any(label in text for text in texts for label in labels)


def test_several_controls_in_one_config(client):
    xml = """<View><Text name="text" value="$text"/>
      <Choices name="topic" toName="text" choice="multiple"><Choice value="Sport"/><Choice value="Politics"/></Choices>
      <Rating name="quality" toName="text" maxRating="5"/>
      <Number name="people" toName="text" min="0" max="100"/>
      <Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/></Labels>
      <TextArea name="note" toName="text"/></View>"""
    tasks = [{"id": 1, "data": {"text": "Maria Lopez ran the Berlin marathon with 40000 others."}}]
    interface = LabelInterface(xml)
    predictions = predict(client, xml, tasks)[0]
    assert predictions
    for prediction in predictions:
        assert interface.validate_prediction({"result": prediction["result"]})
        names = {r["from_name"] for r in prediction["result"]}
        assert {"quality", "people", "note"} <= names


def test_candidate_count_follows_setup_extra_params(client):
    xml, tasks = load_config("summary")
    setup = client.post("/setup", json={"project": 1, "schema": xml, "extra_params": '{"candidates": 2}'})
    assert setup.status_code == 200 and setup.get_json()["model_version"] == f"{TINY_NAME}-base"
    for predictions in predict(client, xml, tasks):
        assert 1 <= len(predictions) <= 2


def test_metrics_move_with_traffic(client):
    def value(name):
        for line in client.get("/metrics").get_data(as_text=True).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    before = value("dataengine_candidates_total")
    xml, tasks = load_config("sentiment")
    predict(client, xml, tasks)
    text = client.get("/metrics").get_data(as_text=True)
    assert value("dataengine_candidates_total") >= before + 3
    assert 'dataengine_request_latency_seconds_count{endpoint="predict"}' in text
    assert "dataengine_invalid_candidates_total" in text


@pytest.mark.parametrize("name", ["ner", "topics"])
def test_the_greedy_answer_is_among_the_candidates(client, settings, engine_url, name):
    """One candidate is the model's greedy answer (temperature 0), asked of the engine directly here; the
    others are samples. Fails if every candidate is sampled (the random tiny model's samples differ from it)."""
    from backend.candidates import canonical_key
    from backend.engine_client import EngineClient
    from backend.label_config import compile_label_config
    from backend.prompts import build_messages

    xml, tasks = load_config(name)
    config = compile_label_config(xml, settings=settings)
    engine = EngineClient(engine_url, TINY_NAME)
    checked = 0
    for task in tasks:
        texts = config.read_task(task, settings.max_text_chars)
        [greedy] = engine.sample(build_messages(config, texts), config.schema(texts), n=1, temperature=0.0,
                                 max_tokens=min(settings.max_new_tokens, config.max_answer_chars(texts) + 8))
        if greedy.finish_reason == "length":
            continue  # a truncated answer is never a candidate
        [predictions] = predict(client, xml, [task])
        assert canonical_key(config.parse(greedy.text, texts)) in {canonical_key(p["result"]) for p in predictions}
        [only] = predict(client, xml, [task], params={"extra_params": {"candidates": 1}})
        assert [p["result"] for p in only] == [config.parse(greedy.text, texts)]
        checked += 1
    assert checked
