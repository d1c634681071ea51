"""No secret a client sent shows up in traces (file or directory) or mitmdump's output."""

from __future__ import annotations

import re
import secrets
import socket
import string
import subprocess
from pathlib import Path

import orjson

from tests.conftest import provider_routes
from tests.support.canned_server import ok
from tests.support.clients import drive
from tests.support.fake_provider import FakeProvider
from tests.support.listener import Listener, read_request
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
        # no key shape: found by the header's name (gateways' own key headers)
        "portkey": rand(32),
        "litellm": rand(24),
        "auth_token": rand(40),
        "anthropic_header": rand(30),
        "functions_key": rand(40),  # a header named for a key (Azure Functions')
        # a secrets probe: a key sent as the organization, a realtime client secret, a URL's password
        "as_organization": "sk-proj-" + rand(40),
        "ephemeral": "ek_" + rand(32),
        "url_password": rand(18),
    }
    gateway_headers = {"X-Portkey-Api-Key": keys["portkey"], "x-litellm-api-key": keys["litellm"], "X-Auth-Token": keys["auth_token"],
                       "x-functions-key": keys["functions_key"], "OpenAI-Organization": keys["as_organization"]}
    config = {"traces": {"directory": "per-exchange"}}
    extra = ["--set", "flow_detail=4"]  # mitmdump prints headers and bodies too
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path, extra_args=extra) as proxy:
        env = proxy.client_env()
        prompt = (f"please remember {keys['in_prompt']} and {keys['jwt']} ({keys['google']}, {keys['azure_annotated']}),"
                  f" GITHUB_TOKEN={keys['named_token']} and the config {{\"password\": \"{keys['named_password']}\"}}"
                  f" with {keys['ephemeral']} for postgres://admin:{keys['url_password']}@db/app")
        for stream in (False, True):
            drive({"client": "openai", "op": "chat", "api_key": keys["openai"], "headers": {"x-fake-echo": "1", **gateway_headers},
                   "params": {"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": prompt}]}}, env)
            drive({"client": "anthropic", "api_key": keys["anthropic"], "headers": {"x-fake-echo": "1", "anthropic-api-key": keys["anthropic_header"]},
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


def test_a_key_cut_across_text_parts_is_traced_hidden(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A key (or a secret of a configured pattern) sent in pieces across a message's text
    parts, which the model reads as one text: each part was redacted by itself, and the
    trace held the whole key in pieces, and so did mitmdump's printout of the bodies. Sent by
    the openai SDK (chat's parts, Responses' input_text) and the anthropic SDK (text blocks)."""
    key, code = "sk-proj-" + rand(60), "ACME-" + rand(24, "0123456789ABCDEF")
    config = {"redaction": {"patterns": ["ACME-[0-9A-F]{24}"]}}

    def pieces(kind: str) -> list[dict[str, str]]:
        text = f"remember {key} and {code} please"
        cut = [0, 12, 30, text.index(code) + 9, len(text)]  # inside the key's prefix, its middle, the code's
        return [{"type": kind, "text": text[a:b]} for a, b in zip(cut, cut[1:])]

    extra = ["--set", "flow_detail=4"]  # mitmdump prints bodies too, a part a line
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path, extra_args=extra) as proxy:
        env = proxy.client_env()
        drive({"client": "openai", "op": "chat", "api_key": "sk-proj-" + rand(40),
               "params": {"model": "gpt-4o", "messages": [{"role": "user", "content": pieces("text")}]}}, env)
        drive({"client": "openai", "op": "responses", "api_key": "sk-proj-" + rand(40),
               "params": {"model": "gpt-4o", "input": [{"role": "user", "content": pieces("input_text")}]}}, env)
        drive({"client": "anthropic", "api_key": "sk-ant-api03-" + rand(90),
               "params": {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": pieces("text")}]}}, env)
        assert len(proxy.wait_for_traces(3)) == 3
    assert any(key[4:20].encode() in r.body for r in provider.requests)  # upstream got it as sent
    traced = proxy.traces_path.read_text()
    assert traced.count("remember") == 3 and traced.count("please") == 3
    assert proxy.output.count("remember") >= 3  # the bodies were printed: the check is not vacuous
    written = traced + proxy.output
    for secret in (secret_part(key), code[5:]):
        for i in range(len(secret) - 8):
            assert secret[i : i + 8] not in written, f"leaked: {secret[i:i+8]}"


def test_upstream_still_gets_the_real_key(proxy: Mitmdump, provider: FakeProvider) -> None:
    key = "sk-proj-" + rand(60)
    drive({"client": "openai", "op": "chat", "api_key": key,
           "params": {"model": "gpt-4o", "messages": [{"role": "user", "content": "k"}]}}, proxy.client_env())
    assert any(r.header("authorization") == f"Bearer {key}" for r in provider.requests)
    assert not any(key in orjson.dumps(t).decode() for t in proxy.traces())


class Answering(Listener):
    """A plain-HTTP server (a local vLLM, say) that answers each path with bytes given as
    they are, after reading the request's body whole."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            head, _ = read_request(conn)
            conn.sendall(self.answers.get(head.split(b" ", 2)[1].decode(), ok(b"{}", status="404 Not Found")))


def test_a_key_spelled_by_logprobs_is_not_printed_token_by_token(tmp_path: Path) -> None:
    """mitmdump prints an answer's logprobs a token a line (flow_detail 3 and up), a few
    characters each: no line held enough of a key to be found, and the key could be read
    down the lines (and from each token's `bytes`). Those tokens are printed without them."""
    key = "sk-proj-" + rand(48)
    pieces = ["Your key: ", *(key[i : i + 4] for i in range(0, len(key), 4))]
    run = [{"token": t, "logprob": -0.25, "bytes": list(t.encode()), "top_logprobs": [{"token": t, "logprob": -0.25, "bytes": list(t.encode())}]}
           for t in pieces]
    answer = orjson.dumps({"id": "c1", "object": "chat.completion", "model": "llama-3",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": "stop",
                                        "logprobs": {"content": run, "refusal": None}}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces)}})
    server = Answering({"/v1/chat/completions": ok(answer, "content-type: application/json")})
    try:
        config = {"providers": {"vllm": {"api": "openai", "hosts": [f"127.0.0.1:{server.port}"]}}}
        with Mitmdump(tmp_path, config=config, extra_args=["--set", "flow_detail=4"]) as proxy:
            body = orjson.dumps({"model": "llama-3", "logprobs": True, "top_logprobs": 1, "messages": [{"role": "user", "content": "my key?"}]})
            subprocess.run(["curl", "-sS", "-o", "/dev/null", "--proxy", proxy.proxy_url, f"http://127.0.0.1:{server.port}/v1/chat/completions",
                            "-H", "content-type: application/json", "--data", body.decode()],
                           capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, check=True)
            proxy.wait_for_traces(1)
    finally:
        server.stop()
    printed = proxy.output
    assert "-0.25" in printed and "Your key: " in printed, printed[-2000:]  # the logprobs were printed, the tokens spelling nothing with them
    for piece in pieces[3:-1]:  # the secret part (not the kind, nor the last four characters a fingerprint shows)
        assert f'"{piece}"' not in printed, f"a token of the key was printed: {piece}"
    assert printed.count('"bytes": [') == 2  # `Your key: `'s, in its entry and its top_logprobs: no byte of the key's tokens


