"""The trace writer's own process: records are redacted, validated and written there.

The proxy's event loop only turns an exchange into a JSON line and appends it to a
buffer; every 50 ms the loop writes the buffer to a pipe without blocking (the rest
when the pipe has room). No thread: nothing competes with proxying for the interpreter
lock. The process reads lines until the pipe closes, so it writes everything it was
given at shutdown, and also when mitmdump is killed.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson

logger = logging.getLogger("llm_mitm.traces")

BATCH_SECONDS = 0.05
MAX_BUFFERED = 256 * 1024 * 1024  # bytes held for a writer that does not keep up


@dataclass(frozen=True)
class SinkSettings:
    destination: str | None
    directory: str | None
    bodies: str
    max_bytes: int | None
    keep: int
    redaction: dict[str, Any]  # Redactor(**redaction)


class TraceSink:
    """Parent side: a buffer of JSON lines, the pipe's write end, and the writer process."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.dropped = 0
        context = multiprocessing.get_context("spawn")  # never fork a threaded proxy
        receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve, args=(receive, settings), name="llm-mitm-traces", daemon=True)
        self.process.start()
        receive.close()
        self._pipe: Connection | None = send
        self._fd = send.fileno()
        os.set_blocking(self._fd, False)
        self._lines: list[bytes] = []
        self._outgoing = bytearray()  # joined lines the pipe has not taken yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_due = False
        self._waiting_for_room = False

    def submit(self, snapshot: dict[str, Any]) -> None:
        """Queue one record (orjson never writes a raw newline, so a line is a record)."""
        if self._pipe is None:
            return
        try:
            line = orjson.dumps(snapshot)
        except TypeError:  # a dict with non-string keys somewhere in a body: the slower way
            line = orjson.dumps(snapshot, option=orjson.OPT_NON_STR_KEYS)
        self._lines.append(line)
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tests, shutdown): hand it over now
            self._flush(blocking=True)
            return
        self._loop, self._flush_due = loop, True
        loop.call_later(BATCH_SECONDS, self._flush)

    def close(self, timeout: float = 15.0) -> None:
        """Hand over everything queued, then let the process finish writing."""
        if self._pipe is not None:
            self._flush(blocking=True)
            self._pipe.close()
            self._pipe = None
        self.process.join(timeout)
        if self.process.is_alive():
            logger.error("llm-mitm: the trace writer did not finish in %.0f s; stopping it", timeout)
            self.process.terminate()

    def _flush(self, blocking: bool = False) -> None:
        self._flush_due = False
        if self._pipe is None:  # closed while a flush was due
            return
        if self._lines:
            count = len(self._lines)
            if len(self._outgoing) > MAX_BUFFERED:
                self._lose(count, "the trace writer does not keep up")
            else:
                self._outgoing += b"\n".join(self._lines) + b"\n"
            self._lines.clear()
        if blocking:
            self._stop_waiting()
            os.set_blocking(self._fd, True)
        self._write()
        if blocking:
            os.set_blocking(self._fd, False)

    def _write(self) -> None:
        """As much as the pipe takes now; the rest when it has room."""
        try:
            while self._outgoing:
                written = os.write(self._fd, self._outgoing)
                del self._outgoing[:written]
        except BlockingIOError:
            if not self._waiting_for_room and self._loop is not None:
                self._loop.add_writer(self._fd, self._write)
                self._waiting_for_room = True
            return
        except OSError:
            self._stop_waiting()
            self._lose(self._outgoing.count(b"\n"), f"the trace writer process is gone (exit code {self.process.exitcode})")
            self._outgoing.clear()
            return
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._waiting_for_room and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_writer(self._fd)
        self._waiting_for_room = False

    def _lose(self, count: int, reason: str) -> None:
        first = self.dropped == 0
        self.dropped += count
        if first:
            logger.error("llm-mitm: TRACE LOST: %s (proxying goes on)", reason)


def _serve(receive: Connection, settings: SinkSettings) -> None:
    """Child side: build and write records until the parent closes the pipe."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llm_mitm.redact import Redactor
    from llm_mitm.trace import build_record
    from llm_mitm.writer import TraceWriter

    redactor = Redactor(**settings.redaction)
    writer = TraceWriter(settings.destination, settings.directory, settings.max_bytes, settings.keep)
    bodies = settings.bodies
    try:
        with open(receive.fileno(), "rb", closefd=False) as lines:
            for line in lines:
                if not line.endswith(b"\n"):
                    break  # the parent died in the middle of a write: a torn last record
                snap = orjson.loads(line)
                writer.submit(lambda snap=snap: build_record(snap, redactor, bodies))  # type: ignore[misc]
    except OSError:
        pass
    finally:
        writer.close(60)
