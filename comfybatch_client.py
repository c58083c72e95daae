"""A small Python client for the ComfyBatch HTTP API (/api/v1), needing only `requests`.

    from comfybatch_client import ComfyBatchClient

    with ComfyBatchClient("http://localhost:8501", token="...") as client:
        batch = client.submit_rows("empty_image", [{"color": 255, "width": 32}])
        client.wait(batch["batch_ids"][0], progress=lambda b: print(f"{b['done']}/{b['total']}"))
        client.download_images(batch["batch_ids"][0], "results")

Errors from the server raise ApiError with the server's sentence and its list of problems (row, parameter,
message). Every call has a timeout. One client holds one requests.Session: use one client per thread.
Copy this file into any project; it has no other dependency on ComfyBatch.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

FINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The server refused or failed a request: `status` (HTTP), `message`, `problems` (list of dicts)."""

    def __init__(self, status: int, message: str, problems: list[dict[str, Any]] | None = None):
        self.status, self.message, self.problems = status, message, list(problems or [])
        lines = [f"HTTP {status}: {message}", *(f"- {p.get('message', p)}" for p in self.problems)]
        super().__init__("\n".join(lines))


class ComfyBatchClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0,
                 session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_url = self.base_url + "/api/v1"
        self.timeout = timeout
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ComfyBatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request to `path` (relative to /api/v1, or an absolute URL from a reply); ApiError if not 2xx."""
        url = path if path.startswith(("http://", "https://")) else self.api_url + path
        kwargs.setdefault("timeout", self.timeout)
        if not url.startswith(self.base_url + "/"):
            # An object store's link (presigned or public): our token is not for it, and a presigned URL
            # sent with a second credential is refused.
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": None}
        response = self.session.request(method, url, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                message, problems = body.get("error", response.reason), body.get("problems", [])
            except ValueError:
                message, problems = response.text.strip()[:500] or response.reason, []
            response.close()
            raise ApiError(response.status_code, message, problems)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body).json()

    # -- submit -------------------------------------------------------------------------------------
    def submit_rows(self, workflow: str, rows: list[dict[str, Any]], *, count: int = 1, name: str | None = None,
                    priority: int = 0, images: dict[str, bytes | str | Path] | None = None,
                    dry_run: bool = False) -> dict[str, Any]:
        """One task per row (times `count`). Returns {"batch_ids", "task_ids", "batches", ...}."""
        return self._submit({"workflow": workflow, "rows": rows, "count": count}, name, priority, images, dry_run)

    def submit_prompt(self, workflow: str, prompt: str | None = None, params: dict[str, Any] | None = None, *,
                      count: int = 1, name: str | None = None, priority: int = 0,
                      images: dict[str, bytes | str | Path] | None = None, dry_run: bool = False) -> dict[str, Any]:
        """One prompt (and/or parameters), `count` times (a fixed seed counts up: seed, seed+1, ...)."""
        body: dict[str, Any] = {"workflow": workflow, "params": params or {}, "count": count}
        if prompt is not None:
            body["prompt"] = prompt
        return self._submit(body, name, priority, images, dry_run)

    def submit_csv(self, csv_path: str | Path, workflow: str, *, images: Iterable[str | Path] = (),
                   count: int | None = None, name: str | None = None, priority: int = 0,
                   dry_run: bool = False) -> dict[str, Any]:
        """A CSV file, as the Batch page takes it, with the input images its image column names."""
        fields = {"workflow": workflow, "priority": str(priority), "dry_run": str(dry_run).lower()}
        if count is not None:
            fields["count"] = str(count)
        if name:
            fields["name"] = name
        csv_path = Path(csv_path)
        files = [("csv", (csv_path.name, csv_path.read_bytes(), "text/csv"))]
        files += [("images", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in images]
        return self.request("POST", "/batches/csv", data=fields, files=files).json()

    def _submit(self, body: dict[str, Any], name: str | None, priority: int,
                images: dict[str, bytes | str | Path] | None, dry_run: bool) -> dict[str, Any]:
        body.update(priority=priority, dry_run=dry_run)
        if name:
            body["name"] = name
        if images:
            body["images"] = {n: base64.b64encode(d if isinstance(d, bytes) else Path(d).read_bytes()).decode()
                              for n, d in images.items()}
        return self.post("/batches", body)

    # -- read ---------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.get("/health")

    def workflows(self) -> list[dict[str, Any]]:
        return self.get("/workflows")["workflows"]

    def batch(self, batch_id: int) -> dict[str, Any]:
        return self.get(f"/batches/{batch_id}")

    def task(self, task_id: int) -> dict[str, Any]:
        return self.get(f"/tasks/{task_id}")

    def tasks(self, batch_id: int | None = None, status: str | None = None, **filters: Any) -> Iterator[dict]:
        """Every matching task (oldest first), following the pages."""
        page = self.get("/tasks", batch_id=batch_id, status=status, order="asc", limit=500, **filters)
        while True:
            yield from page["tasks"]
            if not page.get("next"):
                return
            page = self.get(page["next"])

    def images(self, batch_id: int) -> list[dict[str, Any]]:
        return self.get(f"/batches/{batch_id}/images")["images"]

    # -- act ----------------------------------------------------------------------------------------
    def cancel_task(self, task_id: int) -> dict[str, Any]:
        return self.post(f"/tasks/{task_id}/cancel")

    def retry_task(self, task_id: int) -> dict[str, Any]:
        return self.post(f"/tasks/{task_id}/retry")

    def cancel_batch(self, batch_id: int) -> dict[str, Any]:
        return self.post(f"/batches/{batch_id}/cancel")

    def retry_batch(self, batch_id: int) -> dict[str, Any]:
        return self.post(f"/batches/{batch_id}/retry")

    def set_priority(self, priority: int, *, task_id: int | None = None, batch_id: int | None = None) -> Any:
        path = f"/tasks/{task_id}/priority" if task_id is not None else f"/batches/{batch_id}/priority"
        return self.post(path, {"priority": priority})

    # -- live updates -------------------------------------------------------------------------------
    def events(self, after: int = 0, batch_id: int | None = None, task_id: int | None = None,
               stop: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
        """Status changes as they happen (server-sent events), resuming after the last one seen whenever the
        server ends a stream or the connection drops. Runs until `stop()` is true or the caller breaks."""
        last = after
        while not (stop and stop()):
            params = {k: v for k, v in (("batch_id", batch_id), ("task_id", task_id)) if v is not None}
            try:
                with self.request("GET", "/events/stream", params={**params, "timeout": 30}, stream=True,
                                  headers={"Last-Event-ID": str(last), "Accept": "text/event-stream"},
                                  timeout=(self.timeout, 60)) as response:
                    response.encoding = "utf-8"
                    for event in _parse_sse(str(line) for line in response.iter_lines(decode_unicode=True)):
                        last = event["id"]
                        yield event
                        if stop and stop():
                            return
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(1.0)  # the server restarted or the network blinked: resume from `last`

    def wait(self, batch_id: int, progress: Callable[[dict[str, Any]], None] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Block until every task of the batch is finished, listening to the event stream (no polling).
        `progress(batch)` is called at the start and each time a task finishes. Returns the final batch
        (counts by status, progress); TimeoutError once `timeout` seconds have passed (checked at each event,
        and at least every 30 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        latest = self.get("/events", limit=1)["latest_id"]  # read first: nothing after it can be missed
        batch = self.batch(batch_id)
        if progress:
            progress(batch)

        def finished() -> bool:
            return batch["done"] >= batch["total"] or (deadline is not None and time.monotonic() > deadline)

        for event in self.events(after=latest, batch_id=batch_id, stop=finished):
            if event["status"] in FINAL:
                batch = self.batch(batch_id)
                if progress:
                    progress(batch)
        if batch["done"] < batch["total"]:
            raise TimeoutError(f"batch {batch_id}: {batch['done']}/{batch['total']} done after {timeout}s")
        return batch

    # -- files --------------------------------------------------------------------------------------
    def download_images(self, batch_id: int, folder: str | Path) -> list[Path]:
        """Every image of the batch into `folder` (created), bytes exactly as ComfyUI made them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for image in self.images(batch_id):
            target = folder / Path(image["filename"]).name
            with self.request("GET", image["url"], stream=True) as response, open(target, "wb") as out:
                for chunk in response.iter_content(1 << 16):
                    out.write(chunk)
            saved.append(target)
        return saved

    def download_zip(self, batch_id: int, path: str | Path) -> Path:
        path = Path(path)
        with self.request("GET", f"/batches/{batch_id}/images.zip", stream=True) as response, open(path, "wb") as out:
            for chunk in response.iter_content(1 << 16):
                out.write(chunk)
        return path

    def results_csv(self, batch_id: int) -> str:
        return self.request("GET", f"/batches/{batch_id}/results.csv").content.decode("utf-8-sig")


def _parse_sse(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Events of a text/event-stream: `data` lines joined, comments and `retry` ignored."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
