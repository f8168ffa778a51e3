"""Redis stopped and started again during webhook bursts (issue 15, fault tests): while it is down the backend
answers 503 (Label Studio's webhook is lost, nothing is acknowledged that was not stored), it reconnects by
itself, and every event it acknowledged with 200 is in Redis afterwards.

Real processes: a Redis server of this test's own (append-only file, fsync on every write, so an acknowledged
write survives the stop) and `dataengine serve` under granian with 2 HTTP workers; the engine is never
reached (a closed port)."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from redis import Redis

from tests.conftest import free_port, run_backend

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
PROJECT = 41


class OwnRedis:
    def __init__(self, directory):
        self.port, self.directory, self.process = free_port(), directory, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "OwnRedis":
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return self
            except Exception:
                time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def event(annotation_id: int) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": PROJECT}, "task": {"id": annotation_id},
            "annotation": {"id": annotation_id, "task": annotation_id, "result": []}}


def test_redis_outage_during_webhook_bursts_loses_no_acknowledged_event(tmp_path):
    redis = OwnRedis(tmp_path).start()
    answers: dict[int, int] = {}
    lock = threading.Lock()
    try:
        env = {"REDIS_URL": redis.url, "DATAENGINE_TRAIN_EVERY": "1000000", "DATAENGINE_RUN_WORKER": "0"}
        with run_backend("http://127.0.0.1:9", tmp_path / "model_dir", tmp_path / "serve.log", env) as (url, _):
            def send(annotation_id: int) -> None:
                try:
                    status = httpx.post(f"{url}/webhook", json=event(annotation_id), timeout=10).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    answers[annotation_id] = status

            def burst(ids) -> None:
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(send, ids))

            burst(range(0, 100))
            outage = threading.Thread(target=burst, args=(range(100, 400),))
            outage.start()
            time.sleep(0.3)
            redis.kill()  # mid-burst
            outage.join()
            burst(range(400, 500))  # still down
            redis.start()
            recovered = [0]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and recovered[0] != 200:
                recovered[0] = httpx.post(f"{url}/webhook", json=event(10_000), timeout=10).status_code
                time.sleep(0.2)
            burst(range(500, 600))
            stored = httpx.get(f"{url}/events", params={"project": PROJECT, "limit": 10_000}, timeout=10).json()["events"]
    finally:
        redis.kill()
    statuses = set(answers.values())
    assert statuses <= {200, 503}, statuses  # never a 500, never a dropped connection
    assert 503 in statuses and recovered[0] == 200
    assert all(answers[i] == 200 for i in range(500, 600))  # it reconnected by itself
    acknowledged = {i for i, status in answers.items() if status == 200}
    present = {a for e in stored for a in e["annotation_ids"]}
    assert acknowledged <= present, f"acknowledged but lost: {sorted(acknowledged - present)[:20]}"
