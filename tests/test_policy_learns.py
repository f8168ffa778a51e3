"""The annotator LM itself learns: the embedded SmolLM2-135M-Instruct, served by the real vLLM engine, goes
through one real training round (the default policy update: TRL SFT of a LoRA adapter in the prompt format
/predict uses, picked by DATAENGINE_POLICY_ALGO=auto on this CPU host) on 64 sentiment choices, and its own
top-1 (reward model off) on reviews it never saw rises by a wide margin over the calibrated base model.

Data: tests/data/sentiment_reviews.tsv (240 labelled review sentences; source in the file's header). The
reward model trains on a tiny random encoder here: this test is about the policy (the reward model's own
learning is tests/test_reward_model.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend.engine_process import EngineProcess
from backend.registry import VersionReader
from backend.settings import EMBEDDED_MODEL
from tests.conftest import REPO, free_port, make_settings
from training.evaluate import EvalTask, is_heldout, rank_heldout, score_ranking
from training.export import ProjectExport
from training.preferences import derive
from training.rounds import RoundInputs, learn
from training.snapshot import write_snapshot

pytestmark = pytest.mark.engine

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices></View>"""
TRAIN_CHOICES = 64


def reviews() -> list[dict]:
    lines = (REPO / "tests" / "data" / "sentiment_reviews.tsv").read_text().splitlines()
    rows = [line.split("\t", 2) for line in lines if line and not line.startswith("#")]
    return [{"id": i, "text": text, "gold": label} for i, (label, _, text) in enumerate(rows, start=1)]


def choice(label: str) -> list[dict]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def annotated(review: dict) -> dict:
    predictions = [{"id": 10 * review["id"] + k, "result": choice(label), "score": 0.5} for k, label in enumerate(("Positive", "Negative"))]
    picked = next(p["id"] for p in predictions if p["result"] == choice(review["gold"]))
    annotation = {"id": review["id"], "result": choice(review["gold"]), "was_cancelled": False, "completed_by": 1,
                  "parent_prediction": picked}
    return {"id": review["id"], "data": {"text": review["text"]}, "annotations": [annotation], "predictions": predictions}


@pytest.fixture(scope="module")
def smollm_engine(tmp_path_factory):
    """The embedded model in its own engine (DATAENGINE_TEST_SMOLLM_URL: one already serving it by its name)."""
    from training.embedded_model import materialize

    settings = make_settings(tmp_path_factory.mktemp("smol-engine"), model=EMBEDDED_MODEL, served_model_name="")
    model_dir = materialize(settings.embedded_model_dir)  # set-up has written it; a no-op then
    external = os.environ.get("DATAENGINE_TEST_SMOLLM_URL")
    if external:
        yield external, model_dir
        return
    engine = EngineProcess(settings.model_copy(update={"engine_port": free_port(), "engine_max_model_len": 2048,
                                                       "engine_start_timeout": 600}))
    engine.start()
    yield engine.url, model_dir
    engine.stop()


def test_one_short_round_makes_the_policy_itself_much_better(smollm_engine, tmp_path, tiny_rm_base):
    url, model_dir = smollm_engine
    settings = make_settings(tmp_path / "model_dir", url, model=str(model_dir), served_model_name=EMBEDDED_MODEL,
                             rm_base=str(tiny_rm_base), rm_ensemble=1, eval_min_tasks=1, min_pairs=1)
    everything = reviews()
    train = [r for r in everything if not is_heldout(r["id"])][:TRAIN_CHOICES]
    heldout = [r for r in everything if is_heldout(r["id"])]  # the gate's tasks
    unseen = [r for r in everything if r not in train and r not in heldout]  # never in the round at all
    tasks = [annotated(r) for r in train + heldout]
    derived = derive(tasks, CONFIG)
    snapshot = write_snapshot(Path(settings.projects_dir) / "61", derived, {"source": "test"})
    exported = ProjectExport("61", CONFIG, "", tasks)

    outcome = learn(RoundInputs("61", exported, derived, snapshot), settings, lambda stage, **detail: print(stage, detail))

    reader = VersionReader(settings.projects_dir, settings.model_name)
    version = reader.current("61")
    assert outcome["promoted"] and version.adapter, outcome
    policy = outcome["heldout"]["policy"]["top1"]
    assert policy >= outcome["heldout"]["current"]["top1"] + 0.1, outcome["heldout"]

    from backend.label_config import compile_label_config

    config = compile_label_config(CONFIG, settings=settings)
    eval_tasks = [EvalTask({"id": r["id"], "data": {"text": r["text"]}}, choice(r["gold"])) for r in unseen]
    before = score_ranking(rank_heldout(settings, config, reader.base, eval_tasks), 0.0).top1
    after = score_ranking(rank_heldout(settings, config, version, eval_tasks), 0.0).top1
    print(f"policy top-1 on {len(unseen)} unseen reviews: base {before:.3f} -> after {TRAIN_CHOICES} choices {after:.3f}")
    assert after >= 0.8 and after >= before + 0.15, (before, after)
