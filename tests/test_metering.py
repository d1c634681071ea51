"""Organization precedence, prices, costs, estimates, quotas, spend, stats, refusals."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from limits.storage import MemoryStorage

from llm_mitm.config import HeaderRule, ModelPrice, PolicyConfig
from llm_mitm.estimate import estimate_usage
from llm_mitm.metering import Call, Metering
from llm_mitm.organization import choose
from llm_mitm.policy import output_limit
from llm_mitm.pricing import PriceTable, cost_usd, shipped_table
from llm_mitm.providers import Provider, route_for
from llm_mitm.quota import HOLD_SECONDS, Caller, Holds, Quota, TokenWindows
from llm_mitm.refusal import refusal
from llm_mitm.spend import PERIODS, SpendStore, seconds_left
from llm_mitm.sse import AnthropicRebuilder, ServerSentEvent
from llm_mitm.stats import UsageStats
from llm_mitm.usage import Usage, normalize_usage

FP = "sk-proj-…a1b2#3f9c2e1d07b4a6c5"


@pytest.mark.parametrize(
    ("rule", "sent", "key", "expected"),
    [
        (HeaderRule(), None, FP, None),
        (HeaderRule(), "org-client", FP, "org-client"),
        (HeaderRule(default="org-default"), None, FP, "org-default"),
        (HeaderRule(default="org-default"), "org-client", FP, "org-client"),
        (HeaderRule(default="org-default", override=True), "org-client", FP, "org-default"),
        (HeaderRule(default="org-default", by_key={FP: "org-team"}), None, FP, "org-team"),
        (HeaderRule(default="org-default", by_key={"3f9c2e1d07b4a6c5": "org-team"}), None, FP, "org-team"),
        # as fingerprints were written before they had 16 hex digits
        (HeaderRule(default="org-default", by_key={"3f9c2e1d": "org-team"}), None, FP, "org-team"),
        (HeaderRule(default="org-default", by_key={"sk-proj-…a1b2#3f9c2e1d": "org-team"}), None, FP, "org-team"),
        (HeaderRule(default="org-default", by_key={"3f9c2e1d07b4a6c6": "org-team"}), None, FP, "org-default"),
        (HeaderRule(default="org-default", by_key={FP: "org-team"}, override=True), "org-client", FP, "org-team"),
        (HeaderRule(by_key={FP: "org-team"}), None, "other#00000000", None),
        (HeaderRule(override=True), "org-client", FP, "org-client"),
    ],
)
def test_organization_precedence(rule: HeaderRule, sent: str | None, key: str, expected: str | None) -> None:
    assert choose(rule, sent, key) == expected


def test_price_resolution_and_overrides() -> None:
    table = PriceTable({"gpt-4o": ModelPrice(input=1, output=2), "my-model": ModelPrice(input=3, output=4)})
    assert table.resolve("gpt-4o-2024-08-06") == "gpt-4o"
    assert table.price("gpt-4o-2024-08-06").input == 1
    assert table.resolve("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert table.resolve("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert table.resolve("My-Model") == "my-model"
    assert table.price("no-such-model") is None and table.price(None) is None
    assert PriceTable().as_of


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # the first gpt-4o, priced apart
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-0314", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4-1106-preview", "gpt-4-1106-preview"),
        ("gpt-4-0125-preview", "gpt-4-0125-preview"),
        ("gpt-4-turbo-preview", "gpt-4-turbo-preview"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-1106", "gpt-3.5-turbo-1106"),
        ("gpt-3.5-turbo-instruct-0914", "gpt-3.5-turbo-instruct"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("o1-2024-12-17", "o1"),
        ("o1-preview-2024-09-12", "o1-preview"),
        ("o3-2025-04-16", "o3"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-4o-audio-preview-2024-12-17", "gpt-4o-audio-preview"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),  # aliases of a version's first snapshot
        ("claude-opus-4-0", "claude-opus-4"),
        ("text-embedding-ada-002-v2", "text-embedding-ada-002"),
        ("gpt-35-turbo", "gpt-3.5-turbo"),  # Azure's names for GPT-3.5, as its answers give them (a usage probe: unpriced)
        ("gpt-35-turbo-16k", "gpt-3.5-turbo-16k"),
        ("gpt-35-turbo-instruct", "gpt-3.5-turbo-instruct"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),  # Vertex AI's names (a shapes probe: unpriced)
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("vertex_ai/claude-opus-4-1@20250805", "claude-opus-4-1"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),  # Bedrock's, and its cross-region inference profiles'
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("eu.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("apac.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("us-gov.anthropic.claude-3-haiku-20240307-v1:0", "claude-3-haiku"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("bedrock/us.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5"),
        ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1"),
        ("gpt-4-32k-0613", None),  # not gpt-4: a distinct model the table does not price
        ("gpt-4.5-preview", None),
    ],
)
def test_real_model_ids_resolve_to_their_own_prices(model: str, name: str | None) -> None:
    assert PriceTable().resolve(model) == name


def test_gpt_4_turbo_previews_cost_turbo_prices() -> None:
    turbo = PriceTable().price("gpt-4-turbo")
    for preview in ("gpt-4-1106-preview", "gpt-4-0125-preview", "gpt-4-turbo-preview"):
        assert PriceTable().price(preview) == turbo


def test_a_price_configured_for_the_deployment_wins_over_the_model_azure_names() -> None:
    """Azure answers `gpt-4` for a GPT-4 Turbo deployment: the price configured under the
    deployment's name is the one to use (an audit: the answered name always won)."""
    turbo = ModelPrice(input=10, output=30)
    usage = Usage(input_tokens=10_000, output_tokens=1_000, total_tokens=11_000)

    def cost(table: PriceTable, asked: str | None) -> float | None:
        call = Call(operation="chat.completions", model="gpt-4", usage=usage, request_json={}, response_json={}, error=False,
                    charged=True, status_code=200, asked=asked)
        return Metering(table, estimate_missing=True).meter(call)[1]

    assert cost(PriceTable({"My-GPT4-Turbo": turbo}), "my-gpt4-turbo") == pytest.approx(0.13)
    assert cost(PriceTable(), "my-gpt4-turbo") == pytest.approx(cost(PriceTable(), None)) == pytest.approx(0.36)  # none configured: gpt-4's
    assert cost(PriceTable({"other": turbo}), "gpt-4-turbo") == pytest.approx(0.36)  # shipped names do not stand in: what answered counts
    assert PriceTable().price_for("gpt-4o", None) == PriceTable().price("gpt-4o")


