"""The real SDKs, requests and curl through a real mitmdump, traced the same way."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import orjson
import pytest

from llm_mitm.trace import TraceRecord
from tests.support.clients import drive
from tests.support.fake_provider import ANTHROPIC_MODEL, CANNED_REPLY, RESPONSE_MODEL, FakeProvider
from tests.support.mitm import Mitmdump

OPENAI_KEY = "sk-proj-" + "Ab3" * 15
AZURE_KEY = "0123456789abcdef" * 2
ANTHROPIC_KEY = "sk-ant-api03-" + "Zy9" * 30


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


def trace_with(proxy: Mitmdump, text: str, timeout: float = 10.0) -> dict[str, Any]:
    """The one trace whose request carries `text` (tests share a proxy)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [t for t in proxy.traces() if text in orjson.dumps(t["request"]).decode()]
        if found:
            assert len(found) == 1, found
            TraceRecord.model_validate(found[0])
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no trace with {text}; output:\n{proxy.output[-3000:]}")


def openai(proxy: Mitmdump, op: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    action = {"client": "openai", "op": op, "api_key": OPENAI_KEY, "params": params, **extra}
    return drive(action, proxy.client_env())


def chat(text: str, **params: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **params}


def test_chat_completion(proxy: Mitmdump) -> None:
    m = marker()
    result = openai(proxy, "chat", chat(m))
    assert result["text"] == CANNED_REPLY and result["model"] == RESPONSE_MODEL
    t = trace_with(proxy, m)
    assert (t["provider"], t["api"], t["operation"], t["method"]) == ("openai", "openai", "chat.completions", "POST")
    assert t["url"] == "https://api.openai.com/v1/chat/completions"
    assert (t["model"], t["response_model"], t["stream"], t["status_code"]) == ("gpt-4o", RESPONSE_MODEL, False, 200)
    assert t["usage"] == {
        "input_tokens": 12, "output_tokens": 7, "total_tokens": 19, "cached_input_tokens": 2,
        "cache_creation_input_tokens": None, "cache_creation_1h_input_tokens": None, "reasoning_tokens": 1, "audio_input_tokens": None, "audio_output_tokens": None, "estimated": False,
    }
    assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY
    assert t["api_key"].startswith("sk-proj-…")
    assert t["error"] is None and t["client"] == "127.0.0.1"
    assert t["duration_ms"] >= t["ttfb_ms"] > 0
    assert t["timestamp"].endswith("Z")


def test_chat_stream_with_usage_and_tool_calls(proxy: Mitmdump) -> None:
    m = marker()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    result = openai(proxy, "chat", chat(m, stream=True, tools=tools, stream_options={"include_usage": True}))
    assert result["tool_args"] == '{"city": "Paris", "unit": "celsius"}'
    t = trace_with(proxy, m)
    assert t["stream"] is True
    message = t["response"]["body"]["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    assert t["response"]["body"]["choices"][0]["finish_reason"] == "tool_calls"
    assert t["usage"]["total_tokens"] == 19
    assert t["response"]["events"] == result_events(result)
    assert t["response_model"] == RESPONSE_MODEL


def result_events(result: dict[str, Any]) -> int:
    return len(result["arrivals"]) + 1  # the SDK does not yield [DONE]


def test_responses_stream(proxy: Mitmdump) -> None:
    m = marker()
    result = openai(proxy, "responses", {"model": "gpt-4o", "input": m, "stream": True})
    assert result["text"] == CANNED_REPLY
    t = trace_with(proxy, m)
    assert t["operation"] == "responses" and t["stream"] is True
    assert t["response"]["body"]["output"][0]["content"][0]["text"] == CANNED_REPLY
    assert t["usage"]["reasoning_tokens"] == 1 and t["usage"]["cached_input_tokens"] == 2


def test_responses_plain(proxy: Mitmdump) -> None:
    m = marker()
    assert openai(proxy, "responses", {"model": "gpt-4o", "input": m})["text"] == CANNED_REPLY
    assert trace_with(proxy, m)["usage"]["output_tokens"] == 7


def test_embeddings_and_models(proxy: Mitmdump) -> None:
    m = marker()
    assert openai(proxy, "embeddings", {"model": "text-embedding-3-small", "input": [m, "b"]})["count"] == 2
    t = trace_with(proxy, m)
    assert t["operation"] == "embeddings" and t["usage"]["input_tokens"] == 5
    before = len(proxy.traces())
    assert openai(proxy, "models", {})["ids"] == ["gpt-4o"]
    records = proxy.wait_for_traces(before + 1)
    assert any(r["operation"] == "models" and r["method"] == "GET" for r in records)


def test_azure_deployment_path(proxy: Mitmdump) -> None:
    m = marker()
    action = {
        "client": "openai", "op": "chat", "api_key": AZURE_KEY, "azure": "https://myres.openai.azure.com",
        "params": {"model": "prod-4o", "messages": [{"role": "user", "content": m}]},
    }
    assert drive(action, proxy.client_env())["text"] == CANNED_REPLY
    t = trace_with(proxy, m)
    assert (t["provider"], t["operation"], t["deployment"], t["model"]) == ("azure", "chat.completions", "prod-4o", "prod-4o")
    assert "api-version=2024-10-21" in t["url"]
    assert t["response_model"] == RESPONSE_MODEL
    assert t["request"]["headers"]["api-key"].startswith("…" + AZURE_KEY[-4:] + "#")


def test_azure_v1_path(proxy: Mitmdump) -> None:
    m = marker()
    result = openai(proxy, "chat", chat(m, stream=True), base_url="https://myres.openai.azure.com/openai/v1/")
    assert result["text"] == CANNED_REPLY
    t = trace_with(proxy, m)
    assert (t["provider"], t["operation"], t["deployment"], t["model"]) == ("azure", "chat.completions", None, "gpt-4o")


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages(proxy: Mitmdump, stream: bool) -> None:
    m = marker()
    params = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": m}], "stream": stream}
    result = drive({"client": "anthropic", "api_key": ANTHROPIC_KEY, "params": params}, proxy.client_env())
    assert result["text"] == CANNED_REPLY
    t = trace_with(proxy, m)
    assert (t["provider"], t["operation"], t["stream"]) == ("anthropic", "messages", stream)
    assert t["response_model"] == ANTHROPIC_MODEL
    assert t["usage"]["input_tokens"] == 12 and t["usage"]["cached_input_tokens"] == 3
    assert t["usage"]["output_tokens"] == 6
    assert t["response"]["body"]["content"][0]["text"] == CANNED_REPLY
    assert t["api_key"].startswith("sk-ant-…")
    headers = t["request"]["headers"]
    sent = headers.get("x-api-key") or headers["authorization"].removeprefix("Bearer ")
    assert sent == t["api_key"]


def test_requests_client(proxy: Mitmdump) -> None:
    m = marker()
    action = {
        "client": "requests", "method": "POST", "url": "https://api.openai.com/v1/chat/completions",
        "headers": {"Authorization": f"Bearer {OPENAI_KEY}"}, "json": chat(m),
    }
    result = drive(action, proxy.client_env())
    assert result["status"] == 200 and CANNED_REPLY in result["body"]
    assert trace_with(proxy, m)["usage"]["total_tokens"] == 19


def test_curl_stream(proxy: Mitmdump) -> None:
    m = marker()
    out = subprocess.run(
        [
            "curl", "-sS", "-N", "--proxy", proxy.proxy_url, "--cacert", str(proxy.ca_cert),
            "https://api.anthropic.com/v1/messages", "-H", f"x-api-key: {ANTHROPIC_KEY}",
            "-H", "anthropic-version: 2023-06-01", "-H", "content-type: application/json",
            "-d", orjson.dumps({"model": "claude-x", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": m}]}),
        ],
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert b"event: message_stop" in out.stdout
    t = trace_with(proxy, m)
    assert t["response"]["body"]["content"][0]["text"] == CANNED_REPLY
    assert t["response"]["events"] == out.stdout.count(b"data: ")


def test_an_http2_body_without_a_length_reaches_an_http1_provider_whole(proxy: Mitmdump, provider: FakeProvider) -> None:
    """HTTP/2 ends a body by its frames; the provider here speaks HTTP/1.1 and needs a length."""
    m = marker()
    out = subprocess.run(
        [
            "curl", "-sS", "--http2", "--proxy", proxy.proxy_url, "--cacert", str(proxy.ca_cert), "-w", "\n%{http_version}",
            "https://api.openai.com/v1/chat/completions", "-H", f"Authorization: Bearer {OPENAI_KEY}",
            "-H", "content-type: application/json", "-H", "transfer-encoding: chunked", "--data-binary", orjson.dumps(chat(m)),
        ],
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0 and out.stdout.endswith(b"\n2"), out
    assert orjson.loads(out.stdout.rpartition(b"\n")[0])["choices"][0]["message"]["content"] == CANNED_REPLY
    received = [r for r in provider.requests if m.encode() in r.body]
    assert len(received) == 1 and orjson.loads(received[0].body) == chat(m)


def test_upstream_error_is_traced(proxy: Mitmdump) -> None:
    m = marker()
    result = openai(proxy, "chat", chat(m), headers={"x-fake-status": "500"})
    assert result["error"] == "InternalServerError"
    t = trace_with(proxy, m)
    assert t["status_code"] == 500 and t["error"] == "server_error: fake error 500"


def test_upstream_received_exactly_what_the_client_sent(proxy: Mitmdump, provider: FakeProvider) -> None:
    m = marker()
    openai(proxy, "chat", chat(m), headers={"OpenAI-Organization": "org-keep"})
    received = next(r for r in provider.requests if m.encode() in r.body)
    assert received.header("authorization") == f"Bearer {OPENAI_KEY}"
    assert received.header("openai-organization") == "org-keep"
    assert received.json == chat(m)
