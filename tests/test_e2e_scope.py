"""Only LLM hosts are intercepted; other traffic is a raw tunnel; http is upgraded."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import provider_routes
from tests.support.answer_locally import __file__ as ANSWER_LOCALLY
from tests.support.fake_provider import CANNED_REPLY, FakeProvider
from tests.support.mitm import ROOT, Mitmdump
from tests.support.pki import ServerCert
from tests.test_e2e_clients import OPENAI_KEY, chat, marker, trace_with


def curl(proxy: Mitmdump, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--proxy", proxy.proxy_url, *args], capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}
    )


def test_other_hosts_keep_their_own_certificate(tmp_path: Path, provider: FakeProvider, pki: ServerCert, other_site) -> None:  # type: ignore[no-untyped-def]
    site, site_cert = other_site
    routes = {"api.openai.com": provider.port, "api.openai.com.evil.net": site.port}
    with Mitmdump(tmp_path, routes=routes, upstream_ca=pki.ca_path) as proxy:
        before = len(proxy.traces())
        # Trusting only the site's own CA works: the proxy did not put its certificate in.
        direct = curl(proxy, "--cacert", str(site_cert.ca_path), f"https://127.0.0.1:{site.port}/")
        assert direct.returncode == 0, direct.stderr
        assert direct.stdout == b"not an LLM server"
        # A name that merely starts like a provider host is not intercepted either.
        evil = curl(proxy, "--cacert", str(site_cert.ca_path), "https://api.openai.com.evil.net/")
        assert evil.returncode == 0, evil.stderr
        assert evil.stdout == b"not an LLM server"
        # Trusting the mitmproxy CA for that site fails: it really is the site's certificate.
        assert curl(proxy, "--cacert", str(proxy.ca_cert), f"https://127.0.0.1:{site.port}/").returncode != 0
        # The LLM host itself is intercepted.
        ok = curl(proxy, "--cacert", str(proxy.ca_cert), "https://api.openai.com/v1/models")
        assert ok.returncode == 0 and b"gpt-4o" in ok.stdout
        records = proxy.wait_for_traces(before + 1)
        assert [r["url"] for r in records[before:]] == ["https://api.openai.com/v1/models"]
        assert "127.0.0.1:%d" % site.port not in "".join(
            line for line in proxy.lines if "GET" in line
        )


def test_plain_http_is_upgraded_and_nothing_is_added(proxy: Mitmdump, provider: FakeProvider) -> None:
    m = marker()
    body = orjson.dumps(chat(m))
    out = curl(
        proxy, "http://api.openai.com/v1/chat/completions",
        "-H", f"Authorization: Bearer {OPENAI_KEY}", "-H", "Content-Type: application/json", "-d", body,
    )
    assert out.returncode == 0, out.stderr
    assert CANNED_REPLY.encode() in out.stdout  # the fake provider speaks TLS only
    received = next(r for r in provider.requests if m.encode() in r.body)
    names = sorted(k.lower() for k, _ in received.headers)
    assert names == ["accept", "authorization", "content-length", "content-type", "host", "user-agent"]
    assert received.header("host") == "api.openai.com"
    assert received.body == body
    t = trace_with(proxy, m)
    assert t["url"] == "https://api.openai.com/v1/chat/completions"


def test_upgrade_can_be_turned_off(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    config = {"providers": {"openai": {"upgrade_http": False}}}
    routes = {"api.openai.com": provider.port}
    with Mitmdump(tmp_path, config=config, routes=routes, upstream_ca=pki.ca_path) as proxy:
        out = curl(proxy, "http://api.openai.com/v1/models")
        # Plain http reaches a TLS-only server: no answer, where the upgrade got one.
        assert b"gpt-4o" not in out.stdout


def test_a_request_answered_by_an_addon_opens_no_upstream_connection(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    routes = {"api.openai.com": provider.port}
    with Mitmdump(tmp_path, routes=routes, upstream_ca=pki.ca_path, extra_args=["-s", ANSWER_LOCALLY]) as proxy:
        before = provider.connections
        out = curl(proxy, "--cacert", str(proxy.ca_cert), "https://api.openai.com/v1/models", "-H", "x-answer-locally: 1")
        assert out.returncode == 0 and out.stdout == b'{"answered": "locally"}'
        records = proxy.wait_for_traces(1)
        assert records and records[0]["status_code"] == 200
        assert records[0]["response"]["body"] == {"answered": "locally"}
        assert provider.connections == before


def test_a_provider_at_an_ipv6_address_is_intercepted(tmp_path: Path, pki: ServerCert) -> None:
    """mitmproxy decides what to intercept by `::1:PORT`, without the brackets a host
    pattern has: a provider at `[::1]` was passed through untouched, policy and all (a probe)."""
    server = FakeProvider(str(pki.cert_path), str(pki.key_path), host="::1").start()
    try:
        config = {"providers": {"v6": {"api": "openai", "hosts": [f"[::1]:{server.port}"]}}, "policy": {"denied_models": ["gpt-4"]}}
        with Mitmdump(tmp_path, config=config, upstream_ca=pki.ca_path) as proxy:
            m = marker()
            url = f"https://[::1]:{server.port}/v1/chat/completions"
            answer = curl(proxy, "--cacert", str(proxy.ca_cert), url, "-H", f"Authorization: Bearer {OPENAI_KEY}",
                          "-H", "Content-Type: application/json", "-d", orjson.dumps(chat(m)).decode())
            assert answer.returncode == 0 and CANNED_REPLY.encode() in answer.stdout, answer.stderr  # the proxy's certificate: intercepted
            t = trace_with(proxy, m)
            assert (t["provider"], t["url"]) == ("v6", url)
            denied = curl(proxy, "--cacert", str(proxy.ca_cert), url, "-H", "Content-Type: application/json", "-d", orjson.dumps(chat(marker(), model="gpt-4")).decode())
            assert b"model_not_allowed" in denied.stdout
    finally:
        server.stop()


def test_plain_http_goes_where_it_names_whatever_its_host_header_says(tmp_path: Path) -> None:
    """Over plain HTTP mitmproxy connects to the address the request names: a Host header
    naming a provider does not make it that provider's call (a probe: the organization was
    added and the call traced as OpenAI's)."""
    server = FakeProvider().start()
    try:
        with Mitmdump(tmp_path, config={"organization": {"default": "org-default"}}) as proxy:
            m = marker()
            answer = curl(proxy, f"http://127.0.0.1:{server.port}/v1/chat/completions", "-H", "Host: api.openai.com",
                          "-H", "Content-Type: application/json", "-d", orjson.dumps(chat(m)).decode())
            assert answer.returncode == 0 and CANNED_REPLY.encode() in answer.stdout, answer.stderr
            received = next(r for r in server.requests if m.encode() in r.body)
            assert received.header("openai-organization") is None
            assert not [t for t in proxy.traces() if m in str(t["request"]["body"])]
    finally:
        server.stop()


