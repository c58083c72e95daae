"""The collector's hot path. core.wire, the lean HTTP/1.1 client and websocket frame reader, against real sockets
on loopback serving replies byte for byte as written here (chunked bodies, closed kept-alive connections,
fragmented and masked frames: shapes ComfyUI's aiohttp does not produce on cue); the PNG header read and the
atomic image write."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from core import wire
from core.comfy import ComfyClient
from core.errors import ServerUnavailable


class Server:
    """Accepts connections; `handler(conn, request_bytes)` answers each request; records what arrived."""

    def __init__(self, handler: Callable[[socket.socket, bytes, int], bool]):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                request, buf = head + b"\r\n\r\n" + rest[:length], rest[length:]
                self.requests.append(request)
                if not self.handler(conn, request, len(self.requests)):
                    return  # close the connection

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(handler: Callable[[socket.socket, bytes, int], bool]) -> Server:
        servers.append(Server(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def reply(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_keep_alive_reuses_one_connection_and_reads_chunked_and_close_delimited_bodies(serve):
    def handler(conn: socket.socket, request: bytes, n: int) -> bool:
        if b"/chunked" in request:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
            return True
        if b"/to-close" in request:
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            return False
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b'{"n": %d}' % n, extra="X-A: b\r\n"))
        return True

    server = serve(handler)
    pool = wire.HttpPool(server.url, 5, 5)
    assert pool.request("GET", "/a") == (200, b'{"n": 1}')
    assert pool.request("POST", "/b", b'{"x":1}', "application/json") == (200, b'{"n": 2}')
    assert pool.request("GET", "/chunked") == (200, b"hello, world")
    assert server.connections == 1  # one kept-alive connection for all three
    assert server.requests[1].endswith(b'\r\nContent-Length: 7\r\nContent-Type: application/json\r\n\r\n{"x":1}')
    assert pool.request("GET", "/to-close") == (200, b"until the end")
    assert pool.request("GET", "/again") == (200, b'{"n": 5}')
    assert server.connections == 2  # the closed one was not reused
    pool.close()


def test_a_get_on_a_connection_the_server_closed_is_sent_again_a_post_is_not(serve, monkeypatch):
    def handler(conn: socket.socket, request: bytes, n: int) -> bool:
        if n in (2, 5):
            return False  # read the request, close without a byte of reply (an idle-timeout race)
        conn.sendall(reply(b"ok"))
        return True

    server = serve(handler)
    pool = wire.HttpPool(server.url, 5, 5)
    # The server's close lands just after the idle check: the request goes out on a connection about to close.
    monkeypatch.setattr(wire._Connection, "dropped", lambda self: False)
    assert pool.request("GET", "/x") == (200, b"ok")
    assert pool.request("GET", "/drop") == (200, b"ok")  # dropped on the kept-alive one, then sent afresh
    assert [r.split(b" ")[1] for r in server.requests] == [b"/x", b"/drop", b"/drop"]
    assert server.connections == 2
    assert pool.request("GET", "/y") == (200, b"ok")
    with pytest.raises(wire.WireError) as raised:
        pool.request("POST", "/drop", b"{}", "application/json")
    assert raised.value.sent  # the post may have reached the server: never sent twice
    assert sum(r.startswith(b"POST /drop") for r in server.requests) == 1
    pool.close()


def test_refused_is_not_sent_a_silent_server_times_out_as_maybe_sent(serve):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    client = ComfyClient(f"http://127.0.0.1:{port}", "cid", 2, 2)
    with pytest.raises(ServerUnavailable) as raised:
        client.submit({"1": {}}, "pid")
    assert not raised.value.maybe_delivered and "unreachable" in str(raised.value)
    silent = serve(lambda conn, request, n: True)  # reads, never answers
    client = ComfyClient(silent.url, "cid", 2, 0.3)
    with pytest.raises(ServerUnavailable) as raised:
        client.submit({"1": {}}, "pid")
    assert raised.value.maybe_delivered
    client.close()


def test_comfy_client_speaks_json_query_and_multipart_through_the_pool(serve):
    def handler(conn: socket.socket, request: bytes, n: int) -> bool:
        if request.startswith(b"POST /upload/image"):
            conn.sendall(reply(b'{"name": "cat.png", "subfolder": "in"}'))
        elif request.startswith(b"GET /view?"):
            conn.sendall(reply(b"\x89PNG bytes"))
        else:
            conn.sendall(reply(b'{"prompt_id": "p1", "number": 1}'))
        return True

    server = serve(handler)
    client = ComfyClient(server.url, "cid", 2, 2)
    assert client.submit({"9": {"class_type": "SaveImage", "inputs": {}}}, "p1")["prompt_id"] == "p1"
    assert client.view({"filename": "a b.png", "subfolder": "x/y", "type": "output"}) == b"\x89PNG bytes"
    assert client.upload_image(b"\x89PNGdata", "cat.png") == "in/cat.png"
    post, view, upload = server.requests
    assert b'"client_id":"cid"' in post and b'"prompt_id":"p1"' in post
    assert view.startswith(b"GET /view?filename=a+b.png&subfolder=x%2Fy&type=output HTTP/1.1\r\n")
    assert b"multipart/form-data; boundary=" in upload and b'filename="cat.png"' in upload
    assert server.connections == 1
    client.close()


class FakeSock:
    """Hands out the given byte strings one recv at a time, then times out (as a socket with a timeout)."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            raise TimeoutError
        return self.chunks.pop(0)