def test_only_a_real_date_or_alias_suffix_is_taken_off() -> None:
    table = PriceTable({"my-model": ModelPrice(input=1, output=2)})
    for dated in ("my-model-2025-04-16", "my-model-20250929", "my-model-0613", "my-model-2411", "my-model-latest", "my-model-v1:0"):
        assert table.resolve(dated) == "my-model", dated
    for distinct in ("my-model-preview", "my-model-0613-preview", "my-model-1399", "my-model-2025-13-01", "my-model-20251340"):
        assert table.resolve(distinct) is None, distinct


def test_only_a_vendor_before_a_model_or_a_vertex_date_after_it_is_taken_off() -> None:
    """Bedrock's vendor (and an inference profile's geography) and Vertex AI's `@` date or
    version (AI21's `@001`, Mistral's year and month `@2407`: unpriced before) go, as a dated
    snapshot's date does; a dot or an `@` elsewhere in a name stays (`gpt-4.1` is not `1`)."""
    table = PriceTable({"my-model": ModelPrice(input=1, output=2), "1": ModelPrice(input=5, output=5), "mini": ModelPrice(input=5, output=5)})
    for named in ("my-model@20250929", "my-model@001", "my-model@2407", "anthropic.my-model", "us.meta.my-model-v1:0",
                  "global.openai.my-model-2025-04-16"):
        assert table.resolve(named) == "my-model", named
    for distinct in ("my-model@preview", "my-model@2025", "my-model@20251340", "my-model@000", "my-model@0010", "acme.my-model", "us.my-model",
                     "my-model-preview@20250929", "gpt-4o@mini", "o3@1", "4.1", "gpt-4.mini"):
        assert table.resolve(distinct) is None, distinct
    for name in ("gpt-4.1", "gpt-4.1-mini", "gpt-5.1", "gpt-3.5-turbo"):
        assert table.resolve(name) == name and table.resolve(f"{name}@20250414") == name


def test_every_shipped_name_resolves_to_itself_and_from_its_snapshots() -> None:
    table = PriceTable()
    for name in table.prices:
        assert table.resolve(name) == name
        assert table.resolve(f"{name}-2025-01-31") == name
        assert table.resolve(f"{name}-20250131") == name


def test_cost_openai_cached_and_reasoning() -> None:
    usage = normalize_usage("openai", {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 300}})
    price = PriceTable().price("gpt-4o")
    # 800 fresh * 2.5 + 200 cached * 1.25 + 500 output (reasoning included) * 10
    assert cost_usd(usage, price) == pytest.approx((800 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6)


@pytest.mark.parametrize(
    ("model", "audio_in", "audio_out"),
    [("gpt-4o-audio-preview-2024-12-17", 40, 80), ("gpt-4o-audio-preview-2024-10-01", 100, 200), ("gpt-4o-mini-audio-preview", 10, 20)],
)
def test_cost_audio_tokens_at_audio_prices(model: str, audio_in: float, audio_out: float) -> None:
    """Audio tokens cost many times text's: counted as text, a call was ~9x too cheap."""
    usage = normalize_usage("openai", {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"audio_tokens": 900, "cached_tokens": 0},
                                       "completion_tokens_details": {"audio_tokens": 400}})
    assert (usage.audio_input_tokens, usage.audio_output_tokens) == (900, 400)
    price = PriceTable().price(model)
    assert cost_usd(usage, price) == pytest.approx((100 * price.input + 900 * audio_in + 100 * price.output + 400 * audio_out) / 1e6)
    no_audio_price = PriceTable({"plain": ModelPrice(input=1.0, output=2.0)}).price("plain")
    assert cost_usd(usage, no_audio_price) == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)  # no audio price: text's


def test_old_gpt_3_5_snapshots_cost_their_own_prices() -> None:
    table = PriceTable()
    assert (table.price("gpt-3.5-turbo-0613").input, table.price("gpt-3.5-turbo-16k-0613").input) == (1.5, 3.0)


def test_anthropic_compaction_steps_are_counted_beside_the_answer() -> None:
    """With server-side compaction (beta), summarising is a sampling of its own, in
    `usage.iterations` and not in the top-level counts, and billed (an audit: it was left out)."""
    usage = normalize_usage("anthropic", {"input_tokens": 23000, "output_tokens": 1000, "iterations": [
        {"type": "compaction", "input_tokens": 180000, "cache_read_input_tokens": 5000, "output_tokens": 3500},
        {"type": "message", "input_tokens": 23000, "output_tokens": 1000}, "nonsense"]})
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (208000, 5000, 4500)
    assert normalize_usage("anthropic", {"input_tokens": 9, "output_tokens": 2, "iterations": None}).input_tokens == 9


def test_cost_anthropic_cache_reads_and_writes() -> None:
    usage = normalize_usage("anthropic", {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 400, "output_tokens": 50})
    assert usage.input_tokens == 1500 and usage.cache_creation_1h_input_tokens is None  # no breakdown: 5-minute writes
    price = PriceTable().price("claude-sonnet-4-5-20250929")
    assert cost_usd(usage, price) == pytest.approx((100 * 3 + 1000 * 0.3 + 400 * 3.75 + 50 * 15) / 1e6)


