"""`llm.stats`: spend and counts per key and model since start, also logged periodically."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http

from llm_mitm.addons.shared import Shared
from llm_mitm.exchange import Exchange
from llm_mitm.stats import ShownModels

logger = logging.getLogger("llm_mitm.stats")

COMMAND_WAIT = 2.0  # seconds `llm.stats` may wait for the writer process's counts
PERIODIC_WAIT = 0.05  # the periodic line takes what has come back (it must not stall the proxy)


class Stats:
    """Counts exchanges finished here; the trace writer process reports the ones it
    finishes (deferred) into the same table."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.stats = shared.usage_stats
        self._models = ShownModels()
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._periodic())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def llm_stats(self) -> str:
        """Spend and counts per API key and model since the proxy started."""
        self.shared.collect_counts(COMMAND_WAIT)
        table = self.shared.redactor.printout(self.stats.table())  # models are named as traced; a known shape in a key's place is hidden too
        logger.info("%s", table)
        return table

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(self.shared.exchange(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(self.shared.exchange(flow))

    def _count(self, exchange: Exchange | None) -> None:
        if exchange is None or not exchange.done or exchange.counted or exchange.deferred:
            return
        exchange.counted = True
        usage = exchange.usage
        blocked = exchange.blocked
        redactor = self.shared.redactor
        self.stats.add((
            exchange.api_key,
            self._models(exchange.response_model or exchange.model, exchange.api_key, redactor,
                         lambda model: redactor.as_traced(model, exchange.request_headers, exchange.url)),
            usage.input_tokens if usage else None,
            usage.output_tokens if usage else None,
            exchange.cost_usd,
            exchange.error is not None and not blocked,
            blocked,
        ))

    async def _periodic(self) -> None:
        while True:
            interval = self.shared.config.usage.stats_interval
            await asyncio.sleep(interval or 60)
            if interval:
                self.shared.collect_counts(PERIODIC_WAIT)
                if self.stats.rows:
                    logger.info("%s", self.stats.summary())
