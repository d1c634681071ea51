"""A bounded memo for per-request lookups whose answers repeat (routes, key fingerprints,
prices): a dict hit instead of regexes and hashing on every call."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """`memo(arg)` is `compute(arg)`, remembered (by `key(arg)` when given: a digest of a
    long text, say, rather than the text). Forgets everything when full, so a stream of
    distinct keys (a scan, a key per request) cannot grow it without bound."""

    def __init__(self, compute: Callable[[K], V], size: int = 4096, key: Callable[[K], Hashable] | None = None) -> None:
        self._compute = compute
        self._size = size
        self._key = key
        self._known: dict[Hashable, V] = {}

    def __call__(self, arg: K) -> V:
        key = arg if self._key is None else self._key(arg)
        try:
            return self._known[key]
        except KeyError:
            pass
        if len(self._known) >= self._size:
            self._known.clear()
        value = self._known[key] = self._compute(arg)
        return value
