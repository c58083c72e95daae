"""The ComfyUI client: the only module that imports requests, urllib3 or websocket-client.

One `ComfyClient` per server (one pool of kept-alive connections inside it, shared by the threads that call it:
`core.wire.HttpPool`, or urllib3 when a proxy is configured for the server) and one `EventSocket` per server
(websocket-client opens it; `core.wire.FrameReader` reads its frames).
Every HTTP call has a (connect, read) timeout. Failures become the typed errors of `core.errors`:
connection problems and 5xx -> ServerUnavailable; 400 on /prompt -> PromptRejected; an `execution_error`
-> ExecutionFailed; `execution_interrupted` -> Interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus, urlsplit

import requests
import urllib3
import websocket

from core import wire
from core.errors import ComfyError, ExecutionFailed, Interrupted, PromptRejected, ServerUnavailable
from core.eventhub import EventHub

log = logging.getLogger(__name__)
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
POOL_SIZE = 16  # kept-alive connections per server
# Websocket messages the scheduler has no use for, recognised by how ComfyUI's json.dumps starts them: queue
# counts (`status`, to every client at every queue change), cached nodes, newer servers' per-node state,
# monitoring plugins.
SKIPPED_EVENTS = tuple(b'{"type": "' + kind for kind in (b'status"', b'execution_cached"', b'progress_state"',
                                                          b"crystools"))


class Reply:
    """What the client reads of an HTTP answer (the whole body, read at once)."""

    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        # Decoded first: json.loads of bytes sniffs their encoding on every call. A ValueError when not JSON.
        return json.loads(self.content.decode("utf-8", "replace"))


class ComfyClient:
    """HTTP calls to one server through urllib3's connection pool (kept-alive connections shared by the
    threads that call it: dispatch, collection, health). urllib3 directly rather than through requests: a
    post or a download costs about half the CPU, and a 64-server fleet makes several hundred calls a second.
    Proxy and CA settings are read from the environment once, as requests reads them."""

    def __init__(self, url: str, client_id: str, connect_timeout: float = 10.0, read_timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client_id = client_id
        self.timeout = (connect_timeout, read_timeout)
        self._shared: urllib3.PoolManager | None = None
        self._lock = threading.Lock()
        self._ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        # The hot path (no proxy configured for this server): core.wire's lean HTTP/1.1 client.
        self._direct: wire.HttpPool | None = None
        if not _proxy_for(self.url):
            self._direct = wire.HttpPool(self.url, connect_timeout, read_timeout, self._ca)

    def _pool(self) -> urllib3.PoolManager:
        pool = self._shared
        if pool is None:
            with self._lock:
                if self._shared is None:
                    proxy = _proxy_for(self.url)
                    timeout = urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1])
                    options: dict[str, Any] = {"maxsize": POOL_SIZE, "retries": False, "timeout": timeout,
                                               **({"ca_certs": self._ca} if self._ca else {})}
                    self._shared = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
                pool = self._shared
        return pool

    def close(self) -> None:
        with self._lock:
            if self._shared is not None:
                self._shared.clear()
            self._shared = None
        if self._direct is not None:
            self._direct.close()

    def _send(self, method: str, path: str, json_body: Any = None, fields: dict[str, Any] | None = None) -> Reply:
        if self._direct is None:  # through a proxy: urllib3
            kwargs: dict[str, Any] = {"json": json_body} if json_body is not None else {}
            if fields is not None:
                kwargs["fields"] = fields
            answer = self._pool().request(method, self.url + path, **kwargs)
            return Reply(answer.status, answer.data)
        body: bytes | None = None
        content_type = None
        if json_body is not None:
            body, content_type = json.dumps(json_body, separators=(",", ":")).encode(), "application/json"
        elif fields is not None:
            body, content_type = urllib3.encode_multipart_formdata(fields)
        return Reply(*self._direct.request(method, path, body, content_type))

    def _request(self, method: str, path: str, ok: tuple[int, ...] = (200,), json: Any = None,
                 fields: dict[str, Any] | None = None) -> Reply:
        """`json`: a JSON body; `fields`: a POST's multipart form."""
        try:
            response = self._send(method, path, json, fields)
        except wire.WireError as exc:
            raise self._unreachable(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Refused or never connected: the request cannot have reached ComfyUI. Anything else may have.
            delivered = not isinstance(exc, urllib3.exceptions.ConnectTimeoutError)
            raise ServerUnavailable(f"ComfyUI at {self.url} is unreachable ({type(exc).__name__}: {exc})",
                                    self.url, maybe_delivered=delivered) from None
        return self._checked(method, path, response, ok)

    def _unreachable(self, exc: wire.WireError) -> ServerUnavailable:
        return ServerUnavailable(f"ComfyUI at {self.url} is unreachable ({exc})", self.url, maybe_delivered=exc.sent)

    def _checked(self, method: str, path: str, response: Reply, ok: tuple[int, ...]) -> Reply:
        """The reply, unless its status means the server cannot serve now (ServerUnavailable)."""
        if response.status_code in ok:
            return response
        if response.status_code >= 500 or response.status_code in (404, 408, 429):
            raise ServerUnavailable(f"ComfyUI at {self.url} answered {method} {path} with HTTP "
                                    f"{response.status_code}: {response.text[:200]}", self.url)
        return response

    def _begin(self, method: str, path: str, body: bytes | None, content_type: str | None, hub: EventHub,
               on_reply: Callable[[Reply], Any], on_done: Callable[[Any], None],
               ok: tuple[int, ...] = (200,)) -> bool:
        """Start a request from a handler on `hub`'s thread, without waiting: the hub sends what did not fit at
        once and reads the reply as it comes. `on_done` then gets `on_reply(reply)` (checked as `_request` checks
        it) or the ComfyError the call came to, on the hub's thread. False when it cannot start so (through a
        proxy, or no open kept-alive connection): make the blocking call instead."""
        if self._direct is None:
            return False

        def done(outcome: tuple[int, bytes] | wire.WireError) -> None:
            try:
                if isinstance(outcome, wire.WireError):
                    raise self._unreachable(outcome)
                result = on_reply(self._checked(method, path, Reply(*outcome), ok))
            except ComfyError as exc:
                result = exc
            on_done(result)

        pending = self._direct.begin(method, path, body, content_type, done)
        if pending is None:
            return False
        hub.attach(pending, time.monotonic() + self.timeout[1])
        return True

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ServerUnavailable(f"ComfyUI at {self.url} sent a non-JSON reply to {path}", self.url) from None

    # -- prompts ----------------------------------------------------------------------------------
    def submit(self, graph: dict[str, Any], prompt_id: str) -> dict[str, Any]:
        """POST /prompt with our own prompt_id. Raises PromptRejected on HTTP 400."""
        body = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        return self._submitted(self._request("POST", "/prompt", ok=(200, 400), json=body))

    def begin_submit(self, graph: dict[str, Any], prompt_id: str, hub: EventHub,
                     on_done: Callable[[dict[str, Any] | ComfyError], None]) -> bool:
        """submit() from a handler on `hub`'s thread, without waiting (see `_begin`): `on_done` gets the reply or
        the ComfyError (PromptRejected, ServerUnavailable) submit() would raise."""
        body = json.dumps({"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id},
                          separators=(",", ":")).encode()
        return self._begin("POST", "/prompt", body, "application/json", hub, self._submitted, on_done, ok=(200, 400))

    def _submitted(self, response: Reply) -> dict[str, Any]:
        try:
            reply = response.json()
        except ValueError:
            raise ServerUnavailable(f"ComfyUI at {self.url} sent a non-JSON reply to /prompt", self.url) from None
        if response.status_code == 400:
            raise PromptRejected(reply if isinstance(reply, dict) else {"error": str(reply)}, self.url)
        return dict(reply)

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a finished prompt, or None while it is queued, running or unknown."""
        data = self._json("GET", f"/history/{prompt_id}")
        entry = data.get(prompt_id) if isinstance(data, dict) else None
        return entry if isinstance(entry, dict) else None

    def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids (running, pending) in ComfyUI's queue."""
        data = self._json("GET", "/queue")

        def ids(items: Any) -> list[str]:
            return [str(item[1]) for item in items or [] if isinstance(item, list) and len(item) > 1]

        return ids(data.get("queue_running")), ids(data.get("queue_pending"))

    def delete_pending(self, prompt_ids: list[str]) -> None:
        self._request("POST", "/queue", json={"delete": prompt_ids})

    def interrupt(self, prompt_id: str) -> None:
        """Interrupt the prompt if it is the one running (a no-op otherwise)."""
        self._request("POST", "/interrupt", json={"prompt_id": prompt_id})

    # -- files ------------------------------------------------------------------------------------
    def view(self, image: dict[str, Any]) -> bytes:
        """Download an output file's bytes unchanged (ComfyUI's PNG metadata survives)."""
        return self._request("GET", _view_path(image)).content

    def begin_view(self, image: dict[str, Any], hub: EventHub, on_done: Callable[[bytes | ComfyError], None]) -> bool:
        """view() from a handler on `hub`'s thread, without waiting (see `_begin`): `on_done` gets the bytes or the
        ServerUnavailable view() would raise."""
        return self._begin("GET", _view_path(image), None, None, hub, lambda reply: reply.content, on_done)

    def upload_image(self, data: bytes, filename: str) -> str:
        """Upload an input image; returns the value for LoadImage (`subfolder/name` as ComfyUI named it)."""
        fields = {"image": (filename, data, "application/octet-stream"), "type": "input"}
        response = self._request("POST", "/upload/image", fields=fields)
        if response.status_code != 200:
            raise ServerUnavailable(f"ComfyUI at {self.url} refused the upload of {filename} "
                                    f"(HTTP {response.status_code})", self.url)
        reply = response.json()
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else str(reply["name"])

    # -- server info ------------------------------------------------------------------------------
    def system_stats(self) -> dict[str, Any]:
        return dict(self._json("GET", "/system_stats"))

    def object_info(self) -> dict[str, Any]:
        return dict(self._json("GET", "/object_info"))


def _view_path(image: dict[str, Any]) -> str:
    """/view?filename=...&subfolder=...&type=... for an output file (quoted as urlencode does, without its cost)."""
    name, folder, kind = (quote_plus(str(v)) for v in (image["filename"], image.get("subfolder", ""),
                                                        image.get("type", "output")))
    return f"/view?filename={name}&subfolder={folder}&type={kind}"


def _proxy_for(url: str) -> str | None:
    """The proxy requests would use for `url` (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), or None."""
    proxies = requests.utils.get_environ_proxies(url)
    return proxies.get(urlsplit(url).scheme) or proxies.get("all")


def outcome(entry: dict[str, Any], server: str = "") -> dict[str, Any]:
    """Outputs of a finished history entry; raises ExecutionFailed / Interrupted when it did not succeed."""
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or status.get("completed") is False:
        for event, data in reversed(status.get("messages") or []):
            if event == "execution_error":
                raise ExecutionFailed(data, server)
            if event == "execution_interrupted":
                raise Interrupted(f"the prompt was interrupted on {server} at node {data.get('node_id')} "
                                  f"({data.get('node_type')})", server)
        raise ExecutionFailed({"exception_message": "ComfyUI reported an error without details"}, server)
    return dict(entry.get("outputs") or {})


def started_at(entry: dict[str, Any]) -> float | None:
    """When a finished prompt's execution started (epoch seconds), from its history entry's `execution_start`
    message, or None."""
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_start" and isinstance(data, dict) and isinstance(data.get("timestamp"), (int, float)):
            return float(data["timestamp"]) / 1000
    return None


def output_images(outputs: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(node_id, index, image) for every saved image of every output node; previews (`temp`) only when a
    graph saved nothing else."""
    found = [(str(node_id), i, img) for node_id, out in sorted(outputs.items(), key=lambda kv: str(kv[0]))
             for i, img in enumerate((out or {}).get("images") or []) if isinstance(img, dict)]
    saved = [f for f in found if f[2].get("type", "output") == "output"]
    return saved or found


class EventSocket:
    """One websocket per server. `run()` blocks (the scheduler gives it a thread) while it connects, with
    backoff, and waits; the frames are read by the `hub` (core.eventhub: one thread for every server's socket),
    which calls `on_event` on its thread. `on_connect` is called after every (re)connect so the caller can
    reconcile the gap."""

    def __init__(self, url: str, client_id: str, on_event: Callable[[str, dict[str, Any]], None],
                 on_connect: Callable[[], None], hub: EventHub, connect_timeout: float = 10.0):
        self.ws_url = url.replace("https://", "wss://").replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.on_event = on_event
        self.on_connect = on_connect
        self.connect_timeout = connect_timeout
        self.hub = hub
        self.connected = threading.Event()
        self._ws: websocket.WebSocket | None = None
        self._lost = threading.Event()
        self._reader = wire.FrameReader()

    def run(self, stop: threading.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                ws = websocket.create_connection(self.ws_url, timeout=self.connect_timeout,
                                                 skip_utf8_validation=True)
            except (OSError, websocket.WebSocketException) as exc:
                log.debug("websocket %s: connect failed: %s", self.ws_url, exc)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            assert ws.sock is not None
            ws.sock.setblocking(False)  # read only when the hub saw it readable: never waits on the hub's thread
            self._ws, self._reader = ws, wire.FrameReader()
            self._lost.clear()
            self.connected.set()
            try:
                if stop.is_set():  # a stop (which calls close(), setting _lost) that came before the clear
                    break
                self.on_connect()
                self.hub.attach(self)
                self._lost.wait()  # the hub (connection over) or close() (stop) sets it: no timed wake-ups
            except Exception:
                log.exception("websocket %s: handler failed", self.ws_url)
            finally:
                self.hub.detach(self)
                self.connected.clear()
                ws.shutdown()  # no closing handshake: waiting for the server's answer could hold a stop up 3 s
                self._ws = None

    def close(self) -> None:
        """End the current connection (called from another thread at stop): run() then detaches and closes it."""
        self._lost.set()

    # -- called by the hub ---------------------------------------------------------------------------
    def fileno(self) -> int:
        ws = self._ws
        return ws.sock.fileno() if ws is not None and ws.sock is not None else -1

    def lost(self) -> None:
        self._lost.set()

    def readable(self) -> bool:
        """Read what the socket has and handle every complete message; False once the connection is over."""
        ws = self._ws
        if ws is None or ws.sock is None:
            return False
        try:
            chunk = wire.read_available(ws.sock)
        except OSError as exc:
            log.info("websocket %s closed: %s", self.ws_url, exc)
            return False
        if chunk is None:
            return True
        if not chunk:
            log.info("websocket %s closed by the server", self.ws_url)
            return False
        self._reader.feed(chunk)
        while True:
            try:
                message = self._reader.pop()
            except ValueError as exc:
                log.info("websocket %s closed: %s", self.ws_url, exc)
                return False
            if message is None:
                return True
            if not self._handle(ws, *message):
                return False

    def _handle(self, ws: websocket.WebSocket, opcode: int, data: bytes) -> bool:
        if opcode == wire.CLOSE:
            return False
        if opcode == wire.PING:
            try:
                ws.pong(data)
            except (OSError, websocket.WebSocketException):
                return False
            return True
        if opcode != wire.TEXT:
            return True  # binary preview frames, pongs
        if data.startswith(SKIPPED_EVENTS):
            # Not about the progress or outcome of a prompt: not decoded, only a sign the server is alive.
            self.on_event("status", {})
            return True
        try:
            message = json.loads(data.decode("utf-8", "replace"))  # str: no encoding sniffing per frame
        except ValueError:
            return True
        if isinstance(message, dict) and isinstance(message.get("data"), dict):
            self.on_event(str(message.get("type")), message["data"])
        return True


def probe(url: str, client_id: str, timeout: float) -> dict[str, Any]:
    """Reachable, ComfyUI version, queue length, device and VRAM of one server, on a connection of its own.
    Never raises."""
    client = ComfyClient(url, client_id, timeout, timeout)
    try:
        return health(client)
    finally:
        client.close()


def health(client: Any) -> dict[str, Any]:
    """probe() through an existing client (the scheduler's, whose connections are kept alive). Never raises."""
    try:
        stats = client.system_stats()
        running, pending = client.queue()
        device = (stats.get("devices") or [{}])[0]
        return {"up": True, "version": stats.get("system", {}).get("comfyui_version"),
                "queue_running": len(running), "queue_pending": len(pending), "device": device.get("name"),
                "vram_total": device.get("vram_total"), "vram_free": device.get("vram_free")}
    except ComfyError as exc:
        return {"up": False, "error": str(exc)}
