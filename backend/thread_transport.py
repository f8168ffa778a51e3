"""An httpx transport that keeps one connection pool per thread.

httpcore 1.0's pool (httpx 0.28) is not safe to share between many threads: one thread's pass over the
pool can close an idle connection (its keep-alive expired, or more connections than
`max_keepalive_connections`) at the moment another thread, which the pool has just handed that
connection, starts its request on it. That request then fails with `[Errno 9] Bad file descriptor`
(or hangs until its read timeout): encode/httpcore#1110, seen here as one failed task among 64
concurrent pre-labelling requests. With a pool per thread no other thread ever touches a thread's
connections; the `httpx.Client` above it stays one object, shared as before.
"""
from __future__ import annotations

import threading

import httpx


class PerThreadTransport(httpx.BaseTransport):
    """`httpx.HTTPTransport(**options)` per calling thread; `close()` closes them all. A dead thread's pool is
    closed when the next thread opens one, so short-lived thread pools do not pile up open sockets."""

    def __init__(self, **options) -> None:
        self._options = options
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pools: list[tuple[threading.Thread, httpx.HTTPTransport]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._pool().handle_request(request)

    def _pool(self) -> httpx.HTTPTransport:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = httpx.HTTPTransport(**self._options)
            with self._lock:
                dead = [p for thread, p in self._pools if not thread.is_alive()]
                self._pools = [(t, p) for t, p in self._pools if t.is_alive()] + [(threading.current_thread(), pool)]
            for stale in dead:
                stale.close()
        return pool

    def close(self) -> None:
        with self._lock:
            pools, self._pools = [p for _, p in self._pools], []
        for pool in pools:
            pool.close()