ONE_HOUR_WRITES = {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 400, "output_tokens": 50,
                   "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 100}}


def test_cost_anthropic_one_hour_cache_writes() -> None:
    usage = normalize_usage("anthropic", ONE_HOUR_WRITES)
    assert (usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_creation_1h_input_tokens) == (1500, 400, 100)
    price = PriceTable().price("claude-sonnet-4-5-20250929")
    assert price.cache_write_1h == 6.0
    assert cost_usd(usage, price) == pytest.approx((100 * 3 + 1000 * 0.3 + 300 * 3.75 + 100 * 6 + 50 * 15) / 1e6)


def test_one_hour_write_price_defaults_to_twice_input() -> None:
    usage = normalize_usage("anthropic", ONE_HOUR_WRITES)
    price = ModelPrice(input=2, output=10, cache_write=2.5)
    assert cost_usd(usage, price) == pytest.approx((100 * 2 + 1000 * 2 + 300 * 2.5 + 100 * 4 + 50 * 10) / 1e6)


def test_anthropic_one_hour_price_is_twice_input() -> None:
    for name, price in PriceTable().prices.items():
        if name.startswith("claude-"):
            assert price.cache_write_1h == pytest.approx(2 * price.input), name


def test_streamed_anthropic_usage_keeps_the_cache_write_breakdown() -> None:
    rebuilder = AnthropicRebuilder()
    start = {"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {**ONE_HOUR_WRITES, "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 50}}
    for payload in (start, delta):
        rebuilder.add(ServerSentEvent(event=payload["type"], data=orjson.dumps(payload).decode()))
    usage = normalize_usage("anthropic", rebuilder.usage)
    assert usage == normalize_usage("anthropic", ONE_HOUR_WRITES) and usage.cache_creation_1h_input_tokens == 100


def test_a_stream_cut_short_is_estimated_and_an_error_answer_is_not() -> None:
    """Usage comes in a stream's last chunk; a stream the client left (or upstream reset)
    after tokens were generated is estimated, so limits and budgets still see it."""
    metering = Metering(PriceTable(), estimate_missing=True)
    request = {"messages": [{"role": "user", "content": "abcd" * 10}]}
    partial = {"choices": [{"message": {"content": "abcdefgh"}}]}

    def call(error: bool, status_code: int | None) -> Call:
        return Call("chat.completions", "gpt-4o", None, request, partial, error=error, charged=True, status_code=status_code)

    usage, cost = metering.meter(call(error=True, status_code=200))
    assert usage == Usage(input_tokens=10, output_tokens=2, total_tokens=12, estimated=True) and cost is not None and cost > 0
    assert metering.meter(call(error=True, status_code=500)) == (None, None)  # an error answer
    assert metering.meter(call(error=True, status_code=None)) == (None, None)  # no answer at all
    # A stream whose first event is its error (Anthropic's overloaded_error): as an error
    # status, nothing to estimate (a probe: it was charged its input).
    from llm_mitm.exchange import read_stream
    from llm_mitm.sse import StreamTap

    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    tap = StreamTap(AnthropicRebuilder(), "")
    tap(b"event: error\ndata: " + orjson.dumps(overloaded) + b"\n\n")
    tap(b"")
    body, outcome = read_stream("anthropic", 200, tap)
    assert body.json == {"error": overloaded["error"]} and outcome.error == "overloaded_error: Overloaded"  # the trace shows it
    assert metering.meter(Call("messages", "claude-opus-4-1", None, request, body.json, error=True, charged=True, status_code=200)) == (None, None)
    # but one cut before its first event (a client that gave up during a long prompt) used its input: estimated (a review)
    usage, _ = metering.meter(Call("chat.completions", "gpt-4o", None, request, None, error=True, charged=True, status_code=200))
    assert usage is not None and usage.estimated and usage.input_tokens == 10


def test_an_anthropic_stream_cut_before_message_delta_has_its_output_estimated() -> None:
    """message_start's output count is a placeholder: without message_delta's count the
    output is estimated from what arrived, the input kept as reported."""
    rebuilder = AnthropicRebuilder()
    start = {"type": "message_start", "message": {"type": "message", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 30, "cache_read_input_tokens": 10, "output_tokens": 1}}}
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "abcd" * 5}}
    for payload in (start, block, delta):
        rebuilder.add(ServerSentEvent(event=payload["type"], data=orjson.dumps(payload).decode()))
    assert not rebuilder.ended
    usage = normalize_usage("anthropic", rebuilder.usage)
    assert usage is not None and usage.output_tokens is None
    call = Call("messages", "claude-sonnet-4-5", usage, {}, rebuilder.result(), error=True, charged=True, status_code=200)
    metered, cost = Metering(PriceTable(), estimate_missing=True).meter(call)
    assert metered == Usage(input_tokens=40, output_tokens=5, total_tokens=45, cached_input_tokens=10, estimated=True)
    assert cost is not None and cost > 0
    assert Metering(PriceTable(), estimate_missing=False).meter(call)[0] == usage  # estimates off: as reported
    stop = {"type": "message_stop"}
    rebuilder.add(ServerSentEvent(event="message_stop", data=orjson.dumps(stop).decode()))
    assert rebuilder.ended


def test_a_reported_total_gives_the_output_count_a_server_left_out() -> None:
    usage = normalize_usage("openai", {"prompt_tokens": 10, "total_tokens": 25})
    call = Call("chat.completions", "gpt-4o", usage, {}, {"choices": [{"message": {"content": "abcd"}}]}, error=False, charged=True, status_code=200)
    assert Metering(PriceTable(), estimate_missing=True).meter(call)[0] == Usage(input_tokens=10, output_tokens=15, total_tokens=25)


