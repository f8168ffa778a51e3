"""Learning curves on the real model: how the served ranking, the policy alone and the reward model alone
improve with the number of human choices, on real data.

* sentiment: ../shared/data/sentiment (UCI Sentiment Labelled Sentences, Kotzias et al., KDD 2015), a
  Positive/Negative config. Simulated annotators pick the candidate matching the gold label.
* ner: ../shared/data/conll2003/valid.txt (CoNLL-2003 English NER, validation split), the shipped
  `label_config/ner.xml`. Simulated annotators correct the served model's pre-annotation to the gold spans
  (Label Studio keeps that prediction on the task: it is the rejected side of the round's pairs).

Each round runs the real training-round code the RQ job runs (`training.rounds.learn`: snapshot -> reward
model -> policy SFT on the served model (SmolLM2-135M-Instruct by default) -> evaluation gate -> promotion)
with the real vLLM engine; the engine hot-loads each promoted adapter. Held-out: the tasks the task-hash
split holds out (never trained on). After each round the served version is scored on them: top-1 (NER:
span F1) as served, of the policy alone (reward model off), of the reward model alone, and the confidence
AUROC of the top candidate's score (does the score tell a right top-1 from a wrong one; with its bootstrap 95%
interval over the held-out tasks). Choices 0 is the untrained model (calibrated, no training). Round seconds:
what the RQ job does once the project is exported (derive, snapshot, reward model, policy, gate), with each
stage's share; the simulated annotators' pre-annotation of the round's new tasks (served by /predict while they
label, not by the round) is timed on its own. Prints JSON and writes JSON + PNG to --out.

    .venv/bin/python bench/learning_curve.py                       # sentiment and NER at 0, 100, 400 choices
    .venv/bin/python bench/learning_curve.py --task sentiment --choices 0,100,400 --seed 1
    .venv/bin/python bench/learning_curve.py --model models/tiny --model-name tiny   # plumbing only
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.label_config import compile_label_config  # noqa: E402
from backend.registry import VersionReader  # noqa: E402
from backend.settings import EMBEDDED_MODEL, Settings  # noqa: E402
from bench.common import SENTIMENT_CONFIG, SENTIMENT_LABELS, start_engine  # noqa: E402
from training.evaluate import EvalTask, is_heldout, rank_heldout, score_ranking  # noqa: E402
from training.export import ProjectExport  # noqa: E402
from training.preferences import derive  # noqa: E402
from training.rounds import RoundInputs, learn  # noqa: E402
from training.snapshot import write_snapshot  # noqa: E402

DATA = REPO.parent / "shared" / "data"
NER_CONFIG = (REPO / "label_config" / "ner.xml").read_text()
TARGETS = {
    "sentiment": {"policy_top1": {"100": 0.92, "400": 0.93}, "served_top1": {"100": 0.93, "400": 0.94},
                  "confidence_auroc": {"400": 0.90}, "round_seconds": {"400": 900}, "base_top1": 0.60},
    "ner": {"policy_span_f1": {"400": 0.45}},
}


@dataclass
class Dataset:
    name: str
    config: str
    tasks: list[dict]  # {"id", "data", "gold": result}
    annotate: Callable[[dict, list[dict]], dict]  # (task, served predictions) -> Label Studio export of the task


# --- data ----------------------------------------------------------------------------------------------


def sentiment(seed: int) -> Dataset:
    path = DATA / "sentiment"
    if not path.exists():
        sys.exit(f"needs the sentiment data in {path}")
    rows = []
    for file in sorted(path.glob("*_labelled.txt")):
        for line in file.read_text(errors="replace").splitlines():
            text, _, label = line.rpartition("\t")
            if text.strip() and label.strip() in ("0", "1"):
                rows.append((text.strip(), SENTIMENT_LABELS[0] if label.strip() == "1" else SENTIMENT_LABELS[1]))
    random.Random(seed).shuffle(rows)
    tasks = [{"id": i, "data": {"text": text}, "gold": choice(gold)} for i, (text, gold) in enumerate(rows, start=1)]
    return Dataset("sentiment", SENTIMENT_CONFIG, tasks, pick_or_correct)


def choice(label: str) -> list[dict]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def conll(seed: int) -> Dataset:
    path = DATA / "conll2003" / "valid.txt"
    if not path.exists():
        sys.exit(f"needs the CoNLL-2003 data in {path}")
    sentences, current = [], []
    for line in path.read_text(errors="replace").splitlines() + [""]:
        if not line.strip() or line.startswith("-DOCSTART-"):
            if len(current) >= 4:
                sentences.append(current)
            current = []
        else:
            parts = line.split()
            current.append((parts[0], parts[-1]))
    tasks = [{"id": i, "data": {"text": " ".join(t for t, _ in s)}, "gold": spans(s)} for i, s in enumerate(sentences, start=1)]
    random.Random(seed).shuffle(tasks)
    return Dataset("ner", NER_CONFIG, tasks, pick_or_correct)


def spans(tokens: list[tuple[str, str]]) -> list[dict]:
    """IOB tags -> Label Studio span regions over the space-joined sentence."""
    regions, offset, open_span = [], 0, None
    text = " ".join(t for t, _ in tokens)
    for token, tag in tokens:
        start, end = offset, offset + len(token)
        offset = end + 1
        if tag.startswith("B-") or (tag.startswith("I-") and (open_span is None or open_span[2] != tag[2:])):
            open_span = [start, end, tag[2:]]
            regions.append(open_span)
        elif tag.startswith("I-"):
            open_span[1] = end
        else:
            open_span = None
    return [{"from_name": "label", "to_name": "text", "type": "labels",
             "value": {"start": s, "end": e, "text": text[s:e], "labels": [label]}} for s, e, label in regions]


def pick_or_correct(task: dict, served: list[dict]) -> dict:
    """The export of a task whose annotator started from the served candidate closest to gold (the one that
    equals it, else the top one) and submitted gold."""
    predictions = [{"id": 100 * task["id"] + k, "result": p["result"], "score": p.get("score", 0.5)} for k, p in enumerate(served)]
    from backend.candidates import canonical_key

    same = [p for p in predictions if canonical_key(p["result"]) == canonical_key(task["gold"])]
    parent = (same or predictions or [{"id": None}])[0]["id"]
    annotation = {"id": task["id"], "result": task["gold"], "was_cancelled": False, "completed_by": 1, "parent_prediction": parent}
    return {"id": task["id"], "data": task["data"], "annotations": [annotation], "predictions": predictions}


# --- one curve -----------------------------------------------------------------------------------------


def run_curve(dataset: Dataset, choices: list[int], settings: Settings, max_heldout: int, project: str) -> dict[str, Any]:
    config = compile_label_config(dataset.config, settings=settings)
    heldout = [t for t in dataset.tasks if is_heldout(t["id"])][:max_heldout]
    pool = [t for t in dataset.tasks if not is_heldout(t["id"])]
    eval_tasks = [EvalTask({"id": t["id"], "data": t["data"]}, t["gold"]) for t in heldout]
    reader = VersionReader(settings.projects_dir, settings.model_name)
    exported_tasks: dict[int, dict] = {}  # what Label Studio would export: each task annotated once, when its turn came
    points = []
    for count in choices:
        outcome: dict[str, Any] = {}
        clock, annotate_seconds = None, None
        if count:
            new = [t for t in pool[:count] + heldout if t["id"] not in exported_tasks]
            annotating = time.monotonic()
            served = predictions_of(settings, dataset.config, reader.current(project), new)
            annotate_seconds = round(time.monotonic() - annotating, 1)
            exported_tasks.update({t["id"]: dataset.annotate(t, p) for t, p in zip(new, served)})
            clock = StageClock()  # the round: what the RQ job does once Label Studio has exported the project
            tasks = [exported_tasks[t["id"]] for t in pool[:count] + heldout]
            derived = derive(tasks, dataset.config)
            snapshot = write_snapshot(settings.projects_dir / project, derived, {"source": "bench"})
            exported = ProjectExport(project, dataset.config, "", tasks)
            outcome = learn(RoundInputs(project, exported, derived, snapshot), settings, clock)
        round_seconds = clock.elapsed() if clock else None
        version = reader.current(project)
        ranking = rank_heldout(settings, config, version, eval_tasks)
        point = {
            "choices": count,
            "version": version.name,
            "promoted": outcome.get("promoted"),
            "gate": outcome.get("reason"),
            "gate_test": (outcome.get("evaluation") or {}).get("test"),
            "served": score_ranking(ranking).as_dict(),
            "policy_only": score_ranking(ranking, 0.0).as_dict(),
            "rm_only": score_ranking(ranking, 1.0).as_dict() if ranking.has_rewards else None,
            "round_seconds": round_seconds,
            "round_stage_seconds": clock.stage_seconds() if clock else None,
            "annotate_seconds": annotate_seconds,
            "round_heldout": outcome.get("heldout"),
            "policy_training": _policy_metrics(settings, project, outcome.get("version")),
            "heldout_rows": None if ranking.has_spans else heldout_rows(ranking),
        }
        point["policy_label_auroc"] = None if ranking.has_spans else label_auroc(point["heldout_rows"])
        point["confidence_auroc_interval"] = None if ranking.has_spans else confidence_auroc_interval(point["heldout_rows"])
        points.append(point)
        print(json.dumps(_summary(point)), file=sys.stderr, flush=True)
    return {"task": dataset.name, "heldout_tasks": len(eval_tasks), "points": points,
            "summary": [_summary(p) for p in points], "targets": TARGETS.get(dataset.name)}


def heldout_rows(ranking) -> list[dict]:
    """Per held-out task of a closed set: the options (canonical keys) in served order with the policy's
    log-probability, the served score and the reward model's score, and which one the human chose: enough to
    study confidence measures offline (across rounds too) without ranking again."""
    from backend.candidates import canonical_key

    rows = []
    for task, ranked in zip(ranking.tasks, ranking.ranked):
        keys = [c.key for c in ranked.candidates]
        human = canonical_key(task.human_result)
        rows.append({"id": task.task.get("id"), "human": keys.index(human) if human in keys else None, "options": keys,
                     "logprob": [c.mean_logprob for c in ranked.candidates], "score": [c.score for c in ranked.candidates],
                     "reward": ranked.rewards})
    return rows


def label_auroc(rows: list[dict]) -> float | None:
    """Does the policy's score of a label rank the tasks whose human chose it above the others (one-vs-rest,
    averaged over labels)? A different question from the confidence AUROC, which asks whether the top
    candidate's score tells a right top-1 from a wrong one."""
    from training.evaluate import auroc

    def margin(row: dict, label: str) -> float:  # the label's log-probability over the best other option's
        scores = dict(zip(row["options"], row["logprob"]))
        return scores[label] - max(v for k, v in scores.items() if k != label)

    def chosen(row: dict, label: str) -> float:
        return float(row["human"] is not None and row["options"][row["human"]] == label)

    values = []
    for label in {key for row in rows for key in row["options"]}:
        scored = [row for row in rows if label in row["options"] and len(row["options"]) > 1]
        values.append(auroc([margin(r, label) for r in scored], [chosen(r, label) for r in scored]))
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def confidence_auroc_interval(rows: list[dict], resamples: int = 2000) -> list[float] | None:
    """Percentile bootstrap 95% interval of the served confidence AUROC over the held-out tasks. It rests on the
    few tasks whose top-1 is wrong (26 of 400 reviews after 400 choices), so it is far less precise than top-1."""
    from training.evaluate import auroc

    confidence = [row["score"][0] for row in rows if row["score"]]
    right = [float(row["human"] == 0) for row in rows if row["score"]]
    rng = random.Random(0)
    values = []
    for _ in range(resamples):
        drawn = [rng.randrange(len(right)) for _ in right]
        value = auroc([confidence[i] for i in drawn], [right[i] for i in drawn])
        if value is not None:
            values.append(value)
    if len(values) < resamples // 2:
        return None
    values.sort()
    return [round(values[int(0.025 * len(values))], 3), round(values[int(0.975 * len(values)) - 1], 3)]


