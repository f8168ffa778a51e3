"""Reward-model inference: score texts with a trained reward model, tokenized exactly as in training.

`training/reward_model.py` trains these models (TRL RewardTrainer) and imports this module for encoding, so
the reranker at predict time and the trainer always agree on what the model reads. Only torch and
transformers, imported lazily; no training code.

What the model reads: `backend.prompts.reward_text(messages, answer)` -- the task's data text followed by
`Answer: <answer>`. Long inputs are cut inside the data text, never inside the answer: a cut answer would
make every candidate of a task look the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

META_FILE = "reward_model.json"
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


class RewardModel:
    """A trained reward model for inference: `RewardModel.load(path).score(texts)`."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH, meta: dict | None = None):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "RewardModel":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

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
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        if model.config.num_labels != 1:
            raise ValueError(f"{path} is not a reward model: num_labels={model.config.num_labels}, expected 1")
        return cls(model, tokenizer, int(meta.get("max_length") or DEFAULT_MAX_LENGTH), meta)

    def score(self, texts: Sequence[str], batch_size: int = 32) -> list[float]:
        return score_texts(self.model, self.tokenizer, list(texts), max_length=self.max_length, batch_size=batch_size)
