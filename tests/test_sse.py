"""Incremental SSE decoding and per-API rebuilds."""

from __future__ import annotations

import copy
import gzip
import json
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_mitm.sse import (
    AnthropicRebuilder,
    ChatCompletionsRebuilder,
    ResponsesRebuilder,
    ServerSentEvent,
    SSEDecoder,
    StreamTap,
    rebuilder_for,
)
from tests.support.fake_provider import _Encoder


def through(tap: StreamTap, *chunks: bytes) -> bytes:
    """What the client receives for these chunks. A chunk that leaves nothing to pass on
    must come out as no chunks: an empty one would end a chunked HTTP/1.1 body."""
    out = b""
    for chunk in chunks:
        sent = tap(chunk)
        if isinstance(sent, list):
            out += b"".join(sent)
        else:
            assert sent or not chunk, "an empty chunk for a non-empty one"
            out += sent
    return out


def sse(events: list[tuple[str | None, object]], newline: str = "\n") -> bytes:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}{newline}" if name else "") + f"data: {text}{newline}{newline}")
    return "".join(out).encode()


CHAT = [
    (None, {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    (None, {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
    (None, {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo é"}}]}),
    (None, {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
    (None, {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]}),
    (None, {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]}),
    (None, {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    (None, {"id": "c1", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}),
    (None, "[DONE]"),
]


def rebuild(rebuilder, data: bytes, pieces: list[bytes] | None = None, encoding: str = ""):
    tap = StreamTap(rebuilder, encoding)
    for piece in pieces if pieces is not None else [data]:
        assert tap(piece) is piece
    tap(b"")
    assert tap.failed is None
    return rebuilder


def check_chat(rebuilder: ChatCompletionsRebuilder) -> None:
    body = rebuilder.result()
    message = body["choices"][0]["message"]
    assert message["content"] == "Hello é"
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["total_tokens"] == 15
    assert body["model"] == "gpt-4o-2024-08-06"
    assert rebuilder.events == 9


def test_chat_rebuild_whole() -> None:
    check_chat(rebuild(ChatCompletionsRebuilder(), sse(CHAT)))


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_chat_rebuild_split_at_every_byte(newline: str) -> None:
    data = sse(CHAT, newline)
    for cut in range(1, len(data)):
        check_chat(rebuild(ChatCompletionsRebuilder(), data, [data[:cut], data[cut:]]))


def test_chat_rebuild_one_byte_at_a_time() -> None:
    data = sse(CHAT, "\r\n")
    check_chat(rebuild(ChatCompletionsRebuilder(), data, [data[i : i + 1] for i in range(len(data))]))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_streams_are_decoded_incrementally(encoding: str) -> None:
    encoder = _Encoder(encoding)
    pieces = [encoder.piece(sse([event])) for event in CHAT] + [encoder.end()]
    check_chat(rebuild(ChatCompletionsRebuilder(), b"", [p for p in pieces if p], encoding))


def test_raw_deflate_is_accepted() -> None:
    obj = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = obj.compress(sse(CHAT)) + obj.flush()
    check_chat(rebuild(ChatCompletionsRebuilder(), data, [data[:7], data[7:]], "deflate"))


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS])
def test_deflate_whose_first_chunk_is_one_byte_is_read(wbits: int) -> None:
    """Wrapped or raw is told by the first two bytes; told by one, a zlib stream was read as
    raw and its usage lost (a usage probe)."""
    obj = zlib.compressobj(wbits=wbits)
    data = obj.compress(sse(CHAT)) + obj.flush()
    check_chat(rebuild(ChatCompletionsRebuilder(), data, [data[:1], data[1:2], data[2:]], "deflate"))


def test_malformed_events_are_counted_not_fatal() -> None:
    data = b"data: {not json\n\n" + b": comment\n\n" + b"data: [1,2]\n\n" + sse(CHAT)
    rebuilder = rebuild(ChatCompletionsRebuilder(), data)
    assert rebuilder.malformed == 2
    assert rebuilder.result()["choices"][0]["message"]["content"] == "Hello é"


def test_multiline_data_and_missing_final_blank_line() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b'event: x\ndata: {"a":\ndata: 1}\n\ndata: tail')
    events += decoder.flush()
    assert [(e.event, e.data) for e in events] == [("x", '{"a":\n1}'), ("message", "tail")]


def test_legacy_completions_stream() -> None:
    events = [(None, {"id": "c", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "ab"}]}),
              (None, {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "cd", "finish_reason": "stop"}]})]
    body = rebuild(ChatCompletionsRebuilder(), sse(events)).result()
    assert body["choices"] == [{"index": 0, "text": "abcd", "finish_reason": "stop"}]


RESPONSES_FINAL = {"id": "r1", "object": "response", "status": "completed", "model": "gpt-4o-2024-08-06",
                   "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there"}]}],
                   "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}
RESPONSES = [
    ("response.created", {"type": "response.created", "response": {"id": "r1", "status": "in_progress", "model": "gpt-4o-2024-08-06", "output": []}}),
    ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "role": "assistant", "content": []}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "Hi "}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "there"}),
    ("response.output_item.added", {"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call", "name": "f", "call_id": "c"}}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": '{"x":1}'}),
    ("response.completed", {"type": "response.completed", "response": RESPONSES_FINAL}),
]


