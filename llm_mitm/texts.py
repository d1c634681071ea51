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


def request_texts(body: Any) -> list[RoleText]:
    """(role, text) for each piece of text in a request body, whatever the API. A list
    built in one pass: this runs on every request (nested generators cost more than the work)."""
    out: list[RoleText] = []
    if not isinstance(body, dict):
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        out.append(("user", prompt))
    elif isinstance(prompt, list):
        out.extend(("user", item) for item in prompt if isinstance(item, str))
    system = body.get("system")
    if system is not None:
        _content(out, "system", system)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.append(("system", instructions))
    for message in _list(body.get("messages")):
        _message(out, message)
    items = body.get("input")
    if isinstance(items, str):
        out.append(("user", items))
    else:
        for item in _list(items):
            if isinstance(item, str):
                out.append(("user", item))
            else:
                _message(out, item)
    return out


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _message(out: list[RoleText], message: Any) -> None:
    if not isinstance(message, dict):
        return
    if message.get("type") == "function_call_output":  # Responses: a tool result
        _content(out, "tool", message.get("output"))
        return
    role = message.get("role")
    _content(out, role if isinstance(role, str) else "user", message.get("content"))


def _content(out: list[RoleText], role: str, content: Any) -> None:
    if isinstance(content, str):
        out.append((role, content))
        return
    for part in _list(content):
        if isinstance(part, str):
            out.append((role, part))
        elif isinstance(part, dict):
            kind = part.get("type")
            if isinstance(kind, str) and kind in _TEXT_PART_TYPES:  # any JSON value may come here
                text = part.get("text")
                if isinstance(text, str):
                    out.append((role, text))
            elif kind == "tool_result":  # Anthropic: the tool's answer, string or blocks
                _content(out, "tool", part.get("content"))
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                out.append((role, part["refusal"]))


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
            parts: list[RoleText] = []
            _content(parts, "assistant", item.get("content"))
            for _, text in parts:
                yield text
    if body.get("type") == "message":
        for block in _list(body.get("content")):
            if isinstance(block, dict):
                for key in ("text", "thinking"):
                    if isinstance(block.get(key), str):
                        yield block[key]
                if block.get("type") == "tool_use" and block.get("input") is not None:
                    yield str(block["input"])
