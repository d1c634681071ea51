"""Token usage, normalised across the APIs (and Gemini's own, which gateways pass through).

`input_tokens` always counts every prompt token, cached ones included (OpenAI's
`prompt_tokens` already does; Anthropic reports cache reads and writes apart, so they
are added back), which makes sums across providers mean the same thing. Cache writes
count every write; Anthropic's breakdown (`cache_creation`) gives the 1-hour share apart,
because it is billed higher than a 5-minute write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Usage:
    """A plain dataclass: one is made for every call, on the proxy's event loop."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_creation_1h_input_tokens: int | None = None  # of those, 1-hour writes (Anthropic): billed higher
    reasoning_tokens: int | None = None
    audio_input_tokens: int | None = None  # of the input, audio (billed at its own price)
    audio_output_tokens: int | None = None  # of the output, audio
    estimated: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_creation_1h_input_tokens": self.cache_creation_1h_input_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "audio_input_tokens": self.audio_input_tokens,
            "audio_output_tokens": self.audio_output_tokens,
            "estimated": self.estimated,
        }


_MOST_TOKENS = 2**53  # beyond any real call; larger numbers are nonsense (and not JSON-safe)


def _int(value: Any) -> int | None:
    """A token count, or None for anything that cannot be one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MOST_TOKENS:
        return value
    return None


def _nested(usage: dict[str, Any], outer: str, inner: str) -> int | None:
    details = usage.get(outer)
    return _int(details.get(inner)) if isinstance(details, dict) else None


# (input, output, input details, output details) as each OpenAI API names them
_CHAT_FIELDS = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
_RESPONSES_FIELDS = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
# a transcription's (gpt-4o-transcribe) and the realtime API's: the details' names in the singular
_TRANSCRIPTION_FIELDS = ("input_tokens", "output_tokens", "input_token_details", "output_token_details")


def normalize_usage(api: str, usage: Any) -> Usage | None:
    """Map a provider's `usage` object onto `Usage`; None when there is none."""
    if not isinstance(usage, dict) or not usage:
        return None
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:  # Gemini's `usageMetadata`
        return _gemini(usage)
    chat = "prompt_tokens" in usage or "completion_tokens" in usage  # chat's shape, whoever serves it (Anthropic's OpenAI-compatible endpoint)
    if api == "anthropic" and not chat:
        return _anthropic(usage)
    if chat:
        return _openai(usage, _CHAT_FIELDS)
    if usage.get("type") == "duration":  # whisper's: billed by the second, no tokens counted
        return None
    return _openai(usage, _TRANSCRIPTION_FIELDS if "input_token_details" in usage else _RESPONSES_FIELDS)


def _openai(usage: dict[str, Any], fields: tuple[str, str, str, str]) -> Usage:
    input_name, output_name, input_details, output_details = fields
    prompt = _int(usage.get(input_name))
    output = _int(usage.get(output_name))
    total = _int(usage.get("total_tokens"))
    if total is None and prompt is not None:
        total = prompt + (output or 0)
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=total,
        cached_input_tokens=_nested(usage, input_details, "cached_tokens"),
        reasoning_tokens=_nested(usage, output_details, "reasoning_tokens"),
        audio_input_tokens=_nested(usage, input_details, "audio_tokens"),
        audio_output_tokens=_nested(usage, output_details, "audio_tokens"),
    )


def _gemini(usage: dict[str, Any]) -> Usage:
    """Gemini counts a tool's prompt apart from the call's, and its thoughts apart from the
    answer (billed as output): added in, as OpenAI's counts include them."""
    prompt = _sum(_int(usage.get("promptTokenCount")), _int(usage.get("toolUsePromptTokenCount")))
    thoughts = _int(usage.get("thoughtsTokenCount"))
    output = _sum(_int(usage.get("candidatesTokenCount")), thoughts)
    total = _int(usage.get("totalTokenCount"))
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=total if total is not None else _sum(prompt, output),
        cached_input_tokens=_int(usage.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        audio_input_tokens=_modality(usage.get("promptTokensDetails"), "AUDIO"),
        audio_output_tokens=_modality(usage.get("candidatesTokensDetails"), "AUDIO"),
    )


def _modality(details: Any, modality: str) -> int | None:
    """The tokens of one modality in Gemini's list of them (`[{"modality": "AUDIO", "tokenCount": 5}]`)."""
    counts = [_int(item.get("tokenCount")) for item in details if isinstance(item, dict) and item.get("modality") == modality] if isinstance(details, list) else []
    return sum(count for count in counts if count is not None) if counts else None


_ANTHROPIC_COUNTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")


def _anthropic(usage: dict[str, Any]) -> Usage:
    uncached, cache_read, cache_write, output = (_int(usage.get(name)) for name in _ANTHROPIC_COUNTS)
    for step in _compactions(usage):  # billed beside the answer's own counts, which leave them out
        uncached, cache_read, cache_write, output = (_sum(mine, _int(step.get(name))) for mine, name in zip(
            (uncached, cache_read, cache_write, output), _ANTHROPIC_COUNTS))
    parts = [n for n in (uncached, cache_read, cache_write) if n is not None]
    prompt = sum(parts) if parts else None
    total = prompt + (output or 0) if prompt is not None else output
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=total,
        cached_input_tokens=cache_read,
        cache_creation_input_tokens=cache_write,
        cache_creation_1h_input_tokens=_nested(usage, "cache_creation", "ephemeral_1h_input_tokens"),
    )


def _compactions(usage: dict[str, Any]) -> list[dict[str, Any]]:
    """The compaction steps of a call (beta `compact-2026-01-12`): summarising the
    conversation is a sampling of its own, listed in `usage.iterations`, whose tokens the
    top-level counts do not include."""
    steps = usage.get("iterations")
    return [step for step in steps if isinstance(step, dict) and step.get("type") == "compaction"] if isinstance(steps, list) else []


def _sum(a: int | None, b: int | None) -> int | None:
    return a if b is None else b if a is None else a + b
