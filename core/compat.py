"""The old tool's API, engine side: its requests turned into Submissions for `service.submit` (no second
validation path), its uploads, and its view of a task. The HTTP side (paths under /compat, the error shape,
the /ws stream) is api.compat.

The old server (the seed's comfyui_api_server.py) took one request per task:

    prompt (required), negative_prompt "", width 1024, height 1024, steps 8, cfg 1.0, seed null (random),
    batch_size 1, batch_name null, input_image null (a file name returned by POST /upload_image)

A request runs COMFYBATCH_COMPAT_WORKFLOW, or COMFYBATCH_COMPAT_EDIT_WORKFLOW when it has an input_image.
Each field maps onto the workflow's parameter of the same name (any parameter of the workflow may be given
so); input_image maps onto the workflow's parameter `input_image`, else its first image parameter. The old
defaults apply to parameters the workflow has; an empty negative_prompt keeps the workflow's own (as the
old server kept its built-in one). A field the workflow lacks is ignored, and the task's message says so.

Statuses as the old tool named them: queued/submitted -> pending, running, succeeded -> completed, failed and
cancelled -> failed. Progress is in percent. Result URLs are paths under the client's base URL
(/images/<image id>_<file name>), plus the same as absolute URLs in `result_urls_absolute`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from core import files, queries, service, workflows
from core.config import Settings
from core.errors import InputError, NotFound, Problem
from core.intake import Row, Submission
from core.models import TaskStatus
from core.store import Store
from core.users import Actor
from core.workflows import Workflow

SOURCE = "compat"
DEFAULTS: dict[str, Any] = {"width": 1024, "height": 1024, "steps": 8, "cfg": 1.0, "batch_size": 1}
OLD_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "cfg", "seed", "batch_size", "batch_name",
              "input_image")
STATUS = {TaskStatus.QUEUED: "pending", TaskStatus.SUBMITTED: "pending", TaskStatus.RUNNING: "running",
          TaskStatus.SUCCEEDED: "completed", TaskStatus.FAILED: "failed", TaskStatus.CANCELLED: "failed"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TASK_LIST = 100  # GET /tasks: the newest this many (the old server kept its latest 100 in memory)


def uploads_dir(settings: Settings) -> Path:
    return settings.output_dir / "_compat_uploads"


def save_upload(settings: Settings, filename: str, data: bytes) -> dict[str, str]:
    """POST /upload_image: keep an image under a name made of its hash; returns {filename, path} as the old
    server did. InputError when the bytes are not an image PIL can read."""
    if files.describe_image(data)["width"] is None:
        raise InputError(f"{workflows.show(filename)} is not an image file (PNG, JPEG, WebP, ...); nothing was saved")
    suffix = Path(filename or "").suffix.lower()
    name = hashlib.sha256(data).hexdigest()[:32] + (suffix if suffix in IMAGE_SUFFIXES else ".png")
    target = uploads_dir(settings) / name
    if not target.is_file():
        files.write_atomic(target, data)
    return {"filename": name, "path": f"uploaded_images/{name}"}


@dataclass
class Plan:
    """Requests grouped by workflow, each request remembered with its note, in the order they came."""

    subs: dict[str, Submission] = field(default_factory=dict)
    order: list[tuple[str, int]] = field(default_factory=list)  # (workflow, index within its submission)
    requests: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan(settings: Settings, requests: list[Any], batch_name: str | None) -> Plan:
    """The Submissions for these requests (InputError for a request list over the row limit)."""
    if len(requests) > settings.max_rows:
        raise InputError("1 problem(s) found; nothing was enqueued", [Problem(
            f"{len(requests):,} requests; at most {settings.max_rows:,} in one call (COMFYBATCH_MAX_ROWS)",
            field="requests", code="too_large")])
    result = Plan()
    loaded: dict[str, Workflow | None] = {}
    for index, request in enumerate(requests):
        data = request if isinstance(request, dict) else {}
        edit = bool(data.get("input_image"))
        name = settings.compat_edit_workflow if edit else settings.compat_workflow
        if name not in loaded:
            try:
                loaded[name] = service.load_workflow(settings, name)
            except (NotFound, InputError):
                loaded[name] = None  # service.submit names the problem
        sub = result.subs.setdefault(name, Submission(name, [], name=batch_name, source=SOURCE, images={}))
        row, note = _row(settings, data, loaded[name], sub, index + 1)
        if not isinstance(request, dict):
            row.problems.append(Problem(f"expected a request object like {{\"prompt\": \"...\"}}, got "
                                        f"{workflows.show(request)}", code="invalid"))
        result.order.append((name, len(sub.rows)))
        sub.rows.append(row)
        result.requests.append(request)
        result.notes.append(note)
    return result


def _row(settings: Settings, data: dict[str, Any], workflow: Workflow | None, sub: Submission, number: int
         ) -> tuple[Row, str]:
    row = Row({}, number=number)
    ignored: list[str] = []
    params = workflow.params if workflow else {}
    if not isinstance(data.get("prompt"), str):
        row.problems.append(Problem("required: the text prompt" if data.get("prompt") is None else
                                    f"expected text, got {workflows.show(data.get('prompt'))}",
                                    parameter="prompt", code="required"))
    for key, value in data.items():
        if value is None or key == "batch_name" or (key == "negative_prompt" and value == ""):
            continue
        if key == "input_image":
            target = "input_image" if "input_image" in params else next(
                (p.name for p in params.values() if p.kind == "image"), None)
            if target is None:
                ignored.append(key)
                continue
            ref = str(value)
            path = uploads_dir(settings) / Path(ref).name
            if Path(ref).name != ref or not path.is_file():
                row.problems.append(Problem(f"no uploaded image named {workflows.show(value)}: upload it with "
                                            "POST /upload_image and give the filename it returns",
                                            parameter="input_image", code="not_found"))
                continue
            assert sub.images is not None
            if ref not in sub.images:  # many requests may name one upload: read it once
                sub.images[ref] = path.read_bytes()
            row.params[target] = ref
        elif key in params:
            row.params[key] = value
        elif workflow is not None:
            ignored.append(str(key)[:60])
    for key, value in DEFAULTS.items():
        if data.get(key) is None and key in params:
            row.params[key] = value
    if isinstance(data.get("batch_name"), str) and data["batch_name"].strip() and sub.name is None:
        row.batch_name = data["batch_name"].strip()[:200]
    note = ""
    if ignored and workflow is not None:
        note = (f"ignored {', '.join(ignored[:20])}{' ...' if len(ignored) > 20 else ''}: not parameters of "
                f"workflow '{workflow.name}'")
    return row, note


def submit(settings: Settings, store: Store, requests: list[Any], batch_name: str | None, priority: Any = 0, *,
           actor: Actor) -> list[int]:
    """Enqueue the requests (all or nothing) through service.submit as `actor`; returns the task ids in request
    order."""
    p = plan(settings, requests, batch_name)
    for sub in p.subs.values():
        sub.priority = priority  # checked by service.submit
    if len(p.subs) > 1:  # two workflows: check both before enqueueing either
        problems: list[Problem] = []
        for sub in p.subs.values():
            try:
                service.submit(settings, store, replace(sub, dry_run=True), actor=actor)
            except InputError as exc:
                problems.extend(exc.problems)
        if problems:
            raise InputError(f"{len(problems)} problem(s) found; nothing was enqueued", problems)
    ids = {name: service.submit(settings, store, sub, actor=actor).task_ids for name, sub in p.subs.items()}
    task_ids = [ids[name][i] for name, i in p.order]
    with store.write() as conn:
        conn.executemany("INSERT OR REPLACE INTO compat_requests (task_id, request, note) VALUES (?, ?, ?)",
                         [(t, json.dumps(r, ensure_ascii=False, default=str), n)
                          for t, r, n in zip(task_ids, p.requests, p.notes, strict=True)])
    return task_ids


# -- the old view of a task -------------------------------------------------------------------------
def image_path(image: dict[str, Any]) -> str:
    """An image's path under the compat base URL, as the old server's result_url was: /images/<file>."""
    return f"/images/{image['id']}_{Path(image['path'].replace(chr(92), '/')).name}"


def image_id(name: str) -> int | None:
    """The image id of a /images/<id>_<file> name (None when the name is not one of ours)."""
    head, sep, _ = name.partition("_")
    return int(head) if sep and head.isascii() and head.isdigit() and len(head) < 19 else None


def task_view(store: Store, task: dict[str, Any], base: str, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """A task as the old server's TaskStatus: task_id, status, progress (percent), message, created_at,
    completed_at, result_url, result_urls, error, request_data; plus result_urls_absolute (under `base`,
    the client's compat base URL), batch_id and batch_name. `extra`: the task's compat_requests row."""
    extra = extra if extra is not None else compat_request(store, task["id"])
    status = TaskStatus(task["status"])
    images = store.images_for_task(task["id"]) if status == TaskStatus.SUCCEEDED else []
    urls = [image_path(i) for i in images]
    progress = round(queries.task_progress(task) * 100, 1)
    error = task.get("error") or ("cancelled" if status == TaskStatus.CANCELLED else None)
    return {"task_id": str(task["id"]), "status": STATUS[status], "progress": progress,
            "message": _message(task, status, len(urls), extra.get("note", "")),
            "created_at": _iso(task["created_at"]), "completed_at": _iso(task.get("finished_at")),
            "result_url": urls[0] if urls else None, "result_urls": urls or None,
            "error": error if status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
            "request_data": extra.get("request", task.get("params")),
            "result_urls_absolute": [base + u for u in urls] or None, "batch_id": task["batch_id"],
            "workflow": task["workflow"]}


def compat_request(store: Store, task_id: int) -> dict[str, Any]:
    row = store.db.execute("SELECT request, note FROM compat_requests WHERE task_id = ?", [task_id]).fetchone()
    return {"request": json.loads(row[0]), "note": row[1]} if row else {}


def recent_tasks(store: Store, limit: int = TASK_LIST, person: str | None = None
                 ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The newest tasks (any source; only `person`'s batches when given) with their compat requests."""
    tasks = store.list_tasks(limit=limit, person=person)
    ids = [t["id"] for t in tasks]
    extra: dict[int, dict[str, Any]] = {}
    if ids:
        for task_id, request, note in store.db.execute(
                f"SELECT task_id, request, note FROM compat_requests WHERE task_id IN ({','.join('?' * len(ids))})",
                ids).fetchall():
            extra[task_id] = {"request": json.loads(request), "note": note}
    return [(t, extra.get(t["id"], {})) for t in tasks]


def _message(task: dict[str, Any], status: TaskStatus, images: int, note: str) -> str:
    if status == TaskStatus.QUEUED:
        text = "queued"
    elif status == TaskStatus.SUBMITTED:
        text = f"sent to {task.get('server') or 'a ComfyUI server'}, waiting to start"
    elif status == TaskStatus.RUNNING:
        steps = f": step {task['progress_value']}/{task['progress_max']}" if task.get("progress_max") else ""
        text = f"running on {task.get('server') or 'ComfyUI'}{steps}"
    elif status == TaskStatus.SUCCEEDED:
        text = f"done ({images} image{'s' if images != 1 else ''})"
    elif status == TaskStatus.CANCELLED:
        text = "cancelled"
    else:
        text = f"failed: {task.get('error') or 'unknown error'}"
    return f"{text}; {note}" if note else text


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts).isoformat() if ts else None


def health(settings: Settings, store: Store) -> dict[str, Any]:
    """GET /health as the old server answered it, from service.health."""
    report = service.health(settings, store)
    enabled = [s for s in report["servers"] if s["enabled"]]
    up = [s for s in enabled if s.get("up")]
    first = (up or enabled or [None])[0]
    data: dict[str, Any] = {
        "api_server": "online", "comfyui_server": "online" if up else "offline",
        "comfyui_url": first["url"] if first else None,
        "active_tasks": sum(n for s, n in report["counts"].items() if not TaskStatus(s).is_final),
        "status": report["status"], "servers": len(enabled), "servers_up": len(up), "checked_at": time.time()}
    if not up:
        data["comfyui_error"] = (str(first.get("error") or "not reachable") if first else
                                 "no ComfyUI server is configured (COMFYUI_URL or the Servers page)")
    return data
