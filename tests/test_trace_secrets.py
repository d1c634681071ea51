"""What the trace writer writes of a call's secrets beyond their shapes: the credentials the
request itself sent, echoed back; names like a credential's in URLs and forms; the model
fields; the writer process's own log lines."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from llm_mitm.redact import Redactor
from llm_mitm.trace import build_record
from tests.support.mitm import schema_checked
from tests.test_tracesink import deferred, records, sink, snapshot

UNSHAPED = "vllm-XYZZYnoShapeAtAll0"  # a key of no known shape (vLLM --api-key, LiteLLM virtual keys)


def written(snap: dict) -> str:
    """The record as the writer writes it, held to the schema."""
    return orjson.dumps(schema_checked(orjson.dumps(build_record(snap, Redactor())))).decode()


@pytest.mark.parametrize("header", ["authorization", "api-key", "x-api-key"])
def test_a_sent_key_of_no_shape_echoed_back_is_replaced_everywhere(header: str) -> None:
    snap = snapshot(1)
    sent = f"Bearer {UNSHAPED}" if header == "authorization" else UNSHAPED
    snap.update(
        url=f"https://localhost:8000/v1/chat/completions?api-key={UNSHAPED}x&echo=1",
        request_headers=[["content-type", "application/json"], [header, sent]],
        request=[40, "json", {"model": "m", "messages": [{"role": "user", "content": f"is {UNSHAPED}x mine?"}]}],
        status_code=401,
        response_headers=[["content-type", "application/json"], ["x-echo", f"key={UNSHAPED}"]],
        response=[80, "json", {"error": {"message": f"Incorrect API key provided: {UNSHAPED}.", "code": "invalid_api_key"}}],
        error=f"Incorrect API key provided: {UNSHAPED}.",
    )
    text = written(snap)
    assert "XYZZY" not in text, text
    record = orjson.loads(text)
    fingerprint = Redactor().fingerprint(UNSHAPED)
    assert record["error"] == f"Incorrect API key provided: {fingerprint}."
    assert record["response"]["headers"]["x-echo"] == f"key={fingerprint}"
    assert record["response"]["body"]["error"]["code"] == "invalid_api_key"


def test_a_short_or_absent_credential_changes_nothing() -> None:
    snap = snapshot(2)
    snap.update(request_headers=[["authorization", "Bearer abc123"]], error="abc123 is not a key: keep abc123")
    assert orjson.loads(written(snap))["error"] == "abc123 is not a key: keep abc123"


def test_names_like_a_credential_s_in_the_url_and_a_form_body() -> None:
    snap = snapshot(3)
    snap.update(
        url="https://api.openai.com/v1/models?q=GITHUB_TOKEN=ghpXYZZY1&r=GITHUB_TOKEN%3DghpXYZZY2&s=1",
        request_headers=[["content-type", "application/x-www-form-urlencoded"]],
        request=[60, "text", "q=GITHUB_TOKEN%3DghpXYZZY3&token=XYZZY4&n=1"],
    )
    record = orjson.loads(written(snap))
    assert "XYZZY" not in orjson.dumps(record).decode(), record
    assert record["url"].endswith("&s=1") and record["request"]["body"].endswith("&n=1")
    text = snapshot(4)
    text.update(request_headers=[["content-type", "text/plain"]], request=[20, "text", "a%3Db token=hello"])
    assert orjson.loads(written(text))["request"]["body"] == "a%3Db token=hello"  # not URL-encoded: read as it is


def test_model_fields_and_the_policy_s_detail_are_redacted() -> None:
    """A key sent as the model (two environment variables swapped)."""
    key = "sk-proj-" + "XYZZY" * 10
    snap = snapshot(5)
    snap.update(model=key, response_model=f"ft:gpt-4o:acme:{key}", route=["azure", "openai", "chat.completions", key],
                policy=["block", "allowed_models", f"model {key!r} is not allowed"])
    record = orjson.loads(written(snap))
    assert "XYZZY" not in orjson.dumps(record).decode(), record
    assert record["model"] == Redactor().fingerprint(key) and record["policy"]["detail"].startswith("model 'sk-proj-…")
    assert orjson.loads(written(snapshot(6)))["model"] == "gpt-4o"


def test_the_writer_process_logs_through_the_redaction(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Its log lines go to mitmdump's stderr: an unpriced model holding a key is named there."""
    key = "sk-proj-" + "XYZZY" * 10
    body = orjson.dumps({"model": f"ft:gpt-4o:acme:{key}", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    traces, destination = sink(tmp_path)
    traces.submit(deferred(7, body))
    traces.close()
    assert len(records(destination)) == 1
    err = capfd.readouterr().err
    assert "no price for model" in err and "ft:gpt-4o:acme:sk-proj-…" in err
    assert "XYZZY" not in err


@pytest.mark.parametrize(("content_type", "encoding"), [
    ("text/plain; charset=utf-16", "utf-16"),
    ('text/plain; Charset="UTF-16LE"', "utf-16-le"),
    ("text/plain", "utf-16"),  # no charset named: its byte order mark tells
    ("application/json", "utf-32"),  # JSON that does not parse, in UTF-32
    ("text/plain; charset=no-such-charset", "utf-8"),
])
def test_a_text_body_is_read_in_its_charset_before_a_key_is_looked_for(content_type: str, encoding: str) -> None:
    """Read as UTF-8, UTF-16 put a NUL between every two letters: no key shape was found and
    the key went into the trace, readable once the NULs are taken out (a secrets probe)."""
    from llm_mitm.exchange import Body

    key = "sk-proj-" + "U7x" * 14
    body = Body.parse(f"my key: {key} {{".encode(encoding), content_type)
    assert body.text is not None and body.text.startswith("my key: sk-proj-")
    assert "U7xU7x" not in Redactor().text(body.text)
