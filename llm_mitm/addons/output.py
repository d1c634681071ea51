"""Keeps secrets out of what mitmproxy itself prints: flow lines and log records."""

from __future__ import annotations

import logging

from mitmproxy import ctx

from llm_mitm.addons.shared import Shared


class _RedactingFilter(logging.Filter):
    def __init__(self, shared: Shared) -> None:
        super().__init__("llm_mitm")
        self.shared = shared

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.shared.redactor.log_line(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class OutputRedaction:
    """Wraps mitmdump's flow printer and filters the log handlers through the redactor.

    mitmdump prints URLs (and at -v headers and bodies) of every flow; a key in a query
    string or an Authorization header would otherwise land in the terminal or a log file.
    """

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._filter = _RedactingFilter(shared)
        self._handlers: list[logging.Handler] = []

    def running(self) -> None:
        dumper = ctx.master.addons.get("dumper")
        if dumper is not None and not getattr(dumper, "_llm_mitm_redacted", False):
            echo = dumper.echo
            redactor = lambda: self.shared.redactor  # noqa: E731 - follows config reloads

            def redacted_echo(text: str, ident: int | None = None, **style: object) -> None:
                echo("\n".join(redactor().log_line(line) for line in text.split("\n")), ident, **style)

            dumper.echo = redacted_echo
            dumper._llm_mitm_redacted = True
        for handler in logging.getLogger().handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
                self._handlers.append(handler)

    def done(self) -> None:
        for handler in self._handlers:
            handler.removeFilter(self._filter)
        self._handlers.clear()
