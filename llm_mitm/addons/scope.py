"""Intercept only the configured LLM hosts; everything else is a raw tunnel."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode, UpstreamMode

from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config
from llm_mitm.providers import ProviderMatcher, host_regex

logger = logging.getLogger("llm_mitm.scope")

_PROXY_HOP_HEADERS = ("proxy-connection", "proxy-authorization")
# A pattern no host matches: mitmproxy reads an empty `allow_hosts` as every host allowed, so
# with no provider enabled it intercepted every TLS connection (a review).
_NO_HOST = "(?!)"


class Scope:
    """Owns mitmproxy's `allow_hosts`, turns on lazy upstream connections, turns off
    `stream_large_bodies`, raw TCP (`rawtcp`, `tcp_hosts`) and `ignore_hosts`, upgrades http.

    `allow_hosts` gets one anchored regex per configured host, so any other CONNECT
    passes as raw TLS, never seeing our certificate. `connection_strategy=lazy` keeps
    mitmproxy from connecting upstream for requests that an addon answers itself.
    `stream_large_bodies` would send a large call on unread by the policy and pass a large
    answer on unmetered (mitmproxy turns it on again as a body arrives, past any hook), and
    every flow mitmproxy reads here is an LLM call: off (streams still pass as they come).
    """

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._loaded = False
        self._unwatched: list[str] = []  # reverse targets no provider names, as last said
        shared.on_config(self._apply)

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        self._loaded = True

    def configure(self, updated: set[str]) -> None:
        if {"allow_hosts", "ignore_hosts", "connection_strategy", "stream_large_bodies", "rawtcp", "tcp_hosts", "llm_config", "mode",
                "keep_host_header"} & updated:
            self._apply(self.shared.config)

    def _apply(self, config: Config) -> None:
        if not self._loaded:
            return
        hosts = config.intercepted_hosts
        unwatched = self._unwatched_targets()
        self._say_unwatched(unwatched)
        # A reverse proxy's https target no provider names is read as HTTP too: passed as a
        # raw tunnel, its client's plain HTTP reached a TLS server and every call got an
        # empty reply (a setup probe). mitmproxy speaks TLS to it; its calls pass unchecked
        # and untraced, as said (no provider's route).
        reverse_tls = [host_regex(f"{mode.address[0]}:{mode.address[1]}") for mode in unwatched if mode.scheme == "https"]
        allow = self.shared.matcher.allow_hosts + reverse_tls or [_NO_HOST]
        updates: dict[str, object] = {}
        if list(ctx.options.allow_hosts) != allow:
            updates["allow_hosts"] = allow
        if "connection_strategy" in ctx.options and ctx.options.connection_strategy != "lazy":
            updates["connection_strategy"] = "lazy"
        # mitmproxy guesses a decrypted connection's protocol from its first bytes, and with
        # `rawtcp` on passes one that does not look like HTTP yet (a request head sent in two
        # writes: `POST ` alone first) as raw TCP: past every hook, so past the policy, the
        # budgets and the traces (a review). Every connection intercepted here is an LLM API's.
        if "rawtcp" in ctx.options and ctx.options.rawtcp:
            updates["rawtcp"] = False
        if "tcp_hosts" in ctx.options and ctx.options.tcp_hosts:
            logger.warning("llm-mitm: tcp_hosts=%s is turned off: an LLM host's connection passed as raw TCP would bypass the policy "
                           "(hosts that are not LLM APIs are not intercepted anyway)", ",".join(ctx.options.tcp_hosts))
            updates["tcp_hosts"] = []
        # mitmproxy reads `ignore_hosts` after `allow_hosts`: with only LLM hosts allowed, an
        # ignore pattern can only pass an LLM host as a raw tunnel, unchecked and untraced (a
        # probe: `--set ignore_hosts=openai` had a refused model answered 200, no trace).
        if "ignore_hosts" in ctx.options and ctx.options.ignore_hosts:
            logger.warning("llm-mitm: ignore_hosts=%s is turned off: an LLM host it matched would pass unchecked and untraced "
                           "(hosts that are not LLM APIs are not intercepted anyway; disable a provider or drop its host instead)",
                           ",".join(ctx.options.ignore_hosts))
            updates["ignore_hosts"] = []
        if "stream_large_bodies" in ctx.options and ctx.options.stream_large_bodies:
            logger.warning("llm-mitm: stream_large_bodies=%s is turned off: each call is read whole for the policy and its cost "
                           "(streamed answers still pass as they come)", ctx.options.stream_large_bodies)
            updates["stream_large_bodies"] = None
        if not updates:
            return
        ctx.options.update(**updates)
        logger.info("llm-mitm: intercepting %s", ", ".join(sorted(hosts)) or "nothing (no provider is enabled)")

    def _unwatched_targets(self) -> list[ReverseMode]:
        if "mode" not in ctx.options:
            return []
        keep_host_header = "keep_host_header" in ctx.options and ctx.options.keep_host_header
        return unwatched_reverse_targets(ctx.options.mode, self.shared.matcher, keep_host_header)

    def _say_unwatched(self, targets: list[ReverseMode]) -> None:
        """A reverse proxy to a server no provider's hosts name (an address, a port of its
        own) passes every call past the policy, the budgets and the traces: mitmproxy sends
        it there with the target's Host header, so none is a provider's (a probe:
        `reverse:https://127.0.0.1:PORT` answered a refused model 200, without a word)."""
        unwatched = [mode.data for mode in targets]
        for target in unwatched:
            if target not in self._unwatched:
                logger.warning("llm-mitm: reverse proxy to %s, which no provider's hosts name: its calls pass unchecked and "
                               "untraced; add its host (and port) to a provider's hosts", target)
        self._unwatched = unwatched

    def request(self, flow: http.HTTPFlow) -> None:
        """llm_proxy's trick: a plain-http call to a provider goes upstream over https
        (mitmproxy connects upstream after this hook, as its own map_remote relies on)."""
        request = flow.request
        if request.http_version != "HTTP/1.1":
            _frame_body(request)
        if request.scheme != "http" or isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return
        provider = self.shared.matcher.match(request.host, request.port)
        if provider is None:
            return
        # Meant for this proxy, never for the provider (one on http too); but a plain-http call
        # that goes on as such to an upstream proxy carries that proxy's credentials, which
        # mitmproxy's upstream_auth has set (a review: taken off, the corporate proxy said 407).
        to_a_proxy = not provider.upgrade_http and isinstance(flow.client_conn.proxy_mode, UpstreamMode)
        for name in ("proxy-connection",) if to_a_proxy else _PROXY_HOP_HEADERS:
            request.headers.pop(name, None)
        if provider.upgrade_http:
            request.scheme = "https"
            if request.port == 80:
                request.port = 443


def unwatched_reverse_targets(modes: Sequence[str], matcher: ProviderMatcher, keep_host_header: bool) -> list[ReverseMode]:
    """The HTTP reverse modes whose target no provider's hosts name. With `keep_host_header`
    an https target's calls are routed by the Host header the client sent (a provider's)."""
    targets = []
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:  # mitmproxy refuses it itself
            continue
        if not isinstance(mode, ReverseMode) or mode.scheme not in ("http", "https") or (keep_host_header and mode.scheme == "https"):
            continue
        if matcher.match(*mode.address) is None:
            targets.append(mode)
    return targets


def _frame_body(request: http.Request) -> None:
    """An HTTP/2 or HTTP/3 request may carry a body with no `content-length` (its frames
    end it). With lazy connections the client can speak HTTP/2 to the proxy where the
    provider speaks HTTP/1.1, and mitmproxy would then send that body with nothing to say
    where it ends: the provider reads an empty body. Named here, it arrives whole."""
    if request.raw_content and "content-length" not in request.headers and "transfer-encoding" not in request.headers:
        request.headers["content-length"] = str(len(request.raw_content))
