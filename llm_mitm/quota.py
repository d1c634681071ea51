"""Rate limits and budgets: checked before a call goes out, charged when it finishes.

Requests are counted when admitted; tokens and dollars are charged when a call ends
(streams included), so a call that crosses a limit completes and the *next* one is
refused. Until it ends, an admitted call holds what it may cost at most (its prompt and
the output it allows) against its budgets and token windows: else a burst of calls
admitted together, each before any was charged, passed a limit by all they used. Requests
are counted in the `limits` library's moving one-minute window (one entry per request,
exact); tokens in `TokenWindows`, one entry per charged call. Spend lives in a SpendStore
(SQLite) so budgets survive a restart.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from llm_mitm.config import BudgetConfig, PolicyConfig, RateLimitConfig
from llm_mitm.spend import SpendStore, seconds_left


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    rule: str
    detail: str
    retry_after: int


HELD_RETRY_SECONDS = 1  # a budget held by calls in flight: they end, or give back what they held, soon
HOLD_SECONDS = 900.0  # a hold no end of its call gave back (none should stay) is let go after this
WINDOW_SECONDS = 60.0  # of a tokens_per_minute window


@dataclass(frozen=True, slots=True)
class Caller:
    api_key: str | None
    client: str

    def scope(self, per: str) -> str:
        if per == "api_key":
            return f"api_key:{self.api_key or 'none'}"
        if per == "client":
            return f"client:{self.client}"
        return "global"

    def former_scope(self, per: str) -> str | None:
        """The key's scope as spend was kept under before fingerprints had 16 hex digits
        (their first 8): what it spent then still counts (a review: its budget began anew)."""
        kind, mark, digest = (self.api_key or "").rpartition("#")
        return f"api_key:{kind}#{digest[:8]}" if per == "api_key" and mark and len(digest) == 16 else None


def limits_set(policy: PolicyConfig) -> bool:
    """Whether the policy limits anything (then each call is charged as it ends)."""
    return bool(policy.rate_limits or policy.budgets)


class Holds:
    """What the calls in flight may still cost (USD, or tokens), per budget scope or token
    window: held at admission, given back when the call is charged (or ends without a charge)."""

    def __init__(self) -> None:
        self._calls: dict[str, tuple[tuple[str, ...], float, float]] = {}  # call -> (scopes, amount, since); oldest first
        self._held: dict[str, float] = {}

    def held(self, scope: str) -> float:
        return self._held.get(scope, 0.0)

    def calls(self) -> int:
        return len(self._calls)

    def hold(self, call: str, scopes: tuple[str, ...], amount: float) -> None:
        self.release(call)
        self._calls[call] = (scopes, amount, time.monotonic())
        for scope in scopes:
            self._held[scope] = self._held.get(scope, 0.0) + amount

    def release(self, call: str) -> None:
        scopes, amount, _ = self._calls.pop(call, ((), 0.0, 0.0))
        for scope in scopes:
            left = self._held.get(scope, 0.0) - amount
            if left > 1e-12:
                self._held[scope] = left
            else:
                self._held.pop(scope, None)  # nothing held: no float dust left to refuse by

    def expire(self, now: float) -> None:
        """Lets go of holds older than HOLD_SECONDS (oldest first, so the loop stops early)."""
        while self._calls:
            call, (_, _, since) = next(iter(self._calls.items()))
            if now - since < HOLD_SECONDS:
                return
            self.release(call)


class TokenWindows:
    """Tokens charged in the last minute, per window: one entry per charged call (when, and
    how many), kept while it is in the window. `limits`' moving window keeps an entry per
    token (at 10M tokens a minute 150 MB, and tens of milliseconds of the proxy's loop a
    call), and its sliding window counter weighs the last clock minute's count by the share
    of it still covered: a window filled before a minute's end admitted calls again as the
    next began, and a call past the limit was charged only what was left, so a client could
    go on past a limit of 30 a minute with a 500-token call every few seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._charges: dict[str, deque[tuple[float, int]]] = {}
        self._used: dict[str, int] = {}

    def used(self, window: str) -> int:
        self._expire(window)
        return self._used.get(window, 0)

    def charge(self, window: str, tokens: int) -> None:
        """All of a call's tokens, past the limit or not: the next call waits until they leave."""
        self._expire(window)
        self._charges.setdefault(window, deque()).append((self._clock(), tokens))
        self._used[window] = self._used.get(window, 0) + tokens

    def seconds_until_below(self, window: str, limit: int) -> float:
        """How long until less than `limit` is used in `window` (0: it is now)."""
        used, leaves = self.used(window), self._clock()
        for at, tokens in self._charges.get(window, ()):
            if used < limit:
                break
            used, leaves = used - tokens, at + WINDOW_SECONDS
        return max(0.0, leaves - self._clock())

    def _expire(self, window: str) -> None:
        charges = self._charges.get(window)
        if not charges:
            return
        since = self._clock() - WINDOW_SECONDS
        while charges and charges[0][0] <= since:
            self._used[window] -= charges.popleft()[1]
        if not charges:  # a window no call used this minute costs nothing
            del self._charges[window], self._used[window]


