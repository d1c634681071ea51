"""Which zstd module this mitmproxy brings: `zstandard` (11.x) or `compression.zstd`
(Python 3.14, or its `backports.zstd`, which mitmproxy 12.3 depends on)."""

from __future__ import annotations

from types import ModuleType


def stdlib_zstd() -> ModuleType | None:
    """`compression.zstd` or its backport, when present."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return None
    return zstd


def zstandard() -> ModuleType | None:
    try:
        import zstandard as module
    except ImportError:
        return None
    return module
