"""Forward, reverse and upstream modes, and an OpenAI-compatible server of your own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.clients import drive
from tests.support.corp_proxy import CorpProxy
from tests.support.fake_provider import CANNED_REPLY, FakeProvider
from tests.support.mitm import Mitmdump
from tests.support.pki import ServerCert
from tests.test_e2e_clients import OPENAI_KEY, chat, marker, trace_with


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}


def test_reverse_mode(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    routes = {"api.openai.com": provider.port}
    with Mitmdump(tmp_path, modes=["reverse:https://api.openai.com"], routes=routes, upstream_ca=pki.ca_path) as proxy:
        m = marker()
        action = {"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m, stream=True),
                  "base_url": f"http://127.0.0.1:{proxy.port}/v1"}
        assert drive(action, plain_env())["text"] == CANNED_REPLY
        t = trace_with(proxy, m)
        assert (t["provider"], t["operation"], t["stream"]) == ("openai", "chat.completions", True)
        assert t["url"] == "https://api.openai.com/v1/chat/completions"
        assert t["response"]["body"]["choices"][0]["message"]["content"] == CANNED_REPLY


def test_upstream_mode_behind_a_corporate_proxy(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    corp = CorpProxy({"api.openai.com": provider.port, "api.anthropic.com": provider.port})
    try:
        with Mitmdump(tmp_path, modes=[f"upstream:http://127.0.0.1:{corp.port}"], upstream_ca=pki.ca_path) as proxy:
            m = marker()
            action = {"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m)}
            assert drive(action, proxy.client_env())["text"] == CANNED_REPLY
            t = trace_with(proxy, m)
            assert (t["provider"], t["url"], t["status_code"]) == ("openai", "https://api.openai.com/v1/chat/completions", 200)
            assert t["usage"]["total_tokens"] == 19
            assert "api.openai.com:443" in corp.connects
    finally:
        corp.stop()


def test_a_batch_input_file_is_read_the_way_mitmproxy_goes_upstream(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """Behind a corporate proxy (upstream mode, no route of its own to the API), the proxy
    reads a batch's input file through that proxy, as it sends the calls."""
    corp = CorpProxy({"api.openai.com": provider.port})
    file_id = f"file-{marker()}"
    provider.files[file_id] = b'{"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4"}}\n'
    try:
        config = {"policy": {"allowed_models": ["gpt-4o*"]}}
        with Mitmdump(tmp_path, config=config, modes=[f"upstream:http://127.0.0.1:{corp.port}"], upstream_ca=pki.ca_path) as proxy:
            action = {"client": "openai", "op": "batch_create", "api_key": OPENAI_KEY, "params": {}, "file_id": file_id}
            result = drive(action, proxy.client_env())
            assert result["error"] == "PermissionDeniedError" and "input file" in result["message"] and "'gpt-4'" in result["message"]
            assert any(r.path == f"/v1/files/{file_id}/content" for r in provider.requests)
            assert "api.openai.com:443" in corp.connects
    finally:
        corp.stop()


def test_openai_compatible_server_over_plain_http(tmp_path: Path) -> None:
    server = FakeProvider().start()  # no TLS, like a local vLLM
    try:
        config = {"providers": {"vllm": {"api": "openai", "hosts": [f"localhost:{server.port}"]}}}
        with Mitmdump(tmp_path, config=config) as proxy:
            m = marker()
            action = {"client": "openai", "op": "chat", "api_key": "sk-local-" + "x" * 30,
                      "params": chat(m, model="llama-3"), "base_url": f"http://localhost:{server.port}/v1"}
            result = drive(action, proxy.client_env())
            assert result["text"] == CANNED_REPLY, result
            t = trace_with(proxy, m)
            assert (t["provider"], t["model"]) == ("vllm", "llama-3")
            assert t["url"] == f"http://localhost:{server.port}/v1/chat/completions"  # not upgraded
    finally:
        server.stop()


@pytest.mark.parametrize("stream_usage", [None, True])
def test_a_server_of_your_own_is_asked_for_stream_usage_only_when_it_takes_it(tmp_path: Path, stream_usage: bool | None) -> None:
    """A strict OpenAI-compatible server answers a field it does not know with a 400: a
    `stream_options` the proxy added would fail a call its client never made so."""
    server = FakeProvider().start()
    try:
        vllm = {"api": "openai", "hosts": [f"localhost:{server.port}"]} | ({} if stream_usage is None else {"stream_usage": stream_usage})
        with Mitmdump(tmp_path, config={"providers": {"vllm": vllm}}) as proxy:
            m = marker()
            action = {"client": "openai", "op": "chat", "api_key": "sk-local-" + "x" * 30,
                      "params": chat(m, model="llama-3", stream=True), "base_url": f"http://localhost:{server.port}/v1"}
            result = drive(action, proxy.client_env())
            assert result["text"] == CANNED_REPLY and result["usage"] is None, result
            received = next(r for r in server.requests if m.encode() in r.body)
            assert ("stream_options" in received.json) is bool(stream_usage)
            assert trace_with(proxy, m)["usage"]["estimated"] is not bool(stream_usage)
    finally:
        server.stop()
