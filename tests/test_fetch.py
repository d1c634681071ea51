"""Reading a file upstream from inside the proxy (`llm_mitm.fetch`): whole or not at all,
the client's key going nowhere else and into no message."""

from __future__ import annotations

import base64

import pytest

from llm_mitm.fetch import FetchError, Upstream, fetch
from tests.support.canned_server import CannedServer, ok

KEY = "sk-proj-" + "F3tch" * 8


def read(server: CannedServer, path: str, limit: int = 1000, upstream: Upstream = Upstream(), **headers: str) -> bytes:
    return fetch(f"http://127.0.0.1:{server.port}{path}", {"authorization": f"Bearer {KEY}", **headers}, upstream, limit)


def refused(server: CannedServer, path: str, **kwargs: object) -> str:
    with pytest.raises(FetchError) as raised:
        read(server, path, **kwargs)  # type: ignore[arg-type]
    message = str(raised.value)
    assert KEY not in message and "F3tch" not in message
    return message


def test_a_whole_file_is_read_with_the_key_and_nothing_else() -> None:
    with CannedServer({"/f": ok(b"line\n" * 3)}) as server:
        assert read(server, "/f") == b"line\n" * 3
        sent = server.requests[0]
        key_as_given = f"\r\nAuthorization: Bearer {KEY}\r\n".encode() in sent  # (not in the output if it fails)
        assert key_as_given and b"\r\nAccept-Encoding: identity\r\n" in sent


def test_anything_but_a_whole_plain_200_is_an_error() -> None:
    answers = {
        "/missing": ok(b'{"error": {"message": "No such File."}}', status="404 Not Found"),
        "/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 57,
        "/cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        "/headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"Content-Length: 0\r\n\r\n",
        "/gzip": ok(b"\x1f\x8b...", "Content-Encoding: gzip"),
        "/large": ok(b"x" * 1001),
        "/moved": b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/steal\r\nContent-Length: 0\r\n\r\n",
    }
    with CannedServer(answers) as server:
        assert refused(server, "/missing") == "upstream answered 404: No such File."
        assert "ended after 57 of 100 bytes" in refused(server, "/short")
        assert refused(server, "/cut").startswith("reading it failed")
        assert refused(server, "/headers").startswith("reading it failed")
        assert "encoded" in refused(server, "/gzip")
        assert "larger than 1,000 bytes" in refused(server, "/large")
        assert refused(server, "/moved") == "upstream answered 302"  # not followed: the key would go along
        assert len(server.requests) == 7


def test_an_error_quoting_the_request_names_only_its_kind() -> None:
    """A header value http.client refuses, a URL it refuses: their text holds the key."""
    with CannedServer({}) as server:
        assert refused(server, "/f", **{"api-key": f"{KEY}\n"}) == "reading it failed (ValueError)"
        assert refused(server, f"/f?api-key={KEY}\x7f") == "reading it failed (InvalidURL)"
    assert "could not be reached (Connection refused)" in refused(server, "/f")


def test_an_upstream_proxy_is_used_as_mitmproxy_uses_it() -> None:
    """Its credentials in the Proxy-Authorization header as given (a `%` stays a `%`), and
    the environment's proxy settings never."""
    with CannedServer({"http://api.example:9/f": ok(b"via proxy")}) as proxy:
        upstream = Upstream(proxy=f"http://127.0.0.1:{proxy.port}", proxy_auth="user:p%41ss")
        assert fetch("http://api.example:9/f", {}, upstream, 100) == b"via proxy"
        assert b"proxy-authorization: basic " + base64.b64encode(b"user:p%41ss").lower() in proxy.requests[0].lower()
    with pytest.raises(FetchError, match="over https is not supported"):
        fetch("http://api.example:9/f", {}, Upstream(proxy="https://127.0.0.1:1"), 100)


def test_the_environment_proxy_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with CannedServer({"/f": ok(b"direct")}) as server, CannedServer({}) as elsewhere:
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{elsewhere.port}")
        assert read(server, "/f") == b"direct" and elsewhere.requests == []
