"""The old tool's API under /compat, the events WebSocket and webhooks, against the real thing: `streamlit run
app.py` as a subprocess driving the real test ComfyUI. The old API is driven by a client written the way the
old README's Python examples are (requests for HTTP, websocket-client for /ws), changed only in its base URL
(and the token header, since the same guard as /api/v1 applies)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket
from PIL import Image

from tests import appserver
from tests.appserver import AppServer
from tests.support import Receiver, png, wait_until

TOKEN = "tok-compat-5d2e"
SECRET = "whsec-compat-9b7c1f"


class ComfyUIBatchClient:
    """The old README's client: base URL in, task ids out; waits by polling /status."""

    def __init__(self, api_server: str, token: str | None = TOKEN):
        self.api_server = api_server.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def submit_single_task(self, prompt: str, **kwargs: Any) -> str:
        data = {"prompt": prompt, **kwargs}
        response = self.session.post(f"{self.api_server}/generate", json=data, timeout=60)
        response.raise_for_status()
        return response.json()["task_id"]

    def submit_batch_tasks(self, prompts: list[str], batch_name: str | None = None, **kwargs: Any) -> list[str]:
        batch_data = {"requests": [{"prompt": p, "negative_prompt": kwargs.get("negative_prompt", ""),
                                    "width": kwargs.get("width", 960), "height": kwargs.get("height", 544),
                                    "steps": kwargs.get("steps", 30), "cfg": kwargs.get("cfg", 1.0),
                                    "seed": kwargs.get("seed"), **kwargs.get("extra", {})} for p in prompts],
                      "batch_name": batch_name or f"batch_{int(time.time())}"}
        response = self.session.post(f"{self.api_server}/batch", json=batch_data, timeout=60)
        response.raise_for_status()
        return response.json()["task_ids"]

    def get_task_status(self, task_id: str) -> dict[str, Any]:
        response = self.session.get(f"{self.api_server}/status/{task_id}", timeout=30)
        response.raise_for_status()
        return response.json()

    def get_all_tasks(self) -> list[dict[str, Any]]:
        response = self.session.get(f"{self.api_server}/tasks", timeout=30)
        response.raise_for_status()
        return response.json()["tasks"]

    def wait_for_task(self, task_id: str, timeout: int = 300) -> dict[str, Any]:
        start_time = time.time()
        while time.time() - start_time < timeout:
            status = self.get_task_status(task_id)
            if status["status"] in ["completed", "failed"]:
                return status
            time.sleep(0.5)
        raise TimeoutError(f"task {task_id} timed out")

    def upload(self, name: str, data: bytes) -> str:
        response = self.session.post(f"{self.api_server}/upload_image", files={"file": (name, data, "image/png")},
                                     timeout=30)
        response.raise_for_status()
        return response.json()["filename"]


class Updates:
    """websocket-client on /ws in a thread, collecting every task_update."""

    def __init__(self, url: str, header: list[str]):
        self.ws = websocket.create_connection(url, header=header, timeout=120)
        self.messages: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                text = self.ws.recv()
            except Exception:
                return
            if text:
                self.messages.append(json.loads(text))

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if m["type"] == "task_update" and m["data"]["task_id"] == task_id]

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def app(comfy, tmp_path_factory) -> Iterator[AppServer]:
    server = appserver.start_app(tmp_path_factory.mktemp("compat"), [comfy.url], api_tokens=(TOKEN,),
                                 compat_workflow="sd15_txt2img", compat_edit_workflow="invert", public_url="")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(app: AppServer) -> Iterator[ComfyUIBatchClient]:
    old = ComfyUIBatchClient(app.url + "/compat")
    yield old
    old.session.close()


def ws_url(app: AppServer, path: str) -> str:
    return app.url.replace("http", "ws", 1) + path


