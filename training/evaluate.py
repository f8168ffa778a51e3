"""Evaluation gate: score the current and the candidate version on held-out human-labelled tasks through
the same Predictor that serves /predict, and promote unless the candidate is worse by more than noise.

Metric: top-1 agreement (the first candidate equals the human result) for every config; span F1 of the
top candidate instead when the config has span labels (NER). Ranking projects (<Ranker>/<Pairwise>), whose
annotators order candidates rather than write an answer, are scored by pair accuracy: the share of held-out
human preference pairs whose preferred candidate the version's reward model scores higher
(`evaluate_pairs`); a version without a reward model keeps the order it generated, which knows nothing of
these pairs: chance, 0.5.

One engine pass per version gives the policy's own ranking and the reward model's scores of the same
candidates (`rank_heldout`), so the policy alone, the reward model alone and any blend of the two are
scored on the same tasks without asking the engine again (`score_ranking`, `choose_rm_weight`). A task
that cannot be predicted (a broken image, a text past the context) is skipped and counted, never fatal.

The comparison is paired (`compare`): both versions on the same tasks, a bootstrap interval of the mean
per-task difference, and for top-1 McNemar's exact test on the tasks where exactly one version is right.
A candidate is rejected only when it is worse beyond noise (McNemar for top-1, the interval otherwise) and
by more than DATAENGINE_PROMOTE_MARGIN: a version trained on more feedback is not thrown away because it
lost a point to noise.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

from backend.candidates import Candidate, canonical_key, rank_options
from backend.engine_client import EngineClient
from backend.label_config import CompiledConfig
from backend.predictor import PredictRequest, Predictor, RankedTask, TaskFailure
from backend.registry import ServingVersion
from backend.settings import Settings

from .preferences import PreferencePair
from .reward_model import default_render, heldout_unit, pairwise_accuracy

HELDOUT_FRACTION = 0.2
RM_WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # 0: the policy alone, 1: the reward model alone
TEMPERATURE_GRID = tuple(round(math.exp(math.log(0.5) + i * math.log(100) / 59), 4) for i in range(60))  # 0.5 .. 50
TEMPERATURE_MIN_TASKS = 20
BLEND_MIN_GAIN_TASKS = 2.0
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def is_heldout(task_id: Any, fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable split by task (never by pair): the same hash the reward model's own held-out split uses."""
    return heldout_unit(task_id) < fraction


@dataclass(frozen=True)
class EvalTask:
    task: dict[str, Any]
    human_result: list[dict[str, Any]]


def gate_sample(tasks: list[EvalTask], max_tasks: int) -> list[EvalTask]:
    """At most `max_tasks` of the held-out tasks (0: all), in their order: those lowest on the task hash. The sample
    is the same from one round to the next except where new tasks enter it, so each gate reads most of the current
    version's ranking back (training/heldout_cache.py), and a task's place in it never depends on its position."""
    if not max_tasks or len(tasks) <= max_tasks:
        return tasks
    kept = set(sorted(range(len(tasks)), key=lambda i: (heldout_unit(tasks[i].task.get("id")), i))[:max_tasks])
    return [task for i, task in enumerate(tasks) if i in kept]


@dataclass(frozen=True)
class Evaluation:
    version: str
    tasks: int
    top1: float | None
    span_f1: float | None
    pair_accuracy: float | None = None  # ranking projects
    failed: int = 0  # held-out tasks the version could not predict (skipped)
    rm_weight: float | None = None  # the blend this was scored at (None: no reward model in play)
    confidence_auroc: float | None = None  # does the top candidate's score tell right from wrong? (top-1 only)
    per_task: dict[str, float] = field(default_factory=dict, repr=False)  # task -> its metric, for pairing

    @property
    def metric(self) -> str:
        return next(name for name in ("pair_accuracy", "span_f1", "top1") if getattr(self, name) is not None)

    @property
    def score(self) -> float:
        return getattr(self, self.metric)

    def as_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if k != "per_task"}
        return {**fields, "metric": self.metric, "score": self.score}


