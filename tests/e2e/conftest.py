"""Session fixtures for the end-to-end tests: ONE real Label Studio 1.23.2 server, the tiny vLLM engine
(`engine_url` from tests/conftest.py) and our backend as a real granian process (`dataengine serve`),
wired the way the README's "Connect to Label Studio" section tells a user to.

Everything the tests check goes through Label Studio's REST API (legacy `Token` auth); our backend's own
endpoints are only read to compare what it returns with what Label Studio stored.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.conftest import TINY_NAME, load_config, redis_db, run_backend
from tests.e2e.label_studio_harness import LabelStudioServer, ensure_label_studio_venv, tail

BASE_VERSION = f"{TINY_NAME}-base"  # the model_version our backend serves before any training
CANDIDATES = 4  # DATAENGINE_CANDIDATES for the backend under test: the most predictions per task
# A Redis database of the e2e tests' own (test_webhook.py uses 13). Events are told apart from older
# sessions' by their received_at, never by flushing: Label Studio's ids restart at 1 in every session.
REDIS_URL = os.environ.get("DATAENGINE_TEST_REDIS_URL", redis_db(12))
BASIC_AUTH = ("annotator-bot", "e2e-basic-secret")
RETRIEVE_ALL = {"selectedItems": {"all": True, "excluded": []}}


@dataclass
class Backend:
    url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return f"--- backend log {self.log_path} (tail) ---\n{tail(self.log_path, lines)}"


@dataclass
class Project:
    """A Label Studio project with our backend connected and the config's 3 sample tasks imported."""

    name: str
    label_config: str
    id: int
    ml_backend: dict[str, Any]  # Label Studio's answer to POST /api/ml
    task_ids: list[int]
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> task as Label Studio serves it


@pytest.fixture(scope="session")
def label_studio_launched() -> LabelStudioServer:
    """Label Studio's process, started but maybe still booting (about 30 s); see `label_studio`."""
    ensure_label_studio_venv()
    server = LabelStudioServer()
    try:
        yield server.launch()
    finally:
        server.stop()


def backend_env(label_studio: LabelStudioServer, **overrides: str) -> dict[str, str]:
    """The backend's environment as the README's "Connect to Label Studio" section sets it."""
    return {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "BASIC_AUTH_USER": "",  # Label Studio connects with auth_method NONE unless a test sets these
        "BASIC_AUTH_PASS": "",
        "DATAENGINE_WEBHOOK_SECRET": "",  # the webhook Label Studio creates carries no custom header
        "DATAENGINE_CANDIDATES": str(CANDIDATES),
        "REDIS_URL": REDIS_URL,
        "DATAENGINE_RUN_WORKER": "0",  # no training here: a few annotations never reach the trigger
        **overrides,
    }


@pytest.fixture(scope="session")
def backend(engine_url, label_studio_launched, tmp_path_factory) -> Backend:
    """`dataengine serve` attached to the session's engine, configured as the README says."""
    log_path = tmp_path_factory.mktemp("e2e-backend-log") / "serve.log"
    # The default two HTTP workers: the closed-set calibration estimate is shared in Redis
    # (backend/calibration.py), so the interactive test's score matches the batch-retrieved one whichever answers.
    env = backend_env(label_studio_launched)
    with run_backend(engine_url, tmp_path_factory.mktemp("e2e-model-dir"), log_path, env) as (url, _proc):
        yield Backend(url, log_path)


@pytest.fixture(scope="session")
def basic_auth_backend(engine_url, label_studio, tmp_path_factory) -> Backend:
    """A second backend, protected with BASIC_AUTH_USER/BASIC_AUTH_PASS (credentials: BASIC_AUTH)."""
    log_path = tmp_path_factory.mktemp("e2e-basic-auth-log") / "serve.log"
    env = backend_env(label_studio, BASIC_AUTH_USER=BASIC_AUTH[0], BASIC_AUTH_PASS=BASIC_AUTH[1])
    with run_backend(engine_url, tmp_path_factory.mktemp("e2e-basic-auth-model-dir"), log_path, env) as (url, _proc):
        yield Backend(url, log_path)


@pytest.fixture(scope="session")
def label_studio(label_studio_launched, backend) -> LabelStudioServer:
    """The running Label Studio server. Depends on `backend` so that our backend (and the engine fixture)
    start while Label Studio boots, instead of after it."""
    return label_studio_launched.wait_ready()


