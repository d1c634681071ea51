"""Applies the policy to each LLM request, and to each event of a realtime session, before
anything goes upstream."""

from __future__ import annotations

import logging
import weakref
from typing import Any

from mitmproxy import http
from mitmproxy.websocket import WebSocketMessage

from llm_mitm.addons.refuse import refuse, refuse_event, rewrite_batch_file, rewrite_json
from llm_mitm.addons.shared import Shared
from llm_mitm.exchange import ALLOWED, Exchange, PolicyDecision
from llm_mitm.forms import BATCH
from llm_mitm.policy import RequestView, Violation
from llm_mitm.realtime import UnreadableEvent, read_client_event

logger = logging.getLogger("llm_mitm.firewall")


# Events after which the next item is not read right after the last one created: the
# model's answer (server), an item deleted or cut, audio committed as a user turn (client).
_BREAKS_THE_RUN_SERVER = b'"response.created"'
_BREAK_THE_RUN_CLIENT = (b'"conversation.item.delete"', b'"conversation.item.truncate"', b'"input_audio_buffer.commit"')


class Firewall:
    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # A realtime session's last conversation item let through: the next is read after it,
        # so a phrase split between two turns is found (a review: each was read alone).
        self._last_items: weakref.WeakKeyDictionary[http.HTTPFlow, dict[str, Any]] = weakref.WeakKeyDictionary()

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is not None:
            return
        policy = self.shared.policy
        form = exchange.form if exchange.request_json is None else None
        view = RequestView(
            route=exchange.route,
            model=exchange.model,
            body=form.fields if form is not None else exchange.request_json,
            unparseable=exchange.unreadable,
            method=exchange.method,
            media=exchange.request.media,
        )
        clamped = None
        try:
            violation = policy.check(view)
            if violation is None:
                if form is None:
                    clamped = policy.clamp(exchange.route, view.body)
                    if clamped is not None:
                        rewrite_json(flow, exchange, clamped)
                elif BATCH in form.fields:  # a form's own fields have no limit to clamp
                    clamped = policy.clamp(exchange.route, form.fields)
                    if clamped is not None:
                        rewrite_batch_file(flow, exchange, form, clamped[BATCH])
        except Exception:  # a request the policy cannot read or rewrite does not go out unchecked
            logger.exception("llm-mitm: the policy check failed; the request is refused")
            refuse(flow, exchange, 403, "policy_error", "the request could not be checked against the policy")
            return
        if violation is not None:
            refuse(flow, exchange, violation.status, violation.rule, violation.detail)
        elif clamped is not None:
            exchange.policy = PolicyDecision("clamp", "max_tokens", f"output tokens capped at {policy.config.max_tokens}")
        else:
            exchange.policy = ALLOWED

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """A realtime client's event that sets instructions, tools, a model or a limit, or
        adds to the conversation, is checked as a request would be (and its limits clamped,
        with `max_tokens_action: clamp`); one refused is dropped and the client gets the
        API's `error` event (the session goes on). No rule a call can break, nothing is read."""
        exchange = self.shared.exchange(flow)
        policy = self.shared.policy
        if exchange is None or flow.websocket is None or not policy.checks_calls:
            return
        message = flow.websocket.messages[-1]
        if not message.from_client:
            if flow in self._last_items and _BREAKS_THE_RUN_SERVER in message.content:  # the model's turn comes between
                del self._last_items[flow]
            return
        if flow in self._last_items and any(kind in message.content for kind in _BREAK_THE_RUN_CLIENT):
            del self._last_items[flow]
        try:
            event = read_client_event(message.content)
        except UnreadableEvent:
            if policy.config.on_unparseable == "reject":
                self._refuse_event(flow, exchange, message, "client", None, Violation(
                    "unparseable_body", "the event is not JSON the policy can read (on_unparseable: reject)", 400))
            return
        if event is None:
            return
        body = event.body
        previous = self._last_items.get(flow) if event.kind == "conversation.item.create" else None
        placed = event.event.get("previous_item_id")
        if previous is not None and placed is not None and placed != previous.get("id"):
            previous = None  # put elsewhere in the conversation: not read after the last one
        if previous is not None:  # read after the item before it, as the model reads the conversation
            body = {"input": [previous, *event.body["input"]]}
        try:
            violation = policy.check(RequestView(exchange.route, event.model or exchange.model, body, method=exchange.method))
            clamped = policy.clamp(exchange.route, event.body) if violation is None else None
        except Exception:  # an event the policy cannot read does not go out unchecked
            logger.exception("llm-mitm: the policy check of a realtime event failed; the event is refused")
            violation, clamped = Violation("policy_error", "the event could not be checked against the policy"), None
        if violation is not None:
            self._refuse_event(flow, exchange, message, event.kind, event.event_id, violation)
            return
        if clamped is not None:
            message.content = event.with_body(clamped)
        if event.kind == "conversation.item.create":
            self._last_items[flow] = event.body["input"][0]

    def _refuse_event(self, flow: http.HTTPFlow, exchange: Exchange, message: WebSocketMessage, kind: str, event_id: str | None,
                      violation: Violation) -> None:
        refuse_event(flow, message, kind, event_id, violation.rule, violation.detail)
        # as traced: a model named after the key (a secrets probe: a key of no shape was printed whole)
        logger.warning("llm-mitm: %s", self.shared.redactor.as_traced(flow.comment, exchange.request_headers, exchange.url))
