"""The periodic reconcile keeps running (issue 15, point 2): a real `dataengine worker` process (RQ worker with
its scheduler) on a real Redis database, no Label Studio (no projects known: each pass only reschedules)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import REPO, flushed_redis, redis_db, stop_process

REDIS_URL = redis_db(15)  # this file's own database, flushed per test
QUEUE = "dataengine-prelabel"  # reconcile passes run on the prelabel queue


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


def start_worker(log_path: Path, interval: int) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": REDIS_URL, "DATAENGINE_RECONCILE_INTERVAL": str(interval), "LABEL_STUDIO_URL": "",
           "LABEL_STUDIO_API_KEY": "", "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": ""}
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "dataengine", "worker"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def reconcile_runs(log_path: Path) -> list[str]:
    """Ids of the reconcile jobs the worker finished, from its log (RQ's "Job OK (<id>)" lines)."""
    return re.findall(r"Job OK \((reconcile[\w-]*)\)", log_path.read_text(errors="replace"))


def wait_until(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    return condition()


def test_reconcile_runs_again_and_again_with_a_short_interval(tmp_path, redis):
    log_path = tmp_path / "worker.log"
    worker = start_worker(log_path, interval=1)
    try:
        runs = wait_until(lambda: len(reconcile_runs(log_path)) >= 3, timeout=60)
    finally:
        stop_process(worker)
    assert runs, f"reconcile ran {len(reconcile_runs(log_path))} times in 60 s:\n{log_path.read_text()[-3000:]}"


def test_the_next_reconcile_survives_an_interval_longer_than_rqs_result_ttl(tmp_path, redis):
    """600 s > RQ's default result TTL (500 s): after a pass, the scheduled successor's job hash must outlive
    its due time. Then the registry score is moved to now (what 600 s of waiting does) and it runs."""
    log_path = tmp_path / "worker.log"
    worker = start_worker(log_path, interval=600)
    try:
        assert wait_until(lambda: reconcile_runs(log_path), timeout=60), log_path.read_text()[-3000:]
        scheduled = wait_until(lambda: redis.zrange(f"rq:scheduled:{QUEUE}", 0, -1, withscores=True), timeout=10)
        assert len(scheduled) == 1, scheduled
        job_id, due = scheduled[0][0].decode(), scheduled[0][1]
        ttl = redis.ttl(f"rq:job:{job_id}")
        assert ttl == -1 or ttl > due - time.time(), f"job {job_id} hash expires in {ttl} s, due in {due - time.time():.0f} s"
        redis.zadd(f"rq:scheduled:{QUEUE}", {job_id: time.time()})
        second = wait_until(lambda: len(reconcile_runs(log_path)) >= 2, timeout=30)
    finally:
        stop_process(worker)
    assert second, log_path.read_text()[-3000:]
    runs = reconcile_runs(log_path)
    assert runs[1] == job_id and runs[0] != runs[1]


def test_a_second_worker_start_does_not_start_a_second_chain(tmp_path, redis):
    first = start_worker(tmp_path / "first.log", interval=600)
    try:
        assert wait_until(lambda: redis.zcard(f"rq:scheduled:{QUEUE}") == 1, timeout=60), (tmp_path / "first.log").read_text()
        second = start_worker(tmp_path / "second.log", interval=600)
        time.sleep(5)
        stop_process(second)
    finally:
        stop_process(first)
    assert reconcile_runs(tmp_path / "second.log") == [] and redis.zcard(f"rq:scheduled:{QUEUE}") == 1
