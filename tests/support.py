"""Helpers shared by test modules (test modules never import each other): settings in a temporary folder,
waiting on a condition, the environment of a CLI or worker subprocess, running the CLI, and a real
S3-compatible server (moto's) on loopback."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from PIL import Image

from core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("COMFYBATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def make_settings(tmp_path: Path, urls: list[str], **overrides: Any) -> Settings:
    wf = tmp_path / "workflows"
    wf.mkdir(exist_ok=True)
    for src in [*sorted((ROOT / "workflows").glob("*")), *sorted((ROOT / "tests" / "workflows").glob("*"))]:
        # The test servers hold a random-weight SD1.5 checkpoint under its own name: point the shipped
        # SD1.5 templates at it, as a team points templates at the model files its servers have.
        (wf / src.name).write_text(src.read_text(encoding="utf-8").replace(
            "v1-5-pruned-emaonly.safetensors", "random_sd15.safetensors"), encoding="utf-8")
    values: dict[str, Any] = dict(
        comfyui_urls=tuple(urls), db_path=tmp_path / "tasks.db", output_dir=tmp_path / "generated_images",
        workflows_dir=wf, log_dir=tmp_path / "logs", lease_seconds=3.0, connect_timeout=3.0, read_timeout=30.0,
        demo="off")  # a test that wants the first run's demo backend asks for it
    values.update(overrides)
    return Settings(**values)


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1,
               message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a `python -m core ...` subprocess that uses these settings."""
    return {**os.environ, "COMFYUI_URL": ",".join(settings.comfyui_urls), "COMFYBATCH_DB": str(settings.db_path),
            "COMFYBATCH_OUTPUT_DIR": str(settings.output_dir), "COMFYBATCH_WORKFLOWS_DIR": str(settings.workflows_dir),
            "COMFYBATCH_LOG_DIR": str(settings.log_dir), "COMFYBATCH_LEASE_SECONDS": "2", "PYTHONPATH": str(ROOT)}


def cli_env(tmp_path: Path, urls: list[str], **overrides: Any) -> dict[str, str]:
    """worker_env for fresh settings under tmp_path, with WORK naming the folder the CLI runs in."""
    return {**worker_env(make_settings(tmp_path, urls, **overrides)), "WORK": str(tmp_path)}


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core", *args], env=env, cwd=env["WORK"], capture_output=True,
                          text=True, timeout=timeout)


