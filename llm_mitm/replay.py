"""Answers from recorded traces: the index and the replayed answer. Pure: no mitmproxy.

A call matches a recorded one on provider, method, host, path and normalised body (keys
sorted; `stream` and `stream_options` left out, so a recorded answer serves a streamed
call as a stream and a plain call as JSON), and on who asks: the caller's key
fingerprint, every other credential it sent, organization and project, so two tenants
never share answers (nor two Azure resources, or two servers of one provider). Bodies
are compared as traces hold them, redacted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from llm_mitm.providers import shapes_of
from llm_mitm.redact import holds_fingerprint
from llm_mitm.tracefile import read_traces

_VOLATILE = ("stream", "stream_options")


# Headers that turn on features which change an answer's shape (`anthropic-beta:
# output-128k-2025-02-19`, `OpenAI-Beta: assistants=v2`): part of what was asked.
_FEATURE_HEADERS = ("anthropic-beta", "openai-beta")


def features(headers: Iterable[tuple[str, str]]) -> str:
    """The feature headers' values, in one canonical form (order and repeats do not count)."""
    found: dict[str, set[str]] = {}
    for name, value in headers:
        name = name.lower()
        if name in _FEATURE_HEADERS:
            found.setdefault(name, set()).update(part.strip() for part in value.split(",") if part.strip())
    return ";".join(f"{name}={','.join(sorted(values))}" for name, values in sorted(found.items()))


# Headers hidden in traces that do not tell tenants apart: the proxy's own login, and
# cookies (upstream's rotating `__cf_bm`, sent back by clients that keep cookies: a recorded
# session no longer replayed; a cookie is the caller only where no key is sent).
_NOT_TENANT = frozenset(("proxy-authorization", "cookie"))


def tenant(caller: str | None, organization: str | None, project: str | None, headers: Mapping[str, str]) -> list[str | None]:
    """Who asks, from the headers as traced (`Redactor.headers_dict`): the caller, and each
    credential header sent beside the one it is named by, as its fingerprint. A gateway may
    tell tenants apart by a header the API does not read first (API Management's
    subscription key beside a shared `api-key`, a user's Bearer beside a shared
    `x-api-key`): two such callers shared answers (a tenancy probe)."""
    others = sorted(f"{name}: {value}" for name, value in headers.items()
                    if name not in _NOT_TENANT and holds_fingerprint(value) and not (caller and caller in value))
    return [caller, organization, project, *others]


def request_key(provider: str, method: str, url: str, tenant: Sequence[str | None], body: Any, asked_features: str = "") -> bytes:
    """`tenant`: the key fingerprint, organization and project the call went upstream with;
    `asked_features`: `features` of its headers."""
    parts = urlsplit(url)
    # A key in the query is a fingerprint once redacted ("…wxyz#3f9c2e1d07b4a6c5"): its "#" reads as
    # a fragment's start, which must stay in the key, or tenants' keys alike in their tail meet.
    path = parts.path + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in _VOLATILE}
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    who = orjson.dumps([parts.netloc.lower(), *tenant])
    fields = [provider.encode(), method.upper().encode(), path.encode(), who, canonical]
    if asked_features:
        fields.append(asked_features.encode())
    return hashlib.blake2b(b"\n".join(fields), digest_size=20).digest()


# The states of a stored object still changing: a background response, a run, a batch, a
# job, read again until they settle (a review: replay answered every poll with the first
# state it saw, and a client polling till done never saw it end).
_UNDERWAY = frozenset(("queued", "in_progress", "requires_action", "cancelling", "canceling", "validating", "validating_files",
                       "finalizing", "running", "pending", "uploaded"))


def settled(body: Any) -> bool:
    """A read (GET) that will read the same later: one with no `status` still underway."""
    if not isinstance(body, dict):
        return True
    return all(not (isinstance(state := body.get(field), str) and state in _UNDERWAY) for field in ("status", "processing_status"))


@dataclass(frozen=True, slots=True)
class Recorded:
    api: str
    operation: str
    status: int
    body: Any


