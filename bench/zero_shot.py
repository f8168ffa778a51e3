"""Zero-shot (untrained model) top-1 on the shipped sentiment config, through /predict, as the label prior grows.

The shipped `label_config/sentiment.xml` offers Positive, Negative and Neutral; the reviews of
../shared/data/sentiment are only positive or negative. The embedded SmolLM2 scores the three options of every
held-out review (the round split's held-out ids, as bench/learning_curve.py), through the backend's own /predict
and webhook routes, in-process, on the real Redis and the real vLLM engine:
  raw          DATAENGINE_CALIBRATION=none
  batch        batch calibration alone (no annotations yet)
  prior@K      batch calibration and the label prior of K annotations of other reviews, sent as
               ANNOTATION_CREATED webhooks (backend/label_prior.py); no training happens
For each: top-1 against the human label, the confidence AUROC (top score vs correct), and how often each label
is predicted. Prints JSON; writes it to --out.

    .venv/bin/python bench/zero_shot.py [--annotations 10,50,200] [--max-heldout 400] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.label_prior import label_prior_key  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.common import start_engine  # noqa: E402
from bench.learning_curve import sentiment  # noqa: E402
from training.evaluate import is_heldout  # noqa: E402

PROJECT = 900_000 + os.getpid() % 100_000  # a project of its own per run: no calibration estimate left from another
BATCH = 100  # tasks per /predict, as Label Studio's batch retrieval sends them
TARGET = 0.60  # issue 14: zero-shot top-1 on the shipped config with calibration
SHIPPED_CONFIG = REPO / "label_config" / "sentiment.xml"


def auroc(scores: list[float], correct: list[bool]) -> float | None:
    """Probability that a correct prediction is scored above a wrong one (ties count half)."""
    right = [s for s, c in zip(scores, correct) if c]
    wrong = [s for s, c in zip(scores, correct) if not c]
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return round(wins / (len(right) * len(wrong)), 4)


def measure(client, tasks: list[dict]) -> dict:
    """/predict over `tasks` in batches; top-1, AUROC and the predicted labels' counts."""
    picked, scores = [], []
    for start in range(0, len(tasks), BATCH):
        batch = tasks[start:start + BATCH]
        body = {"tasks": [{"id": t["id"], "data": t["data"]} for t in batch], "project": f"{PROJECT}.1700000000"}
        response = client.post("/predict", json=body)
        if response.status_code != 200:
            sys.exit(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
        for ranked in response.get_json()["results"]:
            picked.append(ranked[0]["result"][0]["value"]["choices"][0])
            scores.append(ranked[0]["score"])
    correct = [p == t["gold"][0]["value"]["choices"][0] for p, t in zip(picked, tasks)]
    return {"top1": round(sum(correct) / len(tasks), 4), "auroc": auroc(scores, correct), "predicted": dict(Counter(picked))}


def annotate(client, tasks: list[dict]) -> None:
    for task in tasks:
        annotation = {"id": task["id"], "task": task["id"], "result": task["gold"], "was_cancelled": False}
        response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": PROJECT},
                                                 "task": {"id": task["id"]}, "annotation": annotation})
        if response.status_code != 200:
            sys.exit(f"/webhook answered {response.status_code}: {response.get_data(as_text=True)[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", default="10,50,200", help="label-prior sizes to measure")
    parser.add_argument("--max-heldout", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model directory (default: the embedded model)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "zero_shot.json"))
    args = parser.parse_args()

    model = args.model or str(Settings().embedded_model_dir)
    if not args.model:
        from training.embedded_model import materialize

        materialize(Path(model))
    name = Path(model).name
    dataset = sentiment(args.seed)
    heldout = [t for t in dataset.tasks if is_heldout(t["id"])][:args.max_heldout]
    pool = [t for t in dataset.tasks if not is_heldout(t["id"])]
    workdir = Path(tempfile.mkdtemp(prefix="dataengine-zero-shot-"))
    engine = start_engine(workdir, model=model, model_name=name)
    redis_url = Settings().redis_url
    redis = Redis.from_url(redis_url)
    rows = {}
    try:
        for calibration in ("none", "batch"):
            settings = Settings(model=model, served_model_name=name, engine_url=engine.url, model_dir=workdir / calibration,
                                calibration=calibration, redis_url=redis_url, label_studio_url="", label_studio_api_key="")
            app = create_app(settings)
            client = app.test_client()
            redis.delete(label_prior_key(str(PROJECT)))
            if client.post("/setup", json={"project": PROJECT, "schema": SHIPPED_CONFIG.read_text()}).status_code != 200:
                sys.exit("/setup failed")
            rows["raw" if calibration == "none" else "batch"] = measure(client, heldout)
            if calibration == "batch":
                annotated = 0
                for count in sorted(int(c) for c in args.annotations.split(",")):
                    annotate(client, pool[annotated:count])
                    annotated = count
                    rows[f"prior@{count}"] = measure(client, heldout)
            app.extensions["dataengine"].predictor.close()
            print(json.dumps(rows), file=sys.stderr, flush=True)
    finally:
        redis.delete(label_prior_key(str(PROJECT)))
        engine.stop()
    report = {"model": name, "config": "label_config/sentiment.xml", "heldout_tasks": len(heldout),
              "human_labels": dict(Counter(t["gold"][0]["value"]["choices"][0] for t in heldout)),
              "target_top1": TARGET, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
