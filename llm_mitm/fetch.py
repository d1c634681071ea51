"""One GET upstream from inside the proxy, as mitmproxy itself would connect: its trust
settings, its upstream proxy, never the proxy settings of the environment (which may name
this very proxy). Blocking: run it in a thread."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import certifi
import orjson


class FetchError(Exception):
    """Why nothing usable came back, in words for a refusal."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """How mitmproxy reaches upstream: its `ssl_*` options, and an upstream proxy
    (`http://host:port`, credentials in `user:pass`) where its mode names one."""

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
                raise FetchError(f"an upstream proxy over {scheme} is not supported here")
            credentials = f"{self.proxy_auth}@" if self.proxy_auth else ""
            proxies = {"http": f"http://{credentials}{address}", "https": f"http://{credentials}{address}"}
        return urllib.request.build_opener(urllib.request.ProxyHandler(proxies), urllib.request.HTTPSHandler(context=self.tls()), _NoRedirects())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not followed: urllib would send the client's key along."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch(url: str, headers: Mapping[str, str], upstream: Upstream, limit: int, timeout: float = 60.0) -> bytes:
    """The body of a GET, at most `limit` bytes; a FetchError for anything but a 200."""
    request = urllib.request.Request(url, headers=dict(headers), method="GET")
    try:
        with upstream.opener().open(request, timeout=timeout) as response:
            data: bytes = response.read(limit + 1)
    except urllib.error.HTTPError as error:
        raise FetchError(f"upstream answered {error.code}{_message(error)}") from None
    except (OSError, ValueError) as error:
        raise FetchError(f"upstream could not be reached ({error})") from None
    if len(data) > limit:
        raise FetchError(f"it is larger than {limit:,} bytes")
    return data


def _message(error: urllib.error.HTTPError) -> str:
    """The API's own error message, if its answer has one (`{"error": {"message": ...}}`)."""
    try:
        message = orjson.loads(error.read(65536))["error"]["message"]
    except Exception:
        return ""
    return f": {message}" if isinstance(message, str) else ""
