"""Which `OpenAI-Organization` / `OpenAI-Project` goes upstream. Pure.

Precedence: with `override`, the configured value (the key's team value, else the
default) replaces what the client sent; otherwise the client's own header wins, then
the configured value, else none is sent.
"""

from __future__ import annotations

from llm_mitm.config import HeaderRule

ORGANIZATION_HEADER = "OpenAI-Organization"
PROJECT_HEADER = "OpenAI-Project"


def configured_value(rule: HeaderRule, key_fingerprint: str | None) -> str | None:
    """`by_key` accepts a full fingerprint (`sk-proj-…a1b2#3f9c2e1d07b4a6c5`) or its hash
    part, also as a fingerprint had it before it had 16 hex digits (its first 8)."""
    if key_fingerprint:
        kind, _, digest = key_fingerprint.rpartition("#")
        for candidate in (key_fingerprint, digest, f"{kind}#{digest[:8]}", digest[:8]):
            if candidate in rule.by_key:
                return rule.by_key[candidate]
    return rule.default


def choose(rule: HeaderRule, sent: str | None, key_fingerprint: str | None) -> str | None:
    configured = configured_value(rule, key_fingerprint)
    if rule.override and configured:
        return configured
    return sent or configured