def test_a_transcriptions_usage_is_read_with_its_audio_tokens() -> None:
    """gpt-4o-transcribe names its details in the singular (`input_token_details`), and
    whisper counts seconds, not tokens: its audio tokens were lost, and whisper's usage was
    a record of nothing (a usage probe)."""
    usage = normalize_usage("openai", {"type": "tokens", "input_tokens": 50, "output_tokens": 3, "total_tokens": 53,
                                       "input_token_details": {"audio_tokens": 48, "text_tokens": 2}})
    assert usage == Usage(input_tokens=50, output_tokens=3, total_tokens=53, audio_input_tokens=48)
    assert normalize_usage("openai", {"type": "duration", "seconds": 9}) is None


def test_geminis_usage_is_read_with_its_thoughts_and_tool_prompt() -> None:
    """Gemini's `usageMetadata` counts thoughts and a tool's prompt apart: added in, as
    OpenAI's counts include them."""
    usage = normalize_usage("openai", {"promptTokenCount": 9, "toolUsePromptTokenCount": 2, "candidatesTokenCount": 6, "thoughtsTokenCount": 3,
                                       "cachedContentTokenCount": 4, "totalTokenCount": 20,
                                       "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4}, {"modality": "AUDIO", "tokenCount": 5}]})
    assert usage == Usage(input_tokens=11, output_tokens=9, total_tokens=20, cached_input_tokens=4, reasoning_tokens=3, audio_input_tokens=5)
    assert normalize_usage("openai", {"promptTokenCount": 7}) == Usage(input_tokens=7, total_tokens=7)


def test_embeddings_report_no_output_and_none_is_estimated() -> None:
    usage = normalize_usage("openai", {"prompt_tokens": 8, "total_tokens": 8})
    call = Call("embeddings", "text-embedding-3-small", usage, {"input": "x"}, {"data": []}, error=False, charged=True, status_code=200)
    assert Metering(PriceTable(), estimate_missing=True).meter(call)[0] == usage


def test_a_stored_answer_read_back_uses_no_tokens() -> None:
    usage = Usage(input_tokens=12, output_tokens=7, total_tokens=19)
    call = Call("responses", "gpt-4o", usage, None, {"usage": {}}, error=False, charged=True, status_code=200, generates=False)
    assert Metering(PriceTable(), estimate_missing=True).meter(call) == (None, None)
    # a stored run or batch read back (polled) carries the usage of what ran it: none of this call's (a review: polls were charged)
    for operation in ("threads", "batches"):
        polled = Call(operation, "gpt-4o", usage, None, {"usage": {}}, error=False, charged=True, status_code=200, generates=False, runs_model=False)
        assert Metering(PriceTable(), estimate_missing=True).meter(polled) == (None, None)
    image = Call("images", "gpt-image-1", usage, None, {"usage": {}}, error=False, charged=True, status_code=200, generates=False)
    assert Metering(PriceTable(), estimate_missing=True).meter(image)[0] == usage  # an image's tokens are this call's


def test_estimate_marks_usage() -> None:
    usage = estimate_usage({"messages": [{"role": "user", "content": "abcd" * 10}]}, {"choices": [{"message": {"content": "abcdefgh"}}]})
    assert usage == Usage(input_tokens=10, output_tokens=2, total_tokens=12, estimated=True)
    assert estimate_usage({}, None) is None
    from llm_mitm.estimate import prompt_tokens

    assert prompt_tokens({"prompt": [1] * 4000}) == 4000 and prompt_tokens({"prompt": [[1] * 10, [2] * 5]}) == 15  # token ids (a limits probe: 0)
    assert prompt_tokens({"input": [[1, 2], "four"]}) == 2 + 1 and prompt_tokens({"prompt": "abcdefgh"}) == 2
    deep: Any = ["x"]
    for _ in range(70):
        deep = [deep]
    # a value nested past what is read leaves the rest read (a review: the text after it counted 0)
    assert prompt_tokens({"input": [{"type": "web_search_call", "action": {"q": deep}}, {"role": "user", "content": "A" * 400}]}) == 100
    legacy = estimate_usage({"prompt": "\n\nHuman: hi\n\nAssistant:"}, {"type": "completion", "completion": "abcdefgh", "stop_reason": "stop_sequence"})
    assert legacy.output_tokens == 2  # Anthropic's legacy completion is read (an audit: its output was 0)


def test_requests_per_minute_and_retry_after() -> None:
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"requests_per_minute": 2, "per": "api_key"}]}))
    alice, bob = Caller("alice", "1.1.1.1"), Caller("bob", "1.1.1.1")
    assert quota.admit(alice) is None and quota.admit(alice) is None
    refused = quota.admit(alice)
    assert refused.rule == "requests_per_minute" and 1 <= refused.retry_after <= 61 and "api_key:alice" in refused.detail
    assert quota.admit(bob) is None


def test_a_refused_call_uses_up_no_other_rules_window() -> None:
    """One noisy key refused by its own limit must not fill the global window for others."""
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [
        {"requests_per_minute": 5, "per": "global"}, {"requests_per_minute": 1, "per": "api_key"},
    ]}))
    noisy = Caller("noisy", "c")
    assert quota.admit(noisy) is None
    for _ in range(10):
        assert quota.admit(noisy).rule == "requests_per_minute"
    assert quota.admit(Caller("quiet", "c")) is None


