"""The trace record: one JSON object per exchange, redacted, with a schema version."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel

from llm_mitm.exchange import Body, Exchange, call_error, first, read_outcome, read_stream
from llm_mitm.metering import Call, Metering
from llm_mitm.providers import shapes_of
from llm_mitm.redact import Redactor, replace_sent, without_spelled_secrets
from llm_mitm.sse import StreamTap, rebuilder_for
from llm_mitm.stats import CountRow, ShownModels
from llm_mitm.usage import Usage

SCHEMA_VERSION = 1

BodiesMode = Literal["full", "metadata", "none"]


class Message(BaseModel):
    """One side of the exchange. For a stream, `body` is the rebuilt message."""

    headers: dict[str, str] = {}
    body: Any = None
    size: int = 0
    events: int | None = None


class Policy(BaseModel):
    decision: str
    rule: str | None = None
    detail: str | None = None


class TraceRecord(BaseModel):
    schema_version: int = SCHEMA_VERSION
    id: str
    timestamp: str
    duration_ms: float | None
    ttfb_ms: float | None
    client: str
    provider: str
    api: str
    operation: str
    method: str
    url: str
    model: str | None
    response_model: str | None
    deployment: str | None = None
    stream: bool
    status_code: int | None
    request: Message
    response: Message
    usage: Usage | None
    cost_usd: float | None = None
    policy: Policy | None = None
    replay: str | None = None
    api_key: str | None
    organization: str | None = None
    project: str | None = None
    error: str | None


def snapshot(exchange: Exchange) -> dict[str, Any]:
    """What the trace needs from a finished exchange, as plain data (cheap: no
    redaction, no validation, JSON bodies as they came), so that the record can be built
    in another process. A deferred exchange is completed there (`complete`)."""
    return {
        "deferred": exchange.deferred,
        "id": exchange.id,
        "started_at": exchange.started_at,
        "first_byte_at": exchange.first_byte_at,
        "finished_at": exchange.finished_at,
        "client": exchange.client,
        "route": [exchange.route.provider, exchange.route.api, exchange.route.operation, exchange.route.deployment],
        "method": exchange.method,
        "generates": exchange.route.generates(exchange.method),
        "runs_model": exchange.route.runs_a_model(exchange.method),
        "url": exchange.url,
        "model": exchange.model,
        "response_model": exchange.response_model,
        "stream": exchange.stream,
        "status_code": exchange.status_code,
        "request_headers": exchange.request_headers,
        "request": _wire(exchange.request),
        "response_headers": exchange.response_headers,
        "response": _held_stream(exchange) if exchange.held_stream else _wire(exchange.response),
        "events": exchange.tap.rebuilder.events if exchange.tap is not None else None,
        "usage": exchange.usage.as_dict() if exchange.usage else None,
        "cost_usd": exchange.cost_usd,
        "policy": [exchange.policy.decision, exchange.policy.rule, exchange.policy.detail] if exchange.policy else None,
        "replay": exchange.replay,
        "api_key": exchange.api_key,
        "organization": exchange.organization,
        "project": exchange.project,
        "error": exchange.error,
    }


def _wire(body: Body, verbatim: bool = True) -> list[Any]:
    """[size, kind, payload]: "json" a value, "text" a sample, "raw" bytes left unread
    (as latin-1 text: every byte one character), None nothing. `verbatim`: JSON goes as
    it came where it is one line (nothing to serialise again; orjson checked it when it
    parsed it). Never in the writer process: a Fragment is past redaction."""
    if body.unread:
        return [body.size, "raw", body.raw.decode("latin-1") if body.raw is not None else None]
    if body.is_json:
        raw = body.raw
        return [body.size, "json", orjson.Fragment(raw) if verbatim and raw is not None and b"\n" not in raw else body.json]
    if body.text is not None:
        return [body.size, "text", body.text]
    return [body.size, None, None]


def _held_stream(exchange: Exchange) -> list[Any]:
    """[size, "events", chunks]: a held stream's chunks as they came (latin-1 text, as "raw"),
    handed over whole: the proxy keeps no copy."""
    held = exchange.tap.hand_over()  # type: ignore[union-attr]
    return [exchange.response.size, "events", [chunk.decode("latin-1") for chunk in held]]


def complete(snap: dict[str, Any], metering: Metering, redactor: Redactor) -> None:
    """Read and meter the response of a deferred snapshot, as the proxy would have."""
    size, kind, unread = snap["response"]
    _, api, operation, _ = snap["route"]
    headers = snap["response_headers"]
    if kind == "events":
        tap = StreamTap(rebuilder_for(api, operation), first(headers, "content-encoding"))
        for chunk in unread:  # one by one, as the proxy would have read them
            tap(chunk.encode("latin-1"))
        body, outcome = read_stream(shapes_of(api, operation), snap["status_code"], tap)
        snap["events"] = tap.rebuilder.events
    else:
        content = unread.encode("latin-1") if unread is not None else b""
        body = Body.parse(content, first(headers, "content-type")) if content else Body()
        body.size = size
        outcome = read_outcome(shapes_of(api, operation), snap["status_code"], body)
    snap["response"] = _wire(body, verbatim=False)
    snap["response_model"] = outcome.response_model
    snap["error"] = call_error(snap["error"], outcome)
    request = snap["request"]
    usage, cost = metering.meter(Call(
        operation=operation,
        model=outcome.response_model or snap["model"],
        usage=outcome.usage,
        request_json=request[2] if request[1] == "json" else None,
        response_json=body.json,
        error=snap["error"] is not None,
        charged=not _blocked(snap) and snap["replay"] != "hit",
        status_code=snap["status_code"],
        generates=snap["generates"],
        runs_model=snap["runs_model"],
        asked=snap["model"],
        shown=lambda text: redactor.as_traced(text, snap["request_headers"], snap["url"]),
    ))
    snap["usage"] = usage.as_dict() if usage else None
    snap["cost_usd"] = cost
    snap["deferred"] = False


def count_row(snap: dict[str, Any], redactor: Redactor, models: ShownModels) -> CountRow:
    """The stats row of a completed snapshot (`Stats` makes the same from an exchange), its
    model named as the trace names it."""
    usage, blocked = snap["usage"], _blocked(snap)
    return (
        snap["api_key"],
        models(snap["response_model"] or snap["model"], snap["api_key"], redactor,
               lambda model: redactor.as_traced(model, snap["request_headers"], snap["url"])),
        usage["input_tokens"] if usage else None,
        usage["output_tokens"] if usage else None,
        snap["cost_usd"],
        snap["error"] is not None and not blocked,
        blocked,
    )


def _blocked(snap: dict[str, Any]) -> bool:
    """Refused by the proxy itself (`Exchange.blocked`, from a snapshot)."""
    policy = snap["policy"]
    return bool(policy and policy[0] == "block")


def build_record(snap: dict[str, Any], redactor: Redactor, bodies: BodiesMode = "full") -> dict[str, Any]:
    """The redacted record of a snapshot, as `TraceRecord` dumps it (its fields, in its
    order): made as plain data, because validating what this module itself built cost
    the trace writer a quarter of its time per record. The tests hold every record they
    read to `TraceRecord` (`schema_checked` in tests/support/mitm.py: each trace line of an
    end-to-end or trace-sink test). Last, the credentials the request sent are replaced
    wherever they still are (upstream may echo a key of no known shape: `replace_sent`)."""
    provider, api, operation, deployment = snap["route"]
    policy = snap["policy"]
    sent = redactor.sent_credentials(snap["request_headers"], snap["url"])
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": snap["id"],
        "timestamp": datetime.fromtimestamp(snap["started_at"], UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration_ms": _ms(snap["started_at"], snap["finished_at"]),
        "ttfb_ms": _ms(snap["started_at"], snap["first_byte_at"]),
        "client": snap["client"],
        "provider": provider,
        "api": api,
        "operation": operation,
        "method": snap["method"],
        "url": redactor.address(snap["url"]),
        "model": _field(snap["model"], redactor),  # a key sent as the model (variables swapped) is a key
        "response_model": _field(snap["response_model"], redactor),
        "deployment": _field(deployment, redactor),
        "stream": snap["stream"],
        "status_code": snap["status_code"],
        "request": _message(snap["request_headers"], snap["request"], redactor, bodies),
        "response": _message(snap["response_headers"], snap["response"], redactor, bodies, snap["events"], sent),
        "usage": snap["usage"],
        "cost_usd": snap["cost_usd"],
        "policy": {"decision": policy[0], "rule": policy[1], "detail": _field(policy[2], redactor)} if policy else None,
        "replay": snap["replay"],
        "api_key": snap["api_key"],
        "organization": _field(snap["organization"], redactor),  # a key sent as the organization is a key too
        "project": _field(snap["project"], redactor),
        "error": redactor.free_text(snap["error"]) if snap["error"] else None,
    }
    return replace_sent(record, sent)


def _field(value: str | None, redactor: Redactor) -> str | None:
    return redactor.field(value) if value else value


def _message(headers: list[tuple[str, str]], body: list[Any], redactor: Redactor, bodies: BodiesMode, events: int | None = None,
             sent: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A request or, with the credentials its request `sent`, a response."""
    size, kind, value = body
    redacted = _body(kind, value, redactor, bodies, headers)
    return {
        "headers": redactor.headers_dict(headers) if bodies != "none" else {},
        "body": without_spelled_secrets(redacted, redactor, sent) if sent is not None else redacted,
        "size": size,
        "events": events,
    }


def _body(kind: str | None, value: Any, redactor: Redactor, bodies: BodiesMode, headers: list[tuple[str, str]]) -> Any:
    if isinstance(value, orjson.Fragment):  # unparsed JSON would pass redaction untouched
        raise TypeError("a trace body must be parsed before it is redacted")
    if bodies != "full" or value is None or kind not in ("json", "text") or (kind == "text" and not value):
        return None
    if kind == "json":
        return redactor.json(value)
    if "urlencoded" in first(headers, "content-type").lower():  # percent-encoded: read as its server reads it
        return redactor.form(value)
    return redactor.free_text(value)


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)
