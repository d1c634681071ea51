"""The trace writer's own process: records are completed, redacted, validated and
written there.

mitmproxy runs on one core; this process runs on another. The proxy's event loop only
keeps each finished exchange; every 50 ms it turns those of the round into JSON lines
and sends them over a local socket without blocking (what the socket does not take
waits for the next round). No thread: nothing competes with proxying for the
interpreter lock. A socket pair, not a pipe, because it works the same on Windows,
both ways, and needs nothing from the event loop but a timer.

A response the proxy left unread (a deferred exchange) is parsed and metered here, and
its stats row goes back over the same socket; the loop takes those rows on its next
round, and `collect` waits for all of them (for `llm.stats`). A config change of bodies,
redaction or prices goes over the same socket, in order with the records (`retune`);
only new files need a new process. The process reads until
the proxy closes its side, so it writes everything it was given at shutdown, and also
when mitmdump is killed.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import select
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from llm_mitm.config import ModelPrice
from llm_mitm.stats import CountRow

if TYPE_CHECKING:
    from llm_mitm.redact import Redactor

logger = logging.getLogger("llm_mitm.traces")

BATCH_SECONDS = 0.05
CATCH_UP_SECONDS = 0.002  # between rounds while the socket is full
MAX_BUFFERED = 256 * 1024 * 1024  # bytes held for a writer that does not keep up
SEND_BUFFER = 4 * 1024 * 1024  # what one round can hand over without waiting
KILL_AFTER = 2.0  # seconds to wait for a killed writer to be gone
AT_EXIT_SECONDS = 5.0  # what a sink left open is given to hand over its records at exit
_EDITS_KEPT = 16  # config edits whose redaction the writer keeps for calls under way through them
READ_BUFFER = 1024 * 1024  # what the process takes in one read


@dataclass(frozen=True)
class SinkSettings:
    destination: str | None
    directory: str | None
    bodies: str
    max_bytes: int | None
    keep: int
    redaction: dict[str, Any]  # Redactor(**redaction)
    prices: dict[str, ModelPrice]  # pricing.models
    estimate_missing: bool

    def files(self) -> tuple[str | None, str | None, int | None, int]:
        """Where records go: only a new process changes that."""
        return self.destination, self.directory, self.max_bytes, self.keep

    def making(self) -> dict[str, Any]:
        """How records are made, as plain data: a running process takes a change of these
        (`TraceSink.retune`) without a restart."""
        return {
            "bodies": self.bodies,
            "redaction": self.redaction,
            "prices": {name: price.model_dump() for name, price in self.prices.items()},
            "estimate_missing": self.estimate_missing,
        }


class TraceSink:
    """Parent side: a buffer of JSON lines, one end of a socket pair, the writer process.
    `on_count` gets the stats row of every deferred exchange the process finished."""

    def __init__(
        self,
        settings: SinkSettings,
        on_count: Callable[[CountRow], None] | None = None,
        snapshot: Callable[[Any], dict[str, Any]] = lambda item: item,
    ) -> None:
        self.settings = settings
        self.on_count = on_count or (lambda row: None)
        self.snapshot = snapshot  # what `submit` takes -> the snapshot dict sent to the process
        self._submitted: list[Any] = []  # taken since the last round, not yet snapshotted
        self.dropped = 0
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("spawn")  # never fork a threaded proxy
        self.process = context.Process(target=_serve, args=(theirs, settings), name="llm-mitm-traces", daemon=True)
        self.process.start()
        theirs.close()
        # multiprocessing joins its children at exit, and this one ends only when our side
        # closes: a program that ends without `close` (a test that never called mitmproxy's
        # `done`) would wait for ever. Registered after multiprocessing's, so run before it.
        self._at_exit = _closing_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:  # the system's own size, then
            pass
        ours.setblocking(False)
        self._socket: socket.socket | None = ours
        self._outgoing = bytearray()  # joined lines the socket has not taken yet
        self._incoming = bytearray()  # what the process reported, up to a whole line
        self._asked = 0  # the last sync mark sent, and the last one answered
        self._answered = 0
        self._closed_by_writer = False
        self._queued = 0  # lines handed to the process (or on their way), and lines it has read
        self._seen = 0
        self.failed = False  # the process is gone: records wait for the next one (`take_unsent`)
        self._cut = False  # the socket took part of the first line of `_outgoing`
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: Any) -> None:
        """Take one finished record; it is snapshotted and serialised in the next send
        round, with the rest of its batch: one warm pass over many records costs the
        event loop far less than one cold pass per response."""
        if self._socket is None:
            return
        self._submitted.append(item)
        if self.failed:  # kept for the next writer process, as lines (bounded like a lagging writer's)
            self._serialise_submitted()
            return
        self._schedule()

    def take_unsent(self) -> tuple[list[bytes], list[Any]]:
        """What this sink holds and never handed to its process (whole lines, and records
        not yet made into lines), for a new sink to send (`adopt`): of a writer process
        that went, only what it had been handed is lost."""
        outgoing = bytes(self._outgoing)
        if self._cut:  # the rest of a line the process took the start of
            cut = outgoing.find(b"\n") + 1
            self._lose(1, "the trace writer process went while taking it")
            outgoing = outgoing[cut:]
        lines = outgoing.split(b"\n")[:-1]
        self._queued -= len(lines)
        # Sync marks and settings were this process's: the new one starts with the settings
        # of now, and a mark it answered would end a later wait before its time.
        lines = [line for line in lines if not line.startswith(_CONTROL)]
        submitted, self._submitted = self._submitted, []
        self._outgoing.clear()
        self._cut = False
        return lines, submitted

    @property
    def waiting(self) -> bool:
        """Records not yet handed to the process."""
        return bool(self._outgoing or self._submitted)

    @property
    def handed_unread(self) -> int:
        """Lines the process was handed and had not reported reading."""
        return self._queued - self._seen - self._outgoing.count(b"\n")

    def adopt(self, lines: list[bytes], submitted: list[Any]) -> None:
        """Take over what a sink whose process went could not send, in order before
        anything taken since."""
        self._append(lines)
        self._submitted[:0] = submitted
        if lines or submitted:
            self._schedule()

    def _serialise_submitted(self) -> None:
        """The records taken since the last round, as lines in the outgoing buffer, in
        order (orjson never writes a raw newline, so a line is a record)."""
        submitted, self._submitted = self._submitted, []
        lines = []
        for item in submitted:
            try:
                lines.append(_line(self.snapshot(item)))
            except Exception:  # noqa: BLE001 - a record we cannot write must not stop the proxy
                logger.exception("llm-mitm: a trace could not be handed over")
                self._drop("a record could not be serialised")
        self._queue(lines)

    def retune(self, settings: SinkSettings) -> None:
        """New redaction, bodies or prices for every record submitted from now on (the
        same files: `settings.files()` must be unchanged)."""
        if settings.files() != self.settings.files():
            raise ValueError("new trace files need a new writer process, not a retune")
        self.settings = settings
        if self._socket is not None:
            self._queue_control(orjson.dumps({"making": {**settings.making(), "since": time.time()}}))
            self._schedule()

    def collect(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the process has reported every deferred exchange
        submitted so far: a command's wait, never the hot path's."""
        if self._socket is None:
            return
        self._asked += 1
        self._queue_control(orjson.dumps({"sync": self._asked}))
        deadline = time.monotonic() + timeout
        self._send(deadline)
        self._receive_until(deadline, lambda: self._answered >= self._asked)
        if self._answered < self._asked and timeout >= 1 and not self._closed_by_writer:
            logger.warning("llm-mitm: the trace writer did not report its counts in %.0f s; stats may lag", timeout)

    def close(self, timeout: float = 15.0) -> None:
        """Hand over everything queued (for at most `timeout`), take the last counts,
        then let the process finish writing."""
        deadline = time.monotonic() + timeout
        atexit.unregister(self._at_exit)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._socket is not None:
            self._send(deadline)
            if self._outgoing:
                reason = f"the trace writer process is gone (exit code {self.process.exitcode})" if self.failed else \
                    "the trace writer did not take them before shutdown"
                self._lose(self._outgoing.count(b"\n"), reason)
                self._outgoing.clear()
            try:
                self._socket.shutdown(socket.SHUT_WR)  # the process reads to the end, answers, closes
            except OSError:
                pass
            self._receive_until(deadline, lambda: False)
            self._socket.close()
            self._socket = None
        if self.dropped:  # said once as it began: the total, at the end (a review: never said)
            logger.error("llm-mitm: %d trace records were lost in all before the trace writer took them", self.dropped)
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():  # stuck, or stopped (SIGSTOP): multiprocessing's exit would wait for it for ever (a review: mitmdump never exited)
            logger.error("llm-mitm: the trace writer did not finish in %.0f s; stopping it (what it had not written is lost)", timeout)
            self.process.kill()  # it ignores SIGTERM (`_serve`)
            self.process.join(KILL_AFTER)

    def close_in_background(self) -> None:
        """`close` off the event loop, for a config change: the proxy goes on serving while
        the old writer finishes (a review: a lagging writer held every call for up to 15 s).
        Its counts reach `on_count` on the loop. Without a running loop, now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.close()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counted = self.on_count

        def on_the_loop(row: CountRow) -> None:
            try:
                loop.call_soon_threadsafe(counted, row)
            except RuntimeError:  # the loop has ended (a change just before shutdown): no one else counts now
                counted(row)

        self.on_count = on_the_loop
        threading.Thread(target=self.close, name="llm-mitm-trace-close").start()  # not a daemon: exiting waits for it, bounded

    def _schedule(self, delay: float = BATCH_SECONDS) -> None:
        """A send round on the running loop (one per batch); none running: now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tests, shutdown): what the socket takes now, the rest at close
            self._send(None)
            return
        if self._timer is not None and self._timer_loop is loop and not loop.is_closed():
            return
        self._timer, self._timer_loop = loop.call_later(delay, self._flush), loop

    def _flush(self) -> None:
        self._timer = None
        if self._socket is None or self.failed:  # closed while a round was due; or no one to send to
            return
        self._send(None)
        self._receive()
        if self._outgoing:  # the socket is full: soon again
            self._schedule(CATCH_UP_SECONDS)
        elif self._seen < self._queued and not self._closed_by_writer:  # reports to take, even with no new calls
            self._schedule()
        if self._closed_by_writer or not self.process.is_alive():
            self.failed = True

    def _queue(self, lines: list[bytes]) -> None:
        """Records into the outgoing buffer; a round of them is dropped when the buffer is
        full already."""
        if lines and len(self._outgoing) > MAX_BUFFERED:
            self._drop("no trace writer process runs, and too many records wait for one" if self.failed else
                       "the trace writer does not keep up", len(lines))
            return
        self._append(lines)

    def _queue_control(self, line: bytes) -> None:
        """A control line (a sync mark, new settings): never dropped (it is small, and the
        process must not miss it), and after the records taken before it, made as they
        were taken."""
        self._serialise_submitted()
        self._append([line])

    def _append(self, lines: list[bytes]) -> None:
        """Joined first: one copy of the round, where a line at a time regrew the buffer
        again and again (0.5 against 0.06 us a record)."""
        if not lines:
            return
        self._outgoing += b"\n".join(lines)
        self._outgoing += b"\n"
        self._queued += len(lines)

    def _send(self, deadline: float | None) -> None:
        """The records taken so far, and as much as the socket takes now; with a
        deadline, wait for room until then."""
        assert self._socket is not None
        self._serialise_submitted()
        while self._outgoing:
            try:
                sent = self._socket.send(self._outgoing)
            except BlockingIOError:
                remaining = deadline - time.monotonic() if deadline is not None else 0.0
                if remaining <= 0:
                    return
                # The process may itself wait for us to take its counts: take them.
                readable, _, _ = select.select([self._socket], [self._socket], [], remaining)
                if readable:
                    self._receive()
                continue
            except OSError:  # the process is gone: what it did not take waits for the next one
                self.failed = True
                return
            if sent:
                self._cut = self._outgoing[sent - 1] != 0x0A  # ended inside a line
            del self._outgoing[:sent]

    def _receive(self) -> None:
        """Take what the process reported so far, without waiting."""
        assert self._socket is not None
        while not self._closed_by_writer:
            try:
                data = self._socket.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._closed_by_writer = True
                return
            for line in _whole_lines(self._incoming, data):
                try:
                    self._take_report(orjson.loads(line))
                except Exception:  # a bad report must not stop the proxy (or its shutdown)
                    logger.exception("llm-mitm: could not read a report of the trace writer")

    def _take_report(self, report: dict[str, Any]) -> None:
        self._seen += report.get("seen", 0)
        for row in report.get("counts", ()):
            self.on_count(tuple(row))  # type: ignore[arg-type]
        self._answered = max(self._answered, report.get("synced", 0))

    def _receive_until(self, deadline: float, done: Callable[[], bool]) -> None:
        assert self._socket is not None
        self._receive()
        while not done() and not self._closed_by_writer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            select.select([self._socket], [], [], remaining)
            self._receive()

    def _lose(self, count: int, reason: str) -> None:
        """`count` queued lines will never be read."""
        self._queued -= count
        self._drop(reason, count)

    def _drop(self, reason: str, count: int = 1) -> None:
        first = self.dropped == 0
        self.dropped += count
        if first:
            logger.error("llm-mitm: TRACE LOST: %s (proxying goes on)", reason)


