"""A minimal corporate HTTP CONNECT proxy (for mitmproxy's upstream mode).

It resolves provider names to the local fake server, as a corporate proxy would
resolve them through its own DNS, and remembers every CONNECT it handled.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping

from tests.support.listener import Listener


class CorpProxy(Listener):
    def __init__(self, routes: Mapping[str, int]) -> None:
        self.routes = dict(routes)
        self.connects: list[str] = []
        super().__init__()

    def handle(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                client.close()
                return
            head += data
        line = head.split(b"\r\n", 1)[0].decode()
        method, target, _ = line.split(" ", 2)
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or host not in self.routes:
            client.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            client.close()
            return
        self.connects.append(target)
        upstream = socket.create_connection(("127.0.0.1", self.routes[host]))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
        _pipe(upstream, client)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
