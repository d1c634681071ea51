"""Usage where the API gave none (estimated), and the cost of every call finished here."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config
from llm_mitm.exchange import Exchange
from llm_mitm.metering import Call, Metering


class Meter:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.metering = Metering(shared.prices, shared.config.usage.estimate_missing)
        shared.on_config(self._apply, now=False)

    def _apply(self, config: Config) -> None:
        self.metering.reprice(self.shared.prices, config.usage.estimate_missing)

    def response(self, flow: http.HTTPFlow) -> None:
        self._meter(self.shared.exchange(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        self._meter(self.shared.exchange(flow))

    def _meter(self, exchange: Exchange | None) -> None:
        if exchange is None or not exchange.done or exchange.deferred or exchange.cost_usd is not None:
            return
        exchange.usage, exchange.cost_usd = self.metering.meter(call_of(exchange, self._shown(exchange)))

    def _shown(self, exchange: Exchange) -> Callable[[str], str]:
        return lambda text: self.shared.redactor.as_traced(text, exchange.request_headers, exchange.url)


def call_of(exchange: Exchange, shown: Callable[[str], str] | None = None) -> Call:
    return Call(
        operation=exchange.route.operation,
        model=exchange.response_model or exchange.model,
        usage=exchange.usage,
        request_json=exchange.request_json,
        response_json=exchange.response.json,
        error=exchange.error is not None,
        charged=not exchange.blocked and exchange.replay != "hit",
        status_code=exchange.status_code,
        generates=exchange.route.generates(exchange.method),
        runs_model=exchange.route.runs_a_model(exchange.method),
        asked=exchange.model,
        shown=shown,
    )
