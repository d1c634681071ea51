"""Sets `OpenAI-Organization` and `OpenAI-Project` on OpenAI calls, as configured."""

from __future__ import annotations

import logging

from mitmproxy import http

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config
from llm_mitm.organization import ORGANIZATION_HEADER, PROJECT_HEADER, choose, configured_value


logger = logging.getLogger("llm_mitm.organization")


class Organization:
    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # Organization rules set: without any, the client's headers still go once each, and
        # twice with different values are refused (which one a server reads is its own choice)
        self._rules = False
        shared.on_config(self._say_who_gets_none)

    def _say_who_gets_none(self, config: Config) -> None:
        """Organization rules that a server of your own speaking OpenAI's API does not get
        (a gateway in front of OpenAI may want them): said once a config, not left to be found."""
        rules = config.organization
        self._rules = any(rule.default or rule.by_key for rule in (rules, rules.project))
        if not self._rules:
            return
        left_out = sorted(name for name, provider in config.enabled_providers.items() if provider.api == "openai" and not provider.organization_headers)
        if left_out:
            logger.warning("llm-mitm: the organization rules are not applied to %s (providers.<name>.organization_headers: true applies them)",
                           ", ".join(left_out))

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is not None:
            return
        if not self._rules and exchange.organization is None and exchange.project is None:  # most calls: nothing to set or check
            return
        provider = self.shared.config.providers.get(exchange.route.provider)
        if provider is None or not provider.organization_headers:
            return
        config = self.shared.config.organization
        headers = flow.request.headers  # case-insensitive; written only when it changes
        for header, rule, attribute in (
            (ORGANIZATION_HEADER, config, "organization"),
            (PROJECT_HEADER, config.project, "project"),
        ):
            sent = exchange.header_values(header)
            value = choose(rule, sent[0] if sent else None, exchange.api_key)
            if len(sent) > 1 and not (rule.override and configured_value(rule, exchange.api_key)):  # the client's, but which: the server's to pick
                refuse(flow, exchange, 400, "ambiguous_request", f"the request sends {header} more than once, with different values: send it once")
                return
            if sent != ([value] if value is not None else []) or len(headers.get_all(header)) > 1:
                headers.pop(header, None)
                if value is not None:
                    headers[header] = value
            setattr(exchange, attribute, value)
