"""A realtime session's client events, as the policy reads them. Pure: no mitmproxy.

Over the Realtime API's WebSocket a client sends JSON events, and four of them carry what
the model reads: `session.update` and `transcription_session.update` (the session's
instructions, tools, model and output limit), `conversation.item.create` (a message, a
tool's output) and `response.create` (one response's own instructions, input items, tools
and limit). Each is read as an HTTP body holding the same would be; one the policy refuses
is answered with the API's own `error` event instead of going upstream.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import orjson

# Each event that carries text, a model or a limit, and the key that holds it.
_HOLDERS = {
    "session.update": "session",
    "transcription_session.update": "session",
    "conversation.item.create": "item",
    "response.create": "response",
}
_NAMES = tuple(name.encode() for name in _HOLDERS)


class UnreadableEvent(ValueError):
    """A message that may be such an event (it names one, or is written with escapes or a
    byte order mark) but is not JSON the policy can read: the server may read it all the same."""


class ClientEvent(NamedTuple):
    kind: str
    event_id: str | None
    body: dict[str, Any]  # shaped as an HTTP request body of the same content
    model: str | None
    event: dict[str, Any]  # the whole event, to write again with a changed body

    def with_body(self, body: dict[str, Any]) -> bytes:
        """The event as sent upstream with `body` (clamped limits) in its place."""
        holder = _HOLDERS[self.kind]
        return orjson.dumps({**self.event, holder: body["input"][0] if holder == "item" else body})


def read_client_event(data: bytes) -> ClientEvent | None:
    """The event in a client's message, when it is one the policy reads; None for any other
    (audio, `input_audio_buffer.append`, is base64: no `.`, no `\\`, passed over unparsed).
    UnreadableEvent for one that may be such an event but does not parse."""
    if b"\\" not in data and not data.startswith(b"\xef\xbb\xbf") and not any(name in data for name in _NAMES):
        return None
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UnreadableEvent from None
    kind = event.get("type") if isinstance(event, dict) else None
    holder = _HOLDERS.get(kind) if isinstance(kind, str) else None
    if holder is None:
        return None
    inner = event.get(holder)
    if not isinstance(inner, dict):
        return None
    body = {"input": [inner]} if holder == "item" else inner
    model = inner.get("model") if holder == "session" else None
    event_id = event.get("event_id")
    return ClientEvent(kind, event_id if isinstance(event_id, str) else None, body, model if isinstance(model, str) else None, event)


def event_names(data: bytes) -> tuple[str, str | None]:
    """An event's type and id as far as they can be read (any event, any bytes): what an
    `error` event answering it names."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "client", None
    kind = event.get("type") if isinstance(event, dict) else None
    event_id = event.get("event_id") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else "client", event_id if isinstance(event_id, str) else None


def error_event(code: str, message: str, event_id: str | None) -> bytes:
    """The Realtime API's answer to an event it refuses (SDKs raise or report it as theirs)."""
    return orjson.dumps({
        "type": "error",
        "event_id": f"event_llm_mitm_{os.urandom(8).hex()}",
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None, "event_id": event_id},
    })