def test_keys_of_no_shape_echoed_named_in_urls_hexdumped_or_sent_as_the_model(tmp_path: Path) -> None:
    """A review's findings D4-D7, end to end: a compat server's key of no known shape that
    upstream echoes back (body, header), whichever header or parameter sent it; the query
    table and a binary body's hexdump in mitmdump's printout; a credential named in the
    URL or a form, percent-encoded or not; a key sent as the model and answered as the
    model (no price for it: the trace writer process logs its name)."""
    keys = {
        "bearer": "vllm-FAKE" + rand(26), "api_key": "FAKE" + rand(28), "x_api_key": "tok-FAKE" + rand(26), "in_query": "qk-FAKE" + rand(26),
        "param_key": "vllm-FAKE" + rand(26), "param_token": "FAKE" + rand(24), "param_sig": "FAKE" + rand(24),
        "named_raw": "ghp_FAKE" + rand(32), "named_encoded": "ghp_FAKE" + rand(32), "named_form": "ghp_FAKE" + rand(32),
        "form_token": "FAKE" + rand(24), "binary": "sk-proj-FAKE" + rand(60), "model": "sk-proj-FAKE" + rand(60),
        "response_model": "sk-proj-FAKE" + rand(60), "model_no_shape": "tenant-FAKE" + rand(24),
    }

    def echo(key: str) -> bytes:
        body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error", "code": "invalid_api_key"}})
        return ok(body, "content-type: application/json", f"x-echo: key={key}", status="401 Unauthorized")

    completion = orjson.dumps({"id": "c1", "object": "chat.completion", "model": f"ft:gpt-4o:acme:{keys['response_model']}",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    no_shape = orjson.dumps({"id": "c2", "object": "chat.completion", "model": f"ft:gpt-4o:{keys['model_no_shape']}",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    listed = ok(b'{"object": "list", "data": []}', "content-type: application/json")
    requests: list[tuple[str, list[str]]] = [  # path, curl arguments
        ("/v1/chat/completions?n=1", ["-H", f"Authorization: Bearer {keys['bearer']}"]),
        ("/v1/chat/completions?n=2", ["-H", f"api-key: {keys['api_key']}"]),
        ("/v1/chat/completions?n=3", ["-H", f"x-api-key: {keys['x_api_key']}"]),
        (f"/v1/chat/completions?n=4&api-key={keys['in_query']}", []),
        (f"/v1/models?key={keys['param_key']}&token={keys['param_token']}&sig={keys['param_sig']}&api-version=1", []),
        (f"/v1/models?q=GITHUB_TOKEN={keys['named_raw']}&r=GITHUB_TOKEN%3D{keys['named_encoded']}", []),
        ("/v1/completions?n=5", ["--data", f"model=m&prompt=GITHUB_TOKEN%3D{keys['named_form']}&token={keys['form_token']}"]),
        ("/v1/files?n=6", ["-H", "content-type: application/octet-stream", "--data-binary", "@" + str(tmp_path / "binary")]),
        ("/v1/chat/completions?n=7", ["-H", "content-type: application/json", "--data",
                                      orjson.dumps({"model": keys["model"], "messages": [{"role": "user", "content": "hi"}]}).decode()]),
        # a key of no known shape, sent as the Bearer and in the model's name: the log line naming the unpriced model hid it as the trace does
        ("/v1/chat/completions?n=8", ["-H", f"Authorization: Bearer {keys['model_no_shape']}", "-H", "content-type: application/json", "--data",
                                      orjson.dumps({"model": f"ft:gpt-4o:{keys['model_no_shape']}", "messages": []}).decode()]),
    ]
    (tmp_path / "binary").write_bytes(b"\x00\x01\x02\xfe\xff" * 30 + keys["binary"].encode() + b"\x00\xff" * 70)
    answers = {path: echo(next(v for v in keys.values() if v in " ".join(args) + path)) for path, args in requests[:4]}
    answers.update({requests[4][0]: listed, requests[5][0]: listed, requests[6][0]: ok(b"{}", "content-type: application/json"),
                    requests[7][0]: ok(b"{}", "content-type: application/json"),
                    requests[8][0]: ok(completion, "content-type: application/json"), requests[9][0]: ok(no_shape, "content-type: application/json")})
    server = Answering(answers)

    def ask(proxy: Mitmdump, path: str, args: list[str]) -> None:
        subprocess.run(["curl", "-sS", "-o", "/dev/null", "--proxy", proxy.proxy_url, f"http://127.0.0.1:{server.port}{path}", *args],
                       capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, check=True)

    try:
        config = {"providers": {"vllm": {"api": "openai", "hosts": [f"127.0.0.1:{server.port}"]}}, "traces": {"directory": "per-exchange"}}
        with Mitmdump(tmp_path, config=config, extra_args=["--set", "flow_detail=4"]) as proxy:
            for path, args in requests:
                ask(proxy, path, args)
            records = proxy.wait_for_traces(len(requests))
            assert len(records) == len(requests)
        # metered in the proxy (a rate limit on tokens reads the answer there), not in the writer process
        metered_here = {"providers": config["providers"], "policy": {"rate_limits": [{"tokens_per_minute": 100000}]}}
        with Mitmdump(tmp_path / "here", config=metered_here) as here:
            ask(here, *requests[9])
            assert here.wait_for_traces(1)
            printed = here.wait_for_output("no price for model")
            assert "no price for model 'ft:gpt-4o:…" in printed and "no price for model 'ft:gpt-4o:tenant-FAKE" not in printed
    finally:
        server.stop()
    files = list((tmp_path / "per-exchange").rglob("*.json"))
    written = proxy.traces_path.read_text() + "".join(f.read_text() for f in files) + proxy.output + here.output
    assert len(files) == len(requests)
    for name, key in keys.items():
        part = secret_part(key)
        for i in range(len(part) - 8):
            assert part[i : i + 8] not in written, f"{name} key leaked: {part[i:i+8]}"
    # What was looked at was there: the echoes, the query table, the hexdump, the writer's log line.
    assert sum(r["status_code"] == 401 and "Incorrect API key provided: …" in (r["error"] or "") for r in records) == 4
    assert re.search(r"^ +key: +vllm-…", proxy.output, re.MULTILINE) is None and re.search(r"^ +key: +…", proxy.output, re.MULTILINE)
    assert "x-echo: key=…" in proxy.output and "lines of hexdump left out by llm-mitm" in proxy.output
    assert "no price for model 'ft:gpt-4o:acme:sk-proj-…" in proxy.output
    assert any(r["model"] and r["model"].startswith("sk-proj-…") for r in records)


def test_a_refused_realtime_events_log_line_hides_a_key_named_as_its_model(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """The line logged for a refused realtime event names the model, as the trace does:
    a key of no known shape in the model's name was printed whole (a secrets probe)."""
    key = "tenantFAKE" + rand(24)
    events = [{"type": "session.update", "event_id": "e1", "session": {"type": "realtime", "model": f"acme:{key}"}}]
    with Mitmdump(tmp_path, config={"policy": {"allowed_models": ["gpt-4o*"]}}, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        result = drive({"client": "openai", "op": "realtime", "api_key": key, "model": "gpt-4o-realtime-preview", "events": events}, proxy.client_env())
        printed = proxy.wait_for_output("blocked a session.update event (model_not_allowed)")
    assert [reply["error"]["code"] for reply in result["replies"]] == ["model_not_allowed"], result
    assert "model 'acme:…" in printed
    part = secret_part(key)
    assert not any(part[i : i + 8] in proxy.output for i in range(len(part) - 8))


def test_a_key_cut_short_in_mitmdumps_url_line_leaves_nothing(proxy: Mitmdump) -> None:
    """At the default flow_detail mitmdump cuts a long URL to the terminal's width (55
    characters off a terminal), maybe inside a key, before the redactor sees the line: a
    key cut short has no shape left, so the cut word goes (a secrets probe: 21 of 32 hex
    digits stayed)."""
    key = rand(32, "0123456789abcdef")
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--proxy", proxy.proxy_url, f"http://api.openai.com/v1/models?s={key}"],
                   capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, check=True)
    printed = proxy.wait_for_output("/v1/models?s=")
    line = next(line for line in printed.splitlines() if "/v1/models?s=" in line)
    assert key[:8] not in printed and "?s=…" in line, line
