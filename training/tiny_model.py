"""Build a tiny random causal LM (Llama architecture) that vLLM can serve, entirely offline.

For smoke runs and tests only: its outputs are noise, but it exercises the real loading, tokenizer,
chat template, structured-output and LoRA paths. head_dim is 64 because vLLM's CPU attention kernels
reject smaller heads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def _training_corpus() -> list[str]:
    """English text that ships with CPython (the pydoc topic pages), so no download is needed."""
    from pydoc_data.topics import topics

    return [text for text in topics.values() if text.strip()]


def build_tokenizer(vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(tokenizer, layers: int = 2, **extra):
    """The text model of every tiny model here: Llama, hidden size 128, two heads of 64 (vLLM's CPU attention
    kernels reject smaller heads), tied embeddings (vLLM reads the flag; untied, lm_head would be left unloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **extra,
    )


def random_bf16_model(model_cls, config, seed: int):
    """`model_cls(config)` with weights drawn from `seed`, in bfloat16."""
    import torch

    torch.manual_seed(seed)
    return model_cls(config).to(torch.bfloat16)


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 4096, layers: int = 2) -> Path:
    """Write config, random weights (bf16 safetensors), tokenizer and chat template to ``out_dir``."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = tiny_llama_config(tokenizer, layers, torch_dtype="bfloat16")
    random_bf16_model(LlamaForCausalLM, config, seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_model_main(build, what: str, example_dir: str, argv: list[str] | None = None) -> None:
    """`python -m training.tiny_model DIR [--seed N]` and its vision-language twin."""
    parser = argparse.ArgumentParser(description=f"Build a {what} that vLLM can serve, offline")
    parser.add_argument("out_dir", help=f"directory to write the model to, e.g. {example_dir}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.out_dir, seed=args.seed)
    print(f"{what} written to {path}\nrun it with: DATAENGINE_MODEL={path} make run")


def main(argv: list[str] | None = None) -> None:
    write_model_main(build_tiny_model, "tiny random model", "models/tiny", argv)


if __name__ == "__main__":
    main()
