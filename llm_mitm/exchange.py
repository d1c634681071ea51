"""The one record per flow that every addon reads and fills.

Made once at request time: the request body is parsed once, here, so policy, limits
and the trace read the same parsed object. A response nothing in the proxy needs is left
unread here (`finish(defer=True)`; a stream, held as it came): the trace writer process
reads, rebuilds and meters it instead, off the event loop.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from llm_mitm.forms import Form
from llm_mitm.providers import Route, shapes_of
from llm_mitm.sse import GeminiRebuilder, StreamTap
from llm_mitm.usage import Usage, normalize_usage

_SAMPLE_LIMIT = 4096  # characters of a non-JSON text body kept for the trace
FORM_OPERATIONS = ("audio", "images", "files", "uploads", "realtime", "containers", "videos")  # those that take uploads


@dataclass(slots=True)
class Body:
    """A message body as recorded: parsed JSON when it is JSON, else text or nothing."""

    size: int = 0
    json: Any = None
    text: str | None = None
    is_json: bool = False
    raw: bytes | None = None  # the JSON as it came (the trace takes it as is), or the unread bytes
    unread: bool = False  # kept for the trace writer process to parse
    media: str | None = None  # a format read otherwise than as JSON: "form" (uploads), "sdp" (realtime calls)

    @classmethod
    def parse(cls, content: bytes | None, content_type: str = "") -> Body:
        if not content:
            return cls(size=0)
        size = len(content)
        malformed = False
        if _looks_like_json(content, content_type):
            if "charset" in content_type.lower() and _read_otherwise(content, content_type):
                return cls(size=size, text=_sample(content, content_type))  # opaque: the policy cannot tell what a server reads
            try:
                return cls(size=size, json=orjson.loads(content), is_json=True, raw=content)
            except orjson.JSONDecodeError:
                malformed = True
        if (utf8 := _utf8_json(content)) is not None:  # a BOM, UTF-16 or UTF-32: JSON all the same
            try:
                return cls(size=size, json=orjson.loads(utf8), is_json=True, raw=utf8)
            except orjson.JSONDecodeError:
                malformed = True
        media = _MEDIA.get(content_type.partition(";")[0].strip().lower())
        if media is None and (malformed or _is_textual(content_type)):
            return cls(size=size, text=_sample(content, content_type))
        return cls(size=size, media=media)

    @property
    def form(self) -> bool:
        return self.media == "form"

    @property
    def opaque(self) -> bool:
        """Bytes in no format an API takes (JSON, a form, a WebRTC offer): what they ask of
        it (model, texts, limits) cannot be checked, so the policy treats them as unparseable."""
        return self.size > 0 and not self.is_json and self.media is None and not self.unread

    @classmethod
    def unparsed(cls, content: bytes | None, content_type: str = "") -> Body:
        """The body left for the trace writer process: bytes it would keep, else the size."""
        if not content:
            return cls(size=0)
        if _looks_like_json(content, content_type):
            return cls(size=len(content), raw=content, unread=True)
        sample = content[: _SAMPLE_LIMIT * 4] if _is_textual(content_type) else None  # what `parse` keeps of it
        return cls(size=len(content), raw=sample, unread=True)


def first(headers: list[tuple[str, str]], name: str) -> str:
    """The first value of a header (`name` in lower case), or ""."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return ""


HeaderFields = tuple[tuple[bytes, bytes], ...]  # as mitmproxy holds them (`Headers.fields`)


def decode_fields(fields: HeaderFields) -> list[tuple[str, str]]:
    """Header fields as text, straight from mitmproxy's tuple (its lookups scan and convert)."""
    return [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in fields]


def first_field(fields: HeaderFields, name: bytes) -> str:
    """The first value of a header in mitmproxy's tuple (`name` in lower case), or ""."""
    for key, value in fields:
        if key.lower() == name:
            return value.decode("utf-8", "surrogateescape")
    return ""


def _looks_like_json(content: bytes, content_type: str) -> bool:
    """By content type, or by the first byte whatever the type says: a JSON body sent as
    text/plain is still read by most APIs, so policies must see it too."""
    kind = content_type.lower()
    if "json" in kind:
        return True
    return not kind.startswith("multipart/") and content.lstrip()[:1] in (b"{", b"[")


