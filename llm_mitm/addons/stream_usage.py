"""Usage for every streamed chat call: ask upstream for it, hide it from the client.

A client streaming chat completions without `stream_options.include_usage` gets no
token counts, and neither would the trace. We ask upstream for them, take them for the
trace, and drop that extra chunk on the way back (and the `"usage":null` asking adds to
every other chunk), so the client sees what it asked for.
The drop needs an uncompressed stream, so the request asks for `identity`. Azure takes
`stream_options` from api-version 2024-09-01-preview on (its v1 API, with none, too): an
older one answers 400, so there the stream's usage is estimated instead, as it is for a
provider of your own unless its `stream_usage` is on (a strict server refuses the field).
"""

from __future__ import annotations

import logging

from mitmproxy import http

from llm_mitm.addons.refuse import rewrite_json
from llm_mitm.addons.shared import Shared
from llm_mitm.providers import Route
from llm_mitm.sse import USAGE_HINT, is_usage_only_chunk, strip_null_usage, without_usage

logger = logging.getLogger("llm_mitm.stream_usage")

_OPERATIONS = ("chat.completions", "completions")


class StreamUsage:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or not exchange.stream or flow.response is not None or not self.shared.config.usage.request_stream_usage:
            return
        body = exchange.request_json
        if body is None or exchange.route.operation not in _OPERATIONS or not self._takes_stream_options(exchange.route):
            return
        if exchange.asks_stream_usage:
            return
        options = body.get("stream_options")
        merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        rewrite_json(flow, exchange, {**body, "stream_options": merged})
        flow.request.headers["accept-encoding"] = "identity"
        exchange.injected_stream_usage = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        if exchange is None or not exchange.injected_stream_usage or exchange.tap is None:
            return
        if not exchange.tap.drop_events(is_usage_only_chunk, USAGE_HINT, _filter_failed, strip_null_usage, without_usage):  # compressed all the same
            _filter_failed("the provider compressed the stream though asked not to")
            return
        # The client gets fewer bytes than upstream sent: a length that counted them would
        # leave it waiting for the rest (or cut the stream short on a kept-alive connection).
        response = flow.response
        if response is not None and "content-length" in response.headers:
            del response.headers["content-length"]
            if response.http_version.startswith("HTTP/1"):  # framed by chunks instead (HTTP/2 frames itself)
                response.headers["transfer-encoding"] = "chunked"

    def _takes_stream_options(self, route: Route) -> bool:
        """OpenAI's and Azure's APIs, and Anthropic's OpenAI-compatible chat (its own legacy
        completions refuse the field: a probe)."""
        provider = self.shared.config.providers.get(route.provider)
        if route.api == "anthropic" and route.operation != "chat.completions":
            return False
        return provider is not None and provider.stream_usage and route.azure_takes_2024_09_fields()


def _filter_failed(reason: str) -> None:
    logger.warning("llm-mitm: the usage chunk filter failed (%s): this client gets the usage chunk it did not ask for", reason)
