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


# --- fail closed (issue 15, point 5) -------------------------------------------------------------------


@pytest.mark.parametrize("user, password", [("", "s3cret"), ("ls", "")])
def test_half_a_credential_is_refused(tmp_path, user, password):
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        make_settings(tmp_path, basic_auth_user=user, basic_auth_pass=password)


@pytest.mark.parametrize("variable", ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"])
def test_serve_refuses_to_start_with_half_a_credential(tmp_path, variable):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", variable: "only-me",
           "DATAENGINE_ENGINE_URL": "http://127.0.0.1:9", "MODEL_DIR": str(tmp_path), "DATAENGINE_RUN_WORKER": "0"}
    done = subprocess.run([sys.executable, "-m", "dataengine", "serve"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in done.stderr and "only-me" not in done.stdout + done.stderr


STATE_CHANGING = ["/setup", "/predict", "/webhook", "/prelabel"]


@pytest.mark.parametrize("path", STATE_CHANGING)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_state_changing_routes_need_a_json_content_type(tmp_path, path, content_type):
    """A cross-site <form enctype="text/plain"> can POST a JSON-looking body, but never as application/json."""
    client = create_app(make_settings(tmp_path), engine=EngineClient("http://127.0.0.1:9", "tiny")).test_client()
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(path, data=b'{"project": 1, "force": true, "x": "="}', headers=headers)
    assert response.status_code == 415, response.get_data(as_text=True)
    assert "application/json" in response.get_json()["error"]


def test_json_with_a_charset_is_accepted(tmp_path):
    client = create_app(make_settings(tmp_path), engine=EngineClient("http://127.0.0.1:9", "tiny")).test_client()
    response = client.post("/predict", data=b"{}", headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 400 and "'tasks'" in response.get_json()["error"]


def test_serve_without_auth_warns_loudly(tmp_path):
    from tests.conftest import run_backend

    log_path = tmp_path / "serve.log"
    with run_backend("http://127.0.0.1:9", tmp_path / "model_dir", log_path, {"BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": ""}):
        pass
    assert "WARNING" in log_path.read_text() and "no authentication" in log_path.read_text()
