"""Prompt building: labeling instructions + label hints + task data -> chat messages for the engine."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .label_config import CompiledConfig, Control

SYSTEM_PROMPT = (
    "You are a careful data annotator. Read the task data and annotate it exactly as the labeling "
    "instructions say."
)
JSON_ONLY = " Answer with one JSON object and nothing else."


def _system(config: CompiledConfig, instructions: str, closing: str = JSON_ONLY) -> dict[str, str]:
    system = SYSTEM_PROMPT + closing
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
    """Ask for the best option, answered as the option itself (the exhaustive-scoring path for closed label
    sets). `option_labels` are the options as the model sees them (with their hints); the answer is the bare
    option (`option_answer`). The model's own words carry what it knows about the labels: a 135M model
    scored by letter (A, B, ...) ranked sentiment no better than chance, by label word it did (AUROC 0.75)."""
    lines = "\n".join(f"- {label}" for label in option_labels)
    hint = f" ({control.hint})" if control.hint else ""
    user = (
        f"{_task_data(config, texts)}\n\nWhich option fits \"{control.name}\"{hint} best?\n{lines}\n\n"
        "Answer with the option only."
    )
    return [_system(config, instructions, closing=""), _user(config, texts, user, images)]


def option_answer(option: Any) -> str:
    """What the model answers for an option of a closed set (a Choice value, a rating number)."""
    return str(option)


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


@dataclass(frozen=True)
class PolicyTurn:
    """One exchange in the format the policy is served in: the prompt it is asked, the answer it should give."""

    messages: list[dict[str, Any]]
    completion: str


def policy_turn(
    config: CompiledConfig, texts: dict[str, str], result: list[dict[str, Any]], instructions: str = "", *, enumerate_max: int
) -> PolicyTurn | None:
    """What the served model is asked for a task and what it should answer for `result`. Training uses this so
    the policy learns exactly the prompt /predict sends: a closed label set's option-scoring prompt answered
    with the bare option (`build_choice_messages`), otherwise the JSON prompt answered with the canonical JSON
    answer (`build_messages`). None when `result` holds no option of the closed set."""
    control = config.enumerable_control(enumerate_max)
    if control is None:
        answer = answer_text(config.answer_from_results(result, texts))
        return PolicyTurn(build_messages(config, texts, instructions), answer)
    options = control.options() or []
    chosen = config.answer_from_results(result, texts).get(control.name)
    if chosen not in options:
        return None
    labels = [control.describe_option(o) for o in options]
    return PolicyTurn(build_choice_messages(config, texts, control, labels, instructions), option_answer(chosen))
