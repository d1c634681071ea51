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
import re

from mitmproxy import connection, ctx
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.tls import parse_client_hello

from llm_mitm.addons.shared import Shared
from llm_mitm.config import Config
from llm_mitm.providers import ProviderMatcher, split_host

logger = logging.getLogger("llm_mitm.scope")

Name = tuple[str, int]  # a host, and the port the connection goes to


class Tunnels:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # client connection id -> the names mitmproxy decided it by, the hosts in scope as it
        # did, and its last decision (undecided while its `layer` is None: more data awaited)
        self._names: dict[str, tuple[ProviderMatcher, set[Name], layer.NextLayer]] = {}
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
        decides. UDP (QUIC) is not followed."""
        context = nextlayer.context
        client = context.client
        if client.transport_protocol != "tcp" or context.server.address is None:
            return
        host, port, *_ = context.server.address
        names = self._names[client.id][1] if client.id in self._names else set()
        self._names[client.id] = (self._matcher, names, nextlayer)
        names.add((host, port))
        data = nextlayer.data_client()
        for name in (client.sni, _server_name(data), _host_header(data)):
            if name:
                names.add(split_host(name, port))

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


def _server_name(data: bytes) -> str | None:
    """The server name a TLS ClientHello at the start of `data` asks for."""
    if not data.startswith(b"\x16\x03"):
        return None
    try:
        hello = parse_client_hello(data)
    except ValueError:
        return None
    return hello.sni if hello is not None else None


_HTTP_REQUEST = re.compile(rb"[A-Z]{3,}.+HTTP/", re.IGNORECASE)
_HOST_HEADER = re.compile(rb"\r\n(?:Host:\s+(.+?)\s*)?\r\n", re.IGNORECASE)  # the first header named Host, or the head's end


def _host_header(data: bytes) -> str | None:
    """The Host header of a plain-http request at the start of `data`, as mitmproxy reads it."""
    if not _HTTP_REQUEST.match(data) or not (found := _HOST_HEADER.search(data)) or not found[1]:
        return None
    return found[1].decode("utf-8", "surrogateescape")
