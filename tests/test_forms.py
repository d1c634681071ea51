"""An upload's fields, read as servers read them, or not at all."""

from __future__ import annotations

import pytest

import orjson

from llm_mitm.forms import BATCH, read_form

TYPE = "multipart/form-data; boundary=XX"


def form(*parts: bytes, boundary: bytes = b"XX") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"


def field(name: str, value: bytes, *headers: bytes) -> bytes:
    return b"".join(h + b"\r\n" for h in headers) + b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value


def test_fields_are_read_whatever_the_header_order_and_values_kept_as_sent() -> None:
    body = form(field("model", b"gpt-image-1", b"Content-Type: text/plain; charset=utf-8"), field("prompt", b"line one\r\nline two\n\xc3\xa9"),
                b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--X')
    assert read_form(body, TYPE).fields == {"model": "gpt-image-1", "prompt": "line one\r\nline two\n\u00e9"}
    assert read_form(body, 'multipart/form-data; boundary="XX"') == read_form(body, TYPE)
    assert read_form(b"a preamble (RFC 2046)\r\n" + body, TYPE) == read_form(body, TYPE)


def test_a_realtime_session_is_read_as_json() -> None:
    session = b'{"type": "realtime", "model": "gpt-realtime", "instructions": "be brief", "voice": "x"}'
    assert read_form(form(field("sdp", b"v=0"), field("session", session)), TYPE).fields == {"model": "gpt-realtime", "instructions": "be brief"}
    assert read_form(form(field("session", b"not json")), TYPE).fields == {}


@pytest.mark.parametrize(("body", "content_type"), [
    (form(field("model", b"a"), field("model", b"b")), TYPE),  # which one counts differs between servers
    (form(field("prompt", b"a"), field("prompt", b"b")), TYPE),
    (form(field("model", b"a"))[:-4], TYPE),  # unfinished
    (form(field("model", b"a")).replace(b"\r\n", b"\n"), TYPE),  # bare line feeds
    (form(field("model", b"a")), "multipart/form-data"),  # no boundary
    (form(field("model", b"a"), boundary=b"YY"), TYPE),
    (form(b"Content-Type: text/plain\r\n\r\nno name"), TYPE),
    (b"--XX--\r\n", TYPE),  # no parts at all
])
def test_a_form_not_well_made_is_unreadable(body: bytes, content_type: str) -> None:
    assert read_form(body, content_type) is None


def test_files_are_passed_over_and_other_fields_ignored() -> None:
    audio = b"RIFF" + bytes(1 << 20)
    body = form(b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + audio, field("language", b"en"),
                field("model", b"whisper-1"))
    assert read_form(body, TYPE).fields == {"model": "whisper-1"}
    assert read_form(body, TYPE, files=True).parts is None  # only a batch file is kept


CALLS = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o", "max_tokens": 5000, "messages": []}},
         {"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": "x"}}]


def batch_upload(lines: bytes, purpose: bytes = b"batch") -> bytes:
    return form(field("purpose", purpose), b'Content-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
                b"Content-Type: application/octet-stream\r\nContent-Length: " + str(len(lines)).encode() + b"\r\n\r\n" + lines)


def test_a_batch_files_calls_are_read_and_written_anew() -> None:
    lines = b"".join(orjson.dumps(call) + b"\r\n" for call in CALLS) + b"\n"
    upload = read_form(batch_upload(lines), TYPE, files=True)
    assert upload.fields == {BATCH: CALLS}
    assert read_form(batch_upload(lines), TYPE).fields == {}  # not an upload to `files`
    assert read_form(batch_upload(lines, b"fine-tune"), TYPE, files=True).fields == {}
    clamped = [{**CALLS[0], "body": {**CALLS[0]["body"], "max_tokens": 100}}, CALLS[1]]
    written, content = upload.with_batch(clamped)
    assert written.fields == {BATCH: clamped}
    again = read_form(content, TYPE, files=True)
    assert again.fields == {BATCH: clamped} and again.parts[0].content == b"batch"
    assert b"Content-Length" not in content and b'filename="b.jsonl"' in content


@pytest.mark.parametrize("lines", [b"{not json}\n", b'{"url": "/v1/chat/completions"}\n', b"[1]\n", b'{"url": 1, "body": {}}'])
def test_a_batch_file_that_is_not_one_call_a_line_is_unreadable(lines: bytes) -> None:
    assert read_form(batch_upload(orjson.dumps(CALLS[0]) + b"\n" + lines), TYPE, files=True) is None
