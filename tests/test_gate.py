"""The evaluation gate's decision: paired on the same held-out tasks, noise-aware, with its test on record.

Seen through Label Studio: a version trained on 400 choices scored 0.878 against the 100-choice version's
0.889 on the same held-out tasks and was rejected. A difference of that size is noise at that many tasks."""
from __future__ import annotations

import random

import pytest

from backend.candidates import Candidate
from backend.predictor import RankedTask
from training.evaluate import (
    EvalTask, Evaluation, HeldoutRanking, choose_rm_weight, compare, fit_option_temperature, gate_sample, mcnemar_exact,
    paired_test, score_ranking, with_option_temperature,
)


def evaluation(name: str, hits: list[int]) -> Evaluation:
    return Evaluation(version=name, tasks=len(hits), top1=sum(hits) / len(hits), span_f1=None,
                      per_task={str(i): float(h) for i, h in enumerate(hits)})


def correlated(base: list[int], flips: int, seed: int, to: int) -> list[int]:
    """`base` with `flips` tasks (where it is not yet `to`) set to `to`."""
    rng = random.Random(seed)
    out = list(base)
    for i in rng.sample([i for i, h in enumerate(base) if h != to], flips):
        out[i] = to
    return out


def test_a_loss_within_noise_is_promoted_and_the_record_shows_the_test():
    rng = random.Random(1)
    current = [int(rng.random() < 0.889) for _ in range(180)]
    candidate = correlated(current, 4, seed=2, to=0)  # two points lower on the same tasks
    decision = compare(evaluation("v2", candidate), evaluation("v1", current), margin=0.0, min_tasks=5)
    assert decision.promote, decision.reason
    low, high = decision.test["interval"]
    assert low <= decision.test["mean_difference"] <= high < 0.01
    assert decision.test["test"].startswith("paired bootstrap") and decision.test["tasks"] == 180
    assert decision.test["mcnemar_worse"] == 4 and decision.test["mcnemar_better"] == 0
    assert "95% interval" in decision.reason and "McNemar p=0.125" in decision.reason
    assert decision.reason.startswith("not worse beyond noise")


def test_better_beyond_noise_is_promoted_as_such():
    current = [1] * 120 + [0] * 80
    candidate = correlated(current, 40, seed=3, to=1)
    decision = compare(evaluation("v2", candidate), evaluation("v1", current), margin=0.0, min_tasks=5)
    assert decision.promote and decision.reason.startswith("better beyond noise")
    assert decision.test["interval"][0] > 0 and decision.test["mcnemar_p"] < 0.001


def test_worse_beyond_noise_is_rejected():
    current = [1] * 160 + [0] * 40
    candidate = correlated(current, 40, seed=4, to=0)
    decision = compare(evaluation("v2", candidate), evaluation("v1", current), margin=0.0, min_tasks=5)
    assert not decision.promote and decision.reason.startswith("worse beyond noise")
    assert decision.test["interval"][1] < 0


def test_margin_tolerates_a_known_loss():
    current = [1] * 160 + [0] * 40
    candidate = correlated(current, 40, seed=4, to=0)  # -0.20
    assert compare(evaluation("v2", candidate), evaluation("v1", current), margin=0.3, min_tasks=5).promote


def test_too_few_shared_tasks_promote_unevaluated():
    decision = compare(evaluation("v2", [1, 0]), evaluation("v1", [1, 1]), margin=0.0, min_tasks=5)
    assert decision.promote and "unevaluated" in decision.reason


def test_only_tasks_both_versions_predicted_are_compared():
    candidate = Evaluation("v2", 3, 1.0, None, per_task={"1": 1.0, "2": 1.0, "3": 1.0})
    current = Evaluation("v1", 3, 0.0, None, per_task={"2": 0.0, "3": 0.0, "4": 0.0})
    assert compare(candidate, current, 0.0, 1).test["tasks"] == 2


def test_mcnemar_exact_matches_the_binomial():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(8, 2) == pytest.approx(2 * sum(__import__("math").comb(10, i) for i in range(3)) / 2**10)


def test_the_bootstrap_is_deterministic():
    diffs = [1.0, 0.0, -1.0, 0.0, 1.0] * 20
    assert paired_test(diffs, binary=True) == paired_test(diffs, binary=True)


def region(label: str) -> list[dict]:
    return [{"from_name": "s", "to_name": "t", "type": "choices", "value": {"choices": [label]}}]


def test_the_chosen_blend_is_never_worse_than_policy_alone_or_reward_model_alone():
    """Half the tasks only the policy gets right, a quarter only the reward model: the chosen share scores at
    least the better of the two ends on these tasks."""
    tasks, ranked = [], []
    for i in range(40):
        gold, other = "A", "B"
        policy_right = i % 4 != 0
        rm_right = i % 2 == 0
        policy = [Candidate(region(gold), 0.6), Candidate(region(other), 0.4)]
        if not policy_right:
            policy = [Candidate(region(other), 0.6), Candidate(region(gold), 0.4)]
        rewards = [1.0, -1.0] if rm_right == (policy[0].result == region(gold)) else [-1.0, 1.0]
        tasks.append(EvalTask({"id": i}, region(gold)))
        ranked.append(RankedTask(policy, rewards))
    ranking = HeldoutRanking("v", tasks, ranked, failed=0, has_spans=False, default_weight=0.8)
    weight, grid = choose_rm_weight(ranking)
    best = score_ranking(ranking, weight).top1
    assert best >= max(score_ranking(ranking, 0.0).top1, score_ranking(ranking, 1.0).top1)
    assert grid["0"] == score_ranking(ranking, 0.0).top1 and grid["1"] == score_ranking(ranking, 1.0).top1


