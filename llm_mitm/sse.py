"""Incremental server-sent events: split bytes into events, rebuild the streamed message.

The proxy forwards every chunk untouched and feeds a copy here, or holds the chunks for the
trace writer process to feed here. Chunk boundaries are not event boundaries, so the
decoder keeps the unfinished line; every piece of work is proportional to the chunk, never
to the stream so far.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from llm_mitm.compat import stdlib_zstd, zstandard
from llm_mitm.providers import shapes_of

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass(slots=True)  # not frozen: a frozen dataclass costs twice as much to make, once per event
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Bytes in, complete events out (the WHATWG event-stream rules)."""

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if not chunk:
            return []
        self._skip_lf = chunk.endswith(b"\r")
        if not self._partial and not self._data and not self._event and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            return self._whole_events(chunk)
        if b"\n" not in chunk and b"\r" not in chunk:
            self._partial.append(chunk)
            return []
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
        lines = chunk.split(b"\n") if b"\r" not in chunk else _LINE_BREAK.split(chunk)
        tail = lines.pop()
        if tail:
            self._partial.append(tail)
        events: list[ServerSentEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _whole_events(self, chunk: bytes) -> list[ServerSentEvent]:
        """The usual chunk, with nothing held from before: whole events, LF line ends, most
        of them one `data:` line, which needs no line-by-line walk."""
        events: list[ServerSentEvent] = []
        for block in chunk.split(b"\n\n"):
            if block.startswith(b"data:") and b"\n" not in block:
                value = block[6:] if block.startswith(b"data: ") else block[5:]
                events.append(ServerSentEvent("message", value.decode("utf-8", "replace")))
            elif block:  # any other event: its lines, then the blank line that ends it
                for line in block.split(b"\n"):
                    self._line(line)
                event = self._line(b"")
                if event is not None:
                    events.append(event)
        return events

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: a last event without its blank line still counts."""
        events: list[ServerSentEvent] = []
        if self._partial:
            event = self._line(b"".join(self._partial))
            self._partial = []
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: bytes) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event = ""
            self._data = []
            return event
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None


def incremental_decoder(content_encoding: str) -> Callable[[bytes], bytes] | None:
    """A chunk-by-chunk decompressor for a Content-Encoding, identity when empty.

    Returns None for an encoding we cannot decode (the stream still passes untouched).
    """
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda data: data
    if encoding in ("gzip", "x-gzip"):  # a member each flush, some servers: read them all, as gzip.decompress does
        return _MultiFrame(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)).decompress
    if encoding == "deflate":
        return _DeflateDecoder().decompress
    if encoding == "br":
        import brotli

        return brotli.Decompressor().process
    if encoding == "zstd":
        return _zstd_decompressor()
    return None


class _DeflateDecoder:
    """`deflate` is zlib-wrapped by the RFC but raw in practice; accept both."""

    def __init__(self) -> None:
        self._obj: Any = None
        self._head = b""  # the first byte, when a chunk of one came first: the zlib header is two

    def decompress(self, data: bytes) -> bytes:
        if self._obj is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            wrapped = (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return self._obj.decompress(data)


def _zstd_decompressor() -> Callable[[bytes], bytes] | None:
    zstd = stdlib_zstd()
    if zstd is not None:
        return _MultiFrame(zstd.ZstdDecompressor).decompress
    module = zstandard()  # read across frames, as mitmproxy's own zstd decoding does
    return module.ZstdDecompressor().decompressobj(read_across_frames=True).decompress if module else None


class _MultiFrame:
    """`compression.zstd` and zlib's gzip decompressors stop after one frame or member; a
    stream may hold several (a probe: usage after a gzip stream's first member was lost)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._obj = factory()
        self._between = False  # one ended, the next not begun

    def decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._between and not data.strip(b"\0"):  # padding after the last member, which gzip readers skip
                break
            out.append(self._obj.decompress(data))
            self._between = False
            if not self._obj.eof:
                break
            data = self._obj.unused_data
            self._obj, self._between = self._factory(), True
        return b"".join(out)


# --------------------------------------------------------------------------- rebuilders


def json_object(data: str) -> dict[str, Any] | None:
    """An event's data as a JSON object; None for [DONE], garbage or any other JSON value."""
    if data == "[DONE]":
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


class StreamRebuilder:
    """Accumulates a streamed response into the object a non-streamed call would return."""

    def __init__(self) -> None:
        self.events = 0
        self.malformed = 0
        self.error: Any = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        # The stream's own last event came ([DONE], `response.completed` and the like,
        # `message_stop`): the whole answer was given, whatever happens to the connection after.
        self.ended = False

    def add(self, event: ServerSentEvent) -> None:
        """Take one event ([DONE] ends the stream; garbage is counted)."""
        self.events += 1
        payload = json_object(event.data)
        if payload is None:
            if event.data == "[DONE]":
                self.ended = True
            else:
                self.malformed += 1
            return
        self.take(payload, event.event)

    def take(self, payload: dict[str, Any], event: str = "") -> None:
        """One event's payload, parsed (garbage is counted)."""
        try:
            self._apply(event, payload)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            self.malformed += 1

    def _apply(self, event: str, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def complete(self) -> bool:
        """The whole answer came: the stream's own last event."""
        return self.ended


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _append(parts: dict[Any, list[str]], key: Any, text: str) -> None:
    """parts[key].append(text), without a new empty list per event."""
    chunks = parts.get(key)
    if chunks is None:
        parts[key] = [text]
    else:
        chunks.append(text)


_CHAT_HEAD = ("id", "object", "created", "model", "system_fingerprint", "service_tier")
_CHAT_TEXT_FIELDS = frozenset(("content", "refusal", "reasoning_content", "reasoning"))
# Delta fields that come as objects whose strings arrive in pieces (the others stand as
# last sent): chat's deprecated `function_call`, and an audio answer (`modalities: ["audio"]`).
_CHAT_PIECED_FIELDS = {"function_call": frozenset(("name", "arguments")), "audio": frozenset(("data", "transcript"))}


def _apply_pieces(slot: dict[str, Any], delta: dict[str, Any], pieced: frozenset[str]) -> None:
    for key, value in delta.items():
        if key in pieced:
            if isinstance(value, str):
                slot.setdefault(key, []).append(value)
        elif value is not None:
            slot[key] = value



# The keys every choice of a chunk may have, read apart (`_apply_choice`); and with a
# `logprobs` of null, those of a chunk with nothing else to keep.
_CHAT_CHOICE_KEYS = frozenset(("index", "delta", "finish_reason", "text"))
_PLAIN_CHOICE_KEYS = _CHAT_CHOICE_KEYS | {"logprobs"}


class ChatCompletionsRebuilder(StreamRebuilder):
    """`chat.completion.chunk` (and legacy `text_completion`) deltas -> one completion."""

    def __init__(self) -> None:
        super().__init__()
        self._head: dict[str, Any] = {}
        self._head_missing = _CHAT_HEAD  # what no event has carried yet: most streams repeat the head in every event
        self._choices: dict[int, dict[str, Any]] = {}

    def _apply(self, event: str, payload: dict[str, Any]) -> None:
        if "error" in payload:
            if "choices" not in payload:
                self.error = payload["error"]
                return
            if payload["error"]:  # OpenRouter's error mid-stream, beside a choice that finishes with "error"
                self.error = payload["error"]
        if self._head_missing:
            taken = False
            for key in self._head_missing:
                # An empty value (Azure's first event, its prompt filter results, has them
                # all empty) stands until a later event says more.
                if key in payload and (payload[key] or key not in self._head):
                    self._head[key] = payload[key]
                    taken = True
            if taken:
                self._head_missing = tuple(key for key in _CHAT_HEAD if not self._head.get(key))
        if isinstance(payload.get("model"), str) and (payload["model"] or self.model is None):  # Azure's filter chunks name none
            self.model = payload["model"]
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        for choice in payload.get("choices") or ():
            self._apply_choice(choice)

    def _apply_choice(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index", 0))
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = {"index": index, "parts": {}, "tool_calls": {}, "extras": {}}
        parts = state["parts"]
        if choice.get("finish_reason") is not None:
            state["finish_reason"] = choice["finish_reason"]
        if "text" in choice:
            _append(parts, "text", _text(choice["text"]))
        logprobs = choice.get("logprobs")
        # logprobs, Azure's content filter results: most chunks have none (a `"logprobs": null`
        # taken once), and are not walked again on the per-chunk path
        if logprobs is not None or not _PLAIN_CHOICE_KEYS.issuperset(choice) or ("logprobs" in choice and "logprobs" not in state["extras"]):
            self._apply_choice_extras(state, choice)
        for field, value in (choice.get("delta") or {}).items():  # most deltas hold one field
            if field in _CHAT_TEXT_FIELDS:
                if isinstance(value, str):
                    _append(parts, field, value)
            elif field == "role":
                if value:
                    state["role"] = value
            elif field == "tool_calls":
                self._apply_tool_calls(state, value)
            elif isinstance(value, dict) and field in _CHAT_PIECED_FIELDS:  # a deprecated function call's, an audio answer's pieces
                _apply_pieces(state.setdefault(field, {}), value, _CHAT_PIECED_FIELDS[field])
            elif field == "annotations" and isinstance(value, list):  # a search model's citations
                state.setdefault("annotations", []).extend(value)

    @staticmethod
    def _apply_choice_extras(state: dict[str, Any], choice: dict[str, Any]) -> None:
        """A choice's logprobs, each list of them (chat's `content` and `refusal`, a legacy
        completion's `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) joined
        across chunks; any other key of its own (Azure's `content_filter_results`) as it
        last stood, not emptied. The trace kept none, and a replay of it gave none (a streaming probe)."""
        for key, value in choice.items():
            if key in _CHAT_CHOICE_KEYS:
                continue
            if key == "logprobs" and isinstance(value, dict):
                joined = state.setdefault("logprobs", {})
                for name, items in value.items():
                    if isinstance(items, list):
                        joined.setdefault(name, []).extend(items)
                    else:
                        joined.setdefault(name, items)
            elif value or key not in state["extras"]:  # an empty one (Azure's last chunk) does not undo what came
                state["extras"][key] = value

    @staticmethod
    def _apply_tool_calls(state: dict[str, Any], calls: Any) -> None:
        slots = state["tool_calls"]
        for call in calls or ():
            index = call.get("index")
            slot = slots.setdefault(
                _unindexed_call(slots, call.get("id")) if index is None else int(index),
                {"id": None, "type": "function", "name": "", "arguments": []},
            )
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            function = call.get("function") or {}
            if function.get("name"):
                slot["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                slot["arguments"].append(function["arguments"])

    def complete(self) -> bool:
        """[DONE], or a finish reason for every choice: a client may close as soon as it has
        that, before the usage chunk the proxy asked for (and some servers send no [DONE])."""
        return self.ended or (bool(self._choices) and all("finish_reason" in state for state in self._choices.values()))

    def result(self) -> dict[str, Any] | None:
        if not self._head and not self._choices:
            return None
        legacy = self._head.get("object") == "text_completion"
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            parts = {name: "".join(chunks) for name, chunks in state["parts"].items()}
            extras = {**state["extras"], **({"logprobs": state["logprobs"]} if "logprobs" in state else {})}
            if legacy:
                choices.append({"index": index, "text": parts.get("text", ""), "finish_reason": state.get("finish_reason"), **extras})
                continue
            message: dict[str, Any] = {"role": state.get("role", "assistant"), "content": parts.get("content")}
            for field in ("refusal", "reasoning_content", "reasoning"):
                if field in parts:
                    message[field] = parts[field]
            for field, pieced in _CHAT_PIECED_FIELDS.items():
                if field in state:
                    message[field] = {key: "".join(value) if key in pieced else value for key, value in state[field].items()}
            if "annotations" in state:
                message["annotations"] = state["annotations"]
            if state["tool_calls"]:
                message["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": call["type"],
                        "function": {"name": call["name"], "arguments": "".join(call["arguments"])},
                    }
                    for _, call in sorted(state["tool_calls"].items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": state.get("finish_reason"), **extras})
        body = dict(self._head)
        body["object"] = "text_completion" if legacy else "chat.completion"
        body["choices"] = choices
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def _unindexed_call(slots: dict[int, dict[str, Any]], call_id: Any) -> int:
    """Where a tool call delta without an `index` goes (Gemini's OpenAI-compatible API sends
    none): a new id is a new call, a known id or none at all continues one."""
    if call_id:
        for index, slot in slots.items():
            if slot["id"] == call_id:
                return index
        return max(slots, default=-1) + 1
    return max(slots, default=0)


class ResponsesRebuilder(StreamRebuilder):
    """Responses API events -> the final `response` object.

    `response.completed` (or failed/incomplete) carries the whole response; the deltas
    are kept so that a stream cut short still shows what arrived.
    """

    _FINAL = ("response.completed", "response.failed", "response.incomplete")

    def __init__(self) -> None:
        super().__init__()
        self._response: dict[str, Any] | None = None
        self._final = False
        self._items: dict[int, dict[str, Any]] = {}
        self._text: dict[tuple[int, int], list[str]] = {}
        self._arguments: dict[int, list[str]] = {}

    def _apply(self, event: str, payload: dict[str, Any]) -> None:
        kind = payload.get("type") or event
        if kind == "error":
            self.error = payload.get("error") or payload
            return
        response = payload.get("response")
        if isinstance(response, dict):
            if not self._final:
                self._response = response
            self._final = self._final or kind in self._FINAL
            self.ended = self._final
            if isinstance(response.get("model"), str):
                self.model = response["model"]
            if isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
            if kind == "response.failed":  # an error, whether or not it says which
                self.error = response.get("error") or {"type": "response.failed", "message": "the response failed"}
            return
        index = int(payload.get("output_index", 0))
        if kind in ("response.output_item.added", "response.output_item.done") and isinstance(payload.get("item"), dict):
            self._items[index] = payload["item"]
        elif kind == "response.output_text.delta":
            _append(self._text, (index, int(payload.get("content_index", 0))), _text(payload.get("delta")))
        elif kind == "response.function_call_arguments.delta":
            _append(self._arguments, index, _text(payload.get("delta")))

    def result(self) -> dict[str, Any] | None:
        if self._final and self._response is not None:
            return self._response
        if self._response is None and not self._items and not self._text:
            return None
        body = dict(self._response or {"object": "response"})
        output = []
        for index in sorted(set(self._items) | {i for i, _ in self._text} | set(self._arguments)):
            item = dict(self._items.get(index) or {"type": "message", "role": "assistant"})
            texts = {c: "".join(parts) for (i, c), parts in self._text.items() if i == index}
            if texts and item.get("type") == "message" and not item.get("content"):
                item["content"] = [{"type": "output_text", "text": texts[c]} for c in sorted(texts)]
            if index in self._arguments and item.get("type") == "function_call" and not item.get("arguments"):
                item["arguments"] = "".join(self._arguments[index])
            output.append(item)
        body["output"] = output
        body["status"] = "incomplete"  # no final event came: whatever `response.created` said
        return body


class AnthropicRebuilder(StreamRebuilder):
    """Anthropic message events -> one `message` with its content blocks; the legacy Text
    Completions' `completion` events -> one `completion`."""

    def __init__(self) -> None:
        super().__init__()
        self._message: dict[str, Any] = {}
        self._blocks: dict[int, dict[str, Any]] = {}
        self._pieces: dict[int, list[str]] = {}
        self._completion: list[str] = []

    def _apply(self, event: str, payload: dict[str, Any]) -> None:
        kind = payload.get("type") or event
        if kind == "message_start":
            self._message = dict(payload.get("message") or {})
            self.model = self._message.get("model") if isinstance(self._message.get("model"), str) else None
            if isinstance(self._message.get("usage"), dict):
                # Its output count is a placeholder (1, say): the count comes with message_delta,
                # and a stream cut before that has its output estimated, not taken as 1.
                self.usage = {key: value for key, value in self._message["usage"].items() if key != "output_tokens"}
        elif kind == "content_block_start":
            index = int(payload.get("index", 0))
            self._blocks[index] = dict(payload.get("content_block") or {})
            self._pieces[index] = []
        elif kind == "content_block_delta":
            self._apply_delta(int(payload.get("index", 0)), payload.get("delta") or {})
        elif kind == "message_delta":
            for key, value in (payload.get("delta") or {}).items():
                self._message[key] = value
            if isinstance(payload.get("usage"), dict):
                self.usage = _cumulative(self.usage or {}, payload["usage"])
        elif kind == "message_stop":
            self.ended = True
        elif kind == "completion":  # `/v1/complete`: each event a piece, the last one with its stop_reason
            self._completion.append(_text(payload.get("completion")))
            self._message.update((key, value) for key, value in payload.items() if key != "completion")
            if isinstance(payload.get("model"), str) and payload["model"]:
                self.model = payload["model"]
            self.ended = self.ended or payload.get("stop_reason") is not None
        elif kind == "error":
            self.error = payload.get("error") or payload

    def _apply_delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self._blocks.get(index)
        if block is None:  # a delta without its content_block_start
            block = self._blocks[index] = {"type": "text"}
        kind = delta.get("type")
        if kind == "text_delta":
            _append(self._pieces, index, _text(delta.get("text")))
        elif kind == "input_json_delta":
            _append(self._pieces, index, _text(delta.get("partial_json")))
        elif kind == "thinking_delta":
            _append(self._pieces, index, _text(delta.get("thinking")))
        elif kind == "signature_delta":
            block["signature"] = block.get("signature", "") + _text(delta.get("signature"))
        elif kind == "citations_delta":
            if block.get("citations") is None:  # absent, or null in the block's start
                block["citations"] = []
            block["citations"].append(delta.get("citation"))

    def result(self) -> dict[str, Any] | None:
        if not self._message and not self._blocks:
            return None
        if self._message.get("type") == "completion":
            return {**self._message, "completion": "".join(self._completion)}
        content = []
        for index in sorted(self._blocks):
            block = dict(self._blocks[index])
            joined = "".join(self._pieces.get(index, ()))
            kind = block.get("type")
            if kind == "text":
                block["text"] = block.get("text", "") + joined
            elif kind == "thinking":
                block["thinking"] = block.get("thinking", "") + joined
            elif isinstance(kind, str) and kind.endswith("tool_use") and joined:  # tool_use, server_tool_use, mcp_tool_use
                try:
                    block["input"] = orjson.loads(joined)
                except orjson.JSONDecodeError:
                    block["input"] = joined
            content.append(block)
        message = dict(self._message)
        message["content"] = content
        if self.usage is not None:
            message["usage"] = self.usage
        return message


def _cumulative(usage: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`message_delta`'s usage over `message_start`'s: its counts are running totals, so a
    count never goes down (a compatible server that sends 0 for the input it does not repeat
    must not erase it)."""
    merged = dict(usage)
    for key, value in update.items():
        if value is None:
            continue
        before = merged.get(key)
        both_counts = isinstance(value, int) and isinstance(before, int) and not isinstance(value, bool) and not isinstance(before, bool)
        merged[key] = max(before, value) if both_counts else value
    return merged


class FinalEventRebuilder(StreamRebuilder):
    """The streams of OpenAI's other operations, events of their own whose last holds the
    answer: a transcription's `transcript.text.done`, an image's `image_generation.completed`
    (or `image_edit.completed`), each the non-streamed answer with a `type`; an Assistants
    run's `thread.*` events, ended by [DONE], whose answer is the run as it last stood with
    the messages it completed. Read as chat chunks, none of them ever ended, and their
    answers were lost (a usage probe)."""

    def __init__(self) -> None:
        super().__init__()
        self._final: dict[str, Any] | None = None
        self._run: dict[str, Any] | None = None
        self._messages: list[dict[str, Any]] = []

    def _apply(self, event: str, payload: dict[str, Any]) -> None:
        kind = payload.get("type") if isinstance(payload.get("type"), str) else event
        if kind == "error" or event == "error":
            self.error = payload.get("error", payload)
            return
        if event.startswith("thread."):  # ended by [DONE] only
            if event.startswith("thread.run.") and not event.startswith("thread.run.step."):  # a step's usage is the step's alone
                self._run = payload
                self._take_usage(payload)
            elif event == "thread.message.completed":
                self._messages.append(payload)
            return
        self._take_usage(payload)
        if kind.endswith((".done", ".completed")):
            self._final = {key: value for key, value in payload.items() if key != "type"}
            self.ended = True

    def _take_usage(self, payload: dict[str, Any]) -> None:
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        if isinstance(payload.get("model"), str) and payload["model"]:
            self.model = payload["model"]

    def result(self) -> dict[str, Any] | None:
        if self._run is not None or self._messages:
            return {**(self._run or {}), "messages": self._messages}
        return self._final


class GeminiRebuilder(StreamRebuilder):
    """Gemini's own API streamed (`streamGenerateContent?alt=sse`, passed through by
    gateways): each event a response holding the next parts of each candidate; the last
    of a candidate names its `finishReason`, and the usage is the last event's. No [DONE]:
    the stream has ended when every candidate it began has finished."""

    def __init__(self) -> None:
        super().__init__()
        self._candidates: dict[Any, dict[str, Any]] = {}
        self._parts: dict[Any, list[dict[str, Any]]] = {}
        self._head: dict[str, Any] = {}

    def _apply(self, event: str, payload: dict[str, Any]) -> None:
        if "error" in payload:
            self.error = payload["error"]
            return
        if isinstance(payload.get("usageMetadata"), dict):
            self.usage = payload["usageMetadata"]
        if isinstance(payload.get("modelVersion"), str) and payload["modelVersion"]:
            self.model = payload["modelVersion"]
        self._head.update((key, payload[key]) for key in ("responseId", "modelVersion", "promptFeedback") if key in payload)
        for candidate in payload.get("candidates") or ():
            index = candidate.get("index", 0)
            kept = self._candidates.setdefault(index, {"index": index})
            kept.update((key, value) for key, value in candidate.items() if key not in ("content", "index"))
            content = candidate.get("content")
            if isinstance(content, dict):
                kept.setdefault("role", content.get("role"))
                self._add_parts(index, content.get("parts") or ())
        self.ended = bool(self._candidates) and all("finishReason" in kept for kept in self._candidates.values())

    def _add_parts(self, index: Any, parts: Any) -> None:
        """A text part goes on the last part of its kind (a thought's or the answer's); any
        other (a function call, code) is a part of its own."""
        kept = self._parts.setdefault(index, [])
        for part in parts:
            text = part.get("text")
            last = kept[-1] if kept else None
            if isinstance(text, str) and last is not None and isinstance(last.get("text"), list) and last.get("thought") == part.get("thought"):
                last["text"].append(text)
            elif isinstance(text, str):
                kept.append({**part, "text": [text]})
            else:
                kept.append(part)

    def result(self) -> dict[str, Any] | None:
        if not self._candidates and not self._head:
            return None
        candidates = []
        for index, kept in self._candidates.items():
            parts = [{**part, "text": "".join(part["text"])} if isinstance(part.get("text"), list) else part for part in self._parts.get(index, ())]
            candidates.append({"content": {"parts": parts, "role": kept.get("role")}, **{key: value for key, value in kept.items() if key != "role"}})
        return {"candidates": candidates, **({"usageMetadata": self.usage} if self.usage is not None else {}), **self._head}


_FINAL_EVENT_OPERATIONS = frozenset(("audio", "images", "threads"))


def rebuilder_for(api: str, operation: str) -> StreamRebuilder:
    if shapes_of(api, operation) == "anthropic":
        return AnthropicRebuilder()
    if operation == "responses":
        return ResponsesRebuilder()
    if operation in _FINAL_EVENT_OPERATIONS:
        return FinalEventRebuilder()
    if operation == "generate_content":
        return GeminiRebuilder()
    return ChatCompletionsRebuilder()


EventFilter = Callable[[dict[str, Any]], bool]
# An event's payload as the client is to get it, or None to pass the event as it came.
EventEdit = Callable[[dict[str, Any]], dict[str, Any] | None]
HOLD_LIMIT = 4 << 20  # bytes a held stream keeps; 32 such streams at once are 128 MiB
# A blank line: two line ends, where CR LF is always one (atomic groups: no backtracking
# into it, so a single CR LF is never read as two).
_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")


class StreamTap:
    """Feeds a copy of each streamed chunk to a rebuilder and returns the chunk untouched.

    Nothing raised while decoding can reach the proxy: the first failure is kept in
    `failed` and the tap stops looking, while the bytes keep flowing.

    With `hold`, the tap only keeps the chunks (`held`), whole as mitmproxy keeps a buffered
    answer, for the trace writer process to rebuild: read on the proxy's event loop, the
    events of a 10k-event stream took it 28 % longer to pass on than with the tap doing
    nothing (706 against 550 ms). `read_held` reads them here after all, and so does the
    tap itself once more than `HOLD_LIMIT` bytes are held: a long stream then costs the
    proxy its rebuilt message, not every byte it sent.

    With `drop_events(predicate, hint)` (uncompressed streams only) the tap forwards whole
    events instead of raw chunks and leaves out those the predicate picks, reading only the
    events that contain `hint` (after `strip` has taken out of them what it takes): used to
    hide the usage chunk that the proxy asked for and the client did not, and the
    `"usage":null` that asking puts in every other chunk. The filter failing stops the
    filter (every byte then goes on as it came, and `on_failure` is told why), not the rebuild.
    """

    def __init__(self, rebuilder: StreamRebuilder, content_encoding: str = "", hold: bool = False) -> None:
        self.rebuilder = rebuilder
        self.failed: str | None = None
        self.finished = False
        self.dropped = 0
        self.size = 0  # bytes read, after content decoding (a held stream: those held, as sent)
        # A JSON body where events were expected (a server that ignored `stream: true`), as
        # read, up to HOLD_LIMIT: its first byte tells, as an event stream never starts so.
        self.whole: bytearray | None = None
        self.held: list[bytes] | None = [] if hold else None
        self._decoder = SSEDecoder()
        self._identity = content_encoding.strip().lower() in ("", "identity")
        self._decompress = incremental_decoder(content_encoding)
        self._drop: EventFilter | None = None
        self._hint = b""
        self._strip: Callable[[bytes], bytes] | None = None
        self._edit: EventEdit | None = None
        self._on_failure: Callable[[str], None] | None = None
        self._pending = bytearray()
        if self._decompress is None:
            self.failed = f"unsupported content-encoding {content_encoding!r}"

    def drop_events(self, predicate: EventFilter, hint: bytes = b"", on_failure: Callable[[str], None] | None = None,
                    strip: Callable[[bytes], bytes] | None = None, edit: EventEdit | None = None) -> bool:
        """Start leaving out events (and rewriting those `edit` changes, of those read);
        False (and no filtering) for a compressed stream."""
        if not self._identity or self._decompress is None:
            return False
        self._drop, self._hint, self._on_failure, self._strip, self._edit = predicate, hint, on_failure, strip, edit
        return True

    def hand_over(self) -> list[bytes]:
        """The held chunks, for the writer process; a chunk that comes later is not kept."""
        held, self.held = self.held or [], None
        self.finished = True
        return held

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self.held is not None:
            if chunk:
                self.held.append(chunk)
                self.size += len(chunk)
                if self.size > HOLD_LIMIT:
                    self.read_held()
        else:
            self._read(chunk)
        if self._drop is None:
            return chunk
        out = self._filtered(chunk)
        # Nothing to pass on yet is no chunks, not an empty one: mitmproxy sends an empty
        # chunk as it is, and to an HTTP/1.1 client that is `0\r\n\r\n`, the body's end.
        return out if out or not chunk else []

    def finish(self) -> None:
        """End of stream (mitmproxy's final empty chunk, or the response hook)."""
        self(b"")

    def read_held(self) -> None:
        """Read the held chunks, one by one as they came, and every chunk from now on."""
        if self.held is None:
            return
        held, self.held = self.held, None
        self.size = 0  # counted again as read
        for chunk in held:
            self._read(chunk)

    def _read(self, chunk: bytes) -> None:
        try:
            self._consume(chunk)
        except Exception as exc:  # noqa: BLE001 - a parser bug must never touch the stream
            self.failed = self.failed or f"{type(exc).__name__}: {exc}"
            self._decompress = None

    def _consume(self, chunk: bytes) -> None:
        if self._decompress is None or self.finished:
            return
        if chunk:
            data = self._decompress(chunk)
            if not self.size and data.lstrip()[:1] in (b"{", b"["):
                self.whole = bytearray()
            if self.whole is not None and len(self.whole) <= HOLD_LIMIT:
                self.whole += data
            self.size += len(data)
            events = self._decoder.feed(data)
        else:
            self.finished = True
            events = self._decoder.flush()
        for event in events:
            self.rebuilder.add(event)

    def _filtered(self, chunk: bytes) -> bytes:
        """Forward complete events (minus dropped ones); hold only an unfinished event."""
        if not self._pending and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            # The usual chunk: whole events with LF line ends; no buffer, and no copy
            # when nothing is left out (nothing can be, without the hint).
            if self._hint and self._hint not in chunk:
                return chunk
            blocks = chunk.split(b"\n\n")
            if blocks.pop() == b"":
                try:
                    return self._without_dropped([block + b"\n\n" for block in blocks] if len(blocks) > 1 else [chunk])
                except Exception as exc:  # noqa: BLE001 - the stream goes on untouched
                    self._stop_filtering(exc)
                    return chunk
        # An event's end found anew where the buffer grew, not from its start: a large event
        # arrives in many chunks, and rescanning it for each was quadratic (an 8 MB event:
        # 20 s of the proxy's loop). An end (at most 4 bytes) may begin in the last 3 held,
        # and needs a line end in this chunk unless a CR held back waits for its LF.
        if chunk and b"\n" not in chunk and b"\r" not in chunk and not self._pending.endswith(b"\r"):
            self._pending += chunk
            return b""
        scan_from = max(0, len(self._pending) - 3)
        self._pending += chunk
        out = bytearray()
        done = 0  # bytes of the buffer already sent on or left out
        try:
            for end in _EVENT_END.finditer(self._pending, scan_from):
                if chunk and end.end() == len(self._pending) and self._pending.endswith(b"\r") and not self._pending.endswith(b"\r\r"):
                    break  # perhaps the CR of a CR LF whose LF is still to come (two CRs end an event whatever comes)
                block = self._passed(bytes(self._pending[done : end.end()]))
                if block is not None:
                    out += block
                else:
                    self.dropped += 1
                done = end.end()
            if not chunk:  # end of stream: whatever is left goes out as it is
                out += self._pending[done:]
                done = len(self._pending)
        except Exception as exc:  # noqa: BLE001 - give the client every byte held back, once
            self._stop_filtering(exc)
            out += self._pending[done:]
            done = len(self._pending)
        del self._pending[:done]
        return bytes(out)

    def _stop_filtering(self, exc: Exception) -> None:
        self._drop = None
        if self._on_failure is not None:
            self._on_failure(f"{type(exc).__name__}: {exc}")

    def _without_dropped(self, events: list[bytes]) -> bytes:
        kept = [passed for event in events if (passed := self._passed(event)) is not None]
        self.dropped += len(events) - len(kept)  # counted once the whole chunk is through
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def _passed(self, block: bytes) -> bytes | None:
        """A whole event as it goes on to the client (None: left out). Only one with the hint
        in it is read, once `strip` has taken out of it what the client is not to see."""
        if self._hint not in block or self._drop is None:
            return block
        if self._strip is not None:
            block = self._strip(block)
            if self._hint not in block:
                return block
        decoder = SSEDecoder()
        for event in decoder.feed(block) + decoder.flush():
            payload = json_object(event.data)
            if payload is None:
                continue
            if self._drop(payload):
                return None
            if self._edit is not None and (edited := self._edit(payload)) is not None:
                named = f"event: {event.event}\n".encode() if event.event != "message" else b""
                return named + b"data: " + orjson.dumps(edited) + b"\n\n"
        return block


USAGE_HINT = b'"usage"'  # in every usage-only chunk as it comes: what `is_usage_only_chunk` needs read
# `"usage":null`, which `include_usage` puts in every chunk but the last, as a key of an
# object (after a comma, or first and before one), spaced any way within its line: a line
# break in an event separates its fields. A quote inside a JSON string is always escaped,
# so text that merely reads like it is never matched. Each match starts at a `,` or a `{`,
# so a long run of spaces is walked once.
_NULL_USAGE = re.compile(rb',[ \t]*"usage"[ \t]*:[ \t]*null\b|(?<=\{)[ \t]*"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')
_COMPACT_NULL_USAGE = b',"usage":null'  # as OpenAI writes it


def strip_null_usage(event: bytes) -> bytes:
    """An event without the `"usage":null` the client did not ask for: OpenAI's compact
    form by a byte search (C speed; this runs for each chunk on the proxy's loop), any other
    spacing by the pattern."""
    event = event.replace(_COMPACT_NULL_USAGE, b"")
    return _NULL_USAGE.sub(b"", event) if USAGE_HINT in event else event


def is_usage_only_chunk(payload: dict[str, Any]) -> bool:
    """The chat chunk `stream_options.include_usage` adds: no choices, only usage."""
    return payload.get("choices") == [] and isinstance(payload.get("usage"), dict)


def without_usage(payload: dict[str, Any]) -> dict[str, Any] | None:
    """A chunk that kept a usage the client did not ask for, without it: the `"usage":
    null` of an event written over lines (`strip_null_usage` reads one line), or usage a
    compatible server puts in its last chunk with choices. None: nothing to take out."""
    if "usage" not in payload:
        return None
    return {key: value for key, value in payload.items() if key != "usage"}
