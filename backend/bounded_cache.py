"""Memoization bounded by bytes, for caches keyed by what clients send (label configs can be megabytes).

`functools.lru_cache(maxsize=256)` bounds the number of entries, not their size: 256 configs of 32 MB each
are 8 GB. Here the key holds a SHA-256 digest of each long string argument instead of the string, and an
entry weighs its arguments' length (what its value is built from); least recently used entries go first
once the total passes `max_bytes` (cachetools' LRUCache with getsizeof).
"""
from __future__ import annotations

import functools
import hashlib
import threading
from typing import Any, Callable, NamedTuple

from cachetools import LRUCache

DIGEST_ABOVE = 64  # string arguments longer than this are keyed by their digest


class _Entry(NamedTuple):
    value: Any
    weight: int


def _key_part(value: Any) -> Any:
    if isinstance(value, str) and len(value) > DIGEST_ABOVE:
        return ("sha256", hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest())
    return value


def weight_of(args: tuple) -> int:
    """An entry's weight: the text it was built from (values derived from a config grow with it), plus a floor
    for the per-entry overhead."""
    return 1024 + sum(len(a) for a in args if isinstance(a, str))


def bytes_bounded_cache(max_bytes: int, weigh: Callable[[tuple], int] = weight_of) -> Callable:
    """Decorator: like functools.lru_cache, bounded by the weight of the entries; exceptions are not cached."""

    def decorate(func: Callable) -> Callable:
        cache: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda entry: entry.weight)
        lock = threading.Lock()

        @functools.wraps(func)
        def cached(*args):
            key = tuple(_key_part(a) for a in args)
            with lock:
                entry = cache.get(key)
            if entry is not None:
                return entry.value
            value = func(*args)
            weight = weigh(args)
            if weight <= max_bytes:
                with lock:
                    cache[key] = _Entry(value, weight)
            return value

        cached.cache = cache  # for tests and introspection
        cached.cache_clear = lambda: cache.clear()
        return cached

    return decorate
