"""Usage where the API gave none (estimated), and the cost of a finished call. Pure: the
Meter addon runs it in the proxy, the trace writer process for responses it reads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_mitm.estimate import estimate_usage, with_estimated_output
from llm_mitm.pricing import PriceTable, cost_usd
from llm_mitm.providers import GENERATING_ENDPOINTS
from llm_mitm.usage import Usage

logger = logging.getLogger("llm_mitm.meter")

GENERATING = tuple(GENERATING_ENDPOINTS)
WRITING = tuple(operation for operation in GENERATING if operation != "embeddings")  # those whose output is tokens


@dataclass(frozen=True, slots=True)
class Call:
    """What metering needs to know about one finished call."""

    operation: str
    model: str | None  # the one that answered, else the one asked for
    usage: Usage | None
    request_json: Any
    response_json: Any
    error: bool
    charged: bool  # went upstream and was answered by it (not refused, not replayed)
    status_code: int | None = None  # the answer's; None when none came
    generates: bool = True  # asked for new output (`Route.generates`), not for a stored answer
    runs_model: bool = True  # ran a model (`Route.runs_a_model`): not a stored run or batch read back
    asked: str | None = None  # the model asked for (Azure: the deployment)
    # A text as the trace shows it, a credential the request sent hidden (a model's name may
    # hold one: it was logged whole where the trace hid it); asked for only to log it.
    shown: Callable[[str], str] | None = None


class Metering:
    def __init__(self, prices: PriceTable, estimate_missing: bool) -> None:
        self.prices = prices
        self.estimate_missing = estimate_missing
        self._unpriced: set[str] = set()  # named in a warning once, whatever the config changes

    def reprice(self, prices: PriceTable, estimate_missing: bool) -> None:
        """A config change: new prices, the same memory of the models already warned about."""
        self.prices = prices
        self.estimate_missing = estimate_missing

    def meter(self, call: Call) -> tuple[Usage | None, float | None]:
        """(usage, cost in USD); either is None where it cannot be known."""
        if not call.charged:  # refused, or answered from a recording: nothing was used upstream
            return None, None
        if call.operation not in GENERATING:
            # an image's, a transcription's tokens; a stored run's or batch's usage read back
            # (polled) was the call's that ran it, not this one's (a review: polls were charged)
            return (call.usage if call.runs_model else None), None
        if not call.generates:  # a stored answer read back (polled, resumed) or cancelled: its usage was the creating call's
            return None, None
        usage = call.usage
        # A stream cut short (the client went, upstream reset) has generated tokens but never
        # got to its usage chunk: estimated, so that limits and budgets still see it. An answer
        # that is its error alone (an `overloaded_error` event first, a 200 with an error body)
        # is as an error status is: nothing to estimate (a probe: it was charged its input).
        answered = call.status_code is not None and call.status_code < 400 and not _is_error_alone(call.response_json)  # though perhaps cut short
        if self.estimate_missing and (not call.error or answered):
            try:
                if usage is None:
                    usage = estimate_usage(call.request_json, call.response_json)
                elif usage.output_tokens is None and call.operation in WRITING:
                    usage = with_estimated_output(usage, call.response_json)
            except RecursionError:  # a body nested past what can be walked: no estimate, not a failed hook
                usage = call.usage
        if usage is None:
            return None, None
        price = self.prices.price_for(call.asked, call.model)
        if price is None:
            if call.model and call.model not in self._unpriced:
                self._unpriced.add(call.model)
                name = call.shown(call.model) if call.shown is not None else call.model
                logger.warning("llm-mitm: no price for model %r: its cost is null (add it under pricing.models)", name)
            return usage, None
        return usage, cost_usd(usage, price)


_ANSWER_KEYS = ("choices", "output", "content", "completion", "data")


def _is_error_alone(body: Any) -> bool:
    """An answer that holds an error and nothing of an answer."""
    return isinstance(body, dict) and bool(body.get("error")) and not any(key in body for key in _ANSWER_KEYS)