class Quota:
    def __init__(self, policy: PolicyConfig, storage: Storage | None = None, spend: SpendStore | None = None,
                 holds: Holds | None = None, token_holds: Holds | None = None, token_windows: TokenWindows | None = None) -> None:
        self.rate_limits: list[RateLimitConfig] = policy.rate_limits
        self.budgets: list[BudgetConfig] = policy.budgets
        self.spend = spend
        self.holds = holds or Holds()
        self.token_holds = token_holds or Holds()
        self.active = limits_set(policy)
        # Whether an admitted call holds anything: what it may use is read from its body only then.
        self.holding = bool(self.budgets) or any(rule.tokens_per_minute is not None for rule in self.rate_limits)
        self._requests = MovingWindowRateLimiter(storage or MemoryStorage())
        self.token_windows = token_windows or TokenWindows()

    def admit(self, caller: Caller, call: str | None = None, most_usd: float = 0.0, most_tokens: int = 0) -> QuotaRefusal | None:
        """Refuse if a budget is spent, or held by the calls in flight, or a token window is
        full (or held), or a request window; else count the request and hold `most_usd` and
        `most_tokens` for `call` against its budgets and token windows. Where several rules
        refuse, the longest wait is given: a client told to retry sooner is refused again."""
        token_windows = self._token_windows(caller)
        # Every request window is tested before any is counted: a call one rule refuses
        # must not use up the others' windows (one noisy key filling the global one).
        windows = [(limit, RateLimitItemPerMinute(limit), ids) for limit, ids in self._windows("requests_per_minute", caller)]
        refusals = [
            *self._budget_refusals(caller, most_usd),
            *self._token_refusals(token_windows, most_tokens),
            *(self._requests_refusal(limit, item, ids) for limit, item, ids in windows if not self._requests.test(item, *ids)),
        ]
        if refusals:
            return max(refusals, key=lambda refusal: refusal.retry_after)
        for _, item, ids in windows:
            self._requests.hit(item, *ids)
        scopes = tuple({caller.scope(budget.per) for budget in self.budgets if budget.hold_in_flight})
        if call is not None and most_usd > 0 and scopes and self.spend is not None:
            self.holds.hold(call, scopes, most_usd)
        if call is not None and most_tokens > 0 and token_windows:
            self.token_holds.hold(call, _each_window(token_windows), most_tokens)
        return None

    def release(self, call: str) -> None:
        """Gives back what a call held, however it ended."""
        self.holds.release(call)
        self.token_holds.release(call)

    def _budget_refusals(self, caller: Caller, most_usd: float) -> Iterator[QuotaRefusal]:
        """A spent budget refuses every call (until its day or month ends); one the calls in
        flight hold refuses a call that may cost something (a list of models costs nothing
        and is let through)."""
        if self.spend is None or not self.budgets:
            return
        now = datetime.now(UTC)
        self.holds.expire(time.monotonic())
        for budget in self.budgets:
            scope = caller.scope(budget.per)
            former = caller.former_scope(budget.per)
            for period, limit in (("day", budget.usd_per_day), ("month", budget.usd_per_month)):
                if limit is None:
                    continue
                spent = self.spend.total(scope, period, now) + (self.spend.total(former, period, now) if former else 0.0)
                holding = self.holds.held(scope)
                if spent >= limit:
                    yield QuotaRefusal(
                        f"usd_per_{period}",
                        f"budget usd_per_{period} {limit:g} for {scope} is spent ({spent:.4f} USD)",
                        seconds_left(period, now),
                    )
                elif budget.hold_in_flight and most_usd > 0 and spent + holding >= limit:
                    yield QuotaRefusal(
                        f"usd_per_{period}",
                        f"budget usd_per_{period} {limit:g} for {scope} is held by the calls in flight ({spent:.4f} USD spent, "
                        f"up to {holding:.4f} more on its way)",
                        HELD_RETRY_SECONDS,
                    )

    def _token_refusals(self, windows: list[tuple[int, str, str]], most_tokens: int) -> Iterator[QuotaRefusal]:
        """A full token window refuses every call; one the calls in flight hold refuses a
        call that uses tokens."""
        self.token_holds.expire(time.monotonic())
        for limit, window, scope in windows:
            holding, used = int(self.token_holds.held(window)), self.token_windows.used(window)
            if used >= limit:
                wait = self.token_windows.seconds_until_below(window, limit)
                yield _reached("tokens_per_minute", limit, scope, math.ceil(wait) or 1)
            elif most_tokens > 0 and holding and used + holding >= limit:
                yield QuotaRefusal(
                    "tokens_per_minute",
                    f"rate limit tokens_per_minute {limit} for {scope} is held by the calls in flight (up to {holding} tokens on their way)",
                    HELD_RETRY_SECONDS,
                )

    def charge(self, caller: Caller, tokens: int | None, usd: float | None) -> None:
        if tokens:
            for window in _each_window(self._token_windows(caller)):
                self.token_windows.charge(window, tokens)
        if usd and self.spend is not None:
            for scope in {caller.scope(budget.per) for budget in self.budgets}:
                self.spend.add(scope, usd)

    def _windows(self, kind: str, caller: Caller) -> list[tuple[int, tuple[str, ...]]]:
        """(limit, identifiers) of each rule that sets `kind`, a rule written twice once. A
        window is named by its kind and the caller's scope, not by the rule's place in the
        list: adding, removing or moving another rule keeps its count (a review: an unchanged
        rule moved down the list began a new window, and the limit was passed)."""
        return list(dict.fromkeys((limit, (kind, caller.scope(rule.per))) for rule in self.rate_limits if (limit := getattr(rule, kind)) is not None))

    def _token_windows(self, caller: Caller) -> list[tuple[int, str, str]]:
        """(limit, window, scope) of every tokens_per_minute rule: the window is what its
        charges and holds are kept by."""
        return [(limit, "/".join(ids), ids[-1]) for limit, ids in self._windows("tokens_per_minute", caller)]

    def _requests_refusal(self, limit: int, item: RateLimitItemPerMinute, ids: tuple[str, ...]) -> QuotaRefusal:
        reset = self._requests.get_window_stats(item, *ids).reset_time
        return _reached("requests_per_minute", limit, ids[-1], int(reset - time.time()) + 1)


def _each_window(windows: list[tuple[int, str, str]]) -> tuple[str, ...]:
    """Each token window once: two limits on one scope count the same tokens."""
    return tuple(dict.fromkeys(window for _, window, _ in windows))


def _reached(rule: str, limit: int, scope: str, retry_after: int) -> QuotaRefusal:
    """A full window's refusal, worded alike for requests and tokens."""
    return QuotaRefusal(rule, f"rate limit {rule} {limit} for {scope} reached", retry_after)