def test_an_old_client_generates_and_follows_its_tasks_over_ws(app, client):
    health = client.session.get(client.api_server + "/health", timeout=30).json()
    assert (health["api_server"], health["comfyui_server"]) == ("online", "online")
    updates = Updates(ws_url(app, "/compat/ws"), [f"Authorization: Bearer {TOKEN}"])
    try:
        task_ids = client.submit_batch_tasks(["a red fox", "a blue bird"], batch_name="storybook", width=64,
                                             height=64, steps=2, extra={"workflow_type": "qwen"})
        results = [client.wait_for_task(t, timeout=240) for t in task_ids]
        wait_until(lambda: all(any(u["status"] == "completed" for u in updates.of(t)) for t in task_ids),
                   timeout=60, message="a completed task_update for every task")
    finally:
        updates.close()
    for task_id, result in zip(task_ids, results, strict=True):
        assert (result["task_id"], result["status"], result["progress"]) == (task_id, "completed", 100)
        assert result["message"].startswith("done (1 image)") and "ignored workflow_type" in result["message"]
        assert result["result_url"].startswith("/images/") and result["result_urls"] == [result["result_url"]]
        assert result["result_urls_absolute"] == [client.api_server + result["result_url"]]
        assert result["request_data"]["prompt"] in ("a red fox", "a blue bird") and result["completed_at"]
        image = client.session.get(client.api_server + result["result_url"], timeout=30)
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
        seen = updates.of(task_id)
        # Each update carries the task as it is when sent: under load the first may already say running.
        assert seen[0]["status"] in ("pending", "running") and seen[-1]["status"] == "completed"
        assert seen[-1]["result_url"] == result["result_url"]
        assert {u["status"] for u in seen} <= {"pending", "running", "completed"}
    listed = {t["task_id"]: t for t in client.get_all_tasks()}
    assert set(task_ids) <= set(listed) and listed[task_ids[0]]["status"] == "completed"
    batch_id = results[0]["batch_id"]
    batch = client.session.get(f"{app.api}/batches/{batch_id}", timeout=30).json()
    assert (batch["name"], batch["source"], batch["workflow"], batch["total"]) == ("storybook", "compat",
                                                                                   "sd15_txt2img", 2)
    task = client.session.get(f"{app.api}/tasks/{task_ids[0]}", timeout=30).json()
    assert (task["parameters"]["width"], task["parameters"]["steps"]) == (64, 2)
    assert task["parameters"]["negative_prompt"] == "text, watermark"  # "" keeps the workflow's own
    assert task["parameters"]["batch_size"] == 1  # the old server's default


def test_an_old_client_uploads_an_image_and_edits_it(client):
    filename = client.upload("photo.png", png((10, 20, 30), (24, 16)))
    task_id = client.submit_single_task("invert it", input_image=filename, width=64)
    result = client.wait_for_task(task_id, timeout=240)
    assert result["status"] == "completed", result
    assert "ignored prompt, width: not parameters of workflow 'invert'" in result["message"]
    image = Image.open(io.BytesIO(client.session.get(client.api_server + result["result_url"], timeout=30).content))
    assert image.size == (24, 16) and image.convert("RGB").getpixel((0, 0)) == (245, 235, 225)


def test_bad_requests_get_the_old_error_shape_with_clear_messages(app, client):
    before = client.session.get(f"{app.api}/tasks", params={"limit": 1}, timeout=30).json()["total"]
    base = client.api_server

    def refused(status: int, method: str, path: str, **kwargs: Any) -> str:
        reply = client.session.request(method, base + path, timeout=30, **kwargs)
        assert reply.status_code == status, (path, reply.status_code, reply.text)
        return reply.json()["detail"]

    assert "prompt" in refused(422, "POST", "/generate", json={"width": 64})
    assert "'width'" in refused(422, "POST", "/generate", json={"prompt": "x", "width": "wide"})
    assert "no uploaded image named 'nope.png'" in refused(422, "POST", "/generate",
                                                           json={"prompt": "x", "input_image": "nope.png"})
    assert "not valid JSON" in refused(400, "POST", "/generate", data=b"{",
                                       headers={"Content-Type": "application/json"})
    assert "requests" in refused(422, "POST", "/batch", json={"requests": "a fox"})
    # One good text request and one bad edit request: two workflows, and nothing of either is enqueued.
    detail = refused(422, "POST", "/batch", json={"requests": [{"prompt": "ok", "width": 64, "height": 64},
                                                               {"prompt": "x", "input_image": "../tasks.db"}]})
    assert "row 2" in detail and "input_image" in detail
    assert "999999" in refused(404, "GET", "/status/999999")
    assert "not an image file" in refused(400, "POST", "/upload_image", files={"file": ("a.png", b"not png")})
    assert refused(404, "GET", "/images/1_nothing.png")
    reply = requests.post(base + "/generate", json={"prompt": "x"}, timeout=30)
    assert reply.status_code == 401 and "token" in reply.json()["detail"]
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(ws_url(app, "/compat/ws"), timeout=30)
    assert caught.value.status_code == 403
    assert client.session.get(f"{app.api}/tasks", params={"limit": 1}, timeout=30).json()["total"] == before


