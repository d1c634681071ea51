"""A local HTTPS server that answers like OpenAI, Azure OpenAI and Anthropic.

It streams SSE events with real delays between them, compresses when asked, and
records every request it receives so tests can check what reached "upstream".

Test knobs are request headers (clients send them with `extra_headers`):
  x-fake-delay-ms   pause before each streamed event
  x-fake-encoding   gzip | br | zstd | deflate: compress the response, chunk by chunk
  x-fake-echo       reply with the last user text instead of the canned reply
  x-fake-status     answer with this HTTP status and an API-shaped error body
  x-fake-fail       "reset-mid-stream": drop the connection after two events (or
                    x-fake-fail-at events); "stall-mid-stream": go silent after two
                    events; "linger-after-end": send every event, then wait 2 s before
                    ending the response (a client that leaves after the last event goes first)
  x-fake-split      cut each streamed event into chunks of this many bytes
  x-fake-stream-type  the content type of a stream ("none": no such header), as a
                    misconfigured OpenAI-compatible server (or a proxy before it) sends it
  x-fake-sized      send a stream whole with a Content-Length, not in chunks
  x-fake-stored-status  the status of a stored response read back (`queued`: still underway)
  x-fake-ignore-stream  answer a chat call that asks for a stream whole, as JSON
  x-fake-json-type  the content type of a JSON answer ("none": no such header)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import multipart
import orjson

from llm_mitm.compat import stdlib_zstd, zstandard

CANNED_REPLY = "Hello from the fake provider."
RESPONSE_MODEL = "gpt-4o-2024-08-06"
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "cached": 2, "reasoning": 1}
GEMINI_MODEL = "gemini-2.5-flash"
GEMINI_USAGE = {"promptTokenCount": 9, "candidatesTokenCount": 6, "thoughtsTokenCount": 3, "cachedContentTokenCount": 4, "totalTokenCount": 18}


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    sent: bytearray = field(default_factory=bytearray)  # response body as written (after any compression)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


class _Server(ThreadingHTTPServer):
    """Each connection's TLS handshake is made in that connection's own thread. Made on the
    listening socket (`wrap_socket` of it), `accept` shook hands in the one loop that accepts
    every connection: a client connected but not yet saying hello (mitmproxy's upstream
    connection before its ClientHello, a client of another test late or stopped) held up
    every other, without end. A realtime client then never got its WebSocket answer, and
    hung (tests/test_reliability.py: ...slow_to_say_hello...)."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except OSError:  # a client that gave up or spoke no TLS: no request, as before
            return
        try:
            super().finish_request(request, client_address)
        finally:  # as socketserver ends a connection (the plain socket it holds is detached)
            self.shutdown_request(request)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


@dataclass
class FakeProvider:
    """Start with `start()`; `port`, `requests` and `stop()` are what tests use."""

    cert_path: str | None = None
    key_path: str | None = None
    host: str = "127.0.0.1"
    requests: list[Received] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # uploaded files by id, as the Files API keeps them
    websocket_messages: list[bytes] = field(default_factory=list)  # text messages a realtime client sent
    connections: int = 0
    port: int = 0

    def start(self) -> FakeProvider:
        provider = self

        class Handler(_Handler):
            fake = provider

        self._server = (_IPv6Server if ":" in self.host else _Server)((self.host, 0), Handler)
        if self.cert_path:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert_path, self.key_path)
            self._server.tls = context
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def clear(self) -> None:
        self.requests.clear()