def png(color: tuple[int, ...] | int, size: tuple[int, int] = (32, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def submit_rows(settings: Settings, store: Any, workflow: str, rows: list[dict[str, Any]], **fields: Any) -> Any:
    """Submit rows through the front door, as the API's JSON intake and the Generate page do."""
    from core import service

    sub = service.Submission(workflow, [service.Row(r) for r in rows], **fields)
    return service.submit(settings, store, sub)


def submit_csv(settings: Settings, store: Any, data: bytes, filename: str, workflow: str, **fields: Any) -> Any:
    """Submit a CSV file's bytes through the front door, as the CLI does."""
    from core import service

    return service.submit(settings, store, service.csv_submission(settings, data, filename, workflow, **fields))


def settle(page: Any) -> None:
    """Wait on a Playwright page like Streamlit's own e2e suite: connected, and the script done."""
    page.wait_for_selector("[data-testid=stApp][data-test-connection-state=CONNECTED]", timeout=30_000)
    page.wait_for_selector("[data-test-script-state=notRunning]", timeout=30_000)


def settle_after_change(page: Any) -> None:
    """Wait for the rerun that a widget change asks for, then for it to end. A changed widget sends its rerun
    request without touching the script state, which reads "notRunning" until the server answers; `settle`
    alone can return in that window, and the next action then lands on the page before the rerun redraws it
    (a value typed into the previous workflow's form, seen in CI). A rerun too quick to be seen running is
    waited for 2 s at most, and is over by then."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_selector("[data-testid=stApp]:not([data-test-script-state=notRunning])", timeout=2_000)
    except PlaywrightTimeout:
        pass
    settle(page)


# -- browser tests: pages in real Chromium ------------------------------------------------------------
SHOTS = ROOT / "test-artifacts" / "screenshots"


def open_page(browser_page: Any, url: str) -> Any:
    browser_page.goto(url)
    settle(browser_page)
    return browser_page


def shot(page: Any, name: str) -> None:
    """A screenshot kept as a test artifact (test-artifacts/ is not committed)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def choose(page: Any, label: str, option: str) -> None:
    """Pick the option whose text contains `option` in the selectbox labelled `label`."""
    page.get_by_test_id("stSelectbox").filter(has_text=label).first.click()
    page.get_by_role("option").filter(has_text=option).first.click()
    settle_after_change(page)


def open_expander(page: Any, title: str) -> None:
    """Open the expander titled `title` and wait for its opening animation to end. A list opened inside it
    meanwhile is closed again by the moving layout (react-aria closes a popover whose anchor moves)."""
    page.get_by_text(title).click()
    page.wait_for_function("() => !document.getAnimations().some(a => a.effect?.target?.tagName === 'DETAILS')")


def add_option(page: Any, label: str, option: str) -> None:
    """Add `option` to the multiselect labelled `label`: open its list, type to filter it (a long list is
    virtualised, later options not rendered), click the option, and wait for the rerun."""
    from playwright.sync_api import expect

    box = page.get_by_test_id("stMultiSelect").filter(has_text=label)
    box.get_by_role("button", name="Open").click()
    expect(page.get_by_role("listbox")).to_be_visible()
    page.keyboard.type(option)
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")
    settle_after_change(page)


def upload(page: Any, path: Path, index: int = 0) -> None:
    from playwright.sync_api import expect

    page.get_by_test_id("stFileUploaderDropzoneInput").nth(index).set_input_files(str(path))
    expect(page.get_by_test_id("stFileChipName").filter(has_text=path.name)).to_be_visible()
    settle(page)


# -- object storage: moto's S3 server on 127.0.0.1 -------------------------------------------------------
S3_KEY_ID = "AKIACOMFYBATCHTEST01"  # dummy credentials, distinctive so a test can grep for leaks
S3_SECRET = "cb-secret-NEVER-LOGGED-7f3a9d2e1c"


class S3Server:
    """moto's S3-compatible server, served by werkzeug in this process on 127.0.0.1, with every request
    recorded (method, path) so a test can count the PUTs of each key.

    `stop()` closes the listening socket (clients get "connection refused", as from a store that is down);
    `start()` again binds the same port. moto keeps its buckets in this process's memory, not in the
    server, so a restarted server still has the bucket and every object uploaded before the outage. (A new
    `moto_server` process on the same port would come back empty; moto's ThreadedMotoServer.stop() leaves the
    socket listening, so clients would hang instead of being refused.)"""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.port = 0
        self.requests: list[tuple[str, str]] = []
        self.bucket = f"comfybatch-test-{uuid.uuid4().hex[:12]}"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _recording(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.requests.append((environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", ""))))
        return self.app(environ, start_response)

    def start(self) -> S3Server:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):  # type: ignore[misc]
            def log_request(self, *args: Any) -> None:
                pass

        self._server = make_server("127.0.0.1", self.port, self._recording, threaded=True, request_handler=Quiet)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="moto-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.url, region_name="us-east-1",
                                              aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET)

    def create_bucket(self) -> None:
        client = self.client()
        client.create_bucket(Bucket=self.bucket)
        client.close()

    def puts(self) -> Counter[str]:
        """How many PUT requests reached the server for each object key of the bucket."""
        prefix = f"/{self.bucket}/"
        return Counter(path[len(prefix):] for method, path in self.requests
                       if method == "PUT" and path.startswith(prefix))

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket: key -> bytes."""
        client = self.client()
        try:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=self.bucket).get("Contents", [])]
            return {k: client.get_object(Bucket=self.bucket, Key=k)["Body"].read() for k in keys}
        finally:
            client.close()

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Settings fields that point ComfyBatch at this server's bucket."""
        return {"s3_bucket": self.bucket, "s3_endpoint_url": self.url, "s3_region": "us-east-1",
                "s3_access_key_id": S3_KEY_ID, "s3_secret_access_key": S3_SECRET, "s3_addressing_style": "path",
                **overrides}

    def env(self) -> dict[str, str]:
        """The same as environment variables, for a `python -m core` subprocess."""
        return {"COMFYBATCH_S3_BUCKET": self.bucket, "COMFYBATCH_S3_ENDPOINT_URL": self.url,
                "COMFYBATCH_S3_REGION": "us-east-1", "COMFYBATCH_S3_ACCESS_KEY_ID": S3_KEY_ID,
                "COMFYBATCH_S3_SECRET_ACCESS_KEY": S3_SECRET, "COMFYBATCH_S3_ADDRESSING_STYLE": "path",
                "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost"}


def finish_next_task(settings: Settings, store: Any, data: bytes, remote_state: str | None = None) -> dict[str, Any]:
    """Play ComfyUI's and the scheduler's part without a server: claim the next queued task, write `data` as
    its one output image and record it as the scheduler does. Returns the image row."""
    import uuid

    from core import files

    task = store.claim_next_task("http://gpu-1:8188", str(uuid.uuid4()))
    assert task is not None, "no queued task to finish"
    rel = f"batch-{task['batch_id']:05d}/{files.image_name(task['id'], '9', 0, 'x.png')}"
    files.write_atomic(settings.output_dir / rel, data)
    record = {"batch_id": task["batch_id"], "node_id": "9", "idx": 0, "path": rel, "filename": "x.png",
              "subfolder": "", "type": "output", "size_bytes": len(data), **files.describe_image(data)}
    if remote_state is not None:
        record["remote_state"] = remote_state
    assert store.complete_task(task["id"], [record])
    return store.images_for_task(task["id"])[0]


def submitted_image(settings: Settings, who: Any, data: bytes) -> dict[str, Any]:
    """A batch of workflow empty_image submitted by `who` (a core.users.Actor) with one finished image. Call it
    before starting an app on that database: its scheduler would requeue a task on a server it does not know."""
    from core import service
    from core.store import Store

    store = Store(settings.db_path)
    try:
        sub = service.Submission("empty_image", [service.Row({"1.color": 255, "1.width": 16})], source="test")
        service.submit(settings, store, sub, actor=who)
        return finish_next_task(settings, store, data)
    finally:
        store.close()


class NoEvents:
    """The websocket's place in a stepped ServerWorker: tests deliver events by calling `worker.on_event`."""

    def run(self, stop: Any) -> None:
        stop.wait()

    def close(self) -> None:
        pass


def inline_executor() -> Any:
    """An Executor that runs each submitted call at once, on the caller's thread: collection becomes one more
    step of a stepped ServerWorker."""
    from concurrent.futures import Executor, Future

    class InlineExecutor(Executor):
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            future: Future[Any] = Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
            return future

    return InlineExecutor()


@contextlib.contextmanager
def serve_routes(routes: list[Any]) -> Iterator[str]:
    """Starlette routes served by uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn
    from starlette.applications import Starlette

    from tests.comfyui_harness.server import free_port

    server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serve_api(api: Any, extra_routes: list[Any] | None = None) -> Iterator[str]:
    """An api.app.Api served by uvicorn on a free loopback port in a thread (with `extra_routes`, e.g. the file
    and sign-in routes, at the root); yields its base URL."""
    from starlette.routing import Mount

    from api.calls import PREFIX

    with serve_routes([Mount(PREFIX, app=api), *(extra_routes or [])]) as base:
        yield base + PREFIX


class Receiver:
    """A webhook receiver on a free 127.0.0.1 port (http.server in a thread): answers each POST with the next
    status of `statuses` (the last one repeats) and records every call's headers and body."""

    def __init__(self, statuses: list[int]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.statuses = list(statuses)
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses[min(len(receiver.calls), len(receiver.statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = False  # server_close joins the handler threads, so every connection is closed

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
