"""Cheap Watch clients for bench_streams.py: plain HTTP/2 on non-blocking sockets, one epoll loop.

Why it exists: the bench's clients stand in for thousands of sidecars on as many machines, but
here they share a 2-core machine with the cm-server they measure. grpc.aio clients cost more
CPU per message received (65-120 us) than the server spends sending it (50-80 us), so at
5 000 streams the arrival times measured the clients. This client does only what a Watch
stream needs on the wire: one TCP connection per stream (as one per sidecar), the HTTP/2
preface, one request, answers to SETTINGS and PING (the server's keepalive), and the gRPC
messages of stream 1, decoded with ``PollResponse.FromString``. No asyncio, no threads: one
``select.epoll`` loop per process, pausing 1 ms after each batch of reads so that one wake-up
serves several messages.

What it sends back matters to the server: a gRPC client at its defaults answers each read of
data with WINDOW_UPDATEs and a bandwidth-delay PING, which the server parses and answers (at
5 000 streams about a third of its CPU per message). ``like_grpc`` sends the same; without it
the client sends nothing after its request, as the sidecar's Watch channel does
(``grpc.http2.bdp_probe`` 0 and a 4 MiB window: one WINDOW_UPDATE in a whole run).

The frame encoding and parsing (:func:`opening`, :class:`Http2Watch`) know no socket;
:func:`client` is the socket loop, with the queue protocol of bench_streams.py's grpc client.
"""

from __future__ import annotations

import errno
import heapq
import multiprocessing as mp
import random
import select
import socket
import struct
import sys
import time
from multiprocessing.synchronize import Event

from common import raise_nofile

from clustermap._pb.clustermap.v1 import subscription_pb2 as spb

__all__ = ["Http2Watch", "client", "frame", "grpc_message", "opening", "request_headers"]

WATCH = "/clustermap.v1.Subscription/Watch"
OPEN_ATTEMPTS = 5  # as bench_streams.py's grpc client: a refused stream is retried, as a sidecar
#: Pause after each batch of reads. The clients are faster than the server, so without it every
#: message costs a wake-up of its own (a context switch and an epoll_wait), which was most of a
#: message's cost; arrivals are stamped this much later at most.
BATCH_S = 0.001

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 0x1
END_HEADERS, PADDED = 0x4, 0x8
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
#: Windows of a client that credits what it reads (like_grpc): far more than a message in flight.
GRPC_LIKE_WINDOW = 1 << 22

_HEADER = struct.Struct(">BHBBI")  # length (3 bytes as 1 + 2), type, flags, stream id
_PREFIX = struct.Struct(">BI")  # gRPC message: compressed flag, length
_DATA_MESSAGE = struct.Struct(">BHBBIBI")  # a frame header, then a gRPC message's prefix
_CREDIT = struct.Struct(">BHBBII BHBBII")  # WINDOW_UPDATE on stream 1, then on the connection
_PING = struct.Struct(">BHBBIQ")
_PING_ACK_HEADER = bytes([0, 0, 8, PING, ACK])


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with a ``prefix_bits`` prefix, ``first`` holding the byte's other bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(s: str) -> bytes:
    raw = s.encode()
    return _hpack_int(len(raw), 7, 0) + raw  # no Huffman


def request_headers(authority: str, path: str = WATCH) -> bytes:
    """The header block of a gRPC call: static-table entries and literals without indexing, so
    the server's HPACK decoder needs no dynamic table from us."""
    return b"".join(
        [
            b"\x83",  # :method POST (static 3)
            b"\x86",  # :scheme http (static 6)
            _hpack_int(4, 4, 0) + _hpack_str(path),  # :path (name: static 4)
            _hpack_int(1, 4, 0) + _hpack_str(authority),  # :authority (static 1)
            _hpack_int(31, 4, 0) + _hpack_str("application/grpc"),  # content-type (static 31)
            b"\x00" + _hpack_str("te") + _hpack_str("trailers"),  # new name
        ]
    )


def grpc_message(payload: bytes) -> bytes:
    """A length-prefixed gRPC message, not compressed."""
    return _PREFIX.pack(0, len(payload)) + payload


def opening(authority: str, request: bytes, window: int = MAX_WINDOW) -> bytes:
    """Everything a client sends on a new connection: the preface, SETTINGS (no push, stream
    windows of ``window`` bytes), the connection window raised to ``window``, and the call on
    stream 1 (HEADERS, then its one message with END_STREAM)."""
    settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, window)
    return b"".join(
        [
            PREFACE,
            frame(SETTINGS, 0, 0, settings),
            frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - DEFAULT_WINDOW)),
            frame(HEADERS, END_HEADERS, 1, request_headers(authority)),
            frame(DATA, END_STREAM, 1, grpc_message(request)),
        ]
    )


_SETTINGS_ACK = frame(SETTINGS, ACK, 0)


