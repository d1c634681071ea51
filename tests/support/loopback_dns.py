"""Test-only mitmproxy addon: resolve provider host names to local fake servers.

This stands in for DNS (an /etc/hosts line), nothing more: the client still asks for
api.openai.com, mitmproxy still verifies the upstream certificate for that name.
Routes come from LLM_MITM_TEST_ROUTES, like "api.openai.com=8443,*.openai.azure.com=8443".
"""

import fnmatch
import os

from mitmproxy.proxy import server_hooks

ROUTES = [
    (pattern, int(port))
    for pattern, _, port in (item.partition("=") for item in os.environ.get("LLM_MITM_TEST_ROUTES", "").split(","))
    if pattern and port
]


def server_connect(data: server_hooks.ServerConnectionHookData) -> None:
    if not data.server.address:
        return
    host = str(data.server.address[0]).lower()
    for pattern, port in ROUTES:
        if fnmatch.fnmatchcase(host, pattern):
            data.server.address = ("127.0.0.1", port)
            return