_CONTROL = (b'{"sync"', b'{"making"')  # how `collect` and `retune` lines start (orjson keeps key order)


def _whole_lines(buffer: bytearray, chunk: bytes | memoryview) -> list[bytes]:
    """Add what arrived to `buffer`; take out and return the lines it completes (looking
    for the last newline in the new bytes only: a long line is not searched again and again)."""
    buffer += chunk
    end = buffer.rfind(b"\n", len(buffer) - len(chunk))
    if end < 0:
        return []
    lines = bytes(buffer[:end]).split(b"\n")
    del buffer[: end + 1]
    return lines


def _line(snapshot: dict[str, Any]) -> bytes:
    """The snapshot as one JSON line. What orjson refuses (text that is not UTF-8, as a
    header with a stray byte decodes to; keys that are not strings; nesting deeper than
    it writes) costs that text its odd characters, or the bodies their contents (their
    sizes stay), never the record."""
    try:
        return orjson.dumps(snapshot)
    except TypeError:
        pass
    try:
        return orjson.dumps(_scrub(snapshot), option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, RecursionError):
        pass
    shallow = dict(snapshot)
    for side in ("request", "response"):
        size, kind, _ = shallow[side]
        if kind not in ("raw", "events"):  # bytes travel as strings: never too deep
            shallow[side] = [size, None, None]
    return orjson.dumps(_scrub(shallow), option=orjson.OPT_NON_STR_KEYS)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        try:  # the bytes mitmproxy decoded with surrogateescape; else lone surrogates as such
            data = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = value.encode("utf-8", "surrogatepass")
        return data.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_scrub(k) if isinstance(k, str) else k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _closing_at_exit(sink: weakref.ref[TraceSink]) -> Callable[[], None]:
    """An exit handler closing the sink if it is still there and open (a weak reference:
    the handler keeps no sink alive)."""

    def close() -> None:
        if (alive := sink()) is not None:
            alive.close(AT_EXIT_SECONDS)

    return close


