"""`dataengine serve` exits when stopped even if an HTTP worker does not: granian kills a worker that has not
stopped DATAENGINE_WORKERS_KILL_TIMEOUT seconds after the stop request. Before, a Ctrl-C that reached a granian
worker while it was still building its app (3 of 4 tries 4-5 s after start with the RQ worker on) left
that worker running and `serve` waiting on it for good, a second Ctrl-C included. The race itself is timing;
here a worker is made to miss the stop request for sure by stopping it (SIGSTOP) first, on the real server."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import run_backend


def granian_workers(pid: int) -> list[int]:
    """The server's worker processes: its children that run granian's Rust (tokio) threads."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if any((t / "comm").read_text().startswith("tokio") for t in Path(f"/proc/{c}/task").iterdir())]


def test_serve_exits_although_a_worker_misses_the_stop_request(tmp_path, engine_url):
    log = tmp_path / "serve.log"
    with run_backend(engine_url, tmp_path / "model_dir", log, {"DATAENGINE_WORKERS_KILL_TIMEOUT": "3"}) as (_, proc):
        deadline = time.monotonic() + 60
        while len(workers := granian_workers(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # /health answers once one worker is up; the other may still be starting
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGSTOP)
        try:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"serve still waits for its stopped worker 30 s after SIGINT:\n{log.read_text()[-2000:]}")
        finally:
            try:
                os.kill(workers[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "refused to gracefully stop" in log.read_text()
    assert proc.returncode == 0
