"""The hand-off to the trace writer process: complete, in order, bounded at shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import pytest

from llm_mitm.tracesink import SinkSettings, TraceSink


def snapshot(number: int, padding: int = 0) -> dict:
    return {
        "id": f"flow-{number}",
        "started_at": 1_700_000_000.0 + number,
        "first_byte_at": None,
        "finished_at": 1_700_000_000.5 + number,
        "client": "127.0.0.1",
        "route": ["openai", "openai", "chat.completions", None],
        "method": "POST",
        "url": "https://api.openai.com/v1/chat/completions",
        "model": "gpt-4o",
        "response_model": None,
        "stream": False,
        "status_code": 200,
        "request_headers": [["content-type", "application/json"]],
        "request": [10, True, {"messages": [{"role": "user", "content": "x" * padding}]}],
        "response_headers": [],
        "response": [0, False, None],
        "events": None,
        "usage": None,
        "cost_usd": None,
        "policy": None,
        "replay": None,
        "api_key": None,
        "organization": None,
        "project": None,
        "error": None,
    }


def sink(tmp_path: Path) -> tuple[TraceSink, Path]:
    destination = tmp_path / "traces.jsonl"
    return TraceSink(SinkSettings(str(destination), None, "full", None, 5, {})), destination


def ids(destination: Path) -> list[str]:
    return [orjson.loads(line)["id"] for line in destination.read_bytes().splitlines()]


def test_without_an_event_loop_every_record_arrives(tmp_path: Path) -> None:
    traces, destination = sink(tmp_path)
    for number in range(50):
        traces.submit(snapshot(number))
    traces.close()
    assert ids(destination) == [f"flow-{n}" for n in range(50)]
    assert traces.dropped == 0


def test_on_the_event_loop_in_batches_in_order_with_large_records(tmp_path: Path) -> None:
    traces, destination = sink(tmp_path)

    async def proxying() -> None:
        for number in range(400):  # ~40 MB: far more than the socket holds at once
            traces.submit(snapshot(number, padding=100_000))
            if number % 20 == 0:
                await asyncio.sleep(0.01)
        deadline = time.monotonic() + 60
        while (not destination.exists() or len(destination.read_bytes().splitlines()) < 400) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(proxying())
    written = ids(destination)  # before close: the loop handed everything over on its own
    traces.close()
    assert written == [f"flow-{n}" for n in range(400)]
    assert traces.dropped == 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_close_gives_up_on_a_stalled_writer_in_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    traces, _ = sink(tmp_path)
    os.kill(traces.process.pid, signal.SIGSTOP)
    try:
        for number in range(100):  # ~10 MB: more than the socket buffers take
            traces.submit(snapshot(number, padding=100_000))
        started = time.monotonic()
        traces.close(timeout=1)
        assert time.monotonic() - started < 5
    finally:
        os.kill(traces.process.pid, signal.SIGCONT)
        traces.process.kill()
    assert traces.dropped > 0
    assert "TRACE LOST" in caplog.text


def test_a_dead_writer_is_reported_once_and_proxying_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    traces, _ = sink(tmp_path)
    traces.process.kill()
    traces.process.join(10)
    for number in range(3):
        traces.submit(snapshot(number))
    traces.close(timeout=1)
    assert traces.dropped == 3
    assert caplog.text.count("TRACE LOST") == 1
