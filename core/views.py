"""Read-only queries behind the web pages: narrow columns, filters that use the store's indexes, and
LIMIT/OFFSET paging, so a page stays fast with 100,000 tasks. Reads only, through `store.db`; every write
goes through Store or core.service. Pure helpers that shape rows for display live here too."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import ComfyBatchError, NotFound
from core.models import TaskStatus
from core.store import Store, filter_clauses
from core.workflows import Workflow

ACTIVE = (TaskStatus.QUEUED.value, TaskStatus.SUBMITTED.value, TaskStatus.RUNNING.value)
TASK_COLUMNS = ("id", "batch_id", "row_number", "workflow", "prompt", "seed", "status", "priority", "server",
                "attempts", "progress_value", "progress_max", "error", "created_at", "submitted_at", "started_at",
                "finished_at")
IMAGE_COLUMNS = ("i.id", "i.task_id", "i.batch_id", "i.node_id", "i.idx", "i.path", "i.width", "i.height",
                 "i.size_bytes", "i.created_at", "t.prompt", "t.seed", "t.workflow", "t.server")


@dataclass(frozen=True)
class TaskFilter:
    batch_id: int | None = None
    statuses: tuple[str, ...] = ()
    workflow: str | None = None
    text: str = ""


@dataclass(frozen=True)
class ImageFilter:
    batch_id: int | None = None
    workflow: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None  # inclusive
    text: str = ""


# -- tasks ------------------------------------------------------------------------------------------
def count_tasks(store: Store, flt: TaskFilter) -> int:
    where, args = _task_where(store, flt)
    return int(store.db.execute(f"SELECT COUNT(*) FROM tasks t {where}", args).fetchone()[0])


def page_tasks(store: Store, flt: TaskFilter, limit: int, offset: int) -> list[dict[str, Any]]:
    """One page of tasks, newest first, without the (large) graph and params columns."""
    where, args = _task_where(store, flt)
    cols = ", ".join(f"t.{c}" for c in TASK_COLUMNS)
    return list(store.db.query(f"SELECT {cols} FROM tasks t {where} ORDER BY t.id DESC LIMIT ? OFFSET ?",
                               [*args, limit, offset]))


def tasks_by_ids(store: Store, ids: list[int]) -> list[dict[str, Any]]:
    """The given tasks in the given order (ids that no longer exist are left out)."""
    if not ids:
        return []
    cols = ", ".join(TASK_COLUMNS)
    rows = {r["id"]: r for r in store.db.query(
        f"SELECT {cols} FROM tasks WHERE id IN ({','.join('?' * len(ids))})", ids)}
    return [rows[i] for i in ids if i in rows]


def task_workflows(store: Store) -> list[str]:
    return [r[0] for r in store.db.execute("SELECT DISTINCT workflow FROM tasks ORDER BY workflow").fetchall()]


def has_active_work(store: Store) -> bool:
    return store.has_pending_work()


def summary_batch_ids(store: Store, limit: int = 3) -> list[int]:
    """Batches worth a progress bar: those with work still to do, else the most recent ones."""
    active = [r[0] for r in store.db.execute(
        f"SELECT batch_id FROM tasks WHERE status IN ({','.join('?' * len(ACTIVE))}) GROUP BY batch_id "
        "ORDER BY batch_id DESC LIMIT ?", [*ACTIVE, limit]).fetchall()]
    if active:
        return active
    return [b["id"] for b in store.list_batches(limit)]


def batch_errors(store: Store, batch_id: int, limit: int = 5) -> list[dict[str, Any]]:
    return list(store.db.query("SELECT id, error FROM tasks WHERE batch_id = ? AND status = 'failed' "
                               "ORDER BY id LIMIT ?", [batch_id, limit]))


def task_row(task: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A task shaped for the Tasks table: progress as 0..1 and the timings in seconds."""
    now = time.time() if now is None else now
    status = task["status"]
    if status == TaskStatus.SUCCEEDED:
        progress = 1.0
    elif task.get("progress_max"):
        progress = min(1.0, (task.get("progress_value") or 0) / task["progress_max"])
    else:
        progress = 0.0
    submitted, started, finished = task.get("submitted_at"), task.get("started_at"), task.get("finished_at")
    wait = (submitted or (now if status == TaskStatus.QUEUED else None))
    return {
        "id": task["id"], "batch": task["batch_id"], "row": task.get("row_number"), "status": status,
        "progress": progress, "server": task.get("server") or "", "attempts": task["attempts"],
        "priority": task["priority"], "prompt": _clip(task.get("prompt") or "", 120), "error": task.get("error") or "",
        "created": format_time(task["created_at"]),
        "wait_s": round(wait - task["created_at"], 1) if wait else None,
        "run_s": round((finished or now) - started, 1) if started else None,
    }


