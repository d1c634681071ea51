"""`llm-mitm report`: one self-contained HTML file (no CDN; styles, script and charts inline).

Figures are drawn as SVG here, so they show even with scripts off; the script only
filters the table of calls and opens a call's conversation. Everything from a trace is
put on the page as text (textContent), never as markup.
"""

from __future__ import annotations

import html
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from llm_mitm.redact import Redactor
from llm_mitm.texts import request_texts, response_texts
from llm_mitm.tracestats import group_key

LATENCY_BUCKETS = (50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
TEXT_LIMIT = 4000  # characters of one message kept
# Characters of one call's conversation kept: its latest messages and the answer. Each listed
# call is kept whole in memory and in the page: an agent's call of 200 messages made 0.8 MB
# of report, and 2000 of them a page no browser opens (a traces probe).
CONVERSATION_LIMIT = 20_000
# Different errors (and blocks) counted at once for the top tables: past twice this many the
# rarest are let go. Every message an API gives may differ (a rate limit says its own counts),
# and keeping each grew the report by ~300 bytes a call (a trace tools probe).
TOP_KEPT = 1000


@dataclass
class ReportData:
    max_calls: int = 2000
    calls_total: int = 0
    spend_by_day: Counter[str] = field(default_factory=Counter)
    spend_by_model: Counter[str] = field(default_factory=Counter)
    spend_by_key: Counter[str] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # the commonest (TOP_KEPT)
    blocks: Counter[str] = field(default_factory=Counter)
    errors_total: int = 0
    blocks_total: int = 0
    calls: deque[dict[str, Any]] = field(default_factory=deque)
    # The bodies are redacted again, with the patterns the proxy's config adds (a trace
    # written before, or under another config); and the texts a call's conversation is read
    # as are not all as the trace holds them (a text file sent as base64 is decoded).
    redactor: Redactor = field(default_factory=Redactor)

    def add(self, record: dict[str, Any]) -> None:
        self.calls_total += 1
        cost = record.get("cost_usd") or 0.0
        model = group_key(record, "model")
        self.spend_by_day[group_key(record, "day")] += cost
        self.spend_by_model[model] += cost
        self.spend_by_key[group_key(record, "key")] += cost
        policy = record.get("policy") or {}
        if policy.get("decision") == "block":
            self.blocks_total += 1
            _count(self.blocks, f"{policy.get('rule')}: {policy.get('detail')}")
        elif record.get("error"):
            self.errors_total += 1
            _count(self.errors, str(record["error"])[:200])
        elif isinstance(record.get("duration_ms"), (int, float)):
            self.latency[_latency_bucket(record["duration_ms"])] += 1
        self.calls.append(_call(record, model, self.redactor))
        if len(self.calls) > self.max_calls:
            self.calls.popleft()


def _count(counter: Counter[str], key: str) -> None:
    """One more `key`, in a counter of at most 2 * TOP_KEPT keys: past that, all but the
    TOP_KEPT commonest are let go (a frequent one stays; a rare one may come back, counted anew)."""
    counter[key] += 1
    if len(counter) > 2 * TOP_KEPT:
        for rare, _ in counter.most_common()[TOP_KEPT:]:
            del counter[rare]


def _latency_bucket(ms: float) -> int:
    return next((i for i, limit in enumerate(LATENCY_BUCKETS) if ms < limit), len(LATENCY_BUCKETS))


def _latency_label(index: int) -> str:
    """Short labels that fit under a bar: "<50ms", "50–100", "0.5–1s", "≥30s"."""
    if index == 0:
        return f"<{LATENCY_BUCKETS[0]}ms"
    if index == len(LATENCY_BUCKETS):
        return f"≥{LATENCY_BUCKETS[-1] // 1000}s"
    low, high = LATENCY_BUCKETS[index - 1], LATENCY_BUCKETS[index]
    if high >= 1000:
        return f"{low / 1000:g}–{high / 1000:g}s"
    return f"{low}–{high}ms"


def _call(record: dict[str, Any], model: str, redactor: Redactor) -> dict[str, Any]:
    request = redactor.json((record.get("request") or {}).get("body"))
    response = redactor.json((record.get("response") or {}).get("body"))
    conversation = [[role, redactor.free_text(text)[:TEXT_LIMIT]] for role, text in request_texts(request) if text]
    conversation += [["assistant", redactor.free_text(text)[:TEXT_LIMIT]] for text in response_texts(response) if text]
    usage = record.get("usage") or {}
    policy = record.get("policy") or {}
    return {
        "time": str(record.get("timestamp", ""))[:19].replace("T", " "),
        "provider": record.get("provider") or "",
        "operation": record.get("operation") or "",
        "model": model,
        "status": record.get("status_code"),
        "stream": bool(record.get("stream")),
        "tokens": (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0),
        "cost": record.get("cost_usd"),
        "ms": record.get("duration_ms"),
        "key": record.get("api_key") or "",
        "error": record.get("error") or "",
        "blocked": policy.get("decision") == "block",
        "conversation": _latest(conversation),
    }


def _latest(conversation: list[list[str]]) -> list[list[str]]:
    """The first message (the task, or the system's words: what a call is found by) and the
    latest that fit in CONVERSATION_LIMIT with it (the last always), a note of how many
    between them are left out."""
    if sum(len(text) for _, text in conversation) <= CONVERSATION_LIMIT:
        return conversation
    first, rest = conversation[0], conversation[1:]
    kept, size = [], len(first[1])
    for message in reversed(rest):
        size += len(message[1])
        if kept and size > CONVERSATION_LIMIT:
            break
        kept.append(message)
    left_out = len(rest) - len(kept)
    note = [["note", f"{left_out} message{'s' if left_out != 1 else ''} left out"]] if left_out else []
    return [first, *note, *kept[::-1]]


def collect(records: Iterable[dict[str, Any]], max_calls: int = 2000, redactor: Redactor | None = None) -> ReportData:
    data = ReportData(max_calls=max_calls, redactor=redactor or Redactor())
    for record in records:
        data.add(record)
    return data


# --------------------------------------------------------------------------- SVG charts


def _bars(items: list[tuple[str, float]], unit: str, chart_id: str, vertical: bool = False) -> str:
    if not items:
        return f'<p class="empty" id="{chart_id}">no data</p>'
    top = max(value for _, value in items) or 1.0
    label = (lambda v: f"${v:,.4f}") if unit == "usd" else (lambda v: f"{int(v):,}")
    if vertical:
        step, bar = 66, 40
        width, height = max(320, step * len(items)), 180
        parts = [f'<svg class="chart" id="{chart_id}" role="img" viewBox="0 0 {width} {height + 40}" width="{width}" height="{height + 40}">']
        for i, (name, value) in enumerate(items):
            h = max(1.0, value / top * height)
            x = 6 + i * step
            parts.append(f'<rect x="{x}" y="{height - h:.1f}" width="{bar}" height="{h:.1f}"><title>{html.escape(name)}: {label(value)}</title></rect>')
            short = name[5:] if len(name) == 10 and name[4] == "-" else name  # a day: month-day
            parts.append(f'<text x="{x + bar / 2}" y="{height + 14}" text-anchor="middle">{html.escape(short[:10])}</text>')
        parts.append("</svg>")
        return "".join(parts)
    height = 24 * len(items) + 8
    parts = [f'<svg class="chart" id="{chart_id}" role="img" viewBox="0 0 640 {height}" width="640" height="{height}">']
    for i, (name, value) in enumerate(items):
        w = max(1.0, value / top * 300)
        y = 4 + i * 24
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(name[:38])}</text>')
        parts.append(f'<rect x="260" y="{y + 3}" width="{w:.1f}" height="16"><title>{html.escape(name)}: {label(value)}</title></rect>')
        parts.append(f'<text x="{266 + w:.1f}" y="{y + 15}">{label(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[tuple[str, int]], heading: str, table_id: str) -> str:
    if not rows:
        return f'<p class="empty" id="{table_id}">none</p>'
    body = "".join(f"<tr><td>{count}</td><td>{html.escape(text)}</td></tr>" for text, count in rows)
    return f'<table id="{table_id}"><thead><tr><th>count</th><th>{heading}</th></tr></thead><tbody>{body}</tbody></table>'


# Characters that could end or re-mode the <script> element the data sits in ("</script",
# "<!--" then "<script"), as JSON escapes: they only ever occur inside JSON strings.
_SCRIPT_ESCAPES = ((b"&", b"\\u0026"), (b"<", b"\\u003c"), (b">", b"\\u003e"),
                   ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))