class _Encoder:
    """Compresses a response piece by piece so each piece can be decoded on arrival."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "gzip":
            obj = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
            self._compress, self._flush = obj.compress, lambda: obj.flush(zlib.Z_SYNC_FLUSH)
            self._end = obj.flush
        elif name == "deflate":
            obj = zlib.compressobj()
            self._compress, self._flush, self._end = obj.compress, lambda: obj.flush(zlib.Z_SYNC_FLUSH), obj.flush
        elif name == "br":
            import brotli

            br = brotli.Compressor()
            self._compress, self._flush, self._end = br.process, br.flush, br.finish
        elif name == "zstd":
            self._compress, self._flush, self._end = _zstd_compressor()
        else:
            self._compress, self._flush, self._end = (lambda d: d), (lambda: b""), (lambda: b"")

    def piece(self, data: bytes) -> bytes:
        return self._compress(data) + self._flush()

    def end(self) -> bytes:
        return self._end()


def _zstd_compressor():  # type: ignore[no-untyped-def]
    zstd = stdlib_zstd()
    if zstd is not None:
        comp = zstd.ZstdCompressor()
        return comp.compress, (lambda: comp.flush(zstd.ZstdCompressor.FLUSH_BLOCK)), (lambda: comp.flush())
    module = zstandard()
    obj = module.ZstdCompressor().compressobj()
    return obj.compress, (lambda: obj.flush(module.COMPRESSOBJ_FLUSH_BLOCK)), obj.flush


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeProvider

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        self.fake.connections += 1
        super().setup()

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.received = Received(self.command, self.path, list(self.headers.items()), body)
        self.fake.requests.append(self.received)
        path = urlsplit(self.path).path
        request: dict[str, Any] = {}
        if body and "json" in (self.headers.get("content-type") or ""):
            try:
                request = orjson.loads(gzip.decompress(body) if self.headers.get("content-encoding") == "gzip" else body)
            except (orjson.JSONDecodeError, OSError):
                return self._json(400, {"error": {"message": "bad json", "type": "invalid_request_error"}})
        if (self.headers.get("upgrade") or "").lower() == "websocket":
            return self._websocket_echo()
        if self.headers.get("x-fake-status"):
            return self._error(int(self.headers["x-fake-status"]), path, request)
        if path.endswith("/cachedContents") and self.command == "POST":  # a Gemini cache made: its name, as Google gives it
            made = hashlib.sha256(body).hexdigest()[:12]
            return self._json(200, {"name": f"cachedContents/{made}", "model": request.get("model"), "expireTime": "2030-01-01T00:00:00Z"})
        if path.endswith((":generateContent", ":streamGenerateContent")):  # Gemini's own API, as gateways pass it through
            return self._gemini(path.endswith(":streamGenerateContent"))
        if "/publishers/anthropic/models/" in path and path.lower().endswith((":rawpredict", ":streamrawpredict")):  # Claude on Vertex AI
            return self._anthropic({**request, "stream": path.lower().endswith(":streamrawpredict")})
        if "/publishers/" in path and path.lower().endswith((":rawpredict", ":streamrawpredict")):  # Mistral's, AI21's on Vertex AI: a chat
            streams = path.lower().endswith(":streamrawpredict")  # whose stream ends with its usage, asked or not
            return self._chat({**request, "stream": streams, **({"stream_options": {"include_usage": True}} if streams else {})})
        if path.endswith("/models"):
            return self._json(200, {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})
        if path.endswith("/embeddings"):
            return self._json(200, _embedding(request))
        if path.endswith("/files"):  # an upload, as OpenAI answers it
            file_id = f"file-{hashlib.sha256(body).hexdigest()[:12]}"
            self.fake.files[file_id] = _uploaded(body, self.headers.get("content-type") or "")
            return self._json(200, {"id": file_id, "object": "file", "bytes": len(body),
                                    "created_at": 0, "filename": "calls.jsonl", "purpose": "batch", "status": "processed"})
        if path.endswith("/content") and "/files/" in path:
            if not (self.headers.get("authorization") or self.headers.get("api-key")):
                return self._json(401, {"error": {"message": "no key", "type": "invalid_request_error"}})
            content = self.fake.files.get(unquote(path.split("/")[-2]))
            if content is None:
                return self._json(404, {"error": {"message": f"No such File object: {path.split('/')[-2]}", "type": "invalid_request_error"}})
            return self._send(200, [("content-type", "application/octet-stream")], content)
        if path.lower().endswith("/batches"):
            return self._json(200, {"id": "batch_1", "object": "batch", "endpoint": request.get("endpoint"), "input_file_id": request.get("input_file_id"),
                                    "completion_window": "24h", "status": "validating", "created_at": 0})
        if "/evals/" in path and path.endswith("/runs"):  # an eval run started, as OpenAI answers it
            return self._json(200, {"id": "evalrun_1", "object": "eval.run", "eval_id": path.split("/")[-2], "status": "queued",
                                    "name": request.get("name"), "data_source": request.get("data_source"), "created_at": 0})
        if path.endswith("/audio/transcriptions"):  # an upload: the answer tells uploads apart
            return self._json(200, {"text": f"transcript of {hashlib.sha256(body).hexdigest()[:12]}"})
        if path.endswith("/chat/completions"):
            return self._chat(request)
        if path.endswith("/responses"):
            return self._responses(request)
        if "/responses/" in path:  # a stored response read back (or cancelled): as it was made, or as it stands (x-fake-stored-status)
            state = {"status": self.headers["x-fake-stored-status"]} if self.headers.get("x-fake-stored-status") else {}
            return self._json(200, {**_stored_response(), "id": path.split("/responses/")[1].split("/")[0], **state})
        if path.endswith("/messages"):
            return self._anthropic(request)
        if path.endswith("/v1/complete"):
            return self._anthropic_completion(request)
        if path == "/":
            return self._send(200, [("content-type", "text/plain")], b"not an LLM server")
        return self._json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})

    # ------------------------------------------------------------------ replies

    def _reply_text(self, request: dict[str, Any]) -> str:
        if not self.headers.get("x-fake-echo"):
            return CANNED_REPLY
        return _last_user_text(request) or ""

    def _gemini(self, stream: bool) -> None:
        """Gemini's answer: whole, or (`alt=sse`) a response per event, the last with the
        candidate's finishReason and the whole usage."""
        head = {"modelVersion": GEMINI_MODEL, "responseId": "gemini-fake"}
        if not stream:
            return self._json(200, {"candidates": [{"content": {"parts": [{"text": CANNED_REPLY}], "role": "model"}, "finishReason": "STOP", "index": 0}],
                                    "usageMetadata": GEMINI_USAGE, **head})
        pieces = _pieces(CANNED_REPLY, 6)
        events: list[tuple[str | None, Any]] = [(None, {"candidates": [{"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0,
                                                                        **({"finishReason": "STOP"} if n == len(pieces) - 1 else {})}],
                                                        "usageMetadata": GEMINI_USAGE if n == len(pieces) - 1 else {"promptTokenCount": 9}, **head})
                                                for n, piece in enumerate(pieces)]
        if "alt=sse" in self.path:
            return self._stream(events)
        # without alt=sse: a JSON array, written out a response at a time
        delay = int(self.headers.get("x-fake-delay-ms") or 0) / 1000
        self.send_response(200)
        self.send_header("content-type", "application/json; charset=UTF-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for n, (_, payload) in enumerate(events):
            if delay:
                time.sleep(delay)
            self._chunk((b"[" if n == 0 else b",\r\n") + orjson.dumps(payload))
        self._chunk(b"]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chat(self, request: dict[str, Any]) -> None:
        text = self._reply_text(request)
        tools = bool(request.get("tools"))
        deployment = "/deployments/" in self.path  # Azure names the model behind the deployment
        model = RESPONSE_MODEL if deployment or request.get("model") == "gpt-4o" else request.get("model", "")
        usage = _openai_usage()
        if not request.get("stream") or self.headers.get("x-fake-ignore-stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None if tools else text, "refusal": None}
            if tools:
                message["tool_calls"] = [_tool_call()]
            return self._json(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}],
                    "usage": usage,
                },
            )
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model}
        events: list[dict[str, Any]] = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        if tools:
            call = _tool_call()
            args = call["function"]["arguments"]
            events.append({**head, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}]}, "finish_reason": None}]})
            for piece in _pieces(args, 3):
                events.append({**head, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "finish_reason": None}]})
        else:
            for piece in _pieces(text, 6):
                events.append({**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if tools else "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events = [{**event, "usage": None} for event in events]  # as OpenAI sends them: every chunk says it has none
            events.append({**head, "choices": [], "usage": usage})
        self._stream([(None, e) for e in events] + [(None, "[DONE]")])

    def _responses(self, request: dict[str, Any]) -> None:
        final = _stored_response(self._reply_text(request))
        item = final["output"][0]
        text = item["content"][0]["text"]
        if not request.get("stream"):
            return self._json(200, final)
        started = {**final, "status": "in_progress", "output": [], "usage": None}
        events: list[tuple[str | None, Any]] = [
            ("response.created", {"type": "response.created", "sequence_number": 0, "response": started}),
            ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1, "response": started}),
            ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0, "item": {**item, "status": "in_progress", "content": []}}),
        ]
        for piece in _pieces(text, 5):
            events.append(("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": len(events), "item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": piece}))
        events.append(("response.output_item.done", {"type": "response.output_item.done", "sequence_number": len(events), "output_index": 0, "item": item}))
        events.append(("response.completed", {"type": "response.completed", "sequence_number": len(events), "response": final}))
        self._stream(events)

    def _anthropic(self, request: dict[str, Any]) -> None:
        text = self._reply_text(request)
        usage = {"input_tokens": 9, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0, "output_tokens": 6}
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not request.get("stream"):
            return self._json(200, message)
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ]
        for piece in _pieces(text, 5):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._stream(events)

    def _anthropic_completion(self, request: dict[str, Any]) -> None:
        """Anthropic's legacy Text Completions (`/v1/complete`), which refuses fields it does not know."""
        if "stream_options" in request:
            return self._json(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "stream_options: Extra inputs are not permitted"}})
        text = f"{CANNED_REPLY} {request.get('prompt', '')[-40:]}"
        answer = {"type": "completion", "id": "compl_fake", "completion": text, "stop_reason": "stop_sequence", "model": request.get("model"), "stop": None}
        if not request.get("stream"):
            return self._json(200, answer)
        events: list[tuple[str | None, Any]] = [("completion", {**answer, "completion": piece, "stop_reason": None}) for piece in _pieces(text, 3)]
        self._stream([*events, ("ping", {"type": "ping"}), ("completion", {**answer, "completion": ""})])

    def _error(self, status: int, path: str, request: dict[str, Any]) -> None:
        message = f"fake error {status}"
        if self.headers.get("x-fake-echo"):  # like an API quoting the bad input back
            message += f": {self._reply_text(request)}"
        if path.endswith("/messages"):
            body = {"type": "error", "error": {"type": "rate_limit_error" if status == 429 else "api_error", "message": message}}
        else:
            body = {"error": {"message": message, "type": "server_error", "code": None, "param": None}}
        self._json(status, body)

    def _websocket_echo(self) -> None:
        """Like the Realtime API's socket, minimally: accept, then echo each text message
        (each one kept in `fake.websocket_messages`) until the client closes."""
        import base64
        import hashlib

        key = self.headers["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while (frame := self._read_frame()) is not None:
            opcode, payload = frame
            if opcode == 0x8:  # close: answered, and done
                self._write_frame(0x8, payload[:2])
                return
            if opcode == 0x1:
                self.fake.websocket_messages.append(payload)
                event = orjson.loads(payload) if payload.startswith(b"{") and b'"response.create"' in payload else None
                if isinstance(event, dict) and event.get("type") == "response.create":  # the model answers: its turn begins
                    response = {"id": "resp_fake", **(event.get("response") or {})}
                    self._write_frame(0x1, orjson.dumps({"type": "response.created", "event_id": "event_fake", "response": response}))
                else:
                    self._write_frame(0x1, payload)

    def _read_frame(self) -> tuple[int, bytes] | None:
        """One whole client frame (masked, unfragmented), or None at the end of the stream."""
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        length = head[1] & 0x7F
        if length >= 126:
            length = int.from_bytes(self.rfile.read(2 if length == 126 else 8), "big")
        mask = self.rfile.read(4)
        data = self.rfile.read(length)
        return head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        length = bytes([size]) if size < 126 else bytes([126]) + size.to_bytes(2, "big") if size < 1 << 16 else bytes([127]) + size.to_bytes(8, "big")
        self.wfile.write(bytes([0x80 | opcode]) + length + payload)
        self.wfile.flush()

    # ------------------------------------------------------------------ wire

    def _json(self, status: int, payload: Any) -> None:
        body = orjson.dumps(payload)
        content_type = self.headers.get("x-fake-json-type") or "application/json"
        headers = [("content-type", content_type)] if content_type != "none" else []
        encoding = self.headers.get("x-fake-encoding") or ("gzip" if "gzip" in (self.headers.get("accept-encoding") or "") else "")
        if encoding:
            encoder = _Encoder(encoding)
            body = encoder.piece(body) + encoder.end()
            headers.append(("content-encoding", encoding))
        self._send(status, headers, body)

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, events: list[tuple[str | None, Any]]) -> None:
        delay = int(self.headers.get("x-fake-delay-ms") or 0) / 1000
        encoding = self.headers.get("x-fake-encoding") or ""
        encoder = _Encoder(encoding)
        fail = self.headers.get("x-fake-fail")
        split = int(self.headers.get("x-fake-split") or 0)
        self.send_response(200)
        content_type = self.headers.get("x-fake-stream-type") or "text/event-stream; charset=utf-8"
        if content_type != "none":
            self.send_header("content-type", content_type)
        if self.headers.get("x-fake-sized"):
            whole = b"".join((f"data: {e if isinstance(e, str) else orjson.dumps(e).decode()}\n\n").encode() for _, e in events)
            self.send_header("content-length", str(len(whole)))
            self.end_headers()
            self.received.sent += whole
            self.wfile.write(whole)
            self.wfile.flush()
            return
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        if encoding:
            self.send_header("content-encoding", encoding)
        self.end_headers()
        for number, (name, payload) in enumerate(events):
            if delay:
                time.sleep(delay)
            if fail == "stall-mid-stream" and number == 2:
                time.sleep(8)  # upstream goes silent; the client gives up first
                return
            if fail == "reset-mid-stream" and number == int(self.headers.get("x-fake-fail-at") or 2):
                self.wfile.flush()
                self.connection.shutdown(2)
                self.close_connection = True
                return
            data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
            text = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
            piece = encoder.piece(text.encode())
            for start in range(0, len(piece), split or len(piece) or 1):  # events cut across chunks
                self._chunk(piece[start : start + (split or len(piece))])
        self._chunk(encoder.end())
        if fail == "linger-after-end":
            time.sleep(2)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.received.sent += data
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()


