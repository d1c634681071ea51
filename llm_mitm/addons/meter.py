"""Usage where the API gave none (estimated), and the cost of every finished call."""

from __future__ import annotations

import logging

from mitmproxy import http

from llm_mitm.addons.shared import Shared
from llm_mitm.estimate import estimate_usage
from llm_mitm.exchange import Exchange
from llm_mitm.pricing import cost_usd

logger = logging.getLogger("llm_mitm.meter")

_GENERATING = ("chat.completions", "completions", "responses", "messages", "embeddings")


class Meter:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._unpriced: set[str] = set()

    def response(self, flow: http.HTTPFlow) -> None:
        self._meter(self.shared.exchange(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        self._meter(self.shared.exchange(flow))

    def _meter(self, exchange: Exchange | None) -> None:
        if exchange is None or not exchange.done or exchange.cost_usd is not None:
            return
        if exchange.blocked or exchange.replay == "hit" or exchange.route.operation not in _GENERATING:
            return
        if exchange.usage is None and self.shared.config.usage.estimate_missing and not exchange.error:
            exchange.usage = estimate_usage(exchange.request_json, exchange.response.json)
        if exchange.usage is None:
            return
        model = exchange.response_model or exchange.model
        price = self.shared.prices.price(model)
        if price is None:
            if model and model not in self._unpriced:
                self._unpriced.add(model)
                logger.warning("llm-mitm: no price for model %r: its cost is null (add it under pricing.models)", model)
            return
        exchange.cost_usd = cost_usd(exchange.usage, price)