def test_a_rules_window_is_kept_when_other_rules_are_added_removed_or_moved() -> None:
    """A window is its kind and scope, not the rule's place in the list: a rule put in front
    of an unchanged one began that one's window anew, and 4 calls went where 2 a minute were
    allowed (a review). Two limits on one scope count the same tokens once."""
    storage, token_windows = MemoryStorage(), TokenWindows()
    caller = Caller("k", "c")

    def quota(*rules: dict) -> Quota:  # as each config reload makes it, over the windows kept
        return Quota(PolicyConfig.model_validate({"rate_limits": list(rules)}), storage, token_windows=token_windows)

    first = quota({"requests_per_minute": 2, "per": "global"}, {"tokens_per_minute": 100, "per": "api_key"})
    assert first.admit(caller) is None and first.admit(caller) is None
    first.charge(caller, 60, None)
    moved = quota({"tokens_per_minute": 100000, "per": "client"}, {"tokens_per_minute": 100, "per": "api_key"},
                  {"requests_per_minute": 2, "per": "global"})
    refused = moved.admit(caller)
    assert refused is not None and refused.rule == "requests_per_minute"
    tokens = quota({"tokens_per_minute": 100, "per": "api_key"}, {"tokens_per_minute": 100, "per": "api_key"}, {"tokens_per_minute": 90, "per": "api_key"})
    assert tokens.admit(caller) is None  # 60 used: under both
    tokens.charge(caller, 35, None)  # 95: counted once, so under 100, over 90
    refused = tokens.admit(caller)
    assert refused is not None and refused.rule == "tokens_per_minute" and "tokens_per_minute 90" in refused.detail
    assert quota({"tokens_per_minute": 100, "per": "api_key"}).admit(caller) is None


def test_tokens_per_minute_charged_after_the_call() -> None:
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"tokens_per_minute": 100, "per": "global"}]}))
    caller = Caller("k", "c")
    assert quota.admit(caller) is None
    quota.charge(caller, 60, None)
    assert quota.admit(caller) is None  # 40 left
    quota.charge(caller, 500, None)  # the call that crosses the limit completes...
    refused = quota.admit(Caller("other", "c"))  # ...and the next one waits (global scope)
    assert refused is not None and refused.rule == "tokens_per_minute"


def test_calls_in_flight_hold_their_most_tokens_against_a_tokens_per_minute_limit() -> None:
    """Tokens were charged only as calls ended: 20 calls sent together all went under a
    limit of 60 tokens a minute and used 380 (a limits probe). Each holds its prompt and the
    output it allows until it ends, as against a budget."""
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"tokens_per_minute": 100, "per": "api_key"}]}))
    alice, bob = Caller("alice", "c"), Caller("bob", "c")
    assert quota.admit(alice, "call-1", most_tokens=60) is None
    assert quota.admit(alice, "call-2", most_tokens=60) is None  # 60 held: the call that crosses goes
    refused = quota.admit(alice, "call-3", most_tokens=60)  # 120 held, of 100
    assert refused is not None and refused.rule == "tokens_per_minute" and refused.retry_after == 1
    assert "held by the calls in flight" in refused.detail
    assert quota.admit(alice, "call-4") is None  # one that uses no tokens (a list of models) goes
    assert quota.admit(bob, "call-5", most_tokens=60) is None  # another key's window
    quota.release("call-1")
    quota.charge(alice, 10, None)
    assert quota.admit(alice, "call-6", most_tokens=30) is None  # 10 used + 60 held
    assert quota.admit(alice, "call-7", most_tokens=20).rule == "tokens_per_minute"  # 10 used + 90 held
    for call in ("call-2", "call-6", "call-6"):
        quota.release(call)
    assert quota.admit(alice, "call-8", most_tokens=20) is None


def test_tokens_per_minute_keeps_counts_not_an_entry_per_token() -> None:
    """A moving window keeps one entry per unit: at 10M tokens a minute it held 150 MB, and
    the proxy's loop tens of milliseconds a call (found by a limits probe)."""
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"tokens_per_minute": 10_000_000, "per": "api_key"}]}))
    caller = Caller("k", "c")
    tracemalloc.start()
    try:
        for _ in range(100):
            assert quota.admit(caller) is None
            quota.charge(caller, 20_000, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak / 1e6:.1f} MB for two million tokens"
    quota.charge(caller, 9_000_000, None)
    assert quota.admit(caller).rule == "tokens_per_minute"


def test_budget_survives_a_restart(tmp_path: Path) -> None:
    policy = PolicyConfig.model_validate({"budgets": [{"usd_per_day": 0.01, "per": "client"}]})
    store = SpendStore(tmp_path / "spend.sqlite")
    quota = Quota(policy, spend=store)
    caller = Caller(None, "10.0.0.1")
    assert quota.admit(caller) is None
    quota.charge(caller, 10, 0.006)
    assert quota.admit(caller) is None
    quota.charge(caller, 10, 0.006)
    store.close()
    restarted = Quota(policy, spend=SpendStore(tmp_path / "spend.sqlite"))
    refused = restarted.admit(caller)
    assert refused is not None and refused.rule == "usd_per_day" and "0.0120" in refused.detail
    assert restarted.admit(Caller(None, "10.0.0.2")) is None


