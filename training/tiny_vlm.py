"""Build a tiny random vision-language model (Idefics3 / SmolVLM architecture) that vLLM can serve, offline.

For tests and smoke runs of image projects only: its answers are noise, but it exercises the real image
path — OpenAI `image_url` content parts, vLLM's Idefics3 multimodal processor (resizing, tiling, image
tokens), the structured-output constraint and option scoring.

Why Idefics3 and not Qwen2-VL, LLaVA or PaliGemma: the CPU engine venv has no torchvision (the PyPI
torchvision is a CUDA build that breaks `import transformers`; see scripts/setup.sh), and
  * transformers' Qwen2VLProcessor always builds a Qwen2VLVideoProcessor, which requires torchvision;
  * vLLM's llava and paligemma code import vLLM's pixtral module (llava at import, paligemma through
    `get_vision_encoder_info`), which imports transformers' torchvision-based Pixtral image processor.
vLLM's idefics3 module and transformers' PIL Idefics3 image processor need none; SmolVLM checkpoints
(e.g. HuggingFaceTB/SmolVLM-256M-Instruct) are this architecture, so it is also the CPU choice for real.
On GPU hosts (`vllm` brings a working torchvision) Qwen2-VL models serve as well.
Text head_dim is 64 (vLLM's CPU attention kernels reject smaller heads); tiles are 56x56 px (4x4 patches
of 14 px, pixel-shuffled 2x2 = 4 image tokens per tile), images at most 112 px a side.
"""
from __future__ import annotations

from pathlib import Path

from training.tiny_model import build_tokenizer, random_bf16_model, tiny_llama_config, write_model_main

IMAGE_TOKEN = "<image>"
TILE = 56
PATCH = 14
SCALE = 2
LONGEST_EDGE = 112
IDEFICS3_TOKENS = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]

# Renders OpenAI-style content parts: every image part becomes the model's image placeholder.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_vlm_tokenizer(vocab_size: int = 4096):
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    tokenizer.eos_token = "<end_of_utterance>"
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    return tokenizer


def build_tiny_vlm(out_dir: str | Path, seed: int = 0, vocab_size: int = 4096, layers: int = 2) -> Path:
    """Write config, random weights (bf16 safetensors), tokenizer, image processor and chat template."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_vlm_tokenizer(vocab_size)
    text = tiny_llama_config(tokenizer, layers)
    vision = {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": TILE, "patch_size": PATCH,
    }
    config = Idefics3Config(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = random_bf16_model(Idefics3ForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    _processor(tokenizer).save_pretrained(out)
    return out


def _processor(tokenizer):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True
    )
    image_seq_len = (TILE // PATCH) ** 2 // SCALE**2
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=VLM_CHAT_TEMPLATE
    )


def main(argv: list[str] | None = None) -> None:
    write_model_main(build_tiny_vlm, "tiny random vision-language model", "models/tiny-vlm", argv)


if __name__ == "__main__":
    main()
