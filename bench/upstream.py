"""A fast fake LLM upstream for the benchmark: asyncio, HTTP/1.1 keep-alive, TLS.

Fast so that it is never what the benchmark measures. Routes (POST or GET):
  /v1/chat/completions        an OpenAI chat completion (~0.6 KB, with usage);
                              with "stream": true in the body, SSE events
  /big                        a 1 MB JSON response
Stream knobs are headers: x-events (count, default 20), x-delay-ms (between events).
A stream says when the request arrived (`x-received-ns`) and when its first event left (an
SSE comment, `: sent-ns N`, which clients skip), on the clock every local process shares
(`perf_counter_ns`: CLOCK_MONOTONIC): the benchmark times each way through a proxy apart
from this server's own wait before the event, whose timer overshoots by a varying amount.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import orjson

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 6},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 512, "completion_tokens": 60, "total_tokens": 572},
    }
)
BIG = orjson.dumps({"data": ["x" * 1000] * 1024})
_CHUNK = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":"token "},"finish_reason":null}]}\n\n'
_USAGE = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}\n\n'


class Upstream:
    def __init__(self, cert: str | None = None, key: str | None = None) -> None:
        self.context: ssl.SSLContext | None = None
        if cert:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(cert, key)
        self.port = 0
        self.requests = 0

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context, backlog=512)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                received = time.perf_counter_ns()
                self.requests += 1
                if path.startswith("/big"):
                    writer.write(_head(200, "application/json", len(BIG)) + BIG)
                elif b'"stream":true' in body.replace(b" ", b""):
                    await self._stream(writer, headers, b'"include_usage":true' in body.replace(b" ", b""), received)
                else:
                    writer.write(_head(200, "application/json", len(COMPLETION)) + COMPLETION)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, headers: dict[str, str], usage: bool, received: int) -> None:
        events = int(headers.get("x-events", 20))
        delay = int(headers.get("x-delay-ms", 0)) / 1000
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"x-received-ns: %d\r\ntransfer-encoding: chunked\r\n\r\n" % received
        )
        for number in range(events):
            if delay:
                await writer.drain()
                await asyncio.sleep(delay)
            writer.write(_chunked(b": sent-ns %d\n%s" % (time.perf_counter_ns(), _CHUNK) if number == 0 else _CHUNK))
        if usage:
            writer.write(_chunked(_USAGE))
        writer.write(_chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _head(status: int, kind: str, length: int) -> bytes:
    return f"HTTP/1.1 {status} OK\r\ncontent-type: {kind}\r\ncontent-length: {length}\r\n\r\n".encode()


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _main(cert: str, key: str) -> None:
    upstream = await Upstream(cert, key).start()
    print(upstream.port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import sys

    asyncio.run(_main(sys.argv[1], sys.argv[2]))
