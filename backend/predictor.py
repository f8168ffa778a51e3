"""Pre-annotation: tasks + labeling config -> up to N ranked, valid predictions per task."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import metrics
from .candidates import Candidate, rank_options, rank_samples
from .engine_client import EngineClient, UnknownModel
from .label_config import CompiledConfig, Control
from .prompts import LETTERS, answer_text, build_choice_messages, build_messages, reward_text
from .registry import ServingVersion
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictRequest:
    config: CompiledConfig
    tasks: list[dict[str, Any]]
    version: ServingVersion
    candidates: int
    temperature: float
    instructions: str = ""


@dataclass(frozen=True)
class TaskInput:
    task: dict[str, Any]
    texts: dict[str, str]


class Predictor:
    def __init__(self, settings: Settings, engine: EngineClient):
        self.settings = settings
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=settings.predict_concurrency, thread_name_prefix="predict")

    def predict(self, request: PredictRequest) -> list[list[dict[str, Any]]]:
        """One list of predictions per task, in task order. Validates every task before any engine call."""
        inputs = [TaskInput(task, request.config.read_task(task, self.settings.max_text_chars)) for task in request.tasks]
        ranked = list(self._pool.map(lambda item: self._candidates_for(request, item), inputs))
        return [
            [
                {"result": c.result, "score": round(c.score, 6), "model_version": request.version.name}
                for c in candidates[: request.candidates]
            ]
            for candidates in ranked
        ]

    def _candidates_for(self, request: PredictRequest, item: TaskInput) -> list[Candidate]:
        try:
            return self._ranked_candidates(request, item)
        except UnknownModel:
            if not request.version.adapter:
                raise
            self.engine.forget_adapter(request.version.adapter)  # engine restarted: load it again, once
            return self._ranked_candidates(request, item)

    def _ranked_candidates(self, request: PredictRequest, item: TaskInput) -> list[Candidate]:
        self._ensure_adapter(request.version)
        control = request.config.enumerable_control(self.settings.enumerate_max)
        if control is not None:
            candidates = self._enumerate(request, control, item.texts)
        else:
            candidates = self._sample(request, item.texts)
        if request.version.reward_model_path and len(candidates) > 1:
            candidates = self._rerank(request, item.texts, candidates)
        metrics.CANDIDATES.inc(min(len(candidates), request.candidates))
        return candidates

    def _ensure_adapter(self, version: ServingVersion) -> None:
        """Hot swap: a promoted adapter is loaded into the engine on first use (the worker also loads it at
        promotion). Requests that resolved the old version before the swap finish on the old one."""
        if version.adapter and version.adapter_path:
            self.engine.ensure_adapter(version.adapter, version.adapter_path)

    def _rerank(self, request: PredictRequest, texts: dict[str, str], candidates: list[Candidate]) -> list[Candidate]:
        from .reranker import load_scorer, rerank

        messages = build_messages(request.config, texts, request.instructions)
        inputs = [reward_text(messages, answer_text(request.config.answer_from_results(c.result, texts))) for c in candidates]
        return rerank(candidates, inputs, load_scorer(request.version.reward_model_path), self.settings.rm_weight)

    def _enumerate(self, request: PredictRequest, control: Control, texts: dict[str, str]) -> list[Candidate]:
        """Closed label set: score every option with the model's log-probabilities (deterministic)."""
        options = control.options() or []
        messages = build_choice_messages(
            request.config, texts, control, [control.describe_option(o) for o in options], request.instructions
        )
        logprobs = self.engine.score_letters(messages, list(LETTERS[: len(options)]), model=request.version.adapter)
        text = texts[control.target.name]
        results = [control.to_results(option, text) for option in options]
        return rank_options(results, logprobs)

    def _sample(self, request: PredictRequest, texts: dict[str, str]) -> list[Candidate]:
        config = request.config
        samples = self.engine.sample(
            build_messages(config, texts, request.instructions),
            config.schema(texts),
            n=request.candidates,
            temperature=request.temperature,
            max_tokens=min(self.settings.max_new_tokens, config.max_answer_chars(texts) + 8),
            model=request.version.adapter,
        )
        outcome = rank_samples(samples, lambda raw: config.parse(raw, texts))
        if outcome.invalid:
            metrics.INVALID_CANDIDATES.inc(outcome.invalid)
            log.debug("dropped %d invalid candidates of %d", outcome.invalid, len(samples))
        return outcome.candidates

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
