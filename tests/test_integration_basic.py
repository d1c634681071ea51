"""End to end through a real mitmdump with the real SDKs."""

from __future__ import annotations

from tests.support.clients import drive
from tests.support.fake_provider import CANNED_REPLY, FakeProvider
from tests.support.mitm import Mitmdump


def test_openai_chat_is_traced(proxy: Mitmdump, provider: FakeProvider) -> None:
    result = drive(
        {
            "client": "openai",
            "op": "chat",
            "api_key": "sk-proj-" + "A" * 40,
            "params": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi basic"}]},
        },
        proxy.client_env(),
    )
    assert result.get("text") == CANNED_REPLY, result
    traces = proxy.wait_for_traces(1)
    record = next(t for t in traces if t["request"]["body"]["messages"][0]["content"] == "hi basic")
    assert record["provider"] == "openai"
    assert record["operation"] == "chat.completions"
    print(record)
