"""What an upload (`multipart/form-data`) says besides its files, read as servers read it,
and an OpenAI batch file's calls.

mitmproxy's own form reader takes a part's name only from its first header line and joins a
value's lines without their line ends, so `Content-Type` before `Content-Disposition` hid a
part's `model` from the policy while the API still read it, and a quoted boundary gave no
fields at all. `multipart` (the parser of Bottle; strict mode) reads parts whatever their
header order, values as sent, and refuses a form that is not well made. Where servers'
parsers read one form differently (a part's name written in an unusual way, a charset other
than UTF-8), the form is unreadable to the policy rather than read one way of several.

A file uploaded with `purpose=batch` is the calls of an OpenAI Batch, one JSON object a line
(`{"custom_id", "method", "url", "body"}`): the policy checks each as if sent alone, and a
clamp writes the file anew, so the form is kept whole for such an upload. Any other text
file uploaded (but training data) is read as the user's text: a model reads it later by its
id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from multipart import MultipartError, MultipartSegment, PushMultipartParser

# Form fields an API reads as text or settings: the model, a prompt (images, audio),
# instructions, and a realtime call's session (JSON, with its own model and instructions).
TEXT_FIELDS = ("model", "prompt", "instructions")
SESSION_FIELD = "session"
BATCH = "batch"  # in `Form.fields`: a batch file's calls, each its line's object
UPLOADED_TEXT = "file"  # in `Form.fields`: the text of a file uploaded for a model to read
# Uploads whose file is no prompt: training data. A batch file's lines are calls (`BATCH`).
_NOT_READ_PURPOSES = (b"fine-tune", b"batch")
_READ = frozenset((*TEXT_FIELDS, SESSION_FIELD, "purpose"))  # each at most once
# The one shape of a part's Content-Disposition that every client writes (httpx and so the
# SDKs, requests, curl, browsers, .NET; aiohttp and .NET add `filename*=`).
# Servers' parsers differ on anything else (a `"` or `\` inside a parameter, a name twice,
# `name*=`, other parameters): python-multipart, under FastAPI servers, reads
# `name=model; x=a"; name=y; z="` as `model` where Bottle's reads `y`.
# Unquoted, as .NET's HttpClient writes a value that needs no quotes (no `%` in a name).
_NAME_TOKEN = r"[!#$&'*+.^_`|~0-9A-Za-z-]+"
_FILENAME_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_DISPOSITION = re.compile(
    rf'form-data; name=(?:"[^"\\%\r\n]*"|{_NAME_TOKEN})(?:; filename=(?:"(?:[^"\\\r\n]|\\.)*"|{_FILENAME_TOKEN}))?'
    r'(?:; filename\*=[^"\\;\r\n]*)?'
)
# The request's Content-Type in the shape clients write it: parsers split other parameter
# lists differently (a tab, a quote inside a token), and a charset or boundary one of them
# does not see would let the policy read one form and the server another.
_CONTENT_TYPE = re.compile(
    r'(?i)multipart/form-data; ?boundary=(?:"(?P<quoted>[0-9A-Za-z\'()+_,./:=? -]{1,70})"|(?P<token>[0-9A-Za-z\'()+_,./:=?-]{1,70}))'
    r'(?:; ?charset="?utf-8"?)?'
)
_UTF8 = (None, "utf-8", "utf8", "us-ascii", "ascii")  # servers decode a part by its charset: UTF-7 hides words


@dataclass(slots=True)
class Part:
    name: str
    headers: list[tuple[str, str]]  # as the parser gives them: names in title case
    content: bytearray | None  # None: passed over (a file that is not a batch file)


@dataclass(slots=True)
class Form:
    """An upload as the policy reads it (`fields`, as a JSON body would hold them), and for
    a batch file every part, to write it anew."""

    fields: dict[str, Any]
    boundary: str = ""
    parts: list[Part] | None = None

    def with_batch(self, calls: list[dict[str, Any]]) -> tuple[Form, bytes]:
        """The form with its batch file holding `calls` instead, and its bytes."""
        if self.parts is None or any(part.content is None for part in self.parts):
            raise ValueError("not a batch upload")
        file = orjson.dumps(calls[0]) + b"".join(b"\n" + orjson.dumps(call) for call in calls[1:]) + b"\n" if calls else b""
        parts = [Part(p.name, p.headers, bytearray(file)) if p.name == "file" else p for p in self.parts]
        out = bytearray()
        for part in parts:
            out += b"--" + self.boundary.encode() + b"\r\n"
            for name, value in part.headers:
                if name != "Content-Length":  # the file's length changed; no server needs it
                    out += f"{name}: {value}\r\n".encode()
            out += b"\r\n" + (part.content or b"") + b"\r\n"
        out += b"--" + self.boundary.encode() + b"--\r\n"
        return Form({**self.fields, BATCH: calls}, self.boundary, parts), bytes(out)


def read_form(content: bytes, content_type: str, files: bool = False) -> Form | None:
    """The policy's view of a form (file contents are passed over, not kept, but for a batch
    file uploaded to `files`); None for a form that does not parse, that is not UTF-8, that
    names a field the policy reads twice (servers differ on which one counts), or a batch
    upload whose file is not one call a line."""
    shape = _CONTENT_TYPE.fullmatch(content_type.strip())
    if shape is None:
        return None
    boundary = shape["quoted"] or shape["token"]
    parts = _parts(content, boundary, files)
    if not parts:
        return None
    values: dict[str, bytes] = {}
    for part in parts:
        if part.name in _READ and part.content is not None:
            if part.name in values:
                return None
            values[part.name] = bytes(part.content)
    fields: dict[str, Any] = {}
    try:  # not UTF-8, a server falls back to Latin-1; a session orjson refuses (NaN) Python's json reads
        if session := values.get(SESSION_FIELD):
            parsed = orjson.loads(session)
            if not isinstance(parsed, dict):
                return None
            fields.update(parsed)  # all of it: its transcription model too (a firewall probe: only three fields were read)
        for name in TEXT_FIELDS:
            if value := values.get(name):
                fields[name] = value.decode("utf-8")
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return None
    uploaded = [part.content for part in parts if part.name == "file"]
    purpose = values.get("purpose", b"").strip().lower()
    if files and purpose not in _NOT_READ_PURPOSES and (text := uploaded_text(uploaded)) is not None:
        fields[UPLOADED_TEXT] = text
    if not files or purpose != b"batch":  # a server may be lenient: the policy is not
        return Form(fields)
    calls = batch_file_calls(uploaded[0]) if len(uploaded) == 1 and uploaded[0] is not None else None
    if calls is None or any(part.content is None for part in parts):  # every part is needed to write it anew
        return None
    fields[BATCH] = calls
    return Form(fields, boundary, parts)


def _parts(content: bytes, boundary: str, files: bool) -> list[Part] | None:
    """Every part, with its content where the policy may need it (see `_keeps`); None for
    a form that does not parse strictly, or a part in a shape servers read differently."""
    parts: list[Part] = []
    kept: bytearray | None = None
    try:
        parser = PushMultipartParser(boundary, strict=True)
        for chunk in (content, b""):  # b"": the end, where an unfinished form fails
            for event in parser.parse(chunk):
                if isinstance(event, bytes | bytearray):  # a part's content, or a piece of it
                    if kept is not None:
                        kept += event
                elif event is None:  # a part ends
                    kept = None
                else:  # a part begins: its headers
                    if not _plain(event):
                        return None
                    kept = bytearray() if _keeps(event, parts, files) else None
                    parts.append(Part(event.name or "", event.headerlist, kept))
    except MultipartError:
        return None
    return parts


def uploaded_text(files: list[bytearray | None]) -> str | None:
    """The text of a file uploaded for a model to read later by its id (an Anthropic
    `document` or an OpenAI `input_file` naming its `file_id`): a forbidden phrase in it
    reached the model so, unread (a firewall probe). A file is text when it is UTF-8 with no
    NUL; a PDF, an image or audio is not read here, as inline they are not either."""
    if len(files) != 1 or files[0] is None or b"\x00" in files[0]:
        return None
    try:
        return files[0].decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None


def _plain(segment: MultipartSegment) -> bool:
    """One Content-Disposition, in the shape all clients write, and a policy field in UTF-8."""
    dispositions = [value for name, value in segment.headerlist if name == "Content-Disposition"]
    if len(dispositions) != 1 or _DISPOSITION.fullmatch(dispositions[0]) is None:
        return False
    return segment.name not in _READ or (segment.charset.lower() if segment.charset else None) in _UTF8


def _keeps(segment: MultipartSegment, before: list[Part], files: bool) -> bool:
    """A field the policy reads; and on an upload to `files` what writing a batch upload anew
    needs (its other fields), and its file, to read, unless `purpose` came first and is
    "fine-tune" (the SDKs send it first: training data is not copied)."""
    if segment.name in _READ:
        return True
    if not files:
        return False
    if segment.filename is None:
        return True
    purpose = next((part.content for part in before if part.name == "purpose"), None)
    return segment.name == "file" and (purpose is None or purpose.strip().lower() != b"fine-tune")


def json_lines(data: bytes | bytearray) -> list[Any] | None:
    """A JSON lines file's values, blank lines skipped; None if any line is not JSON."""
    values = []
    for line in bytes(data).split(b"\n"):  # a bare CR is whitespace inside a line, as servers read JSONL
        if not line.strip():
            continue
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            return None
    return values


def batch_file_calls(data: bytes | bytearray) -> list[dict[str, Any]] | None:
    """A batch file's lines, each an object with its `url` and `body`; None if any is not."""
    calls = json_lines(data)
    if calls is None or not all(isinstance(call, dict) and isinstance(call.get("url"), str) and isinstance(call.get("body"), dict) for call in calls):
        return None
    return calls
