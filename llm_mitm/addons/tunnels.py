"""Closes the connections a config edit takes into scope.

mitmproxy decides once a connection whether to intercept it: one to a host out of scope
passes untouched, as raw TLS. A client's kept-alive connection to a host an edit then took
into scope stayed a raw tunnel, its calls unchecked and untraced until it closed (a probe:
the next call on it passed a model the new policy refuses; a new connection was refused).
So each connection's names are noted as mitmproxy decides by them (where it goes, the TLS
server name its client asks for, a plain-http request's Host header), and an edit closes
each connection none of whose names was in scope as mitmproxy decided and one of which now
is: the client connects again, and is intercepted.
"""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx
from mitmproxy.addons.next_layer import NeedsMoreData
from mitmproxy.addons.next_layer import NextLayer as NextLayerAddon
from mitmproxy.proxy import layer

from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config
from llm_mitm.providers import ProviderMatcher, split_host

logger = logging.getLogger("llm_mitm.scope")

Name = tuple[str, int]  # a host, and the port the connection goes to
Decided = tuple[ProviderMatcher, set[Name], layer.NextLayer]

# Client connection id -> the names mitmproxy decided it by, the hosts in scope as it did,
# and its last decision (undecided while its `layer` is None: more data awaited). The
# process's, not an addon's: a script reload makes the addons anew (this module stays
# loaded), and the connections decided before it go on (a review: an edit after a reload
# left them open).
_DECIDED: dict[str, Decided] = {}


class Tunnels:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._names = _DECIDED
        self._matcher = shared.matcher  # of the config in force
        self._hosts: set[str] | None = None  # in scope, from the first config put in force once loaded
        self._loaded = False
        shared.on_config(self._take_in, now=False)  # after Scope's: the new hosts are allowed by then

    def load(self, loader: object) -> None:
        self._loaded = True

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Notes the names mitmproxy's own addon decides by, which it does after this one
        (in any mode, a reverse proxy's too): where the connection goes, the TLS server name
        its client asks for, a plain-http request's Host header; with the hosts in scope as it
        decides. UDP (QUIC) is not followed, nor a connection mitmproxy decided before
        llm-mitm was first loaded in this process."""
        context = nextlayer.context
        client = context.client
        if client.transport_protocol != "tcp" or context.server.address is None:
            return
        host, port, *_ = context.server.address
        names = self._names[client.id][1] if client.id in self._names else set()
        self._names[client.id] = (self._matcher, names, nextlayer)
        names.add((host, port))
        names.update(split_host(name, port) for name in _names_asked(nextlayer))

    def client_disconnected(self, client: connection.Client) -> None:
        self._names.pop(client.id, None)

    def _take_in(self, config: Config) -> None:
        self._matcher = self.shared.matcher
        if not self._loaded:
            return
        hosts, known = config.intercepted_hosts, self._hosts
        self._hosts = hosts
        if known is None or not (added := hosts - known):
            return
        closed = self._close()
        logger.warning("llm-mitm: %s now intercepted%s", ", ".join(sorted(added)),
                       f"; {closed} connection(s) to them passed untouched before are closed" if closed else "")

    def _close(self) -> int:
        """Closes the connections none of whose names was in scope as mitmproxy decided and
        one of which is now: their number. One mitmproxy has yet to decide (it waits for the
        rest of a request's head or a ClientHello) is decided under the new scope."""
        proxyserver = ctx.master.addons.get("proxyserver")
        handlers = getattr(proxyserver, "connections", {})
        closed = 0
        for client_id, (decided_by, names, decision) in list(self._names.items()):
            if decision.layer is None or any(decided_by.match(*name) for name in names) or not any(self._matcher.match(*name) for name in names):
                continue
            handler = handlers.get(client_id)
            io = handler.transports.get(handler.client) if handler is not None else None
            if io is not None and io.handler is not None:
                io.handler.cancel("llm-mitm: its host is now intercepted")
                closed += 1
            del self._names[client_id]
        return closed


def _names_asked(nextlayer: layer.NextLayer) -> list[str]:
    """The TLS server name and the plain-http Host header a connection's client asks for,
    read by mitmproxy's own next-layer addon's readers: the names it decides by, read alike
    (those not come yet are read at the next call, when more data has come)."""
    context, data = nextlayer.context, nextlayer.data_client()
    asked = [context.client.sni]
    try:
        hello = NextLayerAddon._get_client_hello(context, data)
        asked += [hello.sni if hello is not None else None, NextLayerAddon._get_host_header(context, data, nextlayer.data_server())]
    except NeedsMoreData:
        pass
    return [name for name in asked if name]
