"""Instructions per request, counted by valgrind's callgrind, on the benchmark's request:
bare mitmdump, then what llm-mitm's cost is made of, step by step. Bare with the lazy
upstream connections llm-mitm turns on; with a script that has no addon at all (what
mitmproxy charges any `-s` script: it walks the script and its module for every event);
with an addon whose hooks do nothing; the least an addon doing llm-mitm's job here can do
(`bench/floor_addon.py`: the job's own price); and llm-mitm, whose step past the floor is what its
generality and guarantees cost.

    python -m bench.instructions [--requests 400] [--reverse]

Seconds vary with the machine's speed and its neighbours; instructions executed do not
(runs of the same code agree within ±0.6 %), so this tells whether a change to the hot path made
it cheaper, where a throughput run on a noisy machine cannot. It does not see cache misses:
the throughput ratio in `bench.run` stays the verdict. Needs valgrind (Debian: valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.client import load  # noqa: E402
from bench.run import ADDON_CONFIG, AUTH, CHAT_BODY, CHAT_PATH, Bench  # noqa: E402
from tests.support.mitm import ADDON, Mitmdump  # noqa: E402

WARM_UP = 100
# Every hook the module itself does not define is None, as in addons/llm.py: mitmproxy
# asks the module for each one, and a missing name costs an AttributeError each time.
# Written out, not `llm_mitm.addons.unhandled_hooks`: importing that loads llm-mitm into
# the scripts that stand for having none of it.
NONE_HOOKS = """
from mitmproxy import hooks
globals().update({name: None for name in hooks.all_hooks if name not in globals()})
"""
EMPTY_SCRIPT = "addons = []\n" + NONE_HOOKS
NO_OP_ADDON = '''
class NoOp:
    """The hooks llm-mitm implements, doing nothing: what being an addon costs."""

    def request(self, flow): pass
    def responseheaders(self, flow): pass
    def response(self, flow): pass
    def error(self, flow): pass


addons = [NoOp()]
''' + NONE_HOOKS
LAZY = ("--set", "connection_strategy=lazy")
FLOOR = (Path(__file__).resolve().parent / "floor_addon.py").read_text()
# name -> the script (None: none; "llm-mitm": ours, with the benchmark's config), mitmdump options
VARIANTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "bare": (None, ()),
    "bare, lazy": (None, LAZY),
    "empty script": (EMPTY_SCRIPT, LAZY),
    "no-op addon": (NO_OP_ADDON, LAZY),
    "floor": (FLOOR, LAZY),  # the least an addon doing llm-mitm's job here can do (bench/floor_addon.py)
    "llm-mitm": ("llm-mitm", ()),  # sets lazy itself
}


def variant(bench: Bench, name: str, dirname: str, reverse: bool = False) -> Mitmdump:
    """The mitmdump (not started) that stands for one of `VARIANTS`, before the bench's upstream."""
    source, options = VARIANTS[name]
    if source == "llm-mitm":
        return bench.mitmdump(dirname, reverse, ADDON_CONFIG, ADDON, options)
    script = None
    if source is not None:
        script = bench.work / dirname / "script.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(source)
    return bench.mitmdump(dirname, reverse, None, script, options)


def count(bench: Bench, name: str, requests: int, reverse: bool = False) -> int:
    """Instructions per request of one mitmdump under callgrind, counted only while the
    measured requests run (after a warm-up: connections, caches, the first trace batch)."""
    proxy = variant(bench, name, name, reverse)
    out = proxy.workdir / "callgrind.out"
    proxy.args = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *proxy.args]
    proxy.start(timeout=900)
    target = bench.target(proxy, reverse)
    try:
        asyncio.run(load(target, 8, WARM_UP, "POST", CHAT_PATH, CHAT_BODY, AUTH))
        subprocess.run(["callgrind_control", "--instr=on", str(proxy.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = asyncio.run(load(target, 8, requests, "POST", CHAT_PATH, CHAT_BODY, AUTH))
        subprocess.run(["callgrind_control", "--instr=off", str(proxy.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        proxy.stop()
    if result.errors or len(result.latencies_ns) != requests:
        raise RuntimeError(f"{name}: {result.errors} errors")
    totals = [int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith(("summary:", "totals:"))]
    return max(totals) // result.calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--reverse", action="store_true", help="reverse mode (plain HTTP from the client) instead of forward")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (Debian: apt-get install valgrind)")
        return 2
    bench = Bench(quick=True, pin=False)  # two mitmdumps under callgrind at once: one per core
    bench.start_upstream()
    try:
        names = list(VARIANTS)
        with ThreadPoolExecutor(2) as pool:  # one per core; each mitmdump runs ~50x slower under callgrind
            counts = dict(zip(names, pool.map(lambda name: count(bench, name, args.requests, args.reverse), names)))
    finally:
        bench.upstream.kill()
    mode = "reverse" if args.reverse else "forward"
    print(f"instructions per request (callgrind, {mode}, {args.requests} requests at c=8, after {WARM_UP}):")
    previous = None
    for name, value in counts.items():
        step = f", {(value - previous) / counts['bare']:+.2%} of bare over the row above" if previous is not None else ""
        print(f"  {name:<13} {value:>12,} ({value / counts['bare'] - 1:+.2%} over bare{step})")
        previous = value
    return 0


if __name__ == "__main__":
    sys.exit(main())