def test_calls_in_flight_hold_what_they_may_cost_against_a_budget(tmp_path: Path) -> None:
    """Admitted together, before any was charged, a burst of calls passed a budget by all
    they cost: each holds its most until it ends, and gives it back then."""
    policy = PolicyConfig.model_validate({"budgets": [{"usd_per_day": 0.01, "per": "api_key"}]})
    quota = Quota(policy, spend=SpendStore(tmp_path / "spend.sqlite"))
    alice, bob = Caller("alice", "c"), Caller("bob", "c")
    assert quota.admit(alice, "call-1", 0.005) is None
    assert quota.admit(alice, "call-2", 0.005) is None  # 0.005 held: not yet the budget
    refused = quota.admit(alice, "call-3", 0.005)  # 0.010 held: the budget, were both to cost their most
    assert refused is not None and refused.rule == "usd_per_day" and refused.retry_after == 1
    assert "held by the calls in flight" in refused.detail and "0.0100" in refused.detail
    assert quota.admit(bob, "call-4", 0.005) is None  # another key's budget holds nothing of alice's
    quota.holds.release("call-1")  # it ended: charged what it cost, 0.001
    quota.charge(alice, 10, 0.001)
    assert quota.admit(alice, "call-5", 0.005) is None  # 0.001 spent + 0.005 held
    assert quota.admit(alice, "call-7", 0.005).rule == "usd_per_day"  # 0.001 + 0.010
    quota.holds.release("call-2")
    quota.holds.release("call-5")
    quota.holds.release("call-5")  # given back once only
    assert quota.holds.held("api_key:alice") == 0 and quota.holds.calls() == 1  # bob's call-4
    assert quota.admit(alice, "call-6", 0.0) is None  # a call that may cost nothing holds nothing
    assert quota.holds.calls() == 1


def test_a_held_budget_refuses_only_calls_that_may_cost_and_never_hides_a_spent_one(tmp_path: Path) -> None:
    """A list of models costs nothing: refused while others held the budget (a limits
    probe). And a spent monthly budget's refusal (its wait, the month's end) came second to
    a daily one's hold (retry in a second), so the SDKs retried at once, to be refused."""
    policy = PolicyConfig.model_validate({"budgets": [{"usd_per_day": 0.01, "per": "api_key"}, {"usd_per_month": 0.05, "per": "global"}]})
    quota = Quota(policy, spend=SpendStore(tmp_path / "spend.sqlite"))
    alice = Caller("alice", "c")
    assert quota.admit(alice, "call-1", 0.02) is None
    assert quota.admit(alice, "call-2", 0.0) is None  # costs nothing: let through
    assert quota.admit(alice, "call-3", 0.001).detail.startswith("budget usd_per_day 0.01 for api_key:alice is held")
    quota.charge(Caller("bob", "c"), 10, 0.05)  # the month's global budget spent by another key
    refused = quota.admit(alice, "call-4", 0.001)
    assert refused.rule == "usd_per_month" and "is spent" in refused.detail and refused.retry_after > 60
    assert quota.admit(alice, "call-5", 0.0).rule == "usd_per_month"  # spent refuses every call


def test_retry_after_is_the_longest_wait_of_the_rules_that_refuse(tmp_path: Path) -> None:
    """The first rule found refusing gave its wait: a day's budget spent with its month's
    said to retry at midnight, a full token window with a full request window in seconds
    where the request window frees in a minute, so a client retried into another 429."""
    store = SpendStore(tmp_path / "spend.sqlite")
    caller = Caller("k", "c")
    now = datetime.now(UTC)
    quota = Quota(PolicyConfig.model_validate({"budgets": [{"usd_per_day": 1, "usd_per_month": 1, "per": "global"}]}), spend=store)
    quota.charge(caller, None, 2.0)
    refused = quota.admit(caller, "call-1", 0.1)
    assert refused.retry_after >= seconds_left("month", now) - 5  # (on a month's last day, both end together)
    clock = [1000.0]
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"requests_per_minute": 1, "tokens_per_minute": 10, "per": "global"}]}),
                  token_windows=TokenWindows(lambda: clock[0]))
    assert quota.admit(caller) is None
    quota.charge(caller, 100, None)
    clock[0] += 30  # the tokens leave their window in 30 s, the request its own in a minute
    refused = quota.admit(caller)
    assert refused.rule == "requests_per_minute" and refused.retry_after >= 59
    store.close()


def test_a_full_token_window_stays_full_for_a_minute_whatever_the_clock_minute() -> None:
    """The window was `limits`' sliding window counter, by clock minutes: filled before a
    minute's end, it admitted calls again as the next began, and charged a call past the
    limit only what was left, so a client went on past a limit of 30 tokens a minute with a
    500-token call every few seconds. Every token charged counts for a minute."""
    clock = [1000.0]
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"tokens_per_minute": 30, "per": "client"}]}),
                  token_windows=TokenWindows(lambda: clock[0]))
    caller = Caller(None, "127.0.0.1")
    assert quota.admit(caller) is None
    quota.charge(caller, 38, None)
    for elapsed, wait in ((1, 59), (2.5, 58), (59.5, 1)):  # whole seconds, up
        clock[0] = 1000.0 + elapsed
        refused = quota.admit(caller)
        assert refused is not None and refused.rule == "tokens_per_minute" and refused.retry_after == wait
    clock[0] = 1060.0
    assert quota.admit(caller) is None  # the 38 tokens have left the window
    quota.charge(caller, 500, None)  # a call past the limit is charged whole...
    clock[0] = 1119.0
    assert quota.admit(caller).retry_after == 1  # ...and the next waits the minute out
    clock[0] = 1120.5
    assert quota.admit(caller) is None
    assert not quota.token_windows._charges  # a window with nothing in it is let go


def test_a_budget_that_holds_nothing_checks_spend_alone(tmp_path: Path) -> None:
    """`hold_in_flight: false`: near its limit more calls run at once (a worst-case hold of a
    long agent call held several times what it cost: a review), and a burst can pass it."""
    policy = PolicyConfig.model_validate({"budgets": [{"usd_per_day": 0.01, "per": "global", "hold_in_flight": False}]})
    quota = Quota(policy, spend=SpendStore(tmp_path / "spend.sqlite"))
    caller = Caller("k", "c")
    assert all(quota.admit(caller, f"call-{n}", 0.02) is None for n in range(3)) and quota.holds.calls() == 0
    quota.charge(caller, 10, 0.01)
    assert quota.admit(caller, "call-4", 0.0).rule == "usd_per_day"


