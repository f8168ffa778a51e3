"""What every trainer here shares: the `TrainingArguments` defaults, the progress callback, quiet output.

The policy (training/policy.py: SFT, DPO, GRPO, RLOO) and the reward model (training/reward_model.py:
RewardTrainer) add their own knobs on top of `base_args`; `TrainingLog` keeps each trainer log and forwards it
as one progress event; `build_trainer` attaches it and drops transformers' stdout printer. Everything from
transformers is imported when first used: importing this module stays light.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


def base_args(output_dir: Path | str, *, seed: int) -> dict[str, Any]:
    """`TrainingArguments` every run here uses: no checkpoints, no reporting, no tqdm, data in this process,
    seeded, on the GPU when there is one, and no activation checkpointing (TRL turns it on; it only slows the
    small models trained here down)."""
    return dict(
        output_dir=str(output_dir),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda_available(),
        **activation_checkpointing_off(),
    )


def activation_checkpointing_off() -> dict[str, bool]:
    """transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns); older
    releases know only the old name."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class TrainingLog:
    """Every log a trainer writes, in order, each forwarded to `progress` as `{**label, "step", "max_steps",
    "epoch", <the logged values>}`. With `summary`, each log is also one info line ("<summary> step 3/20 loss=...").
    A failing `progress` is logged, never raised: progress reporting must not kill a training run."""

    label: dict[str, Any]
    progress: ProgressFn | None = None
    summary: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def callback(self):
        from transformers import TrainerCallback

        training_log = self

        class ForwardLogs(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                training_log.record(state, logs or {})

        return ForwardLogs()

    def record(self, state, logs: dict[str, Any]) -> None:
        if not logs:
            return
        event = {**self.label, "step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch}
        event.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        self.records.append(event)
        if self.summary:
            log.info("%s step %d/%d %s", self.summary, state.global_step, state.max_steps, _shown(event))
        if self.progress is not None:
            try:
                self.progress(dict(event))
            except Exception:
                log.exception("%s: the progress callback failed", self.summary or "training")

    def series(self, key: str) -> list[float]:
        """The finite values logged under `key`, in order."""
        return [float(r[key]) for r in self.records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


_SHOWN = ("loss", "reward", "rewards/margins", "rewards/accuracies", "learning_rate")


def _shown(event: dict[str, Any]) -> str:
    return " ".join(f"{k}={event[k]:.4g}" for k in _SHOWN if isinstance(event.get(k), (int, float)))


def build_trainer(trainer_cls, *, model, args, train_dataset, tokenizer, training_log: TrainingLog, **extra: Any):
    """`trainer_cls(...)` reporting through `training_log`, quiet on stdout."""
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                          callbacks=[training_log.callback()], **extra)
    quiet(trainer)
    return trainer


def quiet(trainer) -> None:
    """Drop transformers' PrinterCallback (it print()s every log dict) and its tqdm bar: `TrainingLog` reports."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
