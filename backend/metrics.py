"""Prometheus metrics for operations.

Two kinds, by where the numbers live:

* Per-process counters and histograms (requests, latency, candidates, webhook events, annotation
  outcomes): prometheus-client objects in the backend. Under the HTTP server's several worker processes set
  PROMETHEUS_MULTIPROC_DIR (`dataengine serve` does) so /metrics aggregates every worker. Several backend
  replicas are several scrape targets: sum them in PromQL.
* Cluster-wide state read from Redis at scrape time (`RedisCollector`): RQ queue depth and training-job
  durations/outcomes. Training runs in the RQ worker, another process and usually another host, and RQ
  forks a work horse per job, so an in-process counter there would die with the horse. The worker adds
  each finished job to a Redis hash (`record_training_job`) and every backend replica reports the same
  totals from it: take `max` across replicas, not `sum`. A scrape never fails because Redis is down:
  `dataengine_redis_up` drops to 0 and the Redis-backed series are left out.
  Engine usage (tokens and engine seconds per project, model version and source) is held the same way, for
  the same reason: prelabel runs in CLI processes and work horses (backend/usage.py).

Production quality signal: `dataengine_annotations_total{project, model_version, outcome}` counts created
annotations by whether they kept the top candidate unchanged (`top`), another candidate unchanged
(`candidate`) or neither (`edited`); see backend/quality.py. Share of top-candidate accepts per version:
  sum by (model_version) (rate(dataengine_annotations_total{outcome="top"}[1h]))
    / sum by (model_version) (rate(dataengine_annotations_total[1h]))
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker

from .queue import training_metrics_key
from .usage import usage_rows

log = logging.getLogger(__name__)

REQUESTS = Counter("dataengine_requests_total", "HTTP requests", ["endpoint", "status"])
LATENCY = Histogram(
    "dataengine_request_latency_seconds",
    "HTTP request latency (endpoint=\"predict\" is the pre-annotation latency Label Studio sees)",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
)
CANDIDATES = Counter("dataengine_candidates_total", "Predictions returned to Label Studio")
INVALID_CANDIDATES = Counter("dataengine_invalid_candidates_total", "Engine samples dropped as invalid")
WEBHOOK_EVENTS = Counter("dataengine_webhook_events_total", "Label Studio webhook events received", ["action"])
TASKS = Counter("dataengine_predicted_tasks_total", "Tasks pre-annotated")
ANNOTATIONS = Counter(
    "dataengine_annotations_total",
    "Created annotations of tasks this backend pre-annotated, by whether they kept a candidate unchanged",
    ["project", "model_version", "outcome"],
)

# Label Studio's webhook actions (1.23); anything else is counted as "other", so that a caller cannot
# create one time series per made-up action name.
WEBHOOK_ACTIONS = frozenset({
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "START_TRAINING",
})

# --- training jobs, recorded by the worker in Redis ---------------------------------------------------
TRAINING_OUTCOMES = ("promoted", "rejected", "skipped", "failed")
TRAINING_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


def count_webhook(action: str) -> None:
    WEBHOOK_EVENTS.labels(action if action in WEBHOOK_ACTIONS else "other").inc()


def record_training_job(redis: Redis, outcome: str, seconds: float) -> None:
    """Add one finished training job to the Redis-held histogram (called by the worker)."""
    if outcome not in TRAINING_OUTCOMES:
        raise ValueError(f"unknown training outcome {outcome!r}; expected one of {TRAINING_OUTCOMES}")
    name = training_metrics_key(outcome)  # hash {count, sum, le:<bound>...}
    with redis.pipeline() as pipe:  # MULTI/EXEC: a scrape never sees half an update
        pipe.hincrby(name, "count", 1)
        pipe.hincrbyfloat(name, "sum", seconds)
        for bound in TRAINING_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(name, f"le:{bound}", 1)
        pipe.execute()


class RedisCollector:
    """Reads queue depth and training-job totals from Redis at scrape time."""

    def __init__(self, redis: Redis, queue_names: Sequence[str]):
        self.redis = redis
        self.queue_names = list(queue_names)

    def describe(self) -> list[Metric]:
        return []  # never touch Redis at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dataengine_redis_up", "1 if Redis answered during this scrape")
        try:
            families = [self._queue_families(), self._training_family(), self._usage_families()]
        except RedisError as exc:
            log.warning("metrics: Redis unreachable, queue and training metrics left out: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for family in families:
            yield from family

    def _queue_families(self) -> list[Metric]:
        jobs = GaugeMetricFamily(
            "dataengine_queue_jobs", "RQ jobs by state (state=\"queued\" is the queue depth)", labels=["queue", "state"]
        )
        workers = GaugeMetricFamily("dataengine_queue_workers", "RQ workers listening on the queue", labels=["queue"])
        for name in self.queue_names:
            queue = Queue(name, connection=self.redis)
            counts = {
                "queued": queue.count,
                # cleanup=False: a scrape only reads; RQ's own maintenance moves abandoned jobs.
                "started": queue.started_job_registry.get_job_count(cleanup=False),
                "scheduled": queue.scheduled_job_registry.get_job_count(cleanup=False),
                "deferred": queue.deferred_job_registry.get_job_count(cleanup=False),
                "failed": queue.failed_job_registry.get_job_count(cleanup=False),
            }
            for state, value in counts.items():
                jobs.add_metric([name, state], value)
            workers.add_metric([name], Worker.count(connection=self.redis, queue=queue))
        return [jobs, workers]

    def _training_family(self) -> list[Metric]:
        family = HistogramMetricFamily(
            "dataengine_training_job_duration_seconds",
            "Training jobs run by the workers, by outcome (promoted, rejected, skipped, failed)",
            labels=["outcome"],
        )
        with self.redis.pipeline(transaction=False) as pipe:
            for outcome in TRAINING_OUTCOMES:
                pipe.hgetall(training_metrics_key(outcome))
            stored = pipe.execute()
        for outcome, raw in zip(TRAINING_OUTCOMES, stored):
            fields = {k.decode(): float(v) for k, v in raw.items()}
            count = fields.get("count", 0.0)
            buckets = [(str(bound), fields.get(f"le:{bound}", 0.0)) for bound in TRAINING_BUCKETS] + [("+Inf", count)]
            family.add_metric([outcome], buckets, fields.get("sum", 0.0))
        return [family]


    def _usage_families(self) -> list[Metric]:
        labels = ["project", "model_version", "source"]
        families = {
            counter: CounterMetricFamily(f"dataengine_engine_{name}", text, labels=labels)
            for counter, name, text in USAGE_SERIES
        }
        for row in usage_rows(self.redis):
            for counter, family in families.items():
                family.add_metric([row.project, row.model_version, row.source], getattr(row, counter))
        return list(families.values())


# (Usage counter, metric name without _total, help): what labelling costs, per project and model version
USAGE_SERIES = (
    ("tasks", "tasks", "Tasks whose engine usage is counted (pre-annotated tasks)"),
    ("requests", "requests", "Engine requests (chat completions) made for those tasks"),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens the engine processed (vLLM usage.prompt_tokens)"),
    ("completion_tokens", "completion_tokens", "Tokens the engine generated (vLLM usage.completion_tokens, all n samples)"),
    ("engine_seconds", "seconds", "Wall time of the engine requests, summed (concurrent requests overlap: latency, not exclusive time)"),
)


def render(redis: Redis | None = None, queue_names: Sequence[str] = ()) -> tuple[bytes, str]:
    """The /metrics payload: this process's (or every HTTP worker process's) metrics plus Redis-held state."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REGISTRY)
    if redis is not None:
        registry.register(RedisCollector(redis, queue_names))
    return generate_latest(registry), CONTENT_TYPE_LATEST
