"""/webhook with the REAL Redis on this machine: validation, recording, training triggers, coalescing."""
from __future__ import annotations

import pytest
from rq.job import Job

from backend.app import create_app
from backend.engine_client import EngineClient
from backend.feedback import parse_webhook
from backend.errors import BadRequest
from tests.conftest import flushed_redis, make_settings, redis_db

REDIS_URL = redis_db(13)  # a database of its own, flushed per test


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


def app_client(tmp_path, **overrides):
    settings = make_settings(tmp_path, redis_url=overrides.pop("redis_url", REDIS_URL), **overrides)
    # /webhook never calls the engine; a closed port proves it.
    return create_app(settings, engine=EngineClient("http://127.0.0.1:9", "tiny")).test_client()


def annotation_event(annotation_id, project=7, action="ANNOTATION_CREATED", task=11):
    return {"action": action, "project": {"id": project}, "task": {"id": task},
            "annotation": {"id": annotation_id, "task": task, "result": [], "parent_prediction": 3}}


def test_payload_shapes_of_every_handled_action():
    assert parse_webhook(annotation_event(5)).annotation_ids == (5,)
    bulk = parse_webhook({"action": "ANNOTATIONS_CREATED", "project": 7, "annotation": [{"id": 1, "task": 2}, {"id": 3, "task": 4}]})
    assert bulk.annotation_ids == (1, 3) and bulk.task_ids == (2, 4)
    deleted = parse_webhook({"action": "ANNOTATIONS_DELETED", "project": 7, "annotations": [{"id": 9}]})
    assert deleted.annotation_ids == (9,) and deleted.changes == 1
    assert parse_webhook({"action": "START_TRAINING", "project": 7}).changes == 0
    created = parse_webhook({"action": "TASKS_CREATED", "project": {"id": 7}, "tasks": [{"id": 1}, {"id": 2}]})
    assert created.task_ids == (1, 2)
    assert parse_webhook({"action": "PROJECT_UPDATED", "project": {"id": 7}}).project == "7"


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"project": 1}, "action"),
        ({"action": "ANNOTATION_CREATED"}, "project"),
        ({"action": "ANNOTATION_CREATED", "project": 1}, "annotation"),
        ({"action": "ANNOTATIONS_DELETED", "project": 1, "annotations": [{"id": "x"}]}, "integer"),
        ({"action": "TASKS_CREATED", "project": 1, "tasks": "all"}, "list"),
    ],
)
def test_bad_payloads_are_400(payload, message):
    with pytest.raises(BadRequest, match=message):
        parse_webhook(payload)


def test_events_are_recorded_and_listed(tmp_path, redis):
    client = app_client(tmp_path, train_every=100)
    for annotation_id in (1, 2):
        response = client.post("/webhook", json=annotation_event(annotation_id))
        assert response.status_code == 200 and response.get_json()["training_job"] is None
    unknown = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert unknown.status_code == 200 and "note" in unknown.get_json()
    events = client.get("/events?project=7").get_json()["events"]
    assert [e["action"] for e in events] == ["ANNOTATION_CREATED", "ANNOTATION_CREATED", "PROJECT_UPDATED"]
    assert events[0]["annotation_ids"] == [1] and isinstance(events[0]["received_at"], float)


def test_training_triggers_after_train_every_changes_and_coalesces(tmp_path, redis):
    client = app_client(tmp_path, train_every=3)
    jobs = [client.post("/webhook", json=annotation_event(i)).get_json()["training_job"] for i in range(1, 4)]
    assert jobs[:2] == [None, None] and jobs[2] is not None
    job = Job.fetch(jobs[2], connection=redis)
    assert job.func_name == "training.jobs.run_training_round" and job.args == ("7", "ANNOTATION_CREATED")
    assert job.retries_left == 3
    # While that job waits in the queue, more triggers join it instead of queueing duplicates.
    again = client.post("/webhook", json={"action": "START_TRAINING", "project": 7}).get_json()["training_job"]
    assert again == jobs[2]
    listed = client.get("/jobs").get_json()["jobs"]
    assert [j["id"] for j in listed] == [jobs[2]] and listed[0]["status"] == "queued"
    assert client.get(f"/jobs/{jobs[2]}").get_json()["project"] == "7"
    assert client.get("/jobs/nope").status_code == 404


def test_trigger_while_running_sets_rerun_instead_of_a_second_job(tmp_path, redis):
    client = app_client(tmp_path, train_every=1)
    job_id = client.post("/webhook", json=annotation_event(1)).get_json()["training_job"]
    job = Job.fetch(job_id, connection=redis)
    job.set_status("started")
    assert client.post("/webhook", json=annotation_event(2)).get_json()["training_job"] == job_id
    assert redis.get("dataengine:rerun:7") == b"ANNOTATION_CREATED"


def test_bulk_events_count_every_annotation(tmp_path, redis):
    client = app_client(tmp_path, train_every=3)
    payload = {"action": "ANNOTATIONS_CREATED", "project": 9, "annotation": [{"id": i, "task": i} for i in range(3)]}
    assert client.post("/webhook", json=payload).get_json()["training_job"] is not None


def test_secret_header_is_required_when_configured(tmp_path, redis):
    client = app_client(tmp_path, webhook_secret="s3")
    assert client.post("/webhook", json=annotation_event(1)).status_code == 401
    ok = client.post("/webhook", json=annotation_event(1), headers={"X-Dataengine-Secret": "s3"})
    assert ok.status_code == 200


def test_redis_down_is_503_with_a_message(tmp_path):
    client = app_client(tmp_path, redis_url="redis://127.0.0.1:1/0")
    response = client.post("/webhook", json=annotation_event(1))
    assert response.status_code == 503
    assert "Redis is unreachable" in response.get_json()["error"]
    assert client.get("/health").get_json()["redis"] is False


@pytest.mark.engine
def test_predict_keeps_working_when_redis_is_down(tmp_path, engine_url):
    from tests.conftest import load_config

    settings = make_settings(tmp_path, engine_url, redis_url="redis://127.0.0.1:1/0")
    client = create_app(settings).test_client()
    xml, tasks = load_config("sentiment")
    response = client.post("/predict", json={"tasks": tasks, "label_config": xml})
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["results"]) == 3


def test_webhook_secret_admits_webhooks_behind_basic_auth(tmp_path, redis):
    """Label Studio's auto-created webhook can carry one custom header: the secret must be enough."""
    client = app_client(tmp_path, webhook_secret="s3", basic_auth_user="u", basic_auth_pass="p")
    assert client.post("/webhook", json=annotation_event(1)).status_code == 401
    assert client.post("/webhook", json=annotation_event(1), headers={"X-Dataengine-Secret": "s3"}).status_code == 200
    assert client.post("/predict", json={}, headers={"X-Dataengine-Secret": "s3"}).status_code == 401  # webhook only


def test_jobs_cli_lists_state_and_progress(tmp_path, redis):
    import subprocess
    import sys

    from tests.conftest import REPO

    client = app_client(tmp_path, train_every=1)
    job_id = client.post("/webhook", json=annotation_event(1)).get_json()["training_job"]
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": REDIS_URL, "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dataengine", "jobs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert job_id in out.stdout and "queued" in out.stdout and "project=7" in out.stdout
