"""A Label Studio token only ever goes to the Label Studio it came with (issue 15, point 6).

Two real local HTTP servers (tests/test_images.py's ImageHost, which records every request's Authorization
header) stand in for Label Studio and for "elsewhere"; the app is the real one. The engine is never reached
(a closed port): the image fetch, where the token would leak, happens before it.
"""
from __future__ import annotations

import threading

import pytest

from backend.app import create_app
from backend.engine_client import EngineClient
from tests.conftest import TINY_NAME, free_port, load_config, make_settings
from tests.test_images import TOKEN, ImageHost

IMAGE_CHOICES, _ = load_config("image_classification")
UPLOAD_TASK = {"id": 1, "data": {"image": "/data/upload/3/cat.png"}}


def serve(server: ImageHost):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hosts():
    label_studio, elsewhere = serve(ImageHost()), serve(ImageHost())
    yield label_studio, elsewhere
    for server in (label_studio, elsewhere):
        server.shutdown()
        server.server_close()


def app_client(tmp_path, **overrides):
    settings = make_settings(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0", **overrides)
    return create_app(settings, engine=EngineClient("http://127.0.0.1:9", TINY_NAME)).test_client()


def tokens_seen(server: ImageHost) -> set[str]:
    return {auth for _, auth in server.seen_auth if auth}


def test_setup_naming_another_host_does_not_take_the_stored_token_along(tmp_path, hosts):
    label_studio, elsewhere = hosts
    client = app_client(tmp_path, allow_private_urls=True)  # both servers are on loopback
    setup = {"project": 3, "schema": IMAGE_CHOICES, "hostname": label_studio.url, "access_token": TOKEN}
    assert client.post("/setup", json=setup).status_code == 200
    client.post("/predict", json={"tasks": [UPLOAD_TASK], "label_config": IMAGE_CHOICES, "project": "3.1"})
    assert f"Token {TOKEN}" in tokens_seen(label_studio)  # the token works where it came from
    assert client.post("/setup", json={"project": 3, "hostname": elsewhere.url}).status_code == 200
    client.post("/predict", json={"tasks": [UPLOAD_TASK], "label_config": IMAGE_CHOICES, "project": "3.1"})
    assert ("/data/upload/3/cat.png", None) in elsewhere.seen_auth  # fetched there, without a token
    assert tokens_seen(elsewhere) == set()


def test_configured_api_key_never_goes_to_a_host_from_setup(tmp_path, hosts):
    _, elsewhere = hosts
    client = app_client(tmp_path, allow_private_urls=True, label_studio_api_key="configured-key-42")
    assert client.post("/setup", json={"project": 3, "schema": IMAGE_CHOICES, "hostname": elsewhere.url}).status_code == 200
    client.post("/predict", json={"tasks": [UPLOAD_TASK], "label_config": IMAGE_CHOICES, "project": "3.1"})
    assert elsewhere.seen_auth, "the backend should still have tried the /setup host (without the key)"
    assert tokens_seen(elsewhere) == set()


def test_instructions_fetch_from_a_setup_host_goes_through_the_ssrf_guard(tmp_path, hosts):
    label_studio, _ = hosts
    client = app_client(tmp_path)  # DATAENGINE_ALLOW_PRIVATE_URLS off, no LABEL_STUDIO_URL
    setup = {"project": 3, "schema": IMAGE_CHOICES, "hostname": label_studio.url, "access_token": TOKEN}
    assert client.post("/setup", json=setup).status_code == 200  # instructions are best effort
    assert label_studio.seen_auth == []  # loopback: never contacted
