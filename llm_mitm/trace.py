"""The trace record: one JSON object per exchange, redacted, with a schema version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

from llm_mitm.exchange import Body, Exchange
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


def build_record(exchange: Exchange, redactor: Redactor, bodies: BodiesMode = "full") -> TraceRecord:
    """The redacted, serialisable view of a finished exchange."""
    return TraceRecord(
        id=exchange.id,
        timestamp=datetime.fromtimestamp(exchange.started_at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        duration_ms=_ms(exchange.started_at, exchange.finished_at),
        ttfb_ms=_ms(exchange.started_at, exchange.first_byte_at),
        client=exchange.client,
        provider=exchange.route.provider,
        api=exchange.route.api,
        operation=exchange.route.operation,
        method=exchange.method,
        url=redactor.url(exchange.url),
        model=exchange.model,
        response_model=exchange.response_model,
        deployment=exchange.route.deployment,
        stream=exchange.stream,
        status_code=exchange.status_code,
        request=Message(
            headers=redactor.headers_dict(exchange.request_headers) if bodies != "none" else {},
            body=_body(exchange.request, redactor, bodies),
            size=exchange.request.size,
        ),
        response=Message(
            headers=redactor.headers_dict(exchange.response_headers) if bodies != "none" else {},
            body=_body(exchange.response, redactor, bodies),
            size=exchange.response.size,
            events=exchange.tap.rebuilder.events if exchange.tap is not None else None,
        ),
        usage=exchange.usage,
        cost_usd=exchange.cost_usd,
        policy=Policy(decision=exchange.policy.decision, rule=exchange.policy.rule, detail=exchange.policy.detail)
        if exchange.policy
        else None,
        replay=exchange.replay,
        api_key=exchange.api_key,
        organization=exchange.organization,
        project=exchange.project,
        error=redactor.text(exchange.error) if exchange.error else None,
    )


def _body(body: Body, redactor: Redactor, bodies: BodiesMode) -> Any:
    if bodies != "full":
        return None
    if body.is_json:
        return redactor.json(body.json)
    return redactor.text(body.text) if body.text else None


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)