def test_the_events_websocket_resumes_like_the_sse_stream(app, client):
    task_id = client.submit_single_task("a cat", width=64, height=64, steps=1)
    client.wait_for_task(task_id, timeout=240)
    header = [f"Authorization: Bearer {TOKEN}"]
    listed = client.session.get(f"{app.api}/events", params={"after": 0, "limit": 5000}, timeout=30).json()["events"]
    ws = websocket.create_connection(ws_url(app, "/api/v1/events/ws?after=0&timeout=2"), header=header, timeout=60)
    got = []
    while True:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code, reason = int.from_bytes(data[:2], "big"), data[2:].decode()
            break
        got.append(json.loads(data))
    ws.close()
    assert got[:len(listed)] == listed and got  # the same events, in the same order
    assert code == 1000 and reason == f"timeout; resume with ?after={got[-1]['id']}"
    middle = got[len(got) // 2]["id"]
    ws = websocket.create_connection(ws_url(app, f"/api/v1/events/ws?after={middle}&timeout=1&task_id={task_id}"),
                                     header=header, timeout=60)
    resumed = []
    while True:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        resumed.append(json.loads(data))
    ws.close()
    assert resumed == [e for e in got if e["id"] > middle and e["task_id"] == int(task_id)]
    ws = websocket.create_connection(ws_url(app, "/api/v1/events/ws?after=soon"), header=header, timeout=60)
    assert "query parameter 'after'" in json.loads(ws.recv())["error"]
    ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(ws_url(app, "/api/v1/events/ws"), timeout=30)  # no token


# A client socket of an earlier test in this module, collected during this one, must not fail it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_webhook_survives_an_app_restart_between_attempts(comfy, tmp_path):
    home = tmp_path / "app"
    settings = {"api_tokens": (TOKEN,), "webhook_secret": SECRET, "webhook_backoff": ("20", "1", "1")}
    with Receiver([500, 502, 200]) as receiver:
        app = appserver.start_app(home, [comfy.url], **settings)
        try:
            reply = requests.post(app.api + "/batches", headers={"Authorization": f"Bearer {TOKEN}"}, json={
                "workflow": "empty_image", "rows": [{"1.color": 1}, {"1.color": 2}], "webhook": receiver.url},
                timeout=60)
            assert reply.status_code == 201, reply.text
            batch_id = reply.json()["batch_ids"][0]
            wait_until(lambda: len(receiver.calls) == 1, timeout=300, message="the first webhook call")
        finally:
            assert app.stop() in (0, -15)
        assert len(receiver.calls) == 1  # the next try is 20 s away: this app stopped before making it
        app = appserver.start_app(home, [comfy.url], **settings)
        try:
            wait_until(lambda: len(receiver.calls) == 3, timeout=180, message="two more webhook calls")

            def batch_now() -> dict[str, Any]:
                return requests.get(f"{app.api}/batches/{batch_id}", headers={"Authorization": f"Bearer {TOKEN}"},
                                    timeout=30).json()

            # The receiver sees a call before the app records its answer: wait for the record.
            wait_until(lambda: batch_now()["webhook"]["state"] == "delivered", timeout=60, message="the record")
            batch = batch_now()
            link = json.loads(receiver.calls[-1][1])["images"][0]["url"]
            assert "?sig=" in link  # tokens are on: the link is signed, so the receiver needs no token
            assert requests.get(app.url + link, timeout=30).status_code == 200
        finally:
            app.stop()
    hook = batch["webhook"]
    assert (hook["state"], hook["attempts"]) == ("delivered", 3)
    assert [c["status_code"] for c in hook["calls"]] == [500, 502, 200]
    bodies = {body for _, body in receiver.calls}
    assert len(bodies) == 1
    body = bodies.pop()
    for headers, _ in receiver.calls:
        assert headers["x-comfybatch-signature-256"] == "sha256=" + hmac.new(SECRET.encode(), body,
                                                                             hashlib.sha256).hexdigest()
    data = json.loads(body)
    assert data["counts"] == {"succeeded": 2} and len(data["images"]) == 2
    for path in (home / "tasks.db", home / "tasks.db-wal", app.log):
        if path.exists():
            assert SECRET.encode() not in path.read_bytes(), path
    for path in (home / "logs").glob("*"):
        assert SECRET.encode() not in path.read_bytes(), path
