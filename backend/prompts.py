"""Prompt building: labeling instructions + label hints + task data -> chat messages for the engine."""
from __future__ import annotations

import json
from typing import Any

from .label_config import CompiledConfig, Control

SYSTEM_PROMPT = (
    "You are a careful data annotator. Read the task data and annotate it exactly as the labeling "
    "instructions say. Answer with one JSON object and nothing else."
)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _system(config: CompiledConfig, instructions: str) -> dict[str, str]:
    system = SYSTEM_PROMPT
    guidelines = (instructions or config.instructions).strip()
    if guidelines:
        system += "\n\nLabeling instructions:\n" + guidelines
    return {"role": "system", "content": system}


def _task_data(config: CompiledConfig, texts: dict[str, str]) -> str:
    return "Task data:\n" + "\n\n".join(f"{obj.name}:\n{obj.prompt_text(texts[obj.name])}" for obj in config.objects)


def _user(config: CompiledConfig, texts: dict[str, str], text: str, images: dict[str, str] | None) -> dict[str, Any]:
    """The user turn: plain text, or for image configs OpenAI content parts, one `image_url` per <Image>
    (the prepared data URI when given, else the task's own reference, which is what training keeps)."""
    if not config.image_objects:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": (images or {}).get(obj.name) or texts[obj.name]}}
        for obj in config.image_objects
    ]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def message_text(content: Any) -> str:
    """The text of a message's content, whether a string or OpenAI content parts (images left out)."""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or [] if isinstance(part, dict) and part.get("type") == "text")


def message_images(messages: list[dict[str, Any]]) -> list[str]:
    """The image URLs (task references or data URIs) of chat messages, in order."""
    return [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]


def build_messages(
    config: CompiledConfig, texts: dict[str, str], instructions: str = "", images: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Ask for one JSON object with a key per control (the sampling path)."""
    fields = "\n".join(f"- {control.describe()}" for control in config.controls)
    example_keys = ", ".join(f"{json.dumps(c.name)}: ..." for c in config.controls)
    user = f"{_task_data(config, texts)}\n\nFill in these fields:\n{fields}\n\nRespond with JSON only: {{{example_keys}}}"
    return [_system(config, instructions), _user(config, texts, user, images)]


def build_choice_messages(
    config: CompiledConfig,
    texts: dict[str, str],
    control: Control,
    option_labels: list[str],
    instructions: str = "",
    images: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Ask for the letter of the best option (the exhaustive-scoring path for closed label sets)."""
    lines = "\n".join(f"{LETTERS[i]}) {label}" for i, label in enumerate(option_labels))
    hint = f" ({control.hint})" if control.hint else ""
    user = (
        f"{_task_data(config, texts)}\n\nWhich option fits \"{control.name}\"{hint} best?\n{lines}\n\n"
        "Answer with the letter only."
    )
    return [_system(config, instructions), _user(config, texts, user, images)]


def answer_text(answer: dict) -> str:
    """Canonical text of a JSON answer: what the policy generates and what the reward model reads."""
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


def reward_text(messages: list[dict[str, Any]], answer: str) -> str:
    """Reward-model input: the task data (without the instruction boilerplate, which a small encoder's
    256-token window cannot afford) followed by the answer. Training and reranking both use this."""
    user = next((message_text(m["content"]) for m in reversed(messages) if m.get("role") == "user"), "")
    data = user
    if data.startswith("Task data:\n"):
        data = data[len("Task data:\n"):]
    for marker in ("\n\nFill in these fields:", "\n\nWhich option fits"):
        data = data.split(marker, 1)[0]
    return f"{data.strip()}\nAnswer: {answer}"
