"""The two byte-level pieces of the ComfyUI edge on the hot path, written for CPU per call:

- `HttpPool`: HTTP/1.1 requests on kept-alive connections to one server (plain or TLS), no proxy.
- `FrameReader`: the server-to-client frames of an open websocket.

Why our own and not urllib3 / websocket-client here: a fleet of 64 servers running 0.2 s jobs makes about 640
HTTP calls and 3,000 websocket frames a second, and a profile of `bench/fleet.py` put urllib3 + http.client
(header parsing through the `email` package) at about 2.9 ms of CPU per call and websocket-client's frame
reading (a recv per frame header and per payload) at about 0.3 ms per frame: together two thirds of the
scheduler's CPU per job. The HTTP we speak is tiny (a JSON post, a GET, Content-Length or chunked replies,
keep-alive), and a frame is a 2-14 byte header. Proxies (HTTP_PROXY and friends) and multipart bodies stay
with urllib3 in `core.comfy`; the websocket handshake stays with websocket-client.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

MAX_HEADER = 64 * 1024  # bytes of status line + headers accepted in one reply
MAX_BODY = 512 * 1024 * 1024  # a reply larger than this is refused (an image is a few MB)
MAX_FRAME = 64 * 1024 * 1024  # a websocket message larger than this is refused
POOL_SIZE = 16  # idle kept-alive connections kept per server


class WireError(OSError):
    """A connection or protocol failure. `sent`: whether any of the request may have reached the server."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


class _Stale(Exception):
    """A kept-alive connection was found closed before any byte of the reply came."""


class _Connection:
    __slots__ = ("sock", "buf", "received")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.received = 0  # bytes read for the current reply

    def dropped(self) -> bool:
        """An idle kept-alive connection the server closed (or sent something unasked on) is not reused."""
        if self.buf:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.received += len(chunk)
        self.buf += chunk


