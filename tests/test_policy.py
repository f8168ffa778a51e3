"""Policy update (training/policy.py): GRPO/RLOO/DPO on a LoRA adapter of the tiny random Llama, and hot swap
of the trained adapter into the real vLLM engine.

About the tiny model: its weights are random with init std 0.02, tied embeddings and a final RMSNorm, so a
LoRA on the attention projections can move the logits only by about +-2.6: sampled at temperature 1 its
distribution stays near uniform over 4k tokens and no reward signal can be learned. The RL tests therefore
sample at temperature 0.1 (TRL applies the same temperature to the training log-probabilities), where the
adapter can make the policy nearly deterministic. Real models need none of this.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from backend.engine_client import EngineClient
from backend.label_config import compile_label_config
from backend.prompts import build_choice_messages, build_messages
from tests.conftest import LABEL_CONFIGS, TINY_NAME
from training.lora_io import ADAPTER_FILES, MAX_LORA_RANK, load_causal_lm
from training.policy import (
    PolicySettings,
    PolicyTrainingError,
    prompt_text,
    resolve_algo,
    train_policy,
    validity_from_config,
)
from training.preferences import PreferencePair, SftExample

SENTIMENT = (LABEL_CONFIGS / "sentiment.xml").read_text()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentiment" / "yelp_labelled.txt"
TARGET_LABEL = "Negative"
# One torch thread: on the shared 2-core test machines two threads next to another busy process ran ~9x
# slower (OpenMP oversubscription: 103 s vs 12 s for the same 20 RLOO steps).
THREADS = int(os.environ.get("DATAENGINE_TEST_TORCH_THREADS", "1"))


def _answer(label: str) -> str:
    return json.dumps({"sentiment": label}, separators=(",", ":"))


def _reviews(start: int, count: int) -> list[tuple[str, str]]:
    """(sentence, label) from the shared sentiment data, or synthetic ones when it is absent."""
    if DATA.is_file():
        rows = [line.split("\t") for line in DATA.read_text(encoding="utf-8").splitlines() if "\t" in line]
        return [(text, "Positive" if flag.strip() == "1" else "Negative") for text, flag in rows[start : start + count]]
    return [(f"Review number {i}: the food was {'great' if i % 2 else 'awful'}.", "Positive" if i % 2 else "Negative")
            for i in range(start, start + count)]


@pytest.fixture(scope="module")
def config():
    return compile_label_config(SENTIMENT)


def _sft(config, reviews, completion=None) -> list[SftExample]:
    return [
        SftExample(i, build_messages(config, {"text": text}), completion or _answer(label), [], 1.0)
        for i, (text, label) in enumerate(reviews)
    ]


def _label_share(completion: str) -> float:
    """Dense stand-in for "the answer says Negative": the share of the completion's characters that are
    characters of the target label (1.0 for "Negative" itself, ~0.05 for random text)."""
    return sum(ch in TARGET_LABEL for ch in completion) / max(len(completion), 1)


# --- small, no training ----------------------------------------------------------------------------


def test_algo_names():
    assert resolve_algo(None) == "sft"
    assert resolve_algo("RLOO") == "rloo"
    with pytest.raises(PolicyTrainingError, match="sft, dpo, grpo, rloo"):
        resolve_algo("ppo")


def test_reward_ensemble_is_one_model_on_cpu_while_the_policy_trains(tmp_path, monkeypatch):
    import torch

    from tests.conftest import make_settings
    from training.rounds import rm_ensemble_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    unset = make_settings(tmp_path)
    assert rm_ensemble_size(unset, "sft") == 1 and rm_ensemble_size(unset, "dpo") == 1
    assert rm_ensemble_size(unset, "none") == 3  # the reward model is the only learner
    assert rm_ensemble_size(make_settings(tmp_path, rm_ensemble=2), "sft") == 2  # DATAENGINE_RM_ENSEMBLE wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rm_ensemble_size(unset, "sft") == 3


def test_sft_length_follows_the_data():
    settings = PolicySettings()  # 3 epochs of small sets, >= 480 examples seen, <= 960
    assert settings.sft_steps_for(100) == 300 // 8 + 1
    assert settings.sft_steps_for(300) == 480 // 8
    assert settings.sft_steps_for(600) == 600 // 8
    assert settings.sft_steps_for(5000) == 960 // 8
    assert PolicySettings(sft_steps=7).sft_steps_for(5000) == 7


def test_policy_precision_follows_the_setting(tiny_model_dir, tmp_path, config):
    from pydantic import ValidationError

    from backend.hardware import native_bf16
    from tests.conftest import make_settings
    from training.rounds import PRECISIONS

    sft = _sft(config, _reviews(0, 4))
    runs = {}
    for precision in ("auto", "fp32", "bf16"):
        chosen = make_settings(tmp_path, policy_precision=precision).policy_precision
        settings = PolicySettings(sft_steps=1, torch_threads=THREADS, bf16=PRECISIONS[chosen])
        runs[precision] = train_policy(str(tiny_model_dir), tmp_path / precision, sft=sft, settings=settings).metrics
    assert runs["auto"]["settings"]["bf16"] is native_bf16()  # resolved, and recorded in the version's metrics
    assert runs["fp32"]["settings"]["bf16"] is False and runs["bf16"]["settings"]["bf16"] is True
    with pytest.raises(ValidationError, match="policy_precision"):
        make_settings(tmp_path, policy_precision="half")


def test_a_round_trains_generated_answers_at_a_higher_constant_learning_rate(tmp_path):
    from tests.conftest import load_config, make_settings, ranking_configs
    from training.rounds import CLOSED_SET_SFT_LR, GENERATED_SFT_LR, policy_settings, project_kind

    settings = make_settings(tmp_path)
    knobs = lambda xml: policy_settings(project_kind(xml, settings), settings)  # noqa: E731
    closed, ner = knobs(load_config("sentiment")[0]), knobs(load_config("ner")[0])
    ranking = knobs(load_config(ranking_configs()[0])[0])
    assert closed.sft_learning_rate == CLOSED_SET_SFT_LR  # one option word
    assert ner.sft_learning_rate == ranking.sft_learning_rate == GENERATED_SFT_LR
    assert GENERATED_SFT_LR > CLOSED_SET_SFT_LR
    assert closed.sft_lr_scheduler == "linear"
    assert ner.sft_lr_scheduler == ranking.sft_lr_scheduler == "constant"
    fp32 = make_settings(tmp_path, policy_precision="fp32")
    assert policy_settings(project_kind(load_config("ner")[0], fp32), fp32).bf16 is False


@pytest.mark.parametrize("scheduler", ["constant", "linear"])
def test_sft_follows_its_learning_rate_schedule(tiny_model_dir, tmp_path, config, scheduler):
    settings = PolicySettings(sft_steps=4, sft_batch_size=2, sft_learning_rate=1e-3, sft_lr_scheduler=scheduler,
                              torch_threads=THREADS)
    sft = train_policy(str(tiny_model_dir), tmp_path / "out", sft=_sft(config, _reviews(0, 8)), settings=settings).metrics["sft"]
    assert sft["lr_scheduler"] == scheduler
    assert sft["learning_rate_first"] == pytest.approx(1e-3)
    if scheduler == "linear":  # 1e-3 * (1 - 3/4) on the last of 4 steps
        assert sft["learning_rate_last"] == pytest.approx(2.5e-4)
    else:
        assert sft["learning_rate_last"] == pytest.approx(1e-3)


def test_prompt_text_drops_the_system_prompt(config):
    messages = build_messages(config, {"text": "Crust is not good."})
    text = prompt_text(messages)
    assert "Crust is not good." in text and "careful data annotator" not in text


def test_validity_from_config(config):
    messages = build_messages(config, {"text": "Crust is not good."})
    validity = validity_from_config(config, {prompt_text(messages): {"text": "Crust is not good."}})
    assert validity(prompt_text(messages), _answer("Negative")) == 1.0
    assert validity(prompt_text(messages), _answer("Angry")) == 0.0  # outside the label set
    assert validity(prompt_text(messages), '{"sentiment":"Neg') == 0.0  # cut off
    assert validity("an unknown prompt", _answer("Negative")) == 0.0


def test_rejects_rank_the_engine_cannot_load(tmp_path, config):
    with pytest.raises(PolicyTrainingError, match="rank"):
        train_policy("unused", tmp_path, sft=_sft(config, _reviews(0, 2)), settings=PolicySettings(lora_r=32))


def test_rl_without_a_reward_is_an_error(tiny_model_dir, tmp_path, config):
    settings = PolicySettings(sft_steps=0, rl_steps=2, torch_threads=THREADS)
    with pytest.raises(PolicyTrainingError, match="reward"):
        train_policy(str(tiny_model_dir), tmp_path, sft=_sft(config, _reviews(0, 2)), algo="grpo", settings=settings)


# --- RL raises the reward ----------------------------------------------------------------------------


@pytest.mark.parametrize(("algo", "sft_steps"), [("grpo", 4), ("rloo", 0)])
def test_rl_raises_a_learnable_reward(tiny_model_dir, tmp_path, config, algo, sft_steps):
    reviews = _reviews(0, 8)
    sft = _sft(config, reviews)
    texts_by_prompt = {prompt_text(e.prompt): {"text": text} for e, (text, _) in zip(sft, reviews)}
    seen_prompts: list[str] = []
    progress: list[dict] = []

    def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
        seen_prompts.extend(prompts)
        return [_label_share(c) for c in completions]

    settings = PolicySettings(
        sft_steps=sft_steps, rl_steps=20, rl_learning_rate=1e-3, temperature=0.1, max_completion_length=16,
        num_generations=4, prompts_per_step=2, seed=1, torch_threads=THREADS,
    )
    result = train_policy(
        str(tiny_model_dir), tmp_path / "adapter", sft=sft, pairs=[], algo=algo, reward_fn=reward_fn,
        validity_fn=validity_from_config(config, texts_by_prompt), settings=settings, progress=progress.append,
    )
    metrics = result.metrics
    print(f"{algo}: reward {metrics['mean_reward_first']:.3f} -> {metrics['mean_reward_last']:.3f} in {metrics['seconds']} s")
    assert metrics["algo"] == algo and metrics["steps"] == 20
    assert metrics["mean_reward_last"] > metrics["mean_reward_first"] + 0.1
    assert set(seen_prompts) <= set(texts_by_prompt)  # the reward model sees the task text, not chat markup
    rl_logs = [p for p in progress if p["phase"] == algo and "reward" in p]
    assert [p["step"] for p in rl_logs] == list(range(1, 21))
    assert {"loss", "rewards/reward/mean", "rewards/validity/mean"} <= set(rl_logs[0])
    if sft_steps:
        assert [p["step"] for p in progress if p["phase"] == "sft" and "loss" in p] == list(range(1, sft_steps + 1))
    _assert_adapter(result.adapter_path)


# --- DPO -------------------------------------------------------------------------------------------


def test_dpo_from_pairs_writes_a_loadable_adapter(tiny_model_dir, tmp_path, config):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    # Annotators always preferred "Negative" here: a preference the random policy can learn in a few steps
    # (task-dependent labels need a model that can read the task).
    pairs = [
        PreferencePair(
            task_id=i, prompt=build_messages(config, {"text": text}), chosen=_answer("Negative"),
            rejected=_answer("Positive"), chosen_result=[], rejected_result=[], margin=1.0, weight=1.0,
            source="annotation>prediction",
        )
        for i, (text, _) in enumerate(_reviews(0, 20))
    ]
    progress: list[dict] = []
    settings = PolicySettings(dpo_steps=10, dpo_learning_rate=1e-3, dpo_batch_size=4, seed=0, torch_threads=THREADS)
    result = train_policy(
        str(tiny_model_dir), tmp_path / "adapter", pairs=pairs, algo="dpo", settings=settings, progress=progress.append
    )
    metrics = result.metrics
    print(f"dpo: margin {metrics['mean_reward_first']:.3f} -> {metrics['mean_reward_last']:.3f}, "
          f"loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f} in {metrics['seconds']} s")
    assert metrics["steps"] == 10
    assert metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the adapter starts as a no-op
    assert metrics["loss_last"] < metrics["loss_first"] - 0.1
    assert metrics["mean_reward_last"] > metrics["mean_reward_first"]
    assert [p["step"] for p in progress if "loss" in p] == list(range(1, 11))
    _assert_adapter(result.adapter_path)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = load_causal_lm(str(tiny_model_dir), torch.float32)
    inputs = tokenizer.apply_chat_template(pairs[0].prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = base(**inputs).logits[0, -1].clone()
        tuned = PeftModel.from_pretrained(base, str(result.adapter_path))
        after = tuned(**inputs).logits[0, -1]
    assert not torch.allclose(before, after)  # the adapter is trained (LoRA B starts at zero) and applies


def _assert_adapter(path: Path) -> None:
    for name in ADAPTER_FILES:
        assert (path / name).is_file(), name
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] <= MAX_LORA_RANK
    # every linear layer of the decoder: attention and MLP
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets, targets
    assert not (path / "ref").exists()  # only the trained adapter, never a reference copy


# --- hot swap into the real engine -------------------------------------------------------------------


def _served_model_dir(engine_url: str, fallback: Path) -> Path:
    """The directory the engine serves (a dev engine may serve its own build of the tiny model)."""
    models = httpx.get(engine_url + "/v1/models", timeout=10).json()["data"]
    root = next((m.get("root") for m in models if m["id"] == TINY_NAME), None)
    return Path(root) if root and Path(root, "config.json").is_file() else fallback


@pytest.mark.engine
def test_trained_adapter_hot_swaps_into_the_engine(engine_url, tiny_model_dir, tmp_path, config):
    """SFT a LoRA on "Negative" answers (the option itself on the option-scoring prompt, the JSON answer on the
    sampling prompt), load it at runtime, and show greedy outputs under the adapter differ from the base
    model's for the same prompts. Never send prompt log-probabilities: they crash vLLM's CPU LoRA path."""
    control = config.controls[0]
    options = list(control.labels)
    train = _reviews(0, 8)
    sft = [
        SftExample(i, build_choice_messages(config, {"text": text}, control, options), TARGET_LABEL, [], 1.0)
        for i, (text, _) in enumerate(train)
    ] + _sft(config, train, completion=_answer(TARGET_LABEL))
    settings = PolicySettings(sft_steps=24, sft_learning_rate=5e-3, sft_batch_size=4, rl_steps=0, seed=0,
                              torch_threads=THREADS)
    base_dir = _served_model_dir(engine_url, tiny_model_dir)
    result = train_policy(str(base_dir), tmp_path / "adapter", sft=sft, algo="grpo", settings=settings)
    print(f"sft: loss {result.metrics['sft']['loss_first']:.3f} -> {result.metrics['sft']['loss_last']:.3f} "
          f"in {result.metrics['seconds']} s")

    name = f"policy-test-{uuid.uuid4().hex[:8]}"
    client = EngineClient(engine_url, TINY_NAME, timeout=120)
    try:
        client.load_lora_adapter(name, str(result.adapter_path))
        assert name in client.loaded_models()
        held_out = [text for text, _ in _reviews(100, 4)]
        report = []
        for text in held_out:
            choice_messages = build_choice_messages(config, {"text": text}, control, options)
            texts = {"text": text}
            json_messages = build_messages(config, texts)
            row = {"text": text}
            for tag, model in (("base", TINY_NAME), ("lora", name)):
                row[f"{tag}_free"] = _greedy(engine_url, model, choice_messages)
                row[f"{tag}_scores"] = client.score_options(choice_messages, options, model=model)
                samples = client.sample(
                    json_messages, config.schema(texts), n=1, temperature=0.0,
                    max_tokens=config.max_answer_chars(texts) + 8, model=model,
                )
                row[f"{tag}_json"] = samples[0].text
            report.append(row)
            print("HOTSWAP", json.dumps(row))
        target = options.index(TARGET_LABEL)
        # unconstrained greedy decoding of the same prompt changes under the adapter
        assert all(r["base_free"] != r["lora_free"] for r in report)
        # option scoring (the predict path for closed label sets) prefers "Negative" under the adapter
        assert all(max(range(3), key=r["lora_scores"].__getitem__) == target for r in report)
        assert all(r["lora_scores"][target] > r["base_scores"][target] for r in report)
        # the JSON sampling path (constrained, greedy) moves toward "Negative" too
        hits = {tag: sum(_label_of(r[f"{tag}_json"]) == TARGET_LABEL for r in report) for tag in ("base", "lora")}
        assert hits["lora"] > hits["base"], hits
    finally:
        try:
            httpx.post(engine_url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
        finally:
            client.close()


def _greedy(engine_url: str, model: str, messages: list[dict[str, str]]) -> str:
    body = httpx.post(
        engine_url + "/v1/chat/completions",
        json={"model": model, "messages": messages, "temperature": 0.0, "max_tokens": 4},
        timeout=120,
    ).json()
    return body["choices"][0]["message"]["content"]


def _label_of(raw: str) -> str | None:
    try:
        return json.loads(raw).get("sentiment")
    except (ValueError, AttributeError):
        return None


# --- loading ---------------------------------------------------------------------------------------


def test_a_tied_lm_head_left_on_meta_is_tied_on_load(tiny_model_dir):
    """transformers 5 left the tied lm_head on the meta device once in a long session; the loader repairs it."""
    import torch

    from training.lora_io import _materialize_tied_embeddings

    model = load_causal_lm(str(tiny_model_dir), torch.float32)
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    _materialize_tied_embeddings(model, str(tiny_model_dir))
    assert model.lm_head.weight is model.model.embed_tokens.weight

    model.model.norm.weight = torch.nn.Parameter(torch.empty_like(model.model.norm.weight, device="meta"))
    with pytest.raises(PolicyTrainingError, match="model.norm.weight"):
        _materialize_tied_embeddings(model, str(tiny_model_dir))
