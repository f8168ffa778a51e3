"""One learning step for a project, after its snapshot is written:
reward model -> policy update -> evaluation gate -> promote or reject (hot swap: the next request names the adapter).

Answer projects (Choices, Labels, TextArea ...): the reward model learns the annotators' preferences, the
policy (a LoRA adapter on the served model) is fine-tuned on the answers they accepted or wrote, in exactly
the prompt format /predict uses (`backend.prompts.policy_turn`), then optionally a preference stage (DPO on
the pairs, or GRPO/RLOO with the reward model and the config's validity as rewards). The gate scores on the
held-out tasks: the current version as served, the policy after each stage on its own, the reward model
alone, and blends of the two; the version serves the blend that did best (`rm_weight` in its record) and, for a
closed label set, option scores at the temperature that fits the held-out answers (`option_temperature`), and is
promoted unless it is worse than the current version beyond noise (`training.evaluate.compare`).

Ranking projects (<Ranker>/<Pairwise> over generated responses): the reward model learns the rankings and
reorders the candidates the next fills write (backend.candidate_fill.CandidateFiller); the policy is trained with
DPO on the ranked responses (after an SFT warm start on each task's best one), so the responses themselves
improve. The gate compares reward models by pair accuracy on held-out rankings; the policy's own pair
accuracy on them (DPO's implicit reward) is recorded in the version's metrics.

Everything a round produces is staged, then published as one registry version; the served version only
changes through the registry's atomic promotion.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from backend.engine_client import EngineClient
from backend.errors import RequestError
from backend.label_config import CompiledConfig
from backend.prompts import PolicyTurn, answer_text, build_messages, option_answer, policy_turn, reward_text
from backend.ranking import RankingConfig, compile_any
from backend.registry import ServingVersion, VersionReader
from backend.settings import Settings

from .evaluate import (
    EvalTask, HeldoutRanking, choose_rm_weight, compare, evaluate_pairs, fit_option_temperature, gate_sample, is_heldout,
    rank_heldout, score_ranking, with_option_temperature,
)
from .export import ProjectExport
from .heldout_cache import RankingContext, rank_heldout_reusing, save_ranking
from .preferences import DerivedData, PreferencePair, SftExample
from .registry import Registry, VersionRecord, adapter_name_for, publish_adapter, unpublish_adapter
from .snapshot import SnapshotInfo

log = logging.getLogger(__name__)
Progress = Callable[..., None]

# On CPU the policy is fine-tuned by default only for models up to this size: SmolLM2-135M's SFT on 400
# choices takes about 4 minutes on 2 cores (bench/learning_curve.py); a 0.5B model would take about four
# times that, past the 15-minute round budget. Bigger models train on GPU hosts, or with
# DATAENGINE_POLICY_ALGO set explicitly.
CPU_POLICY_MAX_PARAMS = 300_000_000
STAGE_DIR = "stages"
PRECISIONS = {"auto": None, "bf16": True, "fp32": False}  # DATAENGINE_POLICY_PRECISION -> PolicySettings.bf16
# SFT learning rate by what the policy answers. A closed set's answer is one option word: 2e-4 took sentiment to
# 0.94 top-1 after 400 choices. A generated JSON answer (spans, text) is tens of tokens: 60 steps at 2e-4 left
# CoNLL span F1 at 0.26, 5e-4 at 0.40 and 1e-3 at 0.46 (README "Benchmarks").
CLOSED_SET_SFT_LR = 2e-4
GENERATED_SFT_LR = 1e-3
# A closed set's SFT decays its learning rate linearly to 0: the last steps at the full rate left the adapter wherever
# its last batches took it (sentiment top-1 after 400 choices 0.905-0.958 over six runs of one recipe); decayed, the
# same 60 steps gave 0.907-0.953 with a mean 1.7 points higher (README "Benchmarks"). Generated answers keep the
# constant rate their 1e-3 was tuned with.
CLOSED_SET_SFT_SCHEDULE = "linear"
GENERATED_SFT_SCHEDULE = "constant"


@dataclass(frozen=True)
class RoundInputs:
    project: str
    exported: ProjectExport
    derived: DerivedData
    snapshot: SnapshotInfo


@dataclass(frozen=True)
class ProjectKind:
    """What the round learns: an answer config, or a ranking config (generation config inside)."""

    answers: CompiledConfig | None
    ranking: RankingConfig | None

    @property
    def generation(self) -> CompiledConfig:
        """The config the policy generates with."""
        return self.answers if self.answers is not None else self.ranking.answer


def learn(inputs: RoundInputs, settings: Settings, progress: Progress) -> dict[str, Any]:
    registry = Registry(settings.projects_dir, inputs.project, settings.model_name)
    current = VersionReader(settings.projects_dir, settings.model_name).current(inputs.project)
    skip = _reason_to_skip(inputs, registry, current.name, settings)
    if skip:
        progress("skipped", reason=skip)
        return {"skipped": skip}
    kind = project_kind(inputs.exported.label_config, settings)
    record = _train_version(inputs, kind, registry, current.name, settings, progress)
    try:
        return _gate(inputs, kind, registry, record, current, settings, progress)
    except Exception:
        _drop_stage_adapters(record, settings)
        registry.discard(record)  # the retried round starts clean
        raise


def project_kind(xml: str, settings: Settings) -> ProjectKind:
    config = compile_any(xml, settings=settings)
    if isinstance(config, RankingConfig):
        return ProjectKind(None, config)
    return ProjectKind(config, None)


def _reason_to_skip(inputs: RoundInputs, registry: Registry, current: str, settings: Settings) -> str | None:
    record = registry.get(current)
    if record is not None and record.snapshot_hash == inputs.snapshot.content_hash:
        return f"no new feedback since {current}"
    if len(inputs.derived.pairs) < settings.min_pairs:
        return f"{len(inputs.derived.pairs)} preference pairs < DATAENGINE_MIN_PAIRS={settings.min_pairs}"
    return None


# --- which policy update ---------------------------------------------------------------------------


def policy_plan(settings: Settings, kind: ProjectKind) -> tuple[str, str]:
    """(algorithm, why): DATAENGINE_POLICY_ALGO, or for `auto` what this host can finish in a round."""
    import torch

    if kind.generation.image_objects:
        return "none", "image configs: the policy update needs a vision-language trainer (not wired); the reward model reranks"
    if kind.ranking is not None and kind.ranking.label_candidates:
        return "none", "ranking project over label candidates: the reward model reorders them; no policy update"
    if settings.policy_algo != "auto":
        return settings.policy_algo, "DATAENGINE_POLICY_ALGO"
    preference = "dpo" if kind.ranking is not None else "sft"  # rankings exist to be learned from as preferences
    if torch.cuda.is_available():
        return preference, "auto: GPU"
    params = model_parameters(settings.model_path)
    if params is None:
        return "none", f"auto: the size of {settings.model} is unknown on this CPU host (set DATAENGINE_POLICY_ALGO)"
    if params > CPU_POLICY_MAX_PARAMS:
        return "none", f"auto: {params / 1e6:.0f}M parameters is too big to fine-tune in a round on CPU"
    return preference, f"auto: CPU, {params / 1e6:.0f}M parameters"


def rm_ensemble_size(settings: Settings, algo: str) -> int:
    """Reward models to train this round: DATAENGINE_RM_ENSEMBLE, else 3 where the reward model is the only
    learner or a GPU makes the extra runs cheap, and 1 on CPU while the policy trains. There, on the sentiment
    learning curve, the gate served the policy alone (blend weight 0) and two more MiniLM runs cost more of the
    round than the policy's SFT."""
    import torch

    if settings.rm_ensemble is not None:
        return settings.rm_ensemble
    return 1 if algo != "none" and not torch.cuda.is_available() else 3


