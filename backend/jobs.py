"""Moved to backend/queue.py (the queue contract). Kept only until `training/cli.py` (being moved to the
console-script module) imports `FeedbackQueue` and `parse_queue_kinds` from there."""
from .queue import FeedbackQueue, parse_queue_kinds  # noqa: F401