def test_responses_final_event_wins() -> None:
    rebuilder = rebuild(ResponsesRebuilder(), sse(RESPONSES))
    assert rebuilder.result() == RESPONSES_FINAL
    assert rebuilder.usage["total_tokens"] == 5


def test_responses_cut_short_keeps_the_deltas() -> None:
    rebuilder = rebuild(ResponsesRebuilder(), sse(RESPONSES[:-1]))
    body = rebuilder.result()
    assert body["status"] == "incomplete"  # not what `response.created` said: it never finished
    assert body["output"][0]["content"] == [{"type": "output_text", "text": "Hi there"}]
    assert body["output"][1]["arguments"] == '{"x":1}'


ANTHROPIC = [
    ("message_start", {"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Bon"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "jour"}}),
    ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"a": '}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "[1]}"}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 42}}),
    ("message_stop", {"type": "message_stop"}),
]


def test_anthropic_rebuild() -> None:
    rebuilder = rebuild(AnthropicRebuilder(), sse(ANTHROPIC))
    body = rebuilder.result()
    assert body["content"] == [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Bonjour"},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": [1]}},
    ]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"] == {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 42}


def test_anthropic_usage_counts_are_running_totals() -> None:
    """message_delta's counts never lower message_start's: a compatible server that sends
    0 for the input it does not repeat does not erase it (an audit); a larger one wins."""
    start = ANTHROPIC[0][1]["message"]["usage"]
    zeros = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 300}
    events = [*ANTHROPIC[:-2], ("message_delta", {"type": "message_delta", "delta": {}, "usage": zeros}), ANTHROPIC[-1]]
    assert rebuild(AnthropicRebuilder(), sse(events)).result()["usage"] == {**start, "cache_creation_input_tokens": 0, "output_tokens": 300}
    grown = {"input_tokens": 25, "output_tokens": 300, "server_tool_use": {"web_search_requests": 1}}
    events = [*ANTHROPIC[:-2], ("message_delta", {"type": "message_delta", "delta": {}, "usage": grown}), ANTHROPIC[-1]]
    assert rebuild(AnthropicRebuilder(), sse(events)).result()["usage"] == {**start, **grown}


def test_anthropic_mcp_tool_input_and_citations_after_a_null_start() -> None:
    """An MCP tool call's input is rebuilt as a tool_use's is; a text block that starts
    with `"citations": null` (the SDK accepts it) keeps the citations its deltas bring."""
    citation = {"type": "char_location", "cited_text": "c", "document_index": 0, "start_char_index": 0, "end_char_index": 1}
    events = [
        ANTHROPIC[0],
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "citations": None}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": citation}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Yes"}}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "mcp_tool_use", "id": "m1", "name": "search", "server_name": "docs", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"q": "x"}'}}),
        *ANTHROPIC[-2:],
    ]
    rebuilder = rebuild(AnthropicRebuilder(), sse(events))
    assert rebuilder.malformed == 0
    assert rebuilder.result()["content"] == [
        {"type": "text", "text": "Yes", "citations": [citation]},
        {"type": "mcp_tool_use", "id": "m1", "name": "search", "server_name": "docs", "input": {"q": "x"}},
    ]


def test_parallel_tool_calls_without_an_index_stay_apart() -> None:
    """Gemini's OpenAI-compatible API sends tool call deltas without `index`: each new id
    is a call of its own, a delta with none continues the last."""
    def call(**fields: object) -> tuple[None, dict]:
        return (None, {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [fields]}}]})

    events = [CHAT[0], call(id="f1", type="function", function={"name": "get_weather", "arguments": '{"location":'}),
              call(function={"arguments": '"Sydney"}'}), call(id="f2", type="function", function={"name": "get_time", "arguments": '{"tz":"AEST"}'}),
              call(id="f1", function={"arguments": ""}), *CHAT[-3:]]
    calls = rebuild(ChatCompletionsRebuilder(), sse(events)).result()["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f1", "get_weather", '{"location":"Sydney"}'), ("f2", "get_time", '{"tz":"AEST"}')]


