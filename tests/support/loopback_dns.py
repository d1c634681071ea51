"""Test-only mitmproxy addon: resolve provider host names to local fake servers.

This stands in for DNS (an /etc/hosts line that can also name a port), nothing more:
the client still asks for api.openai.com, mitmproxy still verifies the upstream
certificate for that name, and keeps and reuses its connections by that name.
Routes come from LLM_MITM_TEST_ROUTES, like "api.openai.com=8443,*.openai.azure.com=8443".
"""

import fnmatch
import os
import socket

ROUTES = [
    (pattern, int(port))
    for pattern, _, port in (item.partition("=") for item in os.environ.get("LLM_MITM_TEST_ROUTES", "").split(","))
    if pattern and port
]

_system_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 - socket's own names
    name = host.decode() if isinstance(host, bytes) else str(host)
    for pattern, target in ROUTES:
        if fnmatch.fnmatchcase(name.lower(), pattern):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", target))]
    return _system_getaddrinfo(host, port, family, type, proto, flags)


socket.getaddrinfo = _getaddrinfo
