"""Optional basic auth (BASIC_AUTH_USER/PASS)."""
from __future__ import annotations

import base64

import pytest

from backend.app import create_app
from backend.engine_client import EngineClient
from tests.conftest import make_settings


@pytest.fixture
def secured(tmp_path):
    # No engine needed: auth is checked before any route runs; /health reports the engine DEGRADED.
    settings = make_settings(tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret")
    return create_app(settings, engine=EngineClient("http://127.0.0.1:9", "tiny")).test_client()


def header(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_protected_endpoints_need_credentials(secured):
    assert secured.post("/predict", json={}).status_code == 401
    assert secured.post("/setup", json={}, headers=header("ls", "wrong")).status_code == 401
    assert secured.get("/metrics").status_code == 401


def test_right_credentials_reach_the_route(secured):
    response = secured.post("/predict", json={}, headers=header("ls", "s3cret"))
    assert response.status_code == 400 and "'tasks'" in response.get_json()["error"]


def test_health_stays_open_for_probes(secured):
    response = secured.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "DEGRADED"  # nothing listens on the engine URL


def test_unreachable_engine_is_503_with_a_message(tmp_path):
    app = create_app(make_settings(tmp_path), engine=EngineClient("http://127.0.0.1:9", "tiny"))
    xml = '<View><Text name="t" value="$t"/><TextArea name="s" toName="t"/></View>'
    response = app.test_client().post("/predict", json={"tasks": [{"data": {"t": "x"}}], "label_config": xml})
    assert response.status_code == 503
    assert "unreachable" in response.get_json()["error"]