@dataclass(frozen=True)
class HeldoutRanking:
    """One version's ranked candidates for the held-out tasks (failures left out), in task order."""

    version: str
    tasks: list[EvalTask]
    ranked: list[RankedTask]
    failed: int
    has_spans: bool
    default_weight: float | None = None  # the blend the version serves

    @property
    def has_rewards(self) -> bool:
        return any(r.rewards is not None for r in self.ranked)


def rank_heldout(
    settings: Settings, config: CompiledConfig, version: ServingVersion, tasks: list[EvalTask], instructions: str = "",
    engine: EngineClient | None = None,
) -> HeldoutRanking:
    """The version's candidates (and reward-model scores) for every held-out task the engine can predict."""
    has_spans = any(c.result_type == "labels" for c in config.controls)
    weight = (version.rm_weight if version.rm_weight is not None else settings.rm_weight) if version.reward_model_path else None
    if not tasks:
        return HeldoutRanking(version.name, [], [], 0, has_spans, weight)
    own_engine = engine is None
    engine = engine or EngineClient.from_settings(settings, batch=True)
    predictor = Predictor(settings, engine)
    try:
        request = PredictRequest(
            config=config, tasks=[t.task for t in tasks], version=version, candidates=settings.candidates,
            temperature=settings.temperature, instructions=instructions, project=f"eval:{version.name}",
        )
        outcomes = predictor.rank_each(request)
    finally:
        predictor.close()
        if own_engine:
            engine.close()
    kept = [(t, o) for t, o in zip(tasks, outcomes) if not isinstance(o, TaskFailure)]
    return HeldoutRanking(
        version.name, [t for t, _ in kept], [o for _, o in kept], len(tasks) - len(kept), has_spans, weight
    )


def score_ranking(ranking: HeldoutRanking, weight: float | None = None) -> Evaluation:
    """Top-1 (and span F1) of the ranking served at reward-model share `weight` (default: the version's own)."""
    weight = ranking.default_weight if weight is None else weight
    served = [task.blended(weight or 0.0) for task in ranking.ranked]
    tops = [_top(candidates) for candidates in served]
    hits = {_task_key(t): float(canonical_key(top) == canonical_key(t.human_result)) for top, t in zip(tops, ranking.tasks)}
    confidence = [candidates[0].score if candidates else 0.0 for candidates in served]
    f1 = {_task_key(t): span_f1(top, t.human_result) for top, t in zip(tops, ranking.tasks)} if ranking.has_spans else None
    count = len(ranking.tasks)
    return Evaluation(
        version=ranking.version,
        tasks=count,
        top1=round(_mean(hits.values()), 4) if count else 0.0,
        span_f1=None if f1 is None else round(_mean(f1.values()), 4),
        failed=ranking.failed,
        rm_weight=weight if ranking.has_rewards else None,
        confidence_auroc=None if f1 is not None else auroc(confidence, list(hits.values())),
        per_task=f1 if f1 is not None else hits,
    )


def choose_rm_weight(ranking: HeldoutRanking, grid: tuple[float, ...] = RM_WEIGHT_GRID) -> tuple[float, dict[str, float]]:
    """The reward model's share that serves the held-out tasks best, and the score at every share tried.
    The grid includes 0 (policy alone) and 1 (reward model alone). A share above 0 must beat the policy alone
    by at least `BLEND_MIN_GAIN_TASKS` tasks' worth of the metric: one task is within the engine's own run-to-run
    noise (bf16 batches on CPU flip single tasks), and a blend picked for a one-task win served a task worse
    than the policy alone when the same tasks were ranked again. So the chosen blend is never worse than either
    end on these tasks by more than that. Ties go to the smaller share (less reliance on the reward model)."""
    scores = {weight: score_ranking(ranking, weight).score for weight in grid}
    policy = scores.get(0.0)
    tasks = max(1, len(ranking.tasks))
    eligible = [w for w in grid if policy is None or w == 0.0 or (scores[w] - policy) * tasks >= BLEND_MIN_GAIN_TASKS - 1e-9]
    best = max(eligible, key=lambda w: (scores[w], -w))
    return best, {f"{weight:g}": score for weight, score in scores.items()}


