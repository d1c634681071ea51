"""The llm-mitm benchmark: the addon next to bare mitmdump and no proxy, in one run.

    python -m bench.run [--quick] [--out bench/results/latest.json]

Everything runs on loopback against bench/upstream.py. Prints a table and writes JSON
with the machine and versions. Targets (checked, and marked PASS/MISS in the output; INFO
marks a figure with no threshold): addon throughput >= 0.95 x bare, p50 added over bare
<= 0.3 ms (at c=1, and at c=8 and 32 paced at half of bare's throughput), first streamed
chunk no later than direct + bare's own per-request cost + 0.5 ms, chunk spacing within
1 ms, resident memory growth < 10 MB over 20k requests, redaction and SSE parsing linear.
A comparison with failed calls on either side fails.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.client import Connection, Streamed, Target, load  # noqa: E402
from tests.support.mitm import ADDON, Mitmdump  # noqa: E402
from tests.support.pki import make_pki  # noqa: E402

HOST = "api.openai.com"
CHAT_PATH = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer sk-proj-" + "b" * 48}
LITELLM_KEY = "sk-bench-litellm-master-0123456789"
LITELLM = ROOT / "bench" / ".venv-litellm" / "bin" / "litellm"
SOAK_WARM_UP = 2000
# The least an addon doing llm-mitm's job here can do (parse, police, keep, hand over): its
# row shows what the job itself costs, apart from what llm-mitm's generality adds.
FLOOR = ROOT / "bench" / "floor_addon.py"
LAZY = ("connection_strategy=lazy",)  # as llm-mitm sets it
# Throughput: many short turns. Turns next to each other see the same neighbours, so their
# ratio cancels more of the machine's drift: two copies of bare mitmdump (with lazy
# connections) came out 1.091 (1.008-1.124) of each other at c=32 with 20 turns of 300 calls,
# 0.981 (0.891-1.026) with 60 of 100; at c=1, copies came out 1.022-1.061 with 16 turns of
# 300, 0.994-1.013 with 100 of 50.
THROUGHPUT_ROUNDS = 60
TURN_CALLS = {1: 50, 8: 100, 32: 100}  # per target and turn: 3,000 calls at c=1, 6,000 at 8 and 32
# Streams: the median first chunk of 10 streams swung by a millisecond from run to run (the
# same code 5.34 ms in one `bench.run`, 3.28 in 30 streams beside it), more than the budget's
# margin; 30 each (2 minutes for the four targets).
STREAM_ROUNDS = 30
PACED_SHARE = 0.5  # the paced latency runs offer this share of bare mitmdump's throughput
PACED_SECONDS = 2.0  # of calls per target and round at that rate
CHAT_BODY = orjson.dumps(
    {
        "model": "gpt-4o",
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a careful assistant. " * 30},
            {"role": "user", "content": "Summarise the following text. " + "lorem ipsum dolor sit amet " * 40},
        ],
    }
)
ADDON_CONFIG = {
    "policy": {
        "allowed_models": ["gpt-4o*"],
        "max_tokens": 4096,
        "forbidden_instructions": ["ignore previous instructions", "system:*you are dan*"],
    },
    "traces": {"destination": "traces.jsonl"},
    "usage": {"stats_interval": 0},
}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def round_ratio(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float, float]:
    """One throughput row against another taken in the same rounds: the median of the
    rounds' own ratios, and its 95 % interval."""
    return median_interval([mine / theirs for mine, theirs in zip(row["rps_rounds"], base["rps_rounds"])])


def no_errors(*rows: dict[str, Any]) -> bool:
    """No failed call in any of the rows compared: a failed call has no latency, and must
    not make a comparison pass unseen."""
    return not any(row["errors"] for row in rows)


def summary(results: list[Any]) -> dict[str, Any]:
    """A row of `load` results, one per round: calls timed, errors, the median round's
    calls per second (as carried), and the latency percentiles over all calls."""
    ms = [n / 1e6 for r in results for n in r.latencies_ns]
    return {
        "requests": len(ms),
        "errors": sum(r.errors for r in results),
        "rps": round(statistics.median(len(r.latencies_ns) / r.wall_s for r in results), 1),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
    }


def calls_per_turn(concurrency: int) -> int:
    """The throughput runs' calls per target and turn at this concurrency."""
    return TURN_CALLS.get(concurrency, 100)


def in_turn(targets: dict[str, Any], turn: int) -> list[tuple[str, Any]]:
    """The targets in the order of one round: A B C, then C B A, ... (none always first)."""
    order = list(targets.items())
    return order if turn % 2 == 0 else order[::-1]


