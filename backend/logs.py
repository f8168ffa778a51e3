"""Logging set-up: plain text (default) or one JSON object per line (DATAENGINE_LOG_FORMAT=json), for the
backend, the HTTP server's (granian's) own and access logs and the RQ worker alike. Stdlib logging only."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact_url(url: str) -> str:
    """`url` with its password (REDIS_URL may hold one) replaced by ***, for logs and messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unparsable URL>"
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "process", "message"[, "exc_info"]}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logger: one stderr handler in the chosen format (replaces any earlier set-up)."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def server_logconfig(level: str, fmt: str) -> dict[str, Any]:
    """granian's `log_dictconfig`: the root logger, granian's own and its access log, all in the chosen format.
    Always a full config: granian applies its own (root without a handler) in the server process."""
    formatter = {"()": "backend.logs.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["console"]},
        "loggers": {
            "_granian": {"level": level.upper(), "handlers": ["console"], "propagate": False},
            "granian.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }
