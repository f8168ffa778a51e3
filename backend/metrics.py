"""Prometheus metrics. Under gunicorn with several workers set PROMETHEUS_MULTIPROC_DIR (`dataengine
serve` does) so /metrics aggregates every worker."""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess

REQUESTS = Counter("dataengine_requests_total", "HTTP requests", ["endpoint", "status"])
LATENCY = Histogram(
    "dataengine_request_latency_seconds",
    "HTTP request latency",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
)
CANDIDATES = Counter("dataengine_candidates_total", "Predictions returned to Label Studio")
INVALID_CANDIDATES = Counter("dataengine_invalid_candidates_total", "Engine samples dropped as invalid")
WEBHOOK_EVENTS = Counter("dataengine_webhook_events_total", "Label Studio webhook events received", ["action"])
TASKS = Counter("dataengine_predicted_tasks_total", "Tasks pre-annotated")


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