def predictions_of(settings: Settings, xml: str, version, tasks: list[dict]) -> list[list[dict]]:
    """What the served version pre-annotates for these tasks (the candidates the annotators see)."""
    from backend.engine_client import EngineClient
    from backend.predictor import PredictRequest, Predictor

    if not tasks:
        return []
    engine = EngineClient.from_settings(settings, batch=True)
    predictor = Predictor(settings, engine)
    try:
        request = PredictRequest(compile_label_config(xml, settings=settings), [{"id": t["id"], "data": t["data"]} for t in tasks],
                                 version, settings.candidates, settings.temperature, project="bench")
        return predictor.predict_each(request).predictions
    finally:
        predictor.close()
        engine.close()


def _policy_metrics(settings: Settings, project: str, version: str | None) -> dict | None:
    if not version:
        return None
    record = json.loads((settings.projects_dir / project / "versions" / version / "version.json").read_text())
    policy = record["metrics"].get("policy") or {}
    return {k: policy.get(k) for k in ("algo", "why", "seconds", "steps", "sft_examples", "skipped") if k in policy}


def _summary(point: dict) -> dict:
    metric = "span_f1" if point["served"].get("span_f1") is not None else "top1"
    pick = lambda e: None if e is None else e.get(metric)  # noqa: E731
    return {"choices": point["choices"], f"served_{metric}": pick(point["served"]),
            f"policy_{metric}": pick(point["policy_only"]), f"rm_only_{metric}": pick(point["rm_only"]),
            "confidence_auroc": point["served"].get("confidence_auroc"),
            "confidence_auroc_interval": point.get("confidence_auroc_interval"), "policy_label_auroc": point.get("policy_label_auroc"),
            "round_seconds": point["round_seconds"], "round_stage_seconds": point["round_stage_seconds"],
            "annotate_seconds": point["annotate_seconds"], "promoted": point["promoted"]}


