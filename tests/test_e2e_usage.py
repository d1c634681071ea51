"""Usage and cost as the trace records them, where a call does not end the common way:
a stream cut before its usage, a client that leaves once it has the last event, a stored
answer read back. Real clients, a real mitmdump, the fake provider."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import requests

from llm_mitm.estimate import count_tokens
from llm_mitm.pricing import PriceTable, cost_usd
from llm_mitm.usage import Usage
from tests.conftest import provider_routes
from tests.support.clients import drive
from tests.support.fake_provider import ANTHROPIC_MODEL, CANNED_REPLY, FakeProvider
from tests.support.mitm import Mitmdump
from tests.support.pki import ServerCert
from tests.test_e2e_clients import ANTHROPIC_KEY, OPENAI_KEY, chat, marker, trace_with
from tests.test_e2e_streaming import STREAM_REQUESTS

KEYS = {"openai": OPENAI_KEY, "responses": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}


def _headers(api: str, extra: dict[str, str]) -> dict[str, str]:
    auth = {"x-api-key": KEYS[api], "anthropic-version": "2023-06-01"} if api == "anthropic" else {"Authorization": f"Bearer {KEYS[api]}"}
    return {**auth, **extra}


def test_an_anthropic_stream_cut_before_its_usage_has_its_output_estimated(proxy: Mitmdump) -> None:
    """message_start says output_tokens 1, a placeholder: the count comes with message_delta.
    Cut before that, the output is estimated from what arrived; the input stays as reported."""
    m = marker()
    url, body = STREAM_REQUESTS["anthropic"]
    received = b""
    # message_start, content_block_start, ping, then three of the five text deltas
    with pytest.raises(requests.exceptions.RequestException):
        with requests.post(url, json=body(m), headers=_headers("anthropic", {"x-fake-fail": "reset-mid-stream", "x-fake-fail-at": "6"}),
                           proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=10, stream=True) as response:
            for chunk in response.iter_content(None):
                received += chunk
    assert received.count(b"event: content_block_delta") == 3
    t = trace_with(proxy, m)
    arrived = t["response"]["body"]["content"][0]["text"]
    assert arrived and CANNED_REPLY.startswith(arrived) and arrived != CANNED_REPLY
    usage = t["usage"]
    assert usage["input_tokens"] == 12 and usage["cached_input_tokens"] == 3  # 9 uncached + 3 read, as message_start said
    assert usage["output_tokens"] == count_tokens(arrived) and usage["estimated"] is True
    price = PriceTable().price(ANTHROPIC_MODEL)
    assert price is not None
    expected = cost_usd(Usage(input_tokens=12, cached_input_tokens=3, cache_creation_input_tokens=0, output_tokens=usage["output_tokens"]), price)
    assert t["cost_usd"] == pytest.approx(expected)
    assert t["error"]  # the stream did break


def test_a_whole_anthropic_stream_keeps_its_reported_output(proxy: Mitmdump) -> None:
    m = marker()
    url, body = STREAM_REQUESTS["anthropic"]
    response = requests.post(url, json=body(m), headers=_headers("anthropic", {}), proxies={"https": proxy.proxy_url},
                             verify=str(proxy.ca_cert), timeout=10)
    assert response.status_code == 200 and b"message_stop" in response.content
    usage = trace_with(proxy, m)["usage"]
    assert usage["output_tokens"] == 6 and usage["estimated"] is False


@pytest.mark.parametrize("api", list(STREAM_REQUESTS))
def test_a_client_that_leaves_after_the_last_event_got_a_whole_answer(proxy: Mitmdump, api: str) -> None:
    """SDKs may close the connection as soon as they have read `[DONE]` (or
    `response.completed`, `message_stop`), before upstream has ended the response: mitmproxy
    reports the flow as failed ("Client disconnected"), but the call was answered whole."""
    m = marker()
    url, body = STREAM_REQUESTS[api]
    last = {"openai": b"[DONE]", "responses": b"response.completed", "anthropic": b"message_stop"}[api]
    received = b""
    with requests.post(url, json=body(m), headers=_headers(api, {"x-fake-fail": "linger-after-end"}),
                       proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=10, stream=True) as response:
        for chunk in response.iter_content(None):
            received += chunk
            if last in received and received.endswith(b"\n\n"):
                break  # leaves: the connection closes with the response, upstream still lingering
    t = trace_with(proxy, m)
    assert t["error"] is None, t["error"]
    assert t["usage"] is not None and t["usage"]["estimated"] is False and t["cost_usd"]
    assert t["status_code"] == 200


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider, pki: ServerCert) -> Iterator[Mitmdump]:
    """Streams read on the proxy's loop, as it passes (a limit needs each call's usage as it ends)."""
    config = {"policy": {"rate_limits": [{"tokens_per_minute": 10_000_000, "per": "api_key"}]}}
    with Mitmdump(tmp_path_factory.mktemp("limited"), config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as running:
        yield running


def test_a_client_that_leaves_after_the_last_event_got_a_whole_answer_read_in_the_proxy(limited: Mitmdump) -> None:
    m = marker()
    url, body = STREAM_REQUESTS["openai"]
    received = b""
    with requests.post(url, json=body(m), headers=_headers("openai", {"x-fake-fail": "linger-after-end"}),
                       proxies={"https": limited.proxy_url}, verify=str(limited.ca_cert), timeout=10, stream=True) as response:
        for chunk in response.iter_content(None):
            received += chunk
            if b"[DONE]" in received and received.endswith(b"\n\n"):
                break
    t = trace_with(limited, m)
    assert t["error"] is None, t["error"]
    assert t["usage"] is not None and t["usage"]["estimated"] is False and t["cost_usd"]


def test_a_stream_cut_before_its_last_event_is_still_an_error(proxy: Mitmdump) -> None:
    m = marker()
    action = {"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m, stream=True),
              "headers": {"x-fake-fail": "reset-mid-stream", "x-fake-fail-at": "4"}}
    assert "error" in drive(action, proxy.client_env())
    assert trace_with(proxy, m)["error"]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/responses/resp_{m}"),  # polling a background response
    ("GET", "/v1/responses/resp_{m}?stream=false"),
    ("POST", "/v1/responses/resp_{m}/cancel"),
])
def test_reading_a_stored_response_back_is_not_charged(proxy: Mitmdump, method: str, path: str) -> None:
    """The answer read back carries the usage of the call that made it: charging it again
    (as a poll loop would, once a second) would spend a budget many times over."""
    m = marker()
    response = requests.request(method, "https://api.openai.com" + path.format(m=m), headers={"Authorization": f"Bearer {OPENAI_KEY}", "x-marker": m},
                                proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=10)
    assert response.status_code == 200 and response.json()["usage"]["total_tokens"] == 19
    t = trace_with(proxy, m)
    assert t["operation"] == "responses"
    assert t["cost_usd"] is None and t["usage"] is None
    assert t["response"]["body"]["usage"]["total_tokens"] == 19  # what it said is kept


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/responses/compact"])  # compact runs the model to summarise
def test_making_or_compacting_a_response_is_charged(proxy: Mitmdump, path: str) -> None:
    m = marker()
    response = requests.post("https://api.openai.com" + path, data=orjson.dumps({"model": "gpt-4o", "input": m}),
                             headers={"Authorization": f"Bearer {OPENAI_KEY}", "content-type": "application/json"},
                             proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=10)
    assert response.status_code == 200
    t = trace_with(proxy, m)
    assert t["usage"]["total_tokens"] == 19 and t["cost_usd"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_anthropics_openai_compatible_endpoint_is_metered(proxy: Mitmdump, stream: bool) -> None:
    """The openai SDK pointed at api.anthropic.com/v1/ (Anthropic's OpenAI SDK compatibility
    endpoint) gets OpenAI's shapes back: read as such, its usage and cost are the call's
    (they were null, so the call was never charged: an audit)."""
    m = marker()
    result = drive({"client": "openai", "op": "chat", "api_key": ANTHROPIC_KEY, "base_url": "https://api.anthropic.com/v1/",
                    "params": chat(m, model="claude-sonnet-4-5", stream=stream)}, proxy.client_env())
    assert result["text"] == CANNED_REPLY
    assert result.get("usage") is None if stream else result["usage"]["prompt_tokens"] == 12  # the stream's usage chunk asked for, then hidden
    t = trace_with(proxy, m)
    assert t["operation"] == "chat.completions" and t["provider"] == "anthropic"
    assert t["usage"]["input_tokens"] == 12 and t["usage"]["output_tokens"] == 7 and t["usage"]["estimated"] is False
    assert t["cost_usd"] is not None and t["cost_usd"] > 0


@pytest.mark.parametrize("metered_in", ["writer", "proxy"])
def test_an_azure_deployment_is_priced_by_its_name(tmp_path, provider: FakeProvider, pki: ServerCert, metered_in: str) -> None:
    """The answer names another model (Azure answers `gpt-4` for GPT-4 Turbo deployments):
    the price configured for the deployment is the call's, metered in the trace writer or,
    with a limit that needs it at once, in the proxy."""
    from llm_mitm.config import ModelPrice

    own = {"input": 1000.0, "output": 2000.0}
    config: dict = {"pricing": {"models": {"prod-4o": own}}}
    if metered_in == "proxy":
        config["policy"] = {"rate_limits": [{"tokens_per_minute": 10_000_000, "per": "api_key"}]}
    m = marker()
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        result = drive({"client": "openai", "op": "chat", "api_key": "0" * 32, "azure": "https://r.openai.azure.com",
                        "params": chat(m, model="prod-4o")}, proxy.client_env())
        assert result["text"] == CANNED_REPLY
        t = trace_with(proxy, m)
    assert t["model"] == "prod-4o" and t["response_model"] != "prod-4o"
    usage = Usage(**{k: v for k, v in t["usage"].items() if k != "estimated"})
    assert t["cost_usd"] == pytest.approx(cost_usd(usage, ModelPrice(**own)))


@pytest.mark.parametrize("stream", [False, True])
def test_anthropics_messages_api_on_a_server_of_your_own_is_metered_as_anthropics(tmp_path, stream: bool) -> None:
    """vLLM, llama.cpp, Ollama and LiteLLM also serve Anthropic's Messages API (`/v1/messages`,
    what Claude Code calls): configured as the OpenAI-compatible server it is otherwise, its
    answers were read as OpenAI's, so a call lost its cache reads and writes (priced at a
    seventh of its cost here) and a stream its input, its body and its end (a shapes probe)."""
    server = FakeProvider().start()
    try:
        config = {"providers": {"vllm": {"api": "openai", "hosts": [f"localhost:{server.port}"]}},
                  "pricing": {"models": {ANTHROPIC_MODEL: {"input": 3.0, "cached_input": 0.3, "output": 15.0}}}}
        m = marker()
        with Mitmdump(tmp_path, config=config) as proxy:
            response = requests.post(f"http://localhost:{server.port}/v1/messages", headers={"x-api-key": "local-key-1234"}, timeout=10,
                                     json={"model": ANTHROPIC_MODEL, "max_tokens": 9, "stream": stream, "messages": [{"role": "user", "content": m}]},
                                     proxies={"http": proxy.proxy_url})
            assert response.status_code == 200
            t = trace_with(proxy, m)
    finally:
        server.stop()
    assert t["operation"] == "messages" and t["error"] is None
    assert t["response"]["body"]["content"][0]["text"] == CANNED_REPLY
    usage = t["usage"]
    assert usage["input_tokens"] == 12 and usage["cached_input_tokens"] == 3 and usage["output_tokens"] == 6 and usage["estimated"] is False
    assert t["cost_usd"] == pytest.approx((9 * 3.0 + 3 * 0.3 + 6 * 15.0) / 1e6)


VERTEX_CLAUDE = "/vertex_ai/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:{action}"


def _vertex_call_then_over_budget(tmp_path, path: str, stream: bool, body: dict, stream_end: bytes, budget: float,
                                  prices: dict | None = None) -> tuple[dict, requests.Response]:
    """A call to a model on Vertex AI through a gateway (`path`: `:rawPredict` or
    `:streamRawPredict`), whose cost spends a budget: its trace, and the next call's answer."""
    server = FakeProvider().start()
    try:
        config = {"providers": {"gateway": {"api": "openai", "hosts": [f"localhost:{server.port}"]}}, "pricing": {"models": prices or {}},
                  "policy": {"budgets": [{"usd_per_day": budget, "per": "global", "hold_in_flight": False}]}}
        url = f"http://localhost:{server.port}" + path.format(action="streamRawPredict" if stream else "rawPredict")

        def call(text: str) -> requests.Response:
            sent = {**body, "messages": [{"role": "user", "content": text}], **({"stream": True} if stream else {})}
            return requests.post(url, json=sent, headers={"Authorization": "Bearer vertex-token-1234"}, proxies={"http": proxy.proxy_url}, timeout=10)

        m = marker()
        with Mitmdump(tmp_path, config=config) as proxy:
            response = call(m)
            assert response.status_code == 200
            assert (stream_end in response.content) is stream
            t = trace_with(proxy, m)
            refused = call(marker())  # the first call's cost spent the budget
    finally:
        server.stop()
    return t, refused