def model_parameters(model_path: str) -> int | None:
    """Parameter count of a local checkpoint, read off its safetensors headers (no weights loaded)."""
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


# --- training ----------------------------------------------------------------------------------------


def _train_version(inputs: RoundInputs, kind: ProjectKind, registry: Registry, parent: str, settings: Settings,
                   progress: Progress) -> VersionRecord:
    name = registry.next_version_name()
    staged = registry.staging_dir(name)
    if settings.train_processes > 1 or settings.accelerate_config:
        from .launch import train_launched

        metrics = train_launched(inputs, staged, settings, progress)  # `accelerate launch`, a child process
    else:
        metrics = train_models(inputs, kind, staged, settings, progress)
    return registry.create_version(name, staged, parent=parent, snapshot_hash=inputs.snapshot.content_hash, metrics=metrics,
                                   engine_model=_engine_model(settings))


def train_models(inputs: RoundInputs, kind: ProjectKind, staged: Path, settings: Settings, progress: Progress
                 ) -> dict[str, Any]:
    """The reward model, then the policy, written into `staged`; their metrics. In this process, or in each process
    of a launched round (training/launch.py), where the main one writes the files."""
    from .distributed import wait_for_everyone
    from .reward_model import RewardSettings, train_reward_model

    algo, why = policy_plan(settings, kind)
    ensemble = rm_ensemble_size(settings, algo)
    train_pairs = [p for p in inputs.derived.pairs if not is_heldout(p.task_id)]
    progress("reward_model", pairs=len(train_pairs), ensemble=ensemble)
    rm = train_reward_model(
        # all pairs: its own split holds out the same tasks as the gate (same task hash) and reports on them
        inputs.derived.pairs,
        staged / "reward_model",
        base=settings.rm_base,
        settings=RewardSettings(ensemble=ensemble),
        progress=lambda event: progress("reward_model", **_loggable(event)),
    )
    metrics: dict[str, Any] = {"reward_model": rm.metrics}
    wait_for_everyone()  # the reward model is on disk before any process reads it (GRPO/RLOO rewards)
    if algo == "none":
        metrics["policy"] = {"skipped": why}
    else:
        metrics["policy"] = _train_policy(inputs, kind, staged, str(rm.path), algo, settings, progress)
        metrics["policy"]["why"] = why
    return metrics


