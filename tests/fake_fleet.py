"""A simulated fleet of ComfyUI servers in one process, for what real servers cannot do here: be 32 or 64
servers on 2 cores (bench/fleet.py) and be killed under a worker process on cue (tests/test_leases.py).

Each server listens on its own loopback port and speaks the subset of ComfyUI's protocol the engine uses
(HTTP/1.1 with keep-alive: POST /prompt, GET /queue, POST /queue delete, POST /interrupt, GET /history/{id},
GET /view, GET /system_stats; and the websocket /ws?clientId=...). It runs one prompt at a time for a fixed
job time, sends the real server's event sequence to the prompt's client (execution_start, executing, N
progress events, executed with one small PNG, execution_success, executing null) and keeps /history.
`rtt` adds a network round trip: half before a request is handled, half before its reply is sent, and half
before every websocket frame. One asyncio loop serves every server, so the fleet costs little CPU.

GET /_stats on any port answers every server's record: the prompt ids it received and each run's
(prompt_id, start, finish) wall times, for the benchmark's ratios and the tests' no-duplicate checks.

Run alone: `python -m tests.fake_fleet --servers 64 --job 0.2 --rtt 0.08` prints one URL per line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 40)).save(buf, "PNG")
    return buf.getvalue()


def frame(payload: bytes) -> bytes:
    """One unmasked websocket text frame (server to client)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, n])
    elif n < 65536:
        head = bytes([0x81, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 127]) + n.to_bytes(8, "big")
    return head + payload


class Socket:
    """A websocket client of one server: frames are delivered in order, each `delay` seconds after sending."""

    def __init__(self, writer: asyncio.StreamWriter, delay: float):
        self.writer = writer
        self.delay = delay
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump()) if delay else None

    def send(self, kind: str, data: dict[str, Any]) -> None:
        body = frame(json.dumps({"type": kind, "data": data}).encode())
        if self.task is None:
            self.writer.write(body)
        else:
            self.queue.put_nowait((time.monotonic() + self.delay, body))

    async def _pump(self) -> None:
        while True:
            due, body = await self.queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(body)


