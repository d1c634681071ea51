"""Interleaved A/B rounds in seconds: the steps of `bench.instructions` (or any of them,
twice or more), each a mitmdump of its own, pinned as `bench.run` pins them.

    python -m bench.ab [--rounds 60] [--calls N] [--concurrency 8] [--forward] [VARIANT ...]
    python -m bench.ab bare bare bare bare      # how far apart four runs of the same proxy land

Where `bench.instructions` counts what a step costs in instructions, this measures what it
costs in time on this machine, caches and all, in the rounds of `bench.run`'s throughput runs
(`Bench.throughput`): each ratio is the median of the rounds' own ratios to the first
variant's round beside it, with a 95 % interval for that median, and the proxy's CPU time per
request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.instructions import VARIANTS, variant  # noqa: E402
from bench.run import THROUGHPUT_ROUNDS, Bench, calls_per_turn, round_ratio  # noqa: E402

WARM_UP = 300
HANDING_OVER = ("llm-mitm", "floor")  # variants with a child process, placed off the proxy's CPU


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"the first is the baseline; one of {', '.join(map(repr, VARIANTS))} (default: all, in that order)")
    parser.add_argument("--rounds", type=positive, default=THROUGHPUT_ROUNDS)
    parser.add_argument("--calls", type=positive, help="calls per variant per round (default: bench.run's for the concurrency)")
    parser.add_argument("--concurrency", type=positive, default=8)
    parser.add_argument("--forward", action="store_true", help="forward mode, TLS intercepted (default: reverse)")
    args = parser.parse_args()
    args.calls = args.calls or calls_per_turn(args.concurrency)
    names = args.variants or list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: one of {', '.join(map(repr, VARIANTS))}")
    labels = [name if names.count(name) == 1 else f"{name} #{names[:i + 1].count(name)}" for i, name in enumerate(names)]
    bench = Bench(quick=True)
    proxies = {}
    try:
        bench.start_upstream()
        for label, name in zip(labels, names):
            proxy = variant(bench, name, label.replace(" ", "-").replace(",", ""), reverse=not args.forward).start()
            proxies[label] = proxy
            bench.pin(proxy, traced=name in HANDING_OVER)
        bench.throughput("ab", {label: bench.target(proxy, reverse=not args.forward) for label, proxy in proxies.items()},
                         {label: proxy.pid for label, proxy in proxies.items()}, (args.concurrency,), args.rounds, args.calls, WARM_UP)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        if hasattr(bench, "upstream"):
            bench.upstream.kill()
    rows = {label: bench.results["ab"][f"{label} c={args.concurrency}"] for label in labels}
    failed = {label: row["errors"] for label, row in rows.items() if row["errors"]}
    if failed:
        raise RuntimeError(f"calls failed: {failed}")
    mode = "forward" if args.forward else "reverse"
    print(f"{mode}, c={args.concurrency}, {args.rounds} rounds of {args.calls} calls; ratio to {labels[0]!r} (95 % interval),"
          " CPU per request of the proxy's process (+ its trace writer's, on the other CPU):")
    for label, row in rows.items():
        ratio, low, high = round_ratio(row, rows[labels[0]])
        cpu = f"{row['cpu_us_per_request']:,} us (+{row['children_cpu_us_per_request']:,})" if row["cpu_us_per_request"] is not None else "-"
        print(f"  {label:<16} {ratio:.3f} ({low:.3f}-{high:.3f})  {row['rps']:7.1f} rps  {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
