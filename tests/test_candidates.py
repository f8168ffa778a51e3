"""Candidate ranking: invalid samples dropped, identical ones merged into votes, scores in [0, 1]."""
from __future__ import annotations

import json
import math

from backend.candidates import canonical_key, rank_options, rank_samples
from backend.engine_client import Sample
from backend.label_config import compile_label_config

CONFIG = compile_label_config(
    '<View><Text name="t" value="$t"/><Choices name="c" toName="t" choice="multiple">'
    '<Choice value="A"/><Choice value="B"/></Choices></View>'
)


def parse(raw: str):
    return CONFIG.parse(raw, {"t": "text"})


def sample(choices, logprob=-0.5, finish="stop"):
    return Sample(text=json.dumps({"c": choices}), mean_logprob=logprob, tokens=5, finish_reason=finish)


def test_identical_answers_merge_and_votes_raise_the_score():
    outcome = rank_samples(
        [sample(["A"]), sample(["A"], -0.1), sample(["B", "A"], -0.2), sample(["A", "B"], -3.0)], parse
    )
    assert outcome.invalid == 0
    assert [c.votes for c in outcome.candidates] == [2, 2]
    assert outcome.candidates[0].result[0]["value"] == {"choices": ["A"]}  # same votes, better logprob wins
    assert all(0.0 <= c.score <= 1.0 for c in outcome.candidates)
    assert outcome.candidates[0].mean_logprob == -0.1  # the best sample of the merged group
    assert outcome.candidates[0].score == 0.5 * 2 / 4 + 0.5 * math.exp(-0.1)


def test_invalid_and_truncated_samples_are_dropped_and_counted():
    bad = Sample(text='{"c": ["Z"]}', mean_logprob=-0.1, tokens=3, finish_reason="stop")
    cut = Sample(text='{"c": ["A"', mean_logprob=-0.1, tokens=3, finish_reason="length")
    valid_but_cut = sample(["A"], finish="length")  # complete JSON, but the engine hit max_tokens
    outcome = rank_samples([bad, cut, valid_but_cut, sample(["B"])], parse)
    assert outcome.invalid == 3
    assert [c.result[0]["value"]["choices"] for c in outcome.candidates] == [["B"]]
    assert outcome.candidates[0].score < 0.5 + 0.5  # one vote of four


def test_all_invalid_gives_no_candidates():
    assert rank_samples([Sample("nope", -1.0, 1, "stop")], parse).candidates == []


def test_enumerated_options_are_a_distribution_sorted_best_first():
    results = [[{"v": i}] for i in range(3)]
    ranked = rank_options(results, [-2.0, -0.5, -1.0])
    assert [c.result[0]["v"] for c in ranked] == [1, 2, 0]
    assert math.isclose(sum(c.score for c in ranked), 1.0, rel_tol=1e-9)


def test_enumeration_survives_an_option_the_engine_did_not_score():
    ranked = rank_options([[{"v": 0}], [{"v": 1}]], [-0.1, float("-inf")])
    assert [c.score for c in ranked] == [1.0, 0.0]


def test_canonical_key_ignores_region_ids_and_order():
    a = [{"id": "x", "value": 1}, {"id": "y", "value": 2}]
    b = [{"value": 2}, {"id": "z", "value": 1}]
    assert canonical_key(a) == canonical_key(b)
