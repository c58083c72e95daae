"""A fake ComfyUI for faults a real one cannot produce on cue: freezing after it accepted a prompt (`freeze`),
hanging mid-job forever (`hang`: every prompt stays in /queue, no event, never in /history) and failing every
job (`fail`: every prompt is in /history at once with an execution error).

It speaks the same HTTP shapes as the real server (see ../shared/comfyui-transcripts/) for the endpoints the
engine uses, with `/object_info` copied from a real server, and has no websocket (the engine must cope).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# What a real server's /history holds for a prompt that failed at execution (status_str error, the event last).
FAILURE = {"node_id": "1", "node_type": "EmptyImage", "exception_type": "RuntimeError",
           "exception_message": "fake failure", "traceback": []}
FAILED_ENTRY = {"prompt": [], "outputs": {}, "meta": {},
                "status": {"status_str": "error", "completed": False,
                           "messages": [["execution_start", {}], ["execution_error", FAILURE]]}}


class FakeComfy:
    def __init__(self, object_info: dict[str, Any], freeze_after_prompts: int = 1, mode: str = "freeze"):
        assert mode in ("freeze", "hang", "fail")
        self.object_info = json.dumps(object_info).encode()
        self.freeze_after_prompts = freeze_after_prompts
        self.mode = mode
        self.prompts: list[str] = []
        self.interrupted: list[str] = []
        self.deleted: list[str] = []
        self.frozen = threading.Event()
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
                if fake.frozen.is_set():
                    fake.release.wait(60)  # hang like a frozen server until the test ends
                    return
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/system_stats":
                    self._reply(200, json.dumps({"system": {"comfyui_version": "fake"},
                                                 "devices": [{"name": "fake"}]}).encode())
                elif self.path == "/object_info":
                    self._reply(200, fake.object_info)
                elif self.path == "/queue":
                    held = [p for p in fake.prompts if p not in fake.deleted] if fake.mode == "hang" else []
                    items = [[n, p, {}, {}, []] for n, p in enumerate(held)]
                    self._reply(200, json.dumps({"queue_running": items[:1], "queue_pending": items[1:]}).encode())
                elif self.path.startswith("/history/"):
                    prompt_id = self.path.split("/")[-1]
                    if fake.mode == "fail" and prompt_id in fake.prompts:
                        self._reply(200, json.dumps({prompt_id: FAILED_ENTRY}).encode())
                    else:
                        self._reply(200, b"{}")
                else:
                    self._reply(404, b"")

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/prompt":
                    fake.prompts.append(body.get("prompt_id"))
                    if fake.mode == "freeze" and len(fake.prompts) >= fake.freeze_after_prompts:
                        fake.frozen.set()
                    self._reply(200, json.dumps({"prompt_id": body.get("prompt_id"), "number": 1,
                                                 "node_errors": {}}).encode())
                elif self.path == "/interrupt":
                    fake.interrupted.append(body.get("prompt_id"))
                    self._reply(200, b"")
                elif self.path == "/queue":
                    fake.deleted.extend(body.get("delete") or [])
                    self._reply(200, b"")
                else:
                    self._reply(200, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeComfy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
