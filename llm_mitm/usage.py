"""Token usage, normalised across the three APIs.

`input_tokens` always counts every prompt token, cached ones included (OpenAI's
`prompt_tokens` already does; Anthropic reports cache reads and writes apart, so they
are added back), which makes sums across providers mean the same thing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Usage(BaseModel):
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    estimated: bool = False


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _nested(usage: dict[str, Any], outer: str, inner: str) -> int | None:
    details = usage.get(outer)
    return _int(details.get(inner)) if isinstance(details, dict) else None


def normalize_usage(api: str, usage: Any) -> Usage | None:
    """Map a provider's `usage` object onto `Usage`; None when there is none."""
    if not isinstance(usage, dict) or not usage:
        return None
    if api == "anthropic":
        return _anthropic(usage)
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return _openai_chat(usage)
    return _openai_responses(usage)


def _openai_chat(usage: dict[str, Any]) -> Usage:
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    total = _int(usage.get("total_tokens"))
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        total_tokens=total,
        cached_input_tokens=_nested(usage, "prompt_tokens_details", "cached_tokens"),
        reasoning_tokens=_nested(usage, "completion_tokens_details", "reasoning_tokens"),
    )


def _openai_responses(usage: dict[str, Any]) -> Usage:
    prompt = _int(usage.get("input_tokens"))
    output = _int(usage.get("output_tokens"))
    total = _int(usage.get("total_tokens"))
    if total is None and prompt is not None:
        total = prompt + (output or 0)
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=total,
        cached_input_tokens=_nested(usage, "input_tokens_details", "cached_tokens"),
        reasoning_tokens=_nested(usage, "output_tokens_details", "reasoning_tokens"),
    )


def _anthropic(usage: dict[str, Any]) -> Usage:
    uncached = _int(usage.get("input_tokens"))
    cache_read = _int(usage.get("cache_read_input_tokens"))
    cache_write = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    parts = [n for n in (uncached, cache_read, cache_write) if n is not None]
    prompt = sum(parts) if parts else None
    total = prompt + (output or 0) if prompt is not None else output
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=total,
        cached_input_tokens=cache_read,
        cache_creation_input_tokens=cache_write,
    )
