"""Ranking projects end to end against a real Label Studio 1.23.2: importing tasks into a <Ranker>/<Pairwise>
project fires TASKS_CREATED, an RQ job on the real worker (started by `dataengine serve`) writes N
candidates into each task through the SDK plus the model's order as a prediction; a submitted ranking
becomes ordered preference pairs in the next snapshot; the periodic reconcile fills tasks whose TASKS_CREATED was
lost. `dataengine prelabel` pre-labels a whole answer
project in bulk and resumes without redoing what is stored; a forced run replaces our predictions.

Every wait is on a real condition (a job's end, a snapshot's appearance), never on a duration: candidates
are written before the prediction that ranks them, so seeing them says nothing about the prediction.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from redis import Redis

from backend.queue import PRELABEL_FUNC
from tests.conftest import REPO, TINY_NAME, redis_db, run_backend
from tests.e2e.conftest import BASE_VERSION, create_connected_project, expect, stored_predictions, wait_for
from training.snapshot import latest_snapshot, read_pairs

pytestmark = [pytest.mark.e2e, pytest.mark.engine]

REDIS_URL = redis_db(8)  # this module's own database (tests/test_ranking.py flushes 9), flushed at start
N = 4  # DATAENGINE_CANDIDATES of the backend under test


@pytest.fixture(scope="module")
def stack(engine_url, label_studio, tmp_path_factory):
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    model_dir = tmp_path_factory.mktemp("ranking-model-dir")
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "REDIS_URL": REDIS_URL,
        "DATAENGINE_RUN_WORKER": "1",
        "DATAENGINE_CANDIDATES": str(N),
        "DATAENGINE_TRAIN_EVERY": "1000",  # rounds start on START_TRAINING only
        "DATAENGINE_RECONCILE_INTERVAL": "0",
        "DATAENGINE_WEBHOOK_SECRET": "",
        "BASIC_AUTH_USER": "",
        "BASIC_AUTH_PASS": "",
    }
    log_path = tmp_path_factory.mktemp("ranking-log") / "serve.log"
    with run_backend(engine_url, model_dir, log_path, env) as (url, _proc):
        yield {"url": url, "model_dir": Path(model_dir), "log": log_path, "env": env, "engine_url": engine_url}
    redis.flushdb()


def task_data(ls, task_id: int) -> dict:
    return expect(ls.get(f"/api/tasks/{task_id}"), 200, f"read task {task_id}")["data"]


def prelabel_jobs(stack, project_id: int) -> list[dict]:
    jobs = httpx.get(f"{stack['url']}/jobs", params={"limit": 1000}, timeout=10).json()["jobs"]
    return [j for j in jobs if j["function"] == PRELABEL_FUNC and j["project"] == str(project_id)]


def ended_prelabel_jobs(stack, project_id: int, timeout: float = 180) -> list[dict]:
    """The project's prelabel jobs once there is one and none is queued or running any more."""
    def ended():
        jobs = prelabel_jobs(stack, project_id)
        return jobs if jobs and all(j["status"] in ("finished", "failed") for j in jobs) else None

    jobs = wait_for(ended, timeout=timeout, interval=0.5)
    assert jobs and all(j["status"] == "finished" for j in jobs), (
        f"prelabel jobs of project {project_id}: {prelabel_jobs(stack, project_id)}\n{stack['log'].read_text()[-4000:]}"
    )
    return jobs


def run_prelabel_job(stack, project_id: int, **options) -> dict:
    """POST /prelabel and wait for that job to end; returns the job as /jobs/<id> shows it."""
    response = httpx.post(f"{stack['url']}/prelabel", json={"project": project_id, **options}, timeout=10)
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]
    return next(j for j in ended_prelabel_jobs(stack, project_id, timeout=120) if j["id"] == job_id)


def filled_project(ls, stack, name: str, key: str = "candidates"):
    """Create the project, import its sample tasks and wait until the TASKS_CREATED job has written them all."""
    project = create_connected_project(ls, stack["url"], name)
    ended_prelabel_jobs(stack, project.id)
    data = {t: task_data(ls, t) for t in project.task_ids}
    assert all(d.get(key) for d in data.values()), data
    return project, data


def trigger_snapshot(ls, stack, project_id: int):
    """Settings → Model → Start Training, then the snapshot the round writes."""
    project_dir = stack["model_dir"] / "projects" / str(project_id)
    before = latest_snapshot(project_dir)
    response = httpx.post(f"{stack['url']}/webhook", json={"action": "START_TRAINING", "project": {"id": project_id}}, timeout=10)
    assert response.status_code == 200 and response.json()["training_job"], response.text
    snapshot = wait_for(lambda: (s := latest_snapshot(project_dir)) and s != before and s, timeout=120, interval=0.5)
    assert snapshot, f"no snapshot\n{stack['log'].read_text()[-4000:]}"
    return snapshot