# Request formats the APIs take besides JSON: uploads, and the SDP offer of a WebRTC
# realtime call (`POST /v1/realtime/calls`, `application/sdp`).
_MEDIA = {"multipart/form-data": "form", "application/sdp": "sdp"}
_TOKEN_TAIL = re.compile(r"[A-Za-z0-9._~+/=-]+\Z")


def _sample(content: bytes, content_type: str = "") -> str:
    """The start of a text body, for the trace, read in its charset (UTF-16 read as UTF-8
    put a NUL between every two letters, and no key was found in it). Where it is cut, a
    word cut in two goes: half a key is too short to be known for one, and would be
    written down as it is."""
    head = content[: _SAMPLE_LIMIT * 4]
    try:
        text = head.decode(_text_encoding(head, content_type), "replace").removeprefix("\ufeff")
    except LookupError:  # a charset Python does not know
        text = head.decode("utf-8", "replace")
    if len(text) <= _SAMPLE_LIMIT and len(content) <= _SAMPLE_LIMIT * 4:
        return text
    return _TOKEN_TAIL.sub("", text[:_SAMPLE_LIMIT])


_UNICODE_MARKS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # the UTF-32 ones start with these
_CHARSET = re.compile(r';\s*charset\s*=\s*"?([^";\s]+)', re.IGNORECASE)


def _text_encoding(content: bytes, content_type: str) -> str:
    """The charset the type names, else the one a byte order mark or NULs tell, else UTF-8."""
    if named := _CHARSET.search(content_type):
        return named.group(1)
    if content.startswith(_UNICODE_MARKS) or b"\x00" in content[:4]:
        return json.detect_encoding(content)
    return "utf-8"


_UNICODE_CHARSETS = frozenset(("utf-8", "utf8", "us-ascii", "ascii", "utf-16", "utf-16le", "utf-16be", "utf-32", "utf-32le", "utf-32be"))


def _read_otherwise(content: bytes, content_type: str) -> bool:
    """Whether a JSON body's declared charset reads its bytes as another text than UTF-8
    does: a server that decodes by it (aiohttp's `request.json()`) reads UTF-7's `+AGk-` as
    an `i`, and a forbidden phrase so written passed (a firewall probe). A charset no
    server can decode by (unknown, or not fitting the bytes) leaves nothing to hide."""
    named = _CHARSET.search(content_type)
    if named is None or named.group(1).lower() in _UNICODE_CHARSETS:
        return False
    try:
        return content.decode(named.group(1)) != content.decode("utf-8")
    except (LookupError, UnicodeError):
        return False


def _utf8_json(content: bytes) -> bytes | None:
    """JSON with a byte order mark or in UTF-16/32, as UTF-8: Python's `json.loads` (and so
    many an API server) reads it, so the policy must too. None for anything else."""
    if not (content.startswith(_UNICODE_MARKS) or b"\x00" in content[:4]):
        return None
    try:
        text = content.decode(json.detect_encoding(content))
        return text.removeprefix("\ufeff").encode("utf-8")
    except (UnicodeError, LookupError):
        return None


def _is_textual(content_type: str) -> bool:
    kind = content_type.lower()
    return kind == "" or kind.startswith("text/") or "xml" in kind or "urlencoded" in kind


@dataclass(slots=True)
class Outcome:
    """What a finished response says: the model that answered, token usage, an error."""

    response_model: str | None = None
    usage: Usage | None = None
    error: str | None = None
    ended: bool = False  # a stream whose own last event came: the whole answer was given


STREAM_CUT_SHORT = "the stream ended before its last event"


def call_error(transport: str | None, outcome: Outcome) -> str | None:
    """The call's error. A connection lost after a stream's last event (a client that
    closes as soon as it has read `[DONE]`, as the SDKs may) does not fail the call: its
    whole answer was given, and it is counted, exported and traced as answered."""
    return outcome.error if outcome.ended else transport or outcome.error


def read_outcome(api: str, status_code: int | None, body: Body) -> Outcome:
    """The outcome of a buffered response body (pure: the proxy and the writer process
    both use it)."""
    outcome = Outcome()
    payload = body.json if body.is_json else None
    if isinstance(payload, list) and payload and isinstance(payload[0], dict) and not _GEMINI_RESPONSE.isdisjoint(payload[0]):
        payload = _gemini_streamed(payload)  # Gemini's stream without alt=sse: a JSON array of its responses
    if isinstance(payload, dict):
        model = payload.get("model", payload.get("modelVersion"))  # Gemini's own API names them so
        if isinstance(model, str):
            outcome.response_model = model
        outcome.usage = normalize_usage(api, payload.get("usage", payload.get("usageMetadata")))
    outcome.error = status_error(status_code, payload)
    return outcome


