"""mitmdump's printout at flow_detail 4, through mitmproxy's own Dumper (as mitmdump prints,
on a terminal or not), with the OutputRedaction addon wrapping it."""

from __future__ import annotations

import io
import re

import orjson
import pytest
from mitmproxy.addons.dumper import Dumper
from mitmproxy.test import taddons, tflow, tutils

from llm_mitm.addons import OutputRedaction, Shared
from llm_mitm.redact import Redactor

UNSHAPED = "vllm-XYZZYnoShapeAtAll0"


class Terminal(io.StringIO):
    """What mitmdump writes to when stdout is a terminal: it colours names and values apart."""

    def isatty(self) -> bool:
        return True


def printed(flow: tflow.HTTPFlow, terminal: bool = False) -> str:
    out = Terminal() if terminal else io.StringIO()
    dumper = Dumper(out)
    output = OutputRedaction(Shared())
    with taddons.context(dumper, output) as tctx:
        tctx.configure(dumper, flow_detail=4)
        output.running()
        dumper.response(flow)
        output.done()
    return out.getvalue()


def flow(path: bytes, content: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = (), response: bytes = b"{}",
         response_headers: tuple[tuple[bytes, bytes], ...] = ()) -> tflow.HTTPFlow:
    request = tutils.treq(host="api.openai.com", port=443, path=path, method=b"POST" if content else b"GET",
                          headers=[(b"authorization", b"Bearer sk-proj-" + b"K" * 40), *headers], content=content)
    request.scheme = "https"
    reply = tutils.tresp(status_code=401, headers=[(b"content-type", b"application/json"), *response_headers], content=response)
    return tflow.tflow(req=request, resp=reply)


@pytest.mark.parametrize("terminal", [False, True])
def test_named_credentials_in_a_json_body_are_hidden_on_a_terminal_too(terminal: bool) -> None:
    body = b'{"model": "gpt-4o", "metadata": {"password": "XYZZY-pw-1", "client_secret": "XYZZY-cs-2", "api_key": "XYZZY-ak-3"}}'
    text = printed(flow(b"/v1/chat/completions", body, ((b"content-type", b"application/json"),)), terminal)
    assert "XYZZY" not in text, text
    assert '"password"' in text and '"model"' in text and ("\x1b[" in text) == terminal


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("name", ["key", "token", "sig", "signature", "code"])
def test_the_query_table_hides_parameters_as_the_url_does(name: str, terminal: bool) -> None:
    text = printed(flow(f"/v1/models?{name}={UNSHAPED}&api-version=1".encode()), terminal)
    assert "XYZZY" not in text, text
    fingerprint = Redactor().fingerprint(UNSHAPED)
    assert text.count(fingerprint) == 2  # the request line, the query table
    assert re.search(rf"^ +(\x1b\[[0-9;]*m)*{name}(\x1b\[[0-9;]*m)*:", text, re.MULTILINE)  # mitmproxy 12 colours the name alone


@pytest.mark.parametrize("terminal", [False, True])
def test_a_binary_body_is_not_hexdumped(terminal: bool) -> None:
    key = "sk-proj-" + "XYZZY" * 12
    body = b"\x00\x01\x02\xfe\xff" * 30 + key.encode() + b"\x00\xff" * 70  # mostly binary: mitmproxy shows a hexdump
    text = printed(flow(b"/v1/files", body, ((b"content-type", b"application/octet-stream"),)), terminal)
    assert "XYZZY" not in text and "XYZZY".encode().hex() not in text.replace(" ", ""), text
    assert "lines of hexdump left out by llm-mitm" in text


@pytest.mark.parametrize("terminal", [False, True])
def test_a_sent_key_of_no_shape_echoed_back_is_hidden(terminal: bool) -> None:
    """An error body quoting the key, a response header holding it (D5)."""
    echo = f'{{"error": {{"message": "Incorrect API key provided: {UNSHAPED}"}}}}'.encode()
    sent = flow(b"/v1/chat/completions", b'{"model": "m"}', ((b"x-api-key", UNSHAPED.encode()), (b"content-type", b"application/json")),
                response=echo, response_headers=((b"x-echo", f"key={UNSHAPED}".encode()),))
    text = printed(sent, terminal)
    assert "XYZZY" not in text, text
    assert text.count(Redactor().fingerprint(UNSHAPED)) == 3  # the request's header, the echoed header and body


def test_a_websocket_message_echoing_a_sent_key_of_no_shape_is_hidden() -> None:
    """The dumper prints a WebSocket's messages apart from its flow: the credentials the
    handshake sent were not known there (a secrets probe: a realtime echo printed the key)."""
    from mitmproxy import websocket

    ws = tflow.twebsocketflow()
    ws.request.headers["authorization"] = f"Bearer {UNSHAPED}"
    ws.websocket.messages = [websocket.WebSocketMessage(1, True, f'{{"type": "echo", "text": "{UNSHAPED}"}}'.encode())]
    out = io.StringIO()
    dumper, output = Dumper(out), OutputRedaction(Shared())
    with taddons.context(dumper, output) as tctx:
        tctx.configure(dumper, flow_detail=3)
        output.running()
        dumper.websocket_message(ws)
        ws.websocket.close_code, ws.websocket.close_reason = 4000, f"bad key {UNSHAPED}"
        dumper.websocket_end(ws)
        output.done()
    text = out.getvalue()
    assert "XYZZY" not in text and Redactor().fingerprint(UNSHAPED) in text, text


def test_a_mitmproxy_that_prints_bodies_another_way_still_has_its_printout_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """`Dumper._echo_message` is mitmproxy's own, not its API: without it the wrap failed
    whole, and nothing of the printout was redacted (a review)."""
    out = io.StringIO()
    dumper, output = Dumper(out), OutputRedaction(Shared())
    dumper._echo_message = None  # type: ignore[assignment,method-assign]
    with taddons.context(dumper, output) as tctx:
        tctx.configure(dumper, flow_detail=2)
        output.running()
        dumper.response(flow(b"/v1/models"))
        output.done()
    assert "K" * 12 not in out.getvalue() and "authorization" in out.getvalue().lower()
    assert "are printed as they came at flow_detail 3 and 4" in caplog.text


@pytest.mark.parametrize("content_type", [b"Application/JSON", b"text/plain"])
def test_logprobs_spelling_a_key_are_hidden_whatever_type_the_answer_says(content_type: bytes) -> None:
    key = "sk-proj-" + "Zq7x" * 12
    run = [{"token": key[i : i + 4], "logprob": -0.5} for i in range(0, len(key), 4)]
    answer = orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": {"content": run}}]})
    called = flow(b"/v1/chat/completions", b"{}", response=answer)
    called.response.headers["content-type"] = content_type.decode()
    text = printed(called)
    assert '"Zq7x"' not in text and "-0.5" in text and content_type.decode() in text


def test_a_key_cut_across_messages_of_one_speaker_is_hidden_in_the_printed_body() -> None:
    """The printout is redacted line by line, a message a line: a key cut between two
    messages of one speaker in a row (one turn to the model) was printed in halves, though
    the trace hid it (the printout's copy looked at text parts only)."""
    key = "sk-proj-" + "Qx7" * 20
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "key " + key[:20]}, {"role": "user", "content": key[20:]}]})
    text = printed(flow(b"/v1/chat/completions", body, headers=((b"content-type", b"application/json"),)))
    assert "Qx7Qx7" not in text and '"model"' in text
