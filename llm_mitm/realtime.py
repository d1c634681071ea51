"""A realtime session's client events, as the policy reads them. Pure: no mitmproxy.

Over the Realtime API's WebSocket a client sends JSON events, and three of them carry what
the model reads: `session.update` (the session's instructions, tools and model; also
`transcription_session.update`), `conversation.item.create` (a message, a tool's output)
and `response.create` (one response's own instructions, input items and tools). Each is
read as an HTTP body holding the same would be; one the policy refuses is answered with
the API's own `error` event instead of going upstream.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import orjson

# Each event that carries text or a model, and the key that holds it.
_HOLDERS = {
    "session.update": "session",
    "transcription_session.update": "session",
    "conversation.item.create": "item",
    "response.create": "response",
}
_NAMES = tuple(name.encode() for name in _HOLDERS)


class ClientEvent(NamedTuple):
    kind: str
    event_id: str | None
    body: dict[str, Any]  # shaped as an HTTP request body of the same content
    model: str | None


def read_client_event(data: bytes) -> ClientEvent | None:
    """The event in a client's text message, when it is one the policy reads. Audio
    (`input_audio_buffer.append`, base64: no `.` and no `\\`) is passed over unparsed; a
    type written with escapes is still found."""
    if b"\\" not in data and not any(name in data for name in _NAMES):
        return None
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None  # not an event: the server answers it with an error of its own
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    holder = _HOLDERS.get(kind) if isinstance(kind, str) else None
    inner = event.get(holder) if holder is not None else None
    if not isinstance(inner, dict):
        return None
    body = {"input": [inner]} if holder == "item" else inner
    model = inner.get("model") if holder == "session" else None
    event_id = event.get("event_id")
    return ClientEvent(kind, event_id if isinstance(event_id, str) else None, body, model if isinstance(model, str) else None)  # type: ignore[arg-type]


def error_event(code: str, message: str, event_id: str | None) -> bytes:
    """The Realtime API's answer to an event it refuses (SDKs raise or report it as theirs)."""
    return orjson.dumps({
        "type": "error",
        "event_id": f"event_llm_mitm_{os.urandom(8).hex()}",
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None, "event_id": event_id},
    })
