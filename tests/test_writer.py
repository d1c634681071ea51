"""The trace writer: whole JSON lines, off the caller's thread, failures survived."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

import orjson
import pytest

from llm_mitm.writer import TraceWriter


def row(id: str, text: str = "") -> dict[str, str]:
    """A record as the writer takes it: plain data."""
    return {"id": id, "text": text}


def read_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_concurrent_submits_give_whole_lines(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", None)
    big = "x" * 100_000

    def submit(n: int) -> None:
        for i in range(50):
            writer.submit(lambda i=i: row(id=f"{n}-{i}", text=big if i % 10 == 0 else "small"))

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    rows = read_lines(tmp_path / "t.jsonl")
    assert len(rows) == 400
    assert len({r["id"] for r in rows}) == 400
    assert writer.stats.written == 400


def test_trace_file_is_private(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", tmp_path / "per-exchange")
    writer.submit(lambda: row(id="a"))
    writer.close()
    assert stat.S_IMODE(os.stat(tmp_path / "t.jsonl").st_mode) == 0o600
    files = list((tmp_path / "per-exchange").rglob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("-a.json")
    assert orjson.loads(files[0].read_bytes()) == {"id": "a", "text": ""}
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600


def test_lines_are_visible_before_close(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", None)
    writer.submit(lambda: row(id="early"))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not (tmp_path / "t.jsonl").exists():
        time.sleep(0.01)
    while time.monotonic() < deadline and not (tmp_path / "t.jsonl").read_bytes():
        time.sleep(0.01)
    assert read_lines(tmp_path / "t.jsonl") == [{"id": "early", "text": ""}]
    writer.close()


def test_unwritable_destination_is_logged_once_counted_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    target = blocked / "t.jsonl"
    target.mkdir()  # a directory where the file should be: every open fails
    writer = TraceWriter(target, None)
    with caplog.at_level(logging.INFO, logger="llm_mitm.traces"):
        for i in range(5):
            writer.submit(lambda i=i: row(id=str(i)))
        deadline = time.monotonic() + 5
        while writer.stats.failed < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        target.rmdir()
        writer.submit(lambda: row(id="after"))
        writer.close()
    errors = [r for r in caplog.records if "TRACE LOST" in r.getMessage()]
    assert len(errors) == 1
    assert writer.stats.failed == 5
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert read_lines(target) == [{"id": "after", "text": ""}]


def test_a_failing_record_does_not_stop_the_writer(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", None)

    def broken() -> dict[str, str]:
        raise ValueError("boom")

    writer.submit(broken)
    writer.submit(lambda: row(id="ok"))
    writer.close()
    assert read_lines(tmp_path / "t.jsonl") == [{"id": "ok", "text": ""}]
    assert writer.stats.render_failed == 1
