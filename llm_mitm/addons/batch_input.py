"""Checks the calls of an OpenAI batch at its creation, read back from upstream: the input
file may have been uploaded before the proxy was in the way, or in parts (the Uploads
API), where no line of it was read."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Coroutine
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import UpstreamMode

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared
from llm_mitm.exchange import Exchange
from llm_mitm.fetch import FetchError, Upstream, fetch
from llm_mitm.policy import Policy, Violation
from llm_mitm.providers import input_file_path

logger = logging.getLogger("llm_mitm.batch_input")

MAX_INPUT_FILE = 200 * 1024 * 1024  # the Batch API's own limit for an input file
CREDENTIALS = ("authorization", "api-key", "openai-organization", "openai-project")
_REMEMBERED = 1024


class BatchInput:
    """Reads the file with the client's own credentials (as it reaches upstream), checks
    it off the event loop, and remembers each file's verdict for the policy in force."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._verdicts: dict[tuple[str, str | None], Violation | None] = {}
        self._policy: Policy | None = None

    @property
    def active(self) -> bool:
        return self.shared.policy.checks_calls

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is not None:
            return None
        file_id = self.shared.policy.batch_input_file(exchange.route, exchange.request_json)
        return None if file_id is None else self._check(flow, exchange, file_id)

    async def _check(self, flow: http.HTTPFlow, exchange: Exchange, file_id: str) -> None:
        policy = self.shared.policy
        if policy is not self._policy:
            self._policy, self._verdicts = policy, {}
        path = input_file_path(flow.request.path, file_id)
        if path is None:
            refuse(flow, exchange, 403, "policy_error", f"the batch's input file {file_id!r} cannot be found from {flow.request.path!r} to check its calls")
            return
        request = flow.request
        url = f"{request.scheme}://{_host(request)}:{request.port}{path}"
        key = (url, exchange.api_key)
        if key in self._verdicts:
            violation = self._verdicts[key]
        else:
            headers = {name: request.headers[name] for name in CREDENTIALS if name in request.headers}
            try:
                data = await asyncio.to_thread(fetch, url, headers, _upstream(flow), MAX_INPUT_FILE)
            except FetchError as error:
                logger.warning("llm-mitm: the input file %r of a batch could not be read (%s); the batch is refused", file_id, error)
                refuse(flow, exchange, 403, "policy_error", f"the batch's input file {file_id!r} could not be read to check its calls: {error}")
                return
            # A policy of its own for the thread: the one in force remembers verdicts for the loop.
            violation = await asyncio.to_thread(Policy(policy.config).check_batch_file, exchange.route, file_id, data)
            if len(self._verdicts) >= _REMEMBERED:
                self._verdicts.clear()
            self._verdicts[key] = violation
        if violation is not None:
            refuse(flow, exchange, violation.status, violation.rule, violation.detail)


def _host(request: http.Request) -> str:
    """The name mitmproxy connects to (in transparent modes an address: the Host header
    names it)."""
    try:
        ipaddress.ip_address(request.host)
    except ValueError:
        return request.host
    return request.pretty_host


def _upstream(flow: http.HTTPFlow) -> Upstream:
    """How mitmproxy reaches upstream for this flow."""
    options = ctx.options
    mode = flow.client_conn.proxy_mode
    proxy = f"{mode.scheme}://{mode.address[0]}:{mode.address[1]}" if isinstance(mode, UpstreamMode) else None
    return Upstream(
        insecure=options.ssl_insecure,
        ca_file=options.ssl_verify_upstream_trusted_ca,
        ca_dir=options.ssl_verify_upstream_trusted_confdir,
        proxy=proxy,
        proxy_auth=options.upstream_auth if proxy else None,
    )