def _engine_model(settings: Settings) -> str | None:
    """The engine's base model as its LoRA resolver names it (None without an engine: the trained one stays)."""
    if not settings.engine_url:
        return None
    engine = EngineClient.from_settings(settings)
    try:
        return engine.served_model_path()
    finally:
        engine.close()


def policy_data(inputs: RoundInputs, kind: ProjectKind, settings: Settings, *, heldout: bool = False
                ) -> tuple[list[SftExample], list[PreferencePair]]:
    """The snapshot's SFT examples and pairs (training split, or the held-out one) rewritten into the prompt
    and answer format the policy is served in."""
    tasks = {t["id"]: t for t in inputs.exported.tasks}
    config, instructions = kind.generation, inputs.exported.instructions
    texts_of: dict[Any, dict[str, str]] = {}

    def texts(task_id) -> dict[str, str] | None:
        if task_id not in texts_of and task_id in tasks:
            try:
                texts_of[task_id] = config.read_task(tasks[task_id], settings.max_text_chars)
            except RequestError:
                texts_of[task_id] = None  # e.g. a task whose text outgrew the limit: left out
        return texts_of.get(task_id)

    def turn(task_id, result: list[dict[str, Any]], body: str):
        task_texts = texts(task_id)
        if task_texts is None:
            return None
        if kind.ranking is not None:  # a ranked response, as the filler asked the policy for it
            return PolicyTurn(build_messages(config, task_texts, instructions), answer_text({config.controls[0].name: body}))
        return policy_turn(config, task_texts, result, instructions, enumerate_max=settings.enumerate_max)

    sft, pairs = [], []
    for example in inputs.derived.sft:
        if is_heldout(example.task_id) != heldout:
            continue
        made = turn(example.task_id, example.result, example.completion)
        if made is not None:
            sft.append(replace(example, prompt=made.messages, completion=made.completion))
    for pair in inputs.derived.pairs:
        if is_heldout(pair.task_id) != heldout:
            continue
        chosen = turn(pair.task_id, pair.chosen_result, pair.chosen)
        rejected = turn(pair.task_id, pair.rejected_result, pair.rejected)
        if chosen is not None and rejected is not None and chosen.completion != rejected.completion:
            pairs.append(replace(pair, prompt=chosen.messages, chosen=chosen.completion, rejected=rejected.completion))
    return sft, pairs


