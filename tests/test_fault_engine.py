"""The engine killed during /predict (issue 15, fault tests): the request in flight and the ones after it get
a clear 503, and once the engine is back the backend recovers by itself, the project's promoted LoRA adapter
loaded again (the restarted engine has forgotten it).

Real processes: a tiny vLLM engine of this test's own (not the session's, which other tests share), started
twice on one port, and `dataengine serve` under granian."""
from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

from backend.engine_process import EngineProcess
from backend.settings import Settings
from tests.conftest import TINY_NAME, free_port, load_config, run_backend
from tests.test_registry import publish, random_adapter  # noqa: F401 (fixture)
from training.registry import Registry

pytestmark = pytest.mark.engine
PROJECT = "31"


def own_engine(tiny_model_dir, port: int, log_dir) -> EngineProcess:
    settings = Settings(model=str(tiny_model_dir), served_model_name=TINY_NAME, engine_port=port, engine_max_model_len=4096,
                        model_dir=log_dir, engine_start_timeout=300)
    engine = EngineProcess(settings)
    engine.start()
    return engine


def test_engine_killed_during_predict_is_503_then_recovers_with_the_promoted_adapter(tiny_model_dir, random_adapter, tmp_path):  # noqa: F811
    port = free_port()
    engine = own_engine(tiny_model_dir, port, tmp_path / "engine")
    model_dir = tmp_path / "model_dir"
    registry = Registry(model_dir / "projects", PROJECT, TINY_NAME)
    version = publish(registry, tmp_path, with_adapter=str(random_adapter))
    registry.promote(version, "test")
    xml, tasks = load_config("sentiment")
    body = {"tasks": tasks, "label_config": xml, "project": f"{PROJECT}.1"}
    many = {**body, "tasks": [{**tasks[i % 3], "id": i} for i in range(300)]}
    try:
        with run_backend(engine.url, model_dir, tmp_path / "serve.log") as (url, _):
            first = httpx.post(f"{url}/predict", json=body, timeout=120)
            assert first.status_code == 200 and first.json()["model_version"] == version.name, first.text

            in_flight = {}
            request = threading.Thread(target=lambda: in_flight.update(r=httpx.post(f"{url}/predict", json=many, timeout=120)))
            request.start()
            threading.Event().wait(1.0)
            os.killpg(engine.process.pid, signal.SIGKILL)
            engine.process.wait()
            request.join()
            assert in_flight["r"].status_code == 503 and "engine" in in_flight["r"].json()["error"], in_flight["r"].text
            down = httpx.post(f"{url}/predict", json=body, timeout=60)
            assert down.status_code == 503 and "unreachable" in down.json()["error"], down.text

            engine = own_engine(tiny_model_dir, port, tmp_path / "engine")
            back = httpx.post(f"{url}/predict", json=body, timeout=120)
            assert back.status_code == 200, back.text
            assert back.json()["model_version"] == version.name
            assert all(p["model_version"] == version.name for ranked in back.json()["results"] for p in ranked)
            served = [m["id"] for m in httpx.get(engine.url + "/v1/models", timeout=10).json()["data"]]
            assert version.adapter_name in served  # reloaded into the new engine
    finally:
        engine.stop()
