"""One GET upstream from inside the proxy, as mitmproxy itself would connect: its trust
settings, its upstream proxy, never the proxy settings of the environment (which may name
this very proxy). Blocking: run it in a thread."""

from __future__ import annotations

import base64
import http.client
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import certifi
import orjson

_PIECE = 1 << 20


class FetchError(Exception):
    """Why nothing usable came back, in words for a refusal (never a header's value or the
    URL: both may hold a key)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """How mitmproxy reaches upstream: its `ssl_*` options, and an upstream proxy
    (`http://host:port`, credentials `user:pass`) where its mode names one."""

    insecure: bool = False
    ca_file: str | None = None
    ca_dir: str | None = None
    proxy: str | None = None
    proxy_auth: str | None = None

    def tls(self) -> ssl.SSLContext:
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if self.ca_file is None and self.ca_dir is None:
            return ssl.create_default_context(cafile=certifi.where())
        return ssl.create_default_context(cafile=self.ca_file, capath=self.ca_dir)

    def opener(self) -> urllib.request.OpenerDirector:
        proxies: dict[str, str] = {}
        if self.proxy is not None:
            scheme, _, address = self.proxy.partition("://")
            if scheme != "http":
                raise FetchError(f"reading through an upstream proxy over {scheme} is not supported")
            proxies = {"http": f"http://{address}", "https": f"http://{address}"}
        return urllib.request.build_opener(urllib.request.ProxyHandler(proxies), urllib.request.HTTPSHandler(context=self.tls()), _NoRedirects())

    def proxy_headers(self) -> dict[str, str]:
        """As mitmproxy sends `upstream_auth` (urllib sends it in the CONNECT, not inside)."""
        if self.proxy is None or not self.proxy_auth:
            return {}
        return {"Proxy-Authorization": "Basic " + base64.b64encode(self.proxy_auth.encode()).decode()}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not followed: urllib would send the client's key along."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch(url: str, headers: Mapping[str, str], upstream: Upstream, limit: int, deadline: float = 120.0) -> bytes:
    """The body of a GET, whole and at most `limit` bytes, within `deadline` seconds; a
    FetchError for anything else (another status, an encoded or cut-short body)."""
    give_up = time.monotonic() + deadline
    request = urllib.request.Request(url, headers={**headers, **upstream.proxy_headers(), "Accept-Encoding": "identity"}, method="GET")
    try:
        with upstream.opener().open(request, timeout=min(deadline, 60.0)) as response:
            if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
                raise FetchError("upstream sent it encoded when asked for it as it is")
            expected = response.headers.get("content-length")
            data = bytearray()
            while piece := response.read(_PIECE):
                data += piece
                if len(data) > limit:
                    raise FetchError(f"it is larger than {limit:,} bytes")
                if time.monotonic() > give_up:
                    raise FetchError(f"reading it took longer than {deadline:g} s")
    except urllib.error.HTTPError as error:
        raise FetchError(f"upstream answered {error.code}{_message(error)}") from None
    except urllib.error.URLError as error:
        raise FetchError(f"upstream could not be reached ({_reason(error.reason)})") from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise FetchError(f"reading it failed ({_reason(error)})") from None
    if expected is not None and expected.strip().isdigit() and int(expected) != len(data):
        raise FetchError(f"upstream's answer ended after {len(data):,} of {int(expected):,} bytes")
    return bytes(data)


def _reason(error: object) -> str:
    """An OS or TLS error's own words, or urllib's; for any other error (a bad header
    value, a URL http.client refuses: their text quotes it) only its kind."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return error.reason or type(error).__name__
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return error if isinstance(error, str) else type(error).__name__


def _message(error: urllib.error.HTTPError) -> str:
    """The API's own error message, if its answer has one (`{"error": {"message": ...}}`)."""
    try:
        message = orjson.loads(error.read(65536))["error"]["message"]
    except Exception:
        return ""
    return f": {message}" if isinstance(message, str) else ""
