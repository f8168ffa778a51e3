"""The feedback loop end to end: annotations submitted in a real Label Studio reach /webhook, an RQ job
on a real worker (started by `dataengine serve`) exports them through the SDK and writes a snapshot
whose preference pairs are what the annotators chose; Label Studio outages and a killed worker process
are retried without half-written snapshots, the killed round's project lock lapsing within seconds.

Label Studio sits behind a loopback TCP forwarder (tests/e2e/tcp_proxy.py) so the test can cut it off
or slow it down; everything behind the forwarder is the real server.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from redis import Redis

from backend.label_prior import LabelPriors, label_prior_key
from tests.conftest import redis_db, run_backend
from tests.e2e.conftest import create_connected_project, expect, retrieve_predictions, stored_predictions, wait_for
from tests.e2e.tcp_proxy import TcpProxy
from training.snapshot import latest_snapshot, list_snapshots, read_pairs, read_sft

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

REDIS_URL = redis_db(11)  # this module's own database, flushed at start
LOCK_TTL = 5  # DATAENGINE_LOCK_TTL: how long a killed round's project lock outlives it


@pytest.fixture(scope="module")
def stack(engine_url, label_studio, tmp_path_factory):
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    proxy = TcpProxy(int(label_studio.url.rsplit(":", 1)[1])).up()
    model_dir = tmp_path_factory.mktemp("loop-model-dir")
    env = {
        "LABEL_STUDIO_URL": proxy.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "REDIS_URL": REDIS_URL,
        "DATAENGINE_RUN_WORKER": "1",
        "DATAENGINE_TRAIN_EVERY": "2",
        "DATAENGINE_RETRY_INTERVALS": "2,2,2",
        "DATAENGINE_RECONCILE_INTERVAL": "0",
        "DATAENGINE_LOCK_TTL": str(LOCK_TTL),
        "DATAENGINE_WEBHOOK_SECRET": "",
        "BASIC_AUTH_USER": "",
        "BASIC_AUTH_PASS": "",
    }
    log_path = tmp_path_factory.mktemp("loop-log") / "serve.log"
    with run_backend(engine_url, model_dir, log_path, env) as (url, proc):
        yield {"url": url, "model_dir": Path(model_dir), "proxy": proxy, "redis": redis, "log": log_path, "proc": proc}
    proxy.down()
    redis.flushdb()


def job_of(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()


def wait_job(stack, job_id: str, status: str, timeout: float = 90.0) -> dict:
    def reached():
        job = job_of(stack["url"], job_id)
        return job if job.get("status") == status else None

    final = wait_for(reached, timeout, 0.3)
    assert final, f"job {job_id} not {status} in {timeout:.0f} s: {job_of(stack['url'], job_id)}\n{stack['log'].read_text()[-3000:]}"
    return final


def start_training(stack, project_id: int) -> str:
    """What Label Studio sends for Settings → Model → Start Training."""
    response = httpx.post(f"{stack['url']}/webhook", json={"action": "START_TRAINING", "project": {"id": project_id}}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["training_job"]


@pytest.fixture(scope="module")
def trained_project(stack, ls):
    """Sentiment project: task 1 accepts the top candidate, task 2 picks the second one."""
    project = create_connected_project(ls, stack["url"], "sentiment")
    retrieve_predictions(ls, project.id)
    picks = {}
    for task_id, rank in zip(project.task_ids[:2], (0, 1)):
        predictions = sorted(stored_predictions(ls, task_id), key=lambda p: -p["score"])
        assert len(predictions) == 3, predictions
        picked = predictions[rank]
        expect(ls.post(f"/api/tasks/{task_id}/annotations", json={"result": picked["result"], "parent_prediction": picked["id"]}), 201, "annotate")
        picks[task_id] = {"label": picked["result"][0]["value"]["choices"][0], "all": [p["result"][0]["value"]["choices"][0] for p in predictions]}
    project_dir = stack["model_dir"] / "projects" / str(project.id)
    snapshot = wait_for(lambda: latest_snapshot(project_dir), timeout=90, interval=0.5)
    assert snapshot, f"no snapshot after 2 annotations (DATAENGINE_TRAIN_EVERY=2)\n{stack['log'].read_text()[-4000:]}"
    return {"project": project, "picks": picks, "dir": project_dir, "snapshot": snapshot}


def test_annotations_become_a_snapshot_of_what_annotators_chose(trained_project, stack):
    snapshot, picks = trained_project["snapshot"], trained_project["picks"]
    pairs = read_pairs(snapshot)
    expected = {
        (task_id, pick["label"], other) for task_id, pick in picks.items() for other in pick["all"] if other != pick["label"]
    }
    got = {(p.task_id, json.loads(p.chosen)["sentiment"], json.loads(p.rejected)["sentiment"]) for p in pairs}
    assert got == expected, pairs
    assert len(pairs) == 4 and all(p.source == "annotation>prediction" and p.margin == 1.0 for p in pairs)
    sft = read_sft(snapshot)
    assert {(s.task_id, json.loads(s.completion)["sentiment"]) for s in sft} == {(t, p["label"]) for t, p in picks.items()}
    assert snapshot.counts["annotations"] == 2
    project_id = str(trained_project["project"].id)

    def finished_job():
        jobs = httpx.get(f"{stack['url']}/jobs", timeout=10).json()["jobs"]
        return next((j for j in jobs if j["project"] == project_id and j["status"] == "finished"), None)

    job = wait_for(finished_job, timeout=60, interval=0.5)  # the round goes on after the snapshot
    assert job, httpx.get(f"{stack['url']}/jobs", timeout=10).json()
    assert job["progress"]["stage"] == "skipped" and "DATAENGINE_MIN_PAIRS" in job["progress"]["reason"]  # 4 < 8


def test_a_round_restores_the_label_prior_redis_lost(trained_project, stack):
    """The label prior's counts come from webhooks, and this Redis keeps nothing on disk: after a restart
    they are gone. The next round syncs them from what Label Studio holds."""
    project_id = str(trained_project["project"].id)
    expected = {"sentiment": Counter(pick["label"] for pick in trained_project["picks"].values())}
    priors = LabelPriors(stack["redis"])
    assert priors.counts(project_id) == expected  # the webhooks counted both annotations
    stack["redis"].delete(label_prior_key(project_id), label_prior_key(project_id, "counts"))
    assert priors.counts(project_id) == {}
    wait_job(stack, start_training(stack, trained_project["project"].id), "finished")
    assert priors.counts(project_id) == expected


def test_label_studio_outage_is_retried(trained_project, stack):
    project_id = trained_project["project"].id
    stack["proxy"].down()
    try:
        job_id = start_training(stack, project_id)
        failed_once = wait_for(lambda: job_of(stack["url"], job_id).get("retries_left") == 2, timeout=60, interval=0.2)
        assert failed_once, json.dumps(job_of(stack["url"], job_id))
    finally:
        stack["proxy"].up()
    final = wait_job(stack, job_id, "finished")
    assert final["retries_left"] in (1, 2)  # it failed, then succeeded on a retry


def test_killed_work_horse_is_retried_and_leaves_no_half_written_snapshot(trained_project, stack):
    project_id = trained_project["project"].id
    stack["proxy"].delay = 1.5  # Label Studio answers slowly: the job is mid-export when we kill it
    worker = worker_pid(stack["proc"].pid)
    idle_children = set(children(worker))  # e.g. RQ's scheduler process
    try:
        job_id = start_training(stack, project_id)
        wait_job(stack, job_id, "started", timeout=30)
        horse = wait_for(lambda: next(iter(set(children(worker)) - idle_children), None), timeout=10, interval=0.1)
        assert horse, "no RQ work-horse process found"
        lock = f"dataengine:train-lock:{project_id}"
        assert wait_for(lambda: stack["redis"].exists(lock), timeout=10, interval=0.05)  # the round holds the lock
        os.kill(horse, signal.SIGKILL)
        killed_at = time.monotonic()
        assert 0 < stack["redis"].pttl(lock) <= LOCK_TTL * 1000  # a dead holder's lock lapses within LOCK_TTL
    finally:
        stack["proxy"].delay = 0.0
    final = wait_job(stack, job_id, "finished", timeout=120)
    assert final["retries_left"] < 3
    assert time.monotonic() - killed_at < 60  # the retried round got the lock and finished within a minute
    assert not list((trained_project["dir"] / "versions").glob(".staging-*"))  # no orphan version
    snapshots_dir = trained_project["dir"] / "snapshots"
    assert not [p for p in snapshots_dir.iterdir() if p.name.startswith(".tmp")]
    assert all((s.path / "manifest.json").exists() for s in list_snapshots(trained_project["dir"]))
    assert latest_snapshot(trained_project["dir"]).content_hash == trained_project["snapshot"].content_hash


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def worker_pid(serve_pid: int) -> int:
    """serve -> RQ worker; the worker forks a work-horse per job."""
    for pid in children(serve_pid):
        if b"dataengine worker" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "):
            return pid
    raise AssertionError("dataengine serve started no RQ worker")


def test_reconcile_catches_annotations_whose_webhooks_were_lost(trained_project, stack, label_studio):
    """Label Studio never retries a webhook: reconcile compares its annotation count with what training saw."""
    from backend.settings import Settings
    from training.jobs import reconcile

    project_id = str(trained_project["project"].id)
    settings = Settings(
        redis_url=REDIS_URL, label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
        train_every=2, reconcile_interval=0, model_dir=stack["model_dir"],
    )
    assert reconcile(settings)["triggered"] == []  # training saw both annotations
    stack["redis"].set(f"dataengine:seen-annotations:{project_id}", 0)  # as if two webhooks never arrived
    triggered = reconcile(settings)["triggered"]
    assert len(triggered) == 1
    wait_job(stack, triggered[0], "finished")
    assert stack["redis"].get(f"dataengine:seen-annotations:{project_id}") == b"2"
