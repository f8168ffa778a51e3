"""What labelling costs: engine tokens and engine seconds per task, counted from the real tiny vLLM engine's
own `usage` fields, kept in the real Redis per project and model version, and shown in /metrics, the
prelabel summary and `dataengine report`. Label Studio is the recording stand-in of tests/test_ranking.py
(the prelabel run only lists tasks and imports predictions through it; tests/e2e cover the real server)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from backend.app import create_app
from backend.engine_client import EngineClient
from backend.label_config import compile_label_config
from backend.prompts import build_choice_messages, build_messages, option_answer
from backend.usage import OVERFLOW_PROJECT, Usage, UsageStore, usage_rows
from tests.conftest import TINY_NAME, flushed_redis, load_config, make_settings, redis_db
from tests.test_ranking import FakeLabelStudio
from dataengine.cli import main as dataengine
from training.prelabel import PrelabelOptions, Prelabeler

REDIS_URL = redis_db(4)  # this file's own database, flushed per test
VERSION = f"{TINY_NAME}-base"


@pytest.fixture
def redis():
    with flushed_redis(REDIS_URL) as connection:
        yield connection


def make_settings_for(engine_url: str, tmp_path: Path | None = None):
    return make_settings(tmp_path or Path("/nonexistent"), engine_url, redis_url=REDIS_URL)


def engine_tokens(engine_url: str, messages: list[dict], **extra) -> int:
    """The prompt's length as the engine's own tokenizer counts it (vLLM /tokenize with chat messages)."""
    body = {"model": TINY_NAME, "messages": messages, "add_generation_prompt": True, **extra}
    response = httpx.post(f"{engine_url}/tokenize", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["count"]


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for s in family.samples
    }


def cost(samples, counter: str, project: str, source: str, version: str = VERSION) -> float:
    labels = tuple(sorted({"project": project, "model_version": version, "source": source}.items()))
    return samples.get((f"dataengine_engine_{counter}_total", labels), 0.0)


@pytest.mark.engine
def test_sampling_usage_is_the_engines_own_count(engine_url):
    xml, tasks = load_config("summary")
    config = compile_label_config(xml, settings=make_settings_for(engine_url))
    texts = config.read_task(tasks[0], 50_000)
    messages = build_messages(config, texts)
    engine = EngineClient(engine_url, TINY_NAME)
    usage = Usage()
    samples = engine.sample(messages, config.schema(texts), n=3, temperature=1.0, max_tokens=24, usage=usage)
    assert usage.requests == 1 and usage.engine_seconds > 0
    assert usage.prompt_tokens == engine_tokens(engine_url, messages)  # the prompt once, not once per sample
    assert usage.completion_tokens == sum(s.tokens for s in samples) > 0  # every sample's tokens


@pytest.mark.engine
def test_option_scoring_counts_every_request_it_makes(engine_url):
    xml, tasks = load_config("sentiment")  # Negative / Neutral share a prefix: a follow-up request when it holds mass
    config = compile_label_config(xml, settings=make_settings_for(engine_url))
    control = config.enumerable_control(16)
    texts = config.read_task(tasks[0], 50_000)
    messages = build_choice_messages(config, texts, control, [control.describe_option(o) for o in control.options()])
    answers = [option_answer(o) for o in control.options()]
    calls = []
    engine = EngineClient(engine_url, TINY_NAME)
    send = engine._send
    engine._send = lambda url, payload: calls.append(payload) or send(url, payload)  # counts what goes out
    usage = Usage()
    engine.score_options(messages, answers, usage=usage)
    assert usage.requests == len(calls) >= 1
    assert usage.completion_tokens == len(calls)  # one constrained token each
    first = engine_tokens(engine_url, messages)
    assert usage.prompt_tokens >= first * len(calls)  # follow-ups carry the prompt plus the assistant prefix


@pytest.mark.engine
def test_predict_counts_tokens_per_project_and_version_in_metrics(tmp_path, redis, engine_url):
    xml, tasks = load_config("sentiment")
    client = create_app(make_settings_for(engine_url, tmp_path), EngineClient(engine_url, TINY_NAME)).test_client()
    body = {"tasks": tasks, "label_config": xml, "project": "7.1700000000"}
    assert client.post("/predict", json=body).status_code == 200
    once = scrape(client)
    assert cost(once, "tasks", "7", "predict") == len(tasks)
    assert cost(once, "prompt_tokens", "7", "predict") > 0 and cost(once, "completion_tokens", "7", "predict") > 0
    assert cost(once, "requests", "7", "predict") >= len(tasks) and cost(once, "seconds", "7", "predict") > 0
    assert client.post("/predict", json=body).status_code == 200  # deterministic: the same work again
    twice = scrape(client)
    assert cost(twice, "prompt_tokens", "7", "predict") == 2 * cost(once, "prompt_tokens", "7", "predict")
    assert cost(twice, "tasks", "8", "predict") == 0  # per project


@pytest.mark.engine
def test_prelabel_run_counts_its_usage_in_metrics_and_prints_the_cost_of_1000_tasks(tmp_path, redis, engine_url):
    tasks = [{"id": i, "data": {"text": f"Review number {i}: the room was clean."}} for i in range(1, 7)]
    settings = make_settings_for(engine_url, tmp_path)
    prelabeler = Prelabeler(settings, engine=EngineClient(engine_url, TINY_NAME), ls=FakeLabelStudio("sentiment", tasks))
    try:
        summary = prelabeler.run(PrelabelOptions("5")).as_dict()
    finally:
        prelabeler.close()
    usage = summary["usage"]
    assert summary["done"] == 6 and usage["tasks"] == 6 and usage["prompt_tokens"] > 0
    per_1000 = usage["per_1000_tasks"]
    assert per_1000["prompt_tokens"] == pytest.approx(usage["prompt_tokens"] * 1000 / 6, rel=1e-3)
    assert per_1000["completion_tokens"] == pytest.approx(usage["completion_tokens"] * 1000 / 6, rel=1e-3)
    assert per_1000["engine_seconds"] > 0 and per_1000["wall_seconds"] > 0

    samples = scrape(create_app(settings, EngineClient(engine_url, TINY_NAME)).test_client())
    assert cost(samples, "tasks", "5", "prelabel") == 6
    assert cost(samples, "prompt_tokens", "5", "prelabel") == usage["prompt_tokens"]
    assert cost(samples, "completion_tokens", "5", "prelabel") == usage["completion_tokens"]
    assert cost(samples, "requests", "5", "prelabel") == usage["requests"]


def test_report_prints_tokens_and_engine_seconds_per_1000_tasks_per_version(tmp_path, redis, monkeypatch, capsys, fresh_settings):
    store = UsageStore(redis, max_projects=10)
    store.record("5", VERSION, "prelabel", Usage(requests=8, prompt_tokens=800, completion_tokens=8, engine_seconds=2.0), tasks=4)
    store.record("5", VERSION, "predict", Usage(requests=2, prompt_tokens=200, completion_tokens=2, engine_seconds=0.5), tasks=1)
    store.record("5", "tiny-v2", "predict", Usage(requests=1, prompt_tokens=50, completion_tokens=40, engine_seconds=1.0), tasks=2)
    store.record("6", VERSION, "predict", Usage(requests=1, prompt_tokens=1, completion_tokens=1, engine_seconds=1.0), tasks=1)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("DATAENGINE_SERVED_MODEL_NAME", TINY_NAME)
    assert dataengine(["report", "--project", "5", "--out", str(tmp_path / "reports")]) == 0
    report = json.loads((tmp_path / "reports" / "report-project-5.json").read_text())
    base, v2 = report["cost"][VERSION], report["cost"]["tiny-v2"]
    assert base["tasks"] == 5 and base["per_1000_tasks"] == {"prompt_tokens": 200_000.0, "completion_tokens": 2_000.0,
                                                             "engine_seconds": 500.0}
    assert base["sources"]["prelabel"]["per_1000_tasks"]["prompt_tokens"] == 200_000.0
    assert v2["per_1000_tasks"] == {"prompt_tokens": 25_000.0, "completion_tokens": 20_000.0, "engine_seconds": 500.0}
    printed = capsys.readouterr().out
    assert "cost per 1,000 tasks" in printed and "200,000" in printed and "tiny-v2" in printed


def test_projects_beyond_the_limit_are_counted_together_and_redis_trouble_never_raises(redis):
    store = UsageStore(redis, max_projects=2)
    for project in ("1", "2", "3", "4"):
        store.record(project, VERSION, "predict", Usage(requests=1, prompt_tokens=10), tasks=1)
    rows = {row.project: row for row in usage_rows(redis)}
    assert sorted(rows) == ["1", "2", OVERFLOW_PROJECT] and rows[OVERFLOW_PROJECT].tasks == 2
    down = UsageStore(Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5), max_projects=2)
    assert down.record("1", VERSION, "predict", Usage(requests=1), tasks=1) is False
    with pytest.raises(ValueError):
        store.record("1", VERSION, "training", Usage(requests=1), tasks=1)
