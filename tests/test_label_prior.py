"""The project's label prior (backend/label_prior.py): counted from webhooks in the REAL Redis, used by /predict
on the REAL tiny vLLM engine for closed label sets of the untrained model."""
from __future__ import annotations

import math

import pytest

from backend.app import create_app
from backend.label_config import compile_label_config
from backend.label_prior import LabelPriors, PriorUpdate, chosen_labels, label_prior_key, log_prior, update_from_export
from backend.registry import ServingVersion
from tests.conftest import flushed_redis, load_config, make_settings, redis_db

REDIS_URL = redis_db(2)  # a database of its own, flushed per test
PROJECT = 31


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


def backend(tmp_path, engine_url):
    app = create_app(make_settings(tmp_path / "model_dir", engine_url, redis_url=REDIS_URL))
    yield app.test_client()
    app.extensions["dataengine"].predictor.close()


@pytest.fixture
def webhooks(tmp_path, redis):
    yield from backend(tmp_path, "http://127.0.0.1:9")  # /webhook never calls the engine; a closed port proves it


@pytest.fixture
def client(tmp_path, engine_url, redis):
    yield from backend(tmp_path, engine_url)


def choice(label, name="sentiment"):
    return [{"from_name": name, "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def annotated(client, annotation_id, label, action="ANNOTATION_CREATED", **extra):
    body = {"action": action, "project": {"id": PROJECT}, "task": {"id": 1000 + annotation_id},
            "annotation": {"id": annotation_id, "task": 1000 + annotation_id, "result": choice(label), **extra}}
    response = client.post("/webhook", json=body)
    assert response.status_code == 200, response.get_json()


def counts(redis):
    return dict(LabelPriors(redis).counts(str(PROJECT)).get("sentiment", {}))


def test_webhooks_keep_one_entry_per_annotation(webhooks, redis):
    client = webhooks
    for annotation_id, label in [(1, "Positive"), (2, "Positive"), (3, "Negative"), (4, "Neutral")]:
        annotated(client, annotation_id, label)
    assert counts(redis) == {"Positive": 2, "Negative": 1, "Neutral": 1}

    annotated(client, 2, "Negative", action="ANNOTATION_UPDATED")  # an edit replaces, never adds
    annotated(client, 4, "Neutral", was_cancelled=True)  # a skipped task chose nothing
    assert counts(redis) == {"Positive": 1, "Negative": 2}

    response = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": PROJECT, "annotations": [{"id": 3}]})
    assert response.status_code == 200
    assert counts(redis) == {"Positive": 1, "Negative": 1}
    assert redis.hlen(label_prior_key(str(PROJECT))) == 2


def test_past_the_cap_new_annotations_are_not_counted_but_known_ones_still_change(redis, monkeypatch):
    monkeypatch.setattr("backend.label_prior.MAX_ANNOTATIONS", 2)
    priors = LabelPriors(redis)
    priors.apply(PriorUpdate("8", {1: {"s": ["A"]}, 2: {"s": ["A"]}, 3: {"s": ["B"]}}))
    assert priors.counts("8") == {"s": {"A": 2}}
    priors.apply(PriorUpdate("8", {2: {"s": ["B"]}, 1: None}))
    assert priors.counts("8") == {"s": {"B": 1}}


def exported(*annotations):
    """Label Studio's export of tasks, one annotation each: (annotation id, label, extra fields)."""
    return [{"id": 1000 + i, "annotations": [{"id": i, "result": choice(label), **extra}]} for i, label, extra in annotations]


def test_a_round_syncs_the_counts_with_the_export_webhooks_missed(redis):
    """What Label Studio holds wins: an edit and a create whose webhooks were lost count as exported, a delete
    whose webhook was lost is forgotten, a skipped annotation counts nothing, and an annotation created after
    the export was read (a larger id than any exported) keeps its webhook's count."""
    priors = LabelPriors(redis)
    priors.apply(PriorUpdate("5", {1: {"sentiment": ["Positive"]}, 2: {"sentiment": ["Negative"]},
                                   4: {"sentiment": ["Neutral"]}, 9: {"sentiment": ["Neutral"]}}))
    export = exported((1, "Negative", {}), (3, "Positive", {}), (4, "Neutral", {"was_cancelled": True}), (5, "Positive", {}))
    priors.sync_from_export("5", export)
    assert priors.counts("5") == {"sentiment": {"Negative": 1, "Positive": 2, "Neutral": 1}}
    assert sorted(int(k) for k in redis.hkeys(label_prior_key("5"))) == [1, 3, 5, 9]

    redis.flushdb()  # this Redis keeps nothing on disk: a restart loses the counts, the next round restores them
    priors.sync_from_export("5", export)
    assert priors.counts("5") == {"sentiment": {"Negative": 1, "Positive": 2}}
    priors.sync_from_export("5", export)  # syncing again changes nothing
    assert priors.counts("5") == {"sentiment": {"Negative": 1, "Positive": 2}}


def test_a_large_export_is_synced_in_chunks(redis, monkeypatch):
    monkeypatch.setattr("backend.label_prior.APPLY_CHUNK", 7)
    priors = LabelPriors(redis)
    priors.sync_from_export("6", exported(*[(i, "Positive" if i % 3 else "Negative", {}) for i in range(1, 51)]))
    assert priors.counts("6") == {"sentiment": {"Positive": 34, "Negative": 16}}


def test_hostile_exports_are_skipped_not_counted():
    tasks = [None, {"annotations": None}, {"annotations": [None, {"id": True}, {"id": "7"}, {"id": 8, "result": "x"}]},
             {"annotations": [{"id": 2, "result": choice("Positive")}]}]
    assert update_from_export("1", tasks, counted=[1, 9]).entries == {8: None, 2: {"sentiment": ["Positive"]}, 1: None}


def test_hostile_results_are_skipped_not_counted():
    hostile = [
        {"from_name": "sentiment", "value": {"choices": "Positive"}},  # not a list
        {"from_name": ["x"], "value": {"choices": ["Positive"]}},
        {"from_name": "sentiment", "value": {"choices": [{"nested": 1}, True, None, "x" * 10_000]}},
        {"from_name": "stars", "value": {"rating": True}},
        "not a region", None, {"value": None},
        {"from_name": "sentiment", "value": {"choices": ["Negative", "Negative"]}},
        {"from_name": "stars", "value": {"rating": 4}},
    ]
    assert chosen_labels(hostile) == {"sentiment": ["Negative"], "stars": ["4"]}
    assert chosen_labels({"choices": ["Positive"]}) == {}
    assert chosen_labels(None) == {}


def test_the_prior_is_smoothed_and_uniform_without_annotations():
    assert log_prior(None, ["Positive", "Negative"]) is None
    prior = log_prior({"Positive": 8}, ["Positive", "Negative", "Neutral"])
    assert [round(math.exp(p), 4) for p in prior] == [round(9 / 11, 4), round(1 / 11, 4), round(1 / 11, 4)]
    assert log_prior({"4": 3}, [1, 2, 3, 4, 5])[3] == max(log_prior({"4": 3}, [1, 2, 3, 4, 5]))  # ratings by their text


def test_a_trained_adapter_does_not_read_the_prior(redis):
    priors = LabelPriors(redis)
    priors.apply(PriorUpdate("9", {1: {"sentiment": ["Negative"]}}))
    xml, _ = load_config("sentiment")
    config = compile_label_config(xml)
    assert priors.for_prediction("9", config, ServingVersion("base"), 16) == {"sentiment": {"Negative": 1}}
    assert priors.for_prediction("9", config, ServingVersion("v2", adapter="v2", adapter_path="/x"), 16) == {}
    ner = compile_label_config(load_config("ner")[0])
    assert priors.for_prediction("9", ner, ServingVersion("base"), 16) == {}


def negative_scores(results):
    return [next(p["score"] for p in ranked if p["result"][0]["value"]["choices"] == ["Negative"]) for ranked in results]


def test_predict_on_the_untrained_model_follows_the_projects_prior(client):
    """The tiny random model's calibrated scores order the options by chance; once a project's annotators chose
    Negative 40 times out of 41, Negative is on top for most tasks (the prior's share) and scored higher than
    before on every one."""
    xml, tasks = load_config("sentiment")
    predict = {"tasks": tasks, "label_config": xml, "project": f"{PROJECT}.1700000000"}
    before = client.post("/predict", json=predict).get_json()["results"]

    for annotation_id in range(1, 41):
        annotated(client, annotation_id, "Negative")
    annotated(client, 41, "Positive")
    after = client.post("/predict", json=predict).get_json()["results"]
    on_top = [ranked[0]["result"][0]["value"]["choices"] == ["Negative"] for ranked in after]
    assert sum(on_top) >= len(after) - 1
    assert all(a > b for a, b in zip(negative_scores(after), negative_scores(before)))
    assert all(len(ranked) == len(b) for ranked, b in zip(after, before))
