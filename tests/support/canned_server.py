"""A plain-HTTP server on loopback that answers each path with bytes given as they are
(a status line, headers and a body, right or wrong), and remembers what it was asked."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from tests.support.listener import Listener


class CannedServer(Listener):
    def __init__(self, answers: Mapping[str, bytes], host: str = "127.0.0.1") -> None:
        self.answers = dict(answers)
        self.requests: list[bytes] = []  # each request's head
        super().__init__(host)

    def __enter__(self) -> CannedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and (piece := conn.recv(65536)):
                head += piece
            self.requests.append(head)
            path = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else ""
            conn.sendall(self.answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))


def ok(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    """An answer (200 unless told) with `body` and a right Content-Length."""
    extra = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode() + body