@pytest.fixture(scope="session")
def ls(label_studio) -> httpx.Client:
    """Label Studio's REST API."""
    with label_studio.client() as client:
        yield client


@pytest.fixture(scope="session")
def ls_project(ls, backend, label_studio) -> Callable[[str], Project]:
    """`ls_project("sentiment")`: the connected project for a shipped config, created once per session
    and shared by the tests (predictions are retrieved once when it is created)."""
    projects: dict[str, Project] = {}

    def get(name: str) -> Project:
        if name not in projects:
            project = create_connected_project(ls, backend.url, name)
            retrieve_predictions(ls, project.id)
            projects[name] = project
        return projects[name]

    return get


# --- Label Studio REST helpers ----------------------------------------------------------------------


def expect(response: httpx.Response, status: int, what: str) -> Any:
    assert response.status_code == status, f"{what}: HTTP {response.status_code}: {response.text[:2000]}"
    return response.json() if response.content else None


def create_project(ls: httpx.Client, name: str) -> dict[str, Any]:
    xml, _ = load_config(name)
    return expect(ls.post("/api/projects", json={"title": f"e2e {name}", "label_config": xml}), 201, "create project")


def connect_ml_backend(ls: httpx.Client, project_id: int, backend_url: str, **options: Any) -> httpx.Response:
    """Settings → Model → Connect Model (Name, Backend URL, Interactive preannotations, auth options)."""
    body = {"url": backend_url, "project": project_id, "title": "dataengine", "is_interactive": True, **options}
    return ls.post("/api/ml", json=body)


def create_connected_project(ls: httpx.Client, backend_url: str, name: str, **ml_options: Any) -> Project:
    """Create a project with the shipped config, connect our backend and import the config's sample tasks."""
    xml, tasks = load_config(name)
    project = create_project(ls, name)
    ml_backend = expect(
        connect_ml_backend(ls, project["id"], backend_url, **ml_options),
        201,
        f"connect the ML backend {backend_url} to project {project['id']}",
    )
    imported = expect(
        ls.post(f"/api/projects/{project['id']}/import", json=[{"data": t["data"]} for t in tasks]), 201, "import tasks"
    )
    assert imported["task_count"] == len(tasks), imported
    listed = expect(ls.get("/api/tasks", params={"project": project["id"], "page_size": 100}), 200, "list tasks")["tasks"]
    by_id = {task["id"]: task for task in listed}
    assert len(by_id) == len(tasks), listed
    return Project(name, xml, project["id"], ml_backend, sorted(by_id), by_id)


def retrieve_predictions(ls: httpx.Client, project_id: int) -> None:
    """Data Manager → select all → Actions → Retrieve Predictions. Its answer ("Retrieved N predictions")
    is not evidence of anything: callers check the stored predictions."""
    expect(
        ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id}, json=RETRIEVE_ALL),
        200,
        "retrieve predictions",
    )


def stored_predictions(ls: httpx.Client, task_id: int) -> list[dict[str, Any]]:
    """The predictions Label Studio stored for a task, in the order it stored them."""
    predictions = expect(ls.get("/api/predictions", params={"task": task_id}), 200, f"predictions of task {task_id}")
    assert all(p["task"] == task_id for p in predictions), predictions
    return sorted(predictions, key=lambda p: p["id"])


def backend_events(backend_url: str, project_id: int, auth: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """The webhook events our backend recorded for a project (GET /events)."""
    params = {"project": project_id, "limit": 1000}
    response = httpx.get(f"{backend_url}/events", params=params, auth=auth, timeout=10)
    assert response.status_code == 200, f"GET /events: HTTP {response.status_code}: {response.text[:500]}"
    return response.json()["events"]


def event_annotation_ids(event: dict[str, Any]) -> set[int]:
    """Annotation ids of one recorded event: `annotation_id`, or `annotation_ids` as a list or its JSON text."""
    if event.get("annotation_id") not in (None, ""):
        return {int(event["annotation_id"])}
    ids = event.get("annotation_ids") or []
    if isinstance(ids, str):
        ids = json.loads(ids)
    return {int(i) for i in ids}


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll `condition` until it returns something truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