# -- images -----------------------------------------------------------------------------------------
def count_images(store: Store, flt: ImageFilter) -> int:
    where, args = _image_where(store, flt)
    join = " JOIN tasks t ON t.id = i.task_id" if _needs_task_join(flt) else ""
    return int(store.db.execute(f"SELECT COUNT(*) FROM images i{join} {where}", args).fetchone()[0])


def page_images(store: Store, flt: ImageFilter, limit: int, offset: int) -> list[dict[str, Any]]:
    where, args = _image_where(store, flt)
    cols = ", ".join(IMAGE_COLUMNS)
    return list(store.db.query(f"SELECT {cols} FROM images i JOIN tasks t ON t.id = i.task_id {where} "
                               "ORDER BY i.id DESC LIMIT ? OFFSET ?", [*args, limit, offset]))


def get_image(store: Store, image_id: int) -> dict[str, Any]:
    rows = list(store.db.query("SELECT * FROM images WHERE id = ?", [image_id]))
    if not rows:
        raise NotFound(f"image {image_id} does not exist")
    return rows[0]


def images_by_ids(store: Store, ids: Iterable[int]) -> list[dict[str, Any]]:
    ids = sorted(set(ids))
    if not ids:
        return []
    return list(store.db.query(f"SELECT * FROM images WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids))


def batch_images(store: Store, batch_id: int, limit: int = 48) -> list[dict[str, Any]]:
    """The newest images of a batch (for the live panel on the Generate page)."""
    return list(store.db.query("SELECT * FROM images WHERE batch_id = ? ORDER BY id DESC LIMIT ?", [batch_id, limit]))


def image_detail(store: Store, image_id: int) -> dict[str, Any]:
    """An image with its task (parameters, seed, server, graph) and batch."""
    image = get_image(store, image_id)
    task = store.get_task(image["task_id"])
    return {"image": image, "task": task, "batch": store.get_batch(task["batch_id"])}


def task_parameters(task: dict[str, Any], workflow: Workflow | None) -> dict[str, Any]:
    """Every value a task ran with: the workflow's named parameters read from the task's own graph (so a
    random seed shows as the number used), then any other inputs the row set by node address."""
    values: dict[str, Any] = {}
    graph = task.get("graph") or {}
    named: set[str] = set()
    if workflow is not None:
        for name, param in workflow.params.items():
            node = graph.get(param.node_id, {}).get("inputs", {})
            if param.input_name in node:
                values[name] = node[param.input_name]
                named.add(param.target)
    for key, value in (task.get("params") or {}).items():
        if key not in values and _target(workflow, key) not in named:  # "1.color" when "color" names it
            values[key] = value
    if task.get("seed") is not None:
        values["seed"] = task["seed"]
    return values


def _target(workflow: Workflow | None, key: str) -> str | None:
    if workflow is None:
        return None
    try:
        return workflow.param_for(key).target
    except ComfyBatchError:
        return None


# -- formatting -------------------------------------------------------------------------------------
def format_time(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def batch_status_line(summary: dict[str, Any]) -> str:
    """The plain line the Tasks page prints per batch, e.g. 'Batch 3: 10/10 done (100%)'."""
    counts = summary["counts"]
    line = f"Batch {summary['id']}: {summary['done']}/{summary['total']} done ({summary['progress']:.0%})"
    details = ", ".join(f"{counts[s]} {s}" for s in ("queued", "submitted", "running", "succeeded", "failed",
                                                     "cancelled") if counts.get(s))
    if details:
        line += f" - {details}"
    if summary.get("eta_seconds") is not None:
        line += f" - about {format_duration(summary['eta_seconds'])} left"
    return line


# -- filters ----------------------------------------------------------------------------------------
def _task_where(store: Store, flt: TaskFilter) -> tuple[str, list[Any]]:
    clauses, args = filter_clauses(batch_id=flt.batch_id, statuses=flt.statuses, workflow=flt.workflow,
                                   text=flt.text, fts=store.has_fts, alias="t.")
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _image_where(store: Store, flt: ImageFilter) -> tuple[str, list[Any]]:
    clauses, args = filter_clauses(workflow=flt.workflow, text=flt.text, fts=store.has_fts, alias="t.")
    if flt.batch_id is not None:
        clauses.append("i.batch_id = ?")
        args.append(flt.batch_id)
    if flt.since:
        clauses.append("i.created_at >= ?")
        args.append(time.mktime(flt.since.timetuple()))
    if flt.until:
        clauses.append("i.created_at < ?")
        args.append(time.mktime((flt.until + dt.timedelta(days=1)).timetuple()))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _needs_task_join(flt: ImageFilter) -> bool:
    return bool(flt.workflow or flt.text.strip())


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