@pytest.fixture(scope="module")
def ranking(ls, stack):
    return filled_project(ls, stack, "ranking")


def test_imported_tasks_get_n_candidates_and_a_stored_ranker_prediction(ls, ranking):
    project, data = ranking
    for task_id in project.task_ids:
        items = data[task_id]["candidates"]
        assert len(items) == N and len({i["id"] for i in items}) == N, items
        assert all(set(i) == {"id", "title", "body"} and i["body"].strip() for i in items)
        assert data[task_id]["prompt"] == project.tasks[task_id]["data"]["prompt"]  # the task's own fields stay
        predictions = stored_predictions(ls, task_id)
        assert len(predictions) == 1, predictions
        (region,) = predictions[0]["result"]
        assert (region["type"], region["from_name"], region["to_name"]) == ("ranker", "rank", "candidates")
        buckets = region["value"]["ranker"]
        assert set(buckets) == {"best", "acceptable", "reject"} and buckets["best"]
        assert sorted(i for ids in buckets.values() for i in ids) == sorted(i["id"] for i in items)
        assert predictions[0]["model_version"] == BASE_VERSION and 0.0 <= predictions[0]["score"] <= 1.0


def test_prelabel_again_skips_filled_tasks(ls, stack, ranking):
    project, data = ranking
    job = run_prelabel_job(stack, project.id)
    assert job["progress"]["skipped"] == 3 and job["progress"]["done"] == 0, job
    assert {t: task_data(ls, t)["candidates"] for t in project.task_ids} == {t: d["candidates"] for t, d in data.items()}
    assert all(len(stored_predictions(ls, t)) == 1 for t in project.task_ids)


def test_a_forced_refill_leaves_each_task_one_prediction_ranking_its_new_candidates(ls, stack):
    project, _ = filled_project(ls, stack, "rank_sentiment")
    before = {t: [p["id"] for p in stored_predictions(ls, t)] for t in project.task_ids}
    assert all(len(ids) == 1 for ids in before.values()), before
    job = run_prelabel_job(stack, project.id, force=True)
    assert (job["progress"]["done"], job["progress"]["replaced"]) == (3, 3), job
    for task_id in project.task_ids:
        (prediction,) = stored_predictions(ls, task_id)
        assert prediction["id"] not in before[task_id]
        ranked = prediction["result"][0]["value"]["ranker"]["rank"]
        assert sorted(ranked) == sorted(i["id"] for i in task_data(ls, task_id)["candidates"])


def test_reconcile_fills_ranking_tasks_whose_tasks_created_webhook_was_lost(ls, stack, label_studio):
    """Label Studio never retries a webhook. A task without candidates (here: the candidates taken out of its
    data, as if TASKS_CREATED never arrived) gets them from the periodic reconcile, once."""
    from backend.settings import Settings
    from training.jobs import reconcile

    project, data = filled_project(ls, stack, "ranking")
    lost = project.task_ids[0]
    plain = {k: v for k, v in data[lost].items() if k != "candidates"}
    expect(ls.patch(f"/api/tasks/{lost}", json={"data": plain}), 200, "take the candidates out")
    settings = Settings(
        redis_url=REDIS_URL, label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
        train_every=1000, reconcile_interval=0, model_dir=stack["model_dir"],
    )
    result = reconcile(settings)
    assert result["triggered"] == [] and len(result["filling"]) == 1, result
    job = next(j for j in ended_prelabel_jobs(stack, project.id) if j["id"] == result["filling"][0])
    assert (job["progress"]["done"], job["progress"]["skipped"]) == (1, 0), job
    assert len(task_data(ls, lost)["candidates"]) == N
    (prediction,) = stored_predictions(ls, lost)  # the old ranking, of candidates that are gone, was replaced
    ranked = [i for ids in prediction["result"][0]["value"]["ranker"].values() for i in ids]
    assert sorted(ranked) == sorted(i["id"] for i in task_data(ls, lost)["candidates"])
    assert reconcile(settings)["filling"] == []  # nothing left to fill


