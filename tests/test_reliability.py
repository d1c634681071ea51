"""Faults and bad input: disk full, rotation, kill -9, fuzzed parsers, unsafe set-ups."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from pathlib import Path

import orjson
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_mitm import writer as writer_module
from llm_mitm.addons.safety import ca_key_problem, is_loopback
from llm_mitm.config import PolicyConfig, default_config
from llm_mitm.policy import Policy, RequestView
from llm_mitm.providers import ProviderMatcher, Route
from llm_mitm.writer import TraceWriter
from tests.conftest import provider_routes
from tests.support.fake_provider import FakeProvider
from tests.support.mitm import Mitmdump
from tests.support.pki import ServerCert
from tests.test_e2e_clients import OPENAI_KEY, chat, trace_with


def row(id: str, pad: str = "") -> dict[str, str]:
    """A record as the writer takes it: plain data."""
    return {"id": id, "pad": pad}


def lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_disk_full_loses_no_whole_line_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC in the middle of a write: the torn part is cut off, the error logged once,
    and writing goes on when space comes back."""
    real_write = os.write
    full = threading.Event()

    def write(fd: int, data: bytes) -> int:
        if full.is_set() and len(data) > 10:
            real_write(fd, bytes(data[:10]))  # a short write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", write)
    target = tmp_path / "t.jsonl"
    writer = TraceWriter(target, None)
    with caplog.at_level(logging.INFO, logger="llm_mitm.traces"):
        writer.write([(lambda: row(id="before"), None)])
        full.set()
        for i in range(3):
            writer.write([(lambda i=i: row(id=f"lost{i}"), None)])
        full.clear()
        writer.write([(lambda: row(id="after"), None)])
        writer.close()
    assert [r["id"] for r in lines(target)] == ["before", "after"]
    assert writer.stats.failed == 3
    assert len([r for r in caplog.records if "TRACE LOST" in r.getMessage()]) == 1
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_rotation_by_size_loses_no_line(tmp_path: Path) -> None:
    target = tmp_path / "t.jsonl"
    writer = TraceWriter(target, None, max_bytes=2000, keep=3)
    for first in range(0, 60, 7):  # several batches, so several rotations
        writer.write([(lambda i=i: row(id=str(i), pad="x" * 100), None) for i in range(first, min(first + 7, 60))])
    writer.close()
    files = [target, *(target.with_name(f"t.jsonl.{n}") for n in (1, 2, 3))]
    assert not target.with_name("t.jsonl.4").exists()
    kept = [r for f in reversed(files) if f.exists() for r in lines(f)]
    ids = [int(r["id"]) for r in kept]
    assert ids == sorted(ids) and ids[-1] == 59  # in order, the newest kept
    assert ids == list(range(ids[0], 60))  # nothing missing inside what is kept
    assert all(f.stat().st_size <= 2000 for f in files if f.exists())


def test_a_batch_larger_than_max_bytes_is_cut_across_files(tmp_path: Path) -> None:
    """A busy round's batch landed whole in one file, up to twice max_bytes and more."""
    target = tmp_path / "t.jsonl"
    writer = TraceWriter(target, None, max_bytes=1000, keep=20)
    writer.write([(lambda i=i: row(id=str(i), pad="x" * 100), None) for i in range(40)])
    writer.write([(lambda: row(id="huge", pad="y" * 3000), None), (lambda: row(id="after", pad=""), None)])
    writer.close()
    files = [f for f in [target, *(target.with_name(f"t.jsonl.{n}") for n in range(1, 21))] if f.exists()]
    ids = [r["id"] for f in reversed(files) for r in lines(f)]
    assert ids == [str(i) for i in range(40)] + ["huge", "after"] and writer.stats.written == 42
    assert [f.stat().st_size <= 1000 for f in files].count(False) == 1  # the huge line, on its own
    assert lines(target.with_name("t.jsonl.1"))[0]["id"] == "huge" and len(lines(target.with_name("t.jsonl.1"))) == 1


