"""Every text an API will read from a request body, with its role, and a normal form.

The shapes: chat `messages` (string content or content-part arrays, tool messages),
Responses `instructions` and `input` (a string or items), Anthropic `system` (string or
blocks) and `messages` (blocks, tool results), and the legacy `prompt`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Any

RoleText = tuple[str, str]

_TEXT_PART_TYPES = {"text", "input_text", "output_text"}


def request_texts(body: Any) -> Iterator[RoleText]:
    """(role, text) for each piece of text in a request body, whatever the API."""
    if not isinstance(body, dict):
        return
    yield from _strings("user", body.get("prompt"))
    system = body.get("system")
    if system is not None:
        yield from _content("system", system)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield ("system", instructions)
    for message in _list(body.get("messages")):
        yield from _message(message)
    items = body.get("input")
    if isinstance(items, str):
        yield ("user", items)
    else:
        for item in _list(items):
            if isinstance(item, str):
                yield ("user", item)
            else:
                yield from _message(item)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(role: str, value: Any) -> Iterator[RoleText]:
    if isinstance(value, str):
        yield (role, value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                yield (role, item)


def _message(message: Any) -> Iterator[RoleText]:
    if not isinstance(message, dict):
        return
    kind = message.get("type")
    role = message.get("role")
    if kind == "function_call_output":  # Responses: a tool result
        yield from _content("tool", message.get("output"))
        return
    role = role if isinstance(role, str) else "user"
    yield from _content(role, message.get("content"))


def _content(role: str, content: Any) -> Iterator[RoleText]:
    if isinstance(content, str):
        yield (role, content)
        return
    for part in _list(content):
        if isinstance(part, str):
            yield (role, part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
                yield (role, part["text"])
            elif kind == "tool_result":  # Anthropic: the tool's answer, string or blocks
                yield from _content("tool", part.get("content"))
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                yield (role, part["refusal"])


# Letters from other scripts that look like Latin ones (the common spoofs).
_HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁһӏԛԝвкмнтαεικνορτυχ",
    "aeopcyxijsdhlqwbkmhtaeikvoptux",
)
# Invisible and combining characters: format controls (zero-width, bidi, soft hyphen,
# BOM), combining marks, and C0/C1 controls other than whitespace.
_HIDDEN = re.compile(
    "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5"
    "\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f\u1ab0-\u1aff\u1dc0-\u1dff"
    "\u20d0-\u20ff\ufe20-\ufe2f\U000e0000-\U000e007f]"
)
_SPACES = re.compile(r"\s+")
# The same for plain ASCII, as byte operations (this runs on every request's prompts):
# controls go, tab/CR/LF become spaces, capitals become small, then runs of spaces close up.
_ASCII_HIDDEN = bytes(range(0x00, 0x09)) + b"\x0b\x0c" + bytes(range(0x0E, 0x20)) + b"\x7f"
_ASCII_FOLD = bytes.maketrans(b"\t\n\r" + bytes(range(0x41, 0x5B)), b"   " + bytes(range(0x61, 0x7B)))
_ASCII_RUNS = re.compile(b" {2,}")


def normalize(text: str) -> str:
    """A form in which case, compatibility forms, accents, invisible characters and
    look-alike letters cannot hide a match. Plain ASCII takes the short way."""
    if text.isascii():
        data = text.encode("ascii").translate(_ASCII_FOLD, _ASCII_HIDDEN)
        if b"  " in data:
            data = _ASCII_RUNS.sub(b" ", data)
        return data.strip(b" ").decode("ascii")
    return _normalize_unicode(text)


def _normalize_unicode(text: str) -> str:
    decomposed = _HIDDEN.sub("", unicodedata.normalize("NFKD", text))
    folded = unicodedata.normalize("NFKC", decomposed).casefold().translate(_HOMOGLYPHS)
    return _SPACES.sub(" ", _HIDDEN.sub("", folded)).strip()


def response_texts(body: Any) -> Iterator[str]:
    """The generated text of a (rebuilt) response: chat, completions, Responses, Anthropic."""
    if not isinstance(body, dict):
        return
    for choice in _list(body.get("choices")):
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            yield choice["text"]
        message = choice.get("message")
        if isinstance(message, dict):
            if isinstance(message.get("content"), str):
                yield message["content"]
            for call in _list(message.get("tool_calls")):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    yield function["arguments"]
    for item in _list(body.get("output")):
        if isinstance(item, dict):
            if isinstance(item.get("arguments"), str):
                yield item["arguments"]
            for _, text in _content("assistant", item.get("content")):
                yield text
    if body.get("type") == "message":
        for block in _list(body.get("content")):
            if isinstance(block, dict):
                for key in ("text", "thinking"):
                    if isinstance(block.get(key), str):
                        yield block[key]
                if block.get("type") == "tool_use" and block.get("input") is not None:
                    yield str(block["input"])