def test_a_hold_no_end_gave_back_is_let_go() -> None:
    holds = Holds()
    holds.hold("a", ("global",), 1.0)
    holds.hold("b", ("global", "client:c"), 2.0)
    holds.expire(time.monotonic() + HOLD_SECONDS / 2)
    assert holds.held("global") == 3.0
    holds.expire(time.monotonic() + HOLD_SECONDS + 1)
    assert holds.held("global") == 0 and holds.held("client:c") == 0 and holds.calls() == 0


def test_without_a_budget_nothing_is_held() -> None:
    quota = Quota(PolicyConfig.model_validate({"rate_limits": [{"requests_per_minute": 5, "per": "global"}]}))
    assert quota.admit(Caller("k", "c"), "call", 1.0) is None and quota.holds.calls() == 0


def test_a_keys_spend_under_its_former_fingerprint_still_counts(tmp_path: Path) -> None:
    """Fingerprints grew from 8 hex digits to 16: a key's spend kept under the old one is
    its own still, or an upgrade would give every spent budget a fresh start (a review)."""
    policy = PolicyConfig.model_validate({"budgets": [{"usd_per_day": 0.01, "per": "api_key"}]})
    store = SpendStore(tmp_path / "spend.sqlite")
    Quota(policy, spend=store).charge(Caller("sk-proj-…a1b2#3f9c2e1d", "c"), 10, 0.012)  # as an older proxy kept it
    quota = Quota(policy, spend=store)
    assert wait_for(lambda: quota.admit(Caller("sk-proj-…a1b2#3f9c2e1d07b4a6c5", "c")) is not None)
    assert quota.admit(Caller("sk-proj-…a1b2#3f9c2e1e07b4a6c5", "c")) is None  # another key
    store.close()


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_spend_is_kept_while_another_process_holds_the_files_lock(tmp_path: Path) -> None:
    """A second proxy or a shell in a transaction: the charge waited SQLite's 5 s on the
    proxy's loop and was then lost (found by a limits probe)."""
    path = tmp_path / "spend.sqlite"
    store = SpendStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    store.add("global", 0.25)
    assert store.total("global", "day") == 0.25  # counted at once, for the next check
    time.sleep(2 * SpendStore.REFRESH_SECONDS)
    assert store.total("global", "day") == 0.25  # still pending, not dropped by a read of the file
    holder.execute("ROLLBACK")
    assert wait_for(lambda: holder.execute("SELECT usd FROM spend WHERE scope = 'global'").fetchall() == [(0.25,), (0.25,)])
    store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it names keys' fingerprints


def locked_spend_file(path: Path, usd: float) -> sqlite3.Connection:
    """A spend file holding `usd` of global spend, and another connection holding its write
    lock (a second proxy writing, a shell in a transaction): ROLLBACK on it lets go."""
    store = SpendStore(path)
    store.add("global", usd)
    store.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_a_spend_file_locked_at_start_is_opened_and_written_once_free(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holding the file's write lock as the proxy starts (a second proxy
    writing, a shell in a transaction) stopped mitmdump: the check that the file is writable
    took the lock for a read-only file. It opens with the totals the file holds, and its
    charges wait for the lock."""
    path = tmp_path / "spend.sqlite"
    holder = locked_spend_file(path, 1.5)
    store = SpendStore(path)
    assert store.total("global", "day") == 1.5
    assert "is locked by another process" in caplog.text
    store.add("global", 0.25)
    holder.execute("ROLLBACK")
    assert wait_for(lambda: holder.execute("SELECT usd FROM spend WHERE scope = 'global'").fetchall() == [(1.75,), (1.75,)])
    store.close()


def test_a_spend_file_made_elsewhere_and_locked_at_start_is_waited_for(tmp_path: Path) -> None:
    """A file in SQLite's default journal mode, without the table, held locked as the proxy
    starts: setting it up needs the lock once, and is waited for (a review: it failed at once)."""
    import threading

    path = tmp_path / "spend.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(1.0, lambda: holder.execute("ROLLBACK")).start()
    store = SpendStore(path)
    store.add("global", 0.5)
    assert wait_for(lambda: holder.execute("SELECT usd FROM spend WHERE scope = 'global'").fetchall() == [(0.5,), (0.5,)])
    store.close()


def test_charges_waiting_for_a_locked_file_are_one_entry_a_scope(tmp_path: Path) -> None:
    """A file that cannot be written for long held two entries a call, each retry rewriting
    them all (a review): they are summed by period and scope."""
    path = tmp_path / "spend.sqlite"
    store = SpendStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(1000):
            store.add("global", 0.001)
        assert len(store._pending) <= 2 * len(PERIODS)  # the day's and month's: at most a round's worth in flight
    finally:
        holder.execute("ROLLBACK")
    assert wait_for(lambda: holder.execute("SELECT round(usd, 6) FROM spend WHERE scope = 'global'").fetchall() == [(1.0,), (1.0,)])
    store.close()


def test_a_spend_file_deleted_under_the_store_is_made_again_with_its_totals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cleanup of the trace folder took the file: charges went on into a file no one read,
    and a restart found the day's budget fresh (a review)."""
    path = tmp_path / "spend.sqlite"

    def in_file(query: str) -> list[tuple[float, ...]]:
        try:  # the store may be making the file again right now
            return sqlite3.connect(path).execute(query).fetchall() if path.exists() else []
        except sqlite3.Error:
            return []

    store = SpendStore(path)
    store.add("global", 0.75)
    assert wait_for(lambda: in_file("SELECT count(*) FROM spend") == [(2,)])
    for leftover in tmp_path.glob("spend.sqlite*"):
        leftover.unlink()
    store.add("global", 0.25)
    assert wait_for(lambda: in_file("SELECT usd FROM spend WHERE scope = 'global' AND period LIKE 'day:%'") == [(1.0,)], seconds=10)
    store.close()
    assert "was deleted or replaced" in caplog.text
    assert SpendStore(path).total("global", "day") == 1.0  # a restart sees the day's spend
    # two proxies sharing the file each put back the same totals: at most, not added (a review: they doubled)
    first, second = SpendStore(path), SpendStore(path)
    try:
        first.add("shared", 1.0)
        second.add("shared", 2.0)
        assert wait_for(lambda: first.total("shared", "day") == second.total("shared", "day") == 3.0)
        for leftover in tmp_path.glob("spend.sqlite*"):
            leftover.unlink()
        assert wait_for(lambda: in_file("SELECT usd FROM spend WHERE scope = 'shared' AND period LIKE 'day:%'") == [(3.0,)], seconds=10)
        time.sleep(3 * SpendStore.REFRESH_SECONDS)
        assert in_file("SELECT usd FROM spend WHERE scope = 'shared' AND period LIKE 'day:%'") == [(3.0,)]
        assert first.total("shared", "day") == second.total("shared", "day") == 3.0
    finally:
        first.close()
        second.close()


