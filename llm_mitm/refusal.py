"""A refused request answered the way the API the client speaks answers errors,
so the SDKs raise their usual classes (403 PermissionDenied, 400 BadRequest, 429 RateLimit)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

_OPENAI_TYPES = {400: "invalid_request_error", 403: "policy_violation", 404: "invalid_request_error", 429: "rate_limit_exceeded"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


SDK_RETRY_CEILING = 60  # seconds: a wait longer than a rate limit's minute is not one to retry after


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    headers: dict[str, str]
    body: bytes


def refusal(api: str, status: int, rule: str, message: str, retry_after: int | None = None) -> Refusal:
    text = f"llm-mitm answered this request itself ({rule}): {message}"
    if api == "anthropic":
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": text, "code": rule},
        }
    else:
        payload = {"error": {"message": text, "type": _OPENAI_TYPES.get(status, "api_error"), "code": rule, "param": None}}
    headers = {"content-type": "application/json", "x-llm-mitm-rule": rule}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, retry_after))
        if retry_after > SDK_RETRY_CEILING:
            # The anthropic SDK sleeps whatever Retry-After says (a spent daily budget: hours,
            # the call hanging meanwhile); both SDKs raise at once when told not to retry.
            headers["x-should-retry"] = "false"
    return Refusal(status, headers, orjson.dumps(payload))
