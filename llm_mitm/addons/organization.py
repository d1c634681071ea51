"""Sets `OpenAI-Organization` and `OpenAI-Project` on OpenAI calls, as configured."""

from __future__ import annotations

from mitmproxy import http

from llm_mitm.addons.shared import Shared
from llm_mitm.organization import ORGANIZATION_HEADER, PROJECT_HEADER, choose


class Organization:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    @property
    def active(self) -> bool:
        """Without rules the client's headers go as sent (the exchange already has them)."""
        config = self.shared.config.organization
        return any(rule.default or rule.by_key for rule in (config, config.project))

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is not None or exchange.route.api != "openai":
            return
        config = self.shared.config.organization
        headers = flow.request.headers  # case-insensitive; written only when it changes
        for header, rule, attribute in (
            (ORGANIZATION_HEADER, config, "organization"),
            (PROJECT_HEADER, config.project, "project"),
        ):
            sent = exchange.header(header.lower())
            value = choose(rule, sent, exchange.api_key)
            if value != sent:
                headers.pop(header, None)
                if value is not None:
                    headers[header] = value
            setattr(exchange, attribute, value)
