"""Streams reach the client as the server sends them, and are rebuilt for the trace."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import requests

from tests.support.clients import drive
from tests.support.fake_provider import CANNED_REPLY, FakeProvider
from tests.support.listener import Listener, read_request
from tests.support.mitm import Mitmdump
from tests.test_e2e_clients import ANTHROPIC_KEY, OPENAI_KEY, chat, marker, trace_with

DELAY_MS = 200


def test_chunks_arrive_spread_in_time_like_the_server_sent_them(proxy: Mitmdump) -> None:
    m = marker()
    action = {
        "client": "openai", "op": "chat", "api_key": OPENAI_KEY,
        "params": chat(m, stream=True), "headers": {"x-fake-delay-ms": str(DELAY_MS)},
    }
    result = drive(action, proxy.client_env())
    arrivals = result["arrivals"]
    assert result["text"] == CANNED_REPLY
    assert len(arrivals) == 8  # role, six pieces, finish
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # Buffered, every chunk would arrive at once at the end; here each waits for the server.
    assert all(gap > DELAY_MS / 1000 * 0.6 for gap in gaps), gaps
    assert arrivals[-1] - arrivals[0] > 7 * DELAY_MS / 1000 * 0.8
    t = trace_with(proxy, m)
    assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY
    assert t["duration_ms"] - t["ttfb_ms"] > 7 * DELAY_MS * 0.8


def rebuilt_text(api: str, body: dict) -> str:
    if api == "anthropic":
        return body["content"][0]["text"]
    if api == "responses":
        return body["output"][0]["content"][0]["text"]
    return body["choices"][0]["message"]["content"]


STREAM_REQUESTS = {
    "openai": ("https://api.openai.com/v1/chat/completions", lambda m: chat(m, stream=True, stream_options={"include_usage": True})),
    "responses": ("https://api.openai.com/v1/responses", lambda m: {"model": "gpt-4o", "input": m, "stream": True}),
    "anthropic": ("https://api.anthropic.com/v1/messages", lambda m: {"model": "claude-x", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": m}]}),
}


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
@pytest.mark.parametrize("api", list(STREAM_REQUESTS))
def test_compressed_streams_pass_byte_for_byte_and_are_rebuilt(proxy: Mitmdump, provider: FakeProvider, encoding: str, api: str) -> None:
    m = marker()
    url, body = STREAM_REQUESTS[api]
    out = subprocess.run(
        [
            "curl", "-sS", "-N", "--proxy", proxy.proxy_url, "--cacert", str(proxy.ca_cert), url,
            "-H", f"authorization: Bearer {OPENAI_KEY}", "-H", "content-type: application/json",
            "-H", f"x-fake-encoding: {encoding}", "-H", "x-fake-delay-ms: 5", "-d", orjson.dumps(body(m)),
        ],
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    sent = next(r.sent for r in provider.requests if m.encode() in r.body)
    assert out.stdout == bytes(sent)  # untouched, compression included
    t = trace_with(proxy, m)
    assert rebuilt_text(api, t["response"]["body"]) == CANNED_REPLY
    assert t["usage"]["output_tokens"] in (6, 7)
    assert t["error"] is None
    assert t["response"]["headers"]["content-encoding"] == encoding


@pytest.mark.parametrize("api", list(STREAM_REQUESTS))
def test_sdks_stream_gzip(proxy: Mitmdump, api: str) -> None:
    m = marker()
    headers = {"x-fake-encoding": "gzip"}
    if api == "anthropic":
        action = {"client": "anthropic", "api_key": ANTHROPIC_KEY, "params": STREAM_REQUESTS[api][1](m)}
    else:
        action = {"client": "openai", "op": "chat" if api == "openai" else "responses", "api_key": OPENAI_KEY, "params": STREAM_REQUESTS[api][1](m)}
    result = drive({**action, "headers": headers}, proxy.client_env())
    assert result.get("text") == CANNED_REPLY, result
    assert rebuilt_text(api, trace_with(proxy, m)["response"]["body"]) == CANNED_REPLY


def test_stream_cut_by_upstream_keeps_partial_output_and_error(proxy: Mitmdump) -> None:
    m = marker()
    action = {
        "client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m, stream=True),
        "headers": {"x-fake-fail": "reset-mid-stream"},
    }
    result = drive(action, proxy.client_env())
    assert "error" in result  # the SDK sees the stream break
    t = trace_with(proxy, m)
    assert t["error"]
    assert t["response"]["events"] == 2
    assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY[:5]
    # the proxy goes on serving
    m2 = marker()
    assert drive({**action, "params": chat(m2), "headers": {}}, proxy.client_env())["text"] == CANNED_REPLY


def test_shutdown_flushes_traces(tmp_path, provider, pki) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import provider_routes

    proxy = Mitmdump(tmp_path, routes=provider_routes(provider), upstream_ca=pki.ca_path).start()
    m = marker()
    drive({"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m)}, proxy.client_env())
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 10
    assert any(m in orjson.dumps(t).decode() for t in proxy.traces())


def test_stream_stalled_by_upstream_is_traced_when_the_client_gives_up(proxy: Mitmdump) -> None:
    import requests

    m = marker()
    with pytest.raises(requests.exceptions.RequestException):
        with requests.post(
            "https://api.openai.com/v1/chat/completions", json=chat(m, stream=True, stream_options={"include_usage": True}),
            headers={"Authorization": f"Bearer {OPENAI_KEY}", "x-fake-fail": "stall-mid-stream"},
            proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=2, stream=True,
        ) as response:
            received = b""
            for chunk in response.iter_content(None):
                received += chunk  # what upstream sent so far arrives...
    assert received.count(b"data: ") == 2  # ...and nothing more
    t = trace_with(proxy, m)
    assert t["error"]
    assert t["response"]["events"] == 2
    assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY[:5]


@pytest.mark.parametrize("split", [0, 7])
def test_a_hidden_usage_chunk_leaves_an_http1_stream_and_its_connection_whole(proxy: Mitmdump, split: int) -> None:
    """The proxy asks for usage and hides its chunk; where a chunk leaves nothing to pass on
    (the hidden one, or a piece of an event), the client must get no chunk at all: an empty
    one ends a chunked HTTP/1.1 body, cutting the stream and leaving the rest on a kept-alive
    connection for the next request to trip over."""
    import requests

    session = requests.Session()
    session.trust_env = False
    session.proxies = {"https": proxy.proxy_url}
    session.verify = str(proxy.ca_cert)
    headers = {"authorization": f"Bearer {OPENAI_KEY}", "x-fake-split": str(split)}
    for _ in range(2):  # the second call goes over the same kept-alive connection
        m = marker()
        with session.post("https://api.openai.com/v1/chat/completions", json=chat(m, stream=True), headers=headers, stream=True, timeout=10) as response:
            assert response.raw.version == 11
            events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        payloads = [orjson.loads(line[6:]) for line in events[:-1]]
        assert "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads) == CANNED_REPLY
        assert all("usage" not in p for p in payloads)  # the client did not ask for it, nor for the "usage": null asking adds
        assert trace_with(proxy, m)["usage"]["output_tokens"]
    answer = session.post("https://api.openai.com/v1/chat/completions", json=chat(marker()), headers=headers, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"]


def test_a_stream_compressed_though_asked_not_to_keeps_its_usage_chunk_and_says_so(proxy: Mitmdump) -> None:
    """The usage chunk can only be left out of a stream the proxy can read as it passes;
    a provider that compresses anyway gives the client that chunk, and the log says why."""
    import requests

    m = marker()
    headers = {"authorization": f"Bearer {OPENAI_KEY}", "x-fake-encoding": "gzip"}
    with requests.post("https://api.openai.com/v1/chat/completions", json=chat(m, stream=True), headers=headers, stream=True, timeout=10,
                       proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert)) as response:
        events = [line for line in response.iter_lines() if line.startswith(b"data: {")]
    assert any(orjson.loads(line[6:]).get("usage") for line in events)
    assert trace_with(proxy, m)["usage"]["output_tokens"]
    proxy.wait_for_output("the provider compressed the stream though asked not to")


@pytest.mark.parametrize("stream_type", ["none", "text/plain; charset=utf-8"])
def test_a_stream_a_server_does_not_call_one_still_streams(proxy: Mitmdump, stream_type: str) -> None:
    """An OpenAI-compatible server (or a proxy before it) that sends a requested stream with
    no content type or as plain text: its events still pass one by one, the usage chunk the
    proxy asked for is still hidden, and the trace has the reported usage."""
    import requests

    m = marker()
    headers = {"authorization": f"Bearer {OPENAI_KEY}", "x-fake-delay-ms": str(DELAY_MS), "x-fake-stream-type": stream_type}
    arrivals, received = [], b""
    with requests.post("https://api.openai.com/v1/chat/completions", json=chat(m, stream=True), headers=headers, stream=True, timeout=10,
                       proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert)) as response:
        for chunk in response.iter_content(None):
            arrivals.append(time.monotonic())
            received += chunk
    assert arrivals[-1] - arrivals[0] > 5 * DELAY_MS / 1000 * 0.8  # not all at once at the end
    events = [line for line in received.split(b"\n") if line.startswith(b"data: {")]
    assert events and all(b'"usage"' not in line for line in events)
    t = trace_with(proxy, m)
    assert t["usage"]["output_tokens"] == 7 and t["usage"]["estimated"] is False
    assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY


@pytest.mark.parametrize("stream_type", ["text/event-stream", "none"])
def test_a_stream_sent_with_a_length_reaches_the_client_whole_without_its_usage_chunk(proxy: Mitmdump, stream_type: str) -> None:
    """Hiding the usage chunk makes the answer shorter than upstream's Content-Length: the
    client must get a body framed another way, not wait for bytes that never come."""
    import requests

    session = requests.Session()
    session.trust_env = False
    headers = {"authorization": f"Bearer {OPENAI_KEY}", "x-fake-sized": "1", "x-fake-stream-type": stream_type}
    for _ in range(2):  # the second call over the same kept-alive connection
        m = marker()
        response = session.post("https://api.openai.com/v1/chat/completions", json=chat(m, stream=True), headers=headers, timeout=10,
                                proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert))
        events = [line for line in response.content.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]" and all(b'"usage"' not in line for line in events)
        assert trace_with(proxy, m)["usage"]["output_tokens"] == 7


@pytest.mark.parametrize("stream_type", ["none", "text/plain"])
def test_a_whole_answer_to_a_stream_request_keeps_its_body_and_usage(proxy: Mitmdump, stream_type: str) -> None:
    """A server that ignores `stream: true` and answers whole, naming no type or plain text,
    is read as the stream it would be, finds no events, and is read as the body it is."""
    import requests

    m = marker()
    headers = {"authorization": f"Bearer {OPENAI_KEY}", "x-fake-ignore-stream": "1", "x-fake-json-type": stream_type}
    response = requests.post("https://api.openai.com/v1/chat/completions", json=chat(m, stream=True), headers=headers, timeout=10,
                             proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert))
    assert response.json()["choices"][0]["message"]["content"] == CANNED_REPLY
    t = trace_with(proxy, m)
    assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY
    assert t["usage"]["output_tokens"] == 7 and t["usage"]["estimated"] is False


class OllamaStream(Listener):
    """Ollama's native stream: a JSON object a line (`application/x-ndjson`), DELAY_MS apart."""

    def handle(self, conn: socket.socket) -> None:
        with conn:
            read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
            for n in range(4):
                line = orjson.dumps({"model": "llama3", "message": {"role": "assistant", "content": f"w{n} "}, "done": n == 3}) + b"\n"
                conn.sendall(b"%x\r\n%s\r\n" % (len(line), line))
                time.sleep(DELAY_MS / 1000)
            conn.sendall(b"0\r\n\r\n")


