"""llm-mitm as mitmdump loads it, with its own work timed in place: the script
`bench.run` gives mitmdump instead of `addons/llm.py` to see what each concern's hooks and
the trace round cost inside a proxy under load.

`bench/hooks.py` times the same hooks one flow after another in a tight loop, where their
code and data stay in the CPU's caches. In the proxy, mitmproxy's own ~1.5 ms of work per
request runs between one call of a hook and the next, so the hook runs cold: this is what
it costs there. On SIGUSR1 the figures so far (microseconds per request, and the number of
requests) go to the JSON file named by `LLM_MITM_BENCH_TIMINGS`, and counting starts afresh.
Each timed call adds two clock reads (~0.08 us each here) to what it measures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

try:
    import llm_mitm  # noqa: F401
except ImportError:  # a plain checkout: mitmproxy only put bench/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_mitm.addons import FLOW_HOOKS, LLMMitm, Tracer, build, unhandled_hooks

ROUND = "trace round"  # the Tracer's writer hand-off, every 50 ms, counted per request like the rest


class HookTimer:
    """Wraps each concern's flow hooks, as `LLMMitm` routes them (again after each config
    it puts in force), and the trace sink's round, with a clock."""

    def __init__(self, llm: LLMMitm) -> None:
        self.llm = llm
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def load(self, loader: Any) -> None:
        """Listening from here, after `LLMMitm.load`: each config reaches this listener once
        LLMMitm has re-routed its hooks and the Tracer has made (or kept) its sink."""
        self.llm.shared.on_config(lambda config: self._wrap(), now=False)

    def _wrap(self) -> None:
        for name in FLOW_HOOKS:
            self.llm._hooks[name] = [self._timed(f"{name} {type(hook.__self__).__name__}", hook) for hook in self.llm._hooks[name]]
        sink = next(c for c in self.llm.concerns if isinstance(c, Tracer)).sink
        if sink is not None and not hasattr(sink._flush, "__wrapped__"):  # a new sink, or the first
            timed_round = self._timed(ROUND, sink._flush)
            timed_round.__wrapped__ = sink._flush  # type: ignore[attr-defined]
            sink._flush = timed_round  # type: ignore[method-assign]

    def _timed(self, key: str, work: Callable[..., Any]) -> Callable[..., Any]:
        seconds, calls, clock = self.seconds, self.calls, time.perf_counter

        def timed(*args: Any) -> Any:
            started = clock()
            try:
                return work(*args)
            finally:
                seconds[key] += clock() - started
                calls[key] += 1

        return timed

    def running(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.report)

    def report(self) -> None:
        requests = self.calls.get("request Recorder", 0)
        per_request = {key: round(seconds * 1e6 / requests, 2) for key, seconds in self.seconds.items()} if requests else {}
        per_request["total"] = round(sum(per_request.values()), 2)
        destination = Path(os.environ["LLM_MITM_BENCH_TIMINGS"])
        partial = destination.with_suffix(".partial")
        partial.write_bytes(orjson.dumps({"requests": requests, "us_per_request": per_request}))
        partial.replace(destination)  # whole when the benchmark sees it
        self.seconds.clear()
        self.calls.clear()


# Every other hook is None, so that mitmproxy skips this object for them (as it does `LLMMitm`'s).
for _name in unhandled_hooks(vars(HookTimer)):
    setattr(HookTimer, _name, None)

addons = build()
addons.append(HookTimer(addons[0]))  # type: ignore[arg-type]
globals().update(unhandled_hooks(globals()))
