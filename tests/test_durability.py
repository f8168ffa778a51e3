"""Leaks and durability (issue 15, point 12): Redis passwords never reach a log, settings and registry files
are on disk before they replace the old ones, a corrupt current.json never becomes a 500, and the Redis-backed
read routes answer 503 (not 500) while Redis is down."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from backend.app import create_app
from backend.engine_client import EngineClient
from backend.projects import atomic_write_json
from backend.registry import VersionReader
from tests.conftest import REPO, TINY_NAME, free_port, make_settings, run_backend
from training.registry import Registry

DEAD_ENGINE = "http://127.0.0.1:9"  # nothing listens: these tests never reach the engine
PASSWORD = "s3cr3t-redis-pw"


def app_client(tmp_path, **overrides):
    return create_app(make_settings(tmp_path, **overrides), engine=EngineClient(DEAD_ENGINE, TINY_NAME)).test_client()


@pytest.mark.parametrize("path", ["/events?project=1", "/jobs", "/jobs/train-1-2"])
def test_redis_backed_reads_answer_503_while_redis_is_down(tmp_path, path):
    response = app_client(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0").get(path)
    assert response.status_code == 503, response.get_data(as_text=True)
    assert "Redis is unreachable" in response.get_json()["error"]


def test_redis_password_stays_out_of_serve_and_worker_logs(tmp_path):
    redis_url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # unreachable: the worker reports it and exits
    log_path = tmp_path / "serve.log"
    env = {"REDIS_URL": redis_url, "DATAENGINE_RUN_WORKER": "1", "DATAENGINE_WORKERS": "1"}
    with run_backend(DEAD_ENGINE, tmp_path / "model_dir", log_path, env):
        pass
    worker = subprocess.run(
        [sys.executable, "-m", "dataengine", "worker"], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "REDIS_URL": redis_url},
    )
    logged = log_path.read_text() + worker.stdout + worker.stderr
    assert "starting the RQ worker" in logged and "unreachable" in worker.stderr, logged
    assert PASSWORD not in logged
    assert "redis://:***@127.0.0.1" in logged  # still says which server


def test_atomic_write_json_is_on_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """os.fsync and os.replace are spied on (they still run): the new file's data, then the rename itself."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "p" / "current.json"
    atomic_write_json(target, {"version": "v1"})
    assert json.loads(target.read_text()) == {"version": "v1"}
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    assert calls[0][1].startswith(str(target.parent / ".current.json."))  # the temporary file's data
    assert calls[2][1] == str(target.parent)  # the directory entry of the rename


def promoted_twice(projects_dir):
    registry = Registry(projects_dir, "3", TINY_NAME)
    versions = []
    for _ in range(2):
        name = registry.next_version_name()
        record = registry.create_version(name, registry.staging_dir(name), parent=None, snapshot_hash="h", metrics={})
        registry.promote(record, "better")
        versions.append(record)
    return versions


@pytest.mark.parametrize("content", ["", '{"version": "tiny-p3-v', "[]", '{"adapter": null}'])
def test_corrupt_current_json_serves_the_last_promoted_version(tmp_path, content):
    projects_dir = make_settings(tmp_path).projects_dir
    _, v2 = promoted_twice(projects_dir)
    (projects_dir / "3" / "current.json").write_text(content)
    assert VersionReader(projects_dir, TINY_NAME).current("3").name == v2.name
    client = app_client(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert client.post("/setup", json={"project": 3}).get_json() == {"model_version": v2.name}
    versions = client.get("/versions?project=3")
    assert versions.status_code == 200 and versions.get_json()["projects"]["3"]["current"] == v2.name


def test_corrupt_version_record_is_left_out_of_the_list(tmp_path):
    projects_dir = make_settings(tmp_path).projects_dir
    v1, v2 = promoted_twice(projects_dir)
    (projects_dir / "3" / "versions" / v1.name / "version.json").write_text("{trunc")
    assert [v["name"] for v in VersionReader(projects_dir, TINY_NAME).versions("3")] == [v2.name]
