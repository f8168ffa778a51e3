"""A whole learning round on real data, in process: annotated tasks -> pairs -> reward model (TRL, MiniLM)
-> evaluation gate on held-out tasks through the real engine -> promotion -> /predict serves the new
version with the reward model reranking its candidates."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from backend.registry import VersionReader
from tests.conftest import REPO, TINY_NAME
from training.evaluate import is_heldout
from training.preferences import derive
from training.rounds import RoundInputs, learn
from training.export import ProjectExport
from training.snapshot import write_snapshot

pytestmark = pytest.mark.engine

SENTIMENT_DATA = REPO.parent / "shared" / "data" / "sentiment"
CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices></View>"""


def reviews(count: int) -> list[tuple[str, str]]:
    if not SENTIMENT_DATA.exists():
        pytest.skip(f"needs the sentiment data in {SENTIMENT_DATA}")
    rows = []
    for path in sorted(SENTIMENT_DATA.glob("*_labelled.txt")):
        for line in path.read_text(errors="replace").splitlines():
            text, _, label = line.rpartition("\t")
            if text.strip() and label.strip() in ("0", "1"):
                rows.append((text.strip(), "Positive" if label.strip() == "1" else "Negative"))
    random.Random(7).shuffle(rows)
    return rows[:count]


def choice(label: str) -> list[dict]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def annotated_tasks(rows) -> list[dict]:
    """What Label Studio exports after annotators picked the gold label among the two candidates."""
    tasks = []
    for i, (text, gold) in enumerate(rows, start=1):
        predictions = [{"id": 10 * i + k, "result": choice(label), "score": 0.5} for k, label in enumerate(("Positive", "Negative"))]
        picked = next(p for p in predictions if p["result"][0]["value"]["choices"] == [gold])
        annotation = {"id": i, "result": choice(gold), "was_cancelled": False, "completed_by": 1, "parent_prediction": picked["id"]}
        tasks.append({"id": i, "data": {"text": text}, "annotations": [annotation], "predictions": predictions})
    return tasks


def test_round_trains_promotes_and_serves_a_better_ranking(settings, client):
    rows = reviews(100)
    tasks = annotated_tasks(rows)
    derived = derive(tasks, CONFIG)
    assert len(derived.pairs) == len(tasks)  # gold > the other label, once per task
    project_dir = Path(settings.projects_dir) / "31"
    snapshot = write_snapshot(project_dir, derived, {"source": "test"})
    progress_log = []
    exported = ProjectExport(project="31", label_config=CONFIG, instructions="", tasks=tasks)
    outcome = learn(RoundInputs("31", exported, derived, snapshot), settings, lambda stage, **kw: progress_log.append(stage))

    assert outcome["promoted"], outcome
    evaluation = outcome["evaluation"]
    assert evaluation["candidate"]["tasks"] >= settings.eval_min_tasks
    assert evaluation["candidate"]["top1"] > evaluation["current"]["top1"], evaluation
    assert {"reward_model", "evaluate", "promoted"} <= set(progress_log)
    current = VersionReader(settings.projects_dir, TINY_NAME).current("31")
    assert current.name == outcome["version"] == f"{TINY_NAME}-p31-v1" and current.reward_model_path

    heldout = [t for t in tasks if is_heldout(t["id"])]
    body = {"tasks": [{"id": t["id"], "data": t["data"]} for t in heldout], "label_config": CONFIG, "project": "31.1"}
    served = client.post("/predict", json=body).get_json()
    assert served["model_version"] == current.name
    gold = {t["id"]: t["annotations"][0]["result"][0]["value"]["choices"] for t in heldout}
    hits = sum(preds[0]["result"][0]["value"]["choices"] == gold[t["id"]] for t, preds in zip(heldout, served["results"]))
    assert hits / len(heldout) == pytest.approx(evaluation["candidate"]["top1"], abs=1e-3)  # the gate saw what users get

    again = learn(RoundInputs("31", exported, derived, snapshot), settings, lambda stage, **kw: None)
    assert again == {"skipped": f"no new feedback since {current.name}"}
