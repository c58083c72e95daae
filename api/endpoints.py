"""The endpoints of the HTTP API (paths relative to /api/v1), one small function each over core.service (every
action and submission) and core.queries / Store reads: batches, tasks, workflows and health; submitting;
acting on tasks; files. Live updates are in api.events; the route table that names them all is in api.app.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.background import BackgroundTask
from starlette.responses import FileResponse, Response, StreamingResponse

from api import files, intake
from api import openapi as openapi_document
from api.calls import ApiError, Call, json_response
from api.shapes import (
    batch_json,
    event_json,
    image_json,
    load_workflow_quietly,
    task_detail_json,
    task_json,
    workflow_json,
)
from core import service, visibility, workflows
from core.errors import InputError, NotFound, Problem
from core.models import RETRYABLE, UNFINISHED

PAGE_SIZE = 50  # /batches and /tasks: the default page
MAX_PAGE_SIZE = 500
MAX_BATCH_OFFSET = 10**6  # a /batches page is cut from one read of the newest batches, so this stays modest
MAX_TASK_OFFSET = 10**9
ORDERS = ("desc", "asc")  # /tasks ?order= (by id); the first is the default


# -- index, schema, health, workflows -----------------------------------------------------------------
def index(call: Call) -> dict[str, Any]:
    return {"name": "ComfyBatch API", "version": "v1", "openapi_url": call.url("/openapi.json"),
            "health_url": call.url("/health"), "workflows_url": call.url("/workflows"),
            "batches_url": call.url("/batches"), "tasks_url": call.url("/tasks"),
            "events_url": call.url("/events/stream")}


def openapi(call: Call) -> dict[str, Any]:
    return openapi_document.document(call.base, call.settings)


def health(call: Call) -> dict[str, Any]:
    return service.health(call.settings, call.store)


def list_workflows(call: Call) -> dict[str, Any]:
    found, broken = workflows.list_workflows(call.settings.workflows_dir)
    return {"workflows": [workflow_json(w, call.url) for w in found], "problems": broken}


def get_workflow(call: Call) -> dict[str, Any]:
    name = str(call.request.path_params["name"])
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise NotFound("unknown workflow (the name is not valid text)") from None
    return workflow_json(service.load_workflow(call.settings, name), call.url)


# -- batches ------------------------------------------------------------------------------------------
def list_batches(call: Call) -> dict[str, Any]:
    limit = call.query_int("limit", PAGE_SIZE, 1, MAX_PAGE_SIZE) or PAGE_SIZE
    offset = call.query_int("offset", 0, 0, MAX_BATCH_OFFSET) or 0
    person = visibility.person_for(call.settings, call.actor)
    rows = visibility.list_batches(call.store, offset + limit + 1, person)[offset:]
    batches = [batch_json(call.store, b["id"], call.url) for b in rows[:limit]]
    more = len(rows) > limit
    return {"batches": batches, "limit": limit, "offset": offset,
            "next": call.url(f"/batches?limit={limit}&offset={offset + limit}") if more else None}


def submit_batch(call: Call) -> Response:
    sub = intake.json_submission(intake.parse_json(call.body))
    return _submitted(call, service.submit(call.settings, call.store, sub, actor=call.actor), sub.dry_run)


def submit_csv(call: Call) -> Response:
    sub = intake.form_submission(call.settings, call.form_fields, call.form_files)
    return _submitted(call, service.submit(call.settings, call.store, sub, actor=call.actor), sub.dry_run)


def _submitted(call: Call, result: service.Submitted, dry_run: bool) -> Response:
    routing = {"servers": result.servers, "preflight": [
        {"url": r.url, "reachable": r.reachable, "ok": r.ok, "problems": r.problems, "error": r.error}
        for r in result.reports]}
    if dry_run:
        return json_response({"dry_run": True, "tasks": len(result.jobs), **routing, "jobs": [
            {"row": j.row_number, "batch_name": j.batch_name, "parameters": j.resolved} for j in result.jobs]})
    batches = [batch_json(call.store, b, call.url) for b in result.batch_ids]
    body = {"batch_ids": result.batch_ids, "task_ids": result.task_ids, **routing, "batches": batches}
    return json_response(body, 201, {"Location": batches[0]["url"]})


def _batch_id(call: Call) -> int:
    """The path's batch id, NotFound when it is someone else's and batches are private (core.visibility)."""
    batch_id = call.path_id("batch_id", "batch")
    visibility.visible_batch(call.settings, call.store, call.actor, batch_id)
    return batch_id


def _task(call: Call) -> dict[str, Any]:
    """The path's task, NotFound when it is someone else's and batches are private (core.visibility)."""
    return visibility.visible_task(call.settings, call.store, call.actor, call.path_id("task_id", "task"))


def get_batch(call: Call) -> dict[str, Any]:
    return batch_json(call.store, _batch_id(call), call.url)


def batch_images(call: Call) -> dict[str, Any]:
    batch_id = _batch_id(call)
    return {"batch_id": batch_id,
            "images": [image_json(call.settings, i, call.url) for i in call.store.images_for_batch(batch_id)]}


def batch_zip(call: Call) -> Response:
    batch_id = _batch_id(call)
    path = _temp_file(".zip")
    try:
        service.export_batch(call.settings, call.store, batch_id, zip_path=path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return FileResponse(path, media_type="application/zip", filename=f"batch-{batch_id}.zip",
                        background=BackgroundTask(path.unlink, missing_ok=True))


def batch_csv(call: Call) -> Response:
    batch_id = _batch_id(call)
    # Streamed a page of tasks at a time: a 100,000-task batch never sits in memory as one string.
    chunks = service.results_csv_chunks(call.settings, call.store, batch_id)
    return StreamingResponse(chunks, media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}-results.csv"'})


def cancel_batch(call: Call) -> dict[str, Any]:
    batch_id = _batch_id(call)
    done = service.cancel_batch(call.store, batch_id, actor=call.actor)
    return {**done, "batch": batch_json(call.store, batch_id, call.url)}


def retry_batch(call: Call) -> dict[str, Any]:
    batch_id = _batch_id(call)
    requeued = service.retry_batch(call.store, batch_id, actor=call.actor)
    return {"requeued": requeued, "batch": batch_json(call.store, batch_id, call.url)}


def batch_priority(call: Call) -> dict[str, Any]:
    batch_id = _batch_id(call)
    priority = _priority(call.json_object())
    updated = service.set_batch_priority(call.store, batch_id, priority, actor=call.actor)
    return {"updated": updated, "priority": priority, "batch": batch_json(call.store, batch_id, call.url)}


def pause_batch(call: Call) -> dict[str, Any]:
    return {"batch": _batch_after(call, service.pause_batch)}


def resume_batch(call: Call) -> dict[str, Any]:
    return {"batch": _batch_after(call, service.resume_batch)}


def run_batch_next(call: Call) -> dict[str, Any]:
    return {"batch": _batch_after(call, service.run_batch_next)}


def _batch_after(call: Call, action: Any) -> dict[str, Any]:
    batch_id = _batch_id(call)
    action(call.store, batch_id, actor=call.actor)
    return batch_json(call.store, batch_id, call.url)


# -- the queue and the servers ------------------------------------------------------------------------
def get_queue(call: Call) -> dict[str, Any]:
    return service.queue_state(call.store)


def pause_queue(call: Call) -> dict[str, Any]:
    return service.pause_queue(call.store, actor=call.actor)


def resume_queue(call: Call) -> dict[str, Any]:
    return service.resume_queue(call.store, actor=call.actor)


def drain_server(call: Call) -> dict[str, Any]:
    return service.drain_server(call.store, _server_url(call.json_object()), actor=call.actor)


def undrain_server(call: Call) -> dict[str, Any]:
    return service.undrain_server(call.store, _server_url(call.json_object()), actor=call.actor)


def _server_url(data: dict[str, Any]) -> Any:
    """The body's `url` (its value is checked by the engine)."""
    extra = [k for k in data if k != "url"]
    if extra or not isinstance(data.get("url"), str):
        problem = (Problem("unknown field (send only 'url')", field=extra[0][:60], code="unknown") if extra else
                   Problem("expected the server's URL as a string, e.g. \"http://127.0.0.1:8188\"", field="url",
                           code="required" if "url" not in data else "invalid"))
        raise InputError("1 problem(s) found; nothing was changed", [problem])
    return data["url"]


