"""One learning step for a project, after its snapshot is written:
reward model -> (optional) policy update -> evaluation gate -> promote or reject -> hot swap.

Ranking projects (<Ranker>/<Pairwise>) train the reward model only: it reorders the candidates the next
fills write (backend.ranking.CandidateFiller), and the gate compares reward models by pair accuracy on
held-out rankings. The policy update needs an answer config's validity reward and held-out answers; for
ranking projects it is skipped with a reason in the version's metrics.

Everything a round produces is staged, then published as one registry version; the served version only
changes through the registry's atomic promotion.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from backend.engine_client import EngineClient
from backend.label_config import CompiledConfig, compile_label_config
from backend.prompts import reward_text
from backend.ranking import is_comparison_config
from backend.registry import VersionReader
from backend.settings import Settings

from .evaluate import EvalTask, Evaluation, evaluate, evaluate_pairs, is_heldout, should_promote
from .export import ProjectExport
from .preferences import DerivedData
from .registry import Registry, VersionRecord
from .snapshot import SnapshotInfo

log = logging.getLogger(__name__)
Progress = Callable[..., None]


@dataclass(frozen=True)
class RoundInputs:
    project: str
    exported: ProjectExport
    derived: DerivedData
    snapshot: SnapshotInfo


def learn(inputs: RoundInputs, settings: Settings, progress: Progress) -> dict[str, Any]:
    registry = Registry(settings.projects_dir, inputs.project, settings.model_name)
    current = VersionReader(settings.projects_dir, settings.model_name).current(inputs.project)
    skip = _reason_to_skip(inputs, registry, current.name, settings)
    if skip:
        progress("skipped", reason=skip)
        return {"skipped": skip}
    ranking = is_comparison_config(inputs.exported.label_config)
    config = None if ranking else compile_label_config(inputs.exported.label_config, settings=settings)
    record = _train_version(inputs, config, registry, current.name, settings, progress)
    return _gate(inputs, config, registry, record, current, settings, progress)


def _reason_to_skip(inputs: RoundInputs, registry: Registry, current: str, settings: Settings) -> str | None:
    record = registry.get(current)
    if record is not None and record.snapshot_hash == inputs.snapshot.content_hash:
        return f"no new feedback since {current}"
    if len(inputs.derived.pairs) < settings.min_pairs:
        return f"{len(inputs.derived.pairs)} preference pairs < DATAENGINE_MIN_PAIRS={settings.min_pairs}"
    return None


POLICY_SKIPPED_FOR_RANKINGS = "ranking project: the reward model reorders its candidates; no policy update from rankings yet"


def _train_version(inputs, config: CompiledConfig | None, registry: Registry, parent: str, settings: Settings, progress) -> VersionRecord:
    from .reward_model import RewardSettings, train_reward_model

    name = registry.next_version_name()
    staged = registry.staging_dir(name)
    train_pairs = [p for p in inputs.derived.pairs if not is_heldout(p.task_id)]
    progress("reward_model", pairs=len(train_pairs))
    rm = train_reward_model(
        # all pairs: its own split holds out the same tasks as the gate (same task hash) and reports on them
        inputs.derived.pairs,
        staged / "reward_model",
        base=settings.rm_base or None,
        settings=RewardSettings(ensemble=settings.rm_ensemble),
        progress=lambda event: progress("reward_model", **_loggable(event)),
    )
    metrics: dict[str, Any] = {"reward_model": rm.metrics}
    algo = _policy_algo(settings)
    if algo != "none" and config is None:
        metrics["policy"] = {"skipped": POLICY_SKIPPED_FOR_RANKINGS}
    elif algo != "none":
        metrics["policy"] = _train_policy(inputs, config, staged, str(rm.path), algo, train_pairs, settings, progress)
    return registry.create_version(
        name, staged, parent=parent, snapshot_hash=inputs.snapshot.content_hash, metrics=metrics
    )


def _policy_algo(settings: Settings) -> str:
    if settings.policy_algo != "auto":
        return settings.policy_algo
    import torch

    return "grpo" if torch.cuda.is_available() else "none"


def _train_policy(inputs, config, staged, rm_path: str, algo: str, train_pairs, settings: Settings, progress) -> dict:
    from .policy import prompt_text, train_policy, validity_from_config
    from backend.reward_scoring import RewardModel

    progress("policy", algo=algo)
    tasks = {t["id"]: t for t in inputs.exported.tasks}
    train_sft = [s for s in inputs.derived.sft if not is_heldout(s.task_id)]
    messages_by_prompt = {prompt_text(p.prompt): p.prompt for p in train_pairs}
    messages_by_prompt.update({prompt_text(s.prompt): s.prompt for s in train_sft})
    texts_by_prompt = {
        prompt_text(example.prompt): config.read_task(tasks[example.task_id], settings.max_text_chars)
        for example in [*train_pairs, *train_sft]
        if example.task_id in tasks
    }
    scorer = RewardModel.load(rm_path)

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return scorer.score([reward_text(messages_by_prompt.get(p, []), c) for p, c in zip(prompts, completions)])

    result = train_policy(
        settings.model_path,
        staged / "adapter",
        sft=train_sft,
        pairs=train_pairs,
        algo=algo,
        reward_fn=reward,
        validity_fn=validity_from_config(config, texts_by_prompt),
        progress=lambda event: progress("policy", **_loggable(event)),
    )
    return result.metrics


def _gate(inputs, config, registry: Registry, record: VersionRecord, current, settings: Settings, progress) -> dict:
    progress("evaluate", version=record.name)
    candidate_eval, current_eval = (_evaluate(inputs, config, version, settings) for version in (record.serving(), current))
    promote, reason = should_promote(candidate_eval, current_eval, settings.promote_margin, settings.eval_min_tasks)
    evaluation = {"candidate": candidate_eval.as_dict(), "current": current_eval.as_dict()}
    if promote:
        registry.promote(record, reason, evaluation)
        _load_into_engine(record, settings)
    else:
        registry.reject(record, reason, evaluation)
    progress("promoted" if promote else "rejected", version=record.name, reason=reason)
    return {"version": record.name, "promoted": promote, "reason": reason, "evaluation": evaluation}


def _evaluate(inputs: RoundInputs, config: CompiledConfig | None, version, settings: Settings) -> Evaluation:
    """Answer configs: the version's served ranking on held-out human-labelled tasks. Ranking projects
    (config None): its reward model on held-out human pairs."""
    if config is None:
        return evaluate_pairs(version, [p for p in inputs.derived.pairs if is_heldout(p.task_id)])
    tasks = {t["id"]: t for t in inputs.exported.tasks}
    heldout = [EvalTask(tasks[s.task_id], s.result) for s in inputs.derived.sft if is_heldout(s.task_id) and s.task_id in tasks]
    return evaluate(settings, config, version, heldout, inputs.exported.instructions)


def _load_into_engine(record: VersionRecord, settings: Settings) -> None:
    """Hot swap: load the adapter now so the first /predict on the new version pays nothing."""
    serving = record.serving()
    if not (serving.adapter and settings.engine_url):
        return
    engine = EngineClient(settings.engine_url, settings.model_name, settings.engine_request_timeout)
    try:
        engine.load_lora_adapter(serving.adapter, serving.adapter_path)
    finally:
        engine.close()


def _loggable(event: dict) -> dict:
    """A trainer's progress event as job-progress detail: scalars only; its own "stage" becomes "step"."""
    renamed = {("phase" if k == "stage" else k): v for k, v in event.items()}
    return {k: v for k, v in renamed.items() if isinstance(v, (int, float, str, bool)) or v is None}
