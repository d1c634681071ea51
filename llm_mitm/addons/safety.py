"""Start-up checks for unsafe set-ups: an open proxy, a readable CA key."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from mitmproxy import ctx

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


class Safety:
    def running(self) -> None:
        host = ctx.options.listen_host
        proxyauth = ctx.options.proxyauth if "proxyauth" in ctx.options else None
        if not is_loopback(host) and not proxyauth:
            logger.warning(
                "llm-mitm: listening on %s without proxyauth: anyone who can reach this port can use the proxy "
                "and its decrypted traffic; use --set listen_host=127.0.0.1 or --set proxyauth=USER:PASS",
                host or "every interface",
            )
        if problem := ca_key_problem(Path(ctx.options.confdir)):
            logger.warning("llm-mitm: %s", problem)
