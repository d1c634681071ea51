"""No secret a client sent shows up in traces (file or directory) or mitmdump's output."""

from __future__ import annotations

import re
import secrets
import string
import subprocess
from pathlib import Path

import orjson

from tests.conftest import provider_routes
from tests.support.clients import drive
from tests.support.fake_provider import FakeProvider
from tests.support.mitm import Mitmdump
from tests.support.pki import ServerCert

ALNUM = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def secret_part(key: str) -> str:
    """The part of a key that must never be written (kind prefix and last 4 may be)."""
    prefix = re.match(r"sk-(?:ant-api\d\d-|proj-|svcacct-)?", key)
    return key[prefix.end() if prefix else 0 : -4]


def test_no_key_leaks_anywhere(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    keys = {
        "openai": "sk-proj-" + rand(80),
        "service": "sk-svcacct-" + rand(60),
        "azure": rand(32, "0123456789abcdef"),
        "anthropic": "sk-ant-api03-" + rand(90),
        "in_prompt": "sk-" + rand(48),
        "in_query": rand(32, "0123456789abcdef"),
        "cookie": rand(24),
        "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ" + rand(20) + "." + rand(43),
        "google": "AIza" + rand(35),
        "azure_annotated": rand(52) + "JQQJ99" + rand(1) + "A" + rand(16) + "x" + rand(7),
        # no key shape: found by the name given to them in the prompt
        "named_token": "ghp_" + rand(36),
        "named_password": rand(14),
    }
    config = {"traces": {"directory": "per-exchange"}}
    extra = ["--set", "flow_detail=4"]  # mitmdump prints headers and bodies too
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path, extra_args=extra) as proxy:
        env = proxy.client_env()
        prompt = (f"please remember {keys['in_prompt']} and {keys['jwt']} ({keys['google']}, {keys['azure_annotated']}),"
                  f" GITHUB_TOKEN={keys['named_token']} and the config {{\"password\": \"{keys['named_password']}\"}}")
        for stream in (False, True):
            drive({"client": "openai", "op": "chat", "api_key": keys["openai"], "headers": {"x-fake-echo": "1"},
                   "params": {"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": prompt}]}}, env)
            drive({"client": "anthropic", "api_key": keys["anthropic"], "headers": {"x-fake-echo": "1"},
                   "params": {"model": "claude-x", "max_tokens": 5, "stream": stream, "messages": [{"role": "user", "content": prompt}]}}, env)
        # An upstream error that quotes the input back (the key in the prompt included).
        drive({"client": "openai", "op": "chat", "api_key": keys["openai"], "headers": {"x-fake-echo": "1", "x-fake-status": "400"},
               "params": {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}}, env)
        drive({"client": "openai", "op": "chat", "api_key": keys["azure"], "azure": "https://r.openai.azure.com",
               "params": {"model": "dep", "messages": [{"role": "user", "content": "hi"}]}}, env)
        drive({"client": "openai", "op": "responses", "api_key": keys["service"], "headers": {"x-fake-echo": "1"},
               "params": {"model": "gpt-4o", "input": prompt, "stream": True}}, env)
        drive({"client": "requests", "method": "POST",
               "url": f"https://r.openai.azure.com/openai/deployments/d/chat/completions?api-version=1&api-key={keys['in_query']}",
               "headers": {"Cookie": f"session={keys['cookie']}"}, "json": {"messages": []}}, env)
        subprocess.run(
            ["curl", "-sS", "--proxy", proxy.proxy_url, "http://api.openai.com/v1/models",
             "-H", f"Authorization: Bearer {keys['openai']}"],
            capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, check=True,
        )
        records = proxy.wait_for_traces(9)
        assert len(records) == 9
        assert any(r["status_code"] == 400 and "fake error 400: please remember" in (r["error"] or "") for r in records)
    # Every place we write to, after shutdown flushed everything.
    written = proxy.traces_path.read_text() + proxy.output
    files = list((tmp_path / "per-exchange").rglob("*.json"))
    assert len(files) == 9
    written += "".join(f.read_text() for f in files)
    # The prompt did go through (and was echoed back), so the check is not vacuous.
    assert "please remember" in written and written.count("#") > 20
    for name, key in keys.items():
        part = secret_part(key)
        for i in range(len(part) - 8):
            assert part[i : i + 8] not in written, f"{name} key leaked: {part[i:i+8]}"
    # mitmdump did print flow details (so its output was really checked).
    assert "authorization" in proxy.output.lower()
    assert "deprecated" not in proxy.output  # mitmproxy warns of a deprecated hook a script names
    assert "api-version=1&api-key=" in proxy.output


def test_upstream_still_gets_the_real_key(proxy: Mitmdump, provider: FakeProvider) -> None:
    key = "sk-proj-" + rand(60)
    drive({"client": "openai", "op": "chat", "api_key": key,
           "params": {"model": "gpt-4o", "messages": [{"role": "user", "content": "k"}]}}, proxy.client_env())
    assert any(r.header("authorization") == f"Bearer {key}" for r in provider.requests)
    assert not any(key in orjson.dumps(t).decode() for t in proxy.traces())
