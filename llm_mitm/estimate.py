"""Token estimates for calls whose API reported no usage (marked `estimated`).

A byte-based estimate (about four bytes of UTF-8 per token, which holds for English
with OpenAI's and Anthropic's tokenizers within a few tens of percent). tiktoken needs
its vocabulary downloaded at first use, which an offline proxy cannot count on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llm_mitm.texts import request_texts, response_texts
from llm_mitm.usage import Usage

BYTES_PER_TOKEN = 4


def count_tokens(text: str) -> int:
    size = len(text.encode("utf-8", "surrogatepass"))
    return -(-size // BYTES_PER_TOKEN)


def prompt_tokens(request_body: Any) -> int:
    """Every text the API reads in a request, estimated, and the tokens it sends as token
    ids (a completion's or an embedding's `prompt`/`input`, one list or a list of them)."""
    texts = sum(count_tokens(text) for _, text in request_texts(request_body, extras=True))
    return texts + sum(_token_ids(request_body.get(field)) for field in ("prompt", "input")) if isinstance(request_body, dict) else texts


def _token_ids(value: Any) -> int:
    if not isinstance(value, list) or not value:
        return 0
    if all(isinstance(item, int) for item in value):
        return len(value)
    return sum(len(item) for item in value if isinstance(item, list) and all(isinstance(token, int) for token in item))


def estimate_usage(request_body: Any, response_body: Any) -> Usage | None:
    """Input from every text the API read, output from what it generated."""
    prompt = prompt_tokens(request_body)
    output = sum(count_tokens(text) for text in response_texts(response_body))
    if prompt == 0 and output == 0:
        return None
    return Usage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output, estimated=True)


def with_estimated_output(usage: Usage, response_body: Any) -> Usage:
    """Usage whose output count never came (an Anthropic stream cut before its
    `message_delta`): the input as reported, the output what a reported total leaves of it
    (a server that gives prompt and total counts only), else estimated from what arrived."""
    if usage.total_tokens is not None and usage.input_tokens is not None and usage.total_tokens > usage.input_tokens:
        return replace(usage, output_tokens=usage.total_tokens - usage.input_tokens)
    output = sum(count_tokens(text) for text in response_texts(response_body))
    total = (usage.input_tokens or 0) + output
    return replace(usage, output_tokens=output, total_tokens=total, estimated=True)
