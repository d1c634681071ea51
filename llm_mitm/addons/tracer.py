"""Hands each finished exchange to the trace writer."""

from __future__ import annotations

from mitmproxy import http

from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config, trace_destination
from llm_mitm.exchange import Exchange
from llm_mitm.trace import build_record
from llm_mitm.writer import TraceWriter


class Tracer:
    """Owns the TraceWriter; a new one when the destination changes, drained at exit."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.writer: TraceWriter | None = None
        self._target: tuple[str | None, str | None] = (None, None)
        shared.on_config(self._apply)

    def _apply(self, config: Config) -> None:
        target = (trace_destination(config), config.traces.directory)
        if target == self._target and self.writer is not None:
            return
        old, self.writer, self._target = self.writer, TraceWriter(*target), target
        if old is not None:
            old.close()

    def response(self, flow: http.HTTPFlow) -> None:
        self._submit(self.shared.exchange(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        self._submit(self.shared.exchange(flow))

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _submit(self, exchange: Exchange | None) -> None:
        if exchange is None or self.writer is None or not exchange.done or exchange.traced:
            return
        exchange.traced = True
        redactor, bodies = self.shared.redactor, self.shared.config.traces.bodies
        self.writer.submit(lambda: build_record(exchange, redactor, bodies))
