"""A learning round for a ranking project, in process: annotators' Ranker results on real sentiment reviews
-> preference pairs -> reward model (TRL, MiniLM) -> gate by pair accuracy on held-out rankings ->
promotion -> the next candidate fill (real engine, tiny model) orders its candidates with that reward model."""
from __future__ import annotations

from pathlib import Path

import pytest

from backend.engine_client import EngineClient
from backend.predictor import Predictor
from backend.candidate_fill import CandidateFiller, FilledTask, item_id
from backend.ranking import compile_ranking_config
from backend.registry import VersionReader, base_version
from tests.conftest import TINY_NAME, load_config, make_settings
from tests.test_learning_round import reviews
from training.evaluate import is_heldout
from training.export import ProjectExport
from training.preferences import derive
from training.registry import Registry
from training.rounds import RoundInputs, learn
from training.snapshot import write_snapshot

pytestmark = pytest.mark.engine

PROJECT = "41"
LABELS = ("Positive", "Negative", "Neutral")


def body(label: str) -> str:
    return f"sentiment: {label}"  # how the filler renders a rank_sentiment candidate


def ranked_task(task_id: int, text: str, gold: str) -> dict:
    """A filled rank_sentiment task an annotator ranked: gold first, Neutral second, the wrong one last."""
    items = [{"id": item_id(body(label)), "title": f"Answer {i + 1}", "body": body(label)} for i, label in enumerate(LABELS)]
    order = [gold, "Neutral", next(label for label in LABELS[:2] if label != gold)]
    ranking = {"from_name": "rank", "to_name": "candidates", "type": "ranker",
               "value": {"ranker": {"rank": [item_id(body(label)) for label in order]}}}
    annotation = {"id": task_id, "result": [ranking], "was_cancelled": False, "completed_by": 1}
    return {"id": task_id, "data": {"text": text, "candidates": items}, "annotations": [annotation], "predictions": []}


def top1(filler: CandidateFiller, config, version, tasks: list[dict], gold: dict[int, str]) -> float:
    hits = 0
    for task in tasks:
        filled = filler.fill(config, {"id": task["id"], "data": {"text": task["data"]["text"]}},
                             version=version, candidates=3, temperature=1.0)
        assert isinstance(filled, FilledTask), filled
        hits += filled.items[0].body == body(gold[task["id"]])
    return hits / len(tasks)


def test_rankings_train_a_reward_model_that_orders_the_next_fills(tmp_path, engine_url):
    settings = make_settings(tmp_path / "model_dir", engine_url, rm_ensemble=1, policy_algo="dpo")
    xml = load_config("rank_sentiment")[0]
    rows = reviews(100)
    tasks = [ranked_task(i, text, gold) for i, (text, gold) in enumerate(rows, start=1)]
    gold = {t["id"]: label for t, (_, label) in zip(tasks, rows)}
    derived = derive(tasks, xml)
    assert len(derived.pairs) == 3 * len(tasks)  # every ordered pair of three ranked items
    snapshot = write_snapshot(Path(settings.projects_dir) / PROJECT, derived, {"source": "test"})
    exported = ProjectExport(project=PROJECT, label_config=xml, instructions="", tasks=tasks)

    outcome = learn(RoundInputs(PROJECT, exported, derived, snapshot), settings, lambda stage, **kw: None)

    assert outcome["promoted"], outcome
    candidate, current = outcome["evaluation"]["candidate"], outcome["evaluation"]["current"]
    assert candidate["metric"] == "pair_accuracy" and current["pair_accuracy"] == 0.5  # the base has no reward model
    assert candidate["pair_accuracy"] > 0.7 and candidate["tasks"] >= settings.eval_min_tasks, outcome
    record = Registry(settings.projects_dir, PROJECT, TINY_NAME).get(outcome["version"])
    assert record.reward_model_path and "label candidates" in record.metrics["policy"]["skipped"]

    served = VersionReader(settings.projects_dir, TINY_NAME).current(PROJECT)
    assert served.name == outcome["version"]
    heldout = [t for t in tasks if is_heldout(t["id"])]
    config = compile_ranking_config(xml, settings=settings)
    predictor = Predictor(settings, EngineClient(engine_url, TINY_NAME))
    try:
        filler = CandidateFiller(predictor)
        before = top1(filler, config, base_version(TINY_NAME), heldout, gold)
        after = top1(filler, config, served, heldout, gold)
    finally:
        predictor.close()
    assert after >= 0.7 and after > before, (before, after)


def response_task(task_id: int, prompt: str) -> dict:
    """A filled ranking.xml task (free-text responses in buckets): the annotator always puts the same polite
    answer in Best, a hedge in Acceptable and a curt refusal in Reject."""
    answers = {"best": "Yes, gladly. Here is a clear answer.", "acceptable": "Maybe, it depends.", "reject": "No."}
    items = [{"id": item_id(text), "title": f"Answer {i + 1}", "body": text} for i, text in enumerate(answers.values())]
    ranking = {"from_name": "rank", "to_name": "candidates", "type": "ranker",
               "value": {"ranker": {bucket: [item_id(text)] for bucket, text in answers.items()}}}
    annotation = {"id": task_id, "result": [ranking], "was_cancelled": False, "completed_by": 1}
    return {"id": task_id, "data": {"prompt": prompt, "candidates": items}, "annotations": [annotation], "predictions": []}


def test_rankings_of_generated_responses_train_the_policy_with_dpo(tmp_path, engine_url, tiny_model_dir, tiny_rm_base):
    """Ranking projects exist to collect RLHF data: the round fine-tunes the policy (SFT on the best response,
    then DPO on the ranked pairs; real TRL on the tiny model) and its implicit reward prefers the human's
    choice on held-out prompts it never saw."""
    settings = make_settings(tmp_path / "model_dir", engine_url, model=str(tiny_model_dir), rm_ensemble=1,
                             rm_base=str(tiny_rm_base), eval_min_tasks=1)
    xml = load_config("ranking")[0]
    tasks = [response_task(i, f"Question {i}: can you help me with task number {i * 7}?") for i in range(1, 81)]
    derived = derive(tasks, xml)
    snapshot = write_snapshot(Path(settings.projects_dir) / "43", derived, {"source": "test"})
    exported = ProjectExport(project="43", label_config=xml, instructions="", tasks=tasks)

    outcome = learn(RoundInputs("43", exported, derived, snapshot), settings, lambda stage, **kw: None)

    record = Registry(settings.projects_dir, "43", TINY_NAME).get(outcome["version"])
    policy = record.metrics["policy"]
    assert policy["algo"] == "dpo" and policy["why"].startswith("auto: CPU"), policy
    assert policy["sft"]["steps"] > 0 and policy["steps"] > 0
    assert policy["heldout_pair_accuracy"]["pairs"] >= 10
    assert policy["heldout_pair_accuracy"]["accuracy"] >= 0.8, policy["heldout_pair_accuracy"]
    assert record.adapter_path and Path(record.adapter_path, "adapter_model.safetensors").is_file()
