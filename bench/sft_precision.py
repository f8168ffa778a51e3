"""Seconds per policy SFT step in fp32 and in bf16 (DATAENGINE_POLICY_PRECISION), on the same batches.

The policy's LoRA SFT (training/policy.py, the round's defaults) runs on the SFT examples of --tasks CoNLL-2003
sentences from ../shared/data/conll2003 (the NER config: the longest prompts the benchmarks train on). Each precision trains --steps steps from the same seed, --repeats times,
alternating; the first step of a run (warm-up) is not counted. Prints JSON: per precision the median step time
and its spread, the bf16/fp32 ratio of the medians, and whether this host runs bf16 natively (the `auto` rule).

    .venv/bin/python bench/sft_precision.py [--steps 7] [--repeats 2] [--tasks 400] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.hardware import native_bf16  # noqa: E402
from bench.common import resolve_model  # noqa: E402
from training.policy import PolicySettings, train_policy  # noqa: E402
from training.preferences import derive  # noqa: E402


def sft_examples(tasks: int) -> list:
    """The round's SFT examples for `tasks` annotated CoNLL sentences (exits when the shared data is missing)."""
    from bench.learning_curve import conll

    dataset = conll(0)
    return derive([dataset.annotate(task, []) for task in dataset.tasks[:tasks]], dataset.config).sft


def step_seconds(model: str, examples: list, steps: int, bf16: bool) -> list[float]:
    stamps: list[float] = []

    def progress(event: dict) -> None:
        if "loss" in event:
            stamps.append(time.monotonic())

    with tempfile.TemporaryDirectory() as scratch:
        train_policy(model, Path(scratch), sft=examples, algo="sft", settings=PolicySettings(sft_steps=steps, bf16=bf16),
                     progress=progress)
    return [round(b - a, 3) for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--model", help="model directory (default: the embedded model)")
    args = parser.parse_args()
    model, _ = resolve_model(args.model, None, Path(tempfile.gettempdir()) / "sft-precision")  # the dir: --model tiny
    examples = sft_examples(args.tasks)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for precision in times:
            times[precision] += step_seconds(model, examples, args.steps, precision == "bf16")
    summary = {
        precision: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "steps": len(values)}
        for precision, values in times.items()
    }
    print(json.dumps({"model": Path(model).name, "conll_tasks": args.tasks, "sft_examples": len(examples),
                      "native_bf16": native_bf16(), "per_step": summary,
                      "bf16_over_fp32": round(summary["bf16"]["median_s"] / summary["fp32"]["median_s"], 3)}, indent=2))


if __name__ == "__main__":
    main()