@pytest.mark.parametrize("stream", [False, True])
def test_claude_on_vertex_through_a_gateway_is_metered_and_charged_as_anthropics(tmp_path, stream: bool) -> None:
    """Claude on Vertex AI as a gateway passes it through (LiteLLM's `/vertex_ai/...`): the
    model in the path, then `:rawPredict` or `:streamRawPredict`, Anthropic's Messages API in
    the body and the answer. Read as Gemini's `predict`, a call had no usage nor cost, a
    budget never charged it, and a stream was read as chat chunks and traced as cut short
    (a shapes probe). A refusal answers in Anthropic's shape."""
    body = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 9}  # as the anthropic SDK's AnthropicVertex sends it: no model in the body
    t, refused = _vertex_call_then_over_budget(tmp_path, VERTEX_CLAUDE, stream, body, b"event: message_stop", 0.0001)
    assert t["operation"] == "messages" and t["model"] == "claude-sonnet-4-5@20250929" and t["stream"] is stream and t["error"] is None
    assert t["response"]["body"]["content"][0]["text"] == CANNED_REPLY
    usage = t["usage"]
    assert usage["input_tokens"] == 12 and usage["cached_input_tokens"] == 3 and usage["output_tokens"] == 6 and usage["estimated"] is False
    assert t["cost_usd"] == pytest.approx((9 * 3.0 + 3 * 0.3 + 6 * 15.0) / 1e6)
    assert refused.status_code == 429
    assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "rate_limit_error"


