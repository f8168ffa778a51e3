"""Training rounds and pre-labelling run on separate RQ queues (issue 17, section 3): a worker started with
`dataengine worker --queues prelabel` keeps filling while a round holds the training worker.

Real `dataengine worker` processes on a real Redis database, no Label Studio and no engine: the round is a real
`run_training_round` that waits for its project's training lock (held here, as a long round would hold it), and
the prelabel-queue job is a real reconcile pass (no projects known: it only reschedules)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq.job import Job, JobStatus

from backend.queue import FeedbackQueue, key, parse_queue_kinds, schedule_reconcile
from tests.conftest import REPO, flushed_redis, redis_db, stop_process

REDIS_URL = redis_db(4)  # this file's own database, flushed per test


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


def start_worker(log_path: Path, queues: str) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATAENGINE_RECONCILE_INTERVAL": "0", "LABEL_STUDIO_URL": "",
           "LABEL_STUDIO_API_KEY": "", "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", "DATAENGINE_RETRY_INTERVALS": ""}
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "dataengine", "worker", "--queues", queues], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for_status(queue: FeedbackQueue, job_id: str, wanted: set, timeout: float) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = Job.fetch(job_id, connection=queue.redis).get_status(refresh=True)
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_queue_kinds_parse_and_refuse_unknown_names():
    assert parse_queue_kinds("training,prelabel") == ("training", "prelabel")
    assert parse_queue_kinds(" prelabel ") == ("prelabel",)
    for bad in ("", "training,gpu", "dataengine"):
        with pytest.raises(ValueError, match="training, prelabel"):
            parse_queue_kinds(bad)


def test_a_running_round_does_not_delay_the_prelabel_queue(tmp_path, redis):
    queue = FeedbackQueue(REDIS_URL, train_every=50, job_timeout=600, retry_intervals=[])
    lock = redis.lock(key("train-lock", "5"), timeout=300)
    assert lock.acquire(blocking=False)  # the round below waits for it, as behind a long round of project 5
    training = start_worker(tmp_path / "training.log", "training")
    prelabel = None
    try:
        round_id = queue.request_training("5", reason="test")
        assert Job.fetch(round_id, connection=redis).origin == "dataengine-training"
        status = wait_for_status(queue, round_id, {JobStatus.STARTED}, timeout=60)
        assert status == JobStatus.STARTED, (tmp_path / "training.log").read_text()[-2000:]
        # the training worker is busy; a job on the prelabel queue is not its business
        waiting = schedule_reconcile(queue)
        assert Job.fetch(waiting, connection=redis).origin == "dataengine-prelabel"
        time.sleep(3)
        assert Job.fetch(waiting, connection=redis).get_status() == JobStatus.QUEUED
        prelabel = start_worker(tmp_path / "prelabel.log", "prelabel")
        done = wait_for_status(queue, waiting, {JobStatus.FINISHED, JobStatus.FAILED}, timeout=60)
        assert done == JobStatus.FINISHED, (tmp_path / "prelabel.log").read_text()[-2000:]
        assert Job.fetch(round_id, connection=redis).get_status() == JobStatus.STARTED  # the round still runs
    finally:
        lock.release()
        stop_process(training)
        if prelabel is not None:
            stop_process(prelabel)
