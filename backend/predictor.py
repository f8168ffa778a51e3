"""Pre-annotation: tasks + labeling config -> up to N ranked, valid predictions per task."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from . import metrics
from .calibration import BatchCalibration, SharedBatchCalibration
from .candidates import Candidate, rank_options, rank_samples, sort_candidates
from .engine_client import EngineClient, UnknownModel
from .errors import RequestError
from .images import ImageFetcher, ImageLimits, LabelStudioAccess
from .label_config import CompiledConfig, Control
from .label_prior import log_prior
from .prompts import answer_text, build_choice_messages, build_messages, option_answer, reward_text
from .registry import ServingVersion
from .reranker import blend_scores, load_scorer
from .settings import Settings
from .usage import Usage

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
    project: str = ""  # keys the closed-set calibration estimate (backend/calibration.py)
    label_prior: dict[str, Counter] = field(default_factory=dict)  # control -> the project's label counts (label_prior.py)


@dataclass(frozen=True)
class TaskInput:
    task: dict[str, Any]
    texts: dict[str, str]  # object name -> text, or the image reference for <Image> objects
    images: dict[str, str] = field(default_factory=dict)  # <Image> name -> validated PNG data URI for the engine
    usage: Usage = field(default_factory=Usage)  # the engine work this task took


@dataclass(frozen=True)
class TaskFailure:
    """A task that cannot be pre-annotated (bad data, bad image): reported for that task alone."""

    index: int
    task_id: Any
    error: RequestError
    usage: Usage = field(default_factory=Usage)  # engine work done before it failed

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "task": self.task_id, "status": self.error.status, "error": self.error.message}


@dataclass(frozen=True)
class PredictOutcome:
    """One (possibly empty) list of predictions per task, in task order, the tasks that failed, and the engine
    work of the whole call (failed tasks' included)."""

    predictions: list[list[dict[str, Any]]]
    failures: list[TaskFailure]
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class RankedTask:
    """One task's candidates as the policy ranks them (best first), and the reward model's score of each when
    the version has one. `blended(weight)` is what a version serves: the two mixed (`reranker.blend_scores`)."""

    candidates: list[Candidate]
    rewards: list[float] | None = None
    usage: Usage = field(default_factory=Usage)  # the engine work for this task

    def blended(self, weight: float) -> list[Candidate]:
        if self.rewards is None or len(self.candidates) < 2 or weight <= 0:
            return self.candidates
        scores = blend_scores([c.score for c in self.candidates], self.rewards, weight)
        return sort_candidates([replace(c, score=score) for c, score in zip(self.candidates, scores)])


@dataclass
class _Scored:
    """A task after the engine: sampled candidates, or a closed set's options with their log-probabilities
    (ranked once the whole batch is in, for calibration)."""

    item: TaskInput
    candidates: list[Candidate] | None = None
    option_results: list[list[dict[str, Any]]] | None = None
    option_logprobs: list[float] | None = None


def _content_key(texts: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(texts, sort_keys=True).encode()).hexdigest()


class Predictor:
    def __init__(self, settings: Settings, engine: EngineClient,
                 calibration: BatchCalibration | SharedBatchCalibration | None = None):
        self.settings = settings
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=settings.predict_concurrency, thread_name_prefix="predict")
        self.images = ImageFetcher(ImageLimits.from_settings(settings))
        self.calibration = calibration or BatchCalibration()  # the process's own estimate unless one is shared

    def predict(self, request: PredictRequest) -> list[list[dict[str, Any]]]:
        """One list of predictions per task, in task order; the first bad task's error is raised."""
        outcome = self.predict_each(request)
        if outcome.failures:
            raise outcome.failures[0].error
        return outcome.predictions

    def predict_each(self, request: PredictRequest) -> PredictOutcome:
        """Every task on its own: a task with bad data or a bad image gets a TaskFailure (its 4xx) and an empty
        prediction list, and the other tasks are still pre-annotated. Engine and server errors (5xx) raise."""
        ranked = self.rank_each(request)
        weight = request.version.rm_weight if request.version.rm_weight is not None else self.settings.rm_weight
        predictions = [
            []
            if isinstance(task, TaskFailure)
            else [
                {"result": c.result, "score": round(c.score, 6), "model_version": request.version.name}
                for c in task.blended(weight)[: request.candidates]
            ]
            for task in ranked
        ]
        usage = Usage.total(task.usage for task in ranked)
        return PredictOutcome(predictions, [task for task in ranked if isinstance(task, TaskFailure)], usage)

    def rank_each(self, request: PredictRequest) -> list[RankedTask | TaskFailure]:
        """Per task, in task order: its ranked candidates and their reward-model scores, or its failure."""
        outcomes = list(self._pool.map(lambda pair: self._task_outcome(request, *pair), enumerate(request.tasks)))
        scored = [s for s in outcomes if isinstance(s, _Scored)]
        self._rank_options(request, [s for s in scored if s.option_results is not None])
        rewards = self._rewards(request, scored) if request.version.reward_model_path else [None] * len(scored)
        by_task = iter(RankedTask(s.candidates or [], r, s.item.usage) for s, r in zip(scored, rewards))
        ranked = [s if isinstance(s, TaskFailure) else next(by_task) for s in outcomes]
        for task in scored:
            metrics.CANDIDATES.inc(min(len(task.candidates or []), request.candidates))
        return ranked

    def _task_outcome(self, request: PredictRequest, index: int, task: Any) -> _Scored | TaskFailure:
        usage = Usage()
        try:
            return self._scored(request, self._read(request, task, usage))
        except RequestError as exc:
            if exc.status >= 500:
                raise
            task_id = task.get("id") if isinstance(task, dict) else None
            log.info("task %s (#%d) not pre-annotated: %d %s", task_id, index, exc.status, exc.message)
            return TaskFailure(index, task_id, exc, usage)

    def _read(self, request: PredictRequest, task: Any, usage: Usage) -> TaskInput:
        """The task's texts and image references, and its images fetched and validated (raises a 4xx)."""
        texts = request.config.read_task(task, self.settings.max_text_chars)
        images = {
            obj.name: self.images.prepare(
                texts[obj.name], request.label_studio, f"task {task.get('id', '?')} image '{obj.name}'"
            ).data_uri()
            for obj in request.config.image_objects
        }
        return TaskInput(task, texts, images, usage)

    def _scored(self, request: PredictRequest, item: TaskInput) -> _Scored:
        try:
            return self._ask_engine(request, item)
        except UnknownModel:
            if not (request.version.adapter and request.version.adapter_path):
                raise
            self._load_adapter(request.version)
            return self._ask_engine(request, item)

    def _ask_engine(self, request: PredictRequest, item: TaskInput) -> _Scored:
        control = request.config.enumerable_control(self.settings.enumerate_max)
        if control is not None:
            return self._score_options(request, control, item)
        return _Scored(item, candidates=self._sample(request, item))

    def _load_adapter(self, version: ServingVersion) -> None:
        """Hot swap. Requests name the serving version's adapter, and every engine replica with the LoRA filesystem
        resolver (`dataengine serve` and compose start them so) loads it from MODEL_DIR/adapters by itself. An
        engine without it answers 404: the adapter is then loaded explicitly (on every replica of
        DATAENGINE_ENGINE_URL, again after an engine restart). Requests that resolved the old version before the
        swap finish on the old one."""
        self.engine.forget_adapter(version.adapter)
        self.engine.ensure_adapter(version.adapter, version.adapter_path)

    def _score_options(self, request: PredictRequest, control: Control, item: TaskInput) -> _Scored:
        """Closed label set: every option scored with the model's log-probabilities (deterministic)."""
        options = control.options() or []
        messages = build_choice_messages(
            request.config, item.texts, control, [control.describe_option(o) for o in options], request.instructions,
            item.images,
        )
        logprobs = self.engine.score_options(
            messages, [option_answer(o) for o in options], model=request.version.adapter, usage=item.usage
        )
        text = item.texts[control.target.name]
        return _Scored(item, option_results=[control.to_results(o, text) for o in options], option_logprobs=logprobs)

    def _rank_options(self, request: PredictRequest, scored: list[_Scored]) -> None:
        """Closed sets, once the whole batch is scored: calibrated (base model; matched to the project's label prior
        once it has annotations), or at the version's option temperature (a trained adapter), and ranked."""
        if not scored:
            return
        logprobs = [s.option_logprobs for s in scored]
        if self.settings.calibration == "batch" and not request.version.adapter:
            control = request.config.enumerable_control(self.settings.enumerate_max)
            options = control.options() or []
            key = (request.project, request.version.name, control.name, tuple(map(str, options)))
            prior = log_prior(request.label_prior.get(control.name), options)
            logprobs = self.calibration.calibrate(key, [(_content_key(s.item.texts), row) for s, row in zip(scored, logprobs)],
                                                  prior=[math.exp(p) for p in prior] if prior else None)
        temperature = request.version.option_temperature or 1.0
        for item, row in zip(scored, logprobs):
            item.candidates = rank_options(item.option_results, row, temperature)

    def _rewards(self, request: PredictRequest, scored: list[_Scored]) -> list[list[float] | None]:
        """The reward model's score of every candidate of every task (one batched pass); None for a task
        with fewer than two candidates (nothing to reorder)."""
        texts: list[str] = []
        for task in scored:
            if len(task.candidates or []) > 1:
                messages = build_messages(request.config, task.item.texts, request.instructions)
                texts += [
                    reward_text(messages, answer_text(request.config.answer_from_results(c.result, task.item.texts)))
                    for c in task.candidates
                ]
        flat = iter(load_scorer(request.version.reward_model_path).score(texts) if texts else [])
        return [[next(flat) for _ in task.candidates] if len(task.candidates or []) > 1 else None for task in scored]

    def _sample(self, request: PredictRequest, item: TaskInput) -> list[Candidate]:
        """The greedy answer (the model's best guess, `greedy_candidate`) and samples for the other candidates."""
        config = request.config
        texts = item.texts
        ask = partial(
            self.engine.sample,
            build_messages(config, texts, request.instructions, item.images),
            config.schema(texts),
            max_tokens=min(self.settings.max_new_tokens, config.max_answer_chars(texts) + 8),
            model=request.version.adapter,
            usage=item.usage,
        )
        greedy = 1 if self.settings.greedy_candidate else 0
        samples = ask(n=1, temperature=0.0) if greedy else []
        if request.candidates > greedy:
            samples += ask(n=request.candidates - greedy, temperature=request.temperature)
        outcome = rank_samples(samples, lambda raw: config.parse(raw, texts))
        if outcome.invalid:
            metrics.INVALID_CANDIDATES.inc(outcome.invalid)
            log.debug("dropped %d invalid candidates of %d", outcome.invalid, len(samples))
        return outcome.candidates

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.images.close()