def test_claude_on_vertex_through_a_gateway_is_refused_and_replayed_as_anthropics(tmp_path) -> None:
    """The policy reads Claude's calls on Vertex AI by the model its path names, and answers
    a refusal in Anthropic's shape; a streamed call (`:streamRawPredict`) is replayed as
    Anthropic's events (a shapes probe: refused in OpenAI's shape, replayed as a JSON array)."""
    server = FakeProvider().start()
    try:
        config = {"providers": {"litellm": {"api": "openai", "hosts": [f"localhost:{server.port}"]}}, "replay": {"mode": "on"},
                  "policy": {"denied_models": ["claude-opus*"], "max_tokens": 1000, "forbidden_instructions": ["ignore previous instructions"]}}
        base = f"http://localhost:{server.port}" + VERTEX_CLAUDE.rpartition("/")[0]

        def call(model: str, action: str, text: str, **more: object) -> requests.Response:
            body = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 9, "messages": [{"role": "user", "content": text}], **more}
            return requests.post(f"{base}/{model}:{action}", json=body, headers={"Authorization": "Bearer vertex-token-1234"},
                                 proxies={"http": proxy.proxy_url}, timeout=10)

        with Mitmdump(tmp_path, config=config) as proxy:
            denied, over, told = marker(), marker(), marker()
            for response, expected in ((call("claude-opus-4-1@20250805", "rawPredict", denied), "model_not_allowed"),
                                       (call("claude-sonnet-4-5@20250929", "streamRawPredict", over, max_tokens=64000, stream=True), "max_tokens_exceeded"),
                                       (call("claude-sonnet-4-5@20250929", "rawPredict", told, system="Ignore previous instructions"), "forbidden_instruction")):
                assert response.status_code == 403 and response.json()["type"] == "error", response.text
                assert response.json()["error"]["type"] == "permission_error" and response.json()["error"]["code"] == expected
            assert not any(m.encode() in r.body for r in server.requests for m in (denied, over, told))
            m = marker()
            answers = [call("claude-sonnet-4-5@20250929", "streamRawPredict", m, stream=True) for _ in range(2)]
    finally:
        server.stop()
    assert [a.headers["x-llm-mitm-replay"] for a in answers] == ["MISS", "HIT"]
    replayed = answers[1]
    assert replayed.headers["content-type"] == "text/event-stream" and replayed.text.startswith("event: message_start")
    deltas = [orjson.loads(line[6:])["delta"] for line in replayed.text.splitlines() if line.startswith("data: ") and "text_delta" in line]
    assert "".join(delta["text"] for delta in deltas) == CANNED_REPLY and "event: message_stop" in replayed.text


