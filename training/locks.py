"""A per-project Redis lock that a dead holder cannot keep: it expires `ttl` seconds after the last renewal,
and a thread renews it every third of that while the holder runs. A SIGKILLed or OOM-killed work horse
stops renewing, so the retried job waits at most `ttl`, not the whole job timeout."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

from redis import Redis
from redis.exceptions import LockError, RedisError

log = logging.getLogger(__name__)


@contextmanager
def renewed_lock(redis: Redis, name: str, ttl: float, wait: float) -> Iterator[None]:
    """Hold lock `name` (waiting up to `wait` s for it; LockError after that) for the body of the with-block."""
    lock = redis.lock(name, timeout=ttl, blocking_timeout=wait, thread_local=False)  # the renewer is another thread
    if not lock.acquire():
        raise LockError(f"{name} is still held after {wait:.0f} s")
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, ttl, stop), name=f"renew {name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except LockError:  # it lapsed (Redis was unreachable longer than ttl): nothing left to release
            log.warning("lock %s had lapsed before its release", name)


def _renew(lock, ttl: float, stop: threading.Event) -> None:
    while not stop.wait(ttl / 3):
        try:
            lock.reacquire()
        except (LockError, RedisError) as exc:  # Redis away for a moment: the next renewal may still make it
            log.warning("could not renew lock %s: %s", lock.name, exc)
