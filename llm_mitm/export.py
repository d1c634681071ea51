"""`llm-mitm export --format openai-chat`: traces -> OpenAI chat fine-tuning examples.

Chat completions, the Responses API and Anthropic messages, streamed or not (a streamed
trace holds the rebuilt message), become `{"messages": [...], "tools": [...]}` ending
with the assistant's reply. Failed and blocked calls are skipped, and so are replies a
model should not learn to give: cut short by the output limit, filtered, or empty.
Duplicates are dropped, and every example is checked against the format's rules before
it is written.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from llm_mitm.redact import Redactor

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "weight"}
EXAMPLE_KEYS = {"messages", "tools", "parallel_tool_calls"}


class Skip(Exception):
    """This record makes no training example; the message says why."""


@dataclass
class ExportReport:
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"{self.written} examples written" + (f"; skipped: {reasons}" if reasons else "")


def export_examples(records: Iterable[dict[str, Any]], model: str | None = None, report: ExportReport | None = None,
                    redactor: Redactor | None = None) -> Iterator[dict[str, Any]]:
    """Each record's example. Each is redacted again (`redactor`: with the patterns the
    proxy's config adds): a message's text parts, traced one by one, are joined here, so
    a key cut across two is whole again."""
    report = report if report is not None else ExportReport()
    redactor = redactor or Redactor()
    seen: set[bytes] = set()
    for record in records:
        try:
            example = redactor.json(_checked_example(record, model))
            digest = hashlib.blake2b(orjson.dumps(example, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
        except Skip as skip:
            report.skipped[str(skip)] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - one odd record must not cost every example after it
            report.skipped[f"unconvertible record ({type(exc).__name__})"] += 1
            continue
        if digest in seen:
            report.skipped["duplicate"] += 1
            continue
        seen.add(digest)
        report.written += 1
        yield example


def _checked_example(record: dict[str, Any], model: str | None) -> dict[str, Any]:
    if model and not _model_matches(record, model):
        raise Skip("other model")
    example = to_example(record)
    problems = validate(example)
    if problems:
        raise Skip(f"invalid ({problems[0]})")
    return example


def _model_matches(record: dict[str, Any], pattern: str) -> bool:
    names = [record.get("model"), record.get("response_model")]
    return any(isinstance(n, str) and fnmatch.fnmatchcase(n.lower(), pattern.lower()) for n in names)


def to_example(record: dict[str, Any]) -> dict[str, Any]:
    status = record.get("status_code")
    if (record.get("policy") or {}).get("decision") == "block":
        raise Skip("blocked")
    if record.get("error") or not isinstance(status, int) or not 200 <= status < 300:
        raise Skip("failed call")
    request = (record.get("request") or {}).get("body")
    response = (record.get("response") or {}).get("body")
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise Skip("no bodies in the trace")
    operation = record.get("operation")
    if operation == "chat.completions":
        return _from_chat(request, response)
    if operation == "responses":
        return _from_responses(request, response)
    if operation == "messages" and record.get("api") == "anthropic":
        return _from_anthropic(request, response)
    raise Skip("not a conversation")


# --------------------------------------------------------------------------- chat completions


def _text(content: Any) -> str | None:
    """String content, or text parts joined; anything else (images, audio) is no text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise Skip("non-text content")
        return _joined(texts)
    raise Skip("non-text content")


def _joined(texts: list[str]) -> str:
    """Texts traced one by one, joined (the example is redacted again: `export_examples`)."""
    return "".join(texts)


def _chat_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise Skip("malformed message")
    role = message.get("role")
    role = "system" if role == "developer" else role
    out: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
    for key in ("name", "tool_call_id"):
        if message.get(key):
            out[key] = message[key]
    if message.get("tool_calls"):
        out["tool_calls"] = [_chat_tool_call(call) for call in message["tool_calls"]]
    return out


