"""A bounded memo for per-request lookups whose answers repeat (routes, key fingerprints,
prices): a dict hit instead of regexes and hashing on every call."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """`memo(key)` is `compute(key)`, remembered. Forgets everything when full, so a
    stream of distinct keys (a scan, a key per request) cannot grow it without bound."""

    def __init__(self, compute: Callable[[K], V], size: int = 4096) -> None:
        self._compute = compute
        self._size = size
        self._known: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        try:
            return self._known[key]
        except KeyError:
            pass
        if len(self._known) >= self._size:
            self._known.clear()
        value = self._known[key] = self._compute(key)
        return value