class HttpPool:
    """Kept-alive HTTP/1.1 connections to one `http://` or `https://` server, shared by threads (each call takes
    an idle connection or opens one, and gives it back after a complete reply)."""

    def __init__(self, url: str, connect_timeout: float, read_timeout: float, ca_file: str | None = None):
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.context = ssl.create_default_context(cafile=ca_file) if self.tls else None
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn.sock)

    def _take_idle(self) -> _Connection | None:
        """A kept-alive connection still open, or None."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or not conn.dropped():
                return conn
            _close(conn.sock)

    def _take(self, reuse: bool = True) -> tuple[_Connection, bool]:
        """A connection and whether it was reused (kept alive from an earlier request)."""
        conn = self._take_idle() if reuse else None
        if conn is not None:
            return conn, True
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:
            raise WireError(f"could not connect: {type(exc).__name__}: {exc}", sent=False) from None
        sock.settimeout(self.read_timeout)
        return _Connection(sock), False

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                return
        _close(conn.sock)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, bytes]:
        """(status, body) of one request. Raises WireError (with `sent`) on any connection or protocol failure.
        A GET whose kept-alive connection turns out closed before any byte of the reply is sent again once on
        a new connection (the server may close an idle connection at any moment); a POST never is."""
        try:
            return self._request(method, path, body, content_type, reuse=True)
        except _Stale:
            if method != "GET":
                raise WireError("the kept-alive connection was closed by the server", sent=True) from None
            return self._request(method, path, body, content_type, reuse=False)

    def begin(self, method: str, path: str, body: bytes | None, content_type: str | None,
              on_done: Callable[[tuple[int, bytes] | WireError], None]) -> PendingReply | None:
        """Start a request on a kept-alive connection without waiting: return its reply-to-be, for a readiness loop
        (`core.eventhub`) to send what did not fit at once and read the reply as it arrives; `on_done` then
        gets (status, body) or a WireError. None when no open kept-alive connection is at hand (opening one would
        wait a round trip) or nothing could be sent: the caller then makes the call the blocking way."""
        conn = self._take_idle()
        if conn is None:
            return None
        data = self._head(method, path, body, content_type)
        try:
            conn.sock.setblocking(False)
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError:  # closed under us: nothing was sent
            _close(conn.sock)
            return None
        conn.received = 0
        return PendingReply(self, conn, method, memoryview(data)[sent:], on_done)

    def _head(self, method: str, path: str, body: bytes | None, content_type: str | None) -> bytes:
        head = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}", "Accept-Encoding: identity",
                "Connection: keep-alive"]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
            if content_type:
                head.append(f"Content-Type: {content_type}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def _request(self, method: str, path: str, body: bytes | None, content_type: str | None,
                 reuse: bool) -> tuple[int, bytes]:
        conn, reused = self._take(reuse)
        conn.received = 0
        data = self._head(method, path, body, content_type)
        try:
            conn.sock.sendall(data)
        except OSError as exc:
            _close(conn.sock)
            if reused:
                raise _Stale() from None
            raise WireError(f"sending failed: {type(exc).__name__}: {exc}", sent=True) from None
        try:
            status, content, keep = _read_reply(conn, method)
        except (OSError, ValueError) as exc:
            _close(conn.sock)
            if reused and conn.received == 0 and isinstance(exc, ConnectionError):
                raise _Stale() from None
            raise WireError(f"reading the reply failed: {type(exc).__name__}: {exc}", sent=True) from None
        if keep:
            self._give_back(conn)
        else:
            _close(conn.sock)
        return status, content


class PendingReply:
    """A request `HttpPool.begin` started, finished by a readiness loop (`core.eventhub`) on a non-blocking socket:
    while `wants_write`, `writable()` sends the rest of the request; `readable()` reads what arrived. Either
    returns False once the reply is whole or the connection failed; the loop then lets go of the socket and
    calls `lost()`, which gives the connection back (or closes it) and calls `on_done` with the outcome:
    (status, body), or a WireError (also when the loop gave up on it: a deadline passed, or it stopped)."""

    __slots__ = ("pool", "conn", "method", "out", "on_done", "outcome", "keep")

    def __init__(self, pool: HttpPool, conn: _Connection, method: str, out: memoryview,
                 on_done: Callable[[tuple[int, bytes] | WireError], None]):
        self.pool, self.conn, self.method, self.out, self.on_done = pool, conn, method, out, on_done
        self.outcome: tuple[int, bytes] | WireError | None = None
        self.keep = False

    @property
    def wants_write(self) -> bool:
        return bool(self.out)

    def writable(self) -> bool:
        try:
            sent = self.conn.sock.send(self.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return True
        except OSError as exc:
            self.outcome = WireError(f"sending failed: {type(exc).__name__}: {exc}", sent=True)
            return False
        self.out = self.out[sent:]
        return True

    def fileno(self) -> int:
        return self.conn.sock.fileno()

    def readable(self) -> bool:
        conn = self.conn
        try:
            chunk = read_available(conn.sock)
        except OSError as exc:
            self.outcome = WireError(f"reading the reply failed: {type(exc).__name__}: {exc}", sent=True)
            return False
        if chunk is None:
            return True
        conn.received += len(chunk)
        conn.buf += chunk
        try:
            reply = parse_reply(conn.buf, self.method, eof=not chunk)
        except (OSError, ValueError) as exc:
            self.outcome = WireError(f"reading the reply failed: {type(exc).__name__}: {exc}", sent=True)
            return False
        if reply is None:
            return True
        status, body, keep, used = reply
        del conn.buf[:used]
        self.keep = keep and not conn.buf  # bytes past the reply: not a connection to reuse
        self.outcome = (status, body)
        return False

    def lost(self) -> None:
        """The loop let go of the socket: the connection goes back to the pool (or is closed); `on_done` is told."""
        outcome = self.outcome
        conn = self.conn
        if self.keep:
            try:
                conn.sock.settimeout(self.pool.read_timeout)
                self.pool._give_back(conn)
            except OSError:
                _close(conn.sock)
        else:
            _close(conn.sock)
        if outcome is None:
            outcome = WireError("no whole reply in time (or the reader stopped)", sent=True)
        self.on_done(outcome)


def read_available(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has to read now (with TLS, every record already decrypted too): b"" when the peer
    closed it, None when nothing has come after all. Raises OSError when the connection failed."""
    try:
        chunk = sock.recv(262144)
        while chunk and isinstance(sock, ssl.SSLSocket) and sock.pending():
            chunk += sock.recv(262144)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
        return None
    return chunk


def _read_reply(conn: _Connection, method: str) -> tuple[int, bytes, bool]:
    """Read one whole reply from a blocking connection (what follows it stays in the buffer)."""
    eof = False
    while True:
        reply = parse_reply(conn.buf, method, eof)
        if reply is not None:
            status, body, keep, used = reply
            del conn.buf[:used]
            return status, body, keep
        try:
            conn.fill()
        except ConnectionError:
            eof = True  # parse_reply then ends a reply without a length there, or raises


