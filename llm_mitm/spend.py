"""Spend per scope and period, kept in SQLite so budgets survive a restart."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

PERIODS = ("day", "month")

logger = logging.getLogger("llm_mitm.spend")


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


_SQLITE_BUSY = 5  # another connection holds the write lock: the file is writable, not now


def check_writable(db: sqlite3.Connection) -> bool:
    """sqlite3.OperationalError where SQLite opened the file to read only (one it may not
    write): a write of what the file already says. False where another process holds it
    locked (a second proxy writing, a shell in a transaction): writable, later."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    try:
        db.execute(f"PRAGMA user_version = {version}")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF != _SQLITE_BUSY:  # its extended codes too (BUSY_RECOVERY, BUSY_SNAPSHOT)
            raise
        return False
    return True


class SpendStore:
    """Totals in memory for the checks; charges written to SQLite by a thread of its own.

    The proxy's loop never waits on the file: another process holding its write lock (a
    second proxy, a shell in a transaction) held every call's answer for SQLite's 5 s
    timeout and then lost the charge. Charges wait in memory until the file takes them, and
    after each write (or every REFRESH_SECONDS) the totals are read back, so proxies that
    share one file see each other's spend. The file is made private (0600): it names keys.
    """

    REFRESH_SECONDS = 1.0
    LOCK_WAIT_SECONDS = 0.5  # one try's wait for another writer, in the thread
    START_WAIT_SECONDS = 5.0  # at start, for a file not yet set up that another process holds locked
    CLOSE_WAIT_SECONDS = 5.0

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db, self._identity = self._open()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._close_by = 0.0
        # USD by (period key, scope) not yet in the file: summed, so a file that cannot be
        # written for a day holds one entry a scope, not two a call (a review: it grew for ever)
        self._pending: dict[tuple[str, str], float] = {}
        self._restore: dict[tuple[str, str], float] = {}  # totals to put back in a file made again
        self._totals: dict[tuple[str, str], float] = {}
        self._stored = self._read()
        self._retotal()
        self._failing = False
        self._writer = threading.Thread(target=self._write_loop, name="llm-mitm-spend", daemon=True)
        self._writer.start()

    def _open(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """The file, made if missing, and its identity (device, inode). One SQLite opens only
        to read (a file it may not write) is refused: every charge would be lost at the next
        restart, and the budgets start again (a review: it was taken, with a warning)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, timeout=self.LOCK_WAIT_SECONDS, check_same_thread=False, isolation_level=None)
        try:
            self._set_up(db)
            if not check_writable(db):  # it stopped mitmdump at start (a review)
                logger.warning("llm-mitm: spend store %s is locked by another process: charges wait in memory until it is free", self.path)
        except sqlite3.Error:
            db.close()
            raise
        found = os.stat(self.path)
        return db, (found.st_dev, found.st_ino)

    def _set_up(self, db: sqlite3.Connection) -> None:
        """WAL mode and the table. A file made elsewhere, not yet set up, needs the write
        lock once: another process holding it is waited for, up to START_WAIT_SECONDS (a
        file of ours needs no lock here)."""
        deadline = time.monotonic() + self.START_WAIT_SECONDS
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS spend (period TEXT NOT NULL, scope TEXT NOT NULL, usd REAL NOT NULL, PRIMARY KEY (period, scope))")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != _SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def add(self, scope: str, usd: float, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        with self._lock:
            for period in PERIODS:
                key = (period_key(period, now), scope)
                self._totals[key] = self._totals.get(key, 0.0) + usd
                self._pending[key] = self._pending.get(key, 0.0) + usd
        self._wake.set()

    def total(self, scope: str, period: str, now: datetime | None = None) -> float:
        return self._totals.get((period_key(period, now or datetime.now(UTC)), scope), 0.0)

    def close(self) -> None:
        """Writes what is pending (waiting up to CLOSE_WAIT_SECONDS for the file)."""
        self._close_by = time.monotonic() + self.CLOSE_WAIT_SECONDS - 2 * self.LOCK_WAIT_SECONDS
        self._closing = True
        self._wake.set()
        self._writer.join(self.CLOSE_WAIT_SECONDS)
        with self._lock:
            lost = sum(self._pending.values()) / len(PERIODS)
        if lost:
            logger.error("llm-mitm: spend store %s stayed locked: %.6f USD of charges not saved", self.path, lost)
        if not self._writer.is_alive():
            self._db.close()

    def _write_loop(self) -> None:
        while not (self._closing and (not self._pending or time.monotonic() > self._close_by)):
            self._wake.wait(self.REFRESH_SECONDS)
            self._wake.clear()
            try:
                if self._replaced():
                    self._reopen()
            except (OSError, sqlite3.Error) as exc:
                self._failed("made again", exc)
                continue
            try:
                if self._restore:  # at most these totals: proxies sharing the file each restore the same ones (a review: added, they doubled)
                    self._write(self._restore, "max(usd, excluded.usd)")
                    self._restore = {}
            except sqlite3.Error as exc:
                self._failed("written", exc)
                continue
            with self._lock:
                batch, self._pending = self._pending, {}
            try:
                if batch:
                    self._write(batch)
            except sqlite3.Error as exc:
                with self._lock:
                    for key, usd in batch.items():  # kept for the next try
                        self._pending[key] = self._pending.get(key, 0.0) + usd
                self._failed("written", exc)
                continue
            if self._failing:
                logger.warning("llm-mitm: spend store %s written again", self.path)
                self._failing = False
            try:
                self._stored = self._read()
            except sqlite3.Error:
                continue  # read again at the next round
            self._retotal()

    def _failed(self, what: str, exc: Exception) -> None:
        """Said once, until the file is written again."""
        if not self._failing:
            logger.warning("llm-mitm: spend store %s cannot be %s (%s): charges are kept and retried", self.path, what, exc)
        self._failing = True

    def _replaced(self) -> bool:
        """The file was deleted or replaced under the store (a cleanup of the trace folder):
        charges went on into a file no one will read, and a restart found the budgets fresh."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (found.st_dev, found.st_ino) != self._identity

    def _reopen(self) -> None:
        """A new file, holding the totals known here (the old file's and those pending)."""
        db, identity = self._open()
        self._db.close()
        self._db, self._identity = db, identity
        with self._lock:
            self._restore, self._pending = dict(self._totals), {}  # the totals include what was pending
        self._stored = {}
        logger.warning("llm-mitm: spend store %s was deleted or replaced: made again with this day's and month's totals", self.path)

    def _write(self, batch: dict[tuple[str, str], float], merged: str = "usd + excluded.usd") -> None:
        """USD by (period key, scope) added to the file's totals (`merged`: how a total and
        the batch's meet)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO spend (period, scope, usd) VALUES (?, ?, ?)"
                f" ON CONFLICT (period, scope) DO UPDATE SET usd = {merged}",
                [(period, scope, usd) for (period, scope), usd in batch.items()],
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _read(self) -> dict[tuple[str, str], float]:
        """This day's and month's totals (older rows stay in the file, for the record)."""
        now = datetime.now(UTC)
        current = [period_key(period, now) for period in PERIODS]
        rows = self._db.execute("SELECT period, scope, usd FROM spend WHERE period IN (?, ?)", current)
        return {(period, scope): usd for period, scope, usd in rows}

    def _retotal(self) -> None:
        """The file's totals (every proxy's) and the charges still pending here."""
        with self._lock:
            totals = dict(self._stored)
            for key, usd in self._restore.items():
                totals[key] = max(totals.get(key, 0.0), usd)
            for key, usd in self._pending.items():
                totals[key] = totals.get(key, 0.0) + usd
            self._totals = totals