def _chat_tool_call(call: Any) -> dict[str, Any]:
    """Function calls only: the format has no place for custom (free-form) tools."""
    kind = call.get("type", "function") if isinstance(call, dict) else None
    if kind != "function":
        raise Skip(f"unsupported tool call type {kind}" if kind else "malformed tool call")
    function = call.get("function")
    if not isinstance(function, dict):
        raise Skip("malformed tool call")
    return {"id": call.get("id"), "type": "function", "function": {"name": function.get("name"), "arguments": function.get("arguments", "")}}


# How each API says a reply was cut short by its output limit, or filtered: no example to
# learn from (the model would learn to stop mid-sentence, or to say nothing).
_CUT_SHORT = {"length": "truncated reply", "max_tokens": "truncated reply", "model_context_window_exceeded": "truncated reply",
              "content_filter": "filtered reply", "refusal": "filtered reply"}


def _ended(reason: Any) -> None:
    if isinstance(reason, str) and reason in _CUT_SHORT:
        raise Skip(_CUT_SHORT[reason])


def _from_chat(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0], dict) or "message" not in choices[0]:
        raise Skip("no assistant reply")
    _ended(choices[0].get("finish_reason"))
    messages = [_chat_message(m) for m in request.get("messages") or []]
    reply = [_chat_message({**choices[0]["message"], "role": "assistant"})]
    # Servers that go on from a last assistant message say so (vLLM's `continue_final_message`,
    # DeepSeek's and Mistral's `prefix`); else the reply is a turn of its own.
    last = (request.get("messages") or [None])[-1]
    prefilled = bool(request.get("continue_final_message")) or (isinstance(last, dict) and last.get("prefix") is True)
    return _example(_with_reply(messages, reply, prefilled), request.get("tools"), request.get("parallel_tool_calls"))


def _with_reply(messages: list[dict[str, Any]], reply: list[dict[str, Any]], prefilled: bool) -> list[dict[str, Any]]:
    """The conversation ending with the reply: a reply with nothing in it is no example,
    and one that goes on from an assistant message the request ended with (a prefill,
    `{"a":`) is one assistant message with it, not a fragment after it."""
    if not any(message.get("content") or message.get("tool_calls") for message in reply):
        raise Skip("empty reply")
    if prefilled and messages and messages[-1]["role"] == "assistant":
        return [*messages[:-1], *_merge_assistant([messages[-1], *reply])]
    return [*messages, *reply]


def _example(messages: list[dict[str, Any]], tools: Any, parallel: Any = None) -> dict[str, Any]:
    example: dict[str, Any] = {"messages": messages}
    if tools:
        example["tools"] = tools
    if isinstance(parallel, bool):
        example["parallel_tool_calls"] = parallel
    return example


# --------------------------------------------------------------------------- Responses API


# A Responses call whose conversation (or instructions) upstream keeps: the trace holds
# only what the call added, so an example made of it would be missing the rest.
_UPSTREAM_CONTEXT = ("previous_response_id", "conversation", "prompt")


def _from_responses(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    kept = next((key for key in _UPSTREAM_CONTEXT if request.get(key)), None)
    if kept is not None:
        raise Skip(f"context kept upstream ({kept})")
    if response.get("status") == "incomplete":
        _ended((response.get("incomplete_details") or {}).get("reason"))
        raise Skip("truncated reply")
    messages: list[dict[str, Any]] = []
    if isinstance(request.get("instructions"), str):
        messages.append({"role": "system", "content": request["instructions"]})
    items = request.get("input")
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items or []:
        messages.extend(_responses_item(item))
    reply = [m for item in response.get("output") or [] for m in _responses_item(item)]
    if not reply:
        raise Skip("no assistant reply")
    # One turn's text and calls come as items of their own, in the input as in the output:
    # parallel calls are one assistant message, their outputs after it.
    messages = _with_reply(_merge_assistant(messages, calls_only=True), _merge_assistant(reply), prefilled=False)
    tools = [
        {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
        for t in request.get("tools") or []
        if isinstance(t, dict) and t.get("type") == "function"
    ]
    return _example(messages, tools, request.get("parallel_tool_calls"))


def _responses_item(item: Any) -> list[dict[str, Any]]:
    if not isinstance(item, dict):
        raise Skip("malformed input item")
    kind = item.get("type", "message")
    if kind == "message":
        return [_chat_message(item)]
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "function_call_output":
        return [{"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"))}]
    if kind == "reasoning":
        return []
    raise Skip(f"unsupported item {kind}")


