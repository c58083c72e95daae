"""The old tool's HTTP API under /compat, so a script written for it changes only its base URL
(`http://HOST:PORT/compat`). Paths, field names and status words are the old server's; the engine work is
core.compat over core.service, behind the same guard as /api/v1 (api.app.Api: tokens, body size, CORS).

    POST /generate        one request -> {"task_id", "message"}
    POST /batch           {"requests": [...], "batch_name", "priority"} -> {"batch_name", "task_ids", "message"}
    GET  /status/{id}     the old TaskStatus (also at /task/{id}, the path the old README names)
    GET  /tasks           {"tasks": [...]}: the newest 100 tasks
    GET  /health          {"api_server", "comfyui_server", "comfyui_url", "active_tasks", ...}
    POST /upload_image    multipart field `file` -> {"filename", "path"}; the filename goes in `input_image`
    GET  /images/{name}   a result image (the paths in result_url / result_urls)
    WS   /ws              {"type": "task_update", "data": <TaskStatus>} for every status change and progress step

Failures keep the old server's shape, {"detail": sentence}, with our sentence naming what is wrong and where,
and the problems as data in "problems".
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.websockets import WebSocket

from api import files, intake
from api.app import Api
from api.calls import ACTOR, ApiError, Call, Endpoint, Socket, json_response
from api.events import Follow, follow
from api.ws import until_disconnected
from core import compat, queries, visibility, workflows
from core.config import Settings
from core.errors import InputError, NotFound, Problem
from core.models import FINAL
from core.store import Store

PREFIX = "/compat"
WS_SECONDS = 6 * 3600  # the old /ws stayed open; ours closes after this (code 1000), a client reconnects
PROGRESS_EVERY = 1.0  # seconds between looks at the progress of running tasks, for /ws


def root(call: Call) -> dict[str, Any]:
    return {"message": "ComfyBatch: the old batch API, compatible", "version": "1.0.0", "endpoints": {
        "generate": "/generate", "batch": "/batch", "status": "/status/{task_id}", "tasks": "/tasks",
        "ws": "/ws", "health": "/health", "upload_image": "/upload_image"}}


def generate(call: Call) -> dict[str, Any]:
    request = intake.parse_json(call.body)
    if not isinstance(request, dict):
        raise InputError('the body must be a JSON object like {"prompt": "..."}')
    task_ids = compat.submit(call.settings, call.store, [request], None, actor=call.actor)
    return {"task_id": str(task_ids[0]), "message": "task submitted",
            "status_url": _base(call) + f"/status/{task_ids[0]}"}


def batch(call: Call) -> dict[str, Any]:
    data = intake.parse_json(call.body)
    if not isinstance(data, dict):
        raise InputError('the body must be a JSON object like {"requests": [{"prompt": "..."}], "batch_name": "..."}')
    requests, name = data.get("requests"), data.get("batch_name")
    problems = []
    if not isinstance(requests, list) or not requests:
        problems.append(Problem(f"expected a non-empty list of request objects, got {workflows.show(requests)}",
                                field="requests", code="required"))
    if name is not None and not isinstance(name, str):
        problems.append(Problem(f"expected text, got {workflows.show(name)}", field="batch_name", code="invalid"))
    if problems:
        raise InputError(f"{len(problems)} problem(s) found; nothing was enqueued", problems)
    assert isinstance(requests, list)
    batch_name = (name or "").strip() or f"batch_{int(time.time())}"
    task_ids = compat.submit(call.settings, call.store, requests, batch_name, priority=data.get("priority", 0),
                              actor=call.actor)
    return {"batch_name": batch_name, "task_ids": [str(t) for t in task_ids],
            "message": f"submitted {len(task_ids)} task{'s' if len(task_ids) != 1 else ''}"}


def status(call: Call) -> dict[str, Any]:
    task = visibility.visible_task(call.settings, call.store, call.actor, call.path_id("task_id", "task"))
    return compat.task_view(call.store, task, _base(call))


def tasks(call: Call) -> dict[str, Any]:
    base = _base(call)
    return {"tasks": [compat.task_view(call.store, t, base, extra) for t, extra in compat.recent_tasks(
        call.store, person=visibility.person_for(call.settings, call.actor))]}


def health(call: Call) -> dict[str, Any]:
    return compat.health(call.settings, call.store)


async def upload_image(call: Call) -> Response:
    if not call.request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(400, "send the image as multipart/form-data in the field 'file'")
    parts = []
    async with call.request.form(max_files=5, max_fields=20) as form:
        for key, value in form.multi_items():
            if key == "file" and not isinstance(value, str):
                parts.append((value.filename or "", await value.read()))
    if len(parts) != 1:
        raise ApiError(400, f"send exactly one image file in the multipart field 'file' (got {len(parts)})")
    filename, data = parts[0]
    try:
        saved = await run_in_threadpool(compat.save_upload, call.settings, intake.safe_filename(filename), data)
    except InputError as exc:
        raise ApiError(400, exc.summary) from None
    return json_response(saved)


def image(call: Call) -> Response:
    name = str(call.request.path_params["name"])
    image_id = compat.image_id(name)
    if image_id is None:
        raise NotFound(f"no image named {name[:80]!r}")
    if compat.image_path(queries.get_image(call.store, image_id)) != f"/images/{name}":
        raise NotFound(f"no image named {name[:80]!r}")
    return files.image_response(call.settings, call.store, image_id, False, call.actor)


async def updates(websocket: WebSocket, settings: Settings, store: Store) -> None:
    """Every task's status changes (from the events table) and, while it runs, its progress steps, as the old
    server's {"type": "task_update", "data": TaskStatus}. Starts from now (the old /ws replayed nothing)."""
    # Read where "now" is before accepting: a client that submits right after connecting misses nothing.
    latest = (await run_in_threadpool(store.db.execute, "SELECT COALESCE(MAX(id), 0) FROM events")).fetchone()[0]
    await websocket.accept()
    base = settings.public_url or _ws_base(websocket)
    running: dict[int, tuple[Any, Any]] = {}  # task id -> the progress last sent

    async def send(task_id: int) -> None:
        task = await run_in_threadpool(store.get_task, task_id)
        data = await run_in_threadpool(compat.task_view, store, task, base)
        if task["status"] in FINAL:
            running.pop(task_id, None)
        else:
            running[task_id] = (task.get("progress_value"), task.get("progress_max"))
        await websocket.send_text(json.dumps({"type": "task_update", "data": data}, ensure_ascii=False))

    async def forward() -> None:
        loop = asyncio.get_running_loop()
        looked = loop.time()
        async for event in follow(store, Follow(latest, None, None, WS_SECONDS,
                                             visibility.person_for(settings, websocket.scope[ACTOR]))):
            if event is not None:
                await send(event["task_id"])
            elif running and loop.time() - looked >= PROGRESS_EVERY:
                looked = loop.time()
                for task_id, seen in list(running.items()):
                    task = await run_in_threadpool(store.get_task, task_id)
                    if (task.get("progress_value"), task.get("progress_max")) != seen:
                        await send(task_id)

    if await until_disconnected(websocket, forward):
        await websocket.close(1000, "reconnect to keep following")


