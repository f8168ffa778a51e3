"""Bad input to /setup and /predict gets a 4xx naming the problem, through the real HTTP server (granian),
and the process stays up and keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import TINY_NAME, load_config, run_backend

pytestmark = pytest.mark.engine

SENTIMENT, SENTIMENT_TASKS = load_config("sentiment")


@pytest.fixture(scope="module")
def server(engine_url, tmp_path_factory):
    """`dataengine serve` attached to the session's engine (DATAENGINE_ENGINE_URL), under granian."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    extra = {"DATAENGINE_MAX_TEXT_CHARS": "100000", "DATAENGINE_RUN_WORKER": "0"}
    with run_backend(engine_url, tmp_path_factory.mktemp("serve"), log, extra) as (url, proc):
        yield url, proc


def post(url, path, **kwargs):
    return httpx.post(url + path, timeout=60, **kwargs)


BAD_PREDICTS = [
    ("malformed JSON", {"content": b'{"tasks": [', "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("non-UTF-8", {"content": b'{"tasks": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}, 400, "UTF-8"),
    ("empty body", {"content": b""}, 400, "empty"),
    ("JSON array", {"json": [1, 2]}, 400, "JSON object"),
    ("missing tasks", {"json": {"label_config": SENTIMENT}}, 400, "'tasks'"),
    ("tasks not a list", {"json": {"tasks": "abc", "label_config": SENTIMENT}}, 400, "'tasks'"),
    ("missing label_config", {"json": {"tasks": SENTIMENT_TASKS, "project": "424242.1"}}, 400, "label_config"),
    (
        "unknown tag",
        {"json": {"tasks": SENTIMENT_TASKS, "label_config": '<View><Text name="t" value="$t"/><Taxonomy name="x" toName="t"><Choice value="a"/></Taxonomy></View>'}},
        422,
        "Taxonomy",
    ),
    ("task missing data field", {"json": {"tasks": [{"id": 9, "data": {"body": "hi"}}], "label_config": SENTIMENT}}, 422, "'text'"),
    ("task not an object", {"json": {"tasks": ["hello"], "label_config": SENTIMENT}}, 422, "JSON object"),
    ("1 MB text", {"json": {"tasks": [{"id": 1, "data": {"text": "a" * 1_000_000}}], "label_config": SENTIMENT}}, 413, "DATAENGINE_MAX_TEXT_CHARS"),
    ("bad project id", {"json": {"tasks": SENTIMENT_TASKS, "label_config": SENTIMENT, "project": "../../etc"}}, 400, "project"),
    ("bad candidates override", {"json": {"tasks": SENTIMENT_TASKS, "label_config": SENTIMENT, "params": {"extra_params": {"candidates": 0}}}}, 400, "candidates"),
]


@pytest.mark.parametrize("case, kwargs, status, message", BAD_PREDICTS, ids=[c[0] for c in BAD_PREDICTS])
def test_bad_predict_requests_get_clear_4xx(server, case, kwargs, status, message):
    url, proc = server
    response = post(url, "/predict", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert proc.poll() is None


BAD_SETUPS = [
    ("malformed JSON", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("non-UTF-8", {"content": b"\xc3\x28", "headers": {"Content-Type": "application/json"}}, 400, "UTF-8"),
    ("unknown tag", {"json": {"project": 3, "schema": '<View><Image name="i" value="$img"/><BrushLabels name="b" toName="i"><Label value="x"/></BrushLabels></View>'}}, 422, "BrushLabels"),
    ("broken XML", {"json": {"project": 3, "schema": "<View><Text"}}, 422, "not a valid Label Studio config"),
    ("bad extra_params", {"json": {"project": 3, "schema": SENTIMENT, "extra_params": "{oops"}}, 400, "extra_params"),
    ("candidates out of range", {"json": {"project": 3, "schema": SENTIMENT, "extra_params": {"candidates": 99}}}, 400, "candidates"),
]


@pytest.mark.parametrize("case, kwargs, status, message", BAD_SETUPS, ids=[c[0] for c in BAD_SETUPS])
def test_bad_setup_requests_get_clear_4xx(server, case, kwargs, status, message):
    url, proc = server
    response = post(url, "/setup", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_oversized_body_is_413_not_a_crash(server):
    url, _ = server
    response = post(url, "/predict", content=b"x" * (33 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_server_still_serves_after_bad_input(server):
    url, proc = server
    for case in BAD_PREDICTS[:3]:
        post(url, "/predict", **case[1])
    assert httpx.get(url + "/health", timeout=5).json()["status"] == "UP"
    response = post(url, "/predict", json={"tasks": SENTIMENT_TASKS, "label_config": SENTIMENT, "project": "5.1"})
    assert response.status_code == 200
    assert all(len(predictions) == 3 for predictions in response.json()["results"])
    metrics = httpx.get(url + "/metrics", timeout=5).text  # aggregated over both HTTP worker processes
    assert 'dataengine_requests_total{endpoint="predict",status="200"}' in metrics
    assert proc.poll() is None


def test_setup_returns_the_model_version_and_stores_overrides(server):
    url, _ = server
    response = post(url, "/setup", json={"project": 8, "schema": SENTIMENT, "extra_params": json.dumps({"candidates": 2})})
    assert response.status_code == 200
    assert response.json() == {"model_version": f"{TINY_NAME}-base"}
    predict = post(url, "/predict", json={"tasks": SENTIMENT_TASKS, "label_config": SENTIMENT, "project": "8.17"})
    assert [len(p) for p in predict.json()["results"]] == [2, 2, 2]  # another worker may answer: read from MODEL_DIR
