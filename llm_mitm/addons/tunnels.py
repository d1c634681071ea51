"""Closes the connections a config edit takes into scope.

mitmproxy decides once a connection whether to intercept it: one to a host out of scope
passes untouched, as raw TLS. A client's kept-alive connection to a host an edit then took
into scope stayed a raw tunnel, its calls unchecked and untraced until it closed (a probe:
the next call on it passed a model the new policy refuses; a new connection was refused).
So each connection's names are noted as mitmproxy decides by them (where it goes, the TLS
server name its client asks for), and an edit closes each connection none of whose names
was in scope and one of which now is: the client connects again, and is intercepted.
"""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_specs import ReverseMode

from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config
from llm_mitm.providers import ProviderMatcher

logger = logging.getLogger("llm_mitm.scope")

Name = tuple[str, int]  # a host, and the port the connection goes to


class Tunnels:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._names: dict[str, set[Name]] = {}  # client connection id -> the names mitmproxy decided it by
        self._matcher = shared.matcher  # of the config in force
        self._hosts: set[str] | None = None  # in scope, from the first config put in force once loaded
        self._loaded = False
        shared.on_config(self._take_in, now=False)  # after Scope's: the new hosts are allowed by then

    def load(self, loader: object) -> None:
        self._loaded = True

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Notes the names mitmproxy's own addon decides by, which it does after this one:
        where the connection goes, and the TLS server name its client asks for. A reverse
        proxy's connections are always intercepted; UDP (QUIC) is not followed."""
        context = nextlayer.context
        client = context.client
        if client.transport_protocol != "tcp" or context.server.address is None or isinstance(client.proxy_mode, ReverseMode):
            return
        host, port, *_ = context.server.address
        names = self._names.setdefault(client.id, set())
        names.add((host, port))
        for server_name in (client.sni, _server_name(nextlayer.data_client())):
            if server_name:
                names.add((server_name, port))

    def client_disconnected(self, client: connection.Client) -> None:
        self._names.pop(client.id, None)

    def _take_in(self, config: Config) -> None:
        before, self._matcher = self._matcher, self.shared.matcher
        if not self._loaded:
            return
        hosts, known = _hosts(config), self._hosts
        self._hosts = hosts
        if known is None or not (added := hosts - known):
            return
        closed = self._close(before)
        logger.warning("llm-mitm: %s now intercepted%s", ", ".join(sorted(added)),
                       f"; {closed} connection(s) to them passed untouched before are closed" if closed else "")

    def _close(self, before: ProviderMatcher) -> int:
        """Closes the connections none of whose names `before` matched and one of which the
        matcher in force does: their number."""
        proxyserver = ctx.master.addons.get("proxyserver")
        handlers = getattr(proxyserver, "connections", {})
        closed = 0
        for client_id, names in list(self._names.items()):
            if any(before.match(*name) for name in names) or not any(self._matcher.match(*name) for name in names):
                continue
            handler = handlers.get(client_id)
            io = handler.transports.get(handler.client) if handler is not None else None
            if io is not None and io.handler is not None:
                io.handler.cancel("llm-mitm: its host is now intercepted")
                closed += 1
            del self._names[client_id]
        return closed


def _hosts(config: Config) -> set[str]:
    return {host for provider in config.enabled_providers.values() for host in provider.hosts}


def _server_name(data: bytes) -> str | None:
    """The server name a TLS ClientHello at the start of `data` asks for."""
    if not data.startswith(b"\x16\x03"):
        return None
    try:
        hello = parse_client_hello(data)
    except ValueError:
        return None
    return hello.sni if hello is not None else None