def test_kill_9_leaves_a_clean_trace_file(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    proxy = Mitmdump(tmp_path, routes=provider_routes(provider), upstream_ca=pki.ca_path).start()
    session = requests.Session()
    done: list[tuple[str, float]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with requests.Session() as s:
            for i in range(250):
                if stop.is_set():
                    return
                text = f"kill-{worker}-{i}"
                try:
                    r = s.post("https://api.openai.com/v1/chat/completions", json=chat(text), headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                               proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=10)
                except requests.RequestException:
                    return
                if r.status_code == 200:
                    done.append((text, time.monotonic()))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]  # up to 1,000 requests
    for t in threads:
        t.start()
    time.sleep(3)
    killed_at = time.monotonic()
    os.kill(proxy.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    stop.set()
    for t in threads:
        t.join()
    session.close()
    time.sleep(2)  # the writer process drains what it was handed
    raw = proxy.traces_path.read_bytes()
    assert raw.endswith(b"\n")
    records = [orjson.loads(line) for line in raw.splitlines()]  # every line parses
    traced = {r["request"]["body"]["messages"][0]["content"] for r in records}
    settled = [text for text, at in done if at < killed_at - 1.0]
    assert len(settled) > 50
    assert set(settled) <= traced


@pytest.mark.parametrize("budgets", [False, True])
def test_a_call_ending_as_the_proxy_stops_is_traced_and_charged(tmp_path: Path, provider: FakeProvider, pki: ServerCert, budgets: bool) -> None:
    """SIGTERM (Ctrl-C) under load: mitmproxy still answers calls after its `done`, and
    cancels others; each call that reached upstream is traced, answered or cut short, and
    with budgets charged before the spend store closes (a probe: 1-4 answered calls a
    shutdown went untraced, and each charge after `done` failed on the closed database)."""
    config = {"policy": {"budgets": [{"usd_per_day": 1000, "per": "global"}]}} if budgets else None
    proxy = Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path).start()
    stop, run = threading.Event(), f"term{os.getpid()}{budgets}{time.monotonic_ns()}-"  # the fake provider serves every test

    def load(worker: int) -> None:
        with requests.Session() as s:
            for i in range(500):
                if stop.is_set():
                    return
                body = chat(f"{run}{worker}-{i}", stream=i % 2 == 0)
                try:
                    s.post("https://api.openai.com/v1/chat/completions", json=body, timeout=10, proxies={"https": proxy.proxy_url},
                           verify=str(proxy.ca_cert), headers={"Authorization": f"Bearer {OPENAI_KEY}", "x-fake-delay-ms": "20"}).content
                except requests.RequestException:
                    return

    threads = [threading.Thread(target=load, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    proxy.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert proxy.process.wait(30) is not None  # type: ignore[union-attr]
    stop.set()
    for t in threads:
        t.join()
    sent = {orjson.loads(r.body)["messages"][0]["content"] for r in provider.requests if run.encode() in r.body}
    traced = {r["request"]["body"]["messages"][0]["content"] for r in lines(proxy.traces_path) if run in str(r["request"]["body"])}
    assert len(sent) > 20 and sent <= traced, sorted(sent - traced)
    assert "failed in" not in proxy.output and "closed database" not in proxy.output


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_loses_no_trace(tmp_path: Path, provider: FakeProvider, pki: ServerCert, stop_signal: int) -> None:
    """Ctrl-C in a terminal (SIGINT) and a service manager's stop (SIGTERM) reach every
    process of the group, the trace writer too (a review: it died of the KeyboardInterrupt,
    with a traceback, and what was on its way to it was lost): the writer ends once the
    proxy is done with it."""
    proxy = Mitmdump(tmp_path, routes=provider_routes(provider), upstream_ca=pki.ca_path, own_session=True).start()
    run = f"group{os.getpid()}-{stop_signal}-{time.monotonic_ns()}-"
    with requests.Session() as session:
        for i in range(30):
            assert session.post("https://api.openai.com/v1/chat/completions", json=chat(f"{run}{i}"), timeout=10, proxies={"https": proxy.proxy_url},
                                verify=str(proxy.ca_cert), headers={"Authorization": f"Bearer {OPENAI_KEY}"}).status_code == 200
    assert proxy.wait_for_children()
    os.killpg(proxy.pid, stop_signal)  # the calls' records are still in the proxy's round, or on their way
    assert proxy.process.wait(30) is not None  # type: ignore[union-attr]
    traced = {r["request"]["body"]["messages"][0]["content"] for r in lines(proxy.traces_path)}
    assert {f"{run}{i}" for i in range(30)} <= traced
    assert "Traceback" not in proxy.output and "KeyboardInterrupt" not in proxy.output, proxy.output[-3000:]


def writers(pid: int) -> list[int]:
    """The trace writer processes of a mitmdump (not multiprocessing's resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return [child for child in found if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def test_a_trace_writer_that_goes_is_replaced(proxy: Mitmdump) -> None:
    """One lost writer process (killed, out of memory) must not end tracing for the run,
    nor lose the calls that came after it went."""
    def call(text: str) -> None:
        r = requests.post("https://api.openai.com/v1/chat/completions", json=chat(text), headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                          proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=10)
        assert r.status_code == 200

    call("before the writer goes")
    trace_with(proxy, "before the writer goes")
    first = writers(proxy.process.pid)  # type: ignore[union-attr]
    assert len(first) == 1
    os.kill(first[0], signal.SIGKILL)
    for i in range(3):  # the round in which it went finds it gone; the next call starts another
        call(f"after it went {i}")
        time.sleep(0.3)
    for i in range(3):  # the first one too: the round that found the writer gone kept it for the next
        assert trace_with(proxy, f"after it went {i}")["status_code"] == 200
    replacement = writers(proxy.process.pid)  # type: ignore[union-attr]
    assert len(replacement) == 1 and replacement != first
    proxy.wait_for_output("a new trace writer process is started")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(min_value=0, max_value=70000), st.text(max_size=80))
def test_provider_detection_never_raises(host: str, port: int, path: str) -> None:
    matcher = ProviderMatcher(default_config().enabled_providers)
    route = matcher.route(host, port, path)
    assert route is None or route.operation


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["model", "messages", "role", "content", "input", "system", "prompt", "instructions", "type", "text", "max_tokens", "output"]) | st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON, st.sampled_from(["chat.completions", "responses", "messages", "completions", "embeddings"]))
def test_policy_never_raises_on_any_json(body: object, operation: str) -> None:
    policy = Policy(PolicyConfig(allowed_models=["gpt-*"], max_tokens=10, max_tokens_action="clamp",
                                 forbidden_instructions=["ignore previous", "system:*dan*"]))
    route = Route("openai", "anthropic" if operation == "messages" else "openai", operation)
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    policy.check(RequestView(route, model, body))
    policy.clamp(route, body)


def test_duplicate_json_keys_last_one_wins() -> None:
    """Like the providers' JSON parsers: a policy sees the model upstream would use."""
    from llm_mitm.exchange import Body

    body = Body.parse(b'{"model": "gpt-4o", "model": "o1-pro"}', "application/json")
    assert body.json == {"model": "o1-pro"}


def test_unsafe_setups_are_recognised(tmp_path: Path) -> None:
    from llm_mitm.addons.safety import open_listen_hosts

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("") and not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    # a mode's own address counts, not listen_host (a review: an open one passed unwarned, a loopback one was warned of)
    assert open_listen_hosts(["regular"], "") == [""] and open_listen_hosts(["regular"], "127.0.0.1") == []
    assert open_listen_hosts(["regular@0.0.0.0:18099"], "127.0.0.1") == ["0.0.0.0"]
    assert open_listen_hosts(["reverse:https://api.openai.com@127.0.0.1:8000", "regular@[::1]:9", "local", "wireguard"], "") == []
    assert open_listen_hosts(["reverse:https://api.openai.com@8000"], "") == [""]
    key = tmp_path / "mitmproxy-ca.pem"
    key.write_text("k")
    key.chmod(0o644)
    assert "chmod 600" in (ca_key_problem(tmp_path) or "")
    key.chmod(0o600)
    assert ca_key_problem(tmp_path) is None


def test_trace_files_are_private(proxy: Mitmdump) -> None:
    before = len(proxy.traces())
    requests.post("https://api.openai.com/v1/chat/completions", json=chat("private"), headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                  proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)
    assert len(proxy.wait_for_traces(before + 1)) == before + 1
    assert proxy.traces_path.stat().st_mode & 0o777 == 0o600


def test_safety_warnings_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons

    from llm_mitm.addons.safety import Safety

    (tmp_path / "mitmproxy-ca.pem").write_text("k")
    (tmp_path / "mitmproxy-ca.pem").chmod(0o640)

    async def go() -> None:
        safety = Safety()
        with taddons.context(safety, Proxyserver()) as tctx:
            tctx.options.update(listen_host="", confdir=str(tmp_path))
            with caplog.at_level(logging.WARNING):
                safety.running()
            assert "listening on every interface without proxyauth" in caplog.text
            assert "mode 640" in caplog.text and "chmod 600" in caplog.text
            tctx.options.update(listen_host="127.0.0.1")
            (tmp_path / "mitmproxy-ca.pem").chmod(0o600)
            caplog.clear()
            safety.running()
            assert caplog.records == []

    with caplog.at_level(logging.WARNING):
        asyncio.run(go())


def test_json_sent_as_text_plain_is_still_checked() -> None:
    from llm_mitm.exchange import Body

    body = Body.parse(b'  {"model": "gpt-4o"}', "text/plain")
    assert body.is_json and body.json == {"model": "gpt-4o"}
    assert not Body.parse(b"{not json", "text/plain").is_json
    assert Body.parse(b"\xff\xfe{", "text/plain").text is not None  # non-UTF-8: kept as text, no crash


def test_config_changes_under_load_lose_no_request(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    with Mitmdump(tmp_path, config={"traces": {"destination": "a.jsonl"}}, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        statuses: list[int] = []

        def load(worker: int) -> None:
            with requests.Session() as s:
                for i in range(40):
                    r = s.post("https://api.openai.com/v1/chat/completions", json=chat(f"load-{worker}-{i}"),
                               headers={"Authorization": f"Bearer {OPENAI_KEY}"}, proxies={"https": proxy.proxy_url},
                               verify=str(proxy.ca_cert), timeout=30)
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for n in range(6):  # good and bad edits while requests fly
            time.sleep(0.4)
            text = "traces:\n  destination: b.jsonl\n" if n % 2 else "traces:\n  destination: a.jsonl\n  nope: 1\n"
            (tmp_path / "config.yaml").write_text(text)
        for t in threads:
            t.join()
        time.sleep(1)
    assert statuses == [200] * 160
    traced = [r for name in ("a.jsonl", "b.jsonl") if (tmp_path / name).exists() for r in lines(tmp_path / name)]
    assert sorted(r["request"]["body"]["messages"][0]["content"] for r in traced) == sorted(f"load-{w}-{i}" for w in range(4) for i in range(40))


def test_http2_client(proxy: Mitmdump) -> None:
    import subprocess

    out = subprocess.run(
        ["curl", "-sS", "--http2", "--proxy", proxy.proxy_url, "--cacert", str(proxy.ca_cert), "-w", "\n%{http_version}",
         "https://api.openai.com/v1/chat/completions", "-H", f"authorization: Bearer {OPENAI_KEY}",
         "-H", "content-type: application/json", "-d", orjson.dumps(chat("over h2"))],
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0 and out.stdout.endswith(b"\n2"), out
    assert trace_with(proxy, "over h2")["status_code"] == 200


def test_websocket_on_an_llm_host_passes_and_is_traced_as_metadata(proxy: Mitmdump) -> None:
    import base64
    import socket
    import ssl

    key = "sk-proj-" + "W5ck" * 12
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    raw.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    assert b" 200 " in raw.recv(4096)
    tls = ssl.create_default_context(cafile=str(proxy.ca_cert)).wrap_socket(raw, server_hostname="api.openai.com")
    nonce = base64.b64encode(os.urandom(16)).decode()
    tls.sendall(
        f"GET /v1/realtime?model=gpt-4o-realtime HTTP/1.1\r\nHost: api.openai.com\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {key}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    mask, payload = os.urandom(4), b'{"type": "session.update"}'
    tls.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    frame = tls.recv(4096)
    assert frame[2:] == payload  # the message passed through both ways
    tls.close()
    deadline = time.monotonic() + 5
    while not (found := [r for r in proxy.traces() if "/v1/realtime" in r["url"]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == 1, proxy.output[-2000:]
    record = found[0]
    assert (record["operation"], record["status_code"]) == ("realtime", 101)
    assert key[8:-4] not in proxy.traces_path.read_text() and key not in proxy.output


def test_huge_and_deeply_nested_bodies_pass(proxy: Mitmdump) -> None:
    def post(data: bytes) -> requests.Response:
        return requests.post("https://api.openai.com/v1/chat/completions", data=data,
                             headers={"Authorization": f"Bearer {OPENAI_KEY}", "content-type": "application/json"},
                             proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=60)

    huge = orjson.dumps(chat("huge " + "z" * 8_000_000))
    assert post(huge).status_code == 200
    deep = b'{"model": "gpt-4o", "messages": ' + b"[" * 5000 + b"]" * 5000 + b', "tag": "deep-one"}'
    answer = post(deep)  # valid JSON, deeper than parsers take: upstream decides, we stay up
    assert answer.status_code in (200, 400)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        urls = [r for r in proxy.traces() if r["request"]["size"] >= 8_000_000 or r["request"]["size"] == len(deep)]
        if len(urls) == 2:
            break
        time.sleep(0.1)
    assert len(urls) == 2
    assert post(orjson.dumps(chat("still fine"))).status_code == 200


def test_a_connection_to_the_fake_provider_slow_to_say_hello_holds_up_no_other(provider: FakeProvider, pki: ServerCert) -> None:
    """The session's fake provider answers each client while another has not begun its TLS
    handshake (an upstream connection mitmproxy opened and has not yet used, a client of
    another test late or stopped): it shook hands in its one accept loop, so one such
    connection held up every other. A realtime client waits 10 s for its WebSocket handshake
    (websockets' open_timeout) and, when that passes, hangs for good (websockets 17.4 joins a
    reader blocked in an SSL recv): the 60 s hang of a realtime test."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(pki.ca_path))
    with socket.create_connection(("127.0.0.1", provider.port), timeout=5):  # connected, silent
        with socket.create_connection(("127.0.0.1", provider.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="api.openai.com") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")


def test_upstream_refusing_connections_gives_a_clean_error(tmp_path: Path, pki: ServerCert, provider: FakeProvider) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    routes = {"api.openai.com": dead, "api.anthropic.com": provider.port}
    with Mitmdump(tmp_path, routes=routes, upstream_ca=pki.ca_path) as proxy:
        def post(host: str) -> requests.Response:
            return requests.post(f"https://{host}/v1/chat/completions", json=chat("refused?"), headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                                 proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)

        assert post("api.openai.com").status_code == 502
        assert post("api.anthropic.com").status_code == 200  # the proxy goes on serving
        records = proxy.wait_for_traces(2)
    refused = next(r for r in records if r["provider"] == "openai")
    assert refused["error"] and refused["status_code"] in (None, 502)