class StageClock:
    """A round's progress callback: prints its milestones and notes when each stage began, so the bench can say
    where the round's time went."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.began: dict[str, float] = {}
        self.ended: float | None = None

    def __call__(self, stage: str, **detail) -> None:
        self.began.setdefault(stage, time.monotonic())
        _progress(stage, **detail)

    def elapsed(self) -> float:
        """Seconds since the round began; the first call ends the round."""
        self.ended = self.ended or time.monotonic()
        return round(self.ended - self.started, 1)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds from each stage's start to the next one's ("export" is deriving and writing the snapshot,
        "evaluate" the gate, until the promotion or rejection)."""
        marks = [("export", self.started), *sorted(self.began.items(), key=lambda item: item[1])]
        ends = [when for _, when in marks[1:]] + [self.ended or time.monotonic()]
        return {stage: round(end - start, 1) for (stage, start), end in zip(marks, ends) if stage not in ("promoted", "rejected")}


def _progress(stage: str, **detail) -> None:
    if stage in ("reward_model", "policy") and detail.get("step") is None and detail.get("phase") is None:
        print(f"  {stage} {detail}", file=sys.stderr, flush=True)
    elif stage in ("evaluate", "promoted", "rejected", "skipped"):
        print(f"  {stage} {detail}", file=sys.stderr, flush=True)