def _script_json(value: Any) -> str:
    """JSON that is safe as the text of a <script> element, whatever the trace holds."""
    data = orjson.dumps(value)
    for raw, escaped in _SCRIPT_ESCAPES:
        data = data.replace(raw, escaped)
    return data.decode()


def render(data: ReportData, title: str = "llm-mitm report") -> str:
    total_cost = sum(data.spend_by_model.values())
    days = sorted(data.spend_by_day.items())
    latency = [(_latency_label(i), float(data.latency.get(i, 0))) for i in range(len(LATENCY_BUCKETS) + 1)]
    calls_json = _script_json(list(data.calls))
    shown = len(data.calls)
    note = f"the latest {shown} of {data.calls_total}" if shown < data.calls_total else f"all {shown}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="summary">{data.calls_total} calls · <b id="total-cost">${total_cost:,.4f}</b> ·
{data.errors_total} errors · {data.blocks_total} blocked</p>
<div class="grid">
<section><h2>Spend over time</h2>{_bars(days, "usd", "chart-days", vertical=True)}</section>
<section><h2>Latency distribution</h2>{_bars(latency, "count", "chart-latency", vertical=True)}</section>
<section><h2>Spend per model</h2>{_bars(data.spend_by_model.most_common(12), "usd", "chart-models")}</section>
<section><h2>Spend per key</h2>{_bars(data.spend_by_key.most_common(12), "usd", "chart-keys")}</section>
<section><h2>Top errors</h2>{_table(data.errors.most_common(10), "error", "top-errors")}</section>
<section><h2>Top blocks</h2>{_table(data.blocks.most_common(10), "rule", "top-blocks")}</section>
</div>
<h2>Calls <small>({note})</small></h2>
<input id="search" type="search" placeholder="filter: model, key, status, error, text…" autocomplete="off">
<table id="calls"><thead><tr><th>time (UTC)</th><th>provider</th><th>operation</th><th>model</th><th>status</th>
<th>tokens</th><th>cost</th><th>ms</th><th>key</th></tr></thead><tbody></tbody></table>
<dialog id="conversation"><button id="close" type="button">close</button><h3 id="conversation-title"></h3><div id="messages"></div></dialog>
<script type="application/json" id="calls-data">{calls_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:12px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:10px 14px;overflow-x:auto}
.chart rect{fill:#4a7bd0}.chart text{font-size:11px;fill:#333}.empty{color:#888}
table{border-collapse:collapse;width:100%;background:#fff}th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:top}
#calls tbody tr{cursor:pointer}#calls tbody tr:hover{background:#eef3fb}tr.failed td{color:#b3261e}tr.blocked td{color:#8a5a00}
#search{width:100%;max-width:520px;padding:6px 8px;margin:0 0 8px;font-size:14px}
dialog{max-width:900px;width:90%;border:1px solid #ccd;border-radius:8px}
.message{margin:8px 0;padding:8px;border-radius:6px;background:#f3f5f8;white-space:pre-wrap;word-break:break-word}
.message.assistant{background:#e9f6ec}.role{font-weight:600;font-size:12px;color:#555;text-transform:uppercase}
"""

_SCRIPT = """
(function () {
  "use strict";
  var calls = JSON.parse(document.getElementById("calls-data").textContent);
  var body = document.querySelector("#calls tbody");
  var search = document.getElementById("search");
  var dialog = document.getElementById("conversation");
  function cell(row, text) { var td = document.createElement("td"); td.textContent = text; row.appendChild(td); }
  var rows = calls.map(function (call, index) {
    var row = document.createElement("tr");
    if (call.blocked) { row.className = "blocked"; } else if (call.error) { row.className = "failed"; }
    cell(row, call.time); cell(row, call.provider); cell(row, call.operation); cell(row, call.model);
    cell(row, call.status === null ? "-" : String(call.status)); cell(row, String(call.tokens));
    cell(row, call.cost === null ? "-" : "$" + call.cost.toFixed(6)); cell(row, call.ms === null ? "-" : String(Math.round(call.ms)));
    cell(row, call.key);
    row.dataset.index = String(index);
    row.addEventListener("click", function () { open(call); });
    body.appendChild(row);
    var words = [call.model, call.key, call.provider, call.operation, String(call.status), call.error];
    call.conversation.forEach(function (m) { words.push(m[1]); });
    return { row: row, haystack: words.join(" ").toLowerCase() };
  });
  search.addEventListener("input", function () {
    var needle = search.value.trim().toLowerCase();
    rows.forEach(function (r) { r.row.hidden = needle !== "" && r.haystack.indexOf(needle) < 0; });
  });
  function open(call) {
    document.getElementById("conversation-title").textContent = call.model + " · " + call.time + (call.error ? " · " + call.error : "");
    var messages = document.getElementById("messages");
    messages.textContent = "";
    call.conversation.forEach(function (m) {
      var box = document.createElement("div"); box.className = "message " + m[0];
      var role = document.createElement("div"); role.className = "role"; role.textContent = m[0];
      var text = document.createElement("div"); text.textContent = m[1];
      box.appendChild(role); box.appendChild(text); messages.appendChild(box);
    });
    if (typeof dialog.showModal === "function") { dialog.showModal(); } else { dialog.setAttribute("open", ""); }
  }
  document.getElementById("close").addEventListener("click", function () { dialog.close(); });
})();
"""
