"""A version's held-out ranking as its gate saw it, kept in the version's directory.

Each gate ranks the current version and the candidate on the project's held-out tasks. The next round's current
version is this round's candidate, and most of its held-out tasks are the same, so the gate reads back the
candidate's ranking of the tasks it has already seen and asks the engine only for the tasks that are new since.
That halves the gate's engine work: on 2 cores a NER gate ranked about 170 held-out sentences per version with
n=4 constrained samples, about 8 minutes each.

What is stored is the ranking as the engine gave it, before the gate fitted the version's option temperature:
reading it back applies the version's own temperature and blend, exactly as `rank_heldout` would. A ranking
that depends on the batch it came in (a closed set on a version without an adapter is calibrated over the
batch, `backend/calibration.py`) or that reads images (a task holds the image's URL, not its bytes) is never
stored, and a change to anything the ranking depends on (the label config, the instructions, the sampling
settings, the engine's model) makes the stored one unusable.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.candidates import Candidate
from backend.engine_client import EngineClient
from backend.projects import atomic_write_json
from backend.label_config import CompiledConfig
from backend.predictor import RankedTask
from backend.registry import ServingVersion
from backend.settings import Settings

from .evaluate import EvalTask, HeldoutRanking, rank_heldout, with_option_temperature

log = logging.getLogger(__name__)

CACHE_FILE = "heldout_ranking.json"


@dataclass(frozen=True)
class RankingContext:
    """Everything a version's held-out ranking depends on besides the version and the task."""

    settings: Settings
    config: CompiledConfig
    label_config: str
    instructions: str
    engine_model: str | None

    def fingerprint(self) -> str:
        s = self.settings
        compiled = [s.textarea_max_chars, s.max_entities, s.span_enumerate_max]  # what compile_label_config reads
        sampled = [s.candidates, s.temperature, s.greedy_candidate, s.max_new_tokens, s.enumerate_max, s.max_text_chars]
        parts = [self.label_config, self.instructions, self.engine_model, s.engine_dtype, s.calibration, *compiled, *sampled]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def is_per_task(self, version: ServingVersion) -> bool:
        """Whether a task's ranking depends only on the task's data: not when a closed set is calibrated over its
        batch, and not for images (the data holds a URL, whose bytes may change)."""
        closed = self.config.enumerable_control(self.settings.enumerate_max) is not None
        batch_calibrated = closed and not version.adapter and self.settings.calibration == "batch"
        return not (batch_calibrated or self.config.image_objects)


def task_key(task: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(task.get("data"), sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_ranking(version_dir: Path, ranking: HeldoutRanking, context: RankingContext, version: ServingVersion) -> None:
    """Keep the ranking (as the engine gave it, before any option temperature) for the next round's gate."""
    if not context.is_per_task(version):
        return
    tasks = {task_key(t.task): {"candidates": [asdict(c) for c in r.candidates], "rewards": r.rewards}
             for t, r in zip(ranking.tasks, ranking.ranked)}
    atomic_write_json(Path(version_dir) / CACHE_FILE, {"fingerprint": context.fingerprint(), "tasks": tasks})


def load_ranking(version_dir: Path | None, context: RankingContext, version: ServingVersion) -> dict[str, RankedTask]:
    """The stored ranking by task key; empty when there is none or it no longer applies."""
    path = Path(version_dir) / CACHE_FILE if version_dir else None
    if path is None or not path.is_file() or not context.is_per_task(version):
        return {}
    try:
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != context.fingerprint():
            return {}
        return {key: RankedTask([Candidate(**c) for c in entry["candidates"]], entry["rewards"])
                for key, entry in stored["tasks"].items()}
    except (OSError, ValueError, TypeError, KeyError) as exc:  # a damaged file costs a re-ranking, never the round
        log.warning("ignoring the stored held-out ranking %s: %s", path, exc)
        return {}


def rank_heldout_reusing(context: RankingContext, version: ServingVersion, version_dir: Path | None,
                         tasks: list[EvalTask], engine: EngineClient) -> tuple[HeldoutRanking, int]:
    """The version's held-out ranking, read back for the tasks its own gate ranked, from the engine for the rest;
    and how many tasks were read back. Same result as `rank_heldout` on all the tasks."""
    stored = load_ranking(version_dir, context, version)
    keys = [task_key(t.task) for t in tasks]
    fresh = rank_heldout(context.settings, context.config, version, [t for t, k in zip(tasks, keys) if k not in stored],
                         context.instructions, engine)
    kept = [(t, stored[k]) for t, k in zip(tasks, keys) if k in stored]
    read_back = with_option_temperature(
        HeldoutRanking(version.name, [t for t, _ in kept], [r for _, r in kept], 0, fresh.has_spans, fresh.default_weight),
        version.option_temperature,
    )
    by_task = {id(t): r for t, r in zip(read_back.tasks + fresh.tasks, read_back.ranked + fresh.ranked)}
    ordered = [t for t in tasks if id(t) in by_task]  # task order; tasks the engine could not predict are left out
    merged = HeldoutRanking(version.name, ordered, [by_task[id(t)] for t in ordered], fresh.failed, fresh.has_spans,
                            fresh.default_weight)
    return merged, len(kept)