class ReplayIndex:
    """Recorded answers by request key; the last recording of a request wins."""

    def __init__(self) -> None:
        self.answers: dict[bytes, Recorded] = {}

    def __len__(self) -> int:
        return len(self.answers)

    def load(self, path: str | os.PathLike[str]) -> None:
        if not os.path.exists(path):
            return
        for record in read_traces(path, progress=False):
            self.add_record(record)

    def add_record(self, record: dict[str, Any]) -> None:
        status = record.get("status_code")
        request = (record.get("request") or {}).get("body")
        response = (record.get("response") or {}).get("body")
        blocked = (record.get("policy") or {}).get("decision") == "block"
        if blocked or record.get("replay") == "hit" or record.get("error") or not isinstance(status, int) or not 200 <= status < 300:
            return
        if record.get("method") == "GET" and not settled((record.get("response") or {}).get("body")):
            return  # a poll of something still underway (a creation's answer is what it is)
        sent = (record.get("request") or {}).get("size")
        if isinstance(request, str) or (request is None and sent) or not isinstance(response, (dict, list)):
            return  # a body that is not JSON is kept as a sample at most: no key tells two apart
        headers = (record.get("request") or {}).get("headers")
        headers = headers if isinstance(headers, dict) else {}
        caller = record.get("api_key") or headers.get("cookie")  # as `Replay` names the caller: a session's cookie where no key was sent
        key = request_key(record.get("provider", ""), record.get("method", ""), record.get("url", ""),
                          tenant(caller, record.get("organization"), record.get("project"), headers), request, features(headers.items()))
        self.answers[key] = Recorded(record.get("api", "openai"), record.get("operation", ""), status, response)

    def find(self, key: bytes) -> Recorded | None:
        return self.answers.get(key)


# --------------------------------------------------------------------------- streams


def _event(data: Any, name: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return ((f"event: {name}\n" if name else "") + f"data: {payload}\n\n").encode()


def as_stream(recorded: Recorded, include_usage: bool) -> bytes:
    """The recorded message as the SSE stream its API would have sent."""
    if shapes_of(recorded.api, recorded.operation) == "anthropic":
        if recorded.body.get("type") == "completion":  # `/v1/complete`, Text Completions
            return _anthropic_completion_stream(recorded.body)
        return _anthropic_stream(recorded.body)
    if recorded.operation == "responses":
        return _responses_stream(recorded.body)
    if recorded.operation == "generate_content":  # Gemini's alt=sse: each response an event, no [DONE]
        return b"".join(_event(response) for response in (recorded.body if isinstance(recorded.body, list) else [recorded.body]))
    if recorded.body.get("object") == "text_completion":
        return _completion_stream(recorded.body, include_usage)
    return _chat_stream(recorded.body, include_usage)


def _chat_stream(body: dict[str, Any], include_usage: bool) -> bytes:
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier") if k in body}
    head["object"] = "chat.completion.chunk"
    out = []

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, **more: Any) -> None:
        out.append(_event({**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, **more}]}))

    for choice in body.get("choices") or []:
        index, message = choice.get("index", 0), choice.get("message") or {}
        chunk(index, {"role": "assistant", "content": None if message.get("content") is None else ""})
        if message.get("content"):
            chunk(index, {"content": message["content"]}, logprobs=choice.get("logprobs"))
        for field in ("refusal", "reasoning_content", "reasoning", "function_call", "audio", "annotations"):  # as they came in one piece
            if message.get(field):
                chunk(index, {field: message[field]})
        for number, call in enumerate(message.get("tool_calls") or []):
            chunk(index, {"tool_calls": [{"index": number, **call}]})
        chunk(index, {}, choice.get("finish_reason"))
    if include_usage and body.get("usage"):
        out.append(_event({**head, "choices": [], "usage": body["usage"]}))
    out.append(_event("[DONE]"))
    return b"".join(out)


def _completion_stream(body: dict[str, Any], include_usage: bool) -> bytes:
    """Legacy completions: `text_completion` chunks of `choices[].text`, each choice's
    finish reason in a last chunk of its own."""
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint") if k in body}
    head["object"] = "text_completion"
    out = []
    for choice in body.get("choices") or []:
        index = choice.get("index", 0)
        out.append(_event({**head, "choices": [{"text": choice.get("text") or "", "index": index, "logprobs": choice.get("logprobs"), "finish_reason": None}]}))
        out.append(_event({**head, "choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": choice.get("finish_reason")}]}))
    if include_usage and body.get("usage"):
        out.append(_event({**head, "choices": [], "usage": body["usage"]}))
    out.append(_event("[DONE]"))
    return b"".join(out)