@pytest.mark.parametrize("policy", [{}, {"rate_limits": [{"tokens_per_minute": 100000}]}])  # the stream held for the writer, or read here
def test_ollamas_native_stream_arrives_as_the_server_sends_it(tmp_path: Path, policy: dict) -> None:
    """A JSON object a line, as `/api/chat` streams by default: it was held back and came
    all at once at the end (a providers probe)."""
    server = OllamaStream()
    config = {"providers": {"ollama": {"api": "openai", "hosts": [f"127.0.0.1:{server.port}"]}}, "policy": policy}
    session = requests.Session()
    session.trust_env = False
    try:
        with Mitmdump(tmp_path, config=config) as proxy:
            started, arrivals = time.monotonic(), []
            with session.post(f"http://127.0.0.1:{server.port}/api/chat", json={"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
                              proxies={"http": proxy.proxy_url}, stream=True, timeout=30) as answer:
                for chunk in answer.iter_content(chunk_size=None):
                    arrivals.append((time.monotonic() - started, chunk))
            [record] = proxy.wait_for_traces(1)
    finally:
        server.stop()
    assert answer.status_code == 200 and b"".join(chunk for _, chunk in arrivals).count(b"\n") == 4
    assert len(arrivals) >= 3 and arrivals[-1][0] - arrivals[0][0] > 2 * DELAY_MS / 1000, [(round(t, 2), len(c)) for t, c in arrivals]
    assert record["status_code"] == 200 and record["error"] is None and record["url"].endswith("/api/chat")
