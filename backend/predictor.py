"""Pre-annotation: tasks + labeling config -> up to N ranked, valid predictions per task."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .candidates import Candidate, rank_options, rank_samples
from .engine_client import EngineClient, UnknownModel
from .errors import RequestError
from .images import ImageFetcher, ImageLimits, LabelStudioAccess
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
    label_studio: LabelStudioAccess = LabelStudioAccess()  # where `/data/upload/...` images are read


@dataclass(frozen=True)
class TaskInput:
    task: dict[str, Any]
    texts: dict[str, str]  # object name -> text, or the image reference for <Image> objects
    images: dict[str, str] = field(default_factory=dict)  # <Image> name -> validated PNG data URI for the engine


@dataclass(frozen=True)
class TaskFailure:
    """A task that cannot be pre-annotated (bad data, bad image): reported for that task alone."""

    index: int
    task_id: Any
    error: RequestError

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "task": self.task_id, "status": self.error.status, "error": self.error.message}


@dataclass(frozen=True)
class PredictOutcome:
    """One (possibly empty) list of predictions per task, in task order, and the tasks that failed."""

    predictions: list[list[dict[str, Any]]]
    failures: list[TaskFailure]


class Predictor:
    def __init__(self, settings: Settings, engine: EngineClient):
        self.settings = settings
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=settings.predict_concurrency, thread_name_prefix="predict")
        self.images = ImageFetcher(ImageLimits.from_settings(settings))

    def predict(self, request: PredictRequest) -> list[list[dict[str, Any]]]:
        """One list of predictions per task, in task order; the first bad task's error is raised."""
        outcome = self.predict_each(request)
        if outcome.failures:
            raise outcome.failures[0].error
        return outcome.predictions

    def predict_each(self, request: PredictRequest) -> PredictOutcome:
        """Every task on its own: a task with bad data or a bad image gets a TaskFailure (its 4xx) and an empty
        prediction list, and the other tasks are still pre-annotated. Engine and server errors (5xx) raise."""
        ranked = list(self._pool.map(lambda pair: self._task_outcome(request, *pair), enumerate(request.tasks)))
        failures = [item for item in ranked if isinstance(item, TaskFailure)]
        predictions = [
            []
            if isinstance(candidates, TaskFailure)
            else [
                {"result": c.result, "score": round(c.score, 6), "model_version": request.version.name}
                for c in candidates[: request.candidates]
            ]
            for candidates in ranked
        ]
        return PredictOutcome(predictions, failures)

    def _task_outcome(self, request: PredictRequest, index: int, task: Any) -> list[Candidate] | TaskFailure:
        try:
            return self._candidates_for(request, self._read(request, task))
        except RequestError as exc:
            if exc.status >= 500:
                raise
            task_id = task.get("id") if isinstance(task, dict) else None
            log.info("task %s (#%d) not pre-annotated: %d %s", task_id, index, exc.status, exc.message)
            return TaskFailure(index, task_id, exc)

    def _read(self, request: PredictRequest, task: Any) -> TaskInput:
        """The task's texts and image references, and its images fetched and validated (raises a 4xx)."""
        texts = request.config.read_task(task, self.settings.max_text_chars)
        images = {
            obj.name: self.images.prepare(
                texts[obj.name], request.label_studio, f"task {task.get('id', '?')} image '{obj.name}'"
            ).data_uri()
            for obj in request.config.image_objects
        }
        return TaskInput(task, texts, images)

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
            candidates = self._enumerate(request, control, item)
        else:
            candidates = self._sample(request, item)
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

    def _enumerate(self, request: PredictRequest, control: Control, item: TaskInput) -> list[Candidate]:
        """Closed label set: score every option with the model's log-probabilities (deterministic)."""
        options = control.options() or []
        texts = item.texts
        messages = build_choice_messages(
            request.config, texts, control, [control.describe_option(o) for o in options], request.instructions, item.images
        )
        logprobs = self.engine.score_letters(messages, list(LETTERS[: len(options)]), model=request.version.adapter)
        text = texts[control.target.name]
        results = [control.to_results(option, text) for option in options]
        return rank_options(results, logprobs)

    def _sample(self, request: PredictRequest, item: TaskInput) -> list[Candidate]:
        config = request.config
        texts = item.texts
        samples = self.engine.sample(
            build_messages(config, texts, request.instructions, item.images),
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
        self.images.close()
