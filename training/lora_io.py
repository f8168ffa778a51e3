"""The policy's LoRA adapter on disk and in memory: load the base with a fresh adapter, save only the adapter.

What is saved is what vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` loads at runtime
(`adapter_config.json` + `adapter_model.safetensors`); its rank stays <= MAX_LORA_RANK, what the engine is started
with (`--max-lora-rank 16`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .distributed import is_main_process

log = logging.getLogger(__name__)

MAX_LORA_RANK = 16  # the engine is started with --max-lora-rank DATAENGINE_MAX_LORA_RANK (default 16)
LORA_TARGETS = "all-linear"  # attention and MLP projections
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class PolicyTrainingError(RuntimeError):
    """The policy update cannot run with these inputs; the message says why."""


@dataclass(frozen=True)
class LoraShape:
    """The adapter's peft knobs."""

    r: int
    alpha: int
    dropout: float

    def check_rank(self) -> None:
        if not 1 <= self.r <= MAX_LORA_RANK:
            raise PolicyTrainingError(f"lora_r={self.r}: the engine loads adapters of rank 1..{MAX_LORA_RANK}")


def load_with_adapter(base_model: str, lora: LoraShape, *, bf16: bool):
    """(tokenizer, the base model wrapped in one fresh "default" LoRA adapter). The same adapter is carried through
    every stage (SFT, then RL/DPO): the trainers get a PeftModel and no peft_config."""
    import torch
    from peft import LoraConfig, get_peft_model

    tokenizer = load_chat_tokenizer(base_model)
    base = load_causal_lm(base_model, torch.bfloat16 if bf16 else torch.float32)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=LORA_TARGETS,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = str(base_model)
    return tokenizer, model


def load_chat_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise PolicyTrainingError(f"{base_model}: the tokenizer has no chat template; the policy is trained on chat prompts")
    return tokenizer


def load_causal_lm(base_model: str, dtype):
    """`AutoModelForCausalLM.from_pretrained`, with every weight guaranteed off the meta device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    _materialize_tied_embeddings(model, base_model)
    return model


def _checkpoint_ties_embeddings(base_model: str) -> bool:
    """What the checkpoint's own config.json says, read as JSON: independent of transformers' in-process state."""
    config_path = Path(base_model) / "config.json"
    if not config_path.is_file():
        return False
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text_config = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


def _materialize_tied_embeddings(model, base_model: str) -> None:
    """transformers 5 sometimes leaves a tied `lm_head` on the meta device after `from_pretrained` (seen in a long
    test session: "lm_head.weight | MISSING", then "Cannot copy out of meta tensor" in the trainer). When the
    checkpoint ties embeddings, tie them here; any other parameter left on meta is a broken checkpoint."""
    output = model.get_output_embeddings()
    if output is not None and output.weight.device.type == "meta" and _checkpoint_ties_embeddings(base_model):
        log.warning(
            "%s: output embeddings were not tied on load (config.tie_word_embeddings=%s, _tied_weights_keys=%s); tying them",
            base_model, getattr(model.config, "tie_word_embeddings", None), getattr(type(model), "_tied_weights_keys", None),
        )
        output.weight = model.get_input_embeddings().weight
    on_meta = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if on_meta:
        raise PolicyTrainingError(f"{base_model}: these weights were not loaded from the checkpoint: {on_meta[:5]}")


def save_adapter(model, out_dir: Path) -> Path:
    """Only the trained "default" adapter (a reference copy that RL with beta > 0 adds is left out). In a launched
    round only the main process writes it: the others hold the same weights."""
    out_dir = Path(out_dir)
    if not is_main_process():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), selected_adapters=["default"], safe_serialization=True)
    missing = [name for name in ADAPTER_FILES if not (out_dir / name).is_file()]
    if missing:
        raise PolicyTrainingError(f"saving the adapter to {out_dir} did not write {missing}")
    for name in ADAPTER_FILES:  # safetensors writes 0600; an engine running as another user must read it
        os.chmod(out_dir / name, 0o644)
    return out_dir
