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
    """`by_key` accepts a full fingerprint (`sk-proj-…a1b2#3f9c2e1d`) or its hash part."""
    if key_fingerprint:
        for candidate in (key_fingerprint, key_fingerprint.rpartition("#")[2]):
            if candidate in rule.by_key:
                return rule.by_key[candidate]
    return rule.default


def choose(rule: HeaderRule, sent: str | None, key_fingerprint: str | None) -> str | None:
    configured = configured_value(rule, key_fingerprint)
    if rule.override and configured:
        return configured
    return sent or configured
