"""An upload's fields, read as servers read them, or not at all."""

from __future__ import annotations

import io

import pytest
from python_multipart import parse_form

import orjson

from llm_mitm.forms import BATCH, UPLOADED_TEXT, read_form

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
    assert read_form(form(field("sdp", b"v=0"), field("session", session)), TYPE).fields == orjson.loads(session)
    for session in (b"not json", b'{"model": NaN}', b"[1]"):  # Python's json (a server's) reads NaN; orjson does not
        assert read_form(form(field("session", session)), TYPE) is None


def test_a_webrtc_calls_session_is_judged_as_the_same_session_sent_as_json() -> None:
    """Its transcription model ran unjudged, and a transcription-only session was refused as
    naming no model, where the same session as JSON was judged by it (a firewall probe)."""
    from llm_mitm.config import PolicyConfig, default_config
    from llm_mitm.policy import Policy, RequestView
    from llm_mitm.providers import ProviderMatcher

    routes = ProviderMatcher(default_config().enabled_providers)
    calls, secrets = (routes.route("api.openai.com", 443, path) for path in ("/v1/realtime/calls", "/v1/realtime/client_secrets"))
    allowed = Policy(PolicyConfig(allowed_models=["gpt-realtime", "gpt-4o-mini-transcribe"], denied_models=["whisper-1"]))
    for transcriber, verdict in (("gpt-4o-mini-transcribe", None), ("gpt-4o-transcribe", "model_not_allowed"), ("whisper-1", "model_not_allowed")):
        for session in ({"type": "realtime", "model": "gpt-realtime", "audio": {"input": {"transcription": {"model": transcriber}}}},
                        {"type": "transcription", "audio": {"input": {"transcription": {"model": transcriber}}}}):
            fields = read_form(form(field("sdp", b"v=0"), field("session", orjson.dumps(session))), TYPE).fields
            found = allowed.check(RequestView(calls, fields.get("model"), fields, media="form"))
            assert (found.rule if found else None) == verdict, (transcriber, session)
            found = allowed.check(RequestView(secrets, session.get("model"), {"session": session}))
            assert (found.rule if found else None) == verdict, (transcriber, session)


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
                b"Content-Disposition: form-data; name=\"image\"; filename=\"caf%C3%A9.png\"; filename*=utf-8''caf%C3%A9.png\r\n\r\nPNG",
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
    assert read_form(batch_upload(lines, b" Batch\r\n"), TYPE, files=True).fields == {BATCH: CALLS}  # as a lenient server might read it
    clamped = [{**CALLS[0], "body": {**CALLS[0]["body"], "max_tokens": 100}}, CALLS[1]]
    written, content = upload.with_batch(clamped)
    assert written.fields == {BATCH: clamped}
    again = read_form(content, TYPE, files=True)
    assert again.fields == {BATCH: clamped} and again.parts[0].content == b"batch"
    assert b"Content-Length" not in content and b'filename="b.jsonl"' in content


@pytest.mark.parametrize("lines", [b"{not json}\n", b'{"url": "/v1/chat/completions"}\n', b"[1]\n", b'{"url": 1, "body": {}}'])
def test_a_batch_file_that_is_not_one_call_a_line_is_unreadable(lines: bytes) -> None:
    assert read_form(batch_upload(orjson.dumps(CALLS[0]) + b"\n" + lines), TYPE, files=True) is None


def server_reads(body: bytes, content_type: str) -> dict[str, str] | None:
    """The fields as an OpenAI-compatible FastAPI server reads them (python-multipart,
    decoded by the request's charset as Starlette does); None where it refuses the form."""
    fields: dict[str, str] = {}
    charset = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p).get("charset", "utf-8")
    try:
        parse_form({"Content-Type": content_type, "Content-Length": str(len(body))}, io.BytesIO(body),
                   lambda f: fields.__setitem__(f.field_name.decode(), f.value.decode(charset)), lambda f: None)
    except Exception:  # noqa: BLE001 - a form the server refuses
        return None
    return {name: value for name, value in fields.items() if name in ("model", "prompt")}


_TAIL = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n--XX--\r\n'


