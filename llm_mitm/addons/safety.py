"""Start-up checks for unsafe set-ups: an open proxy, a readable CA key."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx
from mitmproxy.proxy.mode_specs import LocalMode, ProxyMode, WireGuardMode

logger = logging.getLogger("llm_mitm.safety")

CA_KEY = "mitmproxy-ca.pem"


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name


def ca_key_problem(confdir: Path) -> str | None:
    key = confdir.expanduser() / CA_KEY
    try:
        mode = os.stat(key).st_mode & 0o777
    except FileNotFoundError:
        return None
    if mode & 0o077:
        return f"{key} (the CA's private key) is mode {mode:o}: anyone who reads it can impersonate every site to clients that trust this CA; chmod 600 it"
    return None


def open_listen_hosts(modes: Sequence[str], listen_host: str) -> list[str]:
    """The addresses the proxy's modes listen on that are not loopback: each mode's own
    (`regular@0.0.0.0:8080`, `reverse:...@127.0.0.1:8000`) or else `listen_host` ("" is
    every interface). Local mode listens on no port; WireGuard lets in only its peers' keys."""
    hosts = []
    for spec in modes or ["regular"]:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:  # mitmproxy refuses it itself
            continue
        if isinstance(mode, (LocalMode, WireGuardMode)):
            continue
        host = mode.listen_host(listen_host)
        if not is_loopback(host.strip("[]")) and host not in hosts:
            hosts.append(host)
    return hosts


class Safety:
    def running(self) -> None:
        proxyauth = ctx.options.proxyauth if "proxyauth" in ctx.options else None
        hosts = open_listen_hosts(ctx.options.mode, ctx.options.listen_host)
        if hosts and not proxyauth:
            logger.warning(
                "llm-mitm: listening on %s without proxyauth: anyone who can reach this port can use the proxy "
                "and its decrypted traffic; use --set listen_host=127.0.0.1 (or a mode's @127.0.0.1:PORT) or --set proxyauth=USER:PASS",
                ", ".join(host or "every interface" for host in hosts),
            )
        if problem := ca_key_problem(Path(ctx.options.confdir)):
            logger.warning("llm-mitm: %s", problem)