def test_a_submitted_ranking_becomes_ordered_pairs_in_the_next_snapshot(ls, stack, ranking):
    project, data = ranking
    task_id = project.task_ids[0]
    items = data[task_id]["candidates"]
    body = {i["id"]: i["body"] for i in items}
    ids = [i["id"] for i in items]
    best, acceptable, reject = [ids[0]], [ids[1], ids[2]], [ids[3]]
    region = {
        "from_name": "rank", "to_name": "candidates", "type": "ranker",
        "value": {"ranker": {"best": best, "acceptable": acceptable, "reject": reject}},
    }
    expect(ls.post(f"/api/tasks/{task_id}/annotations", json={"result": [region]}), 201, "submit the ranking")
    pairs = read_pairs(trigger_snapshot(ls, stack, project.id))
    expected = (
        {(body[b], body[a], 0.5) for b in best for a in acceptable}
        | {(body[b], body[r], 1.0) for b in best for r in reject}
        | {(body[a], body[r], 0.5) for a in acceptable for r in reject}
    )
    assert {(p.chosen, p.rejected, p.margin) for p in pairs} == expected and len(pairs) == 5
    assert all(p.task_id == task_id and p.source == "ranker-buckets" for p in pairs)
    assert pairs[0].prompt == [{"role": "user", "content": data[task_id]["prompt"]}]


def test_pairwise_project_gets_two_sides_and_a_pick_becomes_a_pair(ls, stack):
    project, data = filled_project(ls, stack, "pairwise", key="answer_a")
    for task_id in project.task_ids:
        a, b = data[task_id]["candidates"]
        assert (data[task_id]["answer_a"], data[task_id]["answer_b"]) == (a["body"], b["body"]) and a["body"] != b["body"]
        (prediction,) = stored_predictions(ls, task_id)
        assert prediction["result"][0]["type"] == "pairwise" and prediction["result"][0]["value"]["selected"] in ("left", "right")
    task_id = project.task_ids[1]
    region = {"from_name": "preference", "to_name": "answer_a", "type": "pairwise", "value": {"selected": "right"}}
    expect(ls.post(f"/api/tasks/{task_id}/annotations", json={"result": [region]}), 201, "submit the pick")
    pairs = read_pairs(trigger_snapshot(ls, stack, project.id))
    assert [(p.task_id, p.chosen, p.rejected, p.source) for p in pairs] == [
        (task_id, data[task_id]["answer_b"], data[task_id]["answer_a"], "pairwise")
    ]


def run_cli_prelabel(stack, project_id: int, *args: str) -> dict:
    env = {**os.environ, **stack["env"], "DATAENGINE_ENGINE_URL": stack["engine_url"], "DATAENGINE_SERVED_MODEL_NAME": TINY_NAME,
           "MODEL_DIR": str(stack["model_dir"])}
    done = subprocess.run(
        [sys.executable, "-m", "dataengine", "prelabel", "--project", str(project_id), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "task/s" in done.stderr or "it/s" in done.stderr or "s/task" in done.stderr, done.stderr[-1000:]  # the progress bar
    return json.loads(done.stdout)


def test_cli_prelabels_a_whole_project_in_bulk_and_resumes(ls, stack):
    project = create_connected_project(ls, stack["url"], "sentiment")
    first = run_cli_prelabel(stack, project.id)
    assert (first["mode"], first["seen"], first["done"], first["skipped"], first["failed"]) == ("predictions", 3, 3, 0, 0)
    assert first["predictions"] == 9  # a closed set of 3 labels: one prediction per label and task
    stored = {t: stored_predictions(ls, t) for t in project.task_ids}
    for predictions in stored.values():
        assert sorted(p["result"][0]["value"]["choices"][0] for p in predictions) == ["Negative", "Neutral", "Positive"]
        assert {p["model_version"] for p in predictions} == {BASE_VERSION}
        assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
    again = run_cli_prelabel(stack, project.id)
    assert (again["done"], again["skipped"], again["predictions"]) == (0, 3, 0)
    assert {t: [p["id"] for p in stored_predictions(ls, t)] for t in project.task_ids} == {t: [p["id"] for p in ps] for t, ps in stored.items()}
    forced = run_cli_prelabel(stack, project.id, "--force", "--limit", "1")
    assert (forced["done"], forced["predictions"], forced["replaced"]) == (1, 3, 3)
    after = {t: [p["id"] for p in stored_predictions(ls, t)] for t in project.task_ids}
    redone = [t for t in project.task_ids if after[t] != [p["id"] for p in stored[t]]]
    assert len(redone) == 1 and len(after[redone[0]]) == 3, after  # the new 3 replaced the old 3
    assert not set(after[redone[0]]) & {p["id"] for p in stored[redone[0]]}
