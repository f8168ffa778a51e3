"""/metrics after real traffic: webhook counters, the quality signal (did annotators keep the top
candidate?), RQ queue depth and training-job outcomes read from the REAL Redis on this machine.
/predict runs on the real tiny vLLM engine of the test session."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend import metrics, quality
from backend.queue import RedisBackoff, training_metrics_key
from backend.app import create_app
from backend.engine_client import EngineClient
from tests.conftest import flushed_redis, load_config, make_settings, redis_db

REDIS_URL = redis_db(10)  # its own database (e2e uses 11 and 12, test_webhook 13), flushed per test
DOWN_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


@pytest.fixture(autouse=True)
def single_process_metrics(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(quality, "_backoff", RedisBackoff())


def make_client(tmp_path, engine_url="http://127.0.0.1:9", **overrides):
    settings = make_settings(tmp_path, engine_url, redis_url=overrides.pop("redis_url", REDIS_URL), **overrides)
    app = create_app(settings, engine=EngineClient(engine_url, "tiny"))
    return app.test_client()


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def annotation(annotation_id: int, task: int, result: list, action="ANNOTATION_CREATED", **extra) -> dict:
    return {"action": action, "project": {"id": 7}, "task": {"id": task},
            "annotation": {"id": annotation_id, "task": task, "result": result, "parent_prediction": 1, **extra}}


@pytest.mark.engine
def test_metrics_after_predict_webhooks_queue_and_training(tmp_path, redis, engine_url):
    xml, tasks = load_config("sentiment")  # three tasks, ids 1..3, scored exhaustively (3 candidates each)
    client = make_client(tmp_path, engine_url, train_every=100)
    before = scrape(client)
    predicted = client.post("/predict", json={"tasks": tasks, "label_config": xml, "project": "7.1700000000"})
    assert predicted.status_code == 200, predicted.get_json()
    ranked = predicted.get_json()["results"]
    version = ranked[0][0]["model_version"]
    # Label Studio adds region ids and `origin`; the content is what counts.
    top = [{**region, "id": "r1", "origin": "prediction"} for region in ranked[0][0]["result"]]
    second = ranked[1][1]["result"]
    edited = [{**ranked[2][0]["result"][0], "value": {"choices": ["Neutral", "Negative"]}}]
    for payload in (
        annotation(1, 1, top),  # kept the top candidate
        annotation(2, 2, second),  # kept a lower-ranked candidate
        {"action": "ANNOTATIONS_CREATED", "project": 7, "annotation": [
            {"id": 3, "task": 3, "result": edited},  # edited
            {"id": 4, "task": 3, "result": [], "was_cancelled": True},  # skipped: not counted
        ]},
        annotation(5, 99, top),  # a task this backend never pre-annotated: not counted
        annotation(1, 1, second, action="ANNOTATION_UPDATED"),  # updates are not first choices
        {"action": "MADE_UP_ACTION", "project": 7},
        {"action": "START_TRAINING", "project": 7},  # enqueues a training job
    ):
        response = client.post("/webhook", json=payload)
        assert response.status_code == 200, response.get_json()
    metrics.record_training_job(redis, "promoted", 42.0)  # what the worker does after a round
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dataengine_webhook_events_total", action="ANNOTATION_CREATED") == 3
    assert delta("dataengine_webhook_events_total", action="ANNOTATIONS_CREATED") == 1
    assert delta("dataengine_webhook_events_total", action="other") == 1  # no series per made-up action
    assert delta("dataengine_webhook_events_total", action="MADE_UP_ACTION") == 0
    for outcome in ("top", "candidate", "edited"):
        assert delta("dataengine_annotations_total", project="7", model_version=version, outcome=outcome) == 1, outcome
    assert delta("dataengine_request_latency_seconds_count", endpoint="predict") == 1
    assert delta("dataengine_candidates_total") == 9
    assert value(after, "dataengine_redis_up") == 1
    assert value(after, "dataengine_queue_jobs", queue="dataengine-training", state="queued") == 1
    assert value(after, "dataengine_queue_jobs", queue="dataengine-training", state="failed") == 0
    assert value(after, "dataengine_queue_jobs", queue="dataengine-prelabel", state="queued") == 0
    assert value(after, "dataengine_queue_workers", queue="dataengine-training") == 0
    training = "dataengine_training_job_duration_seconds"
    assert value(after, training + "_count", outcome="promoted") == 1
    assert value(after, training + "_sum", outcome="promoted") == 42.0
    assert value(after, training + "_bucket", outcome="promoted", le="30.0") == 0
    assert value(after, training + "_bucket", outcome="promoted", le="60.0") == 1
    assert value(after, training + "_bucket", outcome="promoted", le="+Inf") == 1
    assert value(after, training + "_count", outcome="failed") == 0


def test_metrics_answer_when_redis_is_down(tmp_path):
    client = make_client(tmp_path, redis_url=DOWN_URL)
    samples = scrape(client)
    assert value(samples, "dataengine_redis_up") == 0
    assert not [key for key in samples if key[0].startswith(("dataengine_queue_", "dataengine_training_"))]


@pytest.mark.engine
def test_predict_does_not_stall_on_redis_when_it_is_down(tmp_path, caplog, engine_url):
    xml, tasks = load_config("sentiment")
    client = make_client(tmp_path, engine_url, redis_url=DOWN_URL)
    for _ in range(2):
        assert client.post("/predict", json={"tasks": tasks, "label_config": xml}).status_code == 200
    warnings = [r for r in caplog.records if "cannot record served candidates" in r.getMessage()]
    assert len(warnings) == 1  # the second /predict skipped Redis (backoff) instead of waiting on it


def test_fingerprint_ignores_region_ids_order_and_ui_fields():
    a = {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["Positive"]}}
    b = {"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": ["Sports"]}}
    assert quality.fingerprint([a, b]) == quality.fingerprint([{**b, "id": "x", "origin": "manual"}, {**a, "score": 0.3}])
    assert quality.fingerprint([a]) != quality.fingerprint([{**a, "value": {"choices": ["Negative"]}}])
    assert quality.fingerprint("not a list") == quality.fingerprint([])


def test_training_job_failures_are_recorded_by_the_worker_code(tmp_path, redis):
    from training.jobs import job_outcome, run_training_round

    settings = make_settings(tmp_path, redis_url=REDIS_URL)  # no Label Studio configured: the round fails
    with pytest.raises(RuntimeError, match="LABEL_STUDIO_URL"):
        run_training_round("7", "test", settings=settings)
    stored = redis.hgetall(training_metrics_key("failed"))
    assert stored[b"count"] == b"1" and float(stored[b"sum"]) >= 0
    assert job_outcome([{"learning": {"skipped": "few pairs"}}]) == "skipped"
    assert job_outcome([{"learning": {"promoted": True}}, {"learning": {"skipped": "no new feedback"}}]) == "promoted"
    assert job_outcome([{"learning": {"promoted": False}}]) == "rejected"
    with pytest.raises(ValueError):
        metrics.record_training_job(redis, "exploded", 1.0)
