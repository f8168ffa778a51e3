"""Pre-labelling against a real Label Studio 1.23.2 when things go wrong (issue 15, points 9 and 10): a task id
list far longer than fits in one URL, a proxy error after Label Studio stored an import (the SDK would retry
the POST and store it twice), and two runs of the same project at once. The engine is the session's real one;
Label Studio sits behind tests/e2e/http_fault_proxy.py, which forwards every request to it."""
from __future__ import annotations

import threading

import pytest
from redis import Redis

from backend.settings import Settings
from tests.conftest import TINY_NAME, redis_db
from tests.e2e.conftest import create_connected_project, stored_predictions
from tests.e2e.http_fault_proxy import HttpFaultProxy
from training.prelabel import PrelabelOptions, Prelabeler, run_prelabel

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

REDIS_URL = redis_db(5)  # this module's own database, flushed at start
LABELS = 3  # the sentiment config's closed set: one prediction per label and task


@pytest.fixture
def proxy(label_studio):
    server = HttpFaultProxy(label_studio.url)
    yield server
    server.close()


def settings_for(proxy: HttpFaultProxy, label_studio, engine_url: str, tmp_path) -> Settings:
    return Settings(
        label_studio_url=proxy.url, label_studio_api_key=label_studio.token, engine_url=engine_url,
        served_model_name=TINY_NAME, model="tiny", model_dir=tmp_path / "model_dir", redis_url=REDIS_URL,
        basic_auth_user="", basic_auth_pass="",
    )


def prediction_counts(ls, task_ids) -> dict[int, int]:
    return {t: len(stored_predictions(ls, t)) for t in task_ids}


def test_prelabel_by_ten_thousand_ids_pages_the_ids(ls, backend, label_studio, engine_url, proxy, tmp_path):
    project = create_connected_project(ls, backend.url, "sentiment")
    missing = list(range(10_000_000, 10_010_000))
    prelabeler = Prelabeler(settings_for(proxy, label_studio, engine_url, tmp_path))
    try:
        summary = prelabeler.run(PrelabelOptions(str(project.id), task_ids=tuple(project.task_ids + missing)))
    finally:
        prelabeler.close()
    assert (summary.done, summary.failed) == (3, 10_000)
    assert {e["status"] for e in summary.errors} == {404}
    assert prediction_counts(ls, project.task_ids) == {t: LABELS for t in project.task_ids}
    longest = max(len(path) for method, path, _ in proxy.seen if method == "GET")
    assert longest < 16_000, f"a {longest}-character URL"


def test_a_proxy_error_after_a_stored_import_does_not_store_it_twice(ls, backend, label_studio, engine_url, proxy, tmp_path):
    project = create_connected_project(ls, backend.url, "sentiment")
    failed = []

    def fail_first_import(method, path):
        if method == "POST" and "/import/predictions" in path and not failed:
            failed.append(path)
            return True
        return False

    proxy.fail_after_forward = fail_first_import
    prelabeler = Prelabeler(settings_for(proxy, label_studio, engine_url, tmp_path))
    try:
        summary = prelabeler.run(PrelabelOptions(str(project.id)))
    finally:
        prelabeler.close()
    assert failed, "the import was never sent"
    assert summary.done == 3 and summary.predictions == 3 * LABELS
    assert prediction_counts(ls, project.task_ids) == {t: LABELS for t in project.task_ids}


def test_two_runs_of_one_project_at_once_store_one_set(ls, backend, label_studio, engine_url, proxy, tmp_path):
    """Two prelabel jobs (POST /prelabel twice, or TASKS_CREATED and reconcile): the second waits for the
    first, then finds every task done."""
    Redis.from_url(REDIS_URL).flushdb()
    project = create_connected_project(ls, backend.url, "sentiment")
    proxy.delay = lambda method, path: 1.0 if "/import/predictions" in path else 0.0  # a slow Label Studio
    settings = settings_for(proxy, label_studio, engine_url, tmp_path)
    results = []
    runs = [threading.Thread(target=lambda: results.append(run_prelabel(str(project.id), settings=settings))) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=240)
    assert len(results) == 2, results
    assert sorted(r["done"] for r in results) == [0, 3] and sorted(r["skipped"] for r in results) == [0, 3]
    assert prediction_counts(ls, project.task_ids) == {t: LABELS for t in project.task_ids}
