"""Hands each finished exchange to the trace writer process."""

from __future__ import annotations

import logging
import os
import time

from mitmproxy import http

from llm_mitm.addons.shared import Shared, no_counts_owed
from llm_mitm.config import Config, trace_destination
from llm_mitm.exchange import Exchange
from llm_mitm.quota import limits_set
from llm_mitm.trace import snapshot
from llm_mitm.tracesink import SinkSettings, TraceSink

logger = logging.getLogger("llm_mitm.traces")

RESTART_SECONDS = 10.0


class Tracer:
    """Owns the TraceSink: a new one when where traces are written changes (a change of
    how records are made goes to the running one), none when nothing is to be written,
    drained at exit.

    While it runs, responses are left to it (`Shared.defer_responses`): parsing and
    metering them moves off the event loop, mitmproxy's one core. Not when limits are
    set: they charge each call before the next one is let through."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.sink: TraceSink | None = None
        self._settings: SinkSettings | None = None
        self._restarted_at = -RESTART_SECONDS

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        # The writer process starts with the first config put in force, not at import.
        self.shared.on_config(self._apply, now=False)

    def _apply(self, config: Config) -> None:
        settings = SinkSettings(
            destination=trace_destination(config),
            directory=config.traces.directory,
            bodies=config.traces.bodies,
            max_bytes=config.traces.max_bytes,
            keep=config.traces.keep,
            redaction=config.redaction.redactor_options(),
            prices=config.pricing.models,
            estimate_missing=config.usage.estimate_missing,
        )
        if settings != self._settings:
            if self.sink is not None and not self.sink.failed and settings.files() == self.sink.settings.files():
                self.sink.retune(settings)  # same files: the running process takes the change
            else:
                old = self.sink
                wanted = settings.destination is not None or settings.directory is not None
                self.sink = TraceSink(settings, self.shared.usage_stats.add, snapshot) if wanted else None
                if old is not None and old.failed and self.sink is not None and settings.files() == old.settings.files():
                    self.sink.adopt(*old.take_unsent())  # what waited for a new process goes to this one
                if old is not None and self.sink is not None and _share_a_file(old.settings, settings):
                    old.close()  # it must be done before the new writer appends to (and rotates) the same file (a review: records lost)
                elif old is not None:
                    old.close_in_background()
            self._settings = settings
        self._leave_to_sink(config)

    def _leave_to_sink(self, config: Config) -> None:
        """Responses go to a running writer process unless limits need them read here."""
        self.shared.defer_responses = self.sink is not None and not self.sink.failed and not limits_set(config.policy)
        self.shared.collect_counts = self.sink.collect if self.sink is not None else no_counts_owed

    def _restart(self, now_or_never: bool = False) -> None:
        """The writer process went (killed, out of memory): a new one, so that one loss
        does not end tracing for the rest of the run, and it takes every call the gone one
        had not been handed; at most one every RESTART_SECONDS, so that a process that
        cannot run is not started again and again (calls wait meanwhile, up to a point)."""
        now = time.monotonic()
        if self.sink is None or (now - self._restarted_at < RESTART_SECONDS and not now_or_never):
            return
        self._restarted_at = now
        gone = self.sink
        try:
            self.sink = TraceSink(gone.settings, self.shared.usage_stats.add, snapshot)
        except Exception:  # noqa: BLE001 - no new process (out of memory, say): the gone one stays, read here
            logger.exception("llm-mitm: the trace writer process could not be started again")
            return
        self.sink.adopt(*gone.take_unsent())
        gone.close(timeout=0)  # takes the reports it sent before it went
        self._leave_to_sink(self.shared.config)
        logger.error("llm-mitm: a new trace writer process is started; of the calls handed to the one that went, "
                     "%d it had not read are lost (and any it read but had not written)", gone.handed_unread)

    def response(self, flow: http.HTTPFlow) -> None:
        self._submit(self.shared.exchange(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        self._submit(self.shared.exchange(flow))

    def done(self) -> None:
        if self.sink is not None and not self.sink.process.is_alive():
            self.sink.failed = True  # gone since the last round
        if self.sink is not None and self.sink.failed and self.sink.waiting:
            self._restart(now_or_never=True)  # the calls that waited for a new process: one last chance
        self.shared.defer_responses = False
        self.shared.collect_counts = no_counts_owed
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def _submit(self, exchange: Exchange | None) -> None:
        if exchange is None or self.sink is None or not exchange.done or exchange.traced:
            return
        exchange.traced = True
        if self.sink.failed:
            self._restart()
        self.sink.submit(exchange)
        if self.sink.failed and self.shared.defer_responses:
            self.shared.defer_responses = False  # no one left to read them: read them here
            logger.error("llm-mitm: the trace writer process is gone; responses are metered in the proxy again")


def _share_a_file(before: SinkSettings, after: SinkSettings) -> bool:
    """Two writers' settings that name one trace file or one directory (a new `max_bytes`
    or `keep` starts a new writer on the same file)."""
    def same(a: str | None, b: str | None) -> bool:  # the config has expanded `~` already
        return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)

    return same(before.destination, after.destination) or same(before.directory, after.directory)
