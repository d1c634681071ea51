"""Spend and counts per key and model since start (the `llm.stats` command)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_mitm.memo import Memo

# One call: api key, model, input and output tokens, cost, error, blocked.
CountRow = tuple[str | None, str | None, int | None, int | None, float | None, bool, bool]


class ShownModels:
    """A model's name as a count row gives it: as its trace shows it (`shown`, which hides a
    key the caller sent in it, whatever its shape), worked out once per caller, model and
    way of showing (a secrets probe: `llm.stats` printed such a key whole)."""

    def __init__(self) -> None:
        self._names: Memo[tuple[object, str | None, str, Callable[[str], str]], str] = Memo(lambda arg: arg[3](arg[2]), key=lambda arg: arg[:3])

    def __call__(self, model: str | None, api_key: str | None, shows: object, shown: Callable[[str], str]) -> str | None:
        """`shows`: what `shown` depends on besides its text (the redactor in use)."""
        return None if model is None else self._names((shows, api_key, model, shown))


@dataclass
class Tally:
    """Counts of calls; shared by llm.stats (live) and `llm-mitm stats` (from traces)."""

    requests: int = 0
    errors: int = 0
    blocked: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0

    def count(self, input_tokens: int | None, output_tokens: int | None, cost_usd: float | None, error: bool, blocked: bool) -> None:
        self.requests += 1
        self.errors += error and not blocked
        self.blocked += blocked
        self.input_tokens += input_tokens or 0
        self.output_tokens += output_tokens or 0
        if cost_usd is None:  # used tokens and has no cost: its model has no price
            self.unpriced += input_tokens is not None or output_tokens is not None
        else:
            self.cost_usd += cost_usd

    def merge(self, other: Tally) -> None:
        for name in ("requests", "errors", "blocked", "input_tokens", "output_tokens", "cost_usd", "unpriced"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class UsageStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.rows: dict[tuple[str, str], Tally] = {}

    def add(self, row: CountRow) -> None:
        api_key, model, input_tokens, output_tokens, cost_usd, error, blocked = row
        key = (api_key or "-", model or "-")
        tally = self.rows.get(key)
        if tally is None:
            tally = self.rows[key] = Tally()
        tally.count(input_tokens, output_tokens, cost_usd, error, blocked)

    def total(self) -> Tally:
        total = Tally()
        for tally in self.rows.values():
            total.merge(tally)
        return total

    def summary(self) -> str:
        t = self.total()
        return (
            f"llm-mitm: {t.requests} calls ({t.errors} errors, {t.blocked} blocked), "
            f"{t.input_tokens} in / {t.output_tokens} out tokens, ${t.cost_usd:.4f} since start"
        )

    def table(self) -> str:
        header = ("api_key", "model", "requests", "errors", "blocked", "input", "output", "cost_usd")
        rows = [header] + [
            (key, model, str(t.requests), str(t.errors), str(t.blocked), str(t.input_tokens), str(t.output_tokens),
             f"{t.cost_usd:.6f}" + (f" (+{t.unpriced} unpriced)" if t.unpriced else ""))
            for (key, model), t in sorted(self.rows.items(), key=lambda item: -item[1].cost_usd)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return "\n".join([f"since {since}", *lines, self.summary()])