class Http2Watch:
    """The client side of one Watch call's connection, without the socket: :meth:`feed` takes
    the bytes read and returns the complete gRPC messages of stream 1; what must be sent back
    collects in :attr:`replies`; :attr:`ended` is set, with :attr:`reason`, once the stream is
    over (trailers, RST_STREAM or GOAWAY).

    Replies: SETTINGS and PING acknowledgements, and with ``like_grpc`` what a grpc (C-core)
    client such as the sidecar's sends after each read of data: WINDOW_UPDATEs on the stream and
    the connection crediting the bytes read, and a PING (its bandwidth-delay probe) unless one
    is still unanswered. The server parses those and answers each PING: work of its own per
    message, which a client sending nothing would leave out of its figures. Without
    ``like_grpc``, nothing is credited: open the connection with windows of 2**31-1."""

    __slots__ = (
        "_credit",
        "_frames",
        "_messages",
        "_pinging",
        "_pings_sent",
        "ended",
        "like_grpc",
        "pings",
        "reason",
        "replies",
    )

    def __init__(self, like_grpc: bool = False) -> None:
        self.like_grpc = like_grpc
        self._frames = b""  # an incomplete frame, kept for the next read
        self._messages = bytearray()  # an incomplete gRPC message (the full map spans frames)
        self._credit = 0  # DATA bytes read and not yet credited back
        self._pinging = False  # our PING is unanswered
        self._pings_sent = 0
        self.replies = bytearray()
        self.ended = False
        self.reason = ""
        self.pings = 0  # the server's PINGs answered

    def feed(self, data: bytes) -> list[bytes]:
        n = len(data)
        if not self._frames:  # the usual reads first
            if n >= 14 and not self._messages:  # one DATA frame holding one whole message
                hi, lo, ftype, flags, stream, _, size = _DATA_MESSAGE.unpack_from(data)
                if (
                    ftype == DATA
                    and not flags
                    and stream == 1
                    and hi << 16 | lo == n - 9 == size + 5
                ):
                    if self.like_grpc:
                        self._credit += n - 9
                        self._answer_data()
                    return [data[14:]]
            if n == 17 and data[:5] == _PING_ACK_HEADER:  # the answer to our PING
                self._pinging = False
                return []
        buf = self._frames + data if self._frames else data
        end = len(buf)
        pos = 0
        out: list[bytes] = []
        while end - pos >= 9:
            hi, lo, ftype, flags, stream = _HEADER.unpack_from(buf, pos)
            start = pos + 9
            if end - start < (hi << 16 | lo):
                break
            pos = start + (hi << 16 | lo)
            if ftype == DATA:
                if stream & 0x7FFFFFFF == 1:
                    self._credit += pos - start
                    if flags & PADDED:
                        self._data(buf[start + 1 : pos - buf[start]], out)
                    else:
                        self._data(buf[start:pos], out)
                    if flags & END_STREAM:
                        self._end("DATA with END_STREAM")
            elif ftype == PING:
                if flags & ACK:
                    self._pinging = False
                else:
                    self.pings += 1
                    self.replies += frame(PING, ACK, 0, buf[start:pos])
            elif ftype == SETTINGS:
                if not flags & ACK:
                    self.replies += _SETTINGS_ACK
            elif ftype == HEADERS:
                if flags & END_STREAM:  # trailers, or a trailers-only refusal
                    self._end("trailers")
            elif ftype == RST_STREAM:
                code = struct.unpack_from(">I", buf, start)[0] if pos - start >= 4 else -1
                self._end(f"RST_STREAM {code}")
            elif ftype == GOAWAY:
                code = struct.unpack_from(">I", buf, start + 4)[0] if pos - start >= 8 else -1
                self._end(f"GOAWAY {code}")
            # WINDOW_UPDATE, CONTINUATION, PRIORITY, unknown types: nothing to do
        self._frames = buf[pos:] if pos < end else b""
        if self._credit and self.like_grpc and not self.ended:
            self._answer_data()
        return out

    def _answer_data(self) -> None:
        credit = self._credit
        self._credit = 0
        self.replies += _CREDIT.pack(
            0, 4, WINDOW_UPDATE, 0, 1, credit, 0, 4, WINDOW_UPDATE, 0, 0, credit
        )
        if not self._pinging:
            self._pinging = True
            self._pings_sent += 1
            self.replies += _PING.pack(0, 8, PING, 0, 0, self._pings_sent)

    def _data(self, payload: bytes, out: list[bytes]) -> None:
        if not self._messages and len(payload) >= 5:  # the usual case: whole messages
            n = _PREFIX.unpack_from(payload, 0)[1]
            if len(payload) == 5 + n:
                out.append(payload[5:])
                return
        msgs = self._messages
        msgs += payload
        pos = 0
        while len(msgs) - pos >= 5:
            n = _PREFIX.unpack_from(msgs, pos)[1]
            if len(msgs) - pos - 5 < n:
                break
            out.append(bytes(msgs[pos + 5 : pos + 5 + n]))
            pos += 5 + n
        if pos:
            del msgs[:pos]

    def _end(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.reason = reason


# --- the socket loop ------------------------------------------------------------------------


class _Conn:
    __slots__ = ("events", "h2", "opened", "out", "slot", "sock")

    def __init__(self, sock: socket.socket, slot: int, out: bytes, like_grpc: bool) -> None:
        self.sock = sock
        self.slot = slot
        self.h2 = Http2Watch(like_grpc)
        self.out = out  # bytes still to send (the opening until the connect completes)
        self.opened = False
        self.events = select.EPOLLIN | select.EPOLLOUT  # as registered


def _sockaddr(address: str) -> tuple[int, tuple[str, int]]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def client(
    address: str,
    n: int,
    per_conn: int,
    ready: mp.Queue[int],
    stop: Event,
    out: mp.Queue[tuple[list[tuple[int, float]], int]],
    like_grpc: bool = False,
) -> None:
    """Open ``n`` Watch streams on ``address`` (one connection each: ``per_conn`` must be 1),
    about 100 per 50 ms; put on ``ready`` the number never opened once every stream has its
    first answer (the full map) or gave up; record ``(revision, time.time())`` for every later
    DELTA or FULL until ``stop`` is set; then put ``(arrivals, errors)`` on ``out``.
    ``like_grpc``: answer data as a grpc client does (:class:`Http2Watch`)."""
    if per_conn != 1:
        raise ValueError("the raw client opens one connection per stream")
    raise_nofile()
    family, sockaddr = _sockaddr(address)
    window = GRPC_LIKE_WINDOW if like_grpc else MAX_WINDOW
    hello = opening(address, spb.PollRequest().SerializeToString(), window)
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    attempts = [0] * n
    t0 = time.monotonic()
    due = [(t0 + (i // 100) * 0.05, i) for i in range(n)]  # (when, slot): opens and retries
    heapq.heapify(due)
    arrivals: list[tuple[int, float]] = []
    append = arrivals.append
    decode = spb.PollResponse.FromString
    counted = (spb.POLL_KIND_DELTA, spb.POLL_KIND_FULL)
    count = errors = 0
    reported = False
    next_stop_check = t0
    inout, only_in = select.EPOLLIN | select.EPOLLOUT, select.EPOLLIN

    def connect(slot: int) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
        conn = _Conn(sock, slot, hello, like_grpc)
        conns[sock.fileno()] = conn
        ep.register(sock.fileno(), inout)
        if err not in (0, errno.EINPROGRESS):
            ended(conn, errno.errorcode.get(err, str(err)))

    def ended(conn: _Conn, reason: str) -> None:
        nonlocal count, errors
        fd = conn.sock.fileno()
        ep.unregister(fd)
        del conns[fd]
        conn.sock.close()
        if conn.opened:
            return  # as the grpc client: a stream that ended after its first answer is done
        attempts[conn.slot] += 1
        if attempts[conn.slot] < OPEN_ATTEMPTS:
            heapq.heappush(due, (time.monotonic() + 0.5 + random.random(), conn.slot))
            return
        print(f"stream not opened: {reason}", file=sys.stderr)
        errors += 1
        count += 1

    def flush(conn: _Conn) -> bool:
        """Send what is pending, asking for EPOLLOUT while some is left; False when the
        connection failed."""
        try:
            k = conn.sock.send(conn.out)
        except BlockingIOError:
            k = 0
        except OSError as exc:
            ended(conn, exc.strerror or type(exc).__name__)
            return False
        conn.out = conn.out[k:]
        events = inout if conn.out else only_in
        if events != conn.events:
            ep.modify(conn.sock.fileno(), events)
            conn.events = events
        return True

    while True:
        mono = time.monotonic()
        while due and due[0][0] <= mono:
            connect(heapq.heappop(due)[1])
        if not reported and (count == n or mono - t0 > 300):
            ready.put(errors + n - count)  # streams that never answered count as errors
            reported = True
        if reported and mono >= next_stop_check:
            if stop.is_set():
                break
            next_stop_check = mono + 0.2
        timeout = 0.2 if not due else min(0.2, max(0.0, due[0][0] - mono))
        events = ep.poll(timeout)
        now = time.time()
        for fd, ev in events:
            conn = conns.get(fd)
            if conn is None:
                continue
            if conn.out and ev & select.EPOLLOUT and not flush(conn):
                continue
            if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                continue
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                ended(conn, exc.strerror or type(exc).__name__)
                continue
            if not data:
                ended(conn, "connection closed")
                continue
            h2 = conn.h2
            for msg in h2.feed(data):
                if not conn.opened:  # the first answer: the full map
                    conn.opened = True
                    count += 1
                    continue
                resp = decode(msg)
                if resp.kind in counted:
                    append((resp.revision, now))
            if h2.replies:
                conn.out += bytes(h2.replies)
                h2.replies.clear()
                if not flush(conn):
                    continue
            if h2.ended:
                ended(conn, h2.reason)
        if events:
            time.sleep(BATCH_S)  # let the next messages gather: one wake-up for several
    for conn in list(conns.values()):
        conn.sock.close()
    ep.close()
    out.put((arrivals, errors))
