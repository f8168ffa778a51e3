"""Learning curve: top-1 accuracy of the SERVED ranking on held-out tasks versus the number of human
choices, on ../shared/data/sentiment (UCI Sentiment Labelled Sentences, Kotzias et al., KDD 2015).

Simulated annotators see the backend's candidates and pick the one matching the gold label. Each round
runs the real training-round code the RQ job runs (snapshot -> reward model -> evaluation gate ->
promotion, `training.rounds.learn`) with the real engine. Held-out: the 20% of reviews the task-hash split
holds out (never trained on); their gold labels are what the gate and this curve score against.
Prints JSON (accuracy and wall time per round, the base model's accuracy as the baseline measured in the
same run) and writes a PNG.

    .venv/bin/python bench/learning_curve.py [--choices 25,50,100,200,400] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.label_config import compile_label_config  # noqa: E402
from backend.registry import VersionReader  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.common import start_engine  # noqa: E402
from training.evaluate import EvalTask, evaluate, is_heldout  # noqa: E402
from training.export import ProjectExport  # noqa: E402
from training.preferences import derive  # noqa: E402
from training.report import plot_learning_curve  # noqa: E402
from training.rounds import RoundInputs, learn  # noqa: E402
from training.snapshot import write_snapshot  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "sentiment"
LABELS = ("Positive", "Negative")  # the data is binary
CONFIG = (
    '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
    + "".join(f'<Choice value="{label}"/>' for label in LABELS)
    + "</Choices></View>"
)
PROJECT = "1001"


def load_reviews(seed: int) -> list[dict]:
    if not DATA.exists():
        sys.exit(f"needs the sentiment data in {DATA}")
    rows = []
    for path in sorted(DATA.glob("*_labelled.txt")):
        for line in path.read_text(errors="replace").splitlines():
            text, _, label = line.rpartition("\t")
            if text.strip() and label.strip() in ("0", "1"):
                rows.append({"text": text.strip(), "gold": LABELS[0] if label.strip() == "1" else LABELS[1]})
    random.Random(seed).shuffle(rows)
    return [{"id": i, **row} for i, row in enumerate(rows, start=1)]


def region(label: str) -> list[dict]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def annotated(review: dict) -> dict:
    """The Label Studio export of a task whose annotator picked the candidate matching gold."""
    predictions = [{"id": 10 * review["id"] + k, "result": region(label), "score": 0.5} for k, label in enumerate(LABELS)]
    picked = next(p for p in predictions if p["result"][0]["value"]["choices"] == [review["gold"]])
    annotation = {"id": review["id"], "result": region(review["gold"]), "was_cancelled": False,
                  "completed_by": 1, "parent_prediction": picked["id"]}
    return {"id": review["id"], "data": {"text": review["text"]}, "annotations": [annotation], "predictions": predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", default="25,50,100,200,400")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-url", help="a running engine serving --model as --model-name")
    parser.add_argument("--model", help="policy model directory (default: a tiny random model)")
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--max-heldout", type=int, default=400, help="cap on held-out tasks scored per round")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dataengine-curve-"))
    engine = start_engine(workdir, engine_url=args.engine_url, model=args.model, model_name=args.model_name)
    settings = Settings(model=engine.model or "tiny", served_model_name=args.model_name, engine_url=engine.url,
                        model_dir=workdir / "model_dir", eval_min_tasks=1, min_pairs=1, policy_algo="none")
    reviews = load_reviews(args.seed)
    heldout = [r for r in reviews if is_heldout(r["id"])][: args.max_heldout]
    pool = [r for r in reviews if not is_heldout(r["id"])]
    config = compile_label_config(CONFIG, settings=settings)
    eval_tasks = [EvalTask({"id": r["id"], "data": {"text": r["text"]}}, region(r["gold"])) for r in heldout]
    reader = VersionReader(settings.projects_dir, settings.model_name)
    try:
        baseline = evaluate(settings, config, reader.current(PROJECT), eval_tasks).top1
        points = []
        for choices in [int(c) for c in args.choices.split(",")]:
            started = time.monotonic()
            tasks = [annotated(r) for r in pool[:choices] + heldout]
            derived = derive(tasks, CONFIG)
            snapshot = write_snapshot(settings.projects_dir / PROJECT, derived, {"source": "bench"})
            exported = ProjectExport(PROJECT, CONFIG, "", tasks)
            outcome = learn(RoundInputs(PROJECT, exported, derived, snapshot), settings, lambda stage, **kw: None)
            served = evaluate(settings, config, reader.current(PROJECT), eval_tasks)
            candidate = (outcome.get("evaluation") or {}).get("candidate", {})
            points.append({
                "choices": choices,
                "served_top1": served.top1,
                "candidate_top1": candidate.get("top1", served.top1),
                "promoted": outcome.get("promoted", False),
                "version": reader.current(PROJECT).name,
                "rm_heldout_pair_accuracy": _rm_accuracy(settings, outcome),
                "rm_only_top1": _rm_only_top1(outcome, reader.current(PROJECT), derived),
                "round_seconds": round(time.monotonic() - started, 1),
            })
            print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    finally:
        engine.stop()
    out = Path(args.out)
    png = plot_learning_curve(points, out / "learning_curve.png", "sentiment: served top-1 vs human choices", baseline)
    report = {"heldout_tasks": len(eval_tasks), "baseline_top1": baseline, "points": points,
              "targets": {"100": 0.85, "400": 0.90}, "png": str(png), "seed": args.seed}
    (out / "learning_curve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _rm_only_top1(outcome: dict, version, derived) -> float | None:
    """Top-1 on the held-out tasks when the reward model alone ranks the two labels (no blend with the
    policy's own scores): one pair per held-out task here, so its pairwise accuracy is that top-1."""
    if not outcome.get("promoted") or not version.reward_model_path:
        return None
    from backend.reward_scoring import RewardModel
    from training.reward_model import default_render, pairwise_accuracy

    pairs = [p for p in derived.pairs if is_heldout(p.task_id)]
    scorer = RewardModel.load(version.reward_model_path)
    rendered = [default_render(p) for p in pairs]
    accuracy = pairwise_accuracy(scorer.score([c for c, _ in rendered]), scorer.score([r for _, r in rendered]))
    return None if accuracy is None else round(accuracy, 4)


def _rm_accuracy(settings: Settings, outcome: dict) -> float | None:
    version = outcome.get("version")
    if not version:
        return None
    record = json.loads((settings.projects_dir / PROJECT / "versions" / version / "version.json").read_text())
    return record["metrics"]["reward_model"].get("pairwise_accuracy_heldout")


if __name__ == "__main__":
    main()
