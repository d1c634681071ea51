"""The trace writer's own process: records are redacted, validated and written there.

The proxy's event loop only turns an exchange into a JSON line and appends it to a
buffer; every 50 ms the loop sends the buffer over a local socket without blocking
(what the socket does not take waits for the next round). No thread: nothing competes
with proxying for the interpreter lock. A socket pair, not a pipe, because it works
the same on Windows and needs nothing from the event loop but a timer. The process
reads lines until the socket closes, so it writes everything it was given at shutdown,
and also when mitmdump is killed.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson

logger = logging.getLogger("llm_mitm.traces")

BATCH_SECONDS = 0.05
CATCH_UP_SECONDS = 0.002  # between rounds while the socket is full
MAX_BUFFERED = 256 * 1024 * 1024  # bytes held for a writer that does not keep up
SEND_BUFFER = 4 * 1024 * 1024  # what one round can hand over without waiting


@dataclass(frozen=True)
class SinkSettings:
    destination: str | None
    directory: str | None
    bodies: str
    max_bytes: int | None
    keep: int
    redaction: dict[str, Any]  # Redactor(**redaction)


class TraceSink:
    """Parent side: a buffer of JSON lines, one end of a socket pair, the writer process."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.dropped = 0
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("spawn")  # never fork a threaded proxy
        self.process = context.Process(target=_serve, args=(theirs, settings), name="llm-mitm-traces", daemon=True)
        self.process.start()
        theirs.close()
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:  # the system's own size, then
            pass
        ours.setblocking(False)
        self._socket: socket.socket | None = ours
        self._lines: list[bytes] = []
        self._outgoing = bytearray()  # joined lines the socket has not taken yet
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def submit(self, snapshot: dict[str, Any]) -> None:
        """Queue one record (orjson never writes a raw newline, so a line is a record)."""
        if self._socket is None:
            return
        try:
            line = orjson.dumps(snapshot)
        except TypeError:  # a dict with non-string keys somewhere in a body: the slower way
            line = orjson.dumps(snapshot, option=orjson.OPT_NON_STR_KEYS)
        self._lines.append(line)
        self._schedule()

    def close(self, timeout: float = 15.0) -> None:
        """Hand over everything queued (for at most `timeout`), then let the process
        finish writing."""
        deadline = time.monotonic() + timeout
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._socket is not None:
            self._take_lines()
            self._send(deadline)
            if self._outgoing:
                self._lose(self._outgoing.count(b"\n"), "the trace writer did not take them before shutdown")
                self._outgoing.clear()
            self._socket.close()
            self._socket = None
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            logger.error("llm-mitm: the trace writer did not finish in %.0f s; stopping it", timeout)
            self.process.terminate()

    def _schedule(self, delay: float = BATCH_SECONDS) -> None:
        """A send round on the running loop (one per batch); none running: now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tests, shutdown): what the socket takes now, the rest at close
            self._take_lines()
            self._send(None)
            return
        if self._timer is not None and self._timer_loop is loop and not loop.is_closed():
            return
        self._timer, self._timer_loop = loop.call_later(delay, self._flush), loop

    def _flush(self) -> None:
        self._timer = None
        if self._socket is None:  # closed while a round was due
            return
        self._take_lines()
        self._send(None)
        if self._outgoing:  # the socket is full: soon again
            self._schedule(CATCH_UP_SECONDS)

    def _take_lines(self) -> None:
        if not self._lines:
            return
        if len(self._outgoing) > MAX_BUFFERED:
            self._lose(len(self._lines), "the trace writer does not keep up")
        else:
            self._outgoing += b"\n".join(self._lines) + b"\n"
        self._lines.clear()

    def _send(self, deadline: float | None) -> None:
        """As much as the socket takes now; with a deadline, wait for room until then."""
        assert self._socket is not None
        while self._outgoing:
            try:
                sent = self._socket.send(self._outgoing)
            except BlockingIOError:
                remaining = deadline - time.monotonic() if deadline is not None else 0.0
                if remaining <= 0:
                    return
                select.select([], [self._socket], [], remaining)
                continue
            except OSError:
                self._lose(self._outgoing.count(b"\n"), f"the trace writer process is gone (exit code {self.process.exitcode})")
                self._outgoing.clear()
                return
            del self._outgoing[:sent]

    def _lose(self, count: int, reason: str) -> None:
        first = self.dropped == 0
        self.dropped += count
        if first:
            logger.error("llm-mitm: TRACE LOST: %s (proxying goes on)", reason)


def _serve(receive: socket.socket, settings: SinkSettings) -> None:
    """Child side: build and write records until the parent closes its end."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llm_mitm.redact import Redactor
    from llm_mitm.trace import build_record
    from llm_mitm.writer import TraceWriter

    redactor = Redactor(**settings.redaction)
    writer = TraceWriter(settings.destination, settings.directory, settings.max_bytes, settings.keep)
    bodies = settings.bodies
    try:
        with receive, receive.makefile("rb") as lines:
            for line in lines:
                if not line.endswith(b"\n"):
                    break  # the parent died in the middle of a send: a torn last record
                snap = orjson.loads(line)
                writer.submit(lambda snap=snap: build_record(snap, redactor, bodies))  # type: ignore[misc]
    except OSError:
        pass
    finally:
        writer.close(60)
