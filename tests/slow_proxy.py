"""A forwarding HTTP proxy that holds every chat completion for `delay` seconds before passing it on to the real
engine: an engine whose queue is long (many batch requests in flight on 2 CPU cores), made reproducible. Only
the delay is artificial; every answer comes from the real vLLM server behind it. The forwarding is the
benchmark's own pass-through proxy (bench/replay.py)."""
from __future__ import annotations

import time

from bench.replay import RecordingProxy


class SlowProxy(RecordingProxy):
    def __init__(self, upstream: str, delay: float):
        super().__init__(upstream)
        self.delay = delay

    def on_post(self, path: str, body: bytes) -> None:
        super().on_post(path, body)
        if path == "/v1/chat/completions":
            time.sleep(self.delay)