def test_a_function_call_and_an_audio_answer_are_rebuilt_from_their_pieces() -> None:
    """Chat's deprecated `function_call` and an audio answer's `audio` come in pieces as tool
    calls do; they were left out of the rebuilt answer (a usage probe)."""
    def delta(**fields: object) -> tuple[None, dict]:
        return (None, {"id": "c1", "choices": [{"index": 0, "delta": fields}]})

    events = [delta(role="assistant", content=None, function_call={"name": "get_weather", "arguments": ""}),
              delta(function_call={"arguments": '{"city":'}), delta(function_call={"arguments": '"Paris"}'}),
              (None, {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "function_call"}]}), (None, "[DONE]")]
    message = rebuild(ChatCompletionsRebuilder(), sse(events)).result()["choices"][0]["message"]
    assert message["function_call"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    events = [delta(role="assistant", audio={"id": "audio_1", "transcript": "Hello "}), delta(audio={"data": "AAAA", "transcript": "world"}),
              delta(audio={"data": "BBBB", "expires_at": 1700000000}), (None, "[DONE]")]
    message = rebuild(ChatCompletionsRebuilder(), sse(events)).result()["choices"][0]["message"]
    assert message["audio"] == {"id": "audio_1", "transcript": "Hello world", "data": "AAAABBBB", "expires_at": 1700000000}


@pytest.mark.parametrize(("operation", "events", "answer", "usage"), [
    ("audio", [(None, {"type": "transcript.text.delta", "delta": "Hel"}), (None, {"type": "transcript.text.delta", "delta": "lo"}),
               (None, {"type": "transcript.text.done", "text": "Hello", "usage": {"type": "tokens", "input_tokens": 50, "output_tokens": 3,
                                                                                  "total_tokens": 53, "input_token_details": {"audio_tokens": 50}}})],
     {"text": "Hello"}, {"input_tokens": 50, "output_tokens": 3, "audio_input_tokens": 50}),
    ("images", [(None, {"type": "image_generation.partial_image", "b64_json": "AA", "partial_image_index": 0}),
                (None, {"type": "image_generation.completed", "b64_json": "BB", "usage": {"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170}})],
     {"b64_json": "BB"}, {"input_tokens": 10, "output_tokens": 4160}),
    ("threads", [("thread.run.created", {"id": "run_1", "object": "thread.run", "status": "queued", "model": "gpt-4o", "usage": None}),
                 ("thread.run.step.completed", {"id": "step_1", "object": "thread.run.step", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
                 ("thread.message.delta", {"id": "msg_1", "delta": {"content": [{"index": 0, "type": "text", "text": {"value": "Hi"}}]}}),
                 ("thread.message.completed", {"id": "msg_1", "object": "thread.message", "role": "assistant", "content": [{"type": "text", "text": {"value": "Hi"}}]}),
                 ("thread.run.completed", {"id": "run_1", "object": "thread.run", "status": "completed", "model": "gpt-4o",
                                           "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
                 ("done", "[DONE]")],
     {"id": "run_1", "status": "completed", "messages": [{"id": "msg_1", "object": "thread.message", "role": "assistant", "content": [{"type": "text", "text": {"value": "Hi"}}]}]},
     {"input_tokens": 5, "output_tokens": 2}),
])
def test_the_other_operations_streams_end_with_their_answer(operation: str, events: list, answer: dict, usage: dict) -> None:
    """A streamed transcription, image or Assistants run was read as chat chunks: traced as
    cut short, its answer none (a usage probe)."""
    from llm_mitm.exchange import read_stream

    tap = StreamTap(rebuilder_for("openai", operation), "")
    tap(sse(events))
    body, outcome = read_stream("openai", 200, tap)
    assert outcome.error is None and outcome.ended
    assert answer.items() <= body.json.items()
    assert outcome.usage is not None and usage.items() <= outcome.usage.as_dict().items()
    cut = StreamTap(rebuilder_for("openai", operation), "")
    cut(sse(events[:-1]))
    assert read_stream("openai", 200, cut)[1].error is not None  # short of its last event: cut short


def test_a_streams_logprobs_and_filter_results_are_kept_and_replayed() -> None:
    """A stream's logprobs come a token or two per chunk: the rebuilt answer kept none, and a
    replay of it gave the client none (a streaming probe). Azure's content filter results
    are kept as they last stood, not emptied by its last chunk."""
    from llm_mitm.replay import Recorded, as_stream

    def chat_chunk(delta: dict, tokens: list[str] | None, finish: str | None = None, **more: object) -> tuple[None, dict]:
        logprobs = {"content": [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens], "refusal": None} if tokens else None
        return None, {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o",
                      "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **more}]}

    filtered = {"hate": {"filtered": False, "severity": "safe"}}
    events = [chat_chunk({"role": "assistant", "content": ""}, None), chat_chunk({"content": "Hel"}, ["Hel"], content_filter_results=filtered),
              chat_chunk({"content": "lo!"}, ["lo", "!"]), chat_chunk({}, None, "stop", content_filter_results={}), (None, "[DONE]")]
    choice = rebuild(ChatCompletionsRebuilder(), sse(events)).result()["choices"][0]
    assert [item["token"] for item in choice["logprobs"]["content"]] == ["Hel", "lo", "!"] and choice["logprobs"]["refusal"] is None
    assert choice["content_filter_results"] == filtered and choice["message"]["content"] == "Hello!"
    replayed = rebuild(ChatCompletionsRebuilder(), as_stream(Recorded("openai", "chat.completions", 200, {"object": "chat.completion", "choices": [choice]}), False))
    assert replayed.result()["choices"][0]["logprobs"] == choice["logprobs"]
    legacy = [(None, {"id": "cmpl", "object": "text_completion", "model": "gpt-3.5-turbo-instruct",
                      "choices": [{"index": 0, "text": text, "finish_reason": None,
                                   "logprobs": {"tokens": [text], "token_logprobs": [-0.1], "top_logprobs": [{text: -0.1}], "text_offset": [offset]}}]})
              for text, offset in (("Hel", 0), ("lo", 3))] + [(None, "[DONE]")]
    logprobs = rebuild(ChatCompletionsRebuilder(), sse(legacy)).result()["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.1, -0.1], "top_logprobs": [{"Hel": -0.1}, {"lo": -0.1}], "text_offset": [0, 3]}


def test_a_gemini_stream_is_rebuilt_candidate_by_candidate() -> None:
    """Gemini's own API streamed through a gateway (`alt=sse`): each event the next parts
    of each candidate, no [DONE]; ended when every candidate it began has finished."""
    from llm_mitm.exchange import read_stream

    def chunk(index: int, *parts: dict, finish: str | None = None, usage: dict | None = None) -> tuple[None, dict]:
        candidate = {"content": {"parts": list(parts), "role": "model"}, "index": index, **({"finishReason": finish} if finish else {})}
        return None, {"candidates": [candidate], "modelVersion": "gemini-2.5-flash", "responseId": "r1", **({"usageMetadata": usage} if usage else {})}

    usage = {"promptTokenCount": 9, "candidatesTokenCount": 6, "thoughtsTokenCount": 3, "totalTokenCount": 18}
    events = [chunk(0, {"text": "Thinking...", "thought": True}), chunk(0, {"text": "Hel"}), chunk(1, {"text": "Other"}),
              chunk(0, {"text": "lo"}, {"functionCall": {"name": "f", "args": {"q": 1}}}), chunk(1, {"text": " one"}, finish="STOP"),
              chunk(0, {"text": "!"}, finish="STOP", usage=usage)]
    tap = StreamTap(rebuilder_for("openai", "generate_content"), "")
    tap(sse(events))
    body, outcome = read_stream("openai", 200, tap)
    assert outcome.error is None and outcome.ended and outcome.response_model == "gemini-2.5-flash"
    first, second = body.json["candidates"]
    assert first["content"] == {"parts": [{"text": "Thinking...", "thought": True}, {"text": "Hello"}, {"functionCall": {"name": "f", "args": {"q": 1}}},
                                          {"text": "!"}], "role": "model"}
    assert first["finishReason"] == "STOP" and second["content"]["parts"] == [{"text": "Other one"}]
    assert body.json["usageMetadata"] == usage and body.json["responseId"] == "r1"
    assert (outcome.usage.input_tokens, outcome.usage.output_tokens, outcome.usage.reasoning_tokens) == (9, 9, 3)
    cut = StreamTap(rebuilder_for("openai", "generate_content"), "")
    cut(sse(events[:-1]))  # the second candidate finished, the first did not
    assert read_stream("openai", 200, cut)[1].error is not None
    failed = StreamTap(rebuilder_for("openai", "generate_content"), "")
    failed(sse(events[:2] + [(None, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})]))
    assert "overloaded" in read_stream("openai", 200, failed)[1].error


def test_anthropic_error_event() -> None:
    rebuilder = rebuild(AnthropicRebuilder(), sse([("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})]))
    assert rebuilder.error == {"type": "overloaded_error", "message": "busy"}


def test_rebuilder_choice() -> None:
    assert isinstance(rebuilder_for("anthropic", "messages"), AnthropicRebuilder)
    assert isinstance(rebuilder_for("openai", "responses"), ResponsesRebuilder)
    assert isinstance(rebuilder_for("azure", "chat.completions"), ChatCompletionsRebuilder)
    assert isinstance(rebuilder_for("anthropic", "chat.completions"), ChatCompletionsRebuilder)  # its OpenAI-compatible endpoint


def test_tap_survives_a_broken_stream_and_passes_bytes() -> None:
    tap = StreamTap(ChatCompletionsRebuilder(), "gzip")
    garbage = b"\x00\x01not gzip at all"
    assert tap(garbage) is garbage
    assert tap.failed is not None
    assert tap(b"more") == b"more"


def test_unknown_encoding_passes_untouched() -> None:
    tap = StreamTap(ChatCompletionsRebuilder(), "compress")
    assert tap(b"data: x\n\n") == b"data: x\n\n"
    assert "unsupported" in (tap.failed or "")


def test_gzip_whole_body_in_one_piece() -> None:
    check_chat(rebuild(ChatCompletionsRebuilder(), gzip.compress(sse(CHAT)), encoding="gzip"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.sampled_from(["", "gzip", "br", "zstd"]))
def test_tap_never_changes_or_raises_on_arbitrary_bytes(chunks: list[bytes], encoding: str) -> None:
    for rebuilder in (ChatCompletionsRebuilder(), ResponsesRebuilder(), AnthropicRebuilder()):
        tap = StreamTap(rebuilder, encoding)
        for chunk in chunks:
            assert tap(chunk) == chunk
        tap.finish()
        rebuilder.result()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["type", "choices", "delta", "index", "usage", "message", "response", "content_block", "model", "output_index"]),
                                st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8), max_size=6), max_size=10))
def test_rebuilders_accept_arbitrary_json(events: list[dict]) -> None:
    data = sse([(None, e) for e in events])
    for rebuilder in (ChatCompletionsRebuilder(), ResponsesRebuilder(), AnthropicRebuilder()):
        tap = StreamTap(rebuilder)
        assert tap(data) == data
        tap.finish()
        assert tap.failed is None
        rebuilder.result()


def test_filter_drops_only_the_usage_chunk_and_keeps_every_other_byte() -> None:
    from llm_mitm.sse import is_usage_only_chunk

    data = sse(CHAT, "\r\n")
    usage_event = sse([CHAT[-2]], "\r\n")
    expected = data.replace(usage_event, b"")
    for cut in range(1, len(data), 7):
        rebuilder = ChatCompletionsRebuilder()
        tap = StreamTap(rebuilder)
        assert tap.drop_events(is_usage_only_chunk)
        out = through(tap, data[:cut], data[cut:], b"")
        assert out == expected
        assert tap.dropped == 1
        assert rebuilder.result()["usage"]["total_tokens"] == 15


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["\n", "\r\n", "\r"]), st.lists(st.integers(min_value=1, max_value=400), max_size=12), st.booleans())
def test_filter_whatever_the_chunks(newline: str, cuts: list[int], per_event: bool) -> None:
    """Whole-event chunks (the fast way), split events and mixed: only the usage chunk goes."""
    from llm_mitm.sse import is_usage_only_chunk

    data = sse(CHAT, newline)
    expected = data.replace(sse([CHAT[-2]], newline), b"")
    if per_event:
        chunks = [sse([event], newline) for event in CHAT]
    else:
        points = sorted({min(c * 7, len(data)) for c in cuts} | {0, len(data)})
        chunks = [data[a:b] for a, b in zip(points, points[1:])]
    rebuilder = ChatCompletionsRebuilder()
    tap = StreamTap(rebuilder)
    assert tap.drop_events(is_usage_only_chunk)
    out = through(tap, *chunks, b"")
    assert out == expected
    assert tap.dropped == 1
    assert rebuilder.result()["usage"]["total_tokens"] == 15


def test_filter_is_refused_on_a_compressed_stream() -> None:
    assert not StreamTap(ChatCompletionsRebuilder(), "gzip").drop_events(lambda p: True)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("per_event", [True, False])
def test_filter_failing_midway_gives_the_client_every_byte_once(newline: str, per_event: bool) -> None:
    class Failing(ChatCompletionsRebuilder):
        def add(self, event):  # type: ignore[no-untyped-def]
            if self.events == 2:
                raise RuntimeError("a rebuilder bug")
            return super().add(event)

    data = sse(CHAT, newline)
    tap = StreamTap(Failing())
    assert tap.drop_events(lambda payload: False)
    chunks = [sse([event], newline) for event in CHAT] if per_event else [data[:40], data[40:]]
    out = through(tap, *chunks, b"")
    assert out == data
    assert tap.failed is not None and "rebuilder bug" in tap.failed


def reference_events(data: bytes) -> list[tuple[str, str]]:
    """The WHATWG event-stream rules, the plain way, over the whole stream at once."""
    events, name, lines = [], "", []
    for line in data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line:
            if lines:
                events.append((name or "message", "\n".join(lines)))
            name, lines = "", []
            continue
        if line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            lines.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    if lines:
        events.append((name or "message", "\n".join(lines)))
    return events


_FIELD_LINES = st.sampled_from([b"data: {\"a\": 1}", b"data:x", b"data", b"data: ", b"event: delta", b": comment", b"id: 7", b"retry: 5",
                                b"data: two\ndata: lines", b"data: \xc3\xa9", b"\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_FIELD_LINES, min_size=1, max_size=3), max_size=8), st.sampled_from(["\n", "\r\n", "\r"]),
       st.lists(st.integers(min_value=0, max_value=300), max_size=10), st.booleans())
def test_decoder_whatever_the_chunks(events: list[list[bytes]], newline: str, cuts: list[int], per_event: bool) -> None:
    """Whole-event chunks (the quick way) or cut anywhere: the same events as the rules give."""
    eol = newline.encode()
    blocks = [eol.join(line.replace(b"\n", eol) for line in lines) + eol + eol for lines in events]
    data = b"".join(blocks)
    if per_event:
        chunks = blocks
    else:
        points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
        chunks = [data[a:b] for a, b in zip(points, points[1:])]
    decoder = SSEDecoder()
    decoded = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.flush()
    assert [(e.event, e.data) for e in decoded] == reference_events(data)


@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_held_stream_reads_later_as_it_would_have_passing(encoding: str) -> None:
    """A held tap keeps the chunks as they came and reads nothing until asked."""
    data = sse(CHAT)
    wire = gzip.compress(data) if encoding else data
    pieces = [wire[i : i + 13] for i in range(0, len(wire), 13)]
    rebuilder = ChatCompletionsRebuilder()
    tap = StreamTap(rebuilder, encoding, hold=True)
    assert through(tap, *pieces) == wire
    tap.finish()
    assert tap.held == pieces and rebuilder.events == 0 and tap.size == len(wire)
    tap.read_held()
    tap.finish()
    assert tap.held is None and tap.size == len(data)
    check_chat(rebuilder)


@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_held_stream_past_the_limit_is_read_from_then_on(encoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `HOLD_LIMIT` bytes the tap reads what it held and keeps nothing more: the same
    message as read from the start, and the memory of a rebuilt message, not of the stream."""
    import llm_mitm.sse

    data = sse(CHAT)
    wire = gzip.compress(data) if encoding else data
    pieces = [wire[i : i + 13] for i in range(0, len(wire), 13)]
    monkeypatch.setattr(llm_mitm.sse, "HOLD_LIMIT", 40)
    rebuilder = ChatCompletionsRebuilder()
    tap = StreamTap(rebuilder, encoding, hold=True)
    assert through(tap, *pieces[:3]) == b"".join(pieces[:3])
    assert tap.held == pieces[:3] and rebuilder.events == 0
    assert through(tap, *pieces[3:]) == b"".join(pieces[3:])
    assert tap.held is None and tap.hand_over() == []
    tap.finish()
    assert tap.size == len(data)
    check_chat(rebuilder)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["\n", "\r\n"]), st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_the_null_usage_asking_adds_is_taken_out_of_every_chunk(newline: str, cuts: list[int]) -> None:
    """With `include_usage`, OpenAI puts `"usage":null` in every chunk before the usage
    chunk: a client that did not ask gets the chunks without it, read without parsing
    (and text that only looks like it, inside a string, stays)."""
    from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk, strip_null_usage

    asked = [(name, {**copy.deepcopy(payload), "usage": None}) for name, payload in CHAT[:-2]]
    asked[0] = (asked[0][0], {"usage": None, **asked[0][1]})  # first, too, and in a string
    asked[1][1]["choices"][0]["delta"]["content"] = 'say ,"usage":null'
    data = sse([*asked, *CHAT[-2:]], newline)
    expected = sse([*[(name, {k: v for k, v in payload.items() if k != "usage"}) for name, payload in asked], CHAT[-1]], newline)
    points = sorted({min(c * 7, len(data)) for c in cuts} | {0, len(data)})
    read: list[dict] = []
    tap = StreamTap(ChatCompletionsRebuilder())
    assert tap.drop_events(lambda payload: read.append(payload) or is_usage_only_chunk(payload), USAGE_HINT, None, strip_null_usage)
    out = through(tap, *[data[a:b] for a, b in zip(points, points[1:])], b"")
    assert out == expected
    assert read == [CHAT[-2][1]] and tap.dropped == 1


@pytest.mark.parametrize(("event", "expected"), [
    (b'data: {"id":"a","choices":[],"usage":null}\n\n', b'data: {"id":"a","choices":[]}\n\n'),  # OpenAI's own form
    (b'data: {"usage": null, "id": "a"}\n\n', b'data: {"id": "a"}\n\n'),
    (b'data: {"id": "a" ,\t"usage" : null , "x": 1}\r\n\r\n', b'data: {"id": "a"  , "x": 1}\r\n\r\n'),
    (b'data: {"usage":null}\n\n', b'data: {"usage":null}\n\n'),  # no other key: left as it is
    # A line break inside an event separates its fields: never taken out with the key.
    (b'data: {"usage":null,\ndata: "id":"a"}\n\n', b'data: {\ndata: "id":"a"}\n\n'),
    (b'data: {"id":"a",\r\ndata: "usage":null}\r\n\r\n', b'data: {"id":"a",\r\ndata: "usage":null}\r\n\r\n'),
    (b'data: {"usage":null,\n\n', b'data: {\n\n'),  # malformed: its blank line stays, so the next event is apart
    (b'data: {"c":"x\\",\\"usage\\":null"}\n\n', b'data: {"c":"x\\",\\"usage\\":null"}\n\n'),  # in a string
])
def test_null_usage_is_taken_out_as_a_key_and_nothing_else(event: bytes, expected: bytes) -> None:
    from llm_mitm.sse import strip_null_usage

    assert strip_null_usage(event) == expected


def test_filter_reads_only_the_events_with_the_hint() -> None:
    from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk

    read: list[dict] = []

    def predicate(payload: dict) -> bool:
        read.append(payload)
        return is_usage_only_chunk(payload)

    data = sse(CHAT)
    tap = StreamTap(ChatCompletionsRebuilder(), hold=True)
    assert tap.drop_events(predicate, USAGE_HINT)
    out = through(tap, *[sse([e]) for e in CHAT], b"")
    assert out == data.replace(sse([CHAT[-2]]), b"")
    assert read == [CHAT[-2][1]] and tap.dropped == 1


def test_held_and_read_agree_on_a_compressed_stream_that_breaks() -> None:
    """Held chunks are read one by one as they came: a gzip stream whose checksum is wrong
    keeps every event before it, as when read as it passed (zlib raises, and a decompressor
    fed everything at once gives nothing)."""
    words = [(None, {"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": f"w{n} "}}]}) for n in range(2000)]
    data = gzip.compress(sse(words))
    body = data[:-8]
    pieces = [body[i : i + 256] for i in range(0, len(body), 256)] + [bytes(8)]  # the trailer: CRC and size zeroed
    rebuilt = []
    for hold in (False, True):
        rebuilder = ChatCompletionsRebuilder()
        tap = StreamTap(rebuilder, "gzip", hold=hold)
        assert through(tap, *pieces) == b"".join(pieces)
        tap.read_held()
        tap.finish()
        assert tap.failed is not None
        rebuilt.append((rebuilder.events, rebuilder.result(), tap.size))
    assert rebuilt[0] == rebuilt[1] and rebuilt[0][0] == 2000


@pytest.mark.parametrize("hold", [False, True])
def test_a_failing_filter_stops_filtering_not_the_rebuild(hold: bool) -> None:
    def broken(payload: dict) -> bool:
        raise RuntimeError("a filter bug")

    data = sse(CHAT)
    for chunks in ([sse([event]) for event in CHAT], [data[:50], data[50:]]):
        rebuilder = ChatCompletionsRebuilder()
        tap = StreamTap(rebuilder, hold=hold)
        told: list[str] = []
        assert tap.drop_events(broken, on_failure=told.append)
        assert through(tap, *chunks, b"") == data
        tap.read_held()
        tap.finish()
        assert tap.failed is None and told == ["RuntimeError: a filter bug"]
        check_chat(rebuilder)


def test_a_handed_over_stream_keeps_nothing_that_comes_later() -> None:
    tap = StreamTap(ChatCompletionsRebuilder(), hold=True)
    first = sse(CHAT[:2])
    assert tap(first) == first
    assert tap.hand_over() == [first]
    late = sse(CHAT[2:])
    assert tap(late) == late
    assert tap.held is None and tap.rebuilder.events == 0 and tap.hand_over() == []


def test_filter_with_crlf_cut_at_every_byte() -> None:
    """A cut between the CR and LF of an event's end, and events of several data lines:
    still exactly the usage event left out."""
    from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk

    usage = (None, '{"choices": [],\r\ndata: "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}')
    events = [*CHAT[:-2], (None, '{"id": "c1",\r\ndata: "choices": []}'), usage, CHAT[-1]]
    data = sse(events, "\r\n")
    expected = data.replace(sse([usage], "\r\n"), b"")
    for cut in range(1, len(data)):
        rebuilder = ChatCompletionsRebuilder()
        tap = StreamTap(rebuilder)
        assert tap.drop_events(is_usage_only_chunk, USAGE_HINT)
        assert through(tap, data[:cut], data[cut:], b"") == expected, cut
        assert tap.dropped == 1 and rebuilder.result()["usage"]["total_tokens"] == 15


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_filter_fed_one_byte_at_a_time(newline: str) -> None:
    """The search for an event's end resumes where the last chunk ended (a large event is
    not rescanned for each of its chunks): an end that arrives a byte at a time is found."""
    from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk

    long = (None, {"choices": [{"index": 0, "delta": {"content": "x" * 5000}}]})
    events = [CHAT[0], long, *CHAT[1:]]
    data = sse(events, newline)
    rebuilder = ChatCompletionsRebuilder()
    tap = StreamTap(rebuilder)
    assert tap.drop_events(is_usage_only_chunk, USAGE_HINT)
    out = bytearray()
    for offset in range(len(data)):
        piece = tap(data[offset : offset + 1])
        out += piece if isinstance(piece, bytes) else b"".join(piece)
        if data[: offset + 1].endswith(sse([long], newline)):
            assert out.endswith(sse([long], newline))  # passed on once whole (a CR-only end: at the next byte)
    out += through(tap, b"")
    assert bytes(out) == data.replace(sse([CHAT[-2]], newline), b"")
    assert tap.dropped == 1 and rebuilder.result()["choices"][0]["message"]["content"].startswith("x" * 5000)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_filter_passes_each_whole_event_on_as_it_comes(newline: str) -> None:
    """No event waits for the next chunk, whatever the line ends (CR-only streams too)."""
    from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk

    tap = StreamTap(ChatCompletionsRebuilder())
    assert tap.drop_events(is_usage_only_chunk, USAGE_HINT)
    for event in CHAT:
        chunk = sse([event], newline)
        usage_only = isinstance(event[1], dict) and is_usage_only_chunk(event[1])
        assert through(tap, chunk) == (b"" if usage_only else chunk)
    assert through(tap, b"") == b"" and tap.dropped == 1


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
@pytest.mark.parametrize("together", [False, True])
def test_a_stream_of_several_frames_is_read_to_its_end(together: bool, encoding: str) -> None:
    """A frame (zstd) or member (gzip) each flush: usage after the first was lost (a probe)."""
    frames = []
    for event in CHAT:
        encoder = _Encoder(encoding)
        frames.append(encoder.piece(sse([event])) + encoder.end())
    check_chat(rebuild(ChatCompletionsRebuilder(), b"".join(frames), [b"".join(frames)] if together else frames, encoding))
    padded = [*frames, b"\0" * 8, b"\0" * 4]  # zeros after the last member, which gzip readers skip
    check_chat(rebuild(ChatCompletionsRebuilder(), b"".join(padded), padded, encoding)) if encoding == "gzip" else None


def test_azure_empty_head_is_not_the_streams_head() -> None:
    """Azure's first event carries its prompt filter results, with id, model and created empty."""
    filters = (None, {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": []})
    body = rebuild(ChatCompletionsRebuilder(), sse([filters, *CHAT])).result()
    assert body["id"] == "c1" and body["model"] == "gpt-4o-2024-08-06" and body["object"] == "chat.completion"
    no_fingerprint = [(None, {**payload, "system_fingerprint": None} if isinstance(payload, dict) else payload) for _, payload in CHAT]
    assert rebuild(ChatCompletionsRebuilder(), sse(no_fingerprint)).result()["system_fingerprint"] is None  # kept as said
    # its content filter's annotation after the last choice names no model either (a probe: the call went unpriced)
    annotation = (None, {"id": "", "object": "", "created": 0, "model": "", "choices": [{"index": 0, "delta": {}, "content_filter_offsets": {}}]})
    rebuilder = rebuild(ChatCompletionsRebuilder(), sse([*CHAT, annotation]))
    assert rebuilder.model == "gpt-4o-2024-08-06" and rebuilder.result()["model"] == "gpt-4o-2024-08-06"


def test_an_error_beside_a_choice_is_the_streams_error() -> None:
    """OpenRouter ends a stream that failed upstream with a chunk holding the error and a
    choice finished with "error"; an `"error": null` beside choices is no error."""
    failed = (None, {"id": "c1", "object": "chat.completion.chunk", "model": "m", "error": {"code": 502, "message": "provider down"},
                     "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})
    rebuilder = rebuild(ChatCompletionsRebuilder(), sse([*CHAT[:2], failed]))
    assert rebuilder.error == {"code": 502, "message": "provider down"}
    fine = [(name, {**payload, "error": None}) if isinstance(payload, dict) else (name, payload) for name, payload in CHAT]
    assert rebuild(ChatCompletionsRebuilder(), sse(fine)).error is None


def test_an_anthropic_legacy_completion_stream_is_rebuilt_whole() -> None:
    """`/v1/complete` streams `completion` events, the last with its stop_reason (a probe:
    a finished one was traced as cut short, with no body)."""
    pieces = [(" Hello", None), (" world", None), ("", "stop_sequence")]
    events = [("completion", {"type": "completion", "completion": text, "stop_reason": stop, "model": "claude-2.1", "log_id": "l1"})
              for text, stop in pieces]
    rebuilder = rebuild(AnthropicRebuilder(), sse([*events[:1], ("ping", {"type": "ping"}), *events[1:]]))
    assert rebuilder.ended and rebuilder.error is None and rebuilder.model == "claude-2.1"
    assert rebuilder.result() == {"type": "completion", "completion": " Hello world", "stop_reason": "stop_sequence", "model": "claude-2.1", "log_id": "l1"}
    cut = rebuild(AnthropicRebuilder(), sse(events[:2]))
    assert not cut.ended and cut.result()["completion"] == " Hello world"


def test_a_response_that_failed_is_an_error_whether_or_not_it_says_which() -> None:
    for error in ({"code": "server_error", "message": "boom"}, None):
        rebuilder = ResponsesRebuilder()
        failed = {"type": "response.failed", "response": {"id": "r", "status": "failed", "error": error, "usage": None}}
        rebuilder.add(ServerSentEvent("response.failed", json.dumps(failed)))
        assert rebuilder.ended and rebuilder.error
        assert rebuilder.error == error or rebuilder.error["type"] == "response.failed"


@pytest.mark.parametrize(("api", "operation", "events", "error"), [
    ("openai", "chat.completions", CHAT[:-1], None),  # every choice finished: a server that sends no [DONE]
    ("openai", "chat.completions", CHAT[:3], "the stream ended before its last event"),
    ("anthropic", "messages", ANTHROPIC[:-1], "the stream ended before its last event"),
    ("anthropic", "messages", ANTHROPIC, None),
])
def test_a_stream_closed_cleanly_short_of_its_end_is_cut_short(api: str, operation: str, events: list, error: str | None) -> None:
    """Upstream may end the body properly (a chunked terminator, a clean close) before the
    stream's last event: that call did not give its whole answer, and is traced so."""
    from llm_mitm.exchange import call_error, read_stream

    tap = StreamTap(rebuilder_for(api, operation))
    tap(sse(events))
    _, outcome = read_stream(api, 200, tap)
    assert outcome.error == error
    assert call_error("Client disconnected.", outcome) == (None if error is None else "Client disconnected.")


def test_usage_the_client_did_not_ask_for_is_taken_out_wherever_it_is_written() -> None:
    """An event written over lines keeps `"usage": null` past the line search, and an
    OpenAI-compatible server puts the usage in its last chunk with choices: both reached a
    client that did not ask (a streaming probe). The trace keeps the usage."""
    from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk, strip_null_usage, without_usage

    pretty = b'data: {\ndata:   "id": "a",\ndata:   "object": "chat.completion.chunk",\ndata:   "choices": [{"index": 0, "delta": {"content": "hi"}}],\ndata:   "usage": null\ndata: }\n\n'
    last = (b'event: chunk\ndata: {"id":"a","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n')
    tap = StreamTap(ChatCompletionsRebuilder())
    assert tap.drop_events(is_usage_only_chunk, USAGE_HINT, None, strip_null_usage, without_usage)
    out = through(tap, pretty, last, b"data: [DONE]\n\n", b"")
    events = [block for block in out.split(b"\n\n") if block]
    assert orjson.loads(events[0].removeprefix(b"data: ")) == {"id": "a", "object": "chat.completion.chunk",
                                                               "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    assert events[1].startswith(b"event: chunk\ndata: ") and b"usage" not in events[1]
    assert orjson.loads(events[1].partition(b"data: ")[2])["choices"][0]["finish_reason"] == "stop"
    assert events[2] == b"data: [DONE]"
    result = tap.rebuilder.result()
    assert result["usage"]["total_tokens"] == 4 and result["choices"][0]["message"]["content"] == "hi"
