"""The trace writer's own process: records are redacted, validated and written there.

The proxy's event loop only turns an exchange into plain data and hands the bytes to a
sender thread; all the rest runs on another core, so tracing does not compete with
proxying for the interpreter lock. The process reads until the pipe closes, so it
writes everything it was given at shutdown, and also when mitmdump is killed.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson

logger = logging.getLogger("llm_mitm.traces")

_STOP = b""
BATCH_SECONDS = 0.05


@dataclass(frozen=True)
class SinkSettings:
    destination: str | None
    directory: str | None
    bodies: str
    max_bytes: int | None
    keep: int
    redaction: dict[str, Any]  # Redactor(**redaction)


class TraceSink:
    """Parent side: a queue, a sender thread and the writer process."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.dropped = 0
        context = multiprocessing.get_context("spawn")  # never fork a threaded proxy
        receive, self._send = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve, args=(receive, settings), name="llm-mitm-traces", daemon=True)
        self.process.start()
        receive.close()
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._forward, name="llm-mitm-trace-sender", daemon=True)
        self._sender.start()

    def submit(self, snapshot: dict[str, Any]) -> None:
        self._queue.put(orjson.dumps(snapshot, option=orjson.OPT_NON_STR_KEYS))

    def close(self, timeout: float = 15.0) -> None:
        """Hand over everything queued, then let the process finish writing."""
        self._queue.put(_STOP)
        self._sender.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            logger.error("llm-mitm: the trace writer did not finish in %.0f s; stopping it", timeout)
            self.process.terminate()

    def _forward(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            time.sleep(BATCH_SECONDS)  # one wake-up per batch, not per record: the GIL is shared
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for data in batch:
                if data == _STOP:
                    stopping = True
                    continue
                try:
                    self._send.send_bytes(data)
                except (OSError, ValueError):
                    self.dropped += 1
                    if self.dropped == 1:
                        logger.error("llm-mitm: TRACE LOST: the trace writer process is gone (exit code %s)", self.process.exitcode)
        self._send.close()


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
        while True:
            try:
                data = receive.recv_bytes()
            except (EOFError, OSError):
                break
            snap = orjson.loads(data)
            writer.submit(lambda snap=snap: build_record(snap, redactor, bodies))  # type: ignore[misc]
    finally:
        writer.close(60)
