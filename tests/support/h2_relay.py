"""A TCP relay that reads the HTTP/2 frames passing through it: what a gRPC client sends on
the wire, which no gRPC API shows (here: the PINGs a Watch stream's client sends)."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["FrameCountingRelay"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, PING, ACK = 0, 6, 0x1


class FrameCountingRelay:
    """Relays connections to ``upstream`` and counts, in each direction, HTTP/2 frames by type:
    ``sent[(type, is_ack)]`` from clients, ``received[...]`` from the server."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.sent: dict[tuple[int, bool], int] = {}
        self.received: dict[tuple[int, bool], int] = {}
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self, table: dict[tuple[int, bool], int], ftype: int, ack: bool = False) -> int:
        with self._lock:
            return table.get((ftype, ack), 0)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._upstream)
                self._sockets += [client, server]
                for src, dst, table, preface in (
                    (client, server, self.sent, len(_PREFACE)),
                    (server, client, self.received, 0),
                ):
                    args = (src, dst, table, preface)
                    threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, table: dict[tuple[int, bool], int], skip: int
    ) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
                buf += data
                if skip:  # the client's connection preface is not a frame
                    if len(buf) < skip:
                        continue
                    buf, skip = buf[skip:], 0
                while len(buf) >= 9:
                    size = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + size:
                        break
                    key = (buf[3], bool(buf[4] & ACK) and buf[3] == PING)
                    with self._lock:
                        table[key] = table.get(key, 0) + 1
                    buf = buf[9 + size :]
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
