"""Applies the policy to each LLM request before anything goes upstream."""

from __future__ import annotations

import logging

from mitmproxy import http

from llm_mitm.addons.refuse import refuse, rewrite_batch_file, rewrite_json
from llm_mitm.addons.shared import Shared
from llm_mitm.exchange import ALLOWED, PolicyDecision
from llm_mitm.forms import BATCH
from llm_mitm.policy import RequestView

logger = logging.getLogger("llm_mitm.firewall")


class Firewall:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

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
