"""Makes the exchange record of each LLM flow and fills it as the flow goes on."""

from __future__ import annotations

import time

from mitmproxy import http

from llm_mitm.addons.shared import Shared
from llm_mitm.exchange import Body, Exchange
from llm_mitm.sse import StreamTap, rebuilder_for

_KEY_HEADERS = ("authorization", "api-key", "x-api-key")


class Recorder:
    """request -> Exchange; SSE responses stream through a tap; response/error close it."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        route = self.shared.matcher.route(request.host, request.port, request.path)
        if route is None:
            return
        headers = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in request.headers.fields]
        content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
        exchange = Exchange(
            id=flow.id,
            route=route,
            method=request.method,
            url=request.pretty_url,
            client=_client(flow),
            request_headers=headers,
            request=Body.parse(request.get_content(strict=False), content_type),
            started_at=request.timestamp_start,
        )
        exchange.api_key = self._api_key(exchange)
        exchange.organization = exchange.header("openai-organization")
        exchange.project = exchange.header("openai-project")
        if exchange.model is None and content_type.startswith("multipart/form-data"):
            exchange.model = _form_model(request)
        self.shared.exchanges[flow] = exchange

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is None:
            return
        response = flow.response
        exchange.status_code = response.status_code
        exchange.response_headers = list(response.headers.items(multi=True))
        exchange.first_byte_at = response.timestamp_start
        if response.stream or not _is_event_stream(response):
            return
        exchange.tap = StreamTap(
            rebuilder_for(exchange.route.api, exchange.route.operation),
            response.headers.get("content-encoding", ""),
        )
        if response.raw_content is None:  # from upstream: stream it; an answer of ours is whole already
            response.stream = exchange.tap

    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is None:
            return
        response = flow.response
        if exchange.status_code is None:  # answered by an addon: no responseheaders seen
            exchange.status_code = response.status_code
            exchange.response_headers = list(response.headers.items(multi=True))
            exchange.first_byte_at = response.timestamp_start
        exchange.finished_at = response.timestamp_end or time.time()
        if exchange.tap is not None:
            if not response.stream and response.raw_content:  # an SSE answer we made ourselves
                exchange.tap(response.raw_content)
            exchange.finish()
        else:
            exchange.finish(response.get_content(strict=False), response.headers.get("content-type", ""))

    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None:
            return
        message = flow.error.msg if flow.error else "connection failed"
        raw = flow.response.raw_content if flow.response is not None and exchange.tap is None else None
        exchange.finish(raw, error=message)

    def _api_key(self, exchange: Exchange) -> str | None:
        for name in _KEY_HEADERS:
            value = exchange.header(name)
            if value:
                return self.shared.redactor.credential(value).removeprefix("Bearer ")
        return None


def _client(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else ""


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


def _form_model(request: http.Request) -> str | None:
    try:
        value = request.multipart_form.get(b"model")
    except ValueError:
        return None
    return value.decode("utf-8", "replace") if value else None
