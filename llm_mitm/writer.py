"""Writes trace records: JSONL appends and one file per exchange.

It runs in the trace writer process (`tracesink`), which has nothing else to do: each
batch the proxy hands over is rendered (serialised with orjson) and written as it
arrives, in one `write` on an O_APPEND descriptor, so lines never interleave. No thread
and no queue: crossing one cost the process a fifth of its time per record. A failed
write is logged, counted and undone (the file is cut back to its last whole line); the
proxy never notices.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from llm_mitm.atomic import write_atomic

logger = logging.getLogger("llm_mitm.traces")

RecordBuilder = Callable[[], dict[str, Any]]
# A record to write: how to build it, and a smaller one for when it cannot be written.
Pending = tuple[RecordBuilder, RecordBuilder | None]

FILE_MODE = 0o600  # traces hold prompts


@dataclass(slots=True)
class WriterStats:
    written: int = 0
    failed: int = 0
    render_failed: int = 0


class TraceWriter:
    """Owns the trace files."""

    def __init__(
        self,
        destination: str | os.PathLike[str] | None,
        directory: str | os.PathLike[str] | None,
        max_bytes: int | None = None,
        keep: int = 5,
    ) -> None:
        self.destination = Path(destination) if destination else None
        self.directory = Path(directory) if directory else None
        self.max_bytes = max_bytes
        self.keep = keep
        self.stats = WriterStats()
        self._fd: int | None = None
        self._failing: set[str] = set()  # reasons logged since writing last worked

    def write(self, batch: Iterable[Pending]) -> None:
        """Build, render and write a batch: one write to the JSONL file for all of it."""
        records = []
        for build, fallback in batch:
            rendered = self._render(build, fallback)
            if rendered is not None:
                records.append(rendered)
        if not records:
            return
        try:
            self._write(records)
        except Exception:  # noqa: BLE001 - the writer must outlive any one batch
            self._fail(len(records), "unexpected error while writing")
            logger.exception("llm-mitm: writing a batch of traces failed")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.stats.failed:  # said once for each reason as it began: the total, at the end (a review: never said)
            logger.error("llm-mitm: %d trace records could not be written in all", self.stats.failed)

    def _render(self, build: RecordBuilder, fallback: RecordBuilder | None) -> tuple[dict[str, object], bytes] | None:
        """The record and its JSONL line; else the fallback's (say a body nested deeper than
        orjson writes); else None, counted and logged."""
        for builder in (build, fallback):
            if builder is None:
                continue
            try:
                record = builder()
                return record, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            except Exception:  # noqa: BLE001 - one bad record must not stop the writer
                logger.exception("llm-mitm: could not build a trace record" + ("; trying without bodies" if builder is build and fallback else ""))
        self.stats.render_failed += 1
        return None

    def _write(self, records: list[tuple[dict[str, object], bytes]]) -> None:
        ok = True
        if self.destination is not None:
            ok = self._append([line for _, line in records])
        if self.directory is not None:
            for record, _ in records:
                ok = self._write_file(record) and ok
        if ok and self._failing:
            logger.warning("llm-mitm: trace writing works again (%s)", "; ".join(sorted(self._failing)))
            self._failing.clear()

    def _append(self, lines: list[bytes]) -> bool:
        """One write per file: the batch whole, or with `max_bytes` cut at the lines where
        the file would grow past it (a line longer than that has a file of its own)."""
        assert self.destination is not None
        start, written, most = None, 0, self.max_bytes
        try:
            self._follow_path()
            fd = self._open()
            start = size = os.lseek(fd, 0, os.SEEK_END)
            piece: list[bytes] = []
            for line in lines if most else ():
                if size and size + len(line) > most:
                    if piece:
                        _write_all(fd, b"".join(piece))
                        written, piece = written + len(piece), []
                    self._rotate()
                    fd, start, size = self._open(), 0, 0
                piece.append(line)
                size += len(line)
            _write_all(fd, b"".join(piece if most else lines))
        except OSError as exc:
            self._undo(start)
            self._fail(len(lines) - written, f"cannot write {self.destination}: {exc.strerror or exc}")
            self.stats.written += written
            return False
        self.stats.written += len(lines)
        return True

    def _follow_path(self) -> None:
        """The open file was deleted or moved (by hand, by logrotate without copytruncate):
        writing on would go where no name reaches, every record lost unsaid. Reopened at
        its path instead, as logging's WatchedFileHandler does: one stat a batch."""
        if self._fd is None:
            return
        opened = os.fstat(self._fd)
        try:
            named = os.stat(self.destination)  # type: ignore[arg-type]
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            os.close(self._fd)
            self._fd = None
            logger.warning("llm-mitm: %s was %s while open; traces go on in a new file of that name",
                           self.destination, "deleted" if named is None else "moved or replaced")

    def _open(self) -> int:
        if self._fd is None:
            self.destination.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            try:
                fd = os.open(self.destination, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
            except PermissionError:  # a file we may write but not read: no torn line to look for
                fd = os.open(self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            else:
                try:
                    self._end_torn_line(fd)
                except OSError:
                    os.close(fd)
                    raise
            self._fd = fd
        return self._fd

    def _end_torn_line(self, fd: int) -> None:
        """An earlier run that died mid-write left a line without its newline: end it, or the
        next record would be glued onto it and lost. The fragment stays, as a line of its own."""
        end = os.lseek(fd, 0, os.SEEK_END)
        if not end:
            return
        os.lseek(fd, end - 1, os.SEEK_SET)
        if os.read(fd, 1) != b"\n":
            _write_all(fd, b"\n")
            logger.warning("llm-mitm: the last line of %s was cut short by an earlier run; it is kept as a line of its own", self.destination)

    def _rotate(self) -> None:
        """traces.jsonl -> .1 -> .2 ... up to `keep`; whole files, so no line is split."""
        assert self.destination is not None and self._fd is not None
        os.close(self._fd)
        self._fd = None
        oldest = self.destination.with_name(f"{self.destination.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for number in range(self.keep - 1, 0, -1):
            older = self.destination.with_name(f"{self.destination.name}.{number}")
            if older.exists():
                older.rename(self.destination.with_name(f"{self.destination.name}.{number + 1}"))
        self.destination.rename(self.destination.with_name(f"{self.destination.name}.1"))

    def _undo(self, start: int | None) -> None:
        """Cut a torn line off after a short write, and reopen next time."""
        if self._fd is None:
            return
        if start is not None:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def _write_file(self, record: dict[str, object]) -> bool:
        assert self.directory is not None
        stamp = datetime.fromtimestamp(time.time(), UTC)
        folder = self.directory / stamp.strftime("%Y-%m-%d")
        final = folder / f"{stamp.strftime('%H%M%S.%f')}-{record['id']}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # no fsync per exchange: one file a call, and the JSONL trace is not synced either
            write_atomic(final, orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE), FILE_MODE, durable=False)
        except OSError as exc:
            self._fail(1, f"cannot write in {folder}: {exc.strerror or exc}")  # one line for all of them
            return False
        return True

    def _fail(self, count: int, reason: str) -> None:
        """Counted; logged once for each reason until writing works again."""
        self.stats.failed += count
        if reason not in self._failing:
            self._failing.add(reason)
            logger.error("llm-mitm: TRACE LOST: %s (proxying goes on; %d records lost so far)", reason, self.stats.failed)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
