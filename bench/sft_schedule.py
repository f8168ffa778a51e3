"""Policy-only sentiment top-1 and confidence AUROC after the round's closed-set SFT, by learning-rate schedule.

For each data draw in --seeds (the learning curve's split of ../shared/data/sentiment) and each LoRA seed in
--lora-seeds, the policy's LoRA is trained once per schedule in --schedules with the round's own code: the SFT
examples a round derives from --choices annotated non-held-out reviews (`training.rounds.policy_data`: the
option-scoring prompt /predict sends), the round's knobs for the shipped sentiment config
(`training.rounds.policy_settings`) with only the schedule (and --sft-steps, if given) changed, and `train_policy`.
The first --heldout held-out reviews are then scored policy-only with transformers: each option's first-token
log-probability, renormalised over the options (what the engine's choice constraint returns; the options' first
tokens differ). No reward model, no calibration: a temperature keeps the order of the scores, so neither metric
depends on it.

Prints JSON: per run top-1, errors, confidence AUROC (does the top option's probability tell right from wrong?)
and SFT seconds; per schedule the median and range over runs, and the ratio of its median to the first schedule's.
The spread over seeds is the point: one run of one recipe moves top-1 by several points.

    .venv/bin/python bench/sft_schedule.py [--schedules constant,linear] [--seeds 0,1] [--lora-seeds 0]
                                           [--choices 400] [--heldout 400] [--sft-steps N]
                                           [--model DIR|tiny]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.prompts import build_choice_messages, option_answer  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.common import resolve_model  # noqa: E402
from training.evaluate import auroc, is_heldout  # noqa: E402
from training.export import ProjectExport  # noqa: E402
from training.policy import train_policy  # noqa: E402
from training.preferences import derive  # noqa: E402
from training.rounds import RoundInputs, policy_data, policy_settings, project_kind  # noqa: E402

SCORE_BATCH = 16


def split(seed: int, choices: int, heldout: int):
    """(the labeling config, the round's inputs from `choices` annotated reviews, the held-out tasks) of one data
    draw."""
    from bench.learning_curve import sentiment

    dataset = sentiment(seed)
    pool = [t for t in dataset.tasks if not is_heldout(t["id"])][:choices]
    exports = [dataset.annotate(task, []) for task in pool]
    inputs = RoundInputs("bench", ProjectExport("bench", dataset.config, "", exports), derive(exports, dataset.config), None)
    return dataset.config, inputs, [t for t in dataset.tasks if is_heldout(t["id"])][:heldout]


def option_first_tokens(tokenizer, options: list[str]) -> list[int]:
    """The token each option's answer starts with, as the chat template writes an assistant turn."""
    turn = [{"role": "user", "content": "?"}]
    prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    firsts = []
    for option in options:
        full = tokenizer.apply_chat_template([*turn, {"role": "assistant", "content": option_answer(option)}], tokenize=False)
        firsts.append(tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"][0])
    if len(set(firsts)) != len(firsts):
        sys.exit(f"options {options} share a first token: this bench scores by the first token only")
    return firsts


def score_heldout(model_dir: str, adapter: Path, kind, settings: Settings, tasks: list[dict]) -> tuple[list[str], list[list[float]]]:
    """(the options, per task their log-probabilities renormalised over the options)."""
    import torch
    from peft import PeftModel

    from training.lora_io import load_causal_lm, load_chat_tokenizer

    tokenizer = load_chat_tokenizer(model_dir)
    model = PeftModel.from_pretrained(load_causal_lm(model_dir, torch.float32), str(adapter)).eval()
    config = kind.generation
    control = config.enumerable_control(settings.enumerate_max)
    options = control.options() or []
    firsts = option_first_tokens(tokenizer, options)
    labels = [control.describe_option(o) for o in options]
    prompts = [tokenizer.apply_chat_template(build_choice_messages(config, config.read_task(t, settings.max_text_chars),
                                                                   control, labels), add_generation_prompt=True, tokenize=False)
               for t in tasks]
    tokenizer.padding_side = "left"
    rows = []
    with torch.no_grad():
        for start in range(0, len(prompts), SCORE_BATCH):
            batch = tokenizer(prompts[start:start + SCORE_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
            last = model(**batch).logits[:, -1].float().log_softmax(-1)
            rows += last[:, firsts].log_softmax(-1).tolist()
    return options, rows


def metrics(rows: list[list[float]], tasks: list[dict], options: list[str]) -> dict:
    gold = [options.index(t["gold"][0]["value"]["choices"][0]) for t in tasks]
    top = [max(range(len(r)), key=r.__getitem__) for r in rows]
    hits = [float(t == g) for t, g in zip(top, gold)]
    confidence = [math.exp(r[t]) for r, t in zip(rows, top)]
    return {"top1": round(sum(hits) / len(hits), 4), "errors": int(len(hits) - sum(hits)),
            "confidence_auroc": _round(auroc(confidence, hits))}


def run(model_dir: str, schedule: str, seed: int, lora_seed: int, choices: int, heldout: int, steps: int | None) -> dict:
    settings = Settings(model=model_dir)
    xml, inputs, tasks = split(seed, choices, heldout)
    kind = project_kind(xml, settings)
    sft, _ = policy_data(inputs, kind, settings)
    knobs = replace(policy_settings(kind, settings), sft_lr_scheduler=schedule, seed=lora_seed, sft_steps=steps)
    with tempfile.TemporaryDirectory(prefix="sft-schedule-") as scratch:
        started = time.monotonic()
        result = train_policy(model_dir, Path(scratch) / "adapter", sft=sft, algo="sft", settings=knobs)
        seconds = time.monotonic() - started
        options, rows = score_heldout(model_dir, result.adapter_path, kind, settings, tasks)
    return {"schedule": schedule, "seed": seed, "lora_seed": lora_seed, "sft_examples": len(sft),
            "sft_steps": result.metrics["sft"]["steps"], "sft_seconds": round(seconds, 1), **metrics(rows, tasks, options)}


def summary(runs: list[dict], schedules: list[str]) -> dict:
    out = {}
    for schedule in schedules:
        mine = [r for r in runs if r["schedule"] == schedule]
        out[schedule] = {key: {"median": _round(statistics.median(values)), "min": min(values), "max": max(values)}
                         for key in ("top1", "confidence_auroc", "sft_seconds")
                         if (values := [r[key] for r in mine if r[key] is not None])}
    baseline = out[schedules[0]]
    for schedule in schedules:
        out[schedule]["ratio_to_" + schedules[0]] = {key: _round(out[schedule][key]["median"] / baseline[key]["median"])
                                                     for key in baseline if key in out[schedule] and baseline[key]["median"]}
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default="constant,linear", help="transformers lr_scheduler_type values; the first is the baseline")
    parser.add_argument("--seeds", default="0,1", help="data draws (the learning curve's --seed)")
    parser.add_argument("--lora-seeds", default="0", help="the adapter's initialisation and data order (PolicySettings.seed)")
    parser.add_argument("--choices", type=int, default=400)
    parser.add_argument("--heldout", type=int, default=400)
    parser.add_argument("--sft-steps", type=int, help="SFT steps (default: the round's rule, 60 at 400 choices)")
    parser.add_argument("--model", help="model directory, or tiny (default: the embedded model)")
    args = parser.parse_args()

    model_dir, _ = resolve_model(args.model, None, Path(tempfile.gettempdir()) / "sft-schedule")  # the dir: --model tiny
    schedules = args.schedules.split(",")
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for lora_seed in map(int, args.lora_seeds.split(",")):
            for schedule in schedules:  # alternating, so a noisy stretch of the host hits every schedule alike
                runs.append(run(model_dir, schedule, seed, lora_seed, args.choices, args.heldout, args.sft_steps))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": Path(model_dir).name, "choices": args.choices, "heldout": args.heldout, "runs": runs,
                      "summary": summary(runs, schedules)}, indent=2))


if __name__ == "__main__":
    main()
