"""DATAENGINE_LOG_FORMAT=json: one JSON object per line from the backend, the HTTP server (granian) and the worker."""
from __future__ import annotations

import json
import logging
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.logs import JsonFormatter, configure_logging, server_logconfig
from tests.conftest import redis_db, run_backend


def test_json_formatter_writes_one_object_per_record():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("backend.app", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "ERROR" and entry["logger"] == "backend.app" and entry["message"] == "failed x"
    assert "ValueError: boom" in entry["exc_info"] and entry["time"].endswith("+00:00")


def test_configure_logging_switches_the_root_handler(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json")
        logging.getLogger("dataengine.test").info("hello %d", 1)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["message"] == "hello 1"
        configure_logging("info", "text")
        logging.getLogger("dataengine.test").info("plain")
        assert capsys.readouterr().err.strip().endswith("INFO dataengine.test: plain")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    for fmt, formatter in (("text", "format"), ("json", "()")):
        config = server_logconfig("WARNING", fmt)
        assert formatter in config["formatters"]["main"]
        assert config["root"]["level"] == "WARNING" and config["loggers"]["granian.access"]["level"] == "INFO"


@pytest.mark.engine
def test_serve_logs_json_and_serves_metrics_under_granian(tmp_path, engine_url):
    """The real `dataengine serve` (granian, 2 workers, multiprocess metrics) with JSON logs."""
    env = {"DATAENGINE_LOG_FORMAT": "json", "REDIS_URL": redis_db(10)}
    log_path = tmp_path / "serve.log"
    with run_backend(engine_url, tmp_path / "model_dir", log_path, env) as (url, _):
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        scraped = httpx.get(url + "/metrics", timeout=10)
        assert scraped.status_code == 200
        names = {f.name for f in text_string_to_metric_families(scraped.text)}
        assert {"dataengine_requests", "dataengine_redis_up", "dataengine_queue_jobs"} <= names
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    loggers = {e["logger"] for e in entries}
    assert {"dataengine", "_granian", "granian.access"} <= loggers, loggers
    assert any("GET /health" in e["message"] for e in entries if e["logger"] == "granian.access")
