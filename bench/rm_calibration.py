"""Reward-model calibration on real data: how many human choices until the RM ranks the right label first?

Data: shared/data/sentiment (yelp + amazon review sentences, label 1/0; UCI "Sentiment Labelled Sentences",
Kotzias et al., KDD 2015). Simulates a 2-label project (Positive/Negative, the shipped sentiment config
without Neutral): each human choice is one review whose annotation is the right label while the model's
prediction was the wrong one, so `training.preferences.derive` yields one pair per choice
((review + right label) > (review + wrong label)), with the real prompt and answer text.

20% of the reviews are a fixed test set, never trained on. For N choices drawn (per seed) from the other 80%,
`train_reward_model` runs as production runs it (its own by-task held-out split included, so it trains on
about 0.8 N pairs), then the saved model is reloaded and scores both labels of every test review.
Metric: top-1 accuracy = share of test reviews where the right label scores higher.

Prints JSON: per N and seed the test accuracy, the trainer's own held-out accuracy, and seconds; the same for
plain RewardTrainer defaults (RewardSettings.trl_defaults(): lr 1e-4, batch 8, 2 epochs) as a baseline.

    .venv/bin/python bench/rm_calibration.py            # N = 50,100,200,400 x seeds 0,1,2, plus baseline
    .venv/bin/python bench/rm_calibration.py --quick    # N = 100,400 x seed 0, baseline at 100 only
    .venv/bin/python bench/rm_calibration.py --set learning_rate=2e-4 --set min_steps=120 --no-baseline
    .venv/bin/python bench/rm_calibration.py --quick --no-baseline --set ensemble=1   # one model: 3x faster

The tuned settings are the production defaults (RewardSettings()): a 3-member ensemble of mean-pooling models.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.preferences import derive  # noqa: E402
from backend.reward_scoring import RewardModel  # noqa: E402
from backend.settings import get_settings  # noqa: E402
from training.reward_model import RewardSettings, default_render, train_reward_model  # noqa: E402

DATA = Path("/work/shared/data/sentiment")
if not DATA.is_dir():
    DATA = REPO.parent / "shared" / "data" / "sentiment"
FILES = ("yelp_labelled.txt", "amazon_cells_labelled.txt")
LABELS = {1: "Positive", 0: "Negative"}
CONFIG = (REPO / "label_config" / "sentiment.xml").read_text().replace(
    '    <Choice value="Neutral" hint="mixed, or no opinion"/>\n', ""
)


def load_reviews() -> list[tuple[str, str, int]]:
    """(task id, sentence, label) for every line of the data files, in file order."""
    reviews = []
    for name in FILES:
        for number, line in enumerate((DATA / name).read_text(encoding="utf-8").splitlines()):
            text, _, label = line.rpartition("\t")
            if text.strip() and label.strip() in ("0", "1"):
                reviews.append((f"{name.split('_')[0]}-{number}", text.strip(), int(label)))
    return reviews


def choice_tasks(reviews: list[tuple[str, str, int]]) -> list[dict]:
    """Label Studio export tasks: the human picked the right label, the model had predicted the wrong one."""
    def region(label: str) -> dict:
        return {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}

    return [
        {
            "id": task_id,
            "data": {"text": text},
            "annotations": [{"id": f"a-{task_id}", "completed_by": 1, "result": [region(LABELS[label])]}],
            "predictions": [{"id": f"p-{task_id}", "result": [region(LABELS[1 - label])]}],
        }
        for task_id, text, label in reviews
    ]


def pairs_for(reviews):
    return derive(choice_tasks(reviews), CONFIG).pairs


def top1_accuracy(model_path: Path, test_pairs) -> float:
    scorer = RewardModel.load(model_path)
    rendered = [default_render(p) for p in test_pairs]
    chosen = scorer.score([c for c, _ in rendered])
    rejected = scorer.score([r for _, r in rendered])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(test_pairs)


def run(settings: RewardSettings, sizes: list[int], seeds: list[int], pool, test_pairs, scratch: Path) -> dict:
    rows: dict[str, dict] = {}
    rm_base = get_settings().rm_base  # DATAENGINE_RM_BASE; empty: the bundled MiniLM encoder
    for size in sizes:
        per_seed = {}
        for seed in seeds:
            chosen_reviews = random.Random(seed).sample(pool, size)
            pairs = pairs_for(chosen_reviews)
            out = scratch / f"rm-{size}-{seed}"
            result = train_reward_model(pairs, out, base=rm_base, settings=dataclasses.replace(settings, seed=seed))
            accuracy = top1_accuracy(out, test_pairs)
            m = result.metrics
            per_seed[seed] = {
                "test_top1": round(accuracy, 4),
                "heldout_pairwise": None if m["pairwise_accuracy_heldout"] is None else round(m["pairwise_accuracy_heldout"], 4),
                "train_pairs": m["train_pairs"], "heldout_pairs": m["heldout_pairs"],
                "epochs": m["epochs"], "steps": m["steps"], "seconds": m["seconds"],
            }
            print(json.dumps({"size": size, "seed": seed, **per_seed[seed]}), file=sys.stderr, flush=True)
        accuracies = [r["test_top1"] for r in per_seed.values()]
        rows[str(size)] = {
            "per_seed": per_seed,
            "mean_test_top1": round(statistics.mean(accuracies), 4),
            "min_test_top1": min(accuracies),
            "mean_seconds": round(statistics.mean(r["seconds"] for r in per_seed.values()), 1),
        }
    return rows


def parse_overrides(items: list[str]) -> dict:
    fields = {f.name: f for f in dataclasses.fields(RewardSettings)}
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(fields)}")
        values[key] = None if raw.lower() == "none" else json.loads(raw) if raw[:1] in "-.0123456789tf[" else raw
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,100,200,400")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="N=100,400, seed 0; baseline at N=100 only")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-sizes", default=None, help="default: the same sizes (--quick: 100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a RewardSettings field")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"sentiment data not found at {DATA}")

    sizes = [100, 400] if args.quick else [int(x) for x in args.sizes.split(",")]
    seeds = [0] if args.quick else [int(x) for x in args.seeds.split(",")]
    baseline_sizes = (
        [int(x) for x in args.baseline_sizes.split(",")] if args.baseline_sizes else ([100] if args.quick else sizes)
    )
    reviews = load_reviews()
    random.Random(1234).shuffle(reviews)
    cut = int(len(reviews) * args.test_fraction)
    test, pool = reviews[:cut], reviews[cut:]
    test_pairs = pairs_for(test)
    tuned = RewardSettings(threads=args.threads, **parse_overrides(args.set))
    started = time.monotonic()
    report: dict = {
        "data": {"reviews": len(reviews), "test_reviews": len(test), "pool": len(pool), "source": str(DATA)},
        "sizes": sizes, "seeds": seeds, "settings": dataclasses.asdict(tuned),
    }
    with tempfile.TemporaryDirectory(prefix="rm-calibration-") as scratch:
        report["tuned"] = run(tuned, sizes, seeds, pool, test_pairs, Path(scratch))
        if not args.no_baseline:
            baseline = RewardSettings.trl_defaults(threads=args.threads)
            report["baseline_settings"] = dataclasses.asdict(baseline)
            report["baseline"] = run(baseline, baseline_sizes, seeds, pool, test_pairs, Path(scratch))
    report["total_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