_GEMINI_RESPONSE = frozenset(("candidates", "usageMetadata", "modelVersion"))


def _gemini_streamed(responses: list[Any]) -> dict[str, Any] | None:
    """The answer a JSON array of Gemini's responses makes, as its SSE stream would be rebuilt."""
    rebuilder = GeminiRebuilder()
    for response in responses:
        if isinstance(response, dict):
            rebuilder.take(response)
    return rebuilder.result()


def read_stream(api: str, status_code: int | None, tap: StreamTap) -> tuple[Body, Outcome]:
    """The outcome of a finished stream, read here or held till now (pure: the proxy and
    the writer process both use it): the rebuilt message is its body."""
    tap.read_held()
    tap.finish()
    rebuilder = tap.rebuilder
    if tap.whole is not None and not rebuilder.events:  # no events, a whole JSON body: read as one
        body = Body.parse(bytes(tap.whole), "application/json")
        body.size = tap.size
        return body, read_outcome(api, status_code, body)
    rebuilt = rebuilder.result()
    outcome = Outcome(rebuilder.model, normalize_usage(api, rebuilder.usage), ended=rebuilder.complete())
    if rebuilt is None and rebuilder.error is not None:  # its first event its error: that is the answer, as an error status's body is
        rebuilt = {"error": rebuilder.error}
    if rebuilder.error is not None:
        outcome.error = _error_message({"error": rebuilder.error}) or "stream reported an error"
    elif tap.failed:
        outcome.error = f"stream not rebuilt: {tap.failed}"
    else:
        outcome.error = status_error(status_code, rebuilt)
        if outcome.error is None and not outcome.ended:  # closed cleanly, but short of its end
            outcome.error = STREAM_CUT_SHORT
    return Body(size=tap.size, json=rebuilt, is_json=rebuilt is not None), outcome


def status_error(status_code: int | None, payload: Any) -> str | None:
    """A 4xx/5xx answer as an error: the API's own message, else the status."""
    if status_code is None or status_code < 400:
        return None
    return _error_message(payload) or f"HTTP {status_code}"


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """What the firewall decided: allow, clamp or block, by which rule and why."""

    decision: str
    rule: str | None = None
    detail: str | None = None


ALLOWED = PolicyDecision("allow")  # the common verdict: one object, not one per request


