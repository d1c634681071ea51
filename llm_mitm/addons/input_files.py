"""Checks the calls a batch or an eval run makes of a file already upstream, at the call
that starts them, by reading the file back: it may have been uploaded before the proxy
was in the way, or in parts (the Uploads API), where no line of it was read."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import UpstreamMode

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared
from llm_mitm.config import PolicyConfig
from llm_mitm.exchange import Exchange
from llm_mitm.fetch import FetchError, Upstream, fetch
from llm_mitm.policy import Policy, Violation
from llm_mitm.providers import Route, input_file_path
from llm_mitm.redact import replace_sent

logger = logging.getLogger("llm_mitm.input_files")

MAX_INPUT_FILE = 200 * 1024 * 1024  # the Batch API's own limit for an input file (the Files API's is 512 MB)
CREDENTIALS = ("authorization", "api-key", "openai-organization", "openai-project")
_REMEMBERED = 1024
Verdicts = dict[tuple[str, str | None, bytes], Violation | None]


class InputFiles:
    """Reads the file with the client's own credentials from where the call goes, checks
    it off the event loop, and remembers each file's verdict for the policy in force and
    what else decides it (an eval run's template): a file does not change. Two threads of its own: asyncio's shared pool also resolves
    mitmproxy's host names, and a slow upstream must not hold those up."""
    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._verdicts: Verdicts = {}
        self._policy: Policy | None = None
        self._reading: dict[tuple[Policy, str, str | None, bytes], asyncio.Future[Violation | None]] = {}
        self._threads: ThreadPoolExecutor | None = None

    @property
    def active(self) -> bool:
        return self.shared.policy.checks_calls

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        exchange = self.shared.exchange(flow)
        if exchange is None or flow.response is not None:
            return None
        file_id = self.shared.policy.input_file(exchange.route, exchange.request_json)
        return None if file_id is None else self._check(flow, exchange, file_id)

    def done(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    async def _check(self, flow: http.HTTPFlow, exchange: Exchange, file_id: str) -> None:
        try:
            violation = await self._verdict(flow, exchange, file_id)
        except FetchError as error:
            # Upstream's own words, which may quote the key the call sent ("Incorrect API key
            # provided: ..."): a key of no known shape would reach the log whole.
            reason = replace_sent(str(error), self.shared.redactor.sent_credentials(exchange.request_headers, exchange.url))
            logger.warning("llm-mitm: the file %r a call runs could not be read (%s); the call is refused", file_id, reason)
            violation = Violation("policy_error", f"the file {file_id!r} could not be read to check the calls made of it: {reason}")
        except Exception:  # the call does not go unchecked
            logger.exception("llm-mitm: checking the file %r a call runs failed; the call is refused", file_id)
            violation = Violation("policy_error", f"the file {file_id!r} could not be checked against the policy")
        if violation is not None:
            refuse(flow, exchange, violation.status, violation.rule, violation.detail)

    async def _verdict(self, flow: http.HTTPFlow, exchange: Exchange, file_id: str) -> Violation | None:
        policy = self.shared.policy
        if policy is not self._policy:
            self._policy, self._verdicts = policy, {}
        verdicts = self._verdicts  # the policy's: a reload while the file is read makes new ones
        request = flow.request
        path = input_file_path(request.path, file_id)
        if path is None:
            return Violation("policy_error", f"the file {file_id!r} cannot be found from {request.path!r} to check the calls made of it")
        host = f"[{request.host}]" if ":" in request.host else request.host  # where mitmproxy connects, not what a Host header says
        url = f"{request.scheme}://{host}:{request.port}{path}"
        key = (url, exchange.api_key, _deciding(exchange.request_json))
        if key in verdicts:
            return verdicts[key]
        underway = (policy, *key)
        reading = self._reading.get(underway)
        if reading is None:  # one read of a file at a time, however many calls are made of it
            headers = {name: request.headers[name] for name in CREDENTIALS if name in request.headers}
            reading = self._reading[underway] = asyncio.ensure_future(self._read(url, headers, _upstream(flow), policy.config, exchange, file_id))
            reading.add_done_callback(lambda _: self._reading.pop(underway, None))
        violation = await asyncio.shield(reading)
        if len(verdicts) >= _REMEMBERED:
            verdicts.clear()
        verdicts[key] = violation
        return violation

    async def _read(self, url: str, headers: dict[str, str], upstream: Upstream, config: PolicyConfig, exchange: Exchange, file_id: str) -> Violation | None:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(2, thread_name_prefix="llm-mitm-batch-input")
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self._threads, fetch, url, headers, upstream, MAX_INPUT_FILE)
        return await loop.run_in_executor(self._threads, _check_file, config, exchange.route, exchange.request_json, file_id, data)


def _check_file(config: PolicyConfig, route: Route, body: dict[str, Any], file_id: str, data: bytes) -> Violation | None:
    """In a thread, with a policy of its own: the one in force remembers verdicts for the loop."""
    return Policy(config).check_input_file(route, body, file_id, data)


def _deciding(body: dict[str, Any]) -> bytes:
    """What beside the file decides its verdict: an eval run's data source (its model,
    template and limits), by digest; nothing for a batch, whose lines are whole calls."""
    source = body.get("data_source")
    return b"" if source is None else hashlib.blake2b(orjson.dumps(source, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


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
