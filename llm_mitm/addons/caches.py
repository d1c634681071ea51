"""Gemini's cached contents: a call that runs on one reads texts the call does not carry."""

from __future__ import annotations

import logging
from collections import OrderedDict

import orjson
from mitmproxy import http

from llm_mitm.addons.refuse import refuse
from llm_mitm.addons.shared import Shared

logger = logging.getLogger("llm_mitm.caches")

REMEMBERED = 10_000  # names of caches made through the proxy, the newest kept
_NAMING = ("cachedContent", "cached_content")  # both spellings a server takes (protobuf's JSON reads either)


class CachedContents:
    """A Gemini call naming a `cachedContent` runs on the contents and instructions that
    cache was made with, which the call does not carry. A cache made through this proxy was
    checked as it was made (its body is a call's), and its name is remembered from
    upstream's answer with the phrases it was checked against. One made elsewhere, before
    the proxy was in the way or before it restarted, or checked against other phrases,
    cannot be read back (the API gives a cache's contents to no one): where
    forbidden_instructions apply, a call on it is refused (it ran unchecked)."""

    guards_calls = True  # a call it fails to check is refused, not sent (LLMMitm._failed)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._made: OrderedDict[str, tuple[str, ...]] = OrderedDict()  # name: the phrases it was checked against

    @property
    def active(self) -> bool:
        return bool(self.shared.policy.config.forbidden_instructions)

    def request(self, flow: http.HTTPFlow) -> None:
        exchange = self.shared.exchange(flow)
        body = exchange.request_json if exchange is not None and flow.response is None else None
        if body is None or exchange is None or _NAMING[0] not in body and _NAMING[1] not in body:
            return
        phrases = self._phrases()
        unread = next((name for key in _NAMING if isinstance(name := body.get(key), str) and self._made.get(name) != phrases), None)
        if unread is not None:
            refuse(flow, exchange, 403, "forbidden_instruction",
                   f"the cached content {unread!r} was not made through this proxy under its forbidden_instructions (or was before it "
                   "restarted): its texts cannot be read back to check them; make the cache again through the proxy")

    def _phrases(self) -> tuple[str, ...]:
        return tuple(self.shared.policy.config.forbidden_instructions)

    def response(self, flow: http.HTTPFlow) -> None:
        """A cache made: its name, as upstream gives it."""
        exchange = self.shared.exchange(flow)
        route = exchange.route if exchange is not None else None
        if route is None or route.operation != "cached_contents" or route.subresource or flow.request.method != "POST":
            return
        if flow.response is None or flow.response.status_code != 200 or exchange is None or exchange.policy is None or exchange.blocked:
            return
        try:
            name = orjson.loads(flow.response.get_content(strict=False) or b"{}").get("name")
        except (orjson.JSONDecodeError, AttributeError, ValueError):
            logger.warning("llm-mitm: a cached content was made, but upstream's answer names it in no way read here")
            return
        if isinstance(name, str) and name:
            self._made[name] = self._phrases()
            self._made.move_to_end(name)
            if len(self._made) > REMEMBERED:
                self._made.popitem(last=False)
