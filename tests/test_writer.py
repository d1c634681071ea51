"""The trace writer: whole JSON lines, private files, failures survived."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import orjson
import pytest

from llm_mitm.writer import Pending, TraceWriter


def row(id: str, text: str = "") -> dict[str, str]:
    """A record as the writer takes it: plain data."""
    return {"id": id, "text": text}


def batch(*records: dict[str, str]) -> list[Pending]:
    return [(lambda record=record: record, None) for record in records]


def read_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_batches_give_whole_lines_in_order(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", None)
    big = "x" * 100_000
    for n in range(8):
        writer.write(batch(*(row(id=f"{n}-{i}", text=big if i % 10 == 0 else "small") for i in range(50))))
    writer.close()
    rows = read_lines(tmp_path / "t.jsonl")
    assert [r["id"] for r in rows] == [f"{n}-{i}" for n in range(8) for i in range(50)]
    assert writer.stats.written == 400


def test_trace_file_is_private(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", tmp_path / "per-exchange")
    writer.write(batch(row(id="a")))
    writer.close()
    assert stat.S_IMODE(os.stat(tmp_path / "t.jsonl").st_mode) == 0o600
    files = list((tmp_path / "per-exchange").rglob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("-a.json")
    assert orjson.loads(files[0].read_bytes()) == {"id": "a", "text": ""}
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600


def test_lines_are_in_the_file_once_written(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", None)
    writer.write(batch(row(id="early")))
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
            writer.write(batch(row(id=str(i))))
        target.rmdir()
        writer.write(batch(row(id="after")))
        writer.close()
    errors = [r for r in caplog.records if "TRACE LOST" in r.getMessage()]
    assert len(errors) == 1
    assert writer.stats.failed == 5
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert read_lines(target) == [{"id": "after", "text": ""}]


def test_each_reason_of_loss_is_logged_once_however_many_files_fail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A trace file and a per-exchange directory both failing, a file name each call: two
    lines, not one per record or per batch."""
    (tmp_path / "t.jsonl").mkdir()
    (tmp_path / "per").write_text("a file where the directory goes")
    writer = TraceWriter(tmp_path / "t.jsonl", tmp_path / "per")
    with caplog.at_level(logging.INFO, logger="llm_mitm.traces"):
        for i in range(5):
            writer.write(batch(row(id=f"{i}a"), row(id=f"{i}b")))
    writer.close()
    errors = [r.getMessage() for r in caplog.records if "TRACE LOST" in r.getMessage()]
    assert len(errors) == 2, errors
    assert any(f"{tmp_path / 't.jsonl'}" in e for e in errors) and any(f"{tmp_path / 'per'}" in e for e in errors)
    assert writer.stats.failed == 20  # each record twice: its line and its file
    assert "20 trace records could not be written in all" in caplog.text  # the total, at the end


def test_a_failing_record_does_not_stop_the_writer(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl", None)

    def broken() -> dict[str, str]:
        raise ValueError("boom")

    writer.write([(broken, None), (lambda: row(id="ok"), None)])
    writer.write([(broken, lambda: row(id="smaller"))])  # the fallback record, when there is one
    writer.close()
    assert read_lines(tmp_path / "t.jsonl") == [{"id": "ok", "text": ""}, {"id": "smaller", "text": ""}]
    assert writer.stats.render_failed == 1


def test_a_torn_last_line_is_ended_before_appending(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crash left half a line: the next run's first record must not be glued onto it."""
    from llm_mitm.tracefile import ReadReport, read_records

    traces = tmp_path / "t.jsonl"
    torn = b'{"id": "torn", "te'
    call = {"provider": "openai", "operation": "chat.completions", "request": {}, "response": {}}  # what the tools read as a record
    traces.write_bytes(orjson.dumps({**row(id="before"), **call}) + b"\n" + torn)
    with caplog.at_level(logging.WARNING, logger="llm_mitm.traces"):
        writer = TraceWriter(traces, None)
        writer.write(batch({**row(id="after"), **call}))
        writer.write(batch({**row(id="later"), **call}))
        writer.close()
    assert [line[:20] for line in traces.read_bytes().splitlines()] == [b'{"id":"before","text', torn, b'{"id":"after","text"', b'{"id":"later","text"']
    assert sum("cut short" in r.getMessage() for r in caplog.records) == 1
    report = ReadReport()
    assert [r["id"] for r in read_records(traces, report)] == ["before", "after", "later"]
    assert report.invalid_lines == [2] and not report.torn_last_line
    assert any("line 2" in problem for problem in report.problems())  # the fragment is reported, not lost


def test_whole_lines_and_empty_files_get_no_extra_newline(tmp_path: Path) -> None:
    for content in (b"", orjson.dumps(row(id="before")) + b"\n"):
        traces = tmp_path / "t.jsonl"
        traces.write_bytes(content)
        writer = TraceWriter(traces, None)
        writer.write(batch(row(id="after")))
        writer.close()
        assert traces.read_bytes() == content + b'{"id":"after","text":""}\n'


def test_a_file_that_may_be_written_but_not_read_is_still_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Root reads any file, so the refusal to read is simulated.)"""
    real_open = os.open

    def no_reading(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_reading)
    traces = tmp_path / "t.jsonl"
    writer = TraceWriter(traces, None)
    writer.write(batch(row(id="one")))
    writer.close()
    assert read_lines(traces) == [row(id="one")]


@pytest.mark.parametrize("how", ["deleted", "moved", "directory deleted"])
def test_a_trace_file_deleted_or_moved_while_open_is_made_again(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Writes went on into the open file, which no name reached any more: every record
    after a `rm` or a logrotate without copytruncate was lost, and nothing said so."""
    path = tmp_path / "logs" / "t.jsonl"
    writer = TraceWriter(path, None)
    writer.write(batch(row("before")))
    if how == "deleted":
        path.unlink()
    elif how == "moved":
        path.rename(tmp_path / "logs" / "t.jsonl.old")
    else:
        import shutil

        shutil.rmtree(tmp_path / "logs")
    with caplog.at_level(logging.WARNING, logger="llm_mitm.traces"):
        writer.write(batch(row("after-1")))
        writer.write(batch(row("after-2")))
    writer.close()
    assert [r["id"] for r in read_lines(path)] == ["after-1", "after-2"] and writer.stats.written == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sum("while open; traces go on in a new file" in r.message for r in caplog.records) == 1
    if how == "moved":
        assert [r["id"] for r in read_lines(tmp_path / "logs" / "t.jsonl.old")] == ["before"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to someone else")
def test_a_file_replaced_by_root_keeps_its_owner(tmp_path: Path) -> None:
    from llm_mitm.atomic import write_atomic

    target = tmp_path / "cacert.pem"
    target.write_bytes(b"old")
    os.chown(target, 4321, 4321)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and (target.stat().st_uid, target.stat().st_gid) == (4321, 4321)


def test_an_output_that_is_not_a_file_is_written_to() -> None:
    """`llm-mitm export ... -o /dev/stdout`: a pipe or a terminal is not replaced, but written."""
    import subprocess
    import sys

    code = "from llm_mitm.atomic import write_atomic; write_atomic('/dev/stdout', b'to the pipe')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"to the pipe", out.stderr
