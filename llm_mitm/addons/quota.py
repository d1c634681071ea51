"""Rate limits and budgets (policy.rate_limits, policy.budgets): 429 with Retry-After."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path

from limits.storage import MemoryStorage
from mitmproxy import http

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config, ConfigError, trace_destination
from llm_mitm.estimate import BYTES_PER_TOKEN, prompt_tokens
from llm_mitm.exchange import Exchange
from llm_mitm.metering import GENERATING
from llm_mitm.policy import output_limit
from llm_mitm.pricing import cost_usd
from llm_mitm.quota import Caller, Holds, Quota, TokenWindows
from llm_mitm.spend import SpendStore
from llm_mitm.usage import Usage

SPEND_FILE = "llm-mitm-spend.sqlite"
# The most output a hold counts for one call: more than any model writes in one (the
# largest write 128k tokens, times `n`), where a limit of 1e9, or of no number, would hold
# a fortune and shut everyone else out.
HOLD_OUTPUT_CEILING = 1_000_000
ANSWERED_NAMES = 1024  # model names (Azure deployments) remembered with the model that answered them


def spend_path(config: Config) -> Path:
    """`usage.spend_db`, else beside the trace file, else in the working directory."""
    if config.usage.spend_db:
        return Path(config.usage.spend_db)
    destination = trace_destination(config)
    return (Path(destination).parent if destination else Path(".")) / SPEND_FILE


class QuotaAddon:
    """Checks before the call goes out; charges tokens and dollars when it ends."""
    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._windows = MemoryStorage()  # request windows, kept across config reloads
        self._holds = Holds()  # ... as what the calls in flight hold against budgets
        self._token_holds = Holds()  # ... and against token windows
        self._token_windows = TokenWindows()  # ... as the tokens charged in the last minute
        # The model that answered each name asked for (an Azure deployment, `prod-chat`: no
        # price of its own, but the answer's model has one), to price the next call's hold.
        self._answered: dict[str | None, str] = {}
        self._spend: SpendStore | None = None
        self.quota: Quota  # set by the stage, with each config
        shared.stage_config(self._stage)

    def _stage(self, config: Config) -> Callable[[], None]:
        """Opens the spend store a config names before it goes into force."""
        spend = self._spend
        if config.policy.budgets:
            path = spend_path(config)
            if spend is None or spend.path != path:
                spend = _open_spend(path, "usage.spend_db" if config.usage.spend_db else "spend store (beside the traces)")
        return partial(self._use, config, spend)

    def _use(self, config: Config, spend: SpendStore | None) -> None:
        if self._spend is not None and self._spend is not spend:
            self._spend.close()
        self._spend = spend
        # No budget (or token limit) to hold against: the calls in flight are not charged (the
        # concern goes idle), so nothing they hold would be given back once limits return (a
        # review: a token limit turned off and on refused every call for 15 minutes).
        if not config.policy.budgets:
            self._holds = Holds()
        if not any(rule.tokens_per_minute is not None for rule in config.policy.rate_limits):
            self._token_holds = Holds()
        self.quota = Quota(config.policy, self._windows, spend, self._holds, self._token_holds, self._token_windows)

    @property
    def active(self) -> bool:
        return self.quota.active

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is not None or not self.quota.active:
            return
        most = self._most_usage(exchange, priced=bool(self.quota.budgets)) if self.quota.holding else None
        most_usd = self._most_cost(exchange, most) if self.quota.budgets and most is not None else 0.0
        most_tokens = (most.input_tokens or 0) + (most.output_tokens or 0) if most is not None else 0
        refusal = self.quota.admit(_caller(exchange), exchange.id, most_usd, most_tokens)
        if refusal is not None:
            refuse(flow, exchange, 429, refusal.rule, refusal.detail, refusal.retry_after)

    def response(self, flow: http.HTTPFlow) -> None:
        self._charge(self.shared.exchange(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        self._charge(self.shared.exchange(flow))

    def done(self) -> None:
        if self._spend is not None:
            self._spend.close()
            self._spend = None

    def _most_usage(self, exchange: Exchange, priced: bool) -> Usage | None:
        """The tokens a call may use at most: its prompt (estimated) and all the output it
        allows, the model's maximum where it names no limit (none for a model of unknown
        maximum: a burst of such calls passed a budget together by their outputs); None for
        a call that does not generate. Against a token limit alone the prompt is its body's
        size in tokens (more than its texts; a review: reading every text of an agent's
        500 KB call took 0.76 ms on the event loop). A budget's hold still reads them, to
        price them."""
        body = exchange.request_json
        if exchange.route.operation not in GENERATING or not exchange.route.generates(exchange.method) or body is None:
            return None
        most = output_limit(exchange.route, body, self.shared.prices.max_output_tokens(exchange.model, self._answered.get(exchange.model)))
        output = None if most is None else int(min(most, HOLD_OUTPUT_CEILING))
        if not priced:
            return Usage(input_tokens=-(-exchange.request.size // BYTES_PER_TOKEN), output_tokens=output)
        try:
            return Usage(input_tokens=prompt_tokens(body), output_tokens=output)
        except RecursionError:  # a body nested past what can be walked: its output limit alone
            return Usage(output_tokens=output)

    def _most_cost(self, exchange: Exchange, most: Usage) -> float:
        """What those tokens cost: nothing for an unpriced model (a budget does not charge
        those either)."""
        price = self.shared.prices.price_for(exchange.model, self._answered.get(exchange.model))
        return 0.0 if price is None else cost_usd(most, price)

    def _charge(self, exchange: Exchange | None) -> None:
        if exchange is None or not exchange.done:
            return
        self.quota.release(exchange.id)  # however it ended
        if not self.quota.active or exchange.replay == "hit" or exchange.blocked or exchange.charged:
            return
        exchange.charged = True
        if exchange.response_model and exchange.cost_usd is not None and exchange.response_model != exchange.model:
            if len(self._answered) >= ANSWERED_NAMES:
                self._answered.clear()
            self._answered[exchange.model] = exchange.response_model
        tokens = exchange.usage.total_tokens if exchange.usage else None
        self.quota.charge(_caller(exchange), tokens, exchange.cost_usd)


def _open_spend(path: Path, key: str) -> SpendStore:
    try:
        return SpendStore(path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"{key}: {path}: cannot be opened: {exc}") from None


def _caller(exchange: Exchange) -> Caller:
    return Caller(api_key=exchange.api_key, client=exchange.client)
