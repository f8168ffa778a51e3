"""Pre-label a whole Label Studio project through the engine: `dataengine prelabel` and the RQ job behind
`POST /prelabel` and the TASKS_CREATED webhook of ranking projects.

Three stages overlap, so the engine never waits for Label Studio: a reader thread pages through the
tasks (SDK), a pool keeps DATAENGINE_PRELABEL_CONCURRENCY tasks in flight at the engine (which batches
them), and an uploader thread writes the results in bulk every DATAENGINE_PRELABEL_BATCH_SIZE predictions
(`projects.import_predictions`). Two kinds of project:
  * answer configs (what /predict serves): each task gets its N ranked predictions;
  * ranking configs (<Ranker>/<Pairwise>, backend/ranking.py): each task's data gets N candidates
    (`tasks.update`) plus one prediction with the model's order or pick.
Resumable: a task that already holds a prediction of the serving model version (answer configs), or
already holds candidates (ranking configs), is skipped unless `force` (an annotated ranking task is skipped
even then: its annotation ranks those candidates); whatever was uploaded before a
crash stays done. A task written again keeps one current set of our predictions: once its new ones are
stored, the ones they supersede are deleted (see `_Plan.superseded`).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

from redis import Redis

from backend.calibration import SharedBatchCalibration
from backend.candidate_fill import CandidateFiller, FilledTask
from backend.engine_client import EngineClient, EngineNotConfigured
from backend.errors import RequestError
from backend.images import LabelStudioAccess
from backend.label_prior import LabelPriors
from backend.label_config import CompiledConfig
from backend.label_studio import LabelStudioNotConfigured, credentials
from backend.label_studio import client as label_studio_client
from backend.predictor import PredictRequest, Predictor, TaskFailure
from backend.projects import ProjectStore, Sampling
from backend.queue import prelabel_lock_key
from backend.ranking import RankingConfig, compile_any
from backend.registry import ServingVersion, VersionReader
from backend.settings import Settings, get_settings
from backend.usage import Usage, UsageStore

from .export import task_as_dict
from .locks import renewed_lock

log = logging.getLogger(__name__)
PAGE_SIZE = 500  # tasks per SDK page (Label Studio sets no maximum unless TASK_API_PAGE_SIZE_MAX)
IDS_PER_QUERY = 500  # task ids per listing request: they travel in the URL (about 7,000 exceed httpx's limit)
IMPORT_ATTEMPTS = 3  # tries of one import_predictions batch; between them, what Label Studio stored is checked
IMPORT_BACKOFF_S = 2.0
PREFETCH_TASKS = 2 * PAGE_SIZE  # tasks read ahead while the engine works
MAX_REPORTED_ERRORS = 20
PRELABEL_NEEDS = "to pre-label a project"  # completes "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set ..."
WRITE_THREADS = 8  # concurrent one-task calls (`tasks.update`, `predictions.delete`) while a batch is written


class PrelabelError(RuntimeError):
    """The run cannot start (no engine, no Label Studio, unsupported config); the message says what to fix."""


@dataclass(frozen=True)
class PrelabelOptions:
    project: str
    force: bool = False
    limit: int | None = None  # at most this many tasks pre-labelled in this run
    task_ids: tuple[int, ...] = ()  # only these tasks (TASKS_CREATED); empty: the whole project


@dataclass
class PrelabelSummary:
    project: str
    mode: str  # "predictions" (answer configs) or "candidates" (ranking configs)
    model_version: str
    total: int | None = None  # tasks in the project, when Label Studio says
    seen: int = 0
    skipped: int = 0  # already pre-labelled with this version / already holding candidates
    done: int = 0
    failed: int = 0
    predictions: int = 0  # predictions uploaded
    replaced: int = 0  # our older predictions deleted because new ones superseded them
    tasks_updated: int = 0  # ranking configs: tasks whose data got candidates
    seconds: float = 0.0
    upload_seconds: float = 0.0  # time the uploader spent writing to Label Studio (overlaps the engine work)
    errors: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)  # engine tokens and seconds of this run (failed tasks' included)

    def as_dict(self) -> dict[str, Any]:
        summary = asdict(self)
        summary["tasks_per_s"] = round(self.done / self.seconds, 2) if self.seconds else None
        summary["usage"] = self.usage.summary(self.done, self.seconds)  # and what 1,000 tasks cost at this rate
        return summary


@dataclass
class _Result:
    task_id: Any
    predictions: list[dict[str, Any]]
    data: dict[str, Any] | None = None  # ranking configs: the task's new data
    superseded: tuple[int, ...] = ()  # ids of our predictions the new ones replace
    usage: Usage = field(default_factory=Usage)


class Prelabeler:
    """One run over one project. `engine` and `ls` are injectable (bench, tests); by default from settings."""

    def __init__(self, settings: Settings, engine: EngineClient | None = None, ls=None, usage: UsageStore | None = None):
        self.settings = settings
        # where the run's engine usage is counted for /metrics and `dataengine report` (never fails the run)
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self.usage = usage or UsageStore(redis, settings.max_projects)
        self.label_priors = LabelPriors(redis)
        self._own_engine = engine is None
        try:
            self.engine = EngineClient.from_settings(settings, batch=True) if engine is None else engine
            self.ls = ls if ls is not None else label_studio_client(*credentials(settings, PRELABEL_NEEDS), timeout=120.0)
        except (EngineNotConfigured, LabelStudioNotConfigured) as exc:
            raise PrelabelError(str(exc)) from exc
        tuned = settings.model_copy(update={"predict_concurrency": settings.prelabel_concurrency})
        self.predictor = Predictor(tuned, self.engine, SharedBatchCalibration(redis))
        self.filler = CandidateFiller(self.predictor)
        self.access = LabelStudioAccess(url=settings.label_studio_url, token=settings.label_studio_api_key, trusted=True)

    def close(self) -> None:
        self.predictor.close()
        if self._own_engine:
            self.engine.close()

    # --- the run -------------------------------------------------------------------------------------
    def run(self, options: PrelabelOptions, progress: Callable[[PrelabelSummary], None] | None = None, bar: bool = False) -> PrelabelSummary:
        """Raises on an engine/server error; every thread it started has stopped by then, so `close()` never
        closes a client under a request still in flight."""
        plan = self._plan(options)
        summary = plan.summary
        started = time.monotonic()
        tqdm_bar = _progress_bar(summary, options, bar)
        on_upload = (lambda: progress(summary)) if progress else None
        uploader = _Uploader(self.ls, int(options.project), self.settings.prelabel_batch_size, summary, on_upload)
        meter = _UsageMeter(self.usage, options.project, plan.version.name, self.settings.prelabel_batch_size)
        plan.meter = meter
        try:
            # closing(): on an error the pool drains and the task reader stops here, not when garbage collected
            with closing(self._todo(plan, options, tqdm_bar)) as todo, closing(self._results(plan, todo)) as results:
                for result in results:
                    uploader.add(result)
                    summary.seconds = time.monotonic() - started
                    _tick(tqdm_bar, summary)
            uploader.close()
        finally:
            uploader.abandon()
            meter.flush()
            summary.seconds = time.monotonic() - started
            if tqdm_bar is not None:
                tqdm_bar.close()
        if progress:
            progress(summary)
        return summary

    def _plan(self, options: PrelabelOptions) -> "_Plan":
        project = self.ls.projects.get(id=int(options.project))
        xml = project.label_config or ""
        instructions = getattr(project, "expert_instruction", "") or ""
        versions = VersionReader(self.settings.projects_dir, self.settings.model_name)
        version = versions.current(options.project)
        ours = frozenset({versions.base.name, version.name, *(v["name"] for v in versions.versions(options.project))})
        sampling = Sampling.resolve(self.settings, ProjectStore(self.settings.projects_dir).get(options.project))
        compiled = compile_any(xml, settings=self.settings)
        ranking = compiled if isinstance(compiled, RankingConfig) else None
        config = None if ranking else compiled
        total = len(options.task_ids) if options.task_ids else getattr(project, "task_number", None)
        summary = PrelabelSummary(options.project, "candidates" if ranking else "predictions", version.name, total=total)
        return _Plan(
            config=config, ranking=ranking, version=version, our_versions=ours, instructions=instructions, summary=summary,
            candidates=sampling.candidates, temperature=sampling.temperature,
            label_prior=self.label_priors.for_prediction(options.project, config, version, self.settings.enumerate_max),
        )

    def _todo(self, plan: "_Plan", options: PrelabelOptions, tqdm_bar) -> Iterator[dict[str, Any]]:
        summary = plan.summary
        for task in self._tasks(options):
            if options.limit is not None and summary.seen - summary.skipped >= options.limit:
                return
            summary.seen += 1
            if isinstance(task, _MissingTask):
                _record_failure(summary, task.failure(options.project))
                continue
            if plan.annotated_ranking(task) or (not options.force and plan.already_done(task)):
                summary.skipped += 1
                _tick(tqdm_bar, summary)
                continue
            yield task

    def _tasks(self, options: PrelabelOptions) -> Iterator[dict[str, Any]]:
        return _read_ahead(self._read_tasks(options), PREFETCH_TASKS)

    def _read_tasks(self, options: PrelabelOptions) -> Iterator[dict[str, Any] | "_MissingTask"]:
        if not options.task_ids:
            for task in self.ls.tasks.list(project=int(options.project), fields="all", page_size=PAGE_SIZE):
                yield task_as_dict(task)
            return
        # Listed by id, IDS_PER_QUERY ids a request (the ids travel in the URL): a GET per task would also make
        # Label Studio ask this backend's /predict for that task, a second engine call per task
        wanted = list(dict.fromkeys(options.task_ids))
        for start in range(0, len(wanted), IDS_PER_QUERY):
            missing = dict.fromkeys(wanted[start:start + IDS_PER_QUERY])
            selected = json.dumps({"selectedItems": {"all": False, "included": list(missing)}})
            for task in self.ls.tasks.list(project=int(options.project), fields="all", page_size=PAGE_SIZE, query=selected):
                task = task_as_dict(task)
                missing.pop(task.get("id"), None)
                yield task
            for task_id in missing:
                yield _MissingTask(task_id)

    def _results(self, plan: "_Plan", tasks: Iterable[dict[str, Any]]) -> Iterator[_Result]:
        """Keep `prelabel_concurrency` tasks in flight; yield results as they complete (any order)."""
        limit = self.settings.prelabel_concurrency
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="prelabel") as pool:
            pending: set[Future] = set()
            for task in tasks:
                pending.add(pool.submit(self._one, plan, task))
                if len(pending) >= limit:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from self._collect(plan, finished)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from self._collect(plan, finished)

    def _collect(self, plan: "_Plan", finished: Iterable[Future]) -> Iterator[_Result]:
        summary = plan.summary
        for future in finished:
            outcome = future.result()  # engine/server errors (5xx) end the run: resumable, nothing half-written
            done = not isinstance(outcome, TaskFailure)
            summary.usage.add(outcome.usage)
            plan.meter.add(outcome.usage, tasks=int(done))
            if not done:
                _record_failure(summary, outcome)
                continue
            summary.done += 1
            yield outcome

    def _one(self, plan: "_Plan", task: dict[str, Any]) -> _Result | TaskFailure:
        if plan.ranking is not None:
            filled = self.filler.fill(
                plan.ranking, task, version=plan.version, candidates=plan.candidates,
                temperature=plan.temperature, instructions=plan.instructions,
            )
            if isinstance(filled, FilledTask):
                return _Result(filled.task_id, [filled.prediction], filled.data, plan.superseded(task), filled.usage)
            return filled
        request = PredictRequest(
            config=plan.config, tasks=[task], version=plan.version, candidates=plan.candidates,
            temperature=plan.temperature, instructions=plan.instructions, label_studio=self.access,
            project=plan.summary.project, label_prior=plan.label_prior,
        )
        outcome = self.predictor.predict_each(request)
        if outcome.failures:
            return outcome.failures[0]
        return _Result(task.get("id"), outcome.predictions[0], superseded=plan.superseded(task), usage=outcome.usage)


@dataclass
class _Plan:
    config: CompiledConfig | None
    ranking: RankingConfig | None
    version: ServingVersion
    our_versions: frozenset[str]  # every model_version this backend has served the project with
    instructions: str
    summary: PrelabelSummary
    candidates: int
    temperature: float
    meter: "_UsageMeter | None" = None  # set by `run`
    label_prior: dict = field(default_factory=dict)  # closed sets on the untrained model: the project's label counts

    def already_done(self, task: dict[str, Any]) -> bool:
        if self.ranking is not None:
            return self.ranking.has_candidates(task)
        return any(p.get("model_version") == self.version.name for p in task.get("predictions") or [] if isinstance(p, dict))

    def annotated_ranking(self, task: dict[str, Any]) -> bool:
        """A ranking task someone has annotated keeps its candidates even when forced: the annotation's ranking
        names their ids, and new candidates would leave it pointing at items that are gone."""
        return self.ranking is not None and self.ranking.has_candidates(task) and bool(task.get("annotations"))

    def superseded(self, task: dict[str, Any]) -> tuple[int, ...]:
        """Our predictions that the task's new ones replace. Ranking configs: all of ours (they rank candidates
        that are being replaced). Answer configs: the serving version's (a forced redo; other versions' stay,
        as Label Studio keeps a set per model version). Never one an annotation started from: deleting it
        would unlink the annotation's `parent_prediction`, which training reads."""
        versions = self.our_versions if self.ranking is not None else {self.version.name}
        kept = {None} | {a.get("parent_prediction") for a in task.get("annotations") or [] if isinstance(a, dict)}
        return tuple(
            p["id"]
            for p in task.get("predictions") or []
            if isinstance(p, dict) and p.get("model_version") in versions and p.get("id") not in kept
        )


