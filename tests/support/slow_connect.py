"""Test-only mitmproxy addon: connecting upstream to api.anthropic.com takes SLOW_CONNECT
seconds (a slow name lookup or SYN), to hold a connection between mitmproxy's decision and
its upstream connection."""

import asyncio
import os


class SlowConnect:
    async def server_connect(self, data):  # type: ignore[no-untyped-def]
        if data.server.address and data.server.address[0] == "api.anthropic.com":
            await asyncio.sleep(float(os.environ.get("SLOW_CONNECT", "3")))


addons = [SlowConnect()]