def median_interval(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median and a 95 % interval for it (bootstrap over the rounds, a fixed seed): on
    a machine whose neighbours come and go, how far the median of this many rounds could
    be from the one the next run gives."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """CPU time of a process (all its threads, to the nanosecond), and of its running
    children (Linux; elsewhere None): mitmdump's event loop, llm-mitm's trace writer."""
    try:
        own = sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return own, sum((sum(cpu_seconds(int(child)) or (0.0, 0.0)) for child in children), 0.0)


def _timings(pid: int, path: Path, timeout: float = 5.0) -> dict[str, Any] | None:
    """What `bench/timed_addon.py` in process `pid` has timed so far (it counts afresh
    after each report), or None when no report came in `timeout`."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return orjson.loads(path.read_bytes())


class Placement:
    """The proxy under test on one CPU, everything else (the load client, the fake
    upstream, LiteLLM, the proxy's trace writer process) on the others, the same for bare
    and addon: a ratio then measures the proxy's own cost, not where the scheduler happened
    to put a neighbour (sharing its core, mitmdump spends 30-45 % more CPU per request,
    measured here). Linux with two CPUs or more; elsewhere nothing is pinned."""

    def __init__(self, pin: bool = True) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if pin and hasattr(os, "sched_getaffinity") else []
        self.active = len(cpus) >= 2
        self.proxy_cpus, self.other_cpus = set(cpus[:1]), set(cpus[1:])
        self.move_here(self.other_cpus)  # this process: the load client

    def move_here(self, cpus: set[int]) -> None:
        """This process onto `cpus` (when pinning)."""
        if self.active:
            os.sched_setaffinity(0, cpus)

    def describe(self) -> str:
        if not self.active:
            return "not pinned"
        return f"proxies on CPU {sorted(self.proxy_cpus)}, clients, upstream and trace writers on {sorted(self.other_cpus)}"

    def helper(self, pid: int) -> None:
        self._pin(pid, self.other_cpus)

    def proxy(self, pid: int, children: list[int]) -> None:
        """The proxy's threads on its CPU; its children (the trace writer) off it."""
        self._pin(pid, self.proxy_cpus)
        for child in children:
            self._pin(child, self.other_cpus)

    def _pin(self, pid: int, cpus: set[int]) -> None:
        if not self.active:
            return
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), cpus)
        except OSError:  # gone, or not Linux's /proc: leave it to the scheduler
            pass


