"""The hand-off to the trace writer process: complete, in order, bounded at shutdown;
responses left unread by the proxy are read, metered and counted there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from llm_mitm.config import ModelPrice
from llm_mitm.pricing import PriceTable, cost_usd
from llm_mitm.stats import CountRow
from llm_mitm.tracesink import READ_BUFFER, SinkSettings, TraceSink
from llm_mitm.usage import Usage
from tests.support.mitm import schema_checked


def snapshot(number: int, padding: int = 0) -> dict:
    return {
        "deferred": False,
        "id": f"flow-{number}",
        "started_at": 1_700_000_000.0 + number,
        "first_byte_at": None,
        "finished_at": 1_700_000_000.5 + number,
        "client": "127.0.0.1",
        "route": ["openai", "openai", "chat.completions", None],
        "method": "POST",
        "generates": True,
        "runs_model": True,
        "url": "https://api.openai.com/v1/chat/completions",
        "model": "gpt-4o",
        "response_model": None,
        "stream": False,
        "status_code": 200,
        "request_headers": [["content-type", "application/json"]],
        "request": [10, "json", {"messages": [{"role": "user", "content": "x" * padding}]}],
        "response_headers": [],
        "response": [0, None, None],
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


def deferred(number: int, body: bytes, status: int = 200, content_type: str = "application/json") -> dict:
    """As the proxy sends an exchange whose response it left unread."""
    snap = snapshot(number)
    snap.update(deferred=True, status_code=status, api_key=f"key-{number % 2}", response_headers=[["content-type", content_type]],
                response=[len(body), "raw", body.decode("latin-1")])
    return snap


STREAM = [  # a chat stream as upstream sends it, cut anywhere, a key in its text
    b'data: {"model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {"content": "sk-proj-' + b"S" * 40,
    b'"}}]}\n\ndata: {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}\n\n',
    b"data: [DONE]\n\n",
]


def streamed(number: int, chunks: list[bytes]) -> dict:
    """As the proxy sends an exchange whose stream it held instead of reading it."""
    snap = deferred(number, b"", content_type="text/event-stream")
    snap.update(stream=True, response=[sum(map(len, chunks)), "events", [chunk.decode("latin-1") for chunk in chunks]], events=0)
    return snap


def sink(tmp_path: Path, counted: list[CountRow] | None = None) -> tuple[TraceSink, Path]:
    destination = tmp_path / "traces.jsonl"
    settings = SinkSettings(str(destination), None, "full", None, 5, {}, prices={}, estimate_missing=True)
    return TraceSink(settings, counted.append if counted is not None else None), destination


def records(destination: Path) -> list[dict]:
    return [schema_checked(line) for line in destination.read_bytes().splitlines()]


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


def test_a_record_larger_than_one_read_arrives_whole(tmp_path: Path) -> None:
    traces, destination = sink(tmp_path)
    big = READ_BUFFER * 3 + 12_345  # the process reads it in four parts or more
    traces.submit(snapshot(0))
    traces.submit(snapshot(1, padding=big))
    traces.submit(snapshot(2))
    traces.close()
    written = records(destination)
    assert [record["id"] for record in written] == ["flow-0", "flow-1", "flow-2"]
    assert written[1]["request"]["body"]["messages"][0]["content"] == "x" * big


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_close_gives_up_on_a_stalled_writer_in_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    traces, _ = sink(tmp_path)
    os.kill(traces.process.pid, signal.SIGSTOP)
    try:
        for number in range(100):  # ~10 MB: more than the socket buffers take
            traces.submit(snapshot(number, padding=100_000))
        started = time.monotonic()
        traces.close(timeout=1)
        assert time.monotonic() - started < 8
        # still stopped, it is killed: a stopped process keeps SIGTERM pending, and mitmdump's exit waited for it for ever (a review)
        assert not traces.process.is_alive()
    finally:
        if traces.process.is_alive():
            os.kill(traces.process.pid, signal.SIGCONT)
            traces.process.kill()
    assert traces.dropped > 0
    assert "TRACE LOST" in caplog.text and f"{traces.dropped} trace records were lost in all" in caplog.text


def test_a_program_that_never_closes_its_sink_still_exits_with_its_records_written(tmp_path: Path) -> None:
    """multiprocessing joins its children at exit, and the writer ignores SIGTERM and ends
    only when its socket closes: a program that ended without `close` (the addons under
    mitmproxy's test helpers, whose `done` no test called) waited for ever. A probe:
    `pytest tests/test_addons.py` printed "51 passed" and never exited, on 3.11 and 3.13."""
    destination = tmp_path / "traces.jsonl"
    program = (
        "import time\n"
        "from llm_mitm.tracesink import SinkSettings, TraceSink\n"
        "from tests.test_tracesink import snapshot\n"
        f"sink = TraceSink(SinkSettings({str(destination)!r}, None, 'full', None, 5, {{}}, prices={{}}, estimate_missing=True))\n"
        "sink.submit(snapshot(1))\n"
        "time.sleep(1.5)  # the writer has started, and ignores SIGTERM\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", program], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=30)
    assert result.returncode == 0
    assert ids(destination) == ["flow-1"]


def test_a_dead_writer_is_reported_once_and_proxying_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    traces, _ = sink(tmp_path)
    traces.process.kill()
    traces.process.join(10)
    for number in range(3):
        traces.submit(snapshot(number))
    traces.close(timeout=1)
    assert traces.dropped == 3
    assert caplog.text.count("TRACE LOST") == 1


def test_what_a_gone_writer_was_not_handed_goes_to_the_next_one_in_order(tmp_path: Path) -> None:
    """The records taken while no process runs, and those the socket had not taken, are the
    next process's to write; only what the gone one was handed is lost."""
    traces, destination = sink(tmp_path)
    traces.submit(snapshot(0))
    deadline = time.monotonic() + 10
    while not (destination.exists() and destination.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    traces.process.kill()
    traces.process.join(10)
    for number in range(1, 4):
        traces.submit(snapshot(number))
    assert traces.failed
    following = TraceSink(traces.settings)
    following.adopt(*traces.take_unsent())
    traces.close(timeout=1)
    assert traces.dropped == 0 and traces.handed_unread == 0
    following.submit(snapshot(4))
    following.close()
    assert ids(destination) == [f"flow-{n}" for n in range(5)]


def test_a_line_the_gone_writer_took_the_start_of_is_lost_not_sent_torn(tmp_path: Path) -> None:
    traces, _ = sink(tmp_path)
    try:
        traces._outgoing += b'{"id": "torn"}\n{"id": "whole"}\n'
        traces._queued += 2
        traces._cut = True
        lines, submitted = traces.take_unsent()
        assert lines == [b'{"id": "whole"}'] and submitted == [] and traces.dropped == 1
    finally:
        traces.close(timeout=1)


def test_records_wait_for_a_new_writer_up_to_a_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llm_mitm.tracesink

    monkeypatch.setattr(llm_mitm.tracesink, "MAX_BUFFERED", 1000)  # bytes: a snapshot's line is ~620
    traces, _ = sink(tmp_path)
    traces.process.kill()
    traces.process.join(10)
    traces.failed = True  # as the round that finds it gone marks it
    traces.collect(0.1)  # the periodic stats line, say: its sync mark is this process's, not the next one's
    for number in range(4):
        traces.submit(snapshot(number))
    lines, submitted = traces.take_unsent()
    assert [orjson.loads(line)["id"] for line in lines] == ["flow-0", "flow-1"] and submitted == [] and traces.dropped == 2
    traces.close(timeout=1)


ANSWER = orjson.dumps({"model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                       "choices": [{"message": {"role": "assistant", "content": "remember sk-" + "Q" * 48}}]})


def test_deferred_responses_are_read_metered_counted_and_redacted(tmp_path: Path) -> None:
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    traces.submit(deferred(0, ANSWER))
    traces.submit(deferred(1, b'{"error": {"type": "invalid_request_error", "message": "bad model"}}', status=400))
    traces.submit(deferred(2, "<h1>bad gateway \u00e9</h1>".encode(), status=502, content_type="text/html"))
    refused = deferred(3, b'{"error": {"message": "refused"}}', status=403)
    refused["policy"] = ["block", "model_not_allowed", "no"]
    traces.submit(refused)
    traces.collect(2.0)
    cost = cost_usd(Usage(input_tokens=10, output_tokens=5), PriceTable().price("gpt-4o"))  # type: ignore[arg-type]
    assert counted == [
        ("key-0", "gpt-4o-2024-08-06", 10, 5, pytest.approx(cost), False, False),
        ("key-1", "gpt-4o", None, None, None, True, False),
        ("key-0", "gpt-4o", None, None, None, True, False),
        ("key-1", "gpt-4o", None, None, None, False, True),
    ]
    traces.close()
    answered, rejected, gateway, blocked = records(destination)
    assert answered["usage"]["total_tokens"] == 15 and answered["cost_usd"] == pytest.approx(cost)
    assert answered["response_model"] == "gpt-4o-2024-08-06" and answered["response"]["size"] == len(ANSWER)
    assert "Q" * 8 not in destination.read_text()  # the key in the answer is redacted like any other
    assert rejected["error"] == "invalid_request_error: bad model"
    assert gateway["error"] == "HTTP 502" and gateway["response"]["body"] == "<h1>bad gateway \u00e9</h1>"
    assert blocked["policy"]["decision"] == "block" and blocked["cost_usd"] is None


def test_counts_come_back_on_the_loop_and_at_close(tmp_path: Path) -> None:
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)

    async def proxying() -> None:
        for number in range(300):
            traces.submit(deferred(number, ANSWER))
            if number % 30 == 0:
                await asyncio.sleep(0.06)  # send rounds go out, and take what came back
        deadline = time.monotonic() + 30
        while len(counted) < 300 and time.monotonic() < deadline:  # no new calls: rounds go on
            await asyncio.sleep(0.05)

    asyncio.run(proxying())
    assert len(counted) == 300  # none waited for: the loop took them
    traces.close()
    assert len(records(destination)) == 300


def test_a_writer_waiting_to_report_does_not_stall_the_hand_off(tmp_path: Path) -> None:
    """Nobody reads the counts until close: the process blocks on them, close takes them."""
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    for number in range(20_000):  # ~2 MB of counts: more than a socket buffer
        traces.submit(deferred(number, ANSWER))
    traces.close(timeout=120)
    assert traces.dropped == 0
    assert len(counted) == 20_000 and len(records(destination)) == 20_000


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_collect_waits_no_longer_than_asked(tmp_path: Path) -> None:
    """The periodic stats line asks for a short wait: a stalled writer must not stall the proxy."""
    counted: list[CountRow] = []
    traces, _ = sink(tmp_path, counted)
    os.kill(traces.process.pid, signal.SIGSTOP)
    try:
        traces.submit(deferred(0, ANSWER))
        started = time.monotonic()
        traces.collect(0.05)
        assert time.monotonic() - started < 0.5
        assert counted == []
    finally:
        os.kill(traces.process.pid, signal.SIGCONT)
    traces.collect(5.0)  # once it runs again, the count arrives
    assert len(counted) == 1
    traces.close()


def test_held_streams_are_rebuilt_metered_counted_and_redacted(tmp_path: Path) -> None:
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    traces.submit(streamed(0, STREAM))
    traces.close()
    [record] = records(destination)
    cost = cost_usd(Usage(input_tokens=10, output_tokens=5), PriceTable().price("gpt-4o"))  # type: ignore[arg-type]
    assert counted == [("key-0", "gpt-4o-2024-08-06", 10, 5, pytest.approx(cost), False, False)]
    assert record["usage"]["total_tokens"] == 15 and record["cost_usd"] == pytest.approx(cost)
    assert record["response"]["events"] == 3 and record["response"]["size"] == len(b"".join(STREAM))
    assert record["response"]["body"]["choices"][0]["message"]["content"].startswith("sk-proj-…")
    assert "S" * 8 not in destination.read_text()


@pytest.mark.parametrize("response", ["raw", "events"])
def test_a_body_too_deep_to_hand_over_costs_that_body_not_the_response(tmp_path: Path, response: str) -> None:
    """A request body orjson cannot write (deeper than 255) leaves the proxy without its
    contents; the unread response, buffered or held, still goes, and is metered."""
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    deep = streamed(0, STREAM) if response == "events" else deferred(0, ANSWER)
    nested: list = []
    for _ in range(300):
        nested = [nested]
    deep["request"] = [600, "json", nested]
    traces.submit(deep)
    traces.close()
    [record] = records(destination)
    assert record["request"]["body"] is None and record["request"]["size"] == 600
    assert record["usage"]["total_tokens"] == 15 and counted[0][2:4] == (10, 5)


def test_a_body_too_deep_to_write_costs_its_bodies_not_its_record(tmp_path: Path) -> None:
    """orjson reads 1024 levels and writes 255: such a body comes in whole, as it came."""
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    deep = deferred(0, ANSWER)
    deep["request"] = [1200, "json", orjson.Fragment(b"[" * 600 + b"]" * 600)]
    traces.submit(deep)
    traces.submit(snapshot(1))
    traces.close()
    first, second = records(destination)
    assert (first["id"], second["id"]) == ("flow-0", "flow-1")
    assert first["request"]["body"] is None and first["request"]["size"] == 1200 and first["usage"]["total_tokens"] == 15
    assert len(counted) == 1


def test_an_absurd_token_count_costs_that_count_only(tmp_path: Path) -> None:
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    traces.submit(deferred(0, orjson.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": 5}})))
    traces.submit(deferred(1, ANSWER))
    traces.close()
    assert ids(destination) == ["flow-0", "flow-1"]
    assert [row[2:4] for row in counted] == [(None, 5), (10, 5)]


def test_the_loop_stops_asking_once_every_line_is_read(tmp_path: Path) -> None:
    """Even a line the process cannot read is seen: the send rounds do not go on forever."""
    traces, _ = sink(tmp_path)

    async def proxying() -> int:
        traces.submit(deferred(0, ANSWER))
        traces._queue([b'{"deferred": true, "not": "a snapshot"}'])  # as a broken line would arrive
        await asyncio.sleep(1.0)
        rounds = 0
        while traces._timer is not None and rounds < 100:
            await asyncio.sleep(0.06)
            rounds += 1
        return rounds

    assert asyncio.run(proxying()) < 100
    traces.close()


def test_text_that_is_not_utf8_costs_its_odd_characters_not_the_record(tmp_path: Path) -> None:
    counted: list[CountRow] = []
    traces, destination = sink(tmp_path, counted)
    odd = deferred(0, ANSWER)
    odd["request_headers"] = [["x-odd", "caf\udce9"]]  # a header byte that is not UTF-8, as decoded
    traces.submit(odd)
    traces.close()
    (record,) = records(destination)
    assert record["request"]["headers"]["x-odd"] == "caf\ufffd" and record["usage"]["total_tokens"] == 15
    assert len(counted) == 1


def now(snap: dict) -> dict:
    """A snapshot of a call admitted now (after any change made so far)."""
    return {**snap, "started_at": time.time()}


def test_new_prices_bodies_and_redaction_reach_the_running_process(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A config change that leaves the files alone is taken by the writer as it runs:
    the records before it are made the old way, those after it the new way, and a model
    without a price is named once, not once per change."""
    traces, destination = sink(tmp_path)
    pid = traces.process.pid
    unknown = orjson.dumps({"model": "house-model", "usage": {"prompt_tokens": 1_000_000, "completion_tokens": 0}})
    traces.submit(deferred(0, unknown))
    traces.submit(deferred(1, ANSWER))
    priced = replace(traces.settings, prices={"house-model": ModelPrice(input=2.0, output=4.0)})
    admitted_before = time.time()
    traces.retune(priced)
    traces.submit(now(deferred(2, unknown)))
    traces.retune(replace(priced, prices={}, bodies="metadata", redaction={"extra_headers": ["content-type"]}))
    traces.submit(now(deferred(3, unknown)))
    traces.submit(now(deferred(4, ANSWER)))
    # a call admitted before the change and ending after it is made as it was admitted (a review: a pattern
    # taken out while a call was under way left its secret in that call's trace)
    traces.submit({**deferred(5, ANSWER), "started_at": admitted_before})
    traces.submit({**deferred(6, ANSWER), "started_at": time.time()})  # admitted after both: made the new way
    traces.close()
    assert traces.process.pid == pid and traces.process.exitcode == 0
    first, answered, repriced, unpriced_again, slim, under_way, after = records(destination)
    # two edits came while it was under way: it is made as the first config, not the second (a review)
    assert under_way["response"]["body"] is not None and under_way["request"]["headers"]["content-type"] == "application/json"
    assert after["response"]["body"] is None
    assert first["cost_usd"] is None and repriced["cost_usd"] == pytest.approx(2.0)
    assert unpriced_again["cost_usd"] is None
    assert answered["response"]["body"]["choices"][0]["message"]["content"].startswith("remember")
    assert slim["response"]["body"] is None and slim["response"]["size"] == len(ANSWER)
    assert answered["request"]["headers"]["content-type"] == "application/json"
    assert slim["request"]["headers"]["content-type"] not in ("application/json", None)
    assert capfd.readouterr().err.count("no price for model 'house-model'") == 1


def test_a_call_under_way_through_edits_is_made_as_when_it_started(tmp_path: Path) -> None:
    """Bodies kept out, then let in, then only prices changed: a call that started before
    the first edit keeps its body out (a review: only the last earlier config was kept)."""
    traces, destination = sink(tmp_path)
    traces.retune(replace(traces.settings, bodies="metadata"))
    started = time.time()
    time.sleep(0.01)
    traces.retune(replace(traces.settings, bodies="full"))
    traces.retune(replace(traces.settings, prices={"house-model": ModelPrice(input=2.0, output=4.0)}))
    traces.submit({**deferred(1, ANSWER), "started_at": started})
    traces.submit(now(deferred(2, ANSWER)))
    traces.close()
    under_way, after = records(destination)
    assert under_way["response"]["body"] is None and after["response"]["body"] is not None


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_a_full_buffer_drops_records_never_the_new_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies switched off while the writer lags: the switch must still reach it."""
    monkeypatch.setattr("llm_mitm.tracesink.MAX_BUFFERED", 1_000_000)
    traces, destination = sink(tmp_path)
    os.kill(traces.process.pid, signal.SIGSTOP)
    try:
        number = 0
        while traces.dropped == 0:
            traces.submit(snapshot(number, padding=100_000))
            number += 1
        traces.retune(replace(traces.settings, bodies="metadata"))
    finally:
        os.kill(traces.process.pid, signal.SIGCONT)
    traces.collect(30)  # waits until the process has read everything queued
    traces.submit(now(snapshot(number + 1, padding=10)))
    traces.close()
    written = records(destination)
    assert written[0]["request"]["body"] is not None
    assert written[-1]["id"] == f"flow-{number + 1}" and written[-1]["request"]["body"] is None
