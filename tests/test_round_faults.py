"""A training round survives bad held-out tasks and cleans up after itself (issue: one bad held-out task
failed every round of a project forever, and each retry left an orphan version).

Real engine (the session's tiny model), real TRL reward model (on a tiny random encoder, one member), no
policy update: what is under test is the gate around them."""
from __future__ import annotations

from pathlib import Path

import pytest

from backend.engine_client import EngineClient
from backend.errors import EngineUnavailable
from tests.conftest import make_settings
from tests.slow_proxy import SlowProxy
from training.evaluate import is_heldout
from training.export import ProjectExport
from training.preferences import derive
from training.registry import Registry
from training.rounds import RoundInputs, learn
from training.snapshot import write_snapshot

pytestmark = pytest.mark.engine

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices></View>"""
WORDS = ("good", "great", "fine", "lovely") , ("bad", "awful", "poor", "broken")


def choice(label: str) -> list[dict]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def exported_tasks(count: int, long_heldout: int | None = None) -> list[dict]:
    tasks = []
    for i in range(1, count + 1):
        gold = "Positive" if i % 2 else "Negative"
        text = f"The food was {WORDS[i % 2 == 0][i % 4]} and the service {WORDS[i % 2 == 0][(i + 1) % 4]}."
        if i == long_heldout:  # far past the engine's 4,096-token context, well under DATAENGINE_MAX_TEXT_CHARS
            text = " ".join(["word"] * 9000)
        predictions = [{"id": 10 * i + k, "result": choice(label), "score": 0.5} for k, label in enumerate(("Positive", "Negative"))]
        picked = next(p["id"] for p in predictions if p["result"] == choice(gold))
        annotation = {"id": i, "result": choice(gold), "was_cancelled": False, "completed_by": 1, "parent_prediction": picked}
        tasks.append({"id": i, "data": {"text": text}, "annotations": [annotation], "predictions": predictions})
    return tasks


def round_inputs(settings, project: str, tasks: list[dict]) -> RoundInputs:
    derived = derive(tasks, CONFIG)
    snapshot = write_snapshot(Path(settings.projects_dir) / project, derived, {"source": "test"})
    return RoundInputs(project, ProjectExport(project, CONFIG, "", tasks), derived, snapshot)


def fast_settings(tmp_path, engine_url, rm_base):
    return make_settings(tmp_path / "model_dir", engine_url, policy_algo="none", rm_ensemble=1, rm_base=str(rm_base),
                         eval_min_tasks=1, min_pairs=1)


def test_a_held_out_task_the_engine_refuses_is_skipped_and_counted(tmp_path, engine_url, tiny_rm_base):
    long_task = next(i for i in range(1, 60) if is_heldout(i))
    settings = fast_settings(tmp_path, engine_url, tiny_rm_base)
    outcome = learn(round_inputs(settings, "41", exported_tasks(60, long_heldout=long_task)), settings, lambda *a, **k: None)
    candidate = outcome["evaluation"]["candidate"]
    assert candidate["failed"] == 1 and candidate["tasks"] == sum(is_heldout(i) for i in range(1, 61)) - 1, candidate
    assert outcome["evaluation"]["current"]["failed"] == 1


def test_the_gate_ranks_at_most_eval_max_tasks_held_out_tasks(tmp_path, engine_url, tiny_rm_base):
    tasks = exported_tasks(120)
    heldout = [t["id"] for t in tasks if is_heldout(t["id"])]
    settings = fast_settings(tmp_path, engine_url, tiny_rm_base).model_copy(update={"eval_max_tasks": 6})
    assert len(heldout) > 12
    outcome = learn(round_inputs(settings, "44", tasks), settings, lambda *a, **k: None)
    assert outcome["heldout"]["tasks"] == {"scored": 6, "failed": 0}
    assert outcome["evaluation"]["candidate"]["tasks"] == outcome["evaluation"]["current"]["tasks"] == 6


def test_a_round_that_fails_in_the_gate_leaves_no_orphan_version(tmp_path, engine_url, tiny_rm_base, monkeypatch):
    settings = fast_settings(tmp_path, engine_url, tiny_rm_base)

    def engine_gone(*args, **kwargs):
        raise EngineUnavailable("the engine is gone")

    monkeypatch.setattr(EngineClient, "score_options", engine_gone)
    with pytest.raises(EngineUnavailable):
        learn(round_inputs(settings, "42", exported_tasks(30)), settings, lambda *a, **k: None)
    versions = Path(settings.projects_dir) / "42" / "versions"
    assert not [p for p in versions.glob("*") if p.is_dir()], list(versions.glob("*"))
    assert Registry(settings.projects_dir, "42", settings.model_name).current_name() is None


def test_the_gate_waits_for_an_engine_slower_than_the_interactive_timeout(tmp_path, engine_url, tiny_rm_base):
    """Found by the NER learning curve on 2 cores: the gate's batch of held-out tasks (16 in flight) queued each
    engine request past DATAENGINE_ENGINE_REQUEST_TIMEOUT, which is there for Label Studio's interactive /predict,
    and every round failed with EngineUnavailable. Batch work has its own, longer timeout."""
    with SlowProxy(engine_url, delay=1.5) as slow:
        settings = fast_settings(tmp_path, slow.url, tiny_rm_base).model_copy(
            update={"engine_request_timeout": 0.5, "engine_batch_timeout": 60.0})
        outcome = learn(round_inputs(settings, "43", exported_tasks(30)), settings, lambda *a, **k: None)
    evaluation = outcome["evaluation"]
    assert evaluation["candidate"]["failed"] == 0 and evaluation["current"]["failed"] == 0, evaluation
    assert evaluation["candidate"]["tasks"] == sum(is_heldout(i) for i in range(1, 31)), evaluation
