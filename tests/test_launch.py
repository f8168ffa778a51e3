"""A round's training under `accelerate launch` (issue 17, section 3): 2 processes on CPU (DDP over gloo), the tiny
policy model and a tiny reward-model encoder. The launched round writes the same files and the same registry record
as the single-process one, its progress reaches the RQ job, and a failing process fails the job with its own
message.

Real parts: the real round (`training.rounds.learn`: reward model, SFT policy, gate through the session engine,
promotion), the real launcher (accelerate, torchrun) and real RQ jobs on a real Redis database (`is_async=False`:
the job runs in this process, so its progress and failure are read back from Redis as a worker would leave them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from tests.conftest import make_settings, redis_db
from tests.test_round_faults import exported_tasks, round_inputs
from training.jobs import report_progress
from training.launch import LaunchError
from training.registry import Registry
from training.rounds import learn

pytestmark = pytest.mark.engine
REDIS_URL = redis_db(3)  # this file's own database
PROJECT = "71"


def round_settings(model_dir: Path, engine_url: str, tiny_model_dir, rm_base, processes: int):
    return make_settings(model_dir, engine_url, model=str(tiny_model_dir), policy_algo="sft", rm_ensemble=1,
                         rm_base=str(rm_base), eval_min_tasks=1, min_pairs=1, train_processes=processes)


def published(settings, outcome) -> tuple[dict, list[str]]:
    record = Registry(settings.projects_dir, PROJECT, settings.model_name).get(outcome["version"])
    root = Path(settings.projects_dir) / PROJECT / "versions" / record.name
    return json.loads((root / "version.json").read_text()), sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_two_process_round_writes_what_a_one_process_round_writes(tmp_path, engine_url, tiny_model_dir, tiny_rm_base):
    records, files, events = {}, {}, {}
    for processes in (1, 2):
        settings = round_settings(tmp_path / f"p{processes}", engine_url, tiny_model_dir, tiny_rm_base, processes)
        seen = events[processes] = []
        outcome = learn(round_inputs(settings, PROJECT, exported_tasks(30)), settings,
                        lambda stage, **detail: seen.append((stage, detail.get("phase"))))
        assert outcome.get("promoted"), outcome
        records[processes], files[processes] = published(settings, outcome)
    one, two = records[1], records[2]
    assert files[1] == files[2] and "adapter/adapter_model.safetensors" in files[2] and "reward_model/model.safetensors" in files[2]
    assert one.keys() == two.keys() and one["name"] == two["name"] and one["snapshot_hash"] == two["snapshot_hash"]
    assert two["adapter_name"].startswith(two["name"] + "-")
    assert set(two["metrics"]) - set(one["metrics"]) == {"launch"}
    assert two["metrics"]["launch"] == {"processes": 2, "distributed_type": "MULTI_CPU", "accelerate_config": None}
    for model in ("reward_model", "policy"):
        assert one["metrics"][model].keys() == two["metrics"][model].keys(), model
    # the same optimizer steps: each process takes half of every batch
    assert one["metrics"]["reward_model"]["steps"] == two["metrics"]["reward_model"]["steps"] > 0
    assert one["metrics"]["policy"]["sft"]["steps"] == two["metrics"]["policy"]["sft"]["steps"] > 0
    # progress from inside the launched processes reached the round, in the same order
    inside = [("reward_model", "start"), ("reward_model", "done"), ("policy", "sft")]
    for wanted in (inside, [("evaluate", None), ("promoted", None)]):
        assert all(step in events[2] for step in wanted), events[2]
    assert [stage for stage, _ in events[1]] == [stage for stage, _ in events[2]]


def test_a_failing_process_fails_the_rq_job_with_its_own_message(tmp_path, engine_url, tiny_model_dir):
    from transformers import AutoTokenizer

    missing = tmp_path / "no-reward-model-here"
    with pytest.raises(Exception) as expected:  # what the launched process meets, met here too
        AutoTokenizer.from_pretrained(str(missing))
    settings = round_settings(tmp_path / "model_dir", engine_url, tiny_model_dir, missing, 2)
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    try:
        queue = Queue("launch-test", connection=redis, is_async=False)
        job = queue.enqueue(learn, round_inputs(settings, PROJECT, exported_tasks(30)), settings, report_progress)
        job.refresh()
        assert job.is_failed
        error = job.latest_result().exc_string
        assert LaunchError.__name__ in error and "2 processes failed" in error, error
        assert str(expected.value).splitlines()[0] in error, error  # the child's own message
        assert job.meta["progress"]["stage"] == "reward_model"  # forwarded from the launched process
    finally:
        redis.flushdb()
