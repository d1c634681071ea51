"""Replay: answer LLM calls from recorded traces instead of calling upstream.

For testing LLM applications offline and deterministically. `replay.mode: on` answers
what it has and sends the rest upstream (recording it, so the next identical call is a
hit); `strict` answers a miss with an error. Every answer says which:
`X-LLM-Mitm-Replay: HIT|MISS`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from functools import partial

import orjson
from mitmproxy import http

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config, ConfigError, trace_destination
from llm_mitm.exchange import Exchange
from llm_mitm.replay import Recorded, ReplayIndex, as_stream, features, request_key, settled, tenant

logger = logging.getLogger("llm_mitm.replay")

HEADER = "X-LLM-Mitm-Replay"
# Answers a session records in memory (`mode: on`), by their bodies' size as they came (as
# Python objects they take 2-9 times that): a proxy left running would otherwise grow with
# every new call. Past it, calls still go upstream and into the traces.
SESSION_BYTES = 64 * 1024 * 1024


def _set_up_warnings(config: Config) -> tuple[str, ...]:
    """Set-ups that take no error yet answer nothing from a file: strict with nothing to
    read (every call a 404), and traces without bodies as the source (the README: replay
    needs traces.bodies: full; what they record now is never answered after a restart)."""
    mode, destination = config.replay.mode, trace_destination(config)
    if mode == "off":
        return ()
    source = config.replay.source or destination
    warnings: list[str] = []
    if source is None and mode == "strict":
        warnings.append("llm-mitm: replay.mode strict has no recorded answers to read (no replay.source, traces.destination null): "
                        "every call is answered 404 replay_miss; name a trace file or traces.directory in replay.source")
    written = {os.path.abspath(path) for path in (destination, config.traces.directory) if path}
    if config.traces.bodies != "full" and source is not None and os.path.abspath(source) in written:
        warnings.append(f"llm-mitm: replay.mode {mode} with traces.bodies: {config.traces.bodies}: the calls traced keep no bodies to "
                        "answer from, so none of them is replayed after a restart (replay needs traces.bodies: full)")
    return tuple(warnings)


class Replay:
    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.index = ReplayIndex()
        self._source: str | None = None
        self._misses: weakref.WeakKeyDictionary[http.HTTPFlow, bytes] = weakref.WeakKeyDictionary()  # key per flow, made once
        self._warned: tuple[str, ...] = ()  # the set-up warnings of the config in force, named once
        self._session_bytes = 0  # of the answers recorded in memory since the proxy started
        self._full = False  # ... and SESSION_BYTES reached (said once)
        self._unreplayable: set[tuple[bytes | None, bool]] = set()  # recordings (and whether streamed) that failed, said once
        shared.stage_config(self._stage)

    def _stage(self, config: Config) -> Callable[[], None]:
        """Reads the recorded answers a config names, and names a set-up that cannot answer."""
        use, warnings = self._stage_index(config), _set_up_warnings(config)

        def commit() -> None:
            use()
            for line in warnings:
                if line not in self._warned:  # a reload of the same set-up says it again no more
                    logger.warning(line)
            self._warned = warnings

        return commit

    def _stage_index(self, config: Config) -> Callable[[], None]:
        """Reads the recorded answers a config names before it goes into force."""
        if config.replay.mode == "off":
            return partial(self._use, ReplayIndex(), None)
        source = config.replay.source or trace_destination(config)
        if source == self._source:
            return lambda: None
        index = ReplayIndex()
        if source:
            try:
                index.load(source)
            except OSError as exc:
                key = "replay.source" if config.replay.source else "traces.destination (replay's source)"
                raise ConfigError(f"{key}: {source}: cannot be read: {exc.strerror or exc}") from None
        if config.replay.source and not os.path.exists(source):  # a typo would answer nothing (strict: every call a 404)
            logger.warning("llm-mitm: replay.source %s does not exist: no recorded answers (a miss %s)", source,
                           "is answered 404" if config.replay.mode == "strict" else "goes upstream and is recorded in memory")
        else:
            logger.info("llm-mitm: replay %s: %d recorded answers from %s", config.replay.mode, len(index), source)
        return partial(self._use, index, source)

    def _use(self, index: ReplayIndex, source: str | None) -> None:
        self.index, self._source = index, source

    @property
    def active(self) -> bool:
        """On, or still finishing misses that started before it was turned off."""
        return self.shared.config.replay.mode != "off" or bool(self._misses)

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        mode = self.shared.config.replay.mode
        if exchange is None or flow.response is not None or mode == "off":
            return
        key = answer = None
        try:
            key = self._key(exchange)
            recorded = self.index.find(key) if key is not None else None
            answer = _answer(exchange, recorded) if recorded is not None else None
        except Exception:  # strict promises nothing goes upstream: a call it cannot answer is refused, not let through
            if (key, exchange.stream) not in self._unreplayable:  # said once a recording and shape
                self._unreplayable.add((key, exchange.stream))
                logger.exception("llm-mitm: replay could not answer this call; %s", "it is refused (replay.mode: strict)" if mode == "strict" else "it goes upstream")
            if mode == "strict":
                return _refuse_miss(flow, exchange, 500, "replay_error", "the recorded answer for this request could not be replayed (replay.mode: strict)")
        if answer is None:
            if mode == "strict":
                return _refuse_miss(flow, exchange, 404, "replay_miss", "no recorded answer for this request (replay.mode: strict)")
            exchange.replay = "miss"
            if key is not None:  # recorded when it comes back (over a recording that could not be replayed)
                self._misses[flow] = key
            return
        status, content, kind = answer
        exchange.replay = "hit"  # once answered: a failure before went upstream marked a hit (uncharged)
        flow.response = http.Response.make(status, content, {"content-type": kind, HEADER: "HIT"})
        flow.comment = "llm-mitm: replayed from a recorded trace"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is not None and exchange.replay == "miss" and flow.response is not None:
            flow.response.headers[HEADER] = "MISS"

    def response(self, flow: http.HTTPFlow) -> None:
        """A miss that went upstream is recorded, so the same call is a hit next time."""
        exchange, key = self.shared.exchange(flow), self._misses.pop(flow, None)
        if exchange is None or key is None or flow.response is None:
            return
        status = exchange.status_code or 0
        if 200 <= status < 300 and not exchange.error and exchange.response.is_json and (exchange.method != "GET" or settled(exchange.response.json)):
            if self._session_bytes + exchange.response.size > SESSION_BYTES:
                if not self._full:
                    self._full = True
                    logger.warning("llm-mitm: replay has recorded %d MiB of answers in memory this session, its most: later misses go "
                                   "upstream each time (their traces are kept as ever)", SESSION_BYTES // (1024 * 1024))
                return
            self._session_bytes += exchange.response.size
            body = self.shared.redactor.json(exchange.response.json)
            self.index.answers[key] = Recorded(exchange.route.api, exchange.route.operation, status, body)

    def _key(self, exchange: Exchange) -> bytes | None:
        """None for a body that is not JSON (an upload, text): the trace keeps no more than
        a sample of it, so two different ones would look the same and share an answer."""
        request, redactor = exchange.request, self.shared.redactor
        if request.size and not request.is_json:
            return None
        body = redactor.json(request.json) if request.is_json else None
        headers = redactor.headers_dict(exchange.request_headers)  # as the trace holds them, which a restart reads back
        caller = exchange.api_key or headers.get("cookie")  # a session's cookie, where no key is sent
        return request_key(exchange.route.provider, exchange.method, redactor.url(exchange.url),
                           tenant(caller, exchange.organization, exchange.project, headers), body, features(exchange.request_headers))


def _refuse_miss(flow: http.HTTPFlow, exchange: Exchange, status: int, rule: str, detail: str) -> None:
    """Strict mode's answer to a call it has no answer for: nothing goes upstream."""
    exchange.replay = "miss"
    refuse(flow, exchange, status, rule, detail)
    flow.response.headers[HEADER] = "MISS"


def _answer(exchange: Exchange, recorded: Recorded) -> tuple[int, bytes, str]:
    """The recorded answer as this call asks for it (a stream or whole): status, body, type."""
    # Gemini's stream without alt=sse is a JSON array of its responses (Claude's on Vertex is Anthropic's SSE)
    if exchange.route.streams and exchange.route.operation == "generate_content" and "alt=sse" not in exchange.url:
        return recorded.status, orjson.dumps(recorded.body if isinstance(recorded.body, list) else [recorded.body]), "application/json"
    if exchange.stream:
        return recorded.status, as_stream(recorded, exchange.asks_stream_usage), "text/event-stream"
    return recorded.status, orjson.dumps(recorded.body), "application/json"
