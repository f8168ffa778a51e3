"""Policy update: a LoRA adapter on the serving model, trained with TRL from the annotators' feedback.

`train_policy(base_model, out_dir, sft=..., pairs=..., algo=...)` runs, all on one peft LoRA adapter:
  1. an SFT warm start (`SFTTrainer`) on the SFT examples (the prompt the model is served with + the answer
     the annotators accepted or wrote); its length follows the data (`PolicySettings.sft_steps_for`),
  2. then, by `algo`:
     * "sft": nothing more;
     * "dpo": `DPOTrainer` straight from the preference pairs (prompt / chosen / rejected);
     * "grpo" / "rloo": `GRPOTrainer` / `RLOOTrainer` on the distinct prompts of the pairs and SFT examples,
       with `reward_funcs=[reward model, validity]` (both optional callables, see below), generation on the
       transformers path (`use_vllm=False`: vLLM lives in another venv, see DESIGN.md).
With `stage_dir`, the adapter after SFT is also saved there when a preference stage follows, so the gate can
say what each stage changed. Only the adapter is written to `out_dir` (training/lora_io.py: the files vLLM loads
at runtime). Every stage runs through `_run_stage` on the shared trainer defaults (training/trainer_defaults.py).

Reward callables see plain text: `reward_fn(prompts, completions) -> list[float]` gets each prompt as
`prompt_text(messages)` (the non-system messages' contents, blank-line separated: the task data and the
question, without the long shared system prompt) and each completion as the assistant's text;
`validity_fn(prompt, completion) -> float` is called per completion with the same two strings (e.g. 1.0
when `CompiledConfig.parse` accepts the answer, else 0.0; see `validity_from_config`).

Progress: `progress(dict)` is called on every trainer log (`phase`, `step`, `max_steps`, `loss`, `reward`,
...) so the job runner can copy it into RQ `job.meta`.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from backend.hardware import native_bf16
from backend.settings import POLICY_ALGOS

from .distributed import is_main_process, per_device_batch
from .lora_io import LoraShape, PolicyTrainingError, load_with_adapter, save_adapter
from .preferences import PreferencePair, SftExample
from .trainer_defaults import ProgressFn, TrainingLog, base_args, build_trainer

ALGOS = POLICY_ALGOS

Algo = Literal["sft", "dpo", "grpo", "rloo"]
RewardFn = Callable[[list[str], list[str]], Sequence[float]]
ValidityFn = Callable[[str, str], float]


@dataclass
class PolicySettings:
    """Small-data, CPU-friendly defaults; every field is a plain TRL/peft knob."""

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # SFT warm start (skipped when sft_steps == 0 or there are no SFT examples). None: from the data size
    # (`sft_steps_for`): sft_epochs passes over small sets, at least sft_min_examples examples seen, at most
    # sft_max_examples (which bounds a round's time on big projects)
    sft_steps: int | None = None
    sft_epochs: float = 3.0
    sft_min_examples: int = 480
    sft_max_examples: int = 960
    sft_learning_rate: float = 2e-4
    sft_batch_size: int = 8
    sft_lr_scheduler: str = "constant"  # transformers' lr_scheduler_type for the SFT stage ("linear": decays to 0)
    # RL (grpo / rloo)
    rl_steps: int = 20
    rl_learning_rate: float = 1e-4
    num_generations: int = 4
    prompts_per_step: int = 2  # batch = prompts_per_step * num_generations completions
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.0  # KL to the starting policy; GRPO's default is 0 (no reference model), RLOO's 0.05
    reward_weights: tuple[float, float] = (1.0, 1.0)  # (reward model, validity)
    # DPO
    dpo_steps: int = 20
    dpo_learning_rate: float = 5e-5
    dpo_beta: float = 0.1
    dpo_batch_size: int = 4
    # shared
    max_length: int = 1024  # prompt + completion tokens for SFT / DPO
    seed: int = 0
    torch_threads: int | None = None  # None: leave torch's setting alone
    bf16: bool | None = None  # None: where it runs natively (`native_bf16`); the LoRA weights stay fp32 either way
    logging_steps: int = 1

    @property
    def lora(self) -> LoraShape:
        return LoraShape(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    def sft_steps_for(self, examples: int) -> int:
        """sft_epochs passes over a small set; at least sft_min_examples (or every example once) seen on a
        bigger one; never more than sft_max_examples, which bounds a round on a big project."""
        if self.sft_steps is not None:
            return self.sft_steps
        seen = min(max(min(self.sft_epochs * examples, self.sft_min_examples), examples), self.sft_max_examples)
        return max(1, math.ceil(seen / self.sft_batch_size))


@dataclass
class PolicyResult:
    adapter_path: Path
    metrics: dict[str, Any]


def resolve_algo(algo: str | None) -> str:
    value = (algo or "sft").strip().lower()
    if value not in ALGOS:
        raise PolicyTrainingError(f"policy algorithm {value!r}: must be one of {', '.join(ALGOS)}")
    return value


# --- entry point -----------------------------------------------------------------------------------


def train_policy(
    base_model: str,
    out_dir: Path,
    *,
    sft: Sequence[SftExample] = (),
    pairs: Sequence[PreferencePair] = (),
    algo: Algo | str | None = None,
    reward_fn: RewardFn | None = None,
    validity_fn: ValidityFn | None = None,
    settings: PolicySettings | None = None,
    progress: ProgressFn | None = None,
    stage_dir: Path | None = None,
    heldout_pairs: Sequence[PreferencePair] = (),
) -> PolicyResult:
    """Train a LoRA adapter on `base_model` (a local model directory or hub id) and save it to `out_dir`;
    with `stage_dir`, also the SFT-only adapter in `stage_dir/sft` when a preference stage follows."""
    import torch

    algo = resolve_algo(algo)
    settings = settings or PolicySettings()
    if settings.bf16 is None:
        settings = replace(settings, bf16=native_bf16())
    settings.lora.check_rank()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.monotonic()
    out_dir = Path(out_dir)
    metrics: dict[str, Any] = {"algo": algo, "sft_examples": len(sft), "pairs": len(pairs), "settings": asdict(settings)}
    from transformers import set_seed

    set_seed(settings.seed)  # before get_peft_model: the LoRA A matrices are drawn from the global RNG
    tokenizer, model = load_with_adapter(base_model, settings.lora, bf16=settings.bf16)
    tracker = _RewardTracker()
    with tempfile.TemporaryDirectory(prefix="policy-") as scratch:
        scratch_dir = Path(scratch)
        sft_rows = _sft_rows(sft)
        if sft_rows and settings.sft_steps_for(len(sft_rows)) > 0:
            metrics["sft"] = _run_sft(model, tokenizer, sft_rows, settings, scratch_dir / "sft", progress)
            if stage_dir is not None and algo != "sft":
                metrics["sft"]["adapter_path"] = str(save_adapter(model, Path(stage_dir) / "sft"))
        if algo == "dpo" and settings.dpo_steps > 0:
            rows = _dpo_rows(pairs)
            if not rows:
                raise PolicyTrainingError("DPO needs preference pairs with a prompt; none were given")
            metrics.update(_run_dpo(model, tokenizer, rows, settings, scratch_dir / "dpo", progress))
        elif algo in ("grpo", "rloo") and settings.rl_steps > 0:
            prompts = _distinct_prompts(pairs, sft)
            if not prompts:
                raise PolicyTrainingError(f"{algo.upper()} needs prompts (from pairs or SFT examples); none were given")
            if reward_fn is None and validity_fn is None:
                raise PolicyTrainingError(f"{algo.upper()} needs a reward: pass reward_fn and/or validity_fn")
            metrics.update(
                _run_rl(algo, model, tokenizer, prompts, reward_fn, validity_fn, tracker, settings, scratch_dir / algo, progress)
            )
        elif "sft" not in metrics:
            raise PolicyTrainingError("nothing to train: no SFT examples and no RL/DPO steps")
        else:
            metrics["steps"] = metrics["sft"]["steps"]  # SFT only
    if heldout_pairs:
        metrics["heldout_pair_accuracy"] = implicit_reward_accuracy(model, tokenizer, heldout_pairs)
    adapter_path = save_adapter(model, out_dir)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    if is_main_process():
        (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return PolicyResult(adapter_path=adapter_path, metrics=metrics)


# --- held-out scoring ------------------------------------------------------------------------------


MAX_SCORED_PAIRS = 200


def implicit_reward_accuracy(model, tokenizer, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """How often the trained policy prefers the human's choice by DPO's implicit reward: its log-probability
    gain over the base model (adapter off) is larger for the chosen completion than for the rejected one.
    Measured on at most MAX_SCORED_PAIRS held-out pairs."""
    import torch

    scored = [p for p in pairs if p.prompt and p.chosen != p.rejected][:MAX_SCORED_PAIRS]
    agreed = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for pair in scored:
                gains = []
                for completion in (pair.chosen, pair.rejected):
                    tuned = _completion_logprob(model, tokenizer, pair.prompt, completion)
                    with model.disable_adapter():
                        base = _completion_logprob(model, tokenizer, pair.prompt, completion)
                    gains.append(tuned - base)
                agreed += 1.0 if gains[0] > gains[1] else 0.5 if gains[0] == gains[1] else 0.0
    finally:
        model.train(was_training)
    return {"pairs": len(scored), "accuracy": round(agreed / len(scored), 4) if scored else None}


def _completion_logprob(model, tokenizer, prompt: Sequence[dict[str, str]], completion: str) -> float:
    import torch

    prompt_ids = _chat_ids(tokenizer, list(prompt), add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": completion}], add_generation_prompt=False)
    ids = torch.tensor([full_ids], device=model.device)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    start = len(prompt_ids) - 1
    return float(logprobs[start:].gather(1, targets[start:, None]).sum())


def _chat_ids(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


# --- data ------------------------------------------------------------------------------------------


def prompt_text(messages: Sequence[dict[str, str]]) -> str:
    """The text a reward model scores as the prompt: non-system message contents, blank-line separated."""
    return "\n\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "system")


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as `[{"role": "assistant", "content": ...}]`."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _prompt_key(messages: Sequence[dict[str, str]]) -> str:
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False)


def _distinct_prompts(pairs: Sequence[PreferencePair], sft: Sequence[SftExample]) -> list[list[dict[str, str]]]:
    seen: dict[str, list[dict[str, str]]] = {}
    for messages in [p.prompt for p in pairs] + [e.prompt for e in sft]:
        if messages:
            seen.setdefault(_prompt_key(messages), [dict(m) for m in messages])
    return list(seen.values())


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _sft_rows(sft: Sequence[SftExample]) -> list[dict[str, Any]]:
    return [
        {"prompt": [dict(m) for m in e.prompt], "completion": _assistant(e.completion)}
        for e in sft
        if e.prompt and e.completion
    ]


def _dpo_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    return [
        {"prompt": [dict(m) for m in p.prompt], "chosen": _assistant(p.chosen), "rejected": _assistant(p.rejected)}
        for p in pairs
        if p.prompt and p.chosen != p.rejected
    ]


# --- trainers --------------------------------------------------------------------------------------


def _policy_args(settings: PolicySettings, output_dir: Path) -> dict[str, Any]:
    """The shared trainer defaults plus what every policy stage sets alike: a constant learning rate (SFT may set
    its own schedule), a log per step."""
    return dict(
        base_args(output_dir, seed=settings.seed),
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        bf16=settings.bf16,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )


@dataclass
class _Stage:
    """One policy stage: its TRL config and trainer classes, the rows it trains on, its own arguments."""

    phase: str
    config_cls: Any
    trainer_cls: Any
    rows: list[dict[str, Any]]
    args: dict[str, Any]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def _run_stage(stage: _Stage, model, tokenizer, settings: PolicySettings, output_dir: Path,
               progress: ProgressFn | None) -> tuple[int, TrainingLog]:
    """Train `model` (the LoRA adapter on it) for one stage; (optimizer steps taken, the stage's logs)."""
    from datasets import Dataset

    config = stage.config_cls(**{**_policy_args(settings, output_dir), **stage.args})  # a stage's own args win
    logs = TrainingLog({"phase": stage.phase}, progress, summary=f"policy {stage.phase}")
    trainer = build_trainer(stage.trainer_cls, model=model, args=config, train_dataset=Dataset.from_list(stage.rows),
                            tokenizer=tokenizer, training_log=logs, **stage.trainer_kwargs)
    trainer.train()
    return trainer.state.global_step, logs


def _run_sft(model, tokenizer, rows, settings: PolicySettings, output_dir: Path, progress) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    args = dict(
        max_steps=settings.sft_steps_for(len(rows)),
        learning_rate=settings.sft_learning_rate,
        per_device_train_batch_size=per_device_batch(min(settings.sft_batch_size, len(rows))),
        max_length=settings.max_length,
        completion_only_loss=True,
        lr_scheduler_type=settings.sft_lr_scheduler,
    )
    steps, logs = _run_stage(_Stage("sft", SFTConfig, SFTTrainer, rows, args), model, tokenizer, settings, output_dir,
                             progress)
    losses, rates = logs.series("loss"), logs.series("learning_rate")
    return {"steps": steps, "loss_first": _first(losses), "loss_last": _last(losses), "lr_scheduler": settings.sft_lr_scheduler,
            "learning_rate_first": _first(rates), "learning_rate_last": _last(rates)}


def _run_dpo(model, tokenizer, rows, settings: PolicySettings, output_dir: Path, progress) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    args = dict(
        max_steps=settings.dpo_steps,
        learning_rate=settings.dpo_learning_rate,
        per_device_train_batch_size=per_device_batch(min(settings.dpo_batch_size, len(rows))),
        max_length=settings.max_length,
        beta=settings.dpo_beta,
    )
    steps, logs = _run_stage(_Stage("dpo", DPOConfig, DPOTrainer, rows, args), model, tokenizer, settings, output_dir,
                             progress)
    margins, losses, accuracies = logs.series("rewards/margins"), logs.series("loss"), logs.series("rewards/accuracies")
    return {
        "steps": steps,
        "reward_kind": "dpo implicit reward margin (chosen - rejected)",
        "mean_reward_first": _window_mean(margins, first=True),
        "mean_reward_last": _window_mean(margins, first=False),
        "loss_first": _first(losses),
        "loss_last": _last(losses),
        "accuracy_last": _last(accuracies),
    }


def _run_rl(
    algo, model, tokenizer, prompts, reward_fn, validity_fn, tracker, settings: PolicySettings, output_dir: Path, progress
) -> dict[str, Any]:
    if algo == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

    reward_funcs, weights = [], []
    if reward_fn is not None:
        reward_funcs.append(_reward_callable(reward_fn, tracker))
        weights.append(settings.reward_weights[0])
    if validity_fn is not None:
        reward_funcs.append(_validity_callable(validity_fn, tracker))
        weights.append(settings.reward_weights[1])
    # a batch must hold whole prompt groups: with fewer distinct prompts than that, TRL yields no batch at all
    # ("There seems not to be a single sample in your epoch_iterator, stopping training at step 0!")
    batch = min(settings.prompts_per_step, len(prompts)) * settings.num_generations
    args = dict(
        max_steps=settings.rl_steps,
        learning_rate=settings.rl_learning_rate,
        per_device_train_batch_size=batch,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        reward_weights=weights,
        use_vllm=False,
    )
    stage = _Stage(algo, Config, Trainer, [{"prompt": p} for p in prompts], args, {"reward_funcs": reward_funcs})
    steps, logs = _run_stage(stage, model, tokenizer, settings, output_dir, progress)
    if steps == 0:
        raise PolicyTrainingError(f"{algo.upper()} ran no step on {len(prompts)} prompts (batch {batch})")
    series = tracker.reward if reward_fn is not None else tracker.validity
    return {
        "steps": steps,
        "reward_kind": "reward_fn" if reward_fn is not None else "validity_fn",
        "mean_reward_first": _window_mean(series, first=True),
        "mean_reward_last": _window_mean(series, first=False),
        "validity_first": _window_mean(tracker.validity, first=True),
        "validity_last": _window_mean(tracker.validity, first=False),
        "reward_batches": len(series),
        "prompts": len(prompts),
        "loss_last": _last(logs.series("loss")),
    }


@dataclass
class _RewardTracker:
    """Mean reward of every scored batch, in call order (one batch = one generation round)."""

    reward: list[float] = field(default_factory=list)
    validity: list[float] = field(default_factory=list)


def _reward_callable(reward_fn: RewardFn, tracker: _RewardTracker):
    def reward(prompts, completions, **_: Any) -> list[float]:
        texts = [prompt_text(p) if isinstance(p, list) else str(p) for p in prompts]
        values = [float(v) for v in reward_fn(texts, [completion_text(c) for c in completions])]
        if len(values) != len(completions):
            raise PolicyTrainingError(f"reward_fn returned {len(values)} rewards for {len(completions)} completions")
        tracker.reward.append(sum(values) / len(values))
        return values

    return reward


def _validity_callable(validity_fn: ValidityFn, tracker: _RewardTracker):
    def validity(prompts, completions, **_: Any) -> list[float]:
        values = [
            float(validity_fn(prompt_text(p) if isinstance(p, list) else str(p), completion_text(c)))
            for p, c in zip(prompts, completions)
        ]
        tracker.validity.append(sum(values) / len(values))
        return values

    return validity


def validity_from_config(config, texts_by_prompt: dict[str, dict[str, str]], *, enumerate_max: int = 0) -> ValidityFn:
    """1.0 when the completion is an answer the config accepts for the prompt's task, else 0.0: one of the
    options for a closed label set scored by option (`enumerate_max`, as served), else JSON that
    `config.parse` accepts for the task's texts.

    `texts_by_prompt` maps `prompt_text(messages)` -> the task's texts (`CompiledConfig.read_task`).
    """
    from backend.label_config import InvalidAnswer
    from backend.prompts import option_answer

    control = config.enumerable_control(enumerate_max) if enumerate_max else None
    options = {option_answer(o) for o in (control.options() or [])} if control is not None else set()

    def validity(prompt: str, completion: str) -> float:
        texts = texts_by_prompt.get(prompt)
        if texts is None:
            return 0.0
        if control is not None:
            return 1.0 if completion.strip() in options else 0.0
        try:
            config.parse(completion, texts)
        except (InvalidAnswer, KeyError, TypeError, ValueError):
            return 0.0
        return 1.0

    return validity


# --- small helpers ---------------------------------------------------------------------------------


def _first(values: list[float]) -> float | None:
    return values[0] if values else None


def _last(values: list[float]) -> float | None:
    return values[-1] if values else None


def _window_mean(values: list[float], *, first: bool) -> float | None:
    """Mean over the first/last quarter of the series (at least one value, at most five)."""
    if not values:
        return None
    width = min(5, max(1, len(values) // 4))
    window = values[:width] if first else values[-width:]
    return sum(window) / len(window)
