"""Engine replicas behind a standard load balancer (issue 17, section 2): the backend knows one URL, the balancer's,
and every replica serves every promoted version because vLLM's own `lora_filesystem_resolver` plugin loads the
adapter a request names from MODEL_DIR/adapters. Nobody tells a replica about a new version.

Real processes: two tiny vLLM engines started by `backend.engine_process.EngineProcess` (the code `dataengine serve`
uses, resolver settings included), sharing one MODEL_DIR; HAProxy from Debian in front of them, round-robin; a real
training round (`training.rounds.learn`: reward model, SFT policy, gate, promotion) run against the balancer;
then `dataengine serve` under granian with DATAENGINE_ENGINE_URL = the balancer. What each replica answered is read
from the balancer's log and from each engine's own access log: the two must agree, request for request."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from backend.engine_process import EngineProcess
from backend.settings import Settings
from tests.conftest import TINY_NAME, free_port, load_config, make_settings, run_backend
from tests.haproxy import HAPROXY_MISSING, HAProxy
from tests.test_round_faults import exported_tasks, round_inputs
from training.rounds import learn

pytestmark = [pytest.mark.engine, pytest.mark.skipif(HAPROXY_MISSING is not None, reason=HAPROXY_MISSING or "")]
PROJECT = "61"
CHAT = "/v1/chat/completions"


def start_replicas(tiny_model_dir: Path, model_dir: Path, logs: Path) -> list[EngineProcess]:
    """Two engines started at once (each about 40 s on CPU), with one MODEL_DIR, so one adapters directory."""
    engines = [
        EngineProcess(Settings(model=str(tiny_model_dir), served_model_name=TINY_NAME, engine_port=free_port(),
                               engine_max_model_len=1024, model_dir=model_dir, engine_start_timeout=400),
                      log_path=logs / f"engine-{name}.log")
        for name in ("a", "b")
    ]
    errors: list[BaseException] = []

    def start(engine: EngineProcess) -> None:
        try:
            engine.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for engine in engines:
            engine.stop()
        raise errors[0]
    return engines


def chat_requests(engine: EngineProcess) -> int:
    """POSTs to /v1/chat/completions the engine answered, from its own (uvicorn) access log."""
    return len(re.findall(rf'"POST {CHAT} HTTP/1.1"', engine.log_path.read_text(errors="replace")))


def settled(read, timeout: float = 10.0):
    """`read()` once two reads a second apart agree (log lines are written asynchronously)."""
    deadline, last = time.monotonic() + timeout, read()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_a_promoted_version_is_served_by_every_replica_behind_the_balancer(tiny_model_dir, tiny_rm_base, tmp_path):
    model_dir = tmp_path / "model_dir"
    engines = start_replicas(tiny_model_dir, model_dir, tmp_path)
    try:
        with HAProxy({"a": engines[0].url, "b": engines[1].url}, tmp_path / "haproxy") as proxy:
            # the worker's round, against the balancer: publishes the adapter into MODEL_DIR/adapters and promotes
            settings = make_settings(model_dir, proxy.url, model=str(tiny_model_dir), policy_algo="sft", rm_ensemble=1,
                                     rm_base=str(tiny_rm_base), eval_min_tasks=1, min_pairs=1)
            outcome = learn(round_inputs(settings, PROJECT, exported_tasks(30)), settings, lambda *a, **k: None)
            assert outcome.get("promoted"), outcome
            version = outcome["version"]

            def counts():
                logged = [r for r in proxy.requests() if r.path == CHAT]
                return ([sum(r.server == name for r in logged) for name in ("a", "b")],
                        [chat_requests(engine) for engine in engines])

            proxied_before, answered_before = settled(counts)
            xml, tasks = load_config("sentiment")
            body = {"tasks": [{**tasks[i % 3], "id": i} for i in range(12)], "label_config": xml, "project": f"{PROJECT}.1"}
            with run_backend(proxy.url, model_dir, tmp_path / "serve.log") as (url, _):
                response = httpx.post(f"{url}/predict", json=body, timeout=300)
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert len(results) == 12 and all(p["model_version"] == version for ranked in results for p in ranked), results

            proxied_after, answered_after = settled(counts)
            proxied = [after - before for after, before in zip(proxied_after, proxied_before)]
            answered = [after - before for after, before in zip(answered_after, answered_before)]
            assert all(n > 0 for n in proxied), f"the balancer sent /predict's engine requests to only one replica: {proxied}"
            # every request a replica answered came through the balancer: the backend never called a replica itself
            assert answered == proxied, f"replicas answered {answered}, the balancer forwarded {proxied}"
            assert not [r for r in proxy.requests() if "lora" in r.path], "an adapter was loaded explicitly"
            adapter = next(p for p in (model_dir / "adapters").iterdir() if p.name.startswith(version + "-"))
            for engine in engines:  # each replica found the adapter by itself, through vLLM's resolver plugin
                log = engine.log_path.read_text(errors="replace")
                assert f"Resolved and loaded LoRA adapter '{adapter.name}'" in log, engine.log_tail()
    finally:
        for engine in engines:
            engine.stop()
