"""A TCP server on loopback for tests: each connection handled in a thread of its own."""

from __future__ import annotations

import re
import socket
import threading


class Listener:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.create_server((host, 0))
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept; close alone would not
        except OSError:
            pass
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """A request's head and its body, read whole (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data and (piece := conn.recv(65536)):
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)) and (piece := conn.recv(65536)):
        body += piece
    return head, body