# -- tasks --------------------------------------------------------------------------------------------
def list_tasks(call: Call) -> dict[str, Any]:
    limit = call.query_int("limit", PAGE_SIZE, 1, MAX_PAGE_SIZE) or PAGE_SIZE
    offset = call.query_int("offset", 0, 0, MAX_TASK_OFFSET) or 0
    order = call.request.query_params.get("order", ORDERS[0])
    if order not in ORDERS:
        raise ApiError(400, f"query parameter 'order': expected {' or '.join(ORDERS)}, got {order!r}")
    text = call.request.query_params.get("q") or None
    if text is not None and "\x00" in text:  # SQLite's full-text query syntax cannot hold one (a 500 before)
        raise ApiError(400, "query parameter 'q': the text cannot contain NUL characters")
    filters: dict[str, Any] = {"batch_id": call.query_int("batch_id", None, 1), "statuses": call.statuses(),
                               "workflow": call.request.query_params.get("workflow") or None, "text": text,
                               "person": visibility.person_for(call.settings, call.actor)}
    total = call.store.count_tasks(**filters)
    tasks = call.store.list_tasks(**filters, limit=limit, offset=offset, newest_first=order == "desc")
    query = [(k, v) for k, v in call.request.query_params.multi_items() if k != "offset"]
    more = offset + limit < total
    return {"tasks": [task_json(t, call.url) for t in tasks], "total": total, "limit": limit, "offset": offset,
            "next": call.url("/tasks?" + urlencode([*query, ("offset", offset + limit)])) if more else None}