def frame(payload: bytes, opcode: int = wire.TEXT, fin: bool = True, mask: bytes | None = None) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + n.to_bytes(8, "big")
    if mask:
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


def test_frame_reader_splits_joins_and_resumes_mid_frame():
    big = b"x" * 70000
    stream = (frame(b'{"type": "a"}') + frame(b"ping!", wire.PING) + frame(b"hel", fin=False)
              + frame(b"lo", wire.CONTINUATION) + frame(big) + frame(b"masked", mask=b"\x01\x02\x03\x04")
              + frame(b"", wire.CLOSE))
    cut = stream.index(big[:10]) + 100  # a chunk boundary in the middle of the large frame
    reader = wire.FrameReader()
    reader.feed(stream[:7])
    assert reader.pop() is None  # half of the first frame
    reader.feed(stream[7:cut])
    assert reader.pop() == (wire.TEXT, b'{"type": "a"}')
    assert reader.pop() == (wire.PING, b"ping!")
    assert reader.pop() == (wire.TEXT, b"hello")
    assert reader.pop() is None  # half of the big frame so far: nothing returned, nothing lost
    reader.feed(stream[cut:])
    assert reader.pop() == (wire.TEXT, big)
    assert reader.pop() == (wire.TEXT, b"masked")
    assert reader.pop() == (wire.CLOSE, b"")
    assert reader.pop() is None


def test_frame_reader_refuses_an_oversized_frame_before_reading_it():
    reader = wire.FrameReader()
    reader.feed(bytes([0x81, 127]) + (wire.MAX_FRAME + 1).to_bytes(8, "big"))
    with pytest.raises(ValueError, match="too large"):
        reader.pop()


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "LA", "RGBA", "1", "I;16"])
def test_describe_image_reads_a_png_header_as_pillow_does(mode):
    """The collector's fast path (IHDR read directly for 8-bit PNGs) gives what Pillow gives, every mode."""
    import io

    from PIL import Image

    from core import files

    buf = io.BytesIO()
    Image.new(mode, (37, 21)).save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert files.describe_image(buf.getvalue()) == {"width": im.width, "height": im.height, "mode": im.mode}
    truncated = buf.getvalue()[:20]
    assert files.describe_image(truncated) == {"width": None, "height": None, "mode": None}


def test_write_atomic_writes_whole_files_and_survives_a_removed_folder(tmp_path):
    import shutil

    from core import files

    target = tmp_path / "batch-00001" / "task-000001_9_00.png"
    for sole in (True, False):
        files.write_atomic(target, b"a" * 100_000, sole_writer=sole)
        assert target.read_bytes() == b"a" * 100_000
        shutil.rmtree(target.parent)  # a folder this process already made, removed behind its back
        files.write_atomic(target, b"b", sole_writer=sole)
        assert target.read_bytes() == b"b"
        assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file left
        shutil.rmtree(target.parent)


def test_the_log_file_rotates_by_the_size_it_counted(tmp_path):
    """core.logs.RotatingFile keeps count instead of seeking per record: files still rotate near maxBytes,
    every line lands whole in order, and a reopened handler picks up the size already on disk."""
    import logging

    from core.logs import RotatingFile

    log = logging.getLogger("comfybatch.test.rotation")
    log.propagate = False
    log.setLevel(logging.INFO)
    path = tmp_path / "x.log"
    (tmp_path / "x.log").write_text("x" * 900, encoding="utf-8")  # left by an earlier run
    handler = RotatingFile(path, maxBytes=1000, backupCount=3, encoding="utf-8")
    log.addHandler(handler)
    try:
        for i in range(30):
            log.info("line %02d 一只小猪在花园里 ....................", i)
    finally:
        log.removeHandler(handler)
        handler.close()
    assert (tmp_path / "x.log.1").exists() and not (tmp_path / "x.log.4").exists()
    assert all(p.stat().st_size < 1000 * 3 for p in tmp_path.iterdir())  # ~1000 characters of up to 3 bytes
    lines = [line for name in ("x.log.3", "x.log.2", "x.log.1", "x.log") if (tmp_path / name).exists()
             for line in (tmp_path / name).read_text(encoding="utf-8").splitlines() if line.startswith("line")]
    assert lines[-1].startswith("line 29") and [int(x.split()[1]) for x in lines] == sorted(
        int(x.split()[1]) for x in lines)
    oldest = max((p for p in tmp_path.iterdir() if p.name != "x.log"), key=lambda p: p.name)
    assert oldest.read_text(encoding="utf-8").startswith("x" * 900)  # the earlier run's file, rotated first


def test_a_reply_arriving_a_byte_at_a_time_is_read_whole():
    """Headers and body split across many reads (a slow link): the blank line after the headers is found
    however the bytes are cut."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Long: " + b"y" * 300 + b"\r\n\r\nhello" + b"HTTP/1.1 204 No"
    conn = wire._Connection(FakeSock([raw[i:i + 1] for i in range(len(raw))]))  # type: ignore[arg-type]
    assert wire._read_reply(conn, "GET") == (200, b"hello", True)
    assert bytes(conn.buf) == b""  # nothing of the next reply read ahead yet
