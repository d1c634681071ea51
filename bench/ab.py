"""Interleaved A/B rounds in seconds: the steps of `bench.instructions` (or any of them,
twice or more), each a mitmdump of its own, pinned as `bench.run` pins them.

    python -m bench.ab [--rounds 24] [--calls 300] [--concurrency 8] [--forward] [VARIANT ...]
    python -m bench.ab bare bare bare bare      # how far apart four runs of the same proxy land

Where `bench.instructions` counts what a step costs in instructions, this measures what it
costs in time on this machine, caches and all. The variants take turns, round by round, in
alternating order; each ratio is the median of the rounds' own ratios to the first variant's
round beside it, with a 95 % interval for that median, and the proxy's CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.client import load  # noqa: E402
from bench.instructions import VARIANTS, variant  # noqa: E402
from bench.run import AUTH, CHAT_BODY, CHAT_PATH, Bench, cpu_seconds, median_interval  # noqa: E402

WARM_UP = 300


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"the first is the baseline; one of {', '.join(map(repr, VARIANTS))} (default: all, in that order)")
    parser.add_argument("--rounds", type=positive, default=24)
    parser.add_argument("--calls", type=positive, default=300, help="calls per variant per round")
    parser.add_argument("--concurrency", type=positive, default=8)
    parser.add_argument("--forward", action="store_true", help="forward mode, TLS intercepted (default: reverse)")
    args = parser.parse_args()
    names = args.variants or list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: one of {', '.join(map(repr, VARIANTS))}")
    labels = [name if names.count(name) == 1 else f"{name} #{names[:i + 1].count(name)}" for i, name in enumerate(names)]
    bench = Bench(quick=True)
    proxies = []
    try:
        bench.start_upstream()
        for label, name in zip(labels, names):
            proxy = variant(bench, name, bench.work / label.replace(" ", "-").replace(",", ""), reverse=not args.forward).start()
            proxies.append(proxy)
            bench.placement.proxy(proxy.pid, proxy.wait_for_children() if VARIANTS[name][0] == "llm-mitm" else [])
        targets = [bench.target(proxy, reverse=not args.forward) for proxy in proxies]
        for target in targets:
            asyncio.run(load(target, args.concurrency, WARM_UP, "POST", CHAT_PATH, CHAT_BODY, AUTH))
        rps: list[list[float]] = [[] for _ in proxies]
        cpu_us: list[list[tuple[float, float]]] = [[] for _ in proxies]  # the proxy's process; its trace writer
        for turn in range(args.rounds):
            order = range(len(proxies)) if turn % 2 == 0 else reversed(range(len(proxies)))
            for i in order:
                before = cpu_seconds(proxies[i].pid)
                result = asyncio.run(load(targets[i], args.concurrency, args.calls, "POST", CHAT_PATH, CHAT_BODY, AUTH))
                after = cpu_seconds(proxies[i].pid)
                if result.errors:
                    raise RuntimeError(f"{labels[i]}: {result.errors} errors")
                rps[i].append(len(result.latencies_ns) / result.wall_s)
                if before is not None and after is not None:
                    cpu_us[i].append(((after[0] - before[0]) * 1e6 / result.calls, (after[1] - before[1]) * 1e6 / result.calls))
    finally:
        for proxy in proxies:
            proxy.stop()
        if hasattr(bench, "upstream"):
            bench.upstream.kill()
    mode = "forward" if args.forward else "reverse"
    print(f"{mode}, c={args.concurrency}, {args.rounds} rounds of {args.calls} calls; ratio to {labels[0]!r} (95 % interval),"
          " CPU per request of the proxy's process (+ its trace writer's, on the other CPU):")
    for label, own_rps, own_cpu in zip(labels, rps, cpu_us):
        ratio, low, high = median_interval([mine / base for mine, base in zip(own_rps, rps[0])])
        cpu = f"{statistics.median(c[0] for c in own_cpu):,.0f} us (+{statistics.median(c[1] for c in own_cpu):,.0f})" if own_cpu else "-"
        print(f"  {label:<16} {ratio:.3f} ({low:.3f}-{high:.3f})  {statistics.median(own_rps):7.1f} rps  {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
