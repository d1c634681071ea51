"""State the addons of one proxy share: the config in force and each flow's exchange."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from mitmproxy import http

from llm_mitm.config import Config, default_config
from llm_mitm.exchange import Exchange
from llm_mitm.policy import Policy
from llm_mitm.pricing import PriceTable
from llm_mitm.providers import ProviderMatcher
from llm_mitm.redact import Redactor
from llm_mitm.stats import UsageStats

ConfigListener = Callable[[Config], None]
# Does the part of taking a config that can fail (opening a file) and returns how to put
# the result in force, which cannot; raises ConfigError naming the key.
ConfigStage = Callable[[Config], Callable[[], None]]


def no_counts_owed(wait: float) -> None:
    """No writer process: every call was counted where it finished."""


class Shared:
    """Built once in addons/llm.py and handed to every addon."""

    def __init__(self, config: Config | None = None) -> None:
        self._listeners: list[ConfigListener] = []
        self._stages: list[ConfigStage] = []
        self.exchanges: weakref.WeakKeyDictionary[http.HTTPFlow, Exchange] = weakref.WeakKeyDictionary()
        # Each hook asks for the flow's exchange once per concern: remember the last answer.
        self._last: tuple[http.HTTPFlow | None, Exchange | None] = (None, None)
        self.usage_stats = UsageStats()
        # Responses left to the trace writer process (when it runs and nothing here reads
        # them), and how to bring in the counts it has not reported yet: set by the Tracer.
        self.defer_responses = False
        self.collect_counts: Callable[[float], None] = no_counts_owed
        # Set when the proxy begins to shut down: mitmproxy goes on taking calls until the
        # process ends, after the trace writer and the spend store have closed.
        self.stopping = False
        self.apply(config or default_config())

    def apply(self, config: Config) -> None:
        """Put a validated config in force and tell the addons that derive state from it.

        All or nothing: every stage runs before anything changes, so a config one of them
        refuses (ConfigError) leaves the one in force whole."""
        commits = [stage(config) for stage in self._stages]
        matcher, redactor = ProviderMatcher(config.enabled_providers), Redactor(**config.redaction.redactor_options())
        policy, prices = Policy(config.policy), PriceTable(config.pricing.models)
        self.config, self.matcher, self.redactor, self.policy, self.prices = config, matcher, redactor, policy, prices
        for commit in commits:
            commit()
        for listener in self._listeners:
            listener(config)

    def on_config(self, listener: ConfigListener, now: bool = True) -> None:
        """Call `listener` with every config put in force (and with this one, if `now`)."""
        self._listeners.append(listener)
        if now:
            listener(self.config)

    def stage_config(self, stage: ConfigStage) -> None:
        """Run `stage` on every config before it is put in force, this one included."""
        self._stages.append(stage)
        stage(self.config)()

    def exchange(self, flow: http.HTTPFlow) -> Exchange | None:
        last_flow, last_exchange = self._last
        if flow is last_flow:
            return last_exchange
        exchange = self.exchanges.get(flow)
        self._last = (flow, exchange)
        return exchange

    def open_calls(self) -> int:
        """Calls recorded and not yet finished (at shutdown: still being answered)."""
        return sum(not exchange.done for exchange in list(self.exchanges.values()))

    def record(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        self.exchanges[flow] = exchange
        self._last = (flow, exchange)