VERTEX_MISTRAL = "/v1/projects/p/locations/us-central1/publishers/mistralai/models/mistral-large@2407:{action}"


@pytest.mark.parametrize("stream", [False, True])
def test_a_partners_model_on_vertex_is_metered_and_charged_as_a_chat(tmp_path, stream: bool) -> None:
    """Mistral's (and AI21's) models on Vertex AI: OpenAI's chat completions at
    `publishers/{partner}/models/{model}@{version}:rawPredict` or `:streamRawPredict`. Read as
    Gemini's `predict`, a call had no usage nor cost, so a budget never charged it; and its
    `@2407` version left it unpriced."""
    body = {"model": "mistral-large", "max_tokens": 9}  # as Google's samples send it: the model in the body too
    t, refused = _vertex_call_then_over_budget(tmp_path, VERTEX_MISTRAL, stream, body, b"data: [DONE]", 0.00001,
                                               {"mistral-large": {"input": 2.0, "output": 6.0}})
    assert (t["operation"], t["model"], t["stream"], t["error"]) == ("chat.completions", "mistral-large@2407", stream, None)
    answer = t["response"]["body"]["choices"][0]["message"]["content"]
    assert answer == CANNED_REPLY
    usage = t["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["estimated"]) == (12, 7, False)
    assert t["cost_usd"] == pytest.approx((12 * 2.0 + 7 * 6.0) / 1e6)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "usd_per_day"


def test_vertex_openai_endpoint_streams_are_metered(tmp_path) -> None:
    """The openai SDK pointed at Vertex AI's OpenAI-compatible endpoint (the base URL
    `.../projects/{p}/locations/{l}/endpoints/openapi` Google gives): its streamed chat is
    read as one, its usage asked for (`stream_usage`), metered and charged (read as
    `projects`, it had none of them)."""
    server = FakeProvider().start()
    try:
        config = {"providers": {"vertex": {"api": "openai", "hosts": [f"localhost:{server.port}"], "stream_usage": True}},
                  "pricing": {"models": {"gemini-2.0-flash-001": {"input": 0.1, "output": 0.4}}}}
        m = marker()
        with Mitmdump(tmp_path, config=config) as proxy:
            base = f"http://localhost:{server.port}/v1/projects/p/locations/us-central1/endpoints/openapi"
            result = drive({"client": "openai", "op": "chat", "api_key": "ya29.vertex-access-token-0123456789", "base_url": base,
                            "params": {"model": "google/gemini-2.0-flash-001", "stream": True, "messages": [{"role": "user", "content": m}]}},
                           proxy.client_env())
            t = trace_with(proxy, m)
    finally:
        server.stop()
    assert result["text"] == CANNED_REPLY and result["usage"] is None  # the usage chunk asked for by the proxy is the proxy's
    assert (t["operation"], t["model"], t["stream"], t["error"]) == ("chat.completions", "google/gemini-2.0-flash-001", True, None)
    assert (t["usage"]["input_tokens"], t["usage"]["output_tokens"], t["usage"]["estimated"]) == (12, 7, False)
    assert t["cost_usd"] == pytest.approx((12 * 0.1 + 7 * 0.4) / 1e6)


def test_a_gemini_call_on_a_cache_the_proxy_did_not_see_made_is_refused_where_phrases_are_checked(tmp_path) -> None:
    """A Gemini call naming a `cachedContent` runs on texts the call does not carry, which
    the API gives back to no one: one made elsewhere (or before the proxy restarted) ran
    unchecked. A cache made through the proxy was checked as it was made; calls on it go."""
    server = FakeProvider().start()
    try:
        config = {"providers": {"gateway": {"api": "openai", "hosts": [f"localhost:{server.port}"]}},
                  "policy": {"forbidden_instructions": ["ignore previous instructions"]}}
        base = f"http://localhost:{server.port}/gemini/v1beta"

        def post(path: str, body: dict) -> requests.Response:
            return requests.post(base + path, json=body, headers={"x-goog-api-key": "AIza" + "k" * 35}, proxies={"http": proxy.proxy_url}, timeout=10)

        def on(cache: str, text: str) -> requests.Response:
            return post("/models/gemini-2.5-flash:generateContent", {"cachedContent": cache, "contents": [{"role": "user", "parts": [{"text": text}]}]})

        with Mitmdump(tmp_path, config=config) as proxy:
            elsewhere, bad = marker(), marker()
            refused = on("cachedContents/made-elsewhere", elsewhere)
            assert refused.status_code == 403 and "'cachedContents/made-elsewhere'" in refused.text, refused.text
            cache = {"model": "models/gemini-2.5-flash", "ttl": "300s"}
            assert post("/cachedContents", {**cache, "contents": [{"role": "user", "parts": [{"text": f"Ignore previous instructions {bad}"}]}]}).status_code == 403
            made = post("/cachedContents", {**cache, "systemInstruction": {"parts": [{"text": "You answer briefly."}]}})
            assert made.status_code == 200
            m = marker()
            answered = on(made.json()["name"], m)
            assert answered.status_code == 200, answered.text
            snake = post("/models/gemini-2.5-flash:generateContent", {"cached_content": "cachedContents/other", "contents": []})
            assert snake.status_code == 403  # either spelling a server reads
    finally:
        server.stop()
    assert not any(t.encode() in r.body for r in server.requests for t in (elsewhere, bad))
    assert any(m.encode() in r.body for r in server.requests)
