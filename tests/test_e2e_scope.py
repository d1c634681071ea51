"""Only LLM hosts are intercepted; other traffic is a raw tunnel; http is upgraded."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

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
