"""The ComfyUI client: the only module that imports requests, urllib3 or websocket-client.

One `ComfyClient` per server (one urllib3 connection pool inside it, shared by the threads that call it: its
connections are kept alive and reused by whichever thread asks next) and one `EventSocket` per server.
Every HTTP call has a (connect, read) timeout. Failures become the typed errors of `core.errors`:
connection problems and 5xx -> ServerUnavailable; 400 on /prompt -> PromptRejected; an `execution_error`
-> ExecutionFailed; `execution_interrupted` -> Interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
import websocket

from core.errors import ComfyError, ExecutionFailed, Interrupted, PromptRejected, ServerUnavailable

log = logging.getLogger(__name__)
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
POOL_SIZE = 16  # kept-alive connections per server


class Reply:
    """What the client reads of an HTTP answer (the whole body, read at once)."""

    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)  # a ValueError when it is not JSON


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

    def _pool(self) -> urllib3.PoolManager:
        pool = self._shared
        if pool is None:
            with self._lock:
                if self._shared is None:
                    proxies = requests.utils.get_environ_proxies(self.url)
                    proxy = proxies.get(urlsplit(self.url).scheme) or proxies.get("all")
                    ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                    timeout = urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1])
                    options: dict[str, Any] = {"maxsize": POOL_SIZE, "retries": False, "timeout": timeout,
                                               **({"ca_certs": ca} if ca else {})}
                    self._shared = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
                pool = self._shared
        return pool

    def close(self) -> None:
        with self._lock:
            if self._shared is not None:
                self._shared.clear()
            self._shared = None

    def _request(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Reply:
        """`kwargs`: urllib3's `json=` (a JSON body) or `fields=` (a GET's query, a POST's multipart form)."""
        try:
            answer = self._pool().request(method, self.url + path, **kwargs)
            response = Reply(answer.status, answer.data)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Refused or never connected: the request cannot have reached ComfyUI. Anything else may have.
            delivered = not isinstance(exc, urllib3.exceptions.ConnectTimeoutError)
            raise ServerUnavailable(f"ComfyUI at {self.url} is unreachable ({type(exc).__name__}: {exc})",
                                    self.url, maybe_delivered=delivered) from None
        if response.status_code in ok:
            return response
        if response.status_code >= 500 or response.status_code in (404, 408, 429):
            raise ServerUnavailable(f"ComfyUI at {self.url} answered {method} {path} with HTTP "
                                    f"{response.status_code}: {response.text[:200]}", self.url)
        return response

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
        response = self._request("POST", "/prompt", ok=(200, 400), json=body)
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
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        return self._request("GET", "/view", fields=params).content

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


def output_images(outputs: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(node_id, index, image) for every saved image of every output node; previews (`temp`) only when a
    graph saved nothing else."""
    found = [(str(node_id), i, img) for node_id, out in sorted(outputs.items(), key=lambda kv: str(kv[0]))
             for i, img in enumerate((out or {}).get("images") or []) if isinstance(img, dict)]
    saved = [f for f in found if f[2].get("type", "output") == "output"]
    return saved or found


class EventSocket:
    """One websocket per server. `run()` blocks (the scheduler gives it a thread), reconnecting with
    backoff; `on_connect` is called after every (re)connect so the caller can reconcile the gap."""

    def __init__(self, url: str, client_id: str, on_event: Callable[[str, dict[str, Any]], None],
                 on_connect: Callable[[], None], connect_timeout: float = 10.0):
        self.ws_url = url.replace("https://", "wss://").replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.on_event = on_event
        self.on_connect = on_connect
        self.connect_timeout = connect_timeout
        self.connected = threading.Event()
        self._ws: websocket.WebSocket | None = None

    def run(self, stop: threading.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                # ComfyUI's frames are JSON it encoded itself; skipping websocket-client's pure-Python UTF-8
                # validation roughly halves the CPU spent per frame.
                self._ws = websocket.create_connection(self.ws_url, timeout=self.connect_timeout,
                                                       skip_utf8_validation=True)
            except (OSError, websocket.WebSocketException) as exc:
                log.debug("websocket %s: connect failed: %s", self.ws_url, exc)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            self._ws.settimeout(1.0)
            self.connected.set()
            try:
                self.on_connect()
                self._read(stop)
            except Exception:
                log.exception("websocket %s: handler failed", self.ws_url)
            finally:
                self.connected.clear()
                self._ws.close()
                self._ws = None

    def close(self) -> None:
        """Unblock a reader waiting in recv (called from another thread at stop)."""
        ws = self._ws
        if ws is not None and ws.sock is not None:
            try:
                ws.sock.shutdown(2)
            except OSError:
                pass

    def _read(self, stop: threading.Event) -> None:
        assert self._ws is not None
        while not stop.is_set():
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException) as exc:
                log.info("websocket %s closed: %s", self.ws_url, exc)
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue  # binary preview frames
            if data[:40].find(b'"progress_state"') >= 0 or data[:40].find(b'"crystools') >= 0:
                continue  # chatty per-node state of newer servers: not needed, not worth decoding
            try:
                message = json.loads(data)
            except ValueError:
                continue
            if isinstance(message, dict) and isinstance(message.get("data"), dict):
                self.on_event(str(message.get("type")), message["data"])


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
