"""Where llm-mitm's proxy spends its time, by pyinstrument: mitmdump with llm-mitm under
the benchmark's load (reverse mode, c=8, `bench.run`'s chat call and config), profiled after a
warm-up. Prints, per request, the event loop's busy time, mitmproxy's hook dispatch, and
each of llm-mitm's hooks by concern with its share of the loop; writes
`bench/results/profile.json`, pyinstrument's call tree as text beside it, and the tree under
llm-mitm's hooks (`profile-llm-mitm-hooks.txt`), which pyinstrument's view folds away.

pyinstrument sees every Python call, so everything runs about twice as slow as unprofiled
and calls weigh more than loops: read the shares, not the microseconds. A bare mitmdump
profiled before or after it would differ from it by as much as the machine drifts in a
minute; `bench.run` and `bench.ab` compare them in alternating rounds, `bench/hooks.py` and
`bench/timed_addon.py` time llm-mitm's work warm and in place without a profiler. Needs
`pip install pyinstrument` in the venv that runs mitmdump.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

from bench.client import load
from bench.run import ADDON_CONFIG, AUTH, CHAT_BODY, CHAT_PATH, ROOT, Bench
from tests.support.mitm import ADDON

PROFILER = Path(__file__).with_name("profiler_addon.py")
RESULTS = ROOT / "bench" / "results"
DISPATCH = "_iter_hooks"  # mitmproxy's walk of its addons (and a script's) for each event
OURS = "_each"  # LLMMitm's dispatcher: all of llm-mitm's flow hooks run under it
ROUND = "_flush"  # the trace sink's round (every 50 ms): records made into lines and sent to the writer


def profile(bench: Bench, concurrency: int, seconds: float, warm_up: int) -> tuple[Session, int]:
    """llm-mitm's proxy profiled under load for `seconds`."""
    session_path = bench.work / "llm-mitm.pyisession"
    proxy = bench.mitmdump("llm-mitm", True, ADDON_CONFIG, ADDON, ("-s", str(PROFILER)),
                           {**os.environ, "LLM_MITM_BENCH_PROFILE": str(session_path)}).start()
    try:
        bench.pin(proxy, True)
        target = bench.target(proxy, reverse=True)
        asyncio.run(load(target, concurrency, warm_up, "POST", CHAT_PATH, CHAT_BODY, AUTH))
        os.kill(proxy.pid, signal.SIGUSR1)
        calls, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            calls += asyncio.run(load(target, concurrency, 100 * concurrency, "POST", CHAT_PATH, CHAT_BODY, AUTH)).calls
        os.kill(proxy.pid, signal.SIGUSR1)
        for _ in range(600):  # the session is written once the profiler stops: tens of MB
            if session_path.exists():
                break
            time.sleep(0.1)
        return Session.load(str(session_path)), calls
    finally:
        proxy.stop()
        session_path.unlink(missing_ok=True)


def inclusive(session: Session) -> collections.Counter[tuple[str, str]]:
    """Each function's time with its callees, counted once where it recurses."""
    totals: collections.Counter[tuple[str, str]] = collections.Counter()

    def walk(frame: Any, above: frozenset[tuple[str, str]]) -> None:
        key = (frame.function, frame.file_path_short or "")
        if key not in above:
            totals[key] += frame.time
        for child in frame.children:
            walk(child, above | {key})

    walk(session.root_frame(), frozenset())
    return totals


def under_ours(session: Session) -> list[Any]:
    """Each frame of llm-mitm's dispatcher, wherever mitmproxy called it from."""
    found: list[Any] = []

    def walk(frame: Any) -> None:
        if frame.function == OURS:
            found.append(frame)
            return
        for child in frame.children:
            walk(child)

    walk(session.root_frame())
    return found


def our_hooks(session: Session) -> collections.Counter[str]:
    """The time of each concern's hook under llm-mitm's dispatcher (`recorder.request`)."""
    hooks: collections.Counter[str] = collections.Counter()
    for frame in under_ours(session):
        for child in frame.children:
            if "llm_mitm" in (child.file_path or ""):
                hooks[f"{Path(child.file_path).stem}.{child.function}"] += child.time
    return hooks