@pytest.mark.parametrize(("disposition", "content_type"), [
    (b'form-data; name="model"', TYPE),
    (b'form-data; name=model; x=a"; name=y; z="', TYPE),  # python-multipart: model; Bottle's parser: y
    (b'form-data; name="model"; x="\\\\"; name="y"', TYPE),
    (b'form-data; name="x"; name="model"', TYPE),
    (b"form-data; name*=UTF-8''model", TYPE),
    (b'form-data;\tname="model"', TYPE),
    (b'attachment; name="model"', TYPE),
    (b'form-data; NAME="model"', TYPE),
    (b'form-data; name="mod%65l"', TYPE),
    (b'form-data; name="model"', TYPE + "; charset=utf-7"),  # the server decodes +AHc-hisper-2 as whisper-2
    (b'form-data; name="model"', TYPE + "; charset=UTF-8"),
])
def test_a_form_is_read_as_a_fastapi_server_reads_it_or_not_at_all(disposition: bytes, content_type: str) -> None:
    model = b"+AHc-hisper-2" if "utf-7" in content_type else b"whisper-2"
    body = b"--XX\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + model + b"\r\n" + _TAIL
    ours = read_form(body, content_type)
    assert ours is None or ours.fields == server_reads(body, content_type), (ours, server_reads(body, content_type))


def test_a_policy_field_in_another_charset_is_unreadable() -> None:
    part = b'Content-Disposition: form-data; name="prompt"\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n+AEk-gnore'
    assert read_form(form(part), TYPE) is None
    assert read_form(form(part.replace(b"utf-7", b"utf-8")), TYPE).fields == {"prompt": "+AEk-gnore"}


def test_a_fine_tuning_file_is_not_copied_but_a_batch_upload_is_kept_whole() -> None:
    lines = orjson.dumps(CALLS[0]) + b"\n"
    file = b'Content-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n' + lines
    assert read_form(form(field("purpose", b"fine-tune"), file), TYPE, files=True).parts is None
    upload = read_form(form(field("expires_after[anchor]", b"created_at"), file, field("purpose", b"batch")), TYPE, files=True)
    assert [part.name for part in upload.parts] == ["expires_after[anchor]", "file", "purpose"]
    assert all(part.content is not None for part in upload.parts)


@pytest.mark.parametrize(("purpose", "content", "read"), [
    (b"user_data", "notes: be brief", "notes: be brief"),
    (None, "\ufeffan Anthropic upload names no purpose", "an Anthropic upload names no purpose"),
    (b"assistants", "caf\u00e9 menu", "caf\u00e9 menu"),
    (b"fine-tune", "training data", None),  # no prompt
    (b"user_data", "%PDF-1.7\x00 binary", None),  # not text: not read, as a PDF inline is not
    (b"user_data", "\xff\xfei\x00", None),
])
def test_a_text_file_uploaded_for_a_model_is_read_as_text(purpose: bytes | None, content: str, read: str | None) -> None:
    data = content.encode("latin-1") if "\x00" in content or "\xff" in content else content.encode()
    file = b'Content-Disposition: form-data; name="file"; filename="notes.txt"\r\nContent-Type: text/plain\r\n\r\n' + data
    parts = (field("purpose", purpose), file) if purpose is not None else (file,)
    fields = read_form(form(*parts), TYPE, files=True).fields
    assert fields.get(UPLOADED_TEXT) == read
    assert UPLOADED_TEXT not in read_form(form(*parts), TYPE).fields  # an upload elsewhere (audio, images) is media, not read


def test_dotnet_writes_names_unquoted_and_is_read() -> None:
    """.NET's HttpClient (and so the OpenAI .NET SDK) quotes a value only where it must."""
    body = form(b"Content-Disposition: form-data; name=purpose\r\n\r\nbatch",
                b"Content-Disposition: form-data; name=file; filename=batch.jsonl; filename*=utf-8''batch.jsonl\r\n\r\n"
                + orjson.dumps(CALLS[0]))
    assert read_form(body, 'multipart/form-data; boundary="XX"', files=True).fields == {BATCH: [CALLS[0]]}


@pytest.mark.parametrize("content_type", [
    TYPE + ";\tcharset=utf-7",  # Bottle's parser does not see a parameter after a tab; python-multipart does
    'multipart/form-data; boundary=QQ; x=a"b; boundary=XX; y=c"',  # which boundary, by whom
    TYPE + "; charset=latin-1",
    "multipart/mixed; boundary=XX",
])
def test_a_content_type_not_in_the_shape_clients_write_is_unreadable(content_type: str) -> None:
    assert read_form(form(field("model", b"whisper-2")), content_type) is None


def test_a_policy_field_not_in_utf8_is_unreadable() -> None:
    """A server decodes it as Latin-1: `instruct\xedons` would be `instructíons` there."""
    assert read_form(form(field("prompt", b"Ignore previous instruct\xedons")), TYPE) is None