class _UsageMeter:
    """The run's engine usage, counted in Redis (source "prelabel") every `every` tasks and at the end."""

    def __init__(self, store: UsageStore, project: str, version: str, every: int):
        self.store, self.project, self.version, self.every = store, project, version, every
        self.pending, self.tasks = Usage(), 0

    def add(self, usage: Usage, tasks: int) -> None:
        self.pending.add(usage)
        self.tasks += tasks
        if self.tasks >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending.requests or self.tasks:
            self.store.record(self.project, self.version, "prelabel", self.pending, self.tasks)
        self.pending, self.tasks = Usage(), 0


class _Uploader:
    """Buffers results and writes them in bulk on its own thread: task data first (ranking configs), then one
    `import_predictions` call per batch, so a task never holds a prediction for candidates it lacks, then
    the deletion of the predictions they supersede, so a task is never left without one.
    An upload error is raised on the next `add` or at `close`."""

    def __init__(self, ls, project: int, batch_size: int, summary: PrelabelSummary, on_upload: Callable[[], None] | None):
        self.ls, self.project, self.batch_size, self.summary, self.on_upload = ls, project, batch_size, summary, on_upload
        self.buffer: list[_Result] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self._calls = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="ls-write")
        self._written: list[Future] = []

    def add(self, result: _Result) -> None:
        self.buffer.append(result)
        if sum(len(r.predictions) for r in self.buffer) >= self.batch_size:
            self._submit()

    def close(self) -> None:
        """Write what is left and wait for every batch; raises the first upload error."""
        self._submit()
        for future in self._written:
            future.result()
        self._writer.shutdown(wait=True)
        self._calls.shutdown(wait=True)

    def abandon(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._calls.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        for future in [f for f in self._written if f.done()]:
            future.result()  # an earlier batch failed: stop here (the run is resumable)
        batch, self.buffer = self.buffer, []
        if batch:
            self._written.append(self._writer.submit(self._write, batch))

    def _write(self, batch: list[_Result]) -> None:
        started = time.monotonic()
        updates = [r for r in batch if r.data is not None]
        list(self._calls.map(lambda r: self.ls.tasks.update(id=str(r.task_id), data=r.data), updates))
        self.summary.tasks_updated += len(updates)
        from label_studio_sdk import PredictionRequest

        requests = [
            PredictionRequest(task=int(r.task_id), result=p["result"], score=p.get("score"), model_version=p.get("model_version"))
            for r in batch
            for p in r.predictions
        ]
        if requests:
            self._import(batch, requests)
        self.summary.predictions += len(requests)
        superseded = [pid for r in batch for pid in r.superseded]
        list(self._calls.map(self._delete_prediction, superseded))
        self.summary.replaced += len(superseded)
        self.summary.upload_seconds += time.monotonic() - started
        if self.on_upload:
            self.on_upload()

    def _import(self, batch: list[_Result], requests: list) -> None:
        """import_predictions, idempotent: the SDK's own retries are off (it re-POSTs on a 5xx, and a proxy error
        after Label Studio stored the batch stored it twice); after a failure, the tasks that already hold the
        new predictions are left out of the next try."""
        for attempt in range(1, IMPORT_ATTEMPTS + 1):
            try:
                self.ls.projects.import_predictions(id=self.project, request=requests, request_options={"max_retries": 0})
                return
            except Exception as exc:  # ApiError (any status) or a transport error: the batch may or may not be stored
                if attempt == IMPORT_ATTEMPTS:
                    raise
                log.warning("import of %d predictions failed (%s); checking what Label Studio stored", len(requests), exc)
                time.sleep(IMPORT_BACKOFF_S * attempt)
                stored = self._tasks_holding_new_predictions(batch)
                requests = [r for r in requests if r.task not in stored]
                if not requests:
                    return

    def _tasks_holding_new_predictions(self, batch: list[_Result]) -> set[int]:
        """Tasks of `batch` that hold a prediction of this run's version which it did not hold before (not one
        the run supersedes)."""
        def holds(result: _Result) -> bool:
            version = result.predictions[0].get("model_version") if result.predictions else None
            old = set(result.superseded)
            return any(p.model_version == version and p.id not in old for p in self.ls.predictions.list(task=int(result.task_id)))

        checked = list(self._calls.map(holds, batch))
        return {int(r.task_id) for r, held in zip(batch, checked) if held}

    def _delete_prediction(self, prediction_id: int) -> None:
        from label_studio_sdk.core.api_error import ApiError

        try:
            self.ls.predictions.delete(id=prediction_id)
        except ApiError as exc:
            if exc.status_code != 404:  # already gone (deleted in Label Studio meanwhile) is fine
                raise


_END = object()


@dataclass(frozen=True)
class _MissingTask:
    """A task id asked for that the project does not hold (deleted, or another project's)."""

    task_id: int

    def failure(self, project: str) -> TaskFailure:
        return TaskFailure(0, self.task_id, RequestError(f"task {self.task_id} is not in project {project}", status=404))


def _record_failure(summary: PrelabelSummary, failure: TaskFailure) -> None:
    summary.failed += 1
    if len(summary.errors) < MAX_REPORTED_ERRORS:
        summary.errors.append({"task": failure.task_id, "status": failure.error.status, "error": failure.error.message})


def _read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Iterate `items` on a reader thread, up to `depth` ahead; its exceptions are raised here."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_END)
        except BaseException as exc:  # handed to the consumer
            buffer.put(exc)

    reader = threading.Thread(target=read, name="task-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _progress_bar(summary: PrelabelSummary, options: PrelabelOptions, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total = summary.total if options.limit is None else min(summary.total or options.limit, options.limit)
    return tqdm(total=total, unit="task", desc=f"prelabel project {options.project}", dynamic_ncols=True)


def _tick(bar, summary: PrelabelSummary) -> None:
    if bar is None:
        return
    bar.n = summary.done + summary.failed + summary.skipped
    bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed, refresh=False)
    bar.refresh()


# --- entry points -----------------------------------------------------------------------------------


def run_prelabel(
    project: str, force: bool = False, limit: int | None = None, task_ids: list[int] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The RQ job (enqueued by name from backend/queue.py); progress in the job's meta."""
    from rq import get_current_job

    settings = settings or get_settings()
    job = get_current_job()

    def report(summary: PrelabelSummary) -> None:
        if job is not None:
            job.meta["progress"] = {"stage": "prelabel", "at": time.time(), **_brief(summary)}
            job.save_meta()

    # One run per project at a time (POST /prelabel, TASKS_CREATED and reconcile may all start one): the next
    # waits, then skips what the first stored
    with renewed_lock(Redis.from_url(settings.redis_url), prelabel_lock_key(str(project)), settings.lock_ttl,
                      wait=settings.job_timeout):
        prelabeler = Prelabeler(settings)
        try:
            options = PrelabelOptions(str(project), bool(force), limit, tuple(task_ids or ()))
            summary = prelabeler.run(options, progress=report)
        finally:
            prelabeler.close()
    log.info("prelabel of project %s: %s", project, _brief(summary))
    return summary.as_dict()


def _brief(summary: PrelabelSummary) -> dict[str, Any]:
    keys = ("total", "seen", "skipped", "done", "failed", "predictions", "replaced", "tasks_updated")
    return {k: getattr(summary, k) for k in keys} | {"seconds": round(summary.seconds, 2)}