class Bench:
    def __init__(self, quick: bool, litellm: Path | None = None, pin: bool = True) -> None:
        self.quick = quick
        self.litellm = litellm
        self.work = Path(tempfile.mkdtemp(prefix="llm-mitm-bench-"))
        self.pki = make_pki(self.work / "pki")
        self.results: dict[str, Any] = {}
        self.placement = Placement(pin)

    # ------------------------------------------------------------------ processes

    def start_upstream(self) -> None:
        self.upstream = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", str(self.pki.cert_path), str(self.pki.key_path)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        self.upstream_port = int(self.upstream.stdout.readline())  # type: ignore[union-attr]
        self.placement.helper(self.upstream.pid)

    def mitmdump(self, name: str, reverse: bool = False, config: dict[str, Any] | None = None, script: Path | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Mitmdump:
        """A mitmdump (not started) before the fake upstream: `script` loaded with `config`
        (none: bare), in forward or reverse mode."""
        return Mitmdump(self.work / name, config=config, addon=script, modes=[f"reverse:https://{HOST}"] if reverse else ["regular"],
                        routes={HOST: self.upstream_port}, upstream_ca=self.pki.ca_path,
                        extra_args=["--set", "flow_detail=0", *extra_args], env=env)

    def proxy(self, name: str, addon: bool, reverse: bool = False, options: tuple[str, ...] = (),
              script: Path = ADDON, env: dict[str, str] | None = None) -> Mitmdump:
        """A started mitmdump, bare or with llm-mitm (`script`, the benchmark's config), pinned."""
        proxy = self.mitmdump(name, reverse, ADDON_CONFIG if addon else None, script if addon else None,
                              tuple(arg for option in options for arg in ("--set", option)), env).start()
        self.pin(proxy, addon)
        return proxy

    def floor(self, name: str, reverse: bool = False) -> Mitmdump:
        """A started mitmdump with `bench/floor_addon.py`, pinned as llm-mitm's (its reader off the proxy's CPU)."""
        proxy = self.mitmdump(name, reverse, None, FLOOR, tuple(arg for option in LAZY for arg in ("--set", option))).start()
        self.pin(proxy, True)
        return proxy

    def pin(self, proxy: Mitmdump, traced: bool) -> None:
        """The proxy on its CPU; its trace writer (`traced`: once it has started) off it."""
        self.placement.proxy(proxy.pid, proxy.wait_for_children() if traced else [])

    def start_litellm(self, binary: Path) -> subprocess.Popen[str] | None:
        """LiteLLM's proxy (its own venv: it cannot share mitmproxy's) before the same upstream."""
        import socket
        import urllib.request

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.litellm_port = probe.getsockname()[1]
        config = self.work / "litellm.yaml"
        config.write_text(
            "model_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: openai/gpt-4o\n"
            f"      api_base: https://127.0.0.1:{self.upstream_port}/v1\n      api_key: sk-bench\n"
            # the fake upstream's stream knobs (x-events, x-delay-ms) reach it, as through mitmdump
            "general_settings:\n  forward_client_headers_to_llm_api: true\n"
        )
        env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY, "SSL_CERT_FILE": str(self.pki.ca_path),
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        process = subprocess.Popen([str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.litellm_port)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        self.placement.helper(process.pid)
        for _ in range(120):
            time.sleep(0.5)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.litellm_port}/health/liveliness", timeout=1)
                return process
            except OSError:
                if process.poll() is not None:
                    break
        process.kill()
        print("  litellm did not start: no peer row", flush=True)
        return None

    def target(self, proxy: Mitmdump | None, reverse: bool = False) -> Target:
        if proxy is None:
            return Target(HOST, self.upstream_port, tls=True, connect_to=("127.0.0.1", self.upstream_port), ca=str(self.pki.ca_path))
        if reverse:
            return Target("127.0.0.1", proxy.port, tls=False)
        return Target(HOST, 443, tls=True, proxy=("127.0.0.1", proxy.port), ca=str(proxy.ca_cert))

    # ------------------------------------------------------------------ scenarios

    def throughput(self, label: str, targets: dict[str, Target], pids: dict[str, int], concurrencies: tuple[int, ...] = (1, 8, 32),
                   rounds: int | None = None, calls: int | None = None, warm_up: int = 100) -> None:
        """Targets take turns, round by round, in alternating order (A B C, C B A, ...),
        and each row is the median round: a background hiccup then costs one round of
        one target, not its whole row; the throughput ratio is the median of the rounds'
        own ratios, each taken from turns next to each other. For a proxy (`pids`), also
        the CPU time it spent per request (with its trace writer). `calls` per target and
        turn, else `calls_per_turn`."""
        rows = {}
        rounds = rounds or (6 if self.quick else THROUGHPUT_ROUNDS)
        for concurrency in concurrencies:
            per_turn = calls or calls_per_turn(concurrency)
            runs: dict[str, list[Any]] = {name: [] for name in targets}
            cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
            self._chat(targets, concurrency, warm_up)
            for turn in range(rounds):
                for name, target in in_turn(targets, turn):
                    # a peer row, some 8x slower: a quarter of the calls, at least two a connection
                    turn_calls = max(per_turn // 4, 2 * concurrency) if name == "litellm" else per_turn
                    # the proxy's CPU time while the clock runs: not its connections' set-up and first calls
                    on_clock = functools.partial(cpu_seconds, pids[name]) if name in pids else None
                    result = self._chat({name: target}, concurrency, turn_calls, on_clock=on_clock)[name]
                    runs[name].append(result)
                    before, after = result.marks or (None, None)
                    if before is not None and after is not None and result.latencies_ns:
                        per_request = 1e6 / len(result.latencies_ns)
                        cpu[name].append(((after[0] - before[0]) * per_request, (after[1] - before[1]) * per_request))
            for name, results in runs.items():
                rows[f"{name} c={concurrency}"] = row = {
                    **summary(results),
                    "rps_rounds": [round(len(r.latencies_ns) / r.wall_s, 1) for r in results],
                    # the proxy's own process (mitmdump's event loop), and its children (the trace writer)
                    "cpu_us_per_request": round(statistics.median(c[0] for c in cpu[name])) if cpu.get(name) else None,
                    "children_cpu_us_per_request": round(statistics.median(c[1] for c in cpu[name])) if cpu.get(name) else None,
                }
                print(f"  {label} {name:>6} c={concurrency:<2} {row}", flush=True)
        self.results[label] = rows

    def paced(self, label: str, targets: dict[str, Target], concurrencies: tuple[int, ...] = (8, 32), warm_up: int = 100) -> None:
        """Latency at a load the proxies can carry: calls on a fixed schedule (an open loop,
        `load(rate=...)`) at `PACED_SHARE` of the throughput bare mitmdump reached in this
        run's closed loop at the same concurrency, the same schedule for each target, in
        alternating turns. In the closed loop at c=8 and 32 the proxy is saturated and a
        call's latency is the queue in front of it (concurrency over throughput), which
        restates the throughput ratio; here it is what the proxy adds to each call."""
        rounds = 3 if self.quick else 8
        for concurrency in concurrencies:
            rate = PACED_SHARE * self.results[label][f"bare c={concurrency}"]["rps"]
            calls = max(concurrency, round(rate * PACED_SECONDS))
            runs: dict[str, list[Any]] = {name: [] for name in targets}
            self._chat(targets, concurrency, warm_up)
            for turn in range(rounds):
                for name, target in in_turn(targets, turn):
                    runs[name].append(self._chat({name: target}, concurrency, calls, rate)[name])
            for name, results in runs.items():
                self.results[label][f"{name} c={concurrency} paced"] = row = {
                    **summary(results), "offered_rps": round(rate, 1), "cpu_us_per_request": None}
                print(f"  {label} {name:>6} c={concurrency:<2} paced {row}", flush=True)

    def _chat(self, targets: dict[str, Target], concurrency: int, calls: int, rate: float | None = None,
              on_clock: Callable[[], Any] | None = None) -> dict[str, Any]:
        """The benchmark's chat call, `calls` times, to each target in turn."""
        return {name: asyncio.run(load(target, concurrency, calls, "POST", CHAT_PATH, CHAT_BODY, self._auth(name), rate=rate, on_clock=on_clock))
                for name, target in targets.items()}

    @staticmethod
    def _auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {LITELLM_KEY}"} if name == "litellm" else AUTH

    def streaming(self, targets: dict[str, Target], label: str = "streaming", events: int = 20, delay_ms: int = 50) -> None:
        """Time to first chunk and the spacing of the rest, `events` sent `delay_ms` apart.
        The first chunk's time is also taken without the upstream's own wait before it (its
        timer overshoots by a varying amount, the same for every target: noise in a
        comparison of them): the request's way there and the event's way back, from the
        times the upstream notes (`bench.upstream`)."""
        rows = {}
        streams: dict[str, list[tuple[int, Streamed]]] = {name: [] for name in targets}
        for turn in range(5 if self.quick else STREAM_ROUNDS):  # targets take turns in alternating order, as for throughput
            for name, target in in_turn(targets, turn):
                streams[name].append(asyncio.run(self._stream_once(Connection(target), self._auth(name), events, delay_ms)))
        for name in targets:
            # The server waits delay_ms before each event, so the first one is due at delay_ms.
            # A buffering proxy delivers everything in one go at the end: one "chunk".
            first = [(streamed.arrivals[0] - started) / 1e6 - delay_ms for started, streamed in streams[name]]
            ways = [((streamed.received_ns - started) / 1e6, (streamed.arrivals[0] - streamed.first_sent_ns) / 1e6)
                    for started, streamed in streams[name] if streamed.received_ns and streamed.first_sent_ns]
            gaps = [(b - a) / 1e6 for _, streamed in streams[name] if len(streamed.arrivals) >= events
                    for a, b in zip(streamed.arrivals[: events - 1], streamed.arrivals[1:events])]
            deviation = [abs(g - delay_ms) for g in gaps]
            rows[name] = {
                "first_chunk_ms": round(statistics.median(first), 3),
                "first_chunk_ms_rounds": [round(ms, 3) for ms in first],
                # the request's way to the upstream and the first event's way back, without the upstream's wait between
                "first_chunk_path_ms": round(statistics.median(there + back for there, back in ways), 3) if len(ways) == len(first) else None,
                "first_chunk_path_ms_rounds": [round(there + back, 3) for there, back in ways] if len(ways) == len(first) else None,
                "request_way_ms": round(statistics.median(there for there, _ in ways), 3) if ways else None,
                "event_way_ms": round(statistics.median(back for _, back in ways), 3) if ways else None,
                "chunks_seen": len(gaps) // max(1, len(first)) + 1,
                "gap_ms_median": round(statistics.median(gaps), 3) if gaps else None,
                "gap_deviation_ms_p50": round(statistics.median(deviation), 3) if deviation else None,
                "gap_deviation_ms_max": round(max(deviation), 3) if deviation else None,
            }
            print(f"  stream {name:>6} {({key: value for key, value in rows[name].items() if not key.endswith('_rounds')})}", flush=True)
        self.results[label] = rows

    async def _stream_once(self, connection: Connection, auth: dict[str, str], events: int, delay_ms: int) -> tuple[int, Streamed]:
        """A stream on a new connection: when it was sent, and what came."""
        await connection.open()
        # A kept-alive connection, as SDK clients have: the first call pays for connecting
        # upstream (at request time: llm-mitm connects lazily), the streamed one does not.
        await connection.request("POST", CHAT_PATH, CHAT_BODY, auth)
        body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        started = time.perf_counter_ns()
        streamed = await connection.stream(CHAT_PATH, body, {**auth, "x-events": str(events), "x-delay-ms": str(delay_ms)})
        connection.close()
        assert streamed.status == 200, streamed.status
        return started, streamed

    def large(self, targets: dict[str, Target]) -> None:
        big_request = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "y" * 1_000_000}]})
        rows: dict[str, Any] = {}
        for name, target in targets.items():
            count = 10 if self.quick else 30
            request = asyncio.run(load(target, 1, count, "POST", CHAT_PATH, big_request, AUTH))
            response = asyncio.run(load(target, 1, count, "GET", "/big", b"", AUTH))
            stream_ms = []
            for _ in range(2 if self.quick else 3):
                stream_ms.append(asyncio.run(self._long_stream(target)))
            rows[name] = {
                "1MB_request_p50_ms": round(statistics.median(n / 1e6 for n in request.latencies_ns), 2),
                "1MB_response_p50_ms": round(statistics.median(n / 1e6 for n in response.latencies_ns), 2),
                "10k_event_stream_ms": round(statistics.median(stream_ms), 1),
            }
            print(f"  large  {name:>6} {rows[name]}", flush=True)
        self.results["large_bodies"] = rows

    async def _long_stream(self, target: Target) -> float:
        connection = Connection(target)
        await connection.open()
        body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        started = time.perf_counter_ns()
        streamed = await connection.stream(CHAT_PATH, body, {**AUTH, "x-events": "10000"})
        connection.close()
        assert streamed.status == 200, streamed.status
        return (streamed.arrivals[-1] - started) / 1e6

    def soak(self) -> None:
        """Resident size of a fresh proxy with the addon over the soak; growth is the
        highest sample (or the end) less the start, after a warm-up."""
        total = 4000 if self.quick else 20000
        proxy = self.proxy("addon-soak", True)
        target = self.target(proxy)
        pid = proxy.pid
        try:
            calls = asyncio.run(load(target, 8, SOAK_WARM_UP, "POST", CHAT_PATH, CHAT_BODY, AUTH)).calls  # caches, pools, traces
            time.sleep(1)
            before = rss_mb(pid)
            samples = []
            for _ in range(10):
                calls += asyncio.run(load(target, 8, total // 10, "POST", CHAT_PATH, CHAT_BODY, AUTH)).calls
                samples.append(round(rss_mb(pid), 1))
            time.sleep(1)
            after = rss_mb(pid)
        finally:
            proxy.stop()
        traced = len((self.work / "addon-soak" / "traces.jsonl").read_bytes().splitlines())
        self.results["memory"] = {"requests": total, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                                  "growth_mb": round(max(*samples, after) - before, 1), "samples_mb": samples,
                                  "calls": calls, "traces_written": traced}
        print(f"  memory {self.results['memory']}", flush=True)

    def micro(self) -> None:
        """Trace writer capacity, and cost per byte of redaction and SSE parsing."""
        from llm_mitm.redact import Redactor
        from llm_mitm.sse import USAGE_HINT, ChatCompletionsRebuilder, StreamTap, is_usage_only_chunk, strip_null_usage

        records_per_s = self._writer_records_per_s(5000 if self.quick else 20000)
        redactor = Redactor()

        def best_of_three(work: Callable[[], object]) -> float:
            """Seconds of the fastest of three runs: one cold run or a hiccup of the machine
            must not read as a cost that grows with size."""
            timings = []
            for _ in range(3):
                started = time.perf_counter()
                work()
                timings.append(time.perf_counter() - started)
            return min(timings)

        def parse_stream(stream: bytes) -> None:
            tap = StreamTap(ChatCompletionsRebuilder())
            for offset in range(0, len(stream), 4096):
                tap(stream[offset : offset + 4096])
            tap.finish()

        def filter_one_event(event: bytes) -> None:
            """The usage filter (a client that did not ask) on one large event in 4 KB chunks."""
            tap = StreamTap(ChatCompletionsRebuilder(), hold=True)
            tap.drop_events(is_usage_only_chunk, USAGE_HINT, strip=strip_null_usage)
            for offset in range(0, len(event), 4096):
                tap(event[offset : offset + 4096])
            tap.finish()

        linear: dict[str, dict[str, float]] = {"redaction_us_per_kb": {}, "sse_us_per_kb": {}, "sse_filter_us_per_kb": {}}
        event = b'data: {"choices":[{"index":0,"delta":{"content":"token "}}]}\n\n'
        for size_kb in (100, 1000, 4000):
            text = ("word " * (size_kb * 1024 // 5))[: size_kb * 1024]
            body = {"messages": [{"role": "user", "content": text}]}
            seconds = best_of_three(lambda: redactor.json(body))
            linear["redaction_us_per_kb"][f"{size_kb}KB"] = round(seconds * 1e6 / size_kb, 3)
            stream = event * (size_kb * 1024 // len(event))
            seconds = best_of_three(lambda: parse_stream(stream))
            linear["sse_us_per_kb"][f"{size_kb}KB"] = round(seconds * 1e6 / size_kb, 3)
            large = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (size_kb * 1024) + b'"}}]}\n\n'
            seconds = best_of_three(lambda: filter_one_event(large))
            linear["sse_filter_us_per_kb"][f"{size_kb}KB"] = round(seconds * 1e6 / size_kb, 3)
        self.results["micro"] = {"trace_writer_records_per_s": round(records_per_s), **linear, "policy_check_us": self._policy_check_us(),
                                 "hooks_us_per_call": self._hooks_us_per_call(5000 if self.quick else 20000),
                                 "hooks_in_place_us_per_request": self._hooks_in_place(1000 if self.quick else 6000)}
        print(f"  micro  {self.results['micro']}", flush=True)

    def _writer_records_per_s(self, count: int, batch: int = 50) -> float:
        """Records a second through the trace writer process's own loop (`_serve`, run
        here): the benchmark's exchange as the proxy hands it over (a line, its response
        still to read and meter) in rounds of `batch`, completed, redacted and written
        with the default config, the process's reports read and thrown away."""
        import socket
        import threading

        from bench.upstream import COMPLETION
        from llm_mitm.config import default_config
        from llm_mitm.exchange import Body, Exchange
        from llm_mitm.providers import Route
        from llm_mitm.trace import snapshot
        from llm_mitm.tracesink import SinkSettings, _serve

        exchange = Exchange(id="x", route=Route("openai", "openai", "chat.completions"), method="POST",
                            url=f"https://{HOST}{CHAT_PATH}", client="127.0.0.1",
                            request_fields=tuple((k.encode(), v.encode()) for k, v in AUTH.items()),
                            request=Body.parse(CHAT_BODY, "application/json"))
        exchange.status_code = 200
        exchange.finish(COMPLETION, "application/json", defer=True)
        round_ = (orjson.dumps(snapshot(exchange)) + b"\n") * batch
        config = default_config()
        settings = SinkSettings(str(self.work / "writer.jsonl"), None, "full", None, 5, config.redaction.redactor_options(),
                                config.pricing.models, config.usage.estimate_missing)
        ours, theirs = socket.socketpair()

        def hand_over() -> None:
            for _ in range(count // batch):
                ours.sendall(round_)
            ours.shutdown(socket.SHUT_WR)

        def read_reports() -> None:
            while ours.recv(1 << 16):
                pass

        threads = [threading.Thread(target=hand_over), threading.Thread(target=read_reports)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        _serve(theirs, settings)
        seconds = time.perf_counter() - started
        for thread in threads:
            thread.join()
        ours.close()
        return count // batch * batch / seconds

    def _hooks_us_per_call(self, count: int) -> dict[str, float]:
        """llm-mitm's own work per call, timed in this process (`bench.hooks`), placed as
        a proxy is: this process on the proxies' CPU for the while, the writer off it."""
        from bench.hooks import hook_costs

        self.placement.move_here(self.placement.proxy_cpus)
        try:
            return hook_costs(ADDON_CONFIG, self.work / "hooks", CHAT_PATH, CHAT_BODY, AUTH, count, placed=self.placement.helper)
        finally:
            self.placement.move_here(self.placement.other_cpus)

    def _hooks_in_place(self, count: int, concurrency: int = 8) -> dict[str, Any]:
        """The same work timed inside a proxy under load (`bench/timed_addon.py`): reverse
        mode, as the throughput runs place it, the proxy's CPU time per request beside it."""
        timings = self.work / "in-place.json"
        proxy = self.proxy("in-place", True, reverse=True, script=ROOT / "bench" / "timed_addon.py",
                           env={"LLM_MITM_BENCH_TIMINGS": str(timings)})
        target = self.target(proxy, reverse=True)
        result = None
        try:
            self._chat({"in-place": target}, concurrency, 300)
            if _timings(proxy.pid, timings) is not None:  # the warm-up's figures out, counting afresh
                before = cpu_seconds(proxy.pid)
                self._chat({"in-place": target}, concurrency, count)
                after = cpu_seconds(proxy.pid)
                result = _timings(proxy.pid, timings)
        finally:
            proxy.stop()
        if result is None:
            return {"error": "bench/timed_addon.py reported nothing", "us_per_request": {"total": None}}
        if before is not None and after is not None and result["requests"]:
            result["proxy_cpu_us_per_request"] = round((after[0] - before[0]) * 1e6 / result["requests"])
        return result

    def _policy_check_us(self, count: int = 2000) -> dict[str, float]:
        """The policy's check of the benchmark's body, parsed afresh each time as the proxy
        parses it: with texts never seen (a new conversation) and with texts seen before
        (the throughput runs send this one body again and again); and with texts never seen
        under a policy of fifty forbidden phrases (a company's list)."""
        from llm_mitm.config import PolicyConfig
        from llm_mitm.policy import Policy, RequestView
        from llm_mitm.providers import Route

        route = Route("openai", "openai", "chat.completions")
        policy = Policy(PolicyConfig.model_validate(ADDON_CONFIG["policy"]))
        phrases = [*ADDON_CONFIG["policy"]["forbidden_instructions"], *(f"forbidden phrase number {n} of the list" for n in range(48))]
        fifty = Policy(PolicyConfig.model_validate({**ADDON_CONFIG["policy"], "forbidden_instructions": phrases}))
        new = [CHAT_BODY.replace(b"careful", b"careful %d" % n).replace(b"Summarise", b"Summarise %d" % n) for n in range(count)]
        timings = {}
        for name, bodies, checker in (("new_texts", new, policy), ("seen_texts", [CHAT_BODY] * count, policy), ("new_texts_fifty_phrases", new, fifty)):
            parsed = [orjson.loads(body) for body in bodies]
            started = time.perf_counter()
            for body in parsed:
                assert checker.check(RequestView(route, body["model"], body)) is None
            timings[name] = round((time.perf_counter() - started) * 1e6 / count, 2)
        return timings

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        self.start_upstream()
        try:
            bare, addon, floor = self.proxy("bare", False), self.proxy("addon", True), self.floor("floor")
            forward = {"direct": self.target(None), "bare": self.target(bare), "addon": self.target(addon)}
            print("forward proxy, TLS intercepted:", flush=True)
            self.throughput("forward", {**forward, "floor": self.target(floor)}, {"bare": bare.pid, "addon": addon.pid, "floor": floor.pid})
            floor.stop()
            self.paced("forward", {name: forward[name] for name in ("bare", "addon")})
            # mitmdump streams a body only when told to: its own per-chunk cost, for comparison.
            bare_streaming = self.proxy("bare-streaming", False, options=("stream_large_bodies=1",))
            streams = {**forward, "bare-streaming": self.target(bare_streaming)}
            print("streaming, 20 events 50 ms apart:", flush=True)
            self.streaming(streams)
            print("large bodies:", flush=True)
            self.large(streams)
            bare_streaming.stop()
            bare_r, addon_r, floor_r = self.proxy("bare-reverse", False, True), self.proxy("addon-reverse", True, True), self.floor("floor-reverse", True)
            reverse = {"direct": self.target(None), "bare": self.target(bare_r, True), "addon": self.target(addon_r, True),
                       "floor": self.target(floor_r, True)}
            litellm = self.start_litellm(self.litellm) if self.litellm else None
            if litellm is not None:
                reverse["litellm"] = Target("127.0.0.1", self.litellm_port, tls=False)
            print("reverse proxy (LiteLLM's proxy, a gateway, beside it):", flush=True)
            self.throughput("reverse", reverse, {"bare": bare_r.pid, "addon": addon_r.pid, "floor": floor_r.pid,
                                                 **({"litellm": litellm.pid} if litellm else {})})
            floor_r.stop()
            self.paced("reverse", {name: reverse[name] for name in ("bare", "addon")})
            if litellm is not None:
                print("streaming through LiteLLM's proxy, beside llm-mitm in reverse mode and direct:", flush=True)
                self.streaming({name: reverse[name] for name in ("direct", "addon", "litellm")}, "streaming_peer")
                litellm.kill()
            for proxy in (bare_r, addon_r):
                proxy.stop()
            for proxy in (bare, addon):
                proxy.stop()
            print("soak:", flush=True)
            self.soak()
            self.micro()
        finally:
            self.upstream.kill()
        self.results["targets"] = self.verdicts()
        self.results["machine"] = machine(self.placement)
        return self.results

    def verdicts(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mode in ("forward", "reverse"):
            rows = self.results[mode]
            for c in (1, 8, 32):
                bare, addon = rows[f"bare c={c}"], rows[f"addon c={c}"]
                ratio, low, high = round_ratio(addon, bare)
                added = addon["p50_ms"] - bare["p50_ms"]
                clean = no_errors(addon, bare)
                out[f"{mode} c={c} throughput ratio"] = {"value": round(ratio, 3), "target": ">= 0.95", "pass": clean and ratio >= 0.95,
                                                         "interval_95": [round(low, 3), round(high, 3)]}
                floor = rows[f"floor c={c}"]
                floor_ratio, floor_low, floor_high = round_ratio(floor, bare)
                out[f"{mode} c={c} throughput ratio of the floor addon"] = {
                    "value": round(floor_ratio, 3), "target": "(the job's own price: bench/floor_addon.py)", "pass": no_errors(floor, bare),
                    "interval_95": [round(floor_low, 3), round(floor_high, 3)]}
                if c == 1:  # one call at a time: never a queue
                    out[f"{mode} c=1 p50 added ms"] = {"value": round(added, 3), "target": "<= 0.3", "pass": clean and added <= 0.3}
                else:
                    out[f"{mode} c={c} p50 added ms, saturated"] = {"value": round(added, 3), "pass": clean,
                                                                    "target": "(the queue: c / throughput; the ratio above judges it)"}
                    bare_paced, addon_paced = rows[f"bare c={c} paced"], rows[f"addon c={c} paced"]
                    paced = addon_paced["p50_ms"] - bare_paced["p50_ms"]
                    out[f"{mode} c={c} p50 added ms, paced at {PACED_SHARE:.0%} of bare's throughput"] = {
                        "value": round(paced, 3), "target": "<= 0.3",
                        "pass": no_errors(addon_paced, bare_paced) and paced <= 0.3}
                if addon["cpu_us_per_request"] is not None and bare["cpu_us_per_request"] is not None:
                    cpu_added = addon["cpu_us_per_request"] - bare["cpu_us_per_request"]
                    out[f"{mode} c={c} event loop CPU added per request (us)"] = {
                        "value": cpu_added, "target": f"(bare: {bare['cpu_us_per_request']})", "pass": True}
        stream = self.results["streaming"]
        # Bare mitmdump's own cost of a streamed request: its first chunk (streaming on) less
        # direct's. Judged on the request's way there and the event's way back, as the upstream
        # noted them; the whole time, with the upstream's wait between (whose overshoot is its
        # timer's noise, not a proxy's), is shown beside.
        # The budget, direct + (bare's - direct's) + 0.5, is bare's own time + 0.5: judged as the
        # median of each round's difference from bare's (the two streams next to each other,
        # so what the machine did meanwhile cancels), with its 95 % interval. Medians of 30
        # streams taken apart swung by 0.5 ms from run to run, either way (bench/NOTES.md).
        judged = "first_chunk_path_ms" if all(stream[target]["first_chunk_path_ms"] is not None for target in ("addon", "bare-streaming", "direct")) else "first_chunk_ms"
        for key, name in (("first_chunk_path_ms", "first chunk ms, the ways there and back"), ("first_chunk_ms", "first chunk ms, with the upstream's wait")):
            addon, bare, direct = (stream[target][key] for target in ("addon", "bare-streaming", "direct"))
            if None not in (addon, bare, direct):
                added, low, high = median_interval([a - b for a, b in zip(stream["addon"][f"{key}_rounds"], stream["bare-streaming"][f"{key}_rounds"])])
                budget = f"added over bare with streaming on <= 0.5 (addon {addon:.3f}, bare {bare:.3f}, direct {direct:.3f})"
                out[name] = {"value": round(added, 3), "target": budget if key == judged else f"({budget}, were it the time judged)",
                             "pass": key != judged or added <= 0.5, "interval_95": [round(low, 3), round(high, 3)]}
        deviation = stream["addon"]["gap_deviation_ms_p50"] - stream["direct"]["gap_deviation_ms_p50"]
        out["chunk spacing ms (p50 deviation beyond direct)"] = {"value": round(deviation, 3), "target": "<= 1", "pass": deviation <= 1}
        if "litellm c=1" in self.results["reverse"]:
            rows = self.results["reverse"]
            out["peer: LiteLLM p50 added over direct, c=1 (ms)"] = {"value": round(rows["litellm c=1"]["p50_ms"] - rows["direct c=1"]["p50_ms"], 3), "target": "(for comparison)", "pass": True}
            out["peer: llm-mitm reverse p50 added over direct, c=1 (ms)"] = {"value": round(rows["addon c=1"]["p50_ms"] - rows["direct c=1"]["p50_ms"], 3), "target": "(for comparison)", "pass": True}
        if "streaming_peer" in self.results:
            peer = self.results["streaming_peer"]
            for name, who in (("litellm", "LiteLLM"), ("addon", "llm-mitm reverse")):
                out[f"peer: {who} first chunk ms over direct"] = {
                    "value": round(peer[name]["first_chunk_ms"] - peer["direct"]["first_chunk_ms"], 3), "target": "(for comparison)", "pass": True}
            spacing = peer["litellm"]["gap_deviation_ms_p50"]  # None: it buffered the stream
            out["peer: LiteLLM chunk spacing ms (p50 deviation beyond direct)"] = {
                "value": None if spacing is None else round(spacing - peer["direct"]["gap_deviation_ms_p50"], 3),
                "target": "(for comparison)", "pass": True}
        memory = self.results["memory"]
        out["rss growth MB"] = {"value": memory["growth_mb"], "target": "< 10", "pass": memory["growth_mb"] < 10}
        calls = memory["calls"]  # the soak's, its warm-up's, and each connection's first
        out["soak calls traced"] = {"value": memory["traces_written"], "target": f"== {calls}", "pass": memory["traces_written"] == calls}
        hooks = self.results["micro"]["hooks_us_per_call"]
        bare_cpu = self.results["reverse"]["bare c=8"]["cpu_us_per_request"]
        out["llm-mitm's own work per call, timed in process (us)"] = {
            "value": hooks["total"], "target": f"(bare mitmdump's CPU per request, reverse c=8: {bare_cpu})", "pass": True}
        in_place = self.results["micro"]["hooks_in_place_us_per_request"]
        out["llm-mitm's own work per request, timed in place under load (us)"] = {
            "value": in_place["us_per_request"]["total"], "pass": "error" not in in_place,  # measured at all
            "target": f"(that proxy's CPU per request: {in_place.get('proxy_cpu_us_per_request')}, reverse c=8)"}
        for name in ("redaction_us_per_kb", "sse_us_per_kb", "sse_filter_us_per_kb"):
            per_kb = list(self.results["micro"][name].values())
            spread = max(per_kb) / min(per_kb)
            out[f"{name} spread (100KB..4MB)"] = {"value": round(spread, 2), "target": "<= 2 (linear)", "pass": spread <= 2}
        return out


def machine(placement: Placement) -> dict[str, Any]:
    import mitmproxy.version

    import llm_mitm

    return {
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "llm_mitm": llm_mitm.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "placement": placement.describe(),
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def print_table(results: dict[str, Any]) -> None:
    print("\n== llm-mitm benchmark ==")
    print(" ".join(f"{k}={v}" for k, v in results["machine"].items()))
    for mode in ("forward", "reverse"):
        print(f"\n{mode:<17}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'cpu us/req':>12}")
        for name, row in results[mode].items():
            print(f"{name:<17}{row['rps']:>10}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['cpu_us_per_request'] or '':>12}")
    print("\ntargets:")
    for name, verdict in results["targets"].items():
        interval = f", 95 % interval {verdict['interval_95'][0]}-{verdict['interval_95'][1]}" if "interval_95" in verdict else ""
        status = "MISS" if not verdict["pass"] else "INFO" if verdict["target"].startswith("(") else "PASS"  # "(...)": a figure, no target
        print(f"  {status}  {name}: {verdict['value']} (target {verdict['target']}{interval})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--litellm", type=Path, default=LITELLM if LITELLM.exists() else None,
                        help="LiteLLM's `litellm` command, for a peer row (default: bench/.venv-litellm, when installed)")
    args = parser.parse_args()
    results = Bench(args.quick, args.litellm).run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