def parse_reply(buf: bytearray, method: str, eof: bool = False) -> tuple[int, bytes, bool, int] | None:
    """(status, body, keep-alive, bytes used) of the first whole reply in `buf` (1xx replies before it are
    skipped), or None while more bytes are needed; nothing is consumed, so a caller reading as bytes arrive
    calls it again with more. `eof`: the server closed the connection (a reply without a length ends there; an
    unfinished one raises ConnectionError). Raises ValueError on a malformed or oversized reply."""
    start = 0
    while True:
        end = _find(buf, b"\r\n\r\n", start, "the headers of the reply are too long")
        if end < 0:
            return _more(eof)
        lines = bytes(buf[start:end]).split(b"\r\n")  # the status line and headers, split at once
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP reply: {lines[0][:80]!r}")
        status = int(parts[1])
        start = end + 4
        if status >= 200 or status == 101:
            break
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
    if method == "HEAD" or status in (204, 304):
        return status, b"", keep, start
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return _parse_chunked(buf, start, status, keep, eof)
    length = headers.get(b"content-length")
    if length is not None:
        n = int(length)
        if n < 0 or n > MAX_BODY:
            raise ValueError(f"a reply of {n} bytes is out of bounds")
        if len(buf) - start < n:
            return _more(eof)
        return status, bytes(buf[start:start + n]), keep, start + n
    # No length: the body runs to the end of the connection.
    if len(buf) - start > MAX_BODY:
        raise ValueError("the reply is too large")
    if not eof:
        return None
    return status, bytes(buf[start:]), False, len(buf)


def _parse_chunked(buf: bytearray, pos: int, status: int, keep: bool,
                   eof: bool) -> tuple[int, bytes, bool, int] | None:
    """A chunked body from `pos`: its chunks are located first and copied once the last one has come."""
    spans: list[tuple[int, int]] = []
    total = 0
    while True:
        line_end = _find(buf, b"\r\n", pos, "a chunk line of the reply is too long")
        if line_end < 0:
            return _more(eof)
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0].strip(), 16)
        pos = line_end + 2
        if size == 0:
            while True:  # trailers, up to the blank line
                line_end = _find(buf, b"\r\n", pos, "a trailer of the reply is too long")
                if line_end < 0:
                    return _more(eof)
                blank, pos = line_end == pos, line_end + 2
                if blank:
                    return status, b"".join(bytes(buf[a:b]) for a, b in spans), keep, pos
        total += size
        if size < 0 or total > MAX_BODY:
            raise ValueError("the reply is too large")
        if len(buf) < pos + size + 2:
            return _more(eof)
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise ValueError("a chunk does not end with CRLF")
        spans.append((pos, pos + size))
        pos += size + 2


def _find(buf: bytearray, mark: bytes, start: int, too_long: str) -> int:
    """Where `mark` is in `buf` from `start`, or -1 while it has not come; ValueError(`too_long`) once more than
    MAX_HEADER bytes came without it."""
    end = buf.find(mark, start)
    if end < 0 and len(buf) - start > MAX_HEADER:
        raise ValueError(too_long)
    return end


def _more(eof: bool) -> tuple[int, bytes, bool, int] | None:
    """None (more bytes are needed), or ConnectionError when no more can come."""
    if eof:
        raise ConnectionError("the server closed the connection before the reply was whole")
    return None


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# -- websocket frames ----------------------------------------------------------------------------------
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 1, 2, 8, 9, 10, 0


class FrameReader:
    """Messages (opcode, payload) from the server side of an open websocket. A readiness loop (`core.eventhub`)
    `feed()`s what it received, in chunks that often hold several frames, then `pop()`s every complete message.
    Fragmented messages are joined; control frames are returned as they come."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.parts: list[bytes] = []
        self.first_opcode = TEXT

    def feed(self, chunk: bytes) -> None:
        """Add received bytes (what was parsed already is dropped from the buffer first)."""
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += chunk

    def pop(self) -> tuple[int, bytes] | None:
        """The next complete message or control frame among the bytes fed so far, or None. Raises ValueError
        on a protocol violation (a frame or message over MAX_FRAME: checked from its header, before buffering)."""
        while True:
            buf, pos = self.buf, self.pos
            avail = len(buf) - pos
            if avail < 2:
                return None
            b0, b1 = buf[pos], buf[pos + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if avail < 4:
                    return None
                length, header = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if avail < 10:
                    return None
                length, header = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            masked = b1 & 0x80
            if masked:
                header += 4
            if length > MAX_FRAME:
                raise ValueError(f"a websocket frame of {length} bytes is too large")
            if avail < header + length:
                return None
            start = pos + header
            payload = bytes(buf[start:start + length])
            if masked:
                key = buf[start - 4:start]
                payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            self.pos = start + length
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode >= 8:
                return opcode, payload  # control frames are never fragmented
            if opcode != CONTINUATION:
                self.first_opcode, self.parts = opcode, []
            self.parts.append(payload)
            if sum(len(p) for p in self.parts) > MAX_FRAME:
                raise ValueError("a fragmented websocket message is too large")
            if fin:
                message, self.parts = b"".join(self.parts), []
                return self.first_opcode, message
