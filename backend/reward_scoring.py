"""Reward-model inference: score texts with a trained reward model, tokenized exactly as in training.

`training/reward_model.py` trains these models (TRL RewardTrainer) and imports this module for encoding, so
the reranker at predict time and the trainer always agree on what the model reads. Only torch and
transformers, imported lazily; no training code.

What the model reads: `backend.prompts.reward_text(messages, answer)` -- the task's data text followed by
`Answer: <answer>`. Long inputs are cut inside the data text, never inside the answer: a cut answer would
make every candidate of a task look the same.

What a saved reward model directory holds: a transformers checkpoint (a plain sequence classifier, or the
mean-pooling head of `backend.reward_pooling`) plus `reward_model.json`; or, for an ensemble, the tokenizer,
`reward_model.json` listing the members (`"members": [{"path", "mean", "std"}, ...]`) and one checkpoint per
member under `members/`. An ensemble scores a text by averaging its members' standardized scores
(`ensemble_scores`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

META_FILE = "reward_model.json"
MEMBERS_KEY = "members"  # reward_model.json of an ensemble: [{"path": "members/0", "mean": m, "std": s}, ...]
ANSWER_MARKER = "\nAnswer: "  # what backend.prompts.reward_text puts between the data text and the answer
DEFAULT_MAX_LENGTH = 128


def encode(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """Token ids for one reward-model input, at most `max_length` long, the answer kept whole.

    Texts that fit are tokenized as a whole (exactly what `tokenizer(text)` gives). Longer ones are cut at
    the end of the data part (before the last `ANSWER_MARKER`), so the answer survives; a text without the
    marker is cut at its end. Causal-LM tokenizers that add no end token get their eos appended (TRL does the
    same for such models), so the last token -- the one a causal LM classifier reads -- is always the same."""
    ids = _with_end(tokenizer, tokenizer(text, add_special_tokens=True)["input_ids"])
    if len(ids) <= max_length:
        return ids
    prefix, suffix = _special_frame(tokenizer)
    special = len(_with_end(tokenizer, prefix + suffix))
    head, marker, answer = text.rpartition(ANSWER_MARKER)
    if not marker:
        head, answer = text, ""
    answer_ids = tokenizer(marker + answer, add_special_tokens=False)["input_ids"] if marker else []
    budget = max(max_length - special - len(answer_ids), 0)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][:budget]
    body = (head_ids + answer_ids)[: max(max_length - special, 1)]
    return _with_end(tokenizer, prefix + body + suffix)[:max_length]


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], <s> ...), read off
    an empty input (transformers 5 tokenizers have no build_inputs_with_special_tokens)."""
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
    starters = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    prefix = empty[:1] if empty and empty[0] in starters else []
    return prefix, empty[len(prefix):]


def _with_end(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if tokenizer.sep_token_id is None and eos is not None and (not ids or ids[-1] != eos):
        return list(ids) + [eos]
    return list(ids)


def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = DEFAULT_MAX_LENGTH,
                batch_size: int = 32) -> list[float]:
    """One scalar per text (higher = preferred), in input order; batched, no gradients."""
    import torch

    if not texts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, text, max_length) for text in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    scores = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # right padding, as in training (TRL's collator)
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(chunk):
                    scores[i] = float(logits[row, 0].float())
    finally:
        model.train(was_training)
    return scores


def ensemble_scores(member_scores: Sequence[Sequence[float]], stats: Sequence[dict]) -> list[float]:
    """One score per text from several members' scores: each member standardized by its own score
    distribution on its training texts (`stats[i]` = {"mean", "std"}), averaged, then multiplied by the
    members' mean std -- so the result reads on a single member's scale (the reranker's softmax sees similar
    gaps) while no member dominates by scoring on a wider scale."""
    if len(member_scores) == 1:
        return list(member_scores[0])
    scale = sum(s["std"] for s in stats) / len(stats)
    return [
        scale * sum((score - s["mean"]) / s["std"] for score, s in zip(column, stats)) / len(stats)
        for column in zip(*member_scores)
    ]


def load_checkpoint(path: str | Path, dtype: Any = None) -> Any:
    """A saved reward-model checkpoint: the mean-pooling head when its config names it, else a plain
    `AutoModelForSequenceClassification`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .reward_pooling import MEAN_POOL_ARCHITECTURE, BertMeanPoolForReward

    architectures = AutoConfig.from_pretrained(path).architectures or []
    cls = BertMeanPoolForReward if MEAN_POOL_ARCHITECTURE in architectures else AutoModelForSequenceClassification
    return cls.from_pretrained(path, dtype=dtype)


class RewardModel:
    """A trained reward model for inference: `RewardModel.load(path).score(texts)`. A single model or an
    ensemble (`members`: [(model, {"mean", "std"})]); `model` is the first member."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH, meta: dict | None = None,
                 members: list[tuple[Any, dict]] | None = None):
        self.members = members or [(model, {"mean": 0.0, "std": 1.0})]
        self.model, self.tokenizer, self.max_length = self.members[0][0], tokenizer, max_length
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "RewardModel":
        import torch
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no reward model at {path}")
        meta_path = path / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        listed = meta.get(MEMBERS_KEY) or [{"path": ".", "mean": 0.0, "std": 1.0}]
        members = []
        for entry in listed:
            model = load_checkpoint(path / entry["path"], dtype=dtype).to(device).eval()
            if model.config.num_labels != 1:
                raise ValueError(f"{path} is not a reward model: num_labels={model.config.num_labels}, expected 1")
            members.append((model, {"mean": float(entry["mean"]), "std": float(entry["std"])}))
        return cls(members[0][0], tokenizer, int(meta.get("max_length") or DEFAULT_MAX_LENGTH), meta, members)

    def score(self, texts: Sequence[str], batch_size: int = 32) -> list[float]:
        per_member = [score_texts(model, self.tokenizer, list(texts), max_length=self.max_length, batch_size=batch_size)
                      for model, _ in self.members]
        return ensemble_scores(per_member, [stats for _, stats in self.members])