ANTHROPIC_CALL = orjson.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
ANTHROPIC_OFF = {"providers": {"anthropic": {"enabled": False}}, "policy": {"allowed_models": ["gpt-4o*"]}}
ANTHROPIC_ON = "policy:\n  allowed_models: ['gpt-4o*']\n"


def tunnel(proxy: Mitmdump, target: str, server_name: str, ca: Path) -> ssl.SSLSocket:
    """A CONNECT to `target` through the proxy, then TLS for `server_name` trusting `ca`."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=server_name)


def call_claude(connection: ssl.SSLSocket) -> int | None:
    """An Anthropic call on a kept-alive connection: its status, None once the connection is closed."""
    connection.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nanthropic-version: 2023-06-01\r\n"
                       b"x-api-key: sk-ant-api03-" + b"t" * 40 + b"\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(ANTHROPIC_CALL), ANTHROPIC_CALL))
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            if not (piece := connection.recv(65536)):
                return None
            data += piece
    except (ConnectionError, ssl.SSLError):
        return None
    head, _, rest = data.partition(b"\r\n\r\n")
    while len(rest) < content_length(data):
        rest += connection.recv(65536)
    return int(head.split(b" ", 2)[1])


def content_length(answer: bytes) -> int:
    """The content-length an answer's head names, once the head has come (else 0)."""
    head = answer.partition(b"\r\n\r\n")[0]
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)


CLOSED_ONE = "api.anthropic.com now intercepted; 1 connection(s) to them passed untouched before are closed"