class Server:
    def __init__(self, fleet: Fleet, index: int):
        self.fleet = fleet
        self.index = index
        self.port = 0
        self.pending: deque[str] = deque()
        self.running: str | None = None
        self.interrupt: str | None = None
        self.owner: dict[str, str] = {}  # prompt_id -> client_id
        self.history: dict[str, dict[str, Any]] = {}
        self.received: list[str] = []
        self.runs: list[tuple[str, float, float]] = []  # (prompt_id, start, finish) wall times
        self.sockets: dict[str, list[Socket]] = {}
        self.writers: set[asyncio.StreamWriter] = set()
        self.wake = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def send(self, prompt_id: str, kind: str, data: dict[str, Any]) -> None:
        for sock in self.sockets.get(self.owner.get(prompt_id, ""), []):
            sock.send(kind, {**data, "prompt_id": prompt_id})

    async def run(self) -> None:
        """Execute prompts one at a time, like ComfyUI's single executor."""
        steps = self.fleet.progress
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            pid = self.running = self.pending.popleft()
            start = time.time()
            self.send(pid, "execution_start", {"timestamp": int(start * 1000)})
            self.send(pid, "executing", {"node": "9", "display_node": "9"})
            interrupted = False
            for step in range(1, max(steps, 1) + 1):
                await asyncio.sleep(self.fleet.job / max(steps, 1))
                if self.interrupt == pid:
                    interrupted = True
                    break
                if steps:
                    self.send(pid, "progress", {"value": step, "max": steps, "node": "9"})
            finish = time.time()
            self.running = None
            if interrupted:
                data = {"node_id": "9", "node_type": "SaveImage", "executed": []}
                self.history[pid] = {"prompt": [], "outputs": {}, "meta": {}, "status": {
                    "status_str": "error", "completed": False, "messages": [["execution_interrupted", data]]}}
                self.send(pid, "execution_interrupted", data)
            else:
                image = {"filename": f"fleet_{self.index}_{len(self.runs):05d}_.png", "subfolder": "",
                         "type": "output"}
                outputs = {"9": {"images": [image]}}
                self.history[pid] = {"prompt": [], "outputs": outputs, "meta": {}, "status": {
                    "status_str": "success", "completed": True, "messages": [  # as a real server's
                        ["execution_start", {"prompt_id": pid, "timestamp": int(start * 1000)}],
                        ["execution_success", {"prompt_id": pid, "timestamp": int(finish * 1000)}]]}}
                self.send(pid, "executed", {"node": "9", "display_node": "9", "output": outputs["9"]})
                self.send(pid, "execution_success", {"timestamp": int(finish * 1000)})
            self.send(pid, "executing", {"node": None})
            self.runs.append((pid, start, finish))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        half = self.fleet.rtt / 2
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                url = urlsplit(target)
                if url.path == "/ws":
                    await self._websocket(reader, writer, headers, parse_qs(url.query).get("clientId", [""])[0])
                    return
                if half:
                    await asyncio.sleep(half)
                status, kind, reply = self.route(method, url.path, parse_qs(url.query), body)
                if half:
                    await asyncio.sleep(half)
                writer.write(f"HTTP/1.1 {status} OK\r\nContent-Type: {kind}\r\nContent-Length: {len(reply)}\r\n"
                             "Connection: keep-alive\r\n\r\n".encode() + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.CancelledError):
            pass  # the client went away, or the fleet is stopping
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _websocket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         headers: dict[str, str], client_id: str) -> None:
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        sock = Socket(writer, self.fleet.rtt / 2)
        self.sockets.setdefault(client_id, []).append(sock)
        sock.send("status", {"status": {"exec_info": {"queue_remaining": len(self.pending)}}, "sid": client_id})
        try:
            while await reader.read(4096):  # the client's frames (close, pong) are not needed
                pass
        finally:
            self.sockets[client_id].remove(sock)
            if sock.task is not None:
                sock.task.cancel()

    def route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, str, bytes]:
        as_json = "application/json"
        if method == "POST" and path == "/prompt":
            data = json.loads(body)
            pid = data["prompt_id"]
            self.received.append(pid)
            self.owner[pid] = data.get("client_id", "")
            self.pending.append(pid)
            self.wake.set()
            return 200, as_json, json.dumps({"prompt_id": pid, "number": len(self.received), "node_errors": {}}
                                            ).encode()
        if method == "GET" and path == "/queue":
            running = [[0, self.running, {}, {}, []]] if self.running else []
            pending = [[n + 1, p, {}, {}, []] for n, p in enumerate(self.pending)]
            return 200, as_json, json.dumps({"queue_running": running, "queue_pending": pending}).encode()
        if method == "POST" and path == "/queue":
            for pid in json.loads(body or b"{}").get("delete") or []:
                if pid in self.pending:
                    self.pending.remove(pid)
            return 200, as_json, b"{}"
        if method == "POST" and path == "/interrupt":
            target = json.loads(body or b"{}").get("prompt_id")
            if self.running and target in (None, self.running):
                self.interrupt = self.running
            return 200, as_json, b"{}"
        if method == "GET" and path.startswith("/history/"):
            pid = path.rsplit("/", 1)[-1]
            entry = self.history.get(pid)
            return 200, as_json, json.dumps({pid: entry} if entry else {}).encode()
        if method == "GET" and path == "/view":
            if self.fleet.fail_views > 0:  # a test's cue: the next N downloads fail (any server)
                self.fleet.fail_views -= 1
                return 503, as_json, b'{"error": "view failed on cue"}'
            self.fleet.views += 1
            return 200, "image/png", self.fleet.png
        if method == "GET" and path == "/system_stats":
            return 200, as_json, json.dumps({"system": {"comfyui_version": "fake-fleet"}, "devices": [
                {"name": f"fake-{self.index}", "vram_total": 0, "vram_free": 0}]}).encode()
        if method == "GET" and path == "/_stats":
            return 200, as_json, json.dumps(self.fleet.record()).encode()
        return 404, as_json, b"{}"


class Fleet:
    """`servers` simulated servers; `start()` runs them on a thread of their own until `stop()`."""

    def __init__(self, servers: int, job: float = 0.2, rtt: float = 0.0, progress: int = 4):
        self.job, self.rtt, self.progress = job, rtt, progress
        self.png = small_png()
        self.fail_views = 0  # the next N GET /view answer 503
        self.views = 0  # GET /view answered with the image
        self.count = servers
        self.servers: list[Server] = []
        self.listeners: list[asyncio.Server] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-fleet", daemon=True)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def record(self) -> dict[str, Any]:
        return {"job": self.job, "rtt": self.rtt, "servers": [
            {"url": s.url, "received": list(s.received), "runs": list(s.runs)} for s in self.servers]}

    def stats(self) -> dict[str, Any]:
        """Every server's record, read on the fleet's own loop."""
        async def read() -> dict[str, Any]:
            return self.record()
        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(10)

    async def _serve(self) -> None:
        for i in range(self.count):
            server = Server(self, i)
            listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, backlog=128)
            server.port = listener.sockets[0].getsockname()[1]
            self.listeners.append(listener)
            self.servers.append(server)
            self.loop.create_task(server.run())
        self._ready.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    def start(self) -> Fleet:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fake fleet did not start")
        return self

    async def _shutdown(self) -> None:
        for listener in self.listeners:
            listener.close()
        for server in self.servers:
            for writer in list(server.writers):
                writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--job", type=float, default=0.2, help="seconds per prompt")
    parser.add_argument("--rtt", type=float, default=0.0, help="added round trip, seconds")
    parser.add_argument("--progress", type=int, default=4, help="progress events per prompt")
    args = parser.parse_args()
    fleet = Fleet(args.servers, args.job, args.rtt, args.progress).start()
    print("\n".join(fleet.urls), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fleet.stop()


if __name__ == "__main__":
    main()
