"""Keeps secrets out of what mitmproxy itself prints: flow lines and log records."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import orjson
from mitmproxy import ctx, http

from llm_mitm.addons.shared import Shared
from llm_mitm.redact import RedactingFilter, without_spelled_secrets


logger = logging.getLogger("llm_mitm")

# At flow_detail 1 mitmdump cuts a long URL to the terminal's width, maybe inside a key,
# before anything here sees it: a key cut short has no shape left to be found by, so the cut
# word goes (`?key=3f9a…` -> `?key=…`).
_CUT_TAIL = re.compile(r"[^\s/?&=#;…]{4,}…")


class OutputRedaction:
    """Wraps mitmdump's flow printer and filters the log handlers through the redactor.

    mitmdump prints URLs (and at -v headers and bodies) of every flow; a key in a query
    string or an Authorization header would otherwise land in the terminal or a log file.
    """

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._filter = RedactingFilter(lambda: self.shared.redactor)  # follows config reloads
        self._handlers: list[logging.Handler] = []

    def running(self) -> None:
        dumper = ctx.master.addons.get("dumper")
        if dumper is not None and not getattr(dumper, "_llm_mitm_redacted", False):
            self._wrap(dumper)
        for handler in logging.getLogger().handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
                self._handlers.append(handler)

    def _wrap(self, dumper: Any) -> None:
        """Every text the dumper prints goes through `Redactor.printout`. While it prints a
        flow's headers and bodies (flow_detail 2 and up), the credentials that flow's request
        sent are known too, so that upstream's echo of a key of no known shape is found
        (an error quoting it, a header): what that costs is paid only where mitmdump formats
        headers and bodies itself, never at the default flow_detail (the URL alone)."""
        echo = dumper.echo
        sent: dict[str, str] = {}  # of the flow being printed

        def redacted_echo(text: str, ident: int | None = None, **style: object) -> None:
            if "…" in text and ctx.options.flow_detail == 1:  # a URL cut to the terminal's width
                text = _CUT_TAIL.sub("…", text)
            echo(self.shared.redactor.printout(text, sent), ident, **style)

        def knowing_its_credentials(printer: Callable[[Any], None]) -> Callable[[Any], None]:
            """`printer` of a flow, with the credentials its request sent known meanwhile: a
            flow, and a WebSocket's messages and end, printed apart from it (a secrets probe:
            a realtime message echoing a key of no shape was printed whole)."""
            def printing(flow: Any) -> None:
                request = getattr(flow, "request", None)
                if request is not None and ctx.options.flow_detail >= 2:
                    sent.update(self.shared.redactor.sent_credentials(request.headers.items(multi=True), request.url))
                try:
                    printer(flow)
                finally:
                    sent.clear()
            return printing

        dumper.echo = redacted_echo
        for name in ("echo_flow", "websocket_message", "websocket_end"):
            setattr(dumper, name, knowing_its_credentials(getattr(dumper, name)))
        dumper._llm_mitm_redacted = True
        echo_message = getattr(dumper, "_echo_message", None)  # mitmproxy's own, not its API: looked for, not counted on
        if not callable(echo_message):
            logger.warning("llm-mitm: this mitmproxy prints bodies in a way llm-mitm does not know: an answer's logprobs that spell "
                           "a secret, or a secret cut across a message's text parts, are printed as they came at flow_detail 3 and 4")
            return

        def echo_message_shown(message: Any, flow: Any) -> None:
            """A body (flow_detail 3 and up) as mitmdump prints it, from a copy safe to print
            where the line-by-line redaction of the printout cannot see a secret: see `_shown`."""
            echo_message(self._shown(message, sent) or message, flow)

        dumper._echo_message = echo_message_shown

    def _shown(self, message: Any, sent: dict[str, str]) -> http.Message | None:
        """A copy of a JSON body with what no printed line holds enough of to be found hidden
        (as its trace keeps it): an answer's logprobs that spell a secret a few characters a
        line, a secret cut across a message's text parts (a part a line). None for a body
        printed as it is."""
        if not isinstance(message, http.Message):  # a WebSocket message: printed as it is, line-redacted
            return None
        content = message.get_content(strict=False)
        if not content or content.lstrip()[:1] not in (b"{", b"["):  # JSON whatever its type says: some servers send it as text/plain
            return None
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None
        redactor = self.shared.redactor
        shown = without_spelled_secrets(body, redactor, sent) if isinstance(message, http.Response) else body
        shown = redactor.json(shown)  # texts read joined, as the trace reads them (it passes a body over when it finds nothing)
        if shown == body:
            return None
        copy = message.copy()
        copy.content = orjson.dumps(shown)
        return copy

    def done(self) -> None:
        for handler in self._handlers:
            handler.removeFilter(self._filter)
        self._handlers.clear()
