"""Only LLM hosts are intercepted; other traffic is a raw tunnel; http is upgraded."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

from tests.conftest import provider_routes
from tests.support.answer_locally import __file__ as ANSWER_LOCALLY
from tests.support.fake_provider import CANNED_REPLY, FakeProvider
from tests.support.mitm import Mitmdump
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


def test_an_edit_taking_a_host_into_scope_closes_the_tunnels_open_to_it(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A probe: with anthropic off, a client's kept-alive tunnel to api.anthropic.com passed
    as raw TLS; an edit turned anthropic on with allowed_models [gpt-4o*], and the next call
    on that connection (claude-x) was still answered 200, untraced (mitmproxy decides once a
    connection). The edit now closes such tunnels: the client connects again, intercepted."""
    import http.client
    import ssl
    import time

    body = orjson.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"x-api-key": "sk-ant-api03-" + "t" * 40, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    config = {"providers": {"anthropic": {"enabled": False}}, "policy": {"allowed_models": ["gpt-4o*"]}}
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        def connection(ca: Path) -> http.client.HTTPSConnection:
            tunnel = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=ssl.create_default_context(cafile=str(ca)), timeout=15)
            tunnel.set_tunnel("api.anthropic.com", 443)
            return tunnel

        kept = connection(pki.ca_path)  # passed untouched: the provider's own certificate
        kept.request("POST", "/v1/messages", body, headers)
        assert kept.getresponse().read() and kept.sock is not None
        (tmp_path / "config.yaml").write_text("policy:\n  allowed_models: ['gpt-4o*']\n")
        deadline = time.monotonic() + 10
        while "now intercepted" not in proxy.output and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "api.anthropic.com now intercepted; 1 connection(s) to them passed untouched before are closed" in proxy.output, proxy.output[-2000:]
        kept.sock.settimeout(5)
        try:
            assert kept.sock.recv(1) == b""  # closed: no call goes out on it
        except (ConnectionError, ssl.SSLError):
            pass
        again = connection(proxy.ca_cert)  # the client connects again: intercepted, checked
        again.request("POST", "/v1/messages", body, headers)
        refused = again.getresponse()
        assert refused.status == 403 and b"model_not_allowed" in refused.read()