def _uploaded(body: bytes, content_type: str) -> bytes:
    """The file of a Files API upload (multipart/form-data)."""
    _, params = multipart.parse_options_header(content_type)
    return next((part.raw for part in multipart.MultipartParser(io.BytesIO(body), params["boundary"]) if part.name == "file"), b"")


def _pieces(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // count))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _stored_response(text: str = CANNED_REPLY) -> dict[str, Any]:
    """A finished Responses API answer, as made and as read back."""
    usage = {
        "input_tokens": USAGE["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": USAGE["cached"]},
        "output_tokens": USAGE["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": USAGE["reasoning"]},
        "total_tokens": USAGE["prompt_tokens"] + USAGE["completion_tokens"],
    }
    item = {"id": "msg_fake", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {"id": "resp_fake", "object": "response", "created_at": 1_700_000_000, "status": "completed",
            "model": RESPONSE_MODEL, "output": [item], "usage": usage}


def _tool_call() -> dict[str, Any]:
    return {
        "id": "call_fake",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }


def _openai_usage() -> dict[str, Any]:
    return {
        "prompt_tokens": USAGE["prompt_tokens"],
        "completion_tokens": USAGE["completion_tokens"],
        "total_tokens": USAGE["prompt_tokens"] + USAGE["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": USAGE["cached"]},
        "completion_tokens_details": {"reasoning_tokens": USAGE["reasoning"]},
    }


def _embedding(request: dict[str, Any]) -> dict[str, Any]:
    inputs = request.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(count)],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }


def _last_user_text(request: dict[str, Any]) -> str | None:
    if isinstance(request.get("input"), str):
        return request["input"]
    for message in reversed(request.get("messages") or request.get("input") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None