def fit_option_temperature(ranking: HeldoutRanking, min_tasks: int = TEMPERATURE_MIN_TASKS) -> float | None:
    """Temperature scaling (Guo et al., 2017) of a closed label set's option log-probabilities: the temperature on
    `TEMPERATURE_GRID` that minimises the negative log-likelihood of the human's option on the held-out tasks. It
    keeps every task's order (top-1 is unchanged) and makes an overconfident adapter's scores mean what they say
    (the sentiment curve fitted 1.6 after 100 choices, 1.3 after 400). None without enough evidence: fewer
    than `min_tasks` tasks whose human answer is one of the options, or no wrong or no right top-1 among them."""
    rows = []
    for task, ranked in zip(ranking.tasks, ranking.ranked):
        logprobs = [c.mean_logprob for c in ranked.candidates]
        keys = [c.key for c in ranked.candidates]
        human = canonical_key(task.human_result)
        if len(keys) > 1 and human in keys and all(lp is not None for lp in logprobs):
            rows.append((logprobs, keys.index(human)))
    wrong = sum(1 for logprobs, gold in rows if max(logprobs) > logprobs[gold])
    if len(rows) < min_tasks or wrong == 0 or wrong == len(rows):
        return None
    return min(TEMPERATURE_GRID, key=lambda t: (sum(_nll(logprobs, gold, t) for logprobs, gold in rows), abs(math.log(t))))


def _nll(logprobs: list[float], gold: int, temperature: float) -> float:
    scaled = [lp / temperature for lp in logprobs]
    peak = max(scaled)
    return peak + math.log(sum(math.exp(v - peak) for v in scaled)) - scaled[gold]


def with_option_temperature(ranking: HeldoutRanking, temperature: float | None) -> HeldoutRanking:
    """The ranking as served with this option temperature (what the predictor does for such a version)."""
    if not temperature:
        return ranking
    ranked = [replace(r, candidates=_tempered(r.candidates, temperature)) for r in ranking.ranked]
    return replace(ranking, ranked=ranked)


def _tempered(candidates: list[Candidate], temperature: float) -> list[Candidate]:
    if len(candidates) < 2 or any(c.mean_logprob is None for c in candidates):
        return candidates
    return rank_options([c.result for c in candidates], [c.mean_logprob for c in candidates], temperature)


def evaluate(
    settings: Settings, config: CompiledConfig, version: ServingVersion, tasks: list[EvalTask], instructions: str = ""
) -> Evaluation:
    """The version as it is served (its own blend), on the held-out tasks."""
    return score_ranking(rank_heldout(settings, config, version, tasks, instructions))


def evaluate_pairs(version: ServingVersion, pairs: list[PreferencePair]) -> Evaluation:
    """Ranking projects: pair accuracy of the version's reward model on held-out pairs, measured as the
    reward model's own held-out metric is (same texts, same accuracy)."""
    tasks = len({pair.task_id for pair in pairs})
    if not pairs or not version.reward_model_path:
        per_task = {str(pair.task_id): 0.5 for pair in pairs}
        return Evaluation(version=version.name, tasks=tasks, top1=None, span_f1=None, pair_accuracy=0.5, per_task=per_task)
    from backend.reward_scoring import RewardModel

    model = RewardModel.load(version.reward_model_path)
    chosen_texts, rejected_texts = zip(*(default_render(pair) for pair in pairs))
    chosen, rejected = model.score(chosen_texts), model.score(rejected_texts)
    agreed = pairwise_accuracy(chosen, rejected)
    by_task: dict[str, list[float]] = {}
    for pair, good, bad in zip(pairs, chosen, rejected):
        by_task.setdefault(str(pair.task_id), []).append(1.0 if good > bad else 0.5 if good == bad else 0.0)
    per_task = {task: _mean(values) for task, values in by_task.items()}
    return Evaluation(version=version.name, tasks=tasks, top1=None, span_f1=None, pair_accuracy=round(agreed, 4),
                      per_task=per_task)


def span_f1(predicted: list[dict[str, Any]], human: list[dict[str, Any]]) -> float:
    """Exact-match span F1 (start, end, label); two empty sets agree perfectly."""
    def spans(result):
        return {
            (r["value"]["start"], r["value"]["end"], tuple(r["value"].get("labels", [])))
            for r in result
            if r.get("type") == "labels"
        }

    p, h = spans(predicted), spans(human)
    if not p and not h:
        return 1.0
    hits = len(p & h)
    precision = hits / len(p) if p else 0.0
    recall = hits / len(h) if h else 0.0
    return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)


