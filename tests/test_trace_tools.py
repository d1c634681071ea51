"""llm-mitm stats, report, export and replay, on traces a real mitmdump wrote."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from llm_mitm.export import ExportReport, export_examples, validate
from tests.conftest import provider_routes
from tests.support.clients import drive
from tests.support.fake_provider import CANNED_REPLY, FakeProvider
from tests.support.mitm import Mitmdump
from tests.support.pki import ServerCert
from tests.test_e2e_clients import ANTHROPIC_KEY, AZURE_KEY, OPENAI_KEY, chat, marker
from tests.test_setup_helpers import with_file_size_limit

LLM_MITM = str(Path(sys.executable).with_name("llm-mitm"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider, pki: ServerCert) -> Path:
    """A trace file with plain, streamed, tool, Responses, Anthropic, failed, blocked and repeated calls."""
    folder = tmp_path_factory.mktemp("recorded")
    config = {"policy": {"denied_models": ["gpt-4-banned"]}, "traces": {"directory": "per-exchange"}}  # a file per call beside
    with Mitmdump(folder, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        env = proxy.client_env()

        def call(params: dict[str, Any], op: str = "chat", **extra: Any) -> None:
            drive({"client": "openai", "op": op, "api_key": OPENAI_KEY, "params": params, **extra}, env)

        call(chat("first question"))
        call(chat("first question"))  # a duplicate
        call(chat("streamed question", stream=True))
        call(chat("weather please", tools=TOOLS, stream=True))
        call({"model": "gpt-4o", "input": "responses question", "instructions": "be brief", "stream": True}, op="responses")
        call(chat("this fails"), headers={"x-fake-status": "500"})
        call(chat("this is blocked", model="gpt-4-banned"))
        call(chat("mini question", model="gpt-4o-mini"))
        params = {"model": "claude-sonnet-4-5", "max_tokens": 9, "system": "be kind", "messages": [{"role": "user", "content": "anthropic question"}], "stream": True}
        drive({"client": "anthropic", "api_key": ANTHROPIC_KEY, "params": params}, env)
        records = proxy.wait_for_traces(9)
        assert len(records) == 9
    return proxy.traces_path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LLM_MITM, *args], capture_output=True, text=True, timeout=120)


def test_stats_table_and_json(recorded: Path) -> None:
    table = cli("stats", str(recorded))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["model", "requests", "errors", "blocked", "input_tokens", "output_tokens", "cost_usd", "unpriced", "p50_ms", "p95_ms", "ttfb_p50_ms", "ttfb_p95_ms"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert lines[-1].startswith("TOTAL") and lines[-1].split()[1:4] == ["9", "1", "1"]
    result = orjson.loads(cli("stats", str(recorded), "--json").stdout)
    total = result["total"]
    assert (total["requests"], total["errors"], total["blocked"]) == (9, 1, 1)
    assert total["p50_ms"] > 0 and total["p95_ms"] >= total["p50_ms"] and total["ttfb_p50_ms"] > 0
    assert result["groups"]["gpt-4o-mini"]["requests"] == 1
    assert result["groups"]["claude-sonnet-4-5-20250929"]["cost_usd"] == pytest.approx((9 * 3 + 3 * 0.3 + 6 * 15) / 1e6)
    assert total["cost_usd"] == pytest.approx(sum(g["cost_usd"] for g in result["groups"].values()))
    for by, expected in (("provider", {"openai", "anthropic"}), ("operation", {"chat.completions", "responses", "messages"})):
        assert set(orjson.loads(cli("stats", str(recorded), "--by", by, "--json").stdout)["groups"]) == expected
    assert len(orjson.loads(cli("stats", str(recorded), "--by", "day", "--json").stdout)["groups"]) == 1
    assert len(orjson.loads(cli("stats", str(recorded), "--by", "key", "--json").stdout)["groups"]) == 2


def test_export_openai_chat(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    result = cli("export", str(recorded), "--format", "openai-chat", "-o", str(out))
    assert result.returncode == 0, result.stderr
    examples = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert "1 duplicate" in result.stderr and "1 blocked" in result.stderr and "1 failed call" in result.stderr
    assert len(examples) == 6
    for example in examples:
        assert validate(example) == []
        assert example["messages"][-1]["role"] == "assistant"
    by_question = {e["messages"][-2]["content"]: e for e in examples}
    assert by_question["streamed question"]["messages"][-1]["content"] == CANNED_REPLY
    weather = by_question["weather please"]
    assert weather["tools"] == TOOLS
    assert weather["messages"][-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    responses = next(e for e in examples if e["messages"][0] == {"role": "system", "content": "be brief"})
    assert responses["messages"][1:] == [{"role": "user", "content": "responses question"}, {"role": "assistant", "content": CANNED_REPLY}]
    anthropic = next(e for e in examples if e["messages"][0] == {"role": "system", "content": "be kind"})
    assert anthropic["messages"][-1] == {"role": "assistant", "content": CANNED_REPLY}
    assert out.stat().st_mode & 0o777 == 0o600  # prompts and answers, as in the traces
    only_mini = tmp_path / "mini.jsonl"
    cli("export", str(recorded), "-o", str(only_mini), "--model", "gpt-4o-mini*")
    assert [orjson.loads(line)["messages"][0]["content"] for line in only_mini.read_bytes().splitlines()] == ["mini question"]


def test_the_tools_read_a_traces_directory_as_the_trace_file(recorded: Path, tmp_path: Path) -> None:
    """One file per call (llm_proxy's layout, for fine-tuning sets) exports, counts and
    reports as the JSONL file does (a probe: export said there was no trace file)."""
    directory = recorded.parent / "per-exchange"
    assert len(list(directory.rglob("*.json"))) == 9
    from_file, from_directory = tmp_path / "file.jsonl", tmp_path / "dir.jsonl"
    assert cli("export", str(recorded), "-o", str(from_file)).returncode == 0
    result = cli("export", str(directory), "-o", str(from_directory))
    assert result.returncode == 0, result.stderr
    assert sorted(from_directory.read_bytes().splitlines()) == sorted(from_file.read_bytes().splitlines()) and from_file.read_bytes()
    assert orjson.loads(cli("stats", str(directory), "--json").stdout)["total"] == orjson.loads(cli("stats", str(recorded), "--json").stdout)["total"]
    assert cli("report", str(directory), "-o", str(tmp_path / "r.html")).returncode == 0
    (directory / "broken.json").write_text("{not json")
    # JSON that is no record: a settings file, one with a record's names but not its types (a probe: counted, and stats crashed)
    (directory / "settings.json").write_text('{"name": "settings", "editor.tabSize": 4}')
    (directory / "other.json").write_text('{"provider": "x", "operation": "y", "request": {}, "response": {}, "policy": "block", "usage": [1]}')
    try:
        for tool in ("stats", "report"):
            result = cli(tool, str(directory), *(["-o", str(tmp_path / "r2.html")] if tool == "report" else []))
            assert result.returncode == 0 and "3 file(s) that are not JSON records were skipped" in result.stderr, result.stderr
        assert orjson.loads(cli("stats", str(directory), "--json").stdout)["total"] == orjson.loads(cli("stats", str(recorded), "--json").stdout)["total"]
    finally:
        for name in ("broken.json", "settings.json", "other.json"):
            (directory / name).unlink()
    missing = cli("stats", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no trace file or traces.directory" in missing.stderr


def test_a_report_keeps_each_calls_latest_messages_only() -> None:
    """Each listed call kept every message: 150 agent calls of 200 messages made a report
    of 120 MB, the default 2000 one no browser opens (a traces probe)."""
    from llm_mitm.report import CONVERSATION_LIMIT, collect, render

    text = "lorem ipsum dolor sit amet " * 200
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} {text}"} for i in range(200)]
    record = {"provider": "openai", "api": "openai", "operation": "chat.completions", "status_code": 200, "model": "gpt-4o",
              "request": {"body": {"model": "gpt-4o", "messages": messages}},
              "response": {"body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "the answer"}}]}}}
    data = collect([record] * 20)
    conversation = data.calls[0]["conversation"]
    assert conversation[0][1].startswith("turn 0 ")  # the task, which the table's search finds the call by
    assert conversation[1] == ["note", f"{201 - (len(conversation) - 1)} messages left out"]  # all but the first and the kept
    assert conversation[-1] == ["assistant", "the answer"] and conversation[-2][1].startswith("turn 199 ")
    assert sum(len(text) for role, text in conversation if role != "note") <= CONVERSATION_LIMIT
    assert len(render(data)) < 20 * 2 * CONVERSATION_LIMIT
    short = collect([{**record, "request": {"body": {"model": "gpt-4o", "messages": messages[:2]}}}]).calls[0]["conversation"]
    assert [role for role, _ in short] == ["user", "assistant", "assistant"]  # all of it, no note


def test_a_report_hides_keys_in_what_it_decodes_or_joins() -> None:
    """A text file sent inline is traced as the base64 it came as, and the report shows it
    decoded (it showed the key inside in clear: a secrets probe); an answer's text parts too."""
    import base64

    from llm_mitm.report import collect, render

    key = "sk-proj-" + "Q7" * 30
    encoded = base64.b64encode(f"OPENAI_API_KEY={key}\n".encode()).decode()
    parts = [{"type": "text", "text": "read this"}, {"type": "file", "file": {"filename": "a.txt", "file_data": f"data:text/plain;base64,{encoded}"}}]
    document = {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": encoded}}
    records = [
        {**chat_record("unused", {"role": "assistant", "content": "ok"}), "request": {"body": {"model": "gpt-4o", "messages": [{"role": "user", "content": parts}]}}},
        {"provider": "anthropic", "api": "anthropic", "operation": "messages", "model": "claude-sonnet-4-5", "status_code": 200,
         "request": {"body": {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": [document]}]}},
         "response": {"body": {"content": [{"type": "text", "text": f"your key is {key}"}]}}},
    ]
    data = collect(records)
    assert any("OPENAI_API_KEY=sk-proj-…" in text for call in data.calls for _, text in call["conversation"])  # decoded, then hidden
    assert "Q7Q7Q7Q7" not in render(data)


def test_a_report_is_its_owners_only(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = cli("report", str(recorded), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600


def chat_record(question: str, reply: Any) -> dict[str, Any]:
    """A successful chat completion as the trace holds it."""
    return {"provider": "openai", "api": "openai", "operation": "chat.completions", "model": "gpt-4o", "status_code": 200,
            "request": {"body": {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]}},
            "response": {"body": {"choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]}}}


def test_export_hides_a_key_cut_across_text_parts() -> None:
    """The trace redacts each string by itself, and the export joins a message's parts:
    a key cut across two came out whole (a secrets probe)."""
    key = "sk-proj-" + "R8" * 30
    split = [{"type": "text", "text": f"my key: {key[:12]}"}, {"type": "text", "text": f"{key[12:]} please store it"}]
    record = chat_record("unused", {"role": "assistant", "content": [{"type": "text", "text": key[:20]}, {"type": "text", "text": key[20:]}]})
    record["request"]["body"]["messages"] = [{"role": "user", "content": split}]
    [example] = list(export_examples([record]))
    written = orjson.dumps(example).decode()
    assert "R8R8R8R8" not in written and written.count("sk-proj-…R8R8#") == 2, written


def test_export_and_report_hide_a_secret_of_the_configs_pattern_cut_across_text_parts(tmp_path: Path) -> None:
    """A secret of a shape `redaction.patterns` adds, cut across two text parts, in a trace
    written before the writer read parts joined (or under a config without the pattern): the
    export joins a message's parts, so it came out whole, and the report showed both halves.
    Both read the proxy's config (`--config`, else ./config.yaml) and redact the bodies again
    with its patterns, parts read joined; a config that does not load is said, not ignored."""
    secret = "ACME-" + "7F3A9C" * 4
    split = [{"type": "text", "text": f"the vault code is {secret[:11]}"}, {"type": "text", "text": f"{secret[11:]} remember it"}]
    record = chat_record("unused", {"role": "assistant", "content": "noted"})
    record["request"]["body"]["messages"] = [{"role": "user", "content": split}]
    traces = tmp_path / "t.jsonl"
    traces.write_bytes(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
    config = tmp_path / "proxy.yaml"
    config.write_text("redaction:\n  patterns: ['ACME-[0-9A-F]{24}']\n")
    for tool, out in (("export", tmp_path / "train.jsonl"), ("report", tmp_path / "report.html")):
        result = cli(tool, str(traces), "-o", str(out), "--config", str(config))
        assert result.returncode == 0, result.stderr
        written = out.read_text()
        assert "7F3A9C7F3A9C7F3A9C" not in written and "the vault code is" in written, tool
        bare = cli(tool, str(traces), "-o", str(out))  # no config here: the built-in shapes only
        assert bare.returncode == 0 and "7F3A9C7F3A9C7F3A9C" in out.read_text(), tool
        broken = tmp_path / "broken.yaml"
        broken.write_text("redaction:\n  patterns: ['(']\n")
        refused = cli(tool, str(traces), "-o", str(out), "--config", str(broken))
        assert refused.returncode == 2 and "redaction.patterns" in refused.stderr and "broken.yaml" in refused.stderr, refused.stderr
    (tmp_path / "config.yaml").write_text(config.read_text())
    found = subprocess.run([LLM_MITM, "export", str(traces), "-o", str(tmp_path / "cwd.jsonl")], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert found.returncode == 0 and secret not in (tmp_path / "cwd.jsonl").read_text(), found.stderr


def test_export_skips_what_it_cannot_convert(tmp_path: Path) -> None:
    """A record the format has no place for (a custom tool call) or that is malformed is
    skipped with its reason; the examples after it are still written."""
    custom = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "custom", "custom": {"name": "shell", "input": "ls"}}]}
    records = [
        chat_record("first", {"role": "assistant", "content": "a1"}),
        chat_record("run it", custom),
        chat_record("no function", {"role": "assistant", "content": None, "tool_calls": [{"id": "call_2", "type": "function"}]}),
        chat_record("odd reply", "not a message"),
        chat_record("second", {"role": "assistant", "content": "a2"}),
    ]
    report = ExportReport()
    assert [e["messages"][0]["content"] for e in export_examples(records, report=report)] == ["first", "second"]
    assert report.skipped == {"unsupported tool call type custom": 1, "malformed tool call": 1, "unconvertible record (TypeError)": 1}
    traces, out = tmp_path / "t.jsonl", tmp_path / "train.jsonl"
    traces.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records))
    result = cli("export", str(traces), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 examples written; skipped:" in result.stderr and "1 unsupported tool call type custom" in result.stderr
    assert len(out.read_bytes().splitlines()) == 2


def test_export_skips_a_responses_call_whose_context_upstream_keeps() -> None:
    """Chained by previous_response_id, in a conversation, or from a stored prompt, a call's
    record holds only what it added: as an example it would teach a reply to half a dialogue."""
    def responses_record(**extra: Any) -> dict[str, Any]:
        return {"status_code": 200, "operation": "responses", "api": "openai", "model": "gpt-4o",
                "request": {"body": {"model": "gpt-4o", "input": "And tomorrow?", **extra}},
                "response": {"body": {"output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Rain."}]}]}}}

    report = ExportReport()
    records = [responses_record(), responses_record(previous_response_id="resp_1"), responses_record(conversation="conv_1"),
               responses_record(prompt={"id": "pmpt_1"})]
    examples = list(export_examples(records, report=report))
    assert [e["messages"] for e in examples] == [[{"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "Rain."}]]
    assert report.skipped == {"context kept upstream (previous_response_id)": 1, "context kept upstream (conversation)": 1, "context kept upstream (prompt)": 1}


def test_export_makes_functions_of_an_anthropic_calls_own_tools_only() -> None:
    """A server tool (web search) has no function to be (a probe: it was one with no parameters)."""
    tools = [{"name": "get_weather", "description": "d", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
             {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    record = {"status_code": 200, "operation": "messages", "api": "anthropic", "model": "claude-x",
              "request": {"body": {"model": "claude-x", "max_tokens": 10, "tools": tools, "messages": [{"role": "user", "content": "hi"}]}},
              "response": {"body": {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "hello"}]}}}
    (example,) = export_examples([record], report=ExportReport())
    assert [tool["function"]["name"] for tool in example["tools"]] == ["get_weather", "lookup"]


def test_export_skips_replies_a_model_should_not_learn() -> None:
    """Cut short by the output limit, filtered, or empty (a reasoning model that spent its
    limit thinking): as examples they taught a model to stop mid-sentence (a traces probe)."""
    def anthropic(stop_reason: str) -> dict[str, Any]:
        return {"status_code": 200, "operation": "messages", "api": "anthropic", "model": "claude-x",
                "request": {"body": {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "an essay"}]}},
                "response": {"body": {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "The essay"}], "stop_reason": stop_reason}}}

    def responses(status: str, reason: str | None = None) -> dict[str, Any]:
        return {"status_code": 200, "operation": "responses", "api": "openai", "model": "gpt-4o",
                "request": {"body": {"model": "gpt-4o", "input": "an essay, please"}},
                "response": {"body": {"status": status, "incomplete_details": {"reason": reason} if reason else None,
                                      "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "The essay"}]}]}}}

    cut = chat_record("an essay", {"role": "assistant", "content": "The essay begins"})
    cut["response"]["body"]["choices"][0]["finish_reason"] = "length"
    filtered = chat_record("q", {"role": "assistant", "content": "partial"})
    filtered["response"]["body"]["choices"][0]["finish_reason"] = "content_filter"
    records = [cut, filtered, chat_record("hard", {"role": "assistant", "content": ""}), chat_record("bad", {"role": "assistant", "content": None, "refusal": "No."}),
               anthropic("max_tokens"), anthropic("refusal"), responses("incomplete", "max_output_tokens"), responses("incomplete", "content_filter"),
               anthropic("end_turn"), responses("completed")]
    report = ExportReport()
    assert len(list(export_examples(records, report=report))) == 2
    assert report.skipped == {"truncated reply": 3, "filtered reply": 3, "empty reply": 2}


def test_export_keeps_one_assistant_turn_where_the_api_gives_it_in_pieces() -> None:
    """A Responses turn's parallel calls are items of their own, and an Anthropic reply goes
    on from a prefilled assistant message: each is one assistant message, its tool answers
    after it (they were separate turns, which the format reads as calls left unanswered)."""
    responses = {"status_code": 200, "operation": "responses", "api": "openai", "model": "gpt-4o",
                 "request": {"body": {"model": "gpt-4o", "input": [
                     {"role": "user", "content": "Paris and Rome?"},
                     {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                     {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
                     {"type": "function_call_output", "call_id": "c1", "output": "sun"},
                     {"type": "function_call_output", "call_id": "c2", "output": "rain"}]}},
                 "response": {"body": {"status": "completed", "output": [
                     {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sun, rain."}]}]}}}
    prefilled = {"status_code": 200, "operation": "messages", "api": "anthropic", "model": "claude-x",
                 "request": {"body": {"model": "claude-x", "max_tokens": 50, "messages": [
                     {"role": "user", "content": "JSON please"}, {"role": "assistant", "content": '{"a":'}]}},
                 "response": {"body": {"type": "message", "role": "assistant", "content": [{"type": "text", "text": " 1}"}], "stop_reason": "end_turn"}}}
    first, second = export_examples([responses, prefilled], report=ExportReport())
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [call["id"] for call in first["messages"][1]["tool_calls"]] == ["c1", "c2"]
    assert second["messages"] == [{"role": "user", "content": "JSON please"}, {"role": "assistant", "content": '{"a": 1}'}]
    # Elsewhere an assistant message is a turn of its own: OpenAI's APIs answer after it (a review:
    # "Hello!" and the reply were glued into one), unless the server is told to go on from it.
    history = chat_record("hi", {"role": "assistant", "content": "How can I help?"})
    history["request"]["body"]["messages"].append({"role": "assistant", "content": "Hello!"})
    go_on = chat_record("hi", {"role": "assistant", "content": " world"})
    go_on["request"]["body"]["messages"].append({"role": "assistant", "content": "Hello", "prefix": True})
    texts = {**responses, "request": {"body": {"model": "gpt-4o", "input": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]}}}
    third, fourth, fifth = export_examples([history, go_on, texts], report=ExportReport())
    assert [m["content"] for m in third["messages"]] == ["hi", "Hello!", "How can I help?"]
    assert [m["content"] for m in fourth["messages"]] == ["hi", "Hello world"]
    assert [m["content"] for m in fifth["messages"]] == ["q", "A", "B", "Sun, rain."]


def test_outputs_never_replace_the_trace_and_fail_in_one_line(tmp_path: Path) -> None:
    traces = tmp_path / "t.jsonl"
    traces.write_bytes(orjson.dumps(chat_record("q", {"role": "assistant", "content": "a"})) + b"\n")
    original = traces.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(traces)
    rotated = tmp_path / "t.jsonl.1"  # read with it
    rotated.write_bytes(original)
    for command in ("export", "report"):
        for output in (traces, link, rotated):
            result = cli(command, str(traces), "-o", str(output))
            assert result.returncode == 2, result.stderr
            assert result.stderr == f"llm-mitm {command}: the output {output} is a trace file being read: name another file with -o\n"
            assert traces.read_bytes() == original and rotated.read_bytes() == original
        missing = cli(command, str(traces), "-o", str(tmp_path / "missing" / "out"))
        assert missing.returncode == 2
        assert missing.stderr == f"llm-mitm {command}: cannot write {tmp_path / 'missing' / 'out'}: No such file or directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "t.jsonl", "t.jsonl.1"]


def test_outputs_never_replace_a_record_of_a_traces_directory_being_read(tmp_path: Path) -> None:
    """`export DIR -o DIR/<record>.json` wrote over a record it was reading (a review); a
    trace file named so was refused. Any output inside the directory read is refused, the
    directory itself too, through a link as well; outside it the tools still write."""
    directory = tmp_path / "traces" / "2025-01-01"
    directory.mkdir(parents=True)
    record = directory / "120000-abc.json"
    record.write_bytes(orjson.dumps(chat_record("q", {"role": "assistant", "content": "a"})))
    original = record.read_bytes()
    (tmp_path / "link").symlink_to(tmp_path / "traces")
    traces = tmp_path / "traces"
    for command in ("export", "report"):
        for output in (record, directory / "new.json", tmp_path / "link" / "2025-01-01" / record.name):
            result = cli(command, str(traces), "-o", str(output))
            assert result.returncode == 2, result.stderr
            assert result.stderr == (f"llm-mitm {command}: the output {output} is inside the traces directory {traces} "
                                     "being read: name another file with -o\n")
        itself = cli(command, str(traces), "-o", str(traces))
        assert itself.returncode == 2
        assert itself.stderr == f"llm-mitm {command}: the output {traces} is a trace file being read: name another file with -o\n"
        assert record.read_bytes() == original and sorted(p.name for p in directory.iterdir()) == [record.name]
        assert cli(command, str(tmp_path / "link"), "-o", str(tmp_path / f"{command}.out")).returncode == 0


def test_outputs_are_whole_or_not_written(tmp_path: Path) -> None:
    """A disk that fills up part way: the previous output stays as it was, and no half file."""
    traces = tmp_path / "t.jsonl"
    make_big_trace(traces, 200)
    folder = tmp_path / "out"
    folder.mkdir()
    for command in ("export", "report"):
        output = folder / f"{command}.out"
        output.write_bytes(b"the previous output\n")
        code = f"import sys; from llm_mitm.cli import main; sys.exit(main({[command, str(traces), '-o', str(output)]!r}))"
        result = with_file_size_limit(10_000, code)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"llm-mitm {command}: cannot write {output}: File too large")
        assert output.read_bytes() == b"the previous output\n"
    assert sorted(p.name for p in folder.iterdir()) == ["export.out", "report.out"]


def test_export_rules_catch_bad_examples() -> None:
    assert validate({"messages": [{"role": "user", "content": "hi"}]}) == ["does not end with the assistant's reply"]
    assert "message 0 has role 'robot'" in validate({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})
    assert any("unknown tool call" in p for p in validate({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    assert validate({"messages": []}) == ["no messages"]


# --------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are needed (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_report_renders_offline_in_a_real_browser(recorded: Path, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    result = cli("report", str(recorded), "-o", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "@import" not in text  # self-contained
    assert "this is blocked" in text  # the data is inline

    browser.get(page.as_uri())
    assert "9 calls" in browser.find_element(By.ID, "summary").text
    assert browser.find_element(By.ID, "total-cost").text.startswith("$0.00")
    for chart in ("chart-days", "chart-latency", "chart-models", "chart-keys"):
        assert browser.find_element(By.ID, chart).find_elements(By.TAG_NAME, "rect"), chart
    assert "fake error 500" in browser.find_element(By.ID, "top-errors").text
    assert "model_not_allowed" in browser.find_element(By.ID, "top-blocks").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#calls tbody tr")
    assert len(rows) == 9
    search = browser.find_element(By.ID, "search")
    search.send_keys("weather")
    assert len([r for r in rows if r.is_displayed()]) == 1
    visible = next(r for r in rows if r.is_displayed())
    visible.click()
    dialog = browser.find_element(By.ID, "conversation")
    assert dialog.is_displayed()
    assert "weather please" in dialog.text and "Paris" in dialog.text  # the question and the rebuilt tool call
    browser.save_screenshot(os.environ.get("LLM_MITM_REPORT_SCREENSHOT", str(tmp_path / "report.png")))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_report_escapes_what_the_trace_holds(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    nasty = "</script><script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
    record = {"timestamp": "2026-11-25T10:00:00Z", "provider": "openai", "operation": "chat.completions", "model": nasty,
              "status_code": 200, "duration_ms": 5.0, "api_key": nasty, "cost_usd": 0.001,
              "request": {"body": {"messages": [{"role": "user", "content": nasty}]}}, "response": {"body": None}}
    # "<!--" then "<script" puts the HTML parser in a state where "</script>" no longer ends
    # the data element, so the page after it would be swallowed.
    comment = "<!--<script>&amp;\u2028"
    record["request"]["body"]["messages"].append({"role": "user", "content": comment})
    traces = tmp_path / "t.jsonl"
    traces.write_bytes(orjson.dumps(record) + b"\n")
    page = tmp_path / "r.html"
    assert cli("report", str(traces), "-o", str(page)).returncode == 0
    browser.get(page.as_uri())
    assert browser.execute_script("return window.pwned") is None
    rows = browser.find_elements(By.CSS_SELECTOR, "#calls tbody tr")
    assert len(rows) == 1
    rows[0].click()
    texts = browser.execute_script("return Array.from(document.querySelectorAll('#messages .message div:last-child'), d => d.textContent)")
    assert texts == [nasty, comment]  # shown as text, exactly
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    data = page.read_text().split('<script type="application/json" id="calls-data">')[1].split("</script>")[0]
    assert not {"<", ">", "&", "\u2028"} & set(data)


# --------------------------------------------------------------------------- big files


def make_big_trace(path: Path, records: int) -> None:
    base = {"schema_version": 1, "timestamp": "2026-11-25T10:00:00.000Z", "provider": "openai", "api": "openai",
            "operation": "chat.completions", "method": "POST", "url": "https://api.openai.com/v1/chat/completions",
            "model": "gpt-4o", "response_model": "gpt-4o-2024-08-06", "stream": False, "status_code": 200,
            "usage": {"input_tokens": 100, "output_tokens": 50}, "cost_usd": 0.00075, "api_key": "sk-…abcd#12345678"}
    with open(path, "wb") as out:
        for i in range(records):
            body = {"messages": [{"role": "user", "content": f"question {i % 1000} " + "x" * 2000}]}
            reply = {"choices": [{"message": {"role": "assistant", "content": f"answer {i % 1000}"}}]}
            out.write(orjson.dumps({**base, "id": str(i), "duration_ms": 10 + i % 500, "ttfb_ms": 5 + i % 100,
                                    "request": {"body": body}, "response": {"body": reply}}, option=orjson.OPT_APPEND_NEWLINE))


def peak_rss_mb(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    return int(result.stderr.strip().splitlines()[-1]) / 1024, result


def test_big_files_in_bounded_memory_with_a_torn_last_line(tmp_path: Path) -> None:
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    make_big_trace(small, 5_000)
    make_big_trace(big, 50_000)  # ~110 MB
    with open(big, "ab") as handle:
        handle.write(b'{"id": "torn", "timestamp": "2026-11-2')  # the proxy died mid-write
    small_rss, _ = peak_rss_mb(LLM_MITM, "stats", str(small), "--json")
    big_rss, result = peak_rss_mb(LLM_MITM, "stats", str(big), "--json")
    assert result.returncode == 0
    assert orjson.loads(result.stdout)["total"]["requests"] == 50_000
    assert "cut short" in result.stderr
    assert big.stat().st_size > 100e6
    assert big_rss - small_rss < 25, (small_rss, big_rss)  # ten times the data, not ten times the memory
    export_rss, exported = peak_rss_mb(LLM_MITM, "export", str(big), "-o", str(tmp_path / "train.jsonl"))
    assert exported.returncode == 0 and "1000 examples written; skipped: 49000 duplicate" in exported.stderr
    assert export_rss - small_rss < 40, (small_rss, export_rss)


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    traces = tmp_path / "t.jsonl"
    make_big_trace(traces, 20_000)
    piped = cli("stats", str(traces))
    assert "reading" not in piped.stderr and piped.stderr == ""
    controller, terminal = pty.openpty()  # the child's stderr is a terminal
    child = subprocess.Popen([LLM_MITM, "stats", str(traces)], stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed with the child
            break
        if not chunk:
            break
        output += chunk
    assert child.wait(60) == 0
    assert b"reading t.jsonl [" in output and b"%" in output


# --------------------------------------------------------------------------- replay


def replay_proxy(folder: Path, recorded: Path, provider: FakeProvider, pki: ServerCert, mode: str) -> Mitmdump:
    config = {"replay": {"mode": mode, "source": str(recorded)}, "traces": {"destination": "replayed.jsonl"}}
    return Mitmdump(folder, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path)


def test_replay_answers_from_traces_per_tenant(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    with replay_proxy(tmp_path, recorded, provider, pki, "on") as proxy:
        env = proxy.client_env()
        before = (provider.connections, len(provider.requests))
        # Recorded as a stream, asked as a stream: replayed as a stream.
        result = drive({"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat("streamed question", stream=True)}, env)
        assert result["text"] == CANNED_REPLY and len(result["arrivals"]) >= 3
        # Recorded plain, asked as a stream: still an answer, as a stream.
        result = drive({"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat("first question", stream=True)}, env)
        assert result["text"] == CANNED_REPLY
        params = {"model": "claude-sonnet-4-5", "max_tokens": 9, "system": "be kind", "messages": [{"role": "user", "content": "anthropic question"}], "stream": True}
        assert drive({"client": "anthropic", "api_key": ANTHROPIC_KEY, "params": params}, env)["text"] == CANNED_REPLY
        result = drive({"client": "openai", "op": "responses", "api_key": OPENAI_KEY,
                        "params": {"model": "gpt-4o", "input": "responses question", "instructions": "be brief", "stream": True}}, env)
        assert result["text"] == CANNED_REPLY
        assert (provider.connections, len(provider.requests)) == before  # nothing went upstream

        def post(key: str, text: str) -> requests.Response:
            return requests.post("https://api.openai.com/v1/chat/completions", json=chat(text), headers={"Authorization": f"Bearer {key}"},
                                 proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)

        hit = post(OPENAI_KEY, "first question")
        assert hit.headers["x-llm-mitm-replay"] == "HIT" and hit.json()["choices"][0]["message"]["content"] == CANNED_REPLY
        other_tenant = post("sk-proj-" + "z" * 40, "first question")  # same question, another key
        assert other_tenant.headers["x-llm-mitm-replay"] == "MISS" and other_tenant.status_code == 200
        assert len(provider.requests) == before[1] + 1
        again = post("sk-proj-" + "z" * 40, "first question")  # the miss was recorded
        assert again.headers["x-llm-mitm-replay"] == "HIT"
        assert len(provider.requests) == before[1] + 1
    replayed = [orjson.loads(line) for line in (tmp_path / "replayed.jsonl").read_bytes().splitlines()]
    assert [r["replay"] for r in replayed] == ["hit", "hit", "hit", "hit", "hit", "miss", "hit"]
    assert all(r["cost_usd"] is None and r["usage"] is None for r in replayed if r["replay"] == "hit")  # nothing used upstream
    assert all(r["usage"]["input_tokens"] for r in replayed if r["replay"] == "miss")


def test_replay_keeps_organizations_projects_hosts_and_gateway_keys_apart(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """The same question asked by another organization, project, Azure resource, API
    Management subscription (its key in a header or the query) or gateway key is another tenant's: each
    goes upstream once, then is its own hit."""
    openai = "https://api.openai.com/v1/chat/completions"
    azure = "https://{}.openai.azure.com/openai/deployments/gpt-4o/chat/completions"
    bearer = {"Authorization": f"Bearer {OPENAI_KEY}"}
    subscription = ["fedcba987654321" + str(n) for n in range(4)]  # API Management keys: 16 hex digits and more
    callers: list[tuple[str, dict[str, str], dict[str, str]]] = [
        (openai, {**bearer, "OpenAI-Organization": "org-one"}, {}),
        (openai, {**bearer, "OpenAI-Organization": "org-two"}, {}),
        (openai, {**bearer, "OpenAI-Organization": "org-one", "OpenAI-Project": "proj_a"}, {}),
        (openai, {**bearer, "OpenAI-Organization": "org-one", "OpenAI-Project": "proj_b"}, {}),
        (azure.format("east"), {"api-key": AZURE_KEY}, {}),
        (azure.format("west"), {"api-key": AZURE_KEY}, {}),
        (azure.format("east"), {"Ocp-Apim-Subscription-Key": subscription[0]}, {}),
        (azure.format("east"), {"Ocp-Apim-Subscription-Key": subscription[1]}, {}),
        (azure.format("east"), {}, {"subscription-key": subscription[2]}),
        (azure.format("east"), {}, {"subscription-key": subscription[3]}),
        # keys only a gateway's header carries (they were one tenant: no key)
        (openai, {"x-portkey-api-key": "pk-team-one-0123456789abcdef"}, {}),
        (openai, {"x-portkey-api-key": "pk-team-two-0123456789abcdef"}, {}),
        (openai, {"Helicone-Auth": "Bearer sk-helicone-two-0123456789abcdef"}, {}),
        # a credential in a header of no known name, or a session's cookie alone (a secrets probe: one tenant, no key)
        (openai, {"Token": "tenantA-0123456789abcdef"}, {}),
        (openai, {"Token": "tenantB-0123456789abcdef"}, {}),
        (openai, {"X-JWT": "tenantD-0123456789abcdef"}, {}),
        (openai, {"Authorization2": "tenantC-0123456789abcdef"}, {}),
        (openai, {"Cookie": "session=tenantA-0123456789"}, {}),
        (openai, {"Cookie": "session=tenantB-0123456789"}, {}),
        # tenants told apart by a credential beside a shared key: API Management's subscription
        # key beside a placeholder `api-key`, a user's Bearer beside a shared `x-api-key` (a tenancy probe)
        (azure.format("east"), {"api-key": "shared-placeholder-0000", "Ocp-Apim-Subscription-Key": "aaaa0000111122223333"}, {}),
        (azure.format("east"), {"api-key": "shared-placeholder-0000", "Ocp-Apim-Subscription-Key": "bbbb0000111122223333"}, {}),
        ("https://api.anthropic.com/v1/messages", {"x-api-key": ANTHROPIC_KEY, "Authorization": "Bearer user-alice-0123456789"}, {}),
        ("https://api.anthropic.com/v1/messages", {"x-api-key": ANTHROPIC_KEY, "Authorization": "Bearer user-bob-0123456789"}, {}),
        # a feature turned on by a header changes the answer's shape
        (openai, {**bearer, "OpenAI-Beta": "assistants=v2"}, {}),
        (openai, {**bearer, "OpenAI-Beta": "assistants=v1"}, {}),
    ]
    with replay_proxy(tmp_path, recorded, provider, pki, "on") as proxy:
        def ask(url: str, headers: dict[str, str], query: dict[str, str]) -> str:
            answer = requests.post(url, json=chat("which tenant am I"), headers=headers, params={"api-version": "2024-10-21", **query},
                                   proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.headers["x-llm-mitm-replay"]

        before = len(provider.requests)
        assert [ask(*caller) for caller in callers] == ["MISS"] * len(callers)
        assert [ask(*caller) for caller in callers] == ["HIT"] * len(callers)
        assert len(provider.requests) == before + len(callers)


def test_replay_lets_a_poll_see_a_background_response_settle(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """Each poll while the response is underway goes upstream; once settled it is recorded."""
    with replay_proxy(tmp_path, recorded, provider, pki, "on") as proxy:
        def poll(state: str | None) -> tuple[str, str]:
            answer = requests.get("https://api.openai.com/v1/responses/resp_polled", headers={"Authorization": f"Bearer {OPENAI_KEY}",
                                  **({"x-fake-stored-status": state} if state else {})}, proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)
            return answer.json()["status"], answer.headers["x-llm-mitm-replay"]

        assert [poll("queued"), poll("in_progress"), poll(None), poll("queued")] == [
            ("queued", "MISS"), ("in_progress", "MISS"), ("completed", "MISS"), ("completed", "HIT")]


def test_replay_tells_methods_apart(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A DELETE of a stored response is not answered with the GET of it recorded before."""
    with replay_proxy(tmp_path, recorded, provider, pki, "on") as proxy:
        def call(method: str) -> requests.Response:
            return requests.request(method, "https://api.openai.com/v1/responses/resp_kept", headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                                    proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)

        assert call("GET").headers["x-llm-mitm-replay"] == "MISS"
        assert call("GET").headers["x-llm-mitm-replay"] == "HIT"
        before = len(provider.requests)
        assert call("DELETE").headers["x-llm-mitm-replay"] == "MISS"
        assert len(provider.requests) == before + 1 and provider.requests[-1].method == "DELETE"


def test_replay_never_gives_one_upload_the_answer_of_another(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A trace keeps no upload (and no more than a sample of a text body): no key tells two
    apart, so such calls always go upstream and are never recorded for replay."""
    with replay_proxy(tmp_path, recorded, provider, pki, "on") as proxy:
        def upload(audio: bytes) -> requests.Response:
            return requests.post("https://api.openai.com/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, data={"model": "whisper-1"},
                                 headers={"Authorization": f"Bearer {OPENAI_KEY}"}, proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)

        before = len(provider.requests)
        answers = [upload(audio) for audio in (b"RIFF meeting one", b"RIFF meeting two", b"RIFF meeting one")]
        assert [a.headers["x-llm-mitm-replay"] for a in answers] == ["MISS"] * 3
        assert answers[0].json() != answers[1].json()  # each its own answer, from upstream
        assert len(provider.requests) == before + 3


def test_replay_strict_miss_is_a_clear_error(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    with replay_proxy(tmp_path, recorded, provider, pki, "strict") as proxy:
        before = len(provider.requests)
        m = marker()
        result = drive({"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat(m)}, proxy.client_env())
        assert result["error"] == "NotFoundError" and "replay_miss" in result["message"]
        assert len(provider.requests) == before
        ok = drive({"client": "openai", "op": "chat", "api_key": OPENAI_KEY, "params": chat("mini question", model="gpt-4o-mini")}, proxy.client_env())
        assert ok["text"] == CANNED_REPLY


def test_strict_replay_sends_nothing_upstream_whatever_stream_options_holds(recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A hit whose `stream_options` was no object (`"yes"`, a list) made the replay concern
    raise after it had marked the call a hit: the call went upstream in strict mode, traced
    as a hit and charged to no budget (a replay review, with curl-like requests)."""
    with replay_proxy(tmp_path, recorded, provider, pki, "strict") as proxy:
        before = len(provider.requests)
        for options in ("yes", ["include_usage"]):
            answer = requests.post("https://api.openai.com/v1/chat/completions", json={**chat("mini question", model="gpt-4o-mini"), "stream": True,
                                   "stream_options": options}, headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                                   proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)
            assert answer.headers.get("x-llm-mitm-replay") == "HIT", (answer.status_code, answer.text[:200])
            assert CANNED_REPLY in answer.text and answer.text.rstrip().endswith("data: [DONE]")
        assert len(provider.requests) == before
        assert "failed in Replay" not in proxy.output


def test_a_recording_that_cannot_be_replayed_is_refused_in_strict_mode_and_fetched_anew_otherwise(
        recorded: Path, tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """A recorded answer the replay cannot make into the stream asked for (its `choices`
    hold no objects: an edited or odd trace) made the replay concern raise, and a concern
    that raises is skipped: in strict mode the call went upstream. Strict refuses it; `on`
    fetches it anew and records that answer over the broken one."""
    records = [orjson.loads(line) for line in recorded.read_bytes().splitlines()]
    mini = next(r for r in records if r["model"] == "gpt-4o-mini")
    mini["response"]["body"]["choices"] = ["no object"]
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(orjson.dumps(mini) + b"\n")

    def ask(proxy: Mitmdump) -> requests.Response:
        return requests.post("https://api.openai.com/v1/chat/completions", json={**chat("mini question", model="gpt-4o-mini"), "stream": True},
                             headers={"Authorization": f"Bearer {OPENAI_KEY}"}, proxies={"https": proxy.proxy_url}, verify=str(proxy.ca_cert), timeout=30)

    with replay_proxy(tmp_path / "strict", broken, provider, pki, "strict") as proxy:
        before = len(provider.requests)
        answer = ask(proxy)
        assert (answer.status_code, answer.headers.get("x-llm-mitm-replay")) == (500, "MISS"), answer.text[:200]
        assert answer.json()["error"]["code"] == "replay_error"
        assert len(provider.requests) == before
        proxy.wait_for_output("replay could not answer this call; it is refused")
    traced = [orjson.loads(line) for line in (tmp_path / "strict" / "replayed.jsonl").read_bytes().splitlines()]
    assert [(r["replay"], r["status_code"], r["policy"]["rule"]) for r in traced] == [("miss", 500, "replay_error")]
    with replay_proxy(tmp_path / "on", broken, provider, pki, "on") as proxy:
        before = len(provider.requests)
        first, again = ask(proxy), ask(proxy)
        assert (first.status_code, first.headers.get("x-llm-mitm-replay")) == (200, "MISS")
        assert (again.status_code, again.headers.get("x-llm-mitm-replay")) == (200, "HIT")
        assert all(a.text.rstrip().endswith("data: [DONE]") and '"content":"Hello' in a.text for a in (first, again))
        assert len(provider.requests) == before + 1


def test_replay_reads_feature_headers_alike_live_and_from_a_trace() -> None:
    """A trace joins a repeated header (`b, a`); a call may send it twice, in any order."""
    from llm_mitm.replay import features

    assert features([("Anthropic-Beta", "a"), ("anthropic-beta", "b"), ("x-other", "c")]) == features({"anthropic-beta": "b, a"}.items())
    assert features([("OpenAI-Beta", "assistants=v2")]) != features([("OpenAI-Beta", "assistants=v1")])
    assert features([("content-type", "application/json")]) == ""


def test_replay_names_a_tenant_alike_live_and_from_a_trace() -> None:
    """Every credential header sent is part of who asks, read the same from the headers as
    the proxy redacts them and as a restart reads them back from the trace."""
    from llm_mitm.redact import Redactor
    from llm_mitm.replay import ReplayIndex, request_key, tenant

    redactor = Redactor()
    url, body = "https://res.openai.azure.com/openai/deployments/d/chat/completions", {"model": "d", "messages": []}
    index = ReplayIndex()
    for subscription in ("aaaa0000111122223333", "bbbb0000111122223333"):
        pairs = [("api-key", "shared-placeholder-0000"), ("Ocp-Apim-Subscription-Key", subscription), ("Content-Type", "application/json")]
        headers = redactor.headers_dict(pairs)
        caller = redactor.credential("shared-placeholder-0000")
        live = request_key("azure", "POST", url, tenant(caller, None, None, headers), body)
        record = {"provider": "azure", "method": "POST", "url": url, "api_key": caller, "status_code": 200, "api": "openai",
                  "operation": "chat.completions", "request": {"body": body, "headers": headers}, "response": {"body": {"id": subscription}}}
        index.add_record(orjson.loads(orjson.dumps(record)))  # as a trace line reads back
        assert index.find(live).body == {"id": subscription}
    assert len(index) == 2
    # a cookie upstream set and the client sends back (a rotating `__cf_bm`) is no other tenant (a review: recordings stopped replaying)
    caller = redactor.credential(OPENAI_KEY)
    with_cookies = [tenant(caller, None, None, redactor.headers_dict([("Authorization", f"Bearer {OPENAI_KEY}"), ("Cookie", f"__cf_bm={n}" * 3)]))
                    for n in ("first-cookie-value", "second-cookie-value")]
    assert with_cookies[0] == with_cookies[1] == [caller, None, None]


def test_replay_records_no_state_still_underway() -> None:
    """A background response, a run or a batch polled till it settles: the first state seen
    answered every later poll (a review), so only a settled one is recorded."""
    from llm_mitm.replay import ReplayIndex, request_key, settled

    assert not settled({"id": "resp_1", "status": "queued"}) and not settled({"processing_status": "in_progress"})
    # a creation's answer is recorded as it was, underway or not (a review: strict replay of a batch's creation became a 404)
    created = ReplayIndex()
    created.add_record({"provider": "openai", "method": "POST", "url": "https://api.openai.com/v1/batches", "status_code": 200, "api_key": "…k#0011223344556677",
                        "operation": "batches", "request": {"body": {"input_file_id": "file-1"}, "headers": {}}, "response": {"body": {"status": "validating"}}})
    assert len(created) == 1
    assert settled({"id": "resp_1", "status": "completed"}) and settled({"choices": []}) and settled([{"status": "queued"}])
    index = ReplayIndex()
    url = "https://api.openai.com/v1/responses/resp_1"
    for state in ("in_progress", "completed"):
        index.add_record({"provider": "openai", "method": "GET", "url": url, "status_code": 200, "api_key": "…k#0011223344556677",
                          "operation": "responses", "request": {"body": None, "headers": {}}, "response": {"body": {"id": "resp_1", "status": state}}})
        key = request_key("openai", "GET", url, ["…k#0011223344556677", None, None], None)
        assert (index.find(key) is not None) is (state == "completed")


def test_replay_keys_of_keys_in_the_query_stay_apart() -> None:
    """A redacted query key is a fingerprint with a '#' in it: two tenants' keys that end
    alike must not share a recorded answer."""
    from llm_mitm.redact import Redactor
    from llm_mitm.replay import request_key

    redactor = Redactor()
    keys = [request_key("gemini", "POST", redactor.url(f"https://h/v1/chat/completions?key={key}wxyz"), (None, None, None), {"model": "m"})
            for key in ("AIzaSyA" + "a" * 28, "AIzaSyB" + "b" * 28)]
    assert keys[0] != keys[1]


def test_the_tools_and_replay_read_the_files_a_trace_was_rotated_into(tmp_path: Path) -> None:
    """`traces.max_bytes` rotates traces.jsonl into .1, .2, ...: the tools counted only the
    newest file, and replay forgot every answer recorded before a rotation (a probe)."""
    from llm_mitm.replay import ReplayIndex, request_key

    trace = tmp_path / "traces.jsonl"
    questions = {"traces.jsonl.2": ["oldest"], "traces.jsonl.1": ["older", "older again"], "traces.jsonl": ["newest"]}
    for name, asked in questions.items():
        lines = [orjson.dumps({**chat_record(q, {"role": "assistant", "content": f"re: {q}"}), "url": "https://api.openai.com/v1/chat/completions", "method": "POST"})
                 for q in asked]
        (tmp_path / name).write_bytes(b"\n".join(lines) + (b"\nnot json\n" if name.endswith(".1") else b"\n"))
    (tmp_path / "traces.jsonl.4").write_bytes(b"")  # past a gap: not one of them
    stats = cli("stats", str(trace), "--json")
    assert orjson.loads(stats.stdout)["total"]["requests"] == 4, stats.stderr
    assert "1 line(s) that are not JSON records were skipped (line traces.jsonl.1:3)" in stats.stderr
    exported = tmp_path / "train.jsonl"
    assert cli("export", str(trace), "-o", str(exported)).returncode == 0
    assert [orjson.loads(line)["messages"][0]["content"] for line in exported.read_bytes().splitlines()] == ["oldest", "older", "older again", "newest"]
    index = ReplayIndex()
    index.load(trace)
    for asked in questions.values():
        for question in asked:
            key = request_key("openai", "POST", "https://api.openai.com/v1/chat/completions", (None, None, None),
                              {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]})
            assert index.find(key) is not None, question
    folder = tmp_path / "per-exchange" / "2026-12-06"  # a traces.directory: one file per exchange
    folder.mkdir(parents=True)
    (folder / "120000-a.json").write_bytes(orjson.dumps({**chat_record("newest", {"role": "assistant", "content": "x"}),
                                                        "url": "https://api.openai.com/v1/chat/completions", "method": "POST"}))
    from_folder = ReplayIndex()
    from_folder.load(tmp_path / "per-exchange")
    assert len(from_folder) == 1


def test_stats_counts_the_calls_no_price_is_known_for(tmp_path: Path) -> None:
    """Their cost is null, not nothing: a total that left them out showed $0 for a model
    of your own (a probe)."""
    trace = tmp_path / "traces.jsonl"
    priced = {**chat_record("a", {"role": "assistant", "content": "b"}), "usage": {"input_tokens": 10, "output_tokens": 5}, "cost_usd": 0.0001}
    unpriced = {**priced, "model": "my-finetune", "cost_usd": None}
    trace.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in (priced, unpriced, unpriced)))
    result = orjson.loads(cli("stats", str(trace), "--json").stdout)
    assert result["groups"]["my-finetune"]["unpriced"] == 2 and result["groups"]["gpt-4o"]["unpriced"] == 0
    assert result["total"]["unpriced"] == 2 and result["total"]["cost_usd"] == pytest.approx(0.0001)
    table = cli("stats", str(trace)).stdout.splitlines()
    assert table[-1].split()[6:8] == ["0.000100", "2"]


REPLAYED_CHAT = {"id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
                              "finish_reason": "stop", "logprobs": None}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}
REPLAYED_RESPONSE = {"id": "resp_r", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-4o-2024-08-06",
                     "output": [{"type": "message", "id": "msg_r", "status": "completed", "role": "assistant",
                                 "content": [{"type": "output_text", "text": "Two words.", "annotations": []}]},
                                {"type": "function_call", "id": "fc_r", "call_id": "call_r", "name": "lookup", "arguments": "{\"q\": \"x\"}", "status": "completed"}],
                     "usage": {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9}}
REPLAYED_MESSAGE = {"id": "msg_x", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
                    "content": [{"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCkgIARABGAIiQL" + "s" * 40},
                                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix" + "d" * 20},
                                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "weather"}},
                                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                                 "content": [{"type": "web_search_result", "url": "https://example.com", "title": "Ex", "encrypted_content": "abc", "page_age": None}]},
                                {"type": "text", "text": "Sunny.", "citations": [{"type": "web_search_result_location", "url": "https://example.com",
                                                                                 "title": "Ex", "encrypted_index": "ei", "cited_text": "sunny"}]}],
                    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 20}}


def test_a_replayed_stream_gives_the_sdks_the_recorded_answer_whole(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """Recorded plain, asked as a stream, rebuilt by the SDKs' stream helpers: a refusal was
    dropped, the Responses snapshot held its text twice, a thinking block lost its signature
    (the next turn would be refused) and result blocks were given input deltas (a probe)."""
    from llm_mitm.redact import Redactor

    redactor = Redactor()
    chat_params = {"model": "gpt-4o", "messages": [{"role": "user", "content": "something refused"}]}
    responses_params = {"model": "gpt-4o", "input": "two words", "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}
    message_params = {"model": "claude-sonnet-4-5", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 1024},
                      "messages": [{"role": "user", "content": "weather?"}]}
    source = tmp_path / "source.jsonl"
    records = [
        ("openai", "chat.completions", "https://api.openai.com/v1/chat/completions", OPENAI_KEY, chat_params, REPLAYED_CHAT),
        ("openai", "responses", "https://api.openai.com/v1/responses", OPENAI_KEY, responses_params, REPLAYED_RESPONSE),
        ("anthropic", "messages", "https://api.anthropic.com/v1/messages", ANTHROPIC_KEY, message_params, REPLAYED_MESSAGE),
    ]
    source.write_bytes(b"".join(orjson.dumps({
        "provider": provider_name, "api": provider_name, "operation": operation, "method": "POST", "url": url, "status_code": 200,
        "api_key": redactor.credential(key), "request": {"body": params, "size": 10}, "response": {"body": body}}) + b"\n"
        for provider_name, operation, url, key, params, body in records))
    with replay_proxy(tmp_path, source, provider, pki, "strict") as proxy:
        env, before = proxy.client_env(), len(provider.requests)
        chat_final = drive({"client": "openai", "op": "chat_final", "api_key": OPENAI_KEY, "params": chat_params}, env)["final"]
        assert chat_final["choices"][0]["message"]["refusal"] == "I can't help with that."
        assert chat_final["choices"][0]["message"]["content"] is None and chat_final["choices"][0]["finish_reason"] == "stop"
        streamed = drive({"client": "openai", "op": "responses_final", "api_key": OPENAI_KEY, "params": responses_params}, env)
        assert streamed["snapshots"] == ["Two words."]
        assert [item["type"] for item in streamed["final"]["output"]] == ["message", "function_call"]
        assert streamed["final"]["output"][0]["content"][0]["text"] == "Two words."
        assert streamed["final"]["output"][1]["arguments"] == "{\"q\": \"x\"}"
        message = drive({"client": "anthropic", "api_key": ANTHROPIC_KEY, "params": {**message_params, "stream": True}}, env)["final"]
        plain = drive({"client": "anthropic", "api_key": ANTHROPIC_KEY, "params": message_params}, env)["final"]
        assert message["content"] == plain["content"]
        assert message["content"][0]["signature"] == REPLAYED_MESSAGE["content"][0]["signature"]
        assert message["content"][2]["input"] == {"query": "weather"} and message["content"][1]["data"].startswith("EmwK")
        assert message["content"][3]["content"][0]["url"] == "https://example.com"
        assert message["content"][4]["text"] == "Sunny." and message["content"][4]["citations"][0]["cited_text"] == "sunny"
        assert len(provider.requests) == before


LEGACY_COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
                     "choices": [{"text": "Hi there", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
ANTHROPIC_COMPLETION = {"type": "completion", "id": "compl_1", "completion": " Hello there.", "stop_reason": "stop_sequence",
                        "model": "claude-2.1", "stop": "\n\nHuman:", "log_id": "compl_1"}


@pytest.mark.parametrize(("api", "body"), [("openai", LEGACY_COMPLETION), ("anthropic", ANTHROPIC_COMPLETION)])
def test_a_legacy_completion_replayed_as_a_stream_is_read_back_whole(api: str, body: dict[str, Any]) -> None:
    """Legacy completions were replayed as chat chunks (OpenAI: empty deltas, the text
    lost) or as Messages events (Anthropic's `/v1/complete`): a traces probe."""
    from llm_mitm.replay import Recorded, as_stream
    from llm_mitm.sse import StreamTap, rebuilder_for

    stream = as_stream(Recorded(api, "completions", 200, body), include_usage=True)
    tap = StreamTap(rebuilder_for(api, "completions"))
    tap(stream)
    tap.finish()
    rebuilt = tap.rebuilder.result()
    if api == "openai":
        assert stream.count(b'"object":"text_completion"') == 3 and rebuilt["usage"] == body["usage"]
        assert [(choice["text"], choice["finish_reason"]) for choice in rebuilt["choices"]] == [("Hi there", "stop")]
    else:
        assert stream.startswith(b"event: completion\n") and rebuilt == body


def test_a_chat_answer_of_every_kind_goes_to_a_stream_and_back_whole() -> None:
    """A deprecated function call, an audio answer, reasoning and citations were left out of
    a replayed stream and of a stream's rebuilt trace (its estimate then 0 tokens, its export
    and its replay empty): a usage probe."""
    from llm_mitm.replay import Recorded, as_stream
    from llm_mitm.sse import StreamTap, rebuilder_for

    citation = {"type": "url_citation", "url_citation": {"url": "https://example.org", "title": "e", "start_index": 0, "end_index": 2}}
    messages = [
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"role": "assistant", "content": None, "audio": {"id": "audio_1", "data": "UklGRg==", "expires_at": 1700000000, "transcript": "Hello world"}},
        {"role": "assistant", "content": "ok", "reasoning_content": "thought it through", "annotations": [citation]},
    ]
    body = {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": i, "message": m, "finish_reason": "stop"} for i, m in enumerate(messages)]}
    tap = StreamTap(rebuilder_for("openai", "chat.completions"))
    tap(as_stream(Recorded("openai", "chat.completions", 200, body), include_usage=False))
    tap.finish()
    assert [choice["message"] for choice in tap.rebuilder.result()["choices"]] == messages


def test_a_legacy_completion_replays_to_the_sdk_as_a_stream(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    from llm_mitm.redact import Redactor

    params = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}
    source = tmp_path / "source.jsonl"
    source.write_bytes(orjson.dumps({"provider": "openai", "api": "openai", "operation": "completions", "method": "POST",
                                     "url": "https://api.openai.com/v1/completions", "status_code": 200, "api_key": Redactor().credential(OPENAI_KEY),
                                     "request": {"body": params, "size": 10}, "response": {"body": LEGACY_COMPLETION}}) + b"\n")
    with replay_proxy(tmp_path, source, provider, pki, "strict") as proxy:
        result = drive({"client": "openai", "op": "method", "method": "completions.create", "api_key": OPENAI_KEY,
                        "params": {**params, "stream": True}}, proxy.client_env())
    chunks = result["chunks"]
    assert "".join(choice["text"] for chunk in chunks for choice in chunk["choices"]) == "Hi there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("args", "said"), [(("report", "t.jsonl", "--max-calls", "-1"), "--max-calls: -1 is fewer than none"),
                                            (("report", "t.jsonl", "--max-calls", "all"), "--max-calls: 'all' is not a whole number"),
                                            (("env", "--port", "70000"), "--port: 70000 is no TCP port (1-65535)")])
def test_a_number_out_of_its_range_is_a_usage_error(args: tuple[str, ...], said: str) -> None:
    """A negative count listed no calls, without a word (a config probe)."""
    result = cli(*args)
    assert result.returncode == 2 and said in result.stderr, result.stderr


def test_stats_and_export_show_what_a_client_named_as_text_on_the_terminal(tmp_path: Path) -> None:
    """A model's name is what a client sent: its escape sequences went to the terminal as they
    were (a window title set, a line erased) and a line break forged a row of the table; a
    Responses item's type, in export's summary, alike (a trace tools probe)."""
    trace = tmp_path / "traces.jsonl"
    evil = "evil\x1b]0;OWNED\x07\x1b[2K\rTOTAL 0\nfake-row   999"
    named = {**chat_record("a", {"role": "assistant", "content": "b"}), "model": evil, "usage": {"input_tokens": 1, "output_tokens": 1}, "cost_usd": 0.5}
    item = {"provider": "openai", "status_code": 200, "operation": "responses", "api": "openai", "model": "gpt-4o",
            "request": {"body": {"model": "gpt-4o", "input": [{"type": "\x1b[31mred\x1b[0m"}]}}, "response": {"body": {"output": []}}}
    trace.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in (named, item)))
    table = cli("stats", str(trace))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "\x1b" not in table.stdout and "\r" not in table.stdout and len(lines) == 6  # head, rule, 2 groups, rule, total
    assert len({len(line) for line in lines}) == 1  # still aligned
    assert any(line.startswith("evil\\x1b]0;OWNED\\x07\\x1b[2K\\rTOTAL 0\\nfake-row   999 ") for line in lines), lines
    assert orjson.loads(cli("stats", str(trace), "--json").stdout)["groups"][evil]["requests"] == 1  # JSON says it as it is
    exported = cli("export", str(trace), "-o", str(tmp_path / "train.jsonl"))
    assert exported.returncode == 0 and "\x1b" not in exported.stderr and "unsupported item \\x1b[31mred\\x1b[0m" in exported.stderr, exported.stderr


def test_a_trace_that_cannot_be_read_is_said_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A trace file the user may not read: stats ended in a traceback, and export and report
    said they could not write their output, which was fine (a trace tools probe)."""
    import builtins

    from llm_mitm import tracefile
    from llm_mitm.cli import main

    traces = tmp_path / "t.jsonl"
    traces.write_bytes(orjson.dumps(chat_record("q", {"role": "assistant", "content": "a"})) + b"\n")

    def refused(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == traces:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(tracefile, "open", refused, raising=False)  # as an unreadable file is for a user other than root
    for command, output in (("stats", []), ("export", ["-o", str(tmp_path / "out")]), ("report", ["-o", str(tmp_path / "out")])):
        assert main([command, str(traces), *output]) == 2
        assert capsys.readouterr().err == f"llm-mitm {command}: cannot read {traces}: Permission denied\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_a_report_of_many_different_errors_stays_in_bounded_memory() -> None:
    """Each error was kept by its text: a client rate-limited for hours (each message says its
    own counts) grew the report by ~300 bytes a call, 148 MB for a 200 MB trace (a trace
    tools probe). The rarest are let go; the totals and the commonest stay."""
    from llm_mitm.report import TOP_KEPT, collect, render

    def failed(error: str, blocked: bool = False) -> dict[str, Any]:
        record = {**chat_record("q", {"role": "assistant", "content": "a"}), "status_code": 429, "error": error}
        return {**record, "policy": {"decision": "block", "rule": "max_tokens", "detail": error}} if blocked else record

    records = [failed("Rate limit reached: Used 29000, Requested %d" % i, blocked=i % 2 == 1) for i in range(20 * TOP_KEPT)]
    records[::7] = [failed("upstream timeout")] * len(records[::7])
    data = collect(records)
    assert len(data.errors) <= 2 * TOP_KEPT and len(data.blocks) <= 2 * TOP_KEPT
    timeouts = len(records[::7])
    assert data.errors.most_common(1) == [("upstream timeout", timeouts)]
    page = render(data)
    assert f"{sum(r.get('policy') is None for r in records)} errors · {sum(r.get('policy') is not None for r in records)} blocked" in page


def test_a_traces_directory_is_read_a_folder_at_a_time(tmp_path: Path) -> None:
    """Every path of a traces.directory was listed and sorted before the first was read
    (~460 bytes a file: 117 MB for 200,000 calls, a trace tools probe); a day's folder at
    a time, in the same order, and the files of each day are all the memory it takes."""
    record = orjson.dumps(chat_record("q", {"role": "assistant", "content": "a"}))

    def directory(name: str, days: int, per_day: int) -> Path:
        root = tmp_path / name
        for day in range(days):
            folder = root / f"2026-01-{day + 1:02d}"
            folder.mkdir(parents=True)
            for i in range(per_day):
                (folder / f"{i:06d}.000000-{'f' * 32}.json").write_bytes(record)
        return root

    small, big = directory("small", 2, 3000), directory("big", 20, 3000)
    small_rss, _ = peak_rss_mb(LLM_MITM, "stats", str(small), "--json")
    big_rss, result = peak_rss_mb(LLM_MITM, "stats", str(big), "--json")
    assert result.returncode == 0 and orjson.loads(result.stdout)["total"]["requests"] == 60_000, result.stderr
    assert big_rss - small_rss < 8, (small_rss, big_rss)  # ten times the files, not ten times the memory
    from llm_mitm.tracefile import ReadReport, read_directory

    (big / "2026-01-03" / "nested").mkdir()
    (big / "2026-01-03" / "nested" / "x.json").write_bytes(record)
    (big / "2026-01-03" / "notes.txt").write_text("not a record, not a .json")
    (big / "2026-01-04" / "bad.json").write_text("{")
    report = ReadReport()
    assert sum(1 for _ in read_directory(big, report)) == 60_001
    assert report.invalid_files == ["2026-01-04/bad.json"]