def _responses_stream(body: dict[str, Any]) -> bytes:
    """As the API streams: an item added empty, its text and arguments in deltas, then done
    whole (added whole, the SDK's snapshot held each text twice)."""
    out: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        out.append(_event({"type": kind, "sequence_number": len(out), **fields}, kind))

    emit("response.created", response={**body, "status": "in_progress", "output": []})
    for index, item in enumerate(body.get("output") or []):
        if not isinstance(item, dict):
            continue
        kind, item_id = item.get("type"), item.get("id")
        if kind == "message":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "content": []})
            for part_index, part in enumerate(item.get("content") or []):
                where = {"item_id": item_id, "output_index": index, "content_index": part_index}
                text_field = {"output_text": "text", "refusal": "refusal"}.get(part.get("type")) if isinstance(part, dict) else None
                if text_field is None:
                    emit("response.content_part.added", **where, part=part)
                else:
                    emit("response.content_part.added", **where, part={**part, text_field: "", **({"annotations": []} if text_field == "text" else {})})
                    name = "response.output_text" if text_field == "text" else "response.refusal"
                    emit(f"{name}.delta", **where, delta=part.get(text_field, ""), **({"logprobs": []} if text_field == "text" else {}))
                    emit(f"{name}.done", **where, **{text_field: part.get(text_field, "")})
                emit("response.content_part.done", **where, part=part)
        elif kind == "function_call":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "arguments": ""})
            where = {"item_id": item_id, "output_index": index}
            emit("response.function_call_arguments.delta", **where, delta=item.get("arguments", ""))
            emit("response.function_call_arguments.done", **where, arguments=item.get("arguments", ""))
        else:
            emit("response.output_item.added", output_index=index, item=item)
        emit("response.output_item.done", output_index=index, item=item)
    emit("response.completed", response=body)
    return b"".join(out)


def _anthropic_completion_stream(body: dict[str, Any]) -> bytes:
    """Text Completions (`/v1/complete`): `completion` events of pieces of the text, the
    last one empty with its stop reason."""
    head = {key: value for key, value in body.items() if key not in ("completion", "stop_reason")}
    out = [_event({**head, "completion": body.get("completion") or "", "stop_reason": None}, "completion")]
    out.append(_event({**head, "completion": "", "stop_reason": body.get("stop_reason")}, "completion"))
    return b"".join(out)


# Anthropic blocks whose input streams as JSON deltas; text and thinking stream as their own
# deltas; any other block (redacted thinking, a search's result) comes whole at its start.
_INPUT_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")


def _anthropic_stream(body: dict[str, Any]) -> bytes:
    usage = body.get("usage") or {}
    start = {**body, "content": [], "stop_reason": None, "stop_sequence": None}
    out = [_event({"type": "message_start", "message": start}, "message_start")]
    for index, block in enumerate(body.get("content") or []):
        kind = block.get("type")
        deltas: list[dict[str, Any]] = []
        if kind == "text":
            empty = {"type": "text", "text": "", **({"citations": []} if block.get("citations") else {})}
            deltas = [{"type": "text_delta", "text": block.get("text", "")}]
            deltas += [{"type": "citations_delta", "citation": citation} for citation in block.get("citations") or []]
        elif kind == "thinking":
            empty = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")}]
            if block.get("signature"):
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind in _INPUT_BLOCKS:
            empty = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input", {})).decode()}]
        else:
            empty = block
        out.append(_event({"type": "content_block_start", "index": index, "content_block": empty}, "content_block_start"))
        out.extend(_event({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta") for delta in deltas)
        out.append(_event({"type": "content_block_stop", "index": index}, "content_block_stop"))
    final = {"stop_reason": body.get("stop_reason"), "stop_sequence": body.get("stop_sequence")}
    out.append(_event({"type": "message_delta", "delta": final, "usage": {"output_tokens": usage.get("output_tokens", 0)}}, "message_delta"))
    out.append(_event({"type": "message_stop"}, "message_stop"))
    return b"".join(out)