def _serve(sock: socket.socket, settings: SinkSettings) -> None:
    """Child side: complete, build and write records until the parent closes its side;
    report the counts of deferred exchanges (and answer sync marks) after each read.
    It ends when the proxy closes its side (or is gone), not on a signal: Ctrl-C in a terminal
    and a service manager's SIGTERM reach the whole process group, and a writer that ended
    then lost the records still on their way to it, with a traceback on the console."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llm_mitm.redact import RedactingFilter
    from llm_mitm.stats import ShownModels
    from llm_mitm.trace import build_record, complete, count_row
    from llm_mitm.writer import Pending, TraceWriter

    making = _Making(settings.making())
    # What this process logs (a model without a price, named as upstream wrote it) goes to
    # mitmdump's stderr: redacted as the proxy's own log lines are.
    redacting = RedactingFilter(lambda: making.redactor)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    writer = TraceWriter(settings.destination, settings.directory, settings.max_bytes, settings.keep)
    models = ShownModels()

    def take(line: bytes, counts: list[CountRow], reports: list[bytes], batch: list[Pending]) -> None:
        message = orjson.loads(line)
        if "sync" in message:
            if counts:
                reports.append(orjson.dumps({"counts": counts}))
                counts.clear()
            reports.append(orjson.dumps({"synced": message["sync"]}))
            return
        if "making" in message:
            making.retune(message["making"])
            return
        redactor, bodies = making.for_call(message["started_at"])
        if message["deferred"]:
            complete(message, making.metering, redactor)
            counts.append(count_row(message, redactor, models))
        # A body too deep for orjson to write costs the record its bodies, not the record.
        batch.append((lambda: build_record(message, redactor, bodies), lambda: build_record(message, redactor, "metadata")))

    pending = bytearray()
    # Read into one buffer, kept: `recv(n)` allocates n bytes per call, and at 1 MB that is
    # a fresh mapping, faulted in and unmapped each time (80 us a call, measured; a round
    # of records often arrives in several reads).
    incoming = memoryview(bytearray(READ_BUFFER))
    reporting = True
    try:
        with sock:
            while received := sock.recv_into(incoming):
                lines = _whole_lines(pending, incoming[:received])  # a torn last record (the parent died mid-send) stays behind
                if not lines:
                    continue
                counts: list[CountRow] = []
                reports: list[bytes] = []
                batch: list[Pending] = []
                for line in lines:
                    try:
                        take(line, counts, reports, batch)
                    except Exception:  # noqa: BLE001 - one bad line must not stop the writer
                        writer.stats.render_failed += 1
                        logger.exception("llm-mitm: a trace could not be completed")
                try:
                    reports.append(orjson.dumps({"counts": counts, "seen": len(lines)}))
                except TypeError:  # a count orjson cannot write: the lines are still seen
                    logger.exception("llm-mitm: counts could not be reported")
                    reports.append(orjson.dumps({"seen": len(lines)}))
                if reporting:
                    try:
                        sock.sendall(b"\n".join(reports) + b"\n")
                    except OSError:  # the proxy stopped listening: its records still get written
                        reporting = False
                writer.write(batch)
    except OSError:
        pass
    finally:
        writer.close()


class _Making:
    """Child side: how records are made now (`SinkSettings.making`), changed in place. A
    call admitted before a change ends after it: its record is made as it was admitted
    (redaction, bodies), as "a good edit applies to the next call" says (a review: a pattern
    taken out while a call was under way left its secret in that call's trace)."""

    def __init__(self, making: dict[str, Any]) -> None:
        from llm_mitm.metering import Metering
        from llm_mitm.pricing import PriceTable

        self.metering = Metering(PriceTable(), making["estimate_missing"])
        self.redactor: Redactor | None = None
        self.bodies = making["bodies"]
        # (since, redactor, bodies) of the edits before this one, newest last: a call is made
        # as the one in force when it started (a review: two edits in a row lost the first)
        self._earlier: list[tuple[float, Redactor, str]] = []
        self._since = 0.0
        self.retune(making)

    def for_call(self, started_at: float) -> tuple[Redactor, str]:
        """The redactor and bodies mode of a call that started at `started_at`."""
        assert self.redactor is not None
        if started_at >= self._since or not self._earlier:
            return self.redactor, self.bodies
        for since, redactor, bodies in reversed(self._earlier):
            if started_at >= since:
                return redactor, bodies
        return self._earlier[0][1:]  # before every edit kept: the oldest kept

    def retune(self, making: dict[str, Any]) -> None:
        from llm_mitm.pricing import PriceTable
        from llm_mitm.redact import Redactor

        if self.redactor is not None and "since" in making:
            self._earlier = [*self._earlier[-(_EDITS_KEPT - 1):], (self._since, self.redactor, self.bodies)]
            self._since = making["since"]
        self.bodies = making["bodies"]
        self.redactor = Redactor(**making["redaction"])
        prices = {name: ModelPrice.model_validate(price) for name, price in making["prices"].items()}
        self.metering.reprice(PriceTable(prices), making["estimate_missing"])
