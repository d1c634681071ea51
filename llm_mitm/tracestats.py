"""`llm-mitm stats`: totals and latency percentiles per model, key, day, provider or operation.

Percentiles come from a log-bucket histogram (2% wide buckets), so memory stays bounded
whatever the size of the file and the error stays under 2%.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llm_mitm.stats import Tally
from llm_mitm.tracefile import printable

GROUPINGS = ("model", "key", "day", "provider", "operation")
_GROWTH = 1.02


class LogHistogram:
    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, value: float) -> None:
        self.buckets[self._bucket(value)] = self.buckets.get(self._bucket(value), 0) + 1
        self.count += 1

    def percentile(self, share: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(share * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return 0.0 if bucket < 0 else _GROWTH ** (bucket + 0.5)
        return None

    @staticmethod
    def _bucket(value: float) -> int:
        return -1 if value < 1 else int(math.log(value, _GROWTH))


@dataclass
class Group(Tally):
    latency: LogHistogram = field(default_factory=LogHistogram)
    ttfb: LogHistogram = field(default_factory=LogHistogram)

    def add(self, record: dict[str, Any]) -> None:
        blocked = (record.get("policy") or {}).get("decision") == "block"
        usage = record.get("usage") or {}
        self.count(usage.get("input_tokens"), usage.get("output_tokens"), record.get("cost_usd"), bool(record.get("error")), blocked)
        if not blocked:
            if isinstance(record.get("duration_ms"), (int, float)):
                self.latency.add(record["duration_ms"])
            if isinstance(record.get("ttfb_ms"), (int, float)):
                self.ttfb.add(record["ttfb_ms"])

    def row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "blocked": self.blocked,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 10),
            "unpriced": self.unpriced,  # calls that used tokens of a model with no price: not in cost_usd
            "p50_ms": _round(self.latency.percentile(0.5)),
            "p95_ms": _round(self.latency.percentile(0.95)),
            "ttfb_p50_ms": _round(self.ttfb.percentile(0.5)),
            "ttfb_p95_ms": _round(self.ttfb.percentile(0.95)),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def group_key(record: dict[str, Any], by: str) -> str:
    if by == "key":
        return record.get("api_key") or "-"
    if by == "day":
        return str(record.get("timestamp", ""))[:10] or "-"
    if by == "model":
        return record.get("response_model") or record.get("model") or "-"
    return str(record.get(by) or "-")


def aggregate(records: Iterable[dict[str, Any]], by: str) -> tuple[dict[str, Group], Group]:
    groups: dict[str, Group] = {}
    total = Group()
    for record in records:
        groups.setdefault(group_key(record, by), Group()).add(record)
        total.add(record)
    return groups, total


def render_table(groups: dict[str, Group], total: Group, by: str) -> str:
    columns = ["requests", "errors", "blocked", "input_tokens", "output_tokens", "cost_usd", "unpriced", "p50_ms", "p95_ms", "ttfb_p50_ms", "ttfb_p95_ms"]
    ordered = sorted(groups.items(), key=lambda item: (-item[1].cost_usd, -item[1].requests, item[0]))
    rows = [[by, *columns]]
    for name, group in [*ordered, ("TOTAL", total)]:
        values = group.row()
        rows.append([printable(name), *(_cell(c, values[c]) for c in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "cost_usd":
        return f"{value:.6f}"
    if column.endswith("_ms"):
        return f"{value:,.1f}"
    return f"{value:,}"
