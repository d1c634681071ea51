"""Spend per scope and period, kept in SQLite so budgets survive a restart."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

PERIODS = ("day", "month")


def period_key(period: str, now: datetime) -> str:
    return f"day:{now:%Y-%m-%d}" if period == "day" else f"month:{now:%Y-%m}"


def seconds_left(period: str, now: datetime) -> int:
    """Until the period (UTC day or month) ends: the Retry-After of a spent budget."""
    if period == "day":
        end = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (first + timedelta(days=32)).replace(day=1)
    return max(1, int((end - now).total_seconds()))


class SpendStore:
    """Totals in memory for the checks, every charge written through to SQLite."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spend (period TEXT NOT NULL, scope TEXT NOT NULL, usd REAL NOT NULL,"
            " PRIMARY KEY (period, scope))"
        )
        self._totals: dict[tuple[str, str], float] = {
            (period, scope): usd for period, scope, usd in self._db.execute("SELECT period, scope, usd FROM spend")
        }

    def add(self, scope: str, usd: float, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        with self._lock:
            for period in PERIODS:
                key = (period_key(period, now), scope)
                self._totals[key] = self._totals.get(key, 0.0) + usd
                self._db.execute(
                    "INSERT INTO spend (period, scope, usd) VALUES (?, ?, ?)"
                    " ON CONFLICT (period, scope) DO UPDATE SET usd = usd + excluded.usd",
                    (key[0], scope, usd),
                )

    def total(self, scope: str, period: str, now: datetime | None = None) -> float:
        return self._totals.get((period_key(period, now or datetime.now(UTC)), scope), 0.0)

    def close(self) -> None:
        with self._lock:
            self._db.close()