def _train_policy(inputs: RoundInputs, kind: ProjectKind, staged: Path, rm_path: str, algo: str, settings: Settings,
                  progress: Progress) -> dict[str, Any]:
    from .policy import train_policy, validity_from_config

    progress("policy", algo=algo)
    sft, pairs = policy_data(inputs, kind, settings)
    heldout_pairs = policy_data(inputs, kind, settings, heldout=True)[1] if kind.ranking is not None else []
    texts_by_prompt = _texts_by_prompt(inputs, kind, settings, [*sft, *pairs])
    reward = _reward_fn(kind, rm_path, texts_by_prompt, settings) if algo in ("grpo", "rloo") else None
    result = train_policy(
        settings.model_path,
        staged / "adapter",
        sft=sft,
        pairs=pairs,
        algo=algo,
        reward_fn=reward,
        validity_fn=validity_from_config(kind.generation, texts_by_prompt, enumerate_max=settings.enumerate_max),
        settings=policy_settings(kind, settings),
        progress=lambda event: progress("policy", **_loggable(event)),
        stage_dir=staged / STAGE_DIR,
        heldout_pairs=heldout_pairs,
    )
    return result.metrics


def policy_settings(kind: ProjectKind, settings: Settings):
    """The round's policy training knobs: the precision setting, and the learning rate and its schedule for what the
    policy answers."""
    from .policy import PolicySettings

    closed = kind.ranking is None and kind.answers.enumerable_control(settings.enumerate_max) is not None
    return PolicySettings(bf16=PRECISIONS[settings.policy_precision],
                          sft_learning_rate=CLOSED_SET_SFT_LR if closed else GENERATED_SFT_LR,
                          sft_lr_scheduler=CLOSED_SET_SFT_SCHEDULE if closed else GENERATED_SFT_SCHEDULE)


def _texts_by_prompt(inputs: RoundInputs, kind: ProjectKind, settings: Settings, examples) -> dict[str, dict[str, str]]:
    from .policy import prompt_text

    tasks = {t["id"]: t for t in inputs.exported.tasks}
    found = {}
    for example in examples:
        if example.task_id in tasks and prompt_text(example.prompt) not in found:
            try:
                found[prompt_text(example.prompt)] = kind.generation.read_task(tasks[example.task_id], settings.max_text_chars)
            except RequestError:
                continue
    return found


def _reward_fn(kind: ProjectKind, rm_path: str, texts_by_prompt: dict[str, dict[str, str]], settings: Settings):
    """GRPO/RLOO's reward: the round's reward model on what it was trained to read (the task data and the
    canonical JSON answer, whatever format the policy answers in)."""
    from backend.reward_scoring import RewardModel

    config = kind.generation
    scorer = RewardModel.load(rm_path)
    control = config.enumerable_control(settings.enumerate_max)
    by_answer = {option_answer(o): o for o in (control.options() or [])} if control is not None else {}

    def as_answer(completion: str) -> str:
        if control is not None and completion.strip() in by_answer:
            return answer_text({control.name: by_answer[completion.strip()]})
        return completion

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        texts = [
            reward_text(build_messages(config, texts_by_prompt[p]) if p in texts_by_prompt else [], as_answer(c))
            for p, c in zip(prompts, completions)
        ]
        return scorer.score(texts)

    return reward


# --- the gate ----------------------------------------------------------------------------------------


def _gate(inputs: RoundInputs, kind: ProjectKind, registry: Registry, record: VersionRecord, current: ServingVersion,
          settings: Settings, progress: Progress) -> dict:
    progress("evaluate", version=record.name)
    if kind.ranking is not None:
        heldout = [p for p in inputs.derived.pairs if is_heldout(p.task_id)]
        candidate_eval, current_eval = evaluate_pairs(record.serving(), heldout), evaluate_pairs(current, heldout)
        heldout_report = {"pair_accuracy": {"candidate": candidate_eval.pair_accuracy, "current": current_eval.pair_accuracy}}
    else:
        candidate_eval, current_eval, heldout_report = _score_versions(inputs, kind.answers, registry, record, current, settings)
    decision = compare(candidate_eval, current_eval, settings.promote_margin, settings.eval_min_tasks)
    evaluation = {"candidate": candidate_eval.as_dict(), "current": current_eval.as_dict(), "test": decision.test}
    record = replace(record, rm_weight=candidate_eval.rm_weight, option_temperature=heldout_report.get("option_temperature"),
                     metrics={**record.metrics, "heldout": heldout_report, "decision_test": decision.test})
    registry.update(record)
    _drop_stage_adapters(record, settings)
    if decision.promote:
        registry.promote(record, decision.reason, evaluation)  # the next request names its adapter: hot swap
    else:
        registry.reject(record, decision.reason, evaluation)
    progress("promoted" if decision.promote else "rejected", version=record.name, reason=decision.reason)
    return {"version": record.name, "promoted": decision.promote, "reason": decision.reason, "evaluation": evaluation,
            "heldout": heldout_report}


