"""The per-project training lock outlives a killed round by seconds, not hours (issue 15, point 8).

A real training round (`training.jobs.run_training_round`) runs in its own process against a real Redis
database; Label Studio is a real socket that accepts connections and never answers, so the round sits in its
export, holding the lock, until the test SIGKILLs it (what the OOM killer does to a work horse).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, flushed_redis, redis_db

REDIS_URL = redis_db(7)  # this file's own database, flushed per test
LOCK = "dataengine:train-lock:5"
LOCK_TTL = 3


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


@pytest.fixture
def silent_label_studio():
    """Accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def start_round(label_studio_url: str) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": REDIS_URL, "LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": "t",
           "DATAENGINE_LOCK_TTL": str(LOCK_TTL), "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": ""}
    code = "from training.jobs import run_training_round; run_training_round('5', 'test')"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def test_a_killed_rounds_lock_expires_within_its_short_ttl_and_is_renewed_while_it_runs(redis, silent_label_studio):
    round_ = start_round(silent_label_studio)
    try:
        assert wait_until(lambda: redis.exists(LOCK), timeout=60), round_.stderr.read1().decode() if round_.poll() else ""
        assert 0 < redis.pttl(LOCK) <= LOCK_TTL * 1000, f"lock TTL {redis.pttl(LOCK)} ms"
        time.sleep(LOCK_TTL * 1.5)
        assert round_.poll() is None and redis.exists(LOCK), "the lock lapsed while its round was still running"
    finally:
        os.kill(round_.pid, signal.SIGKILL)
        round_.wait()
    killed_at = time.monotonic()
    assert wait_until(lambda: not redis.exists(LOCK), timeout=LOCK_TTL + 2)
    assert time.monotonic() - killed_at <= LOCK_TTL + 1