@dataclass(slots=True, eq=False)
class Exchange:
    """Everything known about one LLM call, filled in as the flow goes on."""

    id: str
    route: Route
    method: str
    url: str
    client: str
    request_fields: HeaderFields  # as the request came, then as it went upstream (the answer's head); decoded for the trace
    request: Body
    started_at: float = field(default_factory=time.time)
    form: Form | None = None  # what an upload says besides its files (model, prompt, a batch file's calls)
    model: str | None = None
    stream: bool = False
    api_key: str | None = None
    organization: str | None = None
    project: str | None = None
    policy: PolicyDecision | None = None
    injected_stream_usage: bool = False
    cost_usd: float | None = None
    replay: str | None = None  # "hit" when answered from a recorded trace, "miss" when not found
    # response side
    status_code: int | None = None
    response_fields: HeaderFields = ()  # decoded only for the trace, in its batch
    response: Body = field(default_factory=Body)
    response_model: str | None = None
    first_byte_at: float | None = None
    finished_at: float | None = None
    tap: StreamTap | None = None
    usage: Usage | None = None
    error: str | None = None
    done: bool = False
    deferred: bool = False  # the response is read, metered and counted in the writer process
    # Each finished call is counted, charged and traced once, though mitmproxy may
    # follow `response` with `error` (a client gone while the answer goes out).
    counted: bool = False
    charged: bool = False
    traced: bool = False
    _headers: dict[bytes, bytes] = field(default_factory=dict, init=False, repr=False)

    def header(self, name: str) -> str | None:
        """A request header by lower-case name: a dict of the raw fields, built once
        (mitmproxy's lookups scan), and only the value asked for is decoded."""
        value = self._headers.get(name.encode("latin-1"))
        return None if value is None else value.decode("utf-8", "surrogateescape")

    def header_values(self, name: str) -> list[str]:
        """Each different value a request header was sent with, in order, empty ones left out
        (a header sent twice says both to a server that joins them, either to one that picks)."""
        key = name.lower().encode("latin-1")
        if key not in self._headers:  # most calls send most headers asked for once or not at all: one lookup
            return []
        values = dict.fromkeys(v.decode("utf-8", "surrogateescape") for k, v in self.request_fields if k.lower() == key and v)
        return list(values)

    def __post_init__(self) -> None:
        self._headers = {k.lower(): v for k, v in reversed(self.request_fields)}
        self.take_request(self.request)

    @property
    def request_headers(self) -> list[tuple[str, str]]:
        return decode_fields(self.request_fields)

    def take_request(self, body: Body) -> None:
        """The request body; model and stream flag from it (Azure: the deployment is the model)."""
        self.request = body
        payload = body.json if body.is_json else None
        if isinstance(payload, dict):
            model = payload.get("model")
            session = payload.get("session")
            if model is None and isinstance(session, dict):  # a realtime session's (`/realtime/client_secrets`)
                model = session.get("model")
            # Gemini names a model in a body as its resource, `models/gemini-2.5-flash` (a cache's, a count's)
            self.model = model.removeprefix("models/") if isinstance(model, str) else None
            self.stream = payload.get("stream") is True
        if self.route.deployment:
            self.model = self.route.deployment
        if self.route.streams:
            self.stream = True

    @property
    def unreadable(self) -> bool:
        """A body the policy cannot read: in no format an API takes, in one this operation
        does not take (an SDP offer is a realtime call's, a form an upload's), or a form
        that does not parse or names a field twice (servers differ on which one counts)."""
        media = self.request.media
        if media is None:
            return self.request.opaque
        if media == "sdp":
            return self.route.operation != "realtime"
        return self.route.operation not in FORM_OPERATIONS or self.form is None

    @property
    def response_headers(self) -> list[tuple[str, str]]:
        return decode_fields(self.response_fields)

    @property
    def held_stream(self) -> bool:
        """A stream left to the writer process: its chunks are in the tap, not the body."""
        return self.deferred and self.tap is not None

    @property
    def blocked(self) -> bool:
        """Refused by the proxy itself: nothing went upstream, nothing to charge."""
        return self.policy is not None and self.policy.decision == "block"

    @property
    def request_json(self) -> dict[str, Any] | None:
        body = self.request.json
        return body if self.request.is_json and isinstance(body, dict) else None

    @property
    def asks_stream_usage(self) -> bool:
        """The client's own `stream_options.include_usage` (`stream_options` may be any JSON
        value: no object asks for nothing)."""
        options = (self.request_json or {}).get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def replace_request_json(self, body: dict[str, Any], content: bytes) -> None:
        """The body was rewritten before going upstream; the record follows it."""
        self.request = Body(size=len(content), json=body, is_json=True, raw=content)

    def finish(self, body: bytes | None = None, content_type: str = "", error: str | None = None, defer: bool = False) -> None:
        """Close the record: parse a buffered body or rebuild a held stream (or, with
        `defer`, leave either to the writer process), or take the stream rebuilt so far."""
        if self.done:
            return
        self.done = True
        self.finished_at = self.finished_at or time.time()
        if error:
            self.error = error
        if self.tap is not None:
            if defer and self.tap.held is not None:  # the chunks go to the writer process as they are
                self.response = Body(size=self.tap.size, unread=True)
                self.deferred = True
                return
            self.response, outcome = read_stream(shapes_of(self.route.api, self.route.operation), self.status_code, self.tap)
        elif defer and self.error is None:
            self.response = Body.unparsed(body, content_type)
            self.deferred = True
            return
        elif body is not None:
            self.response = Body.parse(body, content_type)
            outcome = read_outcome(shapes_of(self.route.api, self.route.operation), self.status_code, self.response)
        else:
            self.error = self.error or status_error(self.status_code, self.response.json)
            return
        self.response_model, self.usage = outcome.response_model, outcome.usage
        self.error = call_error(self.error, outcome)


def _error_message(payload: Any) -> str | None:
    """The human message of an OpenAI or Anthropic error body."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type") or error.get("code")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) else message
    if isinstance(error, str):
        return error
    return None
