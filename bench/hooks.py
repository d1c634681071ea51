"""llm-mitm's own work per request, timed in this process.

The throughput runs see llm-mitm's cost as a small difference between two noisy numbers
(single rounds swing ±15 % on a shared machine). Here it is timed directly: the addon as
mitmdump loads it (`build()`, the benchmark's config, its trace writer process running),
fed the benchmark's request and response as mitmproxy flows, each hook timed, and the trace
round (`TraceSink._flush`: snapshot, serialise, hand over) every `ROUND` calls. One flow
after another in a tight loop, so caches are warm: a lower bound of the cost in place.
mitmproxy's own price for carrying a script and calling its hooks is not in it
(`bench.instructions` counts that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils
from ruamel.yaml import YAML

from bench.upstream import COMPLETION

ROUND = 50  # calls between trace rounds (the proxy's round is 50 ms: 20-40 calls at bare's rates)
HOOKS = ("request", "responseheaders", "response")


def _flow(path: str, body: bytes, headers: dict[str, str]) -> http.HTTPFlow:
    fields = [(b"Host", b"api.openai.com"), (b"Content-Length", str(len(body)).encode()),
              (b"Content-Type", b"application/json"), *((k.encode(), v.encode()) for k, v in headers.items())]
    request = tutils.treq(scheme=b"https", host="api.openai.com", port=443, path=path.encode(), method=b"POST", headers=fields, content=body)
    return tflow.tflow(req=request)


def _respond(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(200, COMPLETION, {"content-type": "application/json"})


async def _timed(config_path: Path, path: str, body: bytes, headers: dict[str, str], count: int, warm_up: int,
                 placed: Callable[[int], None]) -> dict[str, float]:
    from llm_mitm.addons import Tracer, build

    addons = build() + [Proxyserver()]
    llm = addons[0]
    with taddons.context(*addons) as tctx:
        tctx.configure(llm, llm_config=str(config_path))
        llm.running()
        sink = next(c for c in llm.concerns if isinstance(c, Tracer)).sink
        if sink is None:
            raise RuntimeError("the benchmark's config writes no traces")
        placed(sink.process.pid)
        spent = dict.fromkeys((*HOOKS, "trace_round"), 0.0)
        try:
            for call in range(warm_up + count):
                if call == warm_up:
                    spent = dict.fromkeys(spent, 0.0)
                flow = _flow(path, body, headers)
                for name in HOOKS:
                    if name == "responseheaders":
                        _respond(flow)
                    started = time.perf_counter()
                    getattr(llm, name)(flow)
                    spent[name] += time.perf_counter() - started
                if call % ROUND == ROUND - 1:
                    started = time.perf_counter()
                    sink._flush()
                    spent["trace_round"] += time.perf_counter() - started
        finally:
            llm.done()
    per_call = {name: round(seconds * 1e6 / count, 2) for name, seconds in spent.items()}
    per_call["total"] = round(sum(per_call.values()), 2)
    return per_call


def hook_costs(config: dict[str, Any], workdir: Path, path: str, body: bytes, headers: dict[str, str],
               count: int = 20000, warm_up: int = 2000, placed: Callable[[int], None] = lambda pid: None) -> dict[str, float]:
    """Microseconds per call in each hook and in the trace round, and their total.
    `placed` gets the trace writer's pid once it runs (to pin it off this process's CPU)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {**config, "traces": {**config.get("traces", {}), "destination": str(workdir / "traces.jsonl")}}
    config_path = workdir / "config.yaml"
    with config_path.open("w") as handle:
        YAML(typ="safe", pure=True).dump(config, handle)
    return asyncio.run(_timed(config_path, path, body, headers, count, warm_up, placed))
