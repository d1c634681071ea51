"""What an upload (`multipart/form-data`) says besides its files, read as servers read it.

mitmproxy's own form reader takes a part's name only from its first header line and joins a
value's lines without their line ends, so `Content-Type` before `Content-Disposition` hid a
part's `model` from the policy while the API still read it, and a quoted boundary gave no
fields at all. `multipart` (the parser of Bottle; strict mode) reads parts whatever their
header order, values as sent, and refuses a form that is not well made: such a form is
unreadable to the policy, not read in part.
"""

from __future__ import annotations

from typing import Any

import orjson
from multipart import MultipartError, PushMultipartParser, parse_options_header

# Form fields an API reads as text or settings: the model, a prompt (images, audio),
# instructions, and a realtime call's session (JSON, with its own model and instructions).
TEXT_FIELDS = ("model", "prompt", "instructions")
SESSION_FIELD = "session"
_READ = frozenset((*TEXT_FIELDS, SESSION_FIELD))


def read_form(content: bytes, content_type: str) -> dict[str, Any] | None:
    """The policy's fields of a form, as a JSON body would hold them (files are passed over,
    not kept); None for a form that does not parse, or that names a field the policy reads
    twice (servers differ on which one counts)."""
    values = _field_values(content, content_type)
    if values is None:
        return None
    fields: dict[str, Any] = {}
    session = values.get(SESSION_FIELD)
    if session:
        try:
            parsed = orjson.loads(session)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            fields.update((key, parsed[key]) for key in ("model", "instructions", "tools") if key in parsed)
    for name in TEXT_FIELDS:
        if value := values.get(name):
            fields[name] = value.decode("utf-8", "replace")
    return fields


def _field_values(content: bytes, content_type: str) -> dict[str, bytes] | None:
    """The bytes of each field the policy reads (at most once each), or None."""
    boundary = parse_options_header(content_type)[1].get("boundary")
    if not boundary:
        return None
    values: dict[str, bytearray] = {}
    value: bytearray | None = None
    parts = 0
    try:
        parser = PushMultipartParser(boundary, strict=True)
        for chunk in (content, b""):  # b"": the end, where an unfinished form fails
            for event in parser.parse(chunk):
                if isinstance(event, bytes | bytearray):  # a part's value, or a piece of it
                    if value is not None:
                        value += event
                elif event is None:  # a part ends
                    value = None
                else:  # a part begins: its headers
                    parts += 1
                    if event.name in _READ:
                        if event.name in values:
                            return None
                        value = values[event.name] = bytearray()
    except MultipartError:
        return None
    return {name: bytes(data) for name, data in values.items()} if parts else None