def get_task(call: Call) -> dict[str, Any]:
    task = _task(call)
    workflow = load_workflow_quietly(call.settings.workflows_dir, task["workflow"])
    return task_detail_json(call.settings, call.store, task, workflow, call.url)


def task_events(call: Call) -> dict[str, Any]:
    task_id = _task(call)["id"]
    return {"task_id": task_id, "events": [event_json(e) for e in call.store.events(task_id=task_id, limit=10_000)]}


def cancel_task(call: Call) -> dict[str, Any]:
    task = _task(call)
    if task["status"] not in UNFINISHED:
        raise ApiError(409, f"task {task['id']} is already {task['status']}; only queued, submitted or running "
                            "tasks can be cancelled")
    done = service.cancel(call.store, [task["id"]], actor=call.actor)
    return {**done, "task": task_json(call.store.get_task(task["id"]), call.url)}


def retry_task(call: Call) -> dict[str, Any]:
    task = _task(call)
    if not service.retry(call.store, [task["id"]], actor=call.actor):
        raise ApiError(409, f"task {task['id']} is {task['status']}; only {' or '.join(RETRYABLE)} tasks can be "
                            "retried")
    return {"requeued": [task["id"]], "task": task_json(call.store.get_task(task["id"]), call.url)}


def task_priority(call: Call) -> dict[str, Any]:
    task = _task(call)
    priority = _priority(call.json_object())
    service.set_priority(call.store, [task["id"]], priority, actor=call.actor)
    return {"updated": 1, "priority": priority, "task": task_json(call.store.get_task(task["id"]), call.url)}


def _priority(data: dict[str, Any]) -> Any:
    """The body's `priority` (its value is checked by the engine)."""
    extra = [k for k in data if k != "priority"]
    if extra:
        raise InputError("1 problem(s) found; nothing was changed",
                         [Problem("unknown field (send only 'priority')", field=extra[0][:60], code="unknown")])
    return data.get("priority")


# -- files --------------------------------------------------------------------------------------------
def image(call: Call) -> Response:
    return files.image_response(call.settings, call.store, call.path_id("image_id", "image"), False, call.actor)


def thumbnail(call: Call) -> Response:
    return files.image_response(call.settings, call.store, call.path_id("image_id", "image"), True, call.actor)


def _temp_file(suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix="comfybatch-api-", suffix=suffix)
    os.close(fd)
    return Path(name)