# --- the paired comparison -------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    test: dict[str, Any]


def compare(candidate: Evaluation, current: Evaluation, margin: float, min_tasks: int) -> Decision:
    """Promote unless the candidate is worse than the current version beyond noise (and by more than
    `margin`), on the tasks both could predict. Top-1 (0/1 per task) is judged by McNemar's exact test on the
    tasks where exactly one version is right; other metrics by the bootstrap interval of the mean difference."""
    shared = sorted(set(candidate.per_task) & set(current.per_task))
    if len(shared) < min_tasks:
        return Decision(True, f"promoted unevaluated: {len(shared)} held-out tasks < {min_tasks} (DATAENGINE_EVAL_MIN_TASKS)",
                        {"tasks": len(shared)})
    diffs = [candidate.per_task[t] - current.per_task[t] for t in shared]
    binary = candidate.metric == "top1"
    test = paired_test(diffs, binary=binary)
    test["metric"] = candidate.metric
    low, high = test["interval"]
    if binary:
        significant = test["mcnemar_p"] < 1 - CONFIDENCE
        worse = significant and test["mcnemar_worse"] > test["mcnemar_better"]
        better = significant and test["mcnemar_better"] > test["mcnemar_worse"]
        evidence = f", McNemar p={test['mcnemar_p']:.3g} ({test['mcnemar_better']} better, {test['mcnemar_worse']} worse)"
    else:
        worse, better, evidence = high < 0, low > 0, ""
    summary = (f"{candidate.metric} {_mean([candidate.per_task[t] for t in shared]):.3f} vs "
               f"{_mean([current.per_task[t] for t in shared]):.3f} on {len(shared)} tasks, difference "
               f"{test['mean_difference']:+.3f} (95% interval {low:+.3f}..{high:+.3f}{evidence})")
    if worse and test["mean_difference"] < -margin:
        return Decision(False, f"worse beyond noise: {summary}", test)
    verdict = "better beyond noise" if better else "not worse beyond noise" if not worse else f"worse within the margin {margin}"
    return Decision(True, f"{verdict}: {summary}", test)


def paired_test(diffs: list[float], *, binary: bool) -> dict[str, Any]:
    """Percentile bootstrap interval of the mean per-task difference (fixed seed: the same data always gives
    the same decision); for 0/1 scores also McNemar's exact two-sided p on the discordant tasks."""
    rng = random.Random(0)
    count = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(count)) / count for _ in range(BOOTSTRAP_RESAMPLES))
    tail = (1 - CONFIDENCE) / 2
    low, high = means[int(tail * BOOTSTRAP_RESAMPLES)], means[int((1 - tail) * BOOTSTRAP_RESAMPLES) - 1]
    test: dict[str, Any] = {
        "test": f"paired bootstrap, {BOOTSTRAP_RESAMPLES} resamples",
        "tasks": count,
        "mean_difference": round(_mean(diffs), 4),
        "interval": [round(low, 4), round(high, 4)],
        "confidence": CONFIDENCE,
    }
    if binary:
        better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        test.update(mcnemar_better=better, mcnemar_worse=worse, mcnemar_p=round(mcnemar_exact(better, worse), 4))
    return test


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `better` successes in better + worse at 1/2."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def auroc(scores: list[float], positives: list[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half); None when one
    class is missing."""
    pos = sorted(s for s, y in zip(scores, positives) if y)
    neg = sorted(s for s, y in zip(scores, positives) if not y)
    if not pos or not neg:
        return None
    wins = sum(bisect.bisect_left(neg, s) + 0.5 * (bisect.bisect_right(neg, s) - bisect.bisect_left(neg, s)) for s in pos)
    return round(wins / (len(pos) * len(neg)), 4)


def _top(candidates: list[Candidate]) -> list[dict[str, Any]]:
    return candidates[0].result if candidates else []


def _task_key(task: EvalTask) -> str:
    return str(task.task.get("id"))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