@pytest.mark.parametrize("target", ["api.anthropic.com:443", "address"])
def test_an_edit_taking_a_host_into_scope_closes_the_tunnels_open_to_it(tmp_path: Path, provider: FakeProvider, pki: ServerCert, target: str) -> None:
    """A probe: with anthropic off, a client's kept-alive tunnel to api.anthropic.com passed
    as raw TLS; an edit turned anthropic on with allowed_models [gpt-4o*], and the next call
    on that connection (claude-x) was still answered 200, untraced (mitmproxy decides once a
    connection). The edit closes such tunnels, named by host or by address with the TLS
    server name (as transparent modes see them all): the client connects again, intercepted."""
    target = f"127.0.0.1:{provider.port}" if target == "address" else target
    with Mitmdump(tmp_path, config=ANTHROPIC_OFF, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        kept = tunnel(proxy, target, "api.anthropic.com", pki.ca_path)  # passed untouched: the provider's own certificate
        assert call_claude(kept) == 200
        (tmp_path / "config.yaml").write_text(ANTHROPIC_ON)
        proxy.wait_for_output(CLOSED_ONE)
        assert call_claude(kept) is None  # closed: no call goes out on it
        assert call_claude(tunnel(proxy, target, "api.anthropic.com", proxy.ca_cert)) == 403  # connected again: intercepted, checked


def test_an_edit_after_a_script_reload_closes_the_tunnels_opened_before_it(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """mitmproxy makes the script's addons anew when the script changes; the connections it
    decided before go on, and their names were the old addon's: an edit after the reload
    left a tunnel opened before it open, its calls unchecked (a review)."""
    import shutil

    script = tmp_path / "script" / "llm.py"
    script.parent.mkdir()
    shutil.copy(ROOT / "addons" / "llm.py", script)
    with Mitmdump(tmp_path, config=ANTHROPIC_OFF, routes=provider_routes(provider), upstream_ca=pki.ca_path, addon=script) as proxy:
        kept = tunnel(proxy, "api.anthropic.com:443", "api.anthropic.com", pki.ca_path)
        assert call_claude(kept) == 200
        loaded = proxy.output.count("llm-mitm: config ")
        script.write_text(script.read_text() + "\n# changed\n")  # mitmproxy reloads a script that changes
        deadline = time.monotonic() + 20
        while proxy.output.count("llm-mitm: config ") <= loaded and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.output.count("llm-mitm: config ") > loaded, proxy.output[-2000:]  # the new addons have read the config
        time.sleep(1.1)  # an edit the new addons' watch sees as one
        (tmp_path / "config.yaml").write_text(ANTHROPIC_ON)
        proxy.wait_for_output(CLOSED_ONE)
        assert call_claude(kept) is None


def test_an_edit_closes_the_tunnels_open_through_an_upstream_proxy(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """In upstream mode mitmproxy connects to the proxy beyond, not to the host: the tunnel
    is known by the host its client asked for (a review: it was noted by the proxy's address)."""
    from tests.support.corp_proxy import CorpProxy

    corp = CorpProxy({"api.anthropic.com": provider.port})
    with Mitmdump(tmp_path, config=ANTHROPIC_OFF, modes=(f"upstream:http://127.0.0.1:{corp.port}",), upstream_ca=pki.ca_path) as proxy:
        kept = tunnel(proxy, "api.anthropic.com:443", "api.anthropic.com", pki.ca_path)
        assert call_claude(kept) == 200
        (tmp_path / "config.yaml").write_text(ANTHROPIC_ON)
        proxy.wait_for_output(CLOSED_ONE)
        assert call_claude(kept) is None


def test_an_edit_closes_a_tunnel_still_connecting_upstream(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """mitmproxy decided to pass the connection untouched under the old scope; the edit
    landed while it connected upstream (a review: a tunnel noted once connected was read
    against the new scope, taken for intercepted, and kept for its whole life)."""
    from tests.support.slow_connect import __file__ as slow_connect

    with Mitmdump(tmp_path, config=ANTHROPIC_OFF, routes=provider_routes(provider), upstream_ca=pki.ca_path,
                  extra_args=["-s", slow_connect], env={"SLOW_CONNECT": "3"}) as proxy:
        threading.Timer(0.5, lambda: (tmp_path / "config.yaml").write_text(ANTHROPIC_ON)).start()
        try:  # the handshake waits for the slow connection upstream, and the edit closes it meanwhile
            kept: ssl.SSLSocket | None = tunnel(proxy, "api.anthropic.com:443", "api.anthropic.com", pki.ca_path)
        except (ConnectionError, ssl.SSLError):
            kept = None
        proxy.wait_for_output(CLOSED_ONE)
        assert kept is None or call_claude(kept) is None


def test_an_edit_does_not_cut_the_calls_of_connections_it_intercepts(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """Connections mitmproxy intercepts are checked call by call and stay open across an
    edit that takes a host in: a plain-http call to a server of one's own streaming while
    the edit names it as a provider (a review: it was cut), and a kept-alive intercepted one."""
    own = FakeProvider().start()  # plain http
    try:
        with Mitmdump(tmp_path, config=ANTHROPIC_OFF, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
            intercepted = tunnel(proxy, "api.openai.com:443", "api.openai.com", proxy.ca_cert)
            plain = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
            body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            plain.sendall(b"POST http://127.0.0.1:%d/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-fake-delay-ms: 300\r\n"
                          b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (own.port, own.port, len(body), body))
            first = plain.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first
            (tmp_path / "config.yaml").write_text(ANTHROPIC_ON + f"providers:\n  own:\n    api: openai\n    hosts: ['127.0.0.1:{own.port}']\n")
            proxy.wait_for_output("now intercepted")
            streamed = first
            while b"data: [DONE]" not in streamed and (piece := plain.recv(65536)):
                streamed += piece
            assert b"data: [DONE]" in streamed
            intercepted.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nauthorization: Bearer sk-proj-" + b"m" * 40 + b"\r\n\r\n")
            assert intercepted.recv(65536).startswith(b"HTTP/1.1 200")
            assert "connection(s) to them passed untouched" not in proxy.output
    finally:
        own.stop()


def test_with_no_provider_enabled_nothing_is_intercepted(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """mitmproxy reads an empty allow list as every host allowed: with every provider turned
    off, every TLS connection got mitmproxy's certificate (a review). Now each keeps its own."""
    from llm_mitm.config import DEFAULT_PROVIDERS

    config = {"providers": {name: {"enabled": False} for name in DEFAULT_PROVIDERS}}
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        assert call_claude(tunnel(proxy, "api.anthropic.com:443", "api.anthropic.com", pki.ca_path)) == 200  # the provider's own certificate
        proxy.wait_for_output("intercepting nothing (no provider is enabled)")


def test_a_provider_turned_off_and_on_again_does_not_cut_the_calls_it_intercepts(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A connection intercepted before an edit that turned its provider off stays
    intercepted; the edit that turns it on again leaves it open, with its call in flight
    (a review: each edit was read against the one before it, and the stream was cut)."""
    on, off = "policy:\n  allowed_models: ['claude*']\n", "providers:\n  anthropic: {enabled: false}\npolicy:\n  allowed_models: ['claude*']\n"
    with Mitmdump(tmp_path, config={"policy": {"allowed_models": ["claude*"]}}, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        kept = tunnel(proxy, "api.anthropic.com:443", "api.anthropic.com", proxy.ca_cert)  # mitmproxy's certificate: intercepted
        assert call_claude(kept) == 200
        (tmp_path / "config.yaml").write_text(off)
        proxy.wait_for_output("reloaded")
        body = orjson.dumps({"model": "claude-x", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        kept.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nanthropic-version: 2023-06-01\r\nx-fake-delay-ms: 400\r\n"
                     b"x-api-key: sk-ant-api03-" + b"t" * 40 + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        (tmp_path / "config.yaml").write_text(on)  # lands while the call is answered
        streamed = b""
        while b"message_stop" not in streamed and (piece := kept.recv(65536)):
            streamed += piece
        assert b"message_stop" in streamed
        proxy.wait_for_output("api.anthropic.com now intercepted")
        assert "passed untouched before are closed" not in proxy.output


def test_an_edit_closes_the_tunnels_of_a_reverse_proxy_to_a_server_it_names(tmp_path: Path) -> None:
    """A reverse proxy to a server no provider names passes it untouched (the log says to add
    it to a provider's hosts); the edit that does so closes the kept-alive connections
    (a review: they went on unchecked)."""
    own = FakeProvider().start()  # plain http
    body = orjson.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nauthorization: Bearer sk-proj-%s\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (own.port, b"m" * 40, len(body), body))
    try:
        with Mitmdump(tmp_path, config={"policy": {"allowed_models": ["gpt-4o*"]}}, modes=(f"reverse:http://127.0.0.1:{own.port}",)) as proxy:
            kept = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
            kept.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < content_length(answer):
                answer += kept.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")  # out of scope: passes (read whole: a raw tunnel's pieces come as they come)
            (tmp_path / "config.yaml").write_text(f"policy:\n  allowed_models: ['gpt-4o*']\nproviders:\n  own:\n    api: openai\n    hosts: ['127.0.0.1:{own.port}']\n")
            proxy.wait_for_output(f"127.0.0.1:{own.port} now intercepted; 1 connection(s) to them passed untouched before are closed")
            kept.sendall(request)
            try:
                assert kept.recv(65536) == b""
            except ConnectionError:
                pass
            fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
            fresh.sendall(request)
            assert fresh.recv(65536).startswith(b"HTTP/1.1 403")
    finally:
        own.stop()


def test_a_reverse_proxy_to_an_https_server_no_provider_names_passes_its_calls(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """Unchecked and untraced, as the warning says: passed as a raw tunnel, the client's plain
    HTTP reached the TLS server and every call got an empty reply (a setup probe). Once a
    provider names it, the connections kept alive are closed, and the next call is checked."""
    body = orjson.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nauthorization: Bearer sk-proj-%s\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (b"m" * 40, len(body), body))
    config = {"policy": {"allowed_models": ["gpt-4o*"]}}
    with Mitmdump(tmp_path, config=config, modes=(f"reverse:https://127.0.0.1:{provider.port}",), upstream_ca=pki.ca_path) as proxy:
        proxy.wait_for_output(f"reverse proxy to https://127.0.0.1:{provider.port}, which no provider's hosts name")
        kept = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
        kept.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < content_length(answer):
            piece = kept.recv(65536)
            assert piece, f"the connection closed after {answer!r}"
            answer += piece
        assert answer.startswith(b"HTTP/1.1 200") and CANNED_REPLY.encode() in answer
        (tmp_path / "config.yaml").write_text(f"policy:\n  allowed_models: ['gpt-4o*']\nproviders:\n  own:\n    api: openai\n    hosts: ['127.0.0.1:{provider.port}']\n")
        proxy.wait_for_output(f"127.0.0.1:{provider.port} now intercepted; 1 connection(s)")
        fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
        fresh.sendall(request)
        assert fresh.recv(65536).startswith(b"HTTP/1.1 403")
        records = proxy.wait_for_traces(1)
    assert [(r["status_code"], r["policy"]["rule"]) for r in records] == [(403, "model_not_allowed")]  # the first went untraced


def test_an_edit_leaves_a_connection_mitmproxy_has_yet_to_decide(tmp_path: Path) -> None:
    """A connection whose request head has come in part is not decided yet: mitmproxy waits
    for the rest, and decides it under the scope in force then (a review: the edit closed
    it as a tunnel, and its call was cut)."""
    own = FakeProvider().start()  # plain http
    body = orjson.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
    try:
        with Mitmdump(tmp_path, config={"policy": {"allowed_models": ["gpt-4o*"]}}, modes=(f"reverse:http://127.0.0.1:{own.port}",)) as proxy:
            waiting = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
            waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            time.sleep(0.3)
            (tmp_path / "config.yaml").write_text(f"policy:\n  allowed_models: ['gpt-4o*']\nproviders:\n  own:\n    api: openai\n    hosts: ['127.0.0.1:{own.port}']\n")
            proxy.wait_for_output(f"127.0.0.1:{own.port} now intercepted")
            waiting.sendall(b"Host: 127.0.0.1:%d\r\nauthorization: Bearer sk-proj-%s\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (own.port, b"m" * 40, len(body), body))
            assert waiting.recv(65536).startswith(b"HTTP/1.1 403")  # decided under the new scope: checked
            assert "passed untouched before are closed" not in proxy.output
    finally:
        own.stop()