def _score_versions(inputs: RoundInputs, config: CompiledConfig, registry: Registry, record: VersionRecord,
                    current: ServingVersion, settings: Settings):
    """The current version as served and the candidate's stages, all on the same held-out tasks. The current
    version's ranking of the tasks its own gate ranked is read back (training/heldout_cache.py)."""
    tasks = {t["id"]: t for t in inputs.exported.tasks}
    heldout = gate_sample([EvalTask(tasks[s.task_id], s.result) for s in inputs.derived.sft
                           if is_heldout(s.task_id) and s.task_id in tasks], settings.eval_max_tasks)
    instructions = inputs.exported.instructions
    engine = EngineClient.from_settings(settings, batch=True)
    try:
        context = RankingContext(settings, config, inputs.exported.label_config, instructions, engine.served_model_path())
        current_ranking, reused = rank_heldout_reusing(context, current, registry.version_dir(current.name), heldout, engine)
        current_eval = score_ranking(current_ranking)
        candidate = rank_heldout(settings, config, record.serving(), heldout, instructions, engine)
        save_ranking(registry.version_dir(record.name), candidate, context, record.serving())
        report: dict[str, Any] = {"tasks": candidate_tasks(candidate), "current": {**_brief(current_eval), "reused_tasks": reused}}
        if record.adapter_path and config.enumerable_control(settings.enumerate_max) is not None:
            report["option_temperature"] = fit_option_temperature(candidate)
            candidate = with_option_temperature(candidate, report["option_temperature"])
        sft_stage = Path(record.adapter_path or "").parent / STAGE_DIR / "sft"
        if record.adapter_path and sft_stage.is_dir():
            stage = ServingVersion(f"{record.name}-sft", adapter_name_for(f"{record.name}-sft", sft_stage), str(sft_stage))
            publish_adapter(settings.adapters_dir, stage.adapter, sft_stage, context.engine_model)
            report["policy_after_sft"] = _brief(score_ranking(rank_heldout(settings, config, stage, heldout, instructions, engine)))
    finally:
        engine.close()
    report["policy"] = _brief(score_ranking(candidate, 0.0))
    if candidate.has_rewards:
        weight, grid = choose_rm_weight(candidate)
        report["reward_model"] = _brief(score_ranking(candidate, 1.0))
        report["blend_by_rm_weight"] = grid
        candidate_eval = score_ranking(candidate, weight)
    else:
        candidate_eval = score_ranking(candidate)
    report["served"] = _brief(candidate_eval)
    return candidate_eval, current_eval, report


def candidate_tasks(ranking: HeldoutRanking) -> dict[str, int]:
    return {"scored": len(ranking.tasks), "failed": ranking.failed}


def _brief(evaluation) -> dict[str, Any]:
    keep = ("top1", "span_f1", "confidence_auroc", "rm_weight")
    return {k: v for k, v in evaluation.as_dict().items() if k in keep and v is not None}


def _drop_stage_adapters(record: VersionRecord, settings: Settings) -> None:
    """The per-stage adapters were kept only for the gate to measure them."""
    if record.adapter_path:
        stages = Path(record.adapter_path).parent / STAGE_DIR
        for stage in (p for p in stages.glob("*") if p.is_dir()):
            unpublish_adapter(settings.adapters_dir, adapter_name_for(f"{record.name}-{stage.name}", stage))
        shutil.rmtree(stages, ignore_errors=True)


def _loggable(event: dict) -> dict:
    """A trainer's progress event as job-progress detail: scalars only; its own "stage" becomes "step"."""
    renamed = {("phase" if k == "stage" else k): v for k, v in event.items()}
    return {k: v for k, v in renamed.items() if isinstance(v, (int, float, str, bool)) or v is None}
