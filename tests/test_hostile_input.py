"""Hostile input gets a 4xx naming the problem, never a 5xx: the cases a fuzz run found (issue 15, point 3),
through the real Flask app with the real engine and a real Redis database. The property-based fuzz test over
every route is tests/test_fuzz.py."""
from __future__ import annotations

import pytest

from backend.app import create_app
from backend.images import ImageError, ImageFetcher, ImageLimits, LabelStudioAccess
from tests.conftest import flushed_redis, load_config, make_settings, redis_db

pytestmark = pytest.mark.engine

REDIS_URL = redis_db(14)  # this file's own database (tests/test_fuzz.py shares it), flushed per test
SENTIMENT, SENTIMENT_TASKS = load_config("sentiment")
IMAGE_CHOICES, _ = load_config("image_classification")


@pytest.fixture
def client(tmp_path, engine_url):
    with flushed_redis(REDIS_URL):
        app = create_app(make_settings(tmp_path / "model_dir", engine_url, redis_url=REDIS_URL))
        yield app.test_client()
        app.extensions["dataengine"].predictor.close()


def nested(depth: int) -> bytes:
    return b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook", "/prelabel"])
def test_deeply_nested_json_is_400(client, path):
    response = client.post(path, data=nested(100_000), content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert "nested" in response.get_json()["error"]


@pytest.mark.parametrize(
    "path, body, named",
    [
        ("/setup", {"project": 3, "schema": 12}, "'schema'"),
        ("/setup", {"project": 3, "schema": ["<View/>"]}, "'schema'"),
        ("/setup", {"project": 3, "label_config": {"a": 1}}, "'label_config'"),
        ("/setup", {"project": 3, "schema": SENTIMENT, "hostname": 5}, "'hostname'"),
        ("/setup", {"project": 3, "schema": SENTIMENT, "access_token": ["x"]}, "'access_token'"),
        ("/predict", {"tasks": SENTIMENT_TASKS, "label_config": 12}, "'label_config'"),
        ("/predict", {"tasks": SENTIMENT_TASKS, "label_config": ["<View/>"]}, "'label_config'"),
        ("/predict", {"tasks": SENTIMENT_TASKS, "label_config": SENTIMENT, "project": {"id": 1}}, "'project'"),
        ("/predict", {"tasks": SENTIMENT_TASKS, "label_config": SENTIMENT, "params": {"extra_params": 5}}, "extra_params"),
        ("/webhook", {"action": ["ANNOTATION_CREATED"], "project": 1}, "'action'"),
        ("/prelabel", {"project": 1.5}, "'project'"),
    ],
)
def test_wrong_types_are_400_naming_the_field(client, path, body, named):
    response = client.post(path, json=body)
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)
    assert named in response.get_json()["error"]


@pytest.mark.parametrize("job_id", ["1;DROP", "a b", "ü"])
def test_malformed_job_id_is_400(client, job_id):
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert "job id" in response.get_json()["error"]


BAD_URLS = [
    ("http://example.com:99999/a.png", "Port out of range"),
    ("http://[x/a.png", "not a valid URL"),
    ("http://127.0.0.1/a\t.png", "not a valid URL"),
    ("http://127.0.0.1/" + "a" * 70_000, "not a valid URL"),
    ("http://:80/a.png", "not a valid URL"),
]


@pytest.mark.parametrize("url, words", BAD_URLS, ids=["port", "bracket", "tab", "64KB", "no host"])
@pytest.mark.parametrize("allow_private", [False, True])
def test_malformed_image_urls_are_422(url, words, allow_private):
    fetcher = ImageFetcher(ImageLimits(allow_private=allow_private, timeout=2))
    with pytest.raises(ImageError) as err:
        fetcher.prepare(url, LabelStudioAccess(), "task 1 image 'image'")
    assert err.value.status == 422 and words in err.value.message, err.value.message


def test_malformed_image_url_in_a_predict_is_a_4xx_for_that_task(client):
    tasks = [{"id": 1, "data": {"image": "http://example.com:99999/a.png"}}, {"id": 2, "data": {"image": "http://[x"}}]
    response = client.post("/predict", json={"tasks": tasks, "label_config": IMAGE_CHOICES})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert [e["task"] for e in response.get_json()["errors"]] == [1, 2]
