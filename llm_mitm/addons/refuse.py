"""Answering a request ourselves: the API-shaped error, the mark in mitmweb, the record."""

from __future__ import annotations

import orjson
from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage

from llm_mitm.exchange import Body, Exchange, PolicyDecision
from llm_mitm.forms import Form
from llm_mitm.providers import shapes_of
from llm_mitm.realtime import error_event
from llm_mitm.refusal import refusal


def refuse(flow: http.HTTPFlow, exchange: Exchange | None, status: int, rule: str, detail: str, retry_after: int | None = None) -> None:
    """Answer in the client's API dialect (OpenAI's for a call not recorded: its record
    failed); nothing goes upstream (connections are lazy)."""
    shapes = shapes_of(exchange.route.api, exchange.route.operation) if exchange is not None else "openai"
    answer = refusal(shapes, status, rule, detail, retry_after)
    flow.response = http.Response.make(answer.status, answer.body, answer.headers)
    flow.marked = ":no_entry:"
    flow.comment = f"llm-mitm blocked ({rule}): {detail}"
    if exchange is not None:
        exchange.policy = PolicyDecision("block", rule, detail)


def refuse_event(flow: http.HTTPFlow, message: WebSocketMessage, kind: str, event_id: str | None, rule: str, detail: str) -> None:
    """A realtime client's event is dropped and answered with the API's `error` event, as
    the API answers one it refuses: the client hears why, and the session goes on."""
    message.drop()
    ctx.master.commands.call("inject.websocket", flow, True, error_event(rule, f"llm-mitm refused this {kind} event ({rule}): {detail}", event_id), True)
    flow.marked = ":no_entry:"
    flow.comment = f"llm-mitm blocked a {kind} event ({rule}): {detail}"


def rewrite_json(flow: http.HTTPFlow, exchange: Exchange, body: dict) -> None:  # type: ignore[type-arg]
    """Send `body` upstream instead (content-encoding kept) and record what was sent."""
    content = orjson.dumps(body)
    flow.request.content = content
    content_type = flow.request.headers.get("content-type", "")
    if "charset" in content_type.lower() and "utf-8" not in content_type.lower():  # it was UTF-16 or -32: now UTF-8
        flow.request.headers["content-type"] = "application/json"
    exchange.replace_request_json(body, content)


def rewrite_batch_file(flow: http.HTTPFlow, exchange: Exchange, form: Form, calls: list[dict]) -> None:  # type: ignore[type-arg]
    """Send the upload with its batch file holding `calls` instead (content-encoding kept)
    and record what was sent."""
    exchange.form, content = form.with_batch(calls)
    flow.request.content = content
    exchange.request = Body(size=len(content), media="form")
