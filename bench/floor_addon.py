"""The least an addon doing llm-mitm's job in the benchmark can do on mitmproxy's loop: a
reference for `bench.ab` and `bench.instructions` ("floor"), not a product.

For the benchmark's call it does what llm-mitm's config asks there, the short way: parse
the body once (orjson), check the model, the output limit and the forbidden phrases, keep
what a trace needs (times, headers, both bodies as they came), and every 50 ms serialise
the round and hand it over a socket to a child process, which throws it away. No
providers, no exchange record, no redaction, no costs, no error handling: what llm-mitm
spends beyond this is what its generality and its guarantees cost on the loop.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from typing import Any

import orjson
from mitmproxy import hooks, http

ROUND_SECONDS = 0.05
PHRASES = (("", "ignore previous instructions"), ("system", "you are dan"))  # the benchmark's forbidden_instructions
MAX_TOKENS = 4096
# The reader: a process that takes the rounds and keeps nothing (llm-mitm's writer writes them).
DRAIN = "import sys\nbuffer = bytearray(1 << 20)\nwhile sys.stdin.buffer.raw.readinto(buffer):\n    pass\n"


class Floor:
    def __init__(self) -> None:
        self.kept: list[tuple[Any, ...]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.socket: socket.socket | None = None
        self.reader: subprocess.Popen[bytes] | None = None

    def running(self) -> None:
        ours, theirs = socket.socketpair()
        self.reader = subprocess.Popen([sys.executable, "-c", DRAIN], stdin=theirs)
        theirs.close()
        ours.setblocking(False)
        self.socket = ours

    def done(self) -> None:
        if self.socket is not None:
            self.socket.close()
        if self.reader is not None:
            self.reader.wait(5)

    def request(self, flow: http.HTTPFlow) -> None:
        body = orjson.loads(flow.request.raw_content or b"{}")
        model = body.get("model")
        refused = not (isinstance(model, str) and model.startswith("gpt-4o"))
        limit = body.get("max_tokens")
        refused = refused or (isinstance(limit, int) and limit > MAX_TOKENS)
        for message in body.get("messages", ()):
            content = message.get("content")
            if isinstance(content, str):
                text = content.lower()
                refused = refused or any(phrase in text for role, phrase in PHRASES if role in ("", message.get("role")))
        if refused:
            flow.response = http.Response.make(403, b'{"error": "refused"}', {"content-type": "application/json"})
        flow.metadata["floor"] = (time.time(), model)

    def response(self, flow: http.HTTPFlow) -> None:
        kept = flow.metadata.get("floor")
        if kept is None or flow.response is None:
            return
        request, response = flow.request, flow.response
        self.kept.append((*kept, request.headers.fields, request.raw_content, response.status_code, response.headers.fields, response.raw_content))
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(ROUND_SECONDS, self.hand_over)

    def hand_over(self) -> None:
        self.timer = None
        lines = [
            orjson.dumps({
                "started_at": started, "model": model, "status_code": status,
                "request_headers": _text(request_headers), "request": orjson.Fragment(request) if request else None,
                "response_headers": _text(response_headers), "response": response.decode("latin-1") if response else None,
            })
            for started, model, request_headers, request, status, response_headers, response in self.kept
        ]
        self.kept.clear()
        if self.socket is not None and lines:
            try:
                self.socket.send(b"\n".join(lines) + b"\n")
            except BlockingIOError:  # the reader is behind: the round is dropped (llm-mitm keeps it)
                pass


def _text(fields: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    return [(key.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for key, value in fields]


addons = [Floor()]
globals().update({name: None for name in hooks.all_hooks if name not in globals() and name != "add_log"})