def our_tree(session: Session, calls: int, depth: int = 6, floor_us: float = 1.0) -> str:
    """llm-mitm's hooks and what they call, `depth` levels down, in us a request: the
    part of the call tree pyinstrument's own view folds away as library code."""
    merged: dict[str, Any] = {}  # name -> [seconds, {children}]

    def merge(frame: Any, into: dict[str, Any], level: int) -> None:
        node = into.setdefault(f"{frame.function}  {frame.file_path_short}:{frame.line_no}", [0.0, {}])
        node[0] += frame.time
        if level < depth:
            for child in frame.children:
                merge(child, node[1], level + 1)

    for frame in under_ours(session):
        merge(frame, merged, 0)
    lines: list[str] = []

    def show(nodes: dict[str, Any], level: int) -> None:
        for name, (seconds, children) in sorted(nodes.items(), key=lambda item: -item[1][0]):
            if seconds * 1e6 / calls >= floor_us:
                lines.append(f"{'  ' * level}{seconds * 1e6 / calls:8.1f}  {name}")
                show(children, level + 1)

    show(merged, 0)
    return "\n".join(lines) + "\n"


def summary(session: Session, calls: int) -> dict[str, Any]:
    per_call = 1e6 / calls
    totals: collections.Counter[str] = collections.Counter()
    for (function, path), seconds in inclusive(session).items():
        if function in (DISPATCH, OURS) or (function, Path(path).name) in ((ROUND, "tracesink.py"), ("select", "selectors.py")):
            totals[function] += seconds
    busy = session.root_frame().time - totals["select"]  # the loop waiting for sockets is not work
    ours = totals[OURS] + totals[ROUND]
    return {
        "calls": calls,
        "busy_loop_us": round(busy * per_call, 1),
        "idle_us": round(totals["select"] * per_call, 1),
        "dispatch_us": round(totals[DISPATCH] * per_call, 1),
        "llm_mitm_us": round(ours * per_call, 1),
        "llm_mitm_share": round(ours / busy, 4),
        "trace_round_us": round(totals[ROUND] * per_call, 1),
        "hooks_us": {hook: round(t * per_call, 1) for hook, t in our_hooks(session).most_common()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=25.0, help="profiled load (default 25)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warm-up", type=int, default=2000, help="calls before the profiler starts")
    args = parser.parse_args()
    bench = Bench(quick=True)
    bench.start_upstream()
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        session, calls = profile(bench, args.concurrency, args.seconds, args.warm_up)
    finally:
        bench.upstream.kill()
    result = summary(session, calls)
    text = ConsoleRenderer(unicode=False, color=False, time="seconds", processor_options={"filter_threshold": 0.002}).render(session)
    (RESULTS / "profile-llm-mitm.txt").write_text(text)
    (RESULTS / "profile-llm-mitm-hooks.txt").write_text(our_tree(session, calls))
    print(f"llm-mitm profiled, reverse, c={args.concurrency}, {calls} calls: us a request (about twice unprofiled)")
    print(f"  event loop, busy    {result['busy_loop_us']:8.1f}")
    print(f"  event loop, idle    {result['idle_us']:8.1f}")
    print(f"  hook dispatch       {result['dispatch_us']:8.1f}  (mitmproxy's; llm-mitm's hooks not in it)")
    print(f"  llm-mitm            {result['llm_mitm_us']:8.1f}  ({result['llm_mitm_share']:.1%} of the busy loop)")
    for hook, us in result["hooks_us"].items():
        print(f"    {hook:<28} {us:7.1f}")
    print(f"    {'the trace round':<28} {result['trace_round_us']:7.1f}")
    (RESULTS / "profile.json").write_bytes(orjson.dumps({"concurrency": args.concurrency, "seconds": args.seconds, **result},
                                                        option=orjson.OPT_INDENT_2))
    print(f"wrote {RESULTS / 'profile.json'} and the call trees beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
