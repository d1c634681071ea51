"""Every text an API will read from a request body, with its role, and a normal form.

The shapes: chat `messages` (string content or content-part arrays, tool messages, the
arguments of earlier tool calls), Responses `instructions`, `input` (a string or items:
messages, tool calls and their outputs) and `prompt.variables`, Anthropic `system` (string
or blocks) and `messages` (text, tool results, documents, search results), tool
descriptions, and the legacy `prompt` and `suffix`. A message's text parts are also read
joined, so a phrase split across two parts is still one phrase.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

RoleText = tuple[str, str]

_TEXT_PART_TYPES = {"text", "input_text", "output_text"}


def request_texts(body: Any, joined: bool = False) -> list[RoleText]:
    """(role, text) for each piece of text in a request body, whatever the API. A list
    built in one pass: this runs on every request (nested generators cost more than the work).
    `joined`: also each message's text parts joined (for matching; not for counting)."""
    out: list[RoleText] = []
    joins: list[RoleText] | None = [] if joined else None
    if not isinstance(body, dict):
        return out
    for field in ("prompt", "suffix"):
        value = body.get(field)
        if isinstance(value, str):
            out.append(("user", value))
        elif isinstance(value, list):
            out.extend(("user", item) for item in value if isinstance(item, str))
    system = body.get("system")
    if system is not None:
        _content(out, "system", system, joins)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.append(("system", instructions))
    for message in _list(body.get("messages")):
        _message(out, message, joins)
    items = body.get("input")
    if isinstance(items, str):
        out.append(("user", items))
    else:
        for item in _list(items):
            if isinstance(item, str):
                out.append(("user", item))
            else:
                _message(out, item, joins)
    prompt = body.get("prompt")
    if isinstance(prompt, dict) and isinstance(prompt.get("variables"), dict):  # Responses: a stored prompt's values
        for value in prompt["variables"].values():
            _content(out, "user", [value])
    for tool in _list(body.get("tools")):  # the model reads what each tool is for
        if isinstance(tool, dict):
            function = tool.get("function")
            described = function if isinstance(function, dict) else tool
            if isinstance(described.get("description"), str):
                out.append(("system", described["description"]))
    return out + joins if joins else out


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# Responses items that are not messages: where their text is, and whose it is.
_ITEM_TEXTS = {
    "function_call_output": ("output", "tool"),
    "custom_tool_call_output": ("output", "tool"),
    "function_call": ("arguments", "assistant"),
    "custom_tool_call": ("input", "assistant"),
}


def _message(out: list[RoleText], message: Any, joins: list[RoleText] | None) -> None:
    if not isinstance(message, dict):
        return
    kind = message.get("type")
    item = _ITEM_TEXTS.get(kind) if isinstance(kind, str) else None  # any JSON value may come here
    if item is not None:
        _content(out, item[1], message.get(item[0]), joins)
        return
    role = message.get("role")
    role = role if isinstance(role, str) else "user"
    _content(out, role, message.get("content"), joins)
    for call in _list(message.get("tool_calls")):  # chat: the assistant's earlier calls
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            out.append((role, function["arguments"]))


def _content(out: list[RoleText], role: str, content: Any, joins: list[RoleText] | None = None) -> None:
    if isinstance(content, str):
        out.append((role, content))
        return
    start = len(out)
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
                _content(out, "tool", part.get("content"), joins)
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                out.append((role, part["refusal"]))
            elif kind in ("document", "search_result"):  # Anthropic: text the model is given to read
                _document(out, role, part, joins)
    if joins is not None:
        pieces = [text for who, text in out[start:] if who == role]
        if len(pieces) > 1:  # a phrase split across parts: the model reads them in a row
            joins.append((role, "".join(pieces)))
            joins.append((role, "\n".join(pieces)))


def _document(out: list[RoleText], role: str, block: dict[str, Any], joins: list[RoleText] | None) -> None:
    for key in ("title", "context"):
        if isinstance(block.get(key), str):
            out.append((role, block[key]))
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            out.append((role, source["data"]))
        elif source.get("type") == "content":
            _content(out, role, source.get("content"), joins)
    if block.get("type") == "search_result":
        _content(out, role, block.get("content"), joins)


# Letters from other scripts that look like Latin ones (the common spoofs), and Latin
# letters that look like others: dotless i, script g, small capitals.
_HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁһӏԛԝвкмнтαεικνορτυχıɡɑɩᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ",
    "aeopcyxijsdhlqwbkmhtaeikvoptuxigaiabcdefghijklmnoprstuvwyz",
)
_FILLERS = "\u115f\u1160\u3164\uffa0"  # Hangul fillers: letters by category, blank to the eye


@functools.cache
def _hidden() -> re.Pattern[str]:
    """What no reader sees: format controls (zero-width, bidi, soft hyphen, BOM, tags),
    combining and enclosing marks (accents; variation selectors), control characters that
    are not whitespace, and the Hangul fillers. By Unicode category rather than a list, so
    a character left off a list cannot hide a match. Built on first use (tens of ms)."""
    ranges: list[tuple[int, int]] = []
    for low, high in ((0, 0x30000), (0xE0000, 0xE1000)):
        for point in range(low, high):
            char = chr(point)
            category = unicodedata.category(char)
            if category in ("Cf", "Mn", "Me") or (category == "Cc" and not char.isspace()) or char in _FILLERS:
                if ranges and ranges[-1][1] == point - 1:
                    ranges[-1] = (ranges[-1][0], point)
                else:
                    ranges.append((point, point))
    return re.compile("[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges) + "]")


_SPACES = re.compile(r"\s+")
# The same for plain ASCII, as byte operations (this runs on every request's prompts):
# controls go, whitespace (tab, CR, LF, VT, FF and the separators 0x1c-0x1f) becomes
# spaces, capitals become small, then runs of spaces close up.
_ASCII_WHITESPACE = b"\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_ASCII_HIDDEN = bytes(range(0x00, 0x09)) + bytes(range(0x0E, 0x1C)) + b"\x7f"
_ASCII_FOLD = bytes.maketrans(_ASCII_WHITESPACE + bytes(range(0x41, 0x5B)), b" " * len(_ASCII_WHITESPACE) + bytes(range(0x61, 0x7B)))
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
    hidden = _hidden()
    decomposed = hidden.sub("", unicodedata.normalize("NFKD", text))
    folded = unicodedata.normalize("NFKC", decomposed).casefold().translate(_HOMOGLYPHS)
    return _SPACES.sub(" ", hidden.sub("", folded)).strip()


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
