"""Limits on what one client can make the backend hold or do (issue 15, point 11): tasks per /predict, total
image fetch time, decoded image memory, caches keyed by client strings, and the number of projects.

Real parts: the Flask app, a real Redis database, a real local HTTP server for images (tests/test_images.py's
ImageHost); the engine is a closed port, since no test here may reach it."""
from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from backend.app import create_app
from backend.engine_client import EngineClient
from backend.images import ImageError, ImageFetcher, ImageLimits, ImageTooLarge, LabelStudioAccess
from backend.label_config import compile_label_config
from backend.projects import ProjectSettings, ProjectStore
from backend.ranking import is_comparison_config
from tests.conftest import TINY_NAME, flushed_redis, load_config, make_settings, redis_db
from tests.test_images import data_uri, encode

REDIS_URL = redis_db(6)  # this file's own database, flushed per test
SENTIMENT, _ = load_config("sentiment")
MB = 1024 * 1024


def app_client(tmp_path, **overrides):
    settings = make_settings(tmp_path, redis_url=REDIS_URL, **overrides)
    return create_app(settings, engine=EngineClient("http://127.0.0.1:9", TINY_NAME)).test_client()


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


# --- tasks per /predict ------------------------------------------------------------------------------------


def test_predict_with_more_tasks_than_the_cap_is_413_before_any_work(tmp_path):
    client = app_client(tmp_path, max_predict_tasks=50)
    tasks = [{"id": i, "data": {"text": "ok"}} for i in range(51)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": SENTIMENT})
    assert response.status_code == 413, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert "51 tasks" in error and "DATAENGINE_MAX_PREDICT_TASKS" in error and "prelabel" in error


# --- total image fetch time ---------------------------------------------------------------------------------


class _Drip(BaseHTTPRequestHandler):
    """Sends a PNG one byte every 0.2 s: each read is quick, the whole download is not."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = encode(Image.new("RGB", (8, 8)))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


@pytest.fixture
def drip_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_image_fetch_timeout_bounds_the_whole_download(drip_host):
    fetcher = ImageFetcher(ImageLimits(timeout=1.0, allow_private=True))
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        fetcher.prepare(drip_host + "/slow.png", LabelStudioAccess(), "task 1 image 'image'")
    assert time.monotonic() - started < 2.5
    assert err.value.status == 422 and "DATAENGINE_IMAGE_FETCH_TIMEOUT" in err.value.message


# --- decoded image memory -------------------------------------------------------------------------------------


def test_decoded_images_stay_within_the_memory_budget():
    image = data_uri(encode(Image.new("RGB", (200, 200), (10, 200, 30))))
    per_image = 200 * 200 * 8  # what the budget reserves for one 200x200 decode (see images.decoded_bytes)
    fetcher = ImageFetcher(ImageLimits(memory_budget=2 * per_image + 1))
    with ThreadPoolExecutor(8) as pool:
        prepared = list(pool.map(lambda i: fetcher.prepare(image, LabelStudioAccess(), f"task {i}"), range(32)))
    assert all(p.width == 200 for p in prepared)
    assert 0 < fetcher.budget.peak <= 2 * per_image + 1 and fetcher.budget.in_use == 0


def test_an_image_bigger_than_the_whole_budget_is_413():
    fetcher = ImageFetcher(ImageLimits(memory_budget=100_000))
    with pytest.raises(ImageTooLarge) as err:
        fetcher.prepare(data_uri(encode(Image.new("RGB", (200, 200)))), LabelStudioAccess(), "task 1 image 'image'")
    assert "DATAENGINE_IMAGE_MEMORY_BUDGET" in err.value.message


# --- caches keyed by client strings ---------------------------------------------------------------------------


def retained_bytes(work) -> int:
    """Memory still allocated after `work()` ran and its own references are gone."""
    gc.collect()
    tracemalloc.start()
    try:
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def padded_config(i: int, size: int) -> str:
    return SENTIMENT.replace("<View>", f'<View><Header value="{i}{"x" * size}"/>', 1)


def test_config_caches_hold_digests_not_megabytes_of_configs(tmp_path):
    def compile_many():
        settings = make_settings(tmp_path)
        for i in range(120):
            xml = padded_config(i, MB)
            is_comparison_config(xml)
            compile_label_config(xml, settings=settings)

    assert retained_bytes(compile_many) < 80 * MB  # the two caches' bounds; unbounded: 120 configs of 1 MB, twice


def test_project_settings_cache_is_bounded_by_bytes(tmp_path):
    store = ProjectStore(tmp_path / "projects")
    for i in range(80):
        store.save(str(i), ProjectSettings(label_config=padded_config(i, MB)))

    def read_all():
        reader = ProjectStore(tmp_path / "projects", cache_bytes=16 * MB)
        for i in range(80):
            assert reader.get(str(i)).label_config.startswith("<View>")
        read_all.reader = reader  # keep the store (and its cache) alive for the measurement

    assert retained_bytes(read_all) < 24 * MB


# --- number of projects ----------------------------------------------------------------------------------------


def test_setup_for_more_projects_than_the_cap_is_refused(tmp_path, redis):
    client = app_client(tmp_path, max_projects=3)
    for project in (1, 2, 3):
        assert client.post("/setup", json={"project": project, "schema": SENTIMENT}).status_code == 200
    refused = client.post("/setup", json={"project": 4, "schema": SENTIMENT})
    assert refused.status_code == 403 and "DATAENGINE_MAX_PROJECTS" in refused.get_json()["error"]
    assert not (tmp_path / "projects" / "4").exists()
    assert client.post("/setup", json={"project": 2, "schema": SENTIMENT}).status_code == 200  # known: still fine


def test_webhooks_for_more_projects_than_the_cap_are_refused(tmp_path, redis):
    client = app_client(tmp_path, max_projects=2)
    event = lambda project: {"action": "START_TRAINING", "project": project}  # noqa: E731
    assert [client.post("/webhook", json=event(p)).status_code for p in (1, 2, 1)] == [200, 200, 200]
    refused = client.post("/webhook", json=event(3))
    assert refused.status_code == 403 and "DATAENGINE_MAX_PROJECTS" in refused.get_json()["error"]
    assert redis.scard("dataengine:projects") == 2 and not redis.exists("dataengine:events:3")
