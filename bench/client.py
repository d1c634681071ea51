"""A small keep-alive HTTP/1.1 load client with nanosecond timing, through a proxy or not.

One CONNECT (and one TLS handshake) per connection, then requests back to back, as the
SDKs do. For streams it timestamps every chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Target:
    host: str  # the name the client asks for (SNI, Host)
    port: int
    tls: bool
    proxy: tuple[str, int] | None = None  # forward proxy: CONNECT through it
    connect_to: tuple[str, int] | None = None  # where the TCP connection goes when direct
    ca: str | None = None


@dataclass
class Result:
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    warm_ups: int = 0  # untimed first calls, one per connection, on top of `requests`
    marks: tuple[Any, Any] | None = None  # `load`'s `on_clock` read as the clock started and stopped

    @property
    def calls(self) -> int:
        return len(self.latencies_ns) + self.warm_ups


@dataclass
class Streamed:
    """A streamed answer: its chunks' arrival times, and when the upstream (`bench.upstream`)
    had the request and sent its first event, where it says so (perf_counter_ns: the
    clock all local processes share)."""

    status: int
    arrivals: list[int] = field(default_factory=list)
    received_ns: int | None = None
    first_sent_ns: int | None = None


_FIRST_SENT = re.compile(rb"^: sent-ns (\d+)$", re.M)


class Connection:
    def __init__(self, target: Target) -> None:
        self.target = target

    async def open(self) -> None:
        t = self.target
        address = t.proxy or t.connect_to or (t.host, t.port)
        self.reader, self.writer = await asyncio.open_connection(*address)
        if t.proxy and t.tls:
            self.writer.write(f"CONNECT {t.host}:{t.port} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n\r\n".encode())
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head[:80])
        if t.tls:
            context = ssl.create_default_context(cafile=t.ca)
            await self.writer.start_tls(context, server_hostname=t.host)

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        t = self.target
        target = path if not (t.proxy and not t.tls) else f"http://{t.host}:{t.port}{path}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {t.host}", f"Content-Length: {len(body)}", "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        self.writer.write(self._request(method, path, body, headers or {}))
        await self.writer.drain()
        status, response_headers = await self._head()
        return status, await self._body(response_headers)

    async def stream(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Streamed:
        """Send, then note the arrival time (perf_counter_ns) of every body chunk."""
        self.writer.write(self._request("POST", path, body, headers or {}))
        await self.writer.drain()
        status, response_headers = await self._head()
        streamed = Streamed(status, received_ns=int(response_headers.get("x-received-ns", 0)) or None)
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return streamed
            chunk = await self.reader.readexactly(size + 2)
            streamed.arrivals.append(time.perf_counter_ns())
            if len(streamed.arrivals) == 1 and (stamp := _FIRST_SENT.search(chunk)):
                streamed.first_sent_ns = int(stamp[1])

    async def _head(self) -> tuple[int, dict[str, str]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return int(lines[0].split(" ", 2)[1]), headers

    async def _body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append((await self.reader.readexactly(size + 2))[:-2])

    def close(self) -> None:
        if hasattr(self, "writer"):  # opened, or half opened
            self.writer.close()


async def load(target: Target, concurrency: int, requests: int, method: str, path: str, body: bytes, headers: dict[str, str] | None = None,
               rate: float | None = None, on_clock: Callable[[], Any] | None = None) -> Result:
    """`requests` calls spread over `concurrency` keep-alive connections. The clock
    starts once every connection is open and has made one call of its own (untimed):
    handshakes are not what this measures, and a proxy that connects upstream lazily, at
    a connection's first request (llm-mitm does; bare mitmdump connects at CONNECT), would
    otherwise pay its upstream handshakes inside the clock and the other one outside it.

    Without `rate` each connection sends its next call as soon as the last is answered (a
    closed loop: at a saturated proxy the latency is then the queue, concurrency over
    throughput). With `rate`, call i is due at i / rate seconds from the start, whatever
    came back (an open loop). A call that had to wait for a free connection counts its
    latency from when it was due: it waited behind the proxy's earlier answers. One sent
    on time counts from when it went: the event loop's timer wakes up to a millisecond
    late, and that lateness is the client's. `on_clock` is read as the clock starts and as
    it stops (`Result.marks`): say, a proxy's CPU time for the timed calls alone."""
    result = Result()
    counter = iter(range(requests))
    start = 0.0
    limit = asyncio.Semaphore(64)  # handshakes at once

    async def opened() -> Connection | None:
        """A connection that has made its untimed first call; None if it could not (an
        error counted): the other connections go on."""
        connection = Connection(target)
        try:
            async with limit:
                await connection.open()
                await connection.request(method, path, body, headers)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            result.errors += 1
            connection.close()
            return None
        result.warm_ups += 1
        return connection

    async def worker(connection: Connection) -> None:
        try:
            for call in counter:
                if rate is None:
                    started = time.perf_counter_ns()
                else:
                    due = start + call / rate
                    if (wait := due - time.perf_counter()) > 0:  # on time: the clock starts as it goes
                        await asyncio.sleep(wait)  # (the loop wakes up to 1 ms late: the client's, not the proxy's)
                        started = time.perf_counter_ns()
                    else:  # it waited for a connection, behind earlier calls: that wait counts
                        started = int(due * 1e9)
                try:
                    status, _ = await connection.request(method, path, body, headers)
                except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                    result.errors += 1
                    connection.close()
                    if (reopened := await opened()) is None:
                        return
                    connection = reopened
                    continue
                result.latencies_ns.append(time.perf_counter_ns() - started)
                if status != 200:
                    result.errors += 1
        finally:
            connection.close()

    connections = [c for c in await asyncio.gather(*(opened() for _ in range(concurrency))) if c is not None]
    first_mark = on_clock() if on_clock is not None else None
    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    result.wall_s = time.perf_counter() - start
    if on_clock is not None:
        result.marks = (first_mark, on_clock())
    return result