def _merge_assistant(messages: list[dict[str, Any]], calls_only: bool = False) -> list[dict[str, Any]]:
    """Consecutive assistant pieces (text, tool calls) become one assistant message; with
    `calls_only`, only calls join the message before them (two texts are two turns)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        joins = not calls_only or not message.get("content")
        if merged and message["role"] == "assistant" and merged[-1]["role"] == "assistant" and joins:
            last = merged[-1]
            if message.get("content"):
                last["content"] = _joined([last.get("content") or "", message["content"]])
            if message.get("tool_calls"):
                last["tool_calls"] = [*last.get("tool_calls", []), *message["tool_calls"]]
        else:
            merged.append(dict(message))
    return merged


# --------------------------------------------------------------------------- Anthropic


def _from_anthropic(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for message in request.get("messages") or []:
        messages.extend(_anthropic_message(message))
    _ended(response.get("stop_reason"))
    reply = _anthropic_message({"role": "assistant", "content": response.get("content")})
    if not reply:
        raise Skip("no assistant reply")
    messages = _with_reply(messages, reply, prefilled=True)  # Anthropic goes on from a last assistant message
    tools = [  # a tool of your own; a server tool's (`web_search_20250305`) has no function to be (a probe: it was one with no parameters)
        {"type": "function", "function": {"name": t["name"], "description": t.get("description", ""), "parameters": t.get("input_schema", {})}}
        for t in request.get("tools") or []
        if isinstance(t, dict) and "name" in t and t.get("type") in (None, "custom")
    ]
    return _example(messages, tools)


def _anthropic_message(message: Any) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise Skip("malformed message")
    role, content = message.get("role"), message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input", {})).decode()
            calls.append({"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": arguments}})
        elif kind == "tool_result":
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": _text(block.get("content")) or ""})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise Skip("non-text content")
    if texts or calls:
        message_out: dict[str, Any] = {"role": role, "content": _joined(texts) or None}
        if calls:
            message_out["tool_calls"] = calls
        out.append(message_out)
    return out


# --------------------------------------------------------------------------- the rules


def validate(example: dict[str, Any]) -> list[str]:
    """OpenAI's documented rules for chat fine-tuning data; empty when the example is fine."""
    problems: list[str] = []
    if set(example) - EXAMPLE_KEYS:
        problems.append(f"unknown keys {sorted(set(example) - EXAMPLE_KEYS)}")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return [*problems, "no messages"]
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"message {index} is not an object")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"message {index} has role {role!r}")
        if set(message) - MESSAGE_KEYS:
            problems.append(f"message {index} has unknown keys {sorted(set(message) - MESSAGE_KEYS)}")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            if content is not None and not isinstance(content, str):
                problems.append(f"message {index} content is not text")
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                if not call.get("id") or not function.get("name") or not isinstance(function.get("arguments"), str):
                    problems.append(f"message {index} has an incomplete tool call")
                call_ids.add(call.get("id"))
        elif not isinstance(content, str):
            problems.append(f"message {index} ({role}) has no text content")
        if role == "tool" and message.get("tool_call_id") not in call_ids:
            problems.append(f"message {index} answers an unknown tool call")
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)):
            problems.append(f"message {index} has a bad weight")
    if messages[-1].get("role") != "assistant" if isinstance(messages[-1], dict) else True:
        problems.append("does not end with the assistant's reply")
    tools = example.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict) and t["function"].get("name") for t in tools)):
        problems.append("malformed tools")
    return problems
