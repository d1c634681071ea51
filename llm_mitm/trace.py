"""The trace record: one JSON object per exchange, redacted, with a schema version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from llm_mitm.exchange import Exchange
from llm_mitm.redact import Redactor
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
    redaction, no validation), so that the record can be built in another process."""
    return {
        "id": exchange.id,
        "started_at": exchange.started_at,
        "first_byte_at": exchange.first_byte_at,
        "finished_at": exchange.finished_at,
        "client": exchange.client,
        "route": [exchange.route.provider, exchange.route.api, exchange.route.operation, exchange.route.deployment],
        "method": exchange.method,
        "url": exchange.url,
        "model": exchange.model,
        "response_model": exchange.response_model,
        "stream": exchange.stream,
        "status_code": exchange.status_code,
        "request_headers": exchange.request_headers,
        "request": [exchange.request.size, exchange.request.is_json, exchange.request.value],
        "response_headers": exchange.response_headers,
        "response": [exchange.response.size, exchange.response.is_json, exchange.response.value],
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


def build_record(snap: dict[str, Any], redactor: Redactor, bodies: BodiesMode = "full") -> TraceRecord:
    """The redacted, validated record of a snapshot."""
    provider, api, operation, deployment = snap["route"]
    policy = snap["policy"]
    return TraceRecord(
        id=snap["id"],
        timestamp=datetime.fromtimestamp(snap["started_at"], UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        duration_ms=_ms(snap["started_at"], snap["finished_at"]),
        ttfb_ms=_ms(snap["started_at"], snap["first_byte_at"]),
        client=snap["client"],
        provider=provider,
        api=api,
        operation=operation,
        method=snap["method"],
        url=redactor.url(snap["url"]),
        model=snap["model"],
        response_model=snap["response_model"],
        deployment=deployment,
        stream=snap["stream"],
        status_code=snap["status_code"],
        request=_message(snap["request_headers"], snap["request"], redactor, bodies),
        response=_message(snap["response_headers"], snap["response"], redactor, bodies, snap["events"]),
        usage=snap["usage"],
        cost_usd=snap["cost_usd"],
        policy=Policy(decision=policy[0], rule=policy[1], detail=policy[2]) if policy else None,
        replay=snap["replay"],
        api_key=snap["api_key"],
        organization=snap["organization"],
        project=snap["project"],
        error=redactor.text(snap["error"]) if snap["error"] else None,
    )


def _message(headers: list[tuple[str, str]], body: list[Any], redactor: Redactor, bodies: BodiesMode, events: int | None = None) -> Message:
    size, is_json, value = body
    return Message(
        headers=redactor.headers_dict(headers) if bodies != "none" else {},
        body=_body(is_json, value, redactor, bodies),
        size=size,
        events=events,
    )


def _body(is_json: bool, value: Any, redactor: Redactor, bodies: BodiesMode) -> Any:
    if bodies != "full" or value is None or (not is_json and not value):
        return None
    return redactor.json(value) if is_json else redactor.text(value)


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)
