"""Moved: the prelabel enqueue side is in backend/queue.py, its request type in backend/protocol.py. Kept only
until `training/cli.py` (being moved to the console-script module) imports them from there."""
from .protocol import PrelabelRequest  # noqa: F401
from .queue import enqueue_prelabel  # noqa: F401
