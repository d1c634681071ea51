"""Makes the exchange record of each LLM flow and fills it as the flow goes on."""

from __future__ import annotations

import logging
import time

from mitmproxy import http
from mitmproxy.net import encoding

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared
from llm_mitm.config import DEFAULT_PROVIDERS
from llm_mitm.exchange import Body, Exchange, first_field
from llm_mitm.forms import read_form
from llm_mitm.providers import Route, split_host
from llm_mitm.redact import subprotocol_keys
from llm_mitm.sse import StreamTap, rebuilder_for

# Where each API takes its key from, first the header it reads first: a client that also
# sends another (say a stray Authorization to Anthropic) is still counted by the key in use.
# Azure API Management, often put in front of Azure OpenAI (or another API), takes its
# subscription key as `Ocp-Apim-Subscription-Key` or `?subscription-key=`.
_APIM_HEADER = "ocp-apim-subscription-key"
_KEY_HEADERS = {
    "openai": ("authorization", "api-key", "x-api-key", _APIM_HEADER),
    "azure": ("api-key", "authorization", _APIM_HEADER, "x-api-key"),
    "anthropic": ("x-api-key", "authorization", "api-key", _APIM_HEADER),
}
logger = logging.getLogger("llm_mitm.recorder")

_KEY_PARAMS = ("api-key", "subscription-key")
# Credentials that are not the caller's key for the API: the proxy's own login, cookies.
_NOT_CALLER_HEADERS = frozenset(("proxy-authorization", "cookie"))


class Recorder:
    """request -> Exchange; SSE responses stream through a tap; response/error close it."""
    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        route = self.shared.matcher.route(request.host, request.port, request.path) or self._route_by_name(flow)
        if route is None:
            return
        exchange = Exchange(
            id=flow.id,
            route=route,
            method=request.method,
            url="",
            client=_client(flow),
            request_fields=request.headers.fields,
            request=Body(),
            started_at=request.timestamp_start,
        )
        try:
            self._read_request(request, exchange)
        except Exception:  # noqa: BLE001 - a call the proxy cannot read must not go on unchecked
            logger.exception("llm-mitm: reading the request failed; it is refused")
            self.shared.record(flow, exchange)
            refuse(flow, exchange, 400, "policy_error", "the proxy could not read the request to check it against the policy")
            return
        self.shared.record(flow, exchange)
        if self.shared.stopping:  # mitmproxy takes calls until the process ends; none may go upstream untraced
            refuse(flow, exchange, 503, "proxy_stopping", "the proxy is shutting down; send the call again once it is back", retry_after=1)

    def _read_request(self, request: http.Request, exchange: Exchange) -> None:
        content = _content(request, exchange.header("content-encoding"))
        content_type = exchange.header("content-type") or ""
        exchange.take_request(Body.parse(content, content_type) if content is not None else Body(size=len(request.raw_content or b"")))
        exchange.url = _url(request)
        exchange.api_key = self._api_key(exchange) or self._query_key(request) or self._gateway_key(exchange) or self._subprotocol_key(exchange)
        exchange.organization = ", ".join(exchange.header_values("openai-organization")) or None  # as a server joining them reads them
        exchange.project = ", ".join(exchange.header_values("openai-project")) or None
        if exchange.request.form:
            exchange.form = read_form(content or b"", content_type, files=exchange.route.operation == "files")
            model = exchange.form.fields.get("model") if exchange.form else None
            exchange.model = exchange.model or (model if isinstance(model, str) else None)
        if exchange.model is None and exchange.route.operation == "realtime" and "?" in request.path:  # the model is in the query there only
            exchange.model = request.query.get("model")

    def _route_by_name(self, flow: http.HTTPFlow) -> Route | None:
        """A provider named by the TLS server name or the Host header rather than the
        address connected to (`CONNECT 1.2.3.4:443` with SNI api.openai.com): mitmproxy
        intercepts it by either name, so it is policed and traced by either name too. Not
        over plain HTTP, where mitmproxy connects to the address the request names, whatever
        its Host header says (a probe: a server of no provider's was sent the organization)."""
        request = flow.request
        if request.scheme != "https":
            return None
        for name in (flow.client_conn.sni, request.host_header):
            if name:
                host, port = split_host(name, request.port)
                route = self.shared.matcher.route(host, port, request.path)
                if route is not None:
                    return route
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is None:
            return
        response = flow.response
        self._take_head(exchange, flow.request, response)
        if response.stream or not _event_stream(exchange, first_field(exchange.response_fields, b"content-type").lower()):
            return
        upstream = response.raw_content is None  # an answer of ours is whole already
        exchange.tap = StreamTap(
            rebuilder_for(exchange.route.api, exchange.route.operation),
            first_field(exchange.response_fields, b"content-encoding"),
            hold=upstream and self._defer(exchange),
        )
        if upstream:
            response.stream = exchange.tap

    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is None:
            return
        response = flow.response
        if exchange.status_code is None:  # answered by an addon: no responseheaders seen
            self._take_head(exchange, flow.request, response)
        exchange.finished_at = response.timestamp_end or time.time()
        if exchange.tap is not None:
            if not response.stream and response.raw_content:  # an SSE answer we made ourselves
                exchange.tap(response.raw_content)
            exchange.finish(defer=self._defer(exchange))
        else:
            fields = exchange.response_fields
            content = _content(response, first_field(fields, b"content-encoding"))
            exchange.finish(content, first_field(fields, b"content-type"), defer=self._defer(exchange))

    def _defer(self, exchange: Exchange) -> bool:
        """Leave the response to the trace writer process? Not a replay's: it records the
        answer it got, and reads it here."""
        return self.shared.defer_responses and exchange.replay is None

    @staticmethod
    def _take_head(exchange: Exchange, request: http.Request, response: http.Response) -> None:
        exchange.request_fields = request.headers.fields  # as they went upstream: organization set, encodings we read
        exchange.status_code = response.status_code
        exchange.response_fields = response.headers.fields
        exchange.first_byte_at = response.timestamp_start

    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None:
            return
        message = flow.error.msg if flow.error else "connection failed"
        exchange.request_fields = flow.request.headers.fields  # what went upstream, if anything did
        raw = flow.response.raw_content if flow.response is not None and exchange.tap is None else None
        exchange.finish(raw, error=message, defer=self._defer(exchange))

    def _api_key(self, exchange: Exchange) -> str | None:
        """The key's fingerprint, whatever the case of its `Bearer`: one key, one identity
        for limits, budgets and `by_key` (HTTP auth schemes are case-insensitive). A server
        of your own takes its key where `redaction.headers` says first: else a junk
        `x-api-key` beside it, which that server ignores, made each call another caller's
        (a secrets probe: per-key limits were passed so)."""
        names = _KEY_HEADERS.get(exchange.route.api, _KEY_HEADERS["openai"])
        if exchange.route.provider not in DEFAULT_PROVIDERS:
            names = (*(name.lower() for name in self.shared.config.redaction.headers), *names)
        for name in names:
            value = exchange.header(name)
            if value:
                return self.shared.redactor.caller(name, value)
        return None

    def _gateway_key(self, exchange: Exchange) -> str | None:
        """A key only a gateway's header carries (`x-portkey-api-key`, `x-goog-api-key`,
        `Helicone-Auth`): the caller all the same, else callers behind a gateway shared
        one identity in limits, budgets and replay."""
        redactor = self.shared.redactor
        for raw_name, raw_value in exchange.request_fields:
            name = raw_name.decode("latin-1").lower()
            if raw_value and name not in _NOT_CALLER_HEADERS and redactor.names_credential(name):
                return redactor.caller(name, raw_value.decode("utf-8", "surrogateescape"))
        return None

    def _subprotocol_key(self, exchange: Exchange) -> str | None:
        """A browser's realtime WebSocket sends its key as a subprotocol: the caller all the
        same (a review: such sessions had no identity, and per-key limits held them as one)."""
        protocols = exchange.header("sec-websocket-protocol")
        keys = subprotocol_keys(protocols) if protocols else []
        return self.shared.redactor.credential(keys[0]) if keys else None

    def _query_key(self, request: http.Request) -> str | None:
        """Azure also takes its key as `?api-key=` (API Management `?subscription-key=`):
        the caller's identity all the same."""
        if "?" not in request.path:
            return None
        value = next(filter(None, map(request.query.get, _KEY_PARAMS)), None)
        return self.shared.redactor.credential(value) if value else None


