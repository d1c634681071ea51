"""Reading trace files of any size: one record at a time, bounded memory, honest about damage.

A torn last line (the proxy died mid-write) and lines that are not JSON are skipped and
counted, never fatal. On a terminal a progress bar goes to stderr; piped, nothing does.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson


@dataclass
class ReadReport:
    records: int = 0
    invalid_lines: list[int | str] = field(default_factory=list)  # a rotated file's as `traces.jsonl.1:7`
    torn_last_line: bool = False
    invalid_files: list[str] = field(default_factory=list)  # of a traces.directory: not a JSON record

    def problems(self) -> list[str]:
        out = []
        if self.torn_last_line:
            out.append("the last line was cut short (the proxy stopped mid-write): skipped")
        others = [n for n in self.invalid_lines if not (self.torn_last_line and n == self.invalid_lines[-1])]
        if others:
            shown = ", ".join(str(n) for n in others[:5]) + (" ..." if len(others) > 5 else "")
            out.append(f"{len(others)} line(s) that are not JSON records were skipped (line {shown})")
        if self.invalid_files:
            shown = ", ".join(self.invalid_files[:5]) + (" ..." if len(self.invalid_files) > 5 else "")
            out.append(f"{len(self.invalid_files)} file(s) that are not JSON records were skipped ({shown})")
        return out


class Progress:
    """A one-line bar on stderr, redrawn at most five times a second; silent when piped."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label = max(total, 1), label
        self._last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        share = min(done / self.total, 1.0)
        bar = "#" * int(share * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {share:6.1%} of {self.total / 1e6:,.1f} MB")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


def read_records(path: str | os.PathLike[str], report: ReadReport | None = None, progress: bool | None = None) -> Iterator[dict[str, Any]]:
    """Each JSON object of a JSONL trace file, in order."""
    report = report if report is not None else ReadReport()
    path = Path(path)
    bar = Progress(path.stat().st_size, f"reading {path.name}", enabled=progress)
    done = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            done += len(line)
            if number % 512 == 0:
                bar.update(done)
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                report.invalid_lines.append(number)
                report.torn_last_line = not line.endswith(b"\n")
                continue
            if not is_record(record):
                report.invalid_lines.append(number)
                continue
            report.records += 1
            yield record
    bar.close()


# What the trace tools read of a record, and the types it has there (None allowed where
# the field is optional): any other JSON object is not a record, whatever file
# it is in (a probe: a settings file in a traces directory was counted as a call, and a
# string where `policy` is an object crashed `stats`).
_REQUIRED = {"provider": str, "operation": str, "request": dict, "response": dict}
_OPTIONAL = {"id": str, "timestamp": str, "usage": dict, "policy": dict, "status_code": int, "cost_usd": (int, float), "model": str,
             "response_model": str, "api_key": str, "client": str, "error": str, "duration_ms": (int, float), "stream": bool}


def is_record(value: Any) -> bool:
    """A trace record as the tools read it: a JSON object with a record's fields, of their types."""
    if not isinstance(value, dict):
        return False
    for name, kind in _REQUIRED.items():
        if not isinstance(value.get(name), kind):
            return False
    for name, kind in _OPTIONAL.items():
        if not _of_kind(value.get(name), kind):
            return False
    usage = value.get("usage") or {}
    return all(_of_kind(usage.get(name), int) for name in _USAGE_COUNTS)


_USAGE_COUNTS = ("input_tokens", "output_tokens", "total_tokens")


def _of_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    """None, or a value of `kind` (a count is no bool)."""
    return value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))


def read_directory(path: str | os.PathLike[str], report: ReadReport | None = None) -> Iterator[dict[str, Any]]:
    """Each record of a `traces.directory` (one pretty-printed JSON file per exchange, under
    a folder per day), in the order of their names: day, then time."""
    report = report if report is not None else ReadReport()
    root = Path(path)
    for file in _json_files(root):
        try:
            record = orjson.loads(file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            record = None
        if not is_record(record):
            report.invalid_files.append(str(file.relative_to(root)))
            continue
        report.records += 1
        yield record


def _json_files(folder: Path) -> Iterator[Path]:
    """The `*.json` files under `folder`, in the order of their paths, one folder listed at a
    time: a sorted rglob held every path of a traces.directory (~460 bytes a file: 117 MB
    for 200,000 calls, a trace tools probe). Links to folders are not followed, as rglob's."""
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_dir(follow_symlinks=False):
            yield from _json_files(Path(entry.path))
        elif entry.name.endswith(".json"):
            yield Path(entry.path)


def read_traces(path: str | os.PathLike[str], report: ReadReport | None = None, progress: bool | None = None) -> Iterator[dict[str, Any]]:
    """The records of a `traces.directory`, or of a JSONL trace file and the files it was
    rotated into (`traces.max_bytes`), oldest first."""
    if Path(path).is_dir():
        yield from read_directory(path, report)
        return
    report = report if report is not None else ReadReport()
    *rotated, current = with_rotated(Path(path))
    for file in rotated:  # whole files: a bad line in one is named with its file
        own = ReadReport()
        yield from read_records(file, own, progress)
        report.records += own.records
        report.invalid_lines += [f"{file.name}:{number}" for number in own.invalid_lines]
    yield from read_records(current, report, progress)


def printable(text: str) -> str:
    """`text` as a terminal shows it rather than obeys it: a trace holds what clients sent (a
    model's name), whose control characters (an escape sequence, a line break) would drive
    the terminal or forge a line of the output. Each is written as Python escapes it."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def with_rotated(path: Path) -> list[Path]:
    """`path.N` .. `path.1` (those there, numbered without a gap), then `path`."""
    rotated: list[Path] = []
    while (older := path.with_name(f"{path.name}.{len(rotated) + 1}")).is_file():
        rotated.append(older)
    return [*reversed(rotated), path]