def test_a_spend_file_that_can_only_be_read_is_refused(tmp_path: Path) -> None:
    """SQLite opens a file it may not write to read only, and every charge was lost at the
    next restart (a review: taken, with a warning). Root may write any file, so the file is
    opened read-only here as SQLite would have."""
    from llm_mitm.spend import check_writable

    path = tmp_path / "spend.sqlite"
    SpendStore(path).close()
    check_writable(sqlite3.connect(path, isolation_level=None))
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        check_writable(sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None))


def test_proxies_sharing_a_spend_file_see_each_others_spend(tmp_path: Path) -> None:
    first, second = SpendStore(tmp_path / "spend.sqlite"), SpendStore(tmp_path / "spend.sqlite")
    try:
        first.add("global", 1.5)
        assert wait_for(lambda: second.total("global", "month") == 1.5)
        second.add("global", 0.5)
        assert second.total("global", "month") == 2.0
        assert wait_for(lambda: first.total("global", "month") == 2.0)
    finally:
        first.close()
        second.close()


def test_period_ends() -> None:
    assert seconds_left("day", datetime(2026, 11, 25, 23, 59, 0, tzinfo=UTC)) == 60
    assert seconds_left("month", datetime(2026, 12, 31, 23, 0, 0, tzinfo=UTC)) == 3600


def test_stats_table() -> None:
    stats = UsageStats()
    stats.add(("k1", "gpt-4o", 10, 5, 0.5, False, False))
    stats.add(("k1", "gpt-4o", 10, 5, 0.25, True, False))
    stats.add(("k2", "claude-x", None, None, None, False, True))
    table = stats.table()
    assert "k1" in table and "gpt-4o" in table and "0.750000" in table
    assert "3 calls (1 errors, 1 blocked)" in stats.summary() and "$0.7500" in stats.summary()


def test_refusal_shapes() -> None:
    openai = refusal("openai", 403, "model_not_allowed", "model 'x' is not allowed")
    assert openai.status == 403
    assert orjson.loads(openai.body) == {"error": {"message": "llm-mitm answered this request itself (model_not_allowed): model 'x' is not allowed", "type": "policy_violation", "code": "model_not_allowed", "param": None}}
    anthropic = refusal("anthropic", 429, "requests_per_minute", "slow down", retry_after=12)
    body = orjson.loads(anthropic.body)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert anthropic.headers["retry-after"] == "12"


def test_a_models_maximum_output_is_shipped_and_kept_under_a_configured_price() -> None:
    """What a call naming no output limit holds: its model's maximum, from the shipped table;
    a config that prices a shipped model anew keeps it unless it names its own."""
    assert PriceTable().price("gpt-4o-2024-08-06").max_output_tokens == 16384
    assert PriceTable().price("claude-sonnet-4-5@20250929").max_output_tokens == 64000
    repriced = PriceTable({"GPT-4o": ModelPrice(input=1, output=2)}).price_for("gpt-4o", None)
    assert (repriced.input, repriced.max_output_tokens) == (1, 16384)
    assert PriceTable({"gpt-4o": ModelPrice(input=1, output=2, max_output_tokens=100)}).price("gpt-4o").max_output_tokens == 100
    assert PriceTable({"my-model": ModelPrice(input=1, output=2)}).price("my-model").max_output_tokens is None
    # a configured snapshot's or Vertex name's, and an Azure deployment priced by its name (a review: each held no output)
    dated = PriceTable({"gpt-4o-2024-08-06": ModelPrice(input=1, output=2), "claude-sonnet-4-5@20250929": ModelPrice(input=1, output=2)})
    assert dated.max_output_tokens("gpt-4o-2024-08-06", None) == 16384 and dated.max_output_tokens("claude-sonnet-4-5@20250929", None) == 64000
    deployment = PriceTable({"my-gpt4o": ModelPrice(input=1, output=2)})
    assert deployment.max_output_tokens("my-gpt4o", None) is None  # not known until it answers
    assert deployment.max_output_tokens("my-gpt4o", "gpt-4o-2024-08-06") == 16384
    generating = [name for name in shipped_table()[1] if not name.startswith(("text-embedding", "omni-moderation"))]
    assert all(shipped_table()[1][name].max_output_tokens for name in generating)


def test_a_call_naming_no_output_limit_is_held_at_its_models_maximum() -> None:
    route = route_for(Provider("openai", "openai", upgrade_http=True), "/v1/chat/completions")
    assert output_limit(route, {"messages": []}) is None
    assert output_limit(route, {"messages": []}, 16384) == 16384
    assert output_limit(route, {"messages": [], "n": 3}, 16384) == 3 * 16384
    assert output_limit(route, {"messages": [], "max_tokens": 10}, 16384) == 10  # a limit named wins