def ranking_where_the_reward_model_fixes(fixed: int, tasks: int = 100) -> HeldoutRanking:
    """The policy is right on every task but the first `fixed`, barely; the reward model agrees with it where
    it is right and reverses it there, so any share of it is right everywhere."""
    rows, ranked = [], []
    for i in range(tasks):
        policy = [Candidate(region("A"), 0.51), Candidate(region("B"), 0.49)]
        rows.append(EvalTask({"id": i}, region("B" if i < fixed else "A")))
        ranked.append(RankedTask(policy, [-1.0, 1.0] if i < fixed else [1.0, -1.0]))
    return HeldoutRanking("v", rows, ranked, failed=0, has_spans=False, default_weight=0.8)


def test_a_blend_must_beat_the_policy_alone_by_more_than_one_task():
    """Seen on the sentiment learning curve: the gate picked a 0.25 share for a one-task win (0.940 vs 0.9375 on
    400 tasks), and ranked again, the same tasks came out one task the other way."""
    weight, grid = choose_rm_weight(ranking_where_the_reward_model_fixes(1))
    assert grid["0.25"] == grid["1"] == grid["0"] + 0.01 and weight == 0.0
    weight, grid = choose_rm_weight(ranking_where_the_reward_model_fixes(2))
    assert grid["0.25"] == grid["0"] + 0.02 and weight == 0.25  # two tasks: the smallest share that gets them


def closed_set_ranking(margins: list[float], right: list[bool]) -> HeldoutRanking:
    """A binary closed set scored like the predictor does (`rank_options`), one task per margin: the top option's
    log-probability lead, and whether that top option is the human's."""
    from backend.candidates import rank_options

    tasks, ranked = [], []
    for i, (margin, hit) in enumerate(zip(margins, right)):
        candidates = rank_options([region("A"), region("B")], [0.0, -margin])
        tasks.append(EvalTask({"id": i}, region("A" if hit else "B")))
        ranked.append(RankedTask(candidates))
    return HeldoutRanking("v", tasks, ranked, failed=0, has_spans=False)


def test_an_overconfident_adapter_gets_a_temperature_that_spreads_its_scores_and_keeps_its_ranking():
    """Synthetic, extreme overconfidence: margins of 38-80 nats on the top option, right or wrong, so every score is
    1.0 and the confidence cannot tell a wrong top-1 from a right one. The fitted temperature keeps every top-1
    and lets the margins (smaller on the wrong ones here) show through."""
    rng = random.Random(0)
    right = [rng.random() < 0.9 for _ in range(200)]
    margins = [rng.uniform(45, 80) if hit else rng.uniform(38, 60) for hit in right]
    raw = closed_set_ranking(margins, right)
    assert {c.candidates[0].score for c in raw.ranked} == {1.0}
    assert score_ranking(raw).confidence_auroc == 0.5

    temperature = fit_option_temperature(raw)
    assert temperature is not None and temperature > 5
    tempered = with_option_temperature(raw, temperature)
    assert score_ranking(tempered).top1 == score_ranking(raw).top1
    assert score_ranking(tempered).confidence_auroc > 0.8
    assert [c.candidates[0].key for c in tempered.ranked] == [c.candidates[0].key for c in raw.ranked]


def test_no_temperature_without_evidence():
    assert fit_option_temperature(closed_set_ranking([50.0] * 30, [True] * 30)) is None  # never wrong
    assert fit_option_temperature(closed_set_ranking([50.0] * 10, [True] * 9 + [False])) is None  # too few tasks
    ranking = closed_set_ranking([2.0] * 30, [True] * 27 + [False] * 3)
    assert with_option_temperature(ranking, None) is ranking


def test_the_gate_sample_is_capped_stable_as_the_project_grows_and_blind_to_task_order():
    """DATAENGINE_EVAL_MAX_TASKS: a big project's gate ranks a fixed-size sample of its held-out tasks, and the next
    round's sample keeps every earlier task it still has room for, so the current version's ranking is read back."""
    tasks = [EvalTask({"id": i, "data": {"text": str(i)}}, []) for i in range(1, 1001)]
    earlier, later = gate_sample(tasks[:600], 50), gate_sample(tasks, 50)
    assert len(earlier) == len(later) == 50
    assert [t.task["id"] for t in earlier] == sorted(t.task["id"] for t in earlier)  # in the tasks' own order
    earlier_ids = {t.task["id"] for t in earlier}
    assert {t.task["id"] for t in later if t.task["id"] <= 600} <= earlier_ids  # no earlier task swapped for another
    assert len(earlier_ids & {t.task["id"] for t in later}) >= 20  # 600 of 1,000 tasks: most of the sample stays
    shuffled = random.Random(0).sample(tasks, len(tasks))
    assert {t.task["id"] for t in gate_sample(shuffled, 50)} == {t.task["id"] for t in later}
    assert gate_sample(tasks[:30], 50) == tasks[:30] and gate_sample(tasks, 0) == tasks


def test_a_cap_below_the_minimum_is_refused_at_start_up():
    from pydantic import ValidationError

    from backend.settings import Settings

    with pytest.raises(ValidationError, match="DATAENGINE_EVAL_MAX_TASKS=3 is below DATAENGINE_EVAL_MIN_TASKS=5"):
        Settings(eval_max_tasks=3, eval_min_tasks=5)
    assert Settings(eval_max_tasks=0, eval_min_tasks=5).eval_max_tasks == 0  # 0: no cap