def plot(curves: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.0 * len(curves), 4.0), dpi=120, squeeze=False)
    for ax, curve in zip(axes[0], curves):
        rows = curve["summary"]
        metric = "span_f1" if any(f"served_span_f1" in r for r in rows) else "top1"
        xs = list(range(len(rows)))
        for key, label, style in ((f"served_{metric}", "served (blend)", "o-"), (f"policy_{metric}", "policy alone", "x--"),
                                  (f"rm_only_{metric}", "reward model alone", "s:")):
            ys = [r.get(key) for r in rows]
            ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], style, label=label)
        ax.set_xticks(xs, [str(r["choices"]) for r in rows])
        ax.set_ylim(0, 1)
        ax.set_xlabel("human choices")
        ax.set_ylabel(f"{metric} on held-out tasks")
        ax.set_title(f"{curve['task']} ({curve['heldout_tasks']} held-out tasks)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("sentiment", "ner", "both"), default="both")
    parser.add_argument("--choices", default="0,100,400")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help=f"model directory (default: the embedded {EMBEDDED_MODEL})")
    parser.add_argument("--model-name", help="its served name (default: the directory's name)")
    parser.add_argument("--engine-url", help="a running engine serving --model as --model-name")
    parser.add_argument("--max-heldout", type=int, default=400, help="cap on held-out tasks scored per round")
    parser.add_argument("--ner-max-heldout", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    model = args.model or str(Settings().embedded_model_dir)
    if not args.model:
        from training.embedded_model import materialize

        materialize(Path(model))
    name = args.model_name or Path(model).name
    workdir = Path(tempfile.mkdtemp(prefix="dataengine-curve-"))
    engine = start_engine(workdir, engine_url=args.engine_url, model=model, model_name=name)
    settings = Settings(model=model, served_model_name=name, engine_url=engine.url, model_dir=workdir / "model_dir",
                        eval_min_tasks=1, min_pairs=1)
    choices = [int(c) for c in args.choices.split(",")]
    curves = []
    try:
        if args.task in ("sentiment", "both"):
            curves.append(run_curve(sentiment(args.seed), choices, settings, args.max_heldout, "1001"))
        if args.task in ("ner", "both"):
            curves.append(run_curve(conll(args.seed), choices, settings, args.ner_max_heldout, "1002"))
    finally:
        engine.stop()
    out = Path(args.out)
    png = plot(curves, out / "learning_curve.png")
    report = {"model": name, "seed": args.seed, "curves": curves, "png": str(png)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"model": name, "seed": args.seed, "curves": [{"task": c["task"], "summary": c["summary"],
                                                                     "targets": c["targets"]} for c in curves]}, indent=2))


if __name__ == "__main__":
    main()