# The content codings servers decode. mitmproxy also "decodes" any Python codec named there
# (rot13, base64, quopri), which no server does: the policy read another body than upstream
# ran (and rot13 raised, and the call went on unchecked).
_SERVER_CODINGS = frozenset(("gzip", "x-gzip", "deflate", "br", "zstd", "identity"))


def _content(message: http.Message, coding: str | None) -> bytes | None:
    """The body as its server reads it; None when no server would decode it."""
    if not coding:
        return message.raw_content
    coding = coding.strip().lower()
    if coding not in _SERVER_CODINGS:
        return None
    if coding == "x-gzip":  # gzip by its old name (RFC 9110), which mitmproxy does not know
        return encoding.decode(message.raw_content, "gzip") if message.raw_content else message.raw_content
    return message.get_content(strict=False)


_STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


def _event_stream(exchange: Exchange, content_type: str) -> bool:
    """An answer to read as server-sent events as it passes: one that says so, or the
    answer to a call that asked for a stream from a server that names no type or plain
    text (OpenAI-compatible servers do, or a proxy before them): buffered, its events would
    reach the client all at once at the end, and its usage chunk not be hidden. A Gemini
    stream asked for by its path may be JSON, as it passes all the same."""
    if content_type.startswith(_STREAM_TYPES):  # Ollama's native stream is a JSON object a line, as it comes (a providers probe: buffered)
        return True
    if not exchange.stream or exchange.status_code != 200:
        return False
    # Gemini's stream without alt=sse is a JSON array, written out response by response
    kinds = ("", "text/plain", "application/json") if exchange.route.streams else ("", "text/plain")
    return content_type.partition(";")[0].strip() in kinds


def _client(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else ""


def _url(request: http.Request) -> str:
    """The URL the call went to: the host mitmproxy connects to (a CONNECT's, an
    absolute-form target's, a reverse proxy's), whatever the Host header says (a review: a
    `Host` naming another resource than the CONNECT put that resource in the trace, and
    in the replay key, whose answers another caller then got). Where the connection
    names only an address (transparent and local modes), the Host header names the host,
    as in mitmproxy's `pretty_url`."""
    host = request.host
    if _is_address(host) and (named := request.host_header):  # Host, or HTTP/2's :authority (a review: HTTP/2 was traced by its address)
        return f"{request.scheme}://{named}{request.path}"  # as written, an IPv6 address in brackets (pretty_url drops them)
    if ":" in host:  # an IPv6 address, written with its brackets
        host = f"[{host}]"
    default = (request.scheme == "https" and request.port == 443) or (request.scheme == "http" and request.port == 80)
    return f"{request.scheme}://{host}{request.path}" if default else f"{request.scheme}://{host}:{request.port}{request.path}"


def _is_address(host: str) -> bool:
    """An IP address, not a name (a name's last label is never all digits)."""
    if ":" in host:
        return True
    return host.rstrip(".").rpartition(".")[2].isdigit()