class CompatApi(Api):
    """The /compat route table behind the same guard, answering failures as the old server did."""

    def body(self, message: str, problems: list[Problem]) -> dict[str, Any]:
        shown = "; ".join(str(p) for p in problems[:20]) + (" ..." if len(problems) > 20 else "")
        return {"detail": f"{message}: {shown}" if shown else message, "problems": [p.as_dict() for p in problems]}


def _base(call: Call) -> str:
    return call.base + PREFIX


def _ws_base(websocket: WebSocket) -> str:
    url = websocket.url
    scheme = "https" if url.scheme == "wss" else "http"
    return f"{scheme}://{url.netloc}{PREFIX}"


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/", root),
    Endpoint("POST", "/generate", generate, body="json"),
    Endpoint("POST", "/batch", batch, body="json"),
    Endpoint("GET", "/status/{task_id}", status),
    Endpoint("GET", "/task/{task_id}", status),
    Endpoint("GET", "/tasks", tasks),
    Endpoint("GET", "/health", health),
    Endpoint("POST", "/upload_image", upload_image),
    Endpoint("GET", "/images/{name}", image),
)
SOCKETS: tuple[Socket, ...] = (Socket("/ws", updates),)


def make() -> CompatApi:
    return CompatApi(ENDPOINTS, SOCKETS, PREFIX)
