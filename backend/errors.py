"""Errors that become clear 4xx/5xx JSON answers instead of tracebacks."""
from __future__ import annotations


class RequestError(Exception):
    """A problem with what the caller sent (or with a dependency), with the HTTP status to answer."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(RequestError):
    status = 400


class UnsupportedLabelConfig(RequestError):
    """The labeling config uses a tag (or a tag combination) this backend cannot pre-annotate."""

    status = 422


class InvalidTaskData(RequestError):
    status = 422


class PayloadTooLarge(RequestError):
    status = 413


class EngineUnavailable(RequestError):
    status = 503


class EngineRejected(RequestError):
    """The engine refused a request because of its content (e.g. prompt longer than the context)."""

    status = 422
