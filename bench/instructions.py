"""Instructions per request, counted by valgrind's callgrind: bare mitmdump, mitmdump with
an addon whose hooks do nothing, and mitmdump with llm-mitm, on the benchmark's request.

    python -m bench.instructions [--requests 400]

Seconds vary with the machine's speed and its neighbours; instructions executed do not
(the same run twice agrees to 0.2 %), so this tells whether a change to the hot path made
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
from tests.support.mitm import Mitmdump  # noqa: E402

WARM_UP = 100
NO_OP_ADDON = '''
class NoOp:
    """The hooks llm-mitm implements, doing nothing: what being an addon costs."""

    def request(self, flow): pass
    def responseheaders(self, flow): pass
    def response(self, flow): pass
    def error(self, flow): pass


addons = [NoOp()]
'''


def count(bench: Bench, name: str, requests: int) -> int:
    """Instructions per request of one mitmdump under callgrind, counted only while the
    measured requests run (after a warm-up: connections, caches, the first trace batch)."""
    workdir = bench.work / name
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {"routes": {"api.openai.com": bench.upstream_port}, "upstream_ca": bench.pki.ca_path,
                    "extra_args": ["--set", "flow_detail=0"]}
    if name == "bare":
        proxy = Mitmdump(workdir, addon=None, **kwargs)
    elif name == "no-op addon":
        script = workdir / "noop.py"
        script.write_text(NO_OP_ADDON)
        proxy = Mitmdump(workdir, addon=script, **kwargs)
    else:
        proxy = Mitmdump(workdir, config=ADDON_CONFIG, **kwargs)
    out = workdir / "callgrind.out"
    proxy.args = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *proxy.args]
    proxy.start(timeout=900)
    target = bench.target(proxy)
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
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (Debian: apt-get install valgrind)")
        return 2
    bench = Bench(quick=True, pin=False)  # two mitmdumps under callgrind at once: one per core
    bench.start_upstream()
    try:
        names = ["bare", "no-op addon", "llm-mitm"]
        with ThreadPoolExecutor(2) as pool:  # one per core; each mitmdump runs ~50x slower under callgrind
            counts = dict(zip(names, pool.map(lambda name: count(bench, name, args.requests), names)))
    finally:
        bench.upstream.kill()
    print(f"instructions per request (callgrind, {args.requests} requests at c=8, after {WARM_UP}):")
    for name, value in counts.items():
        print(f"  {name:<12} {value:>12,} ({value / counts['bare'] - 1:+.2%} over bare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
