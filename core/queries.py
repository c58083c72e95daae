"""Read-only queries behind the pages and the API: narrow columns, filters that use the store's indexes, and
LIMIT/OFFSET paging, so a page stays fast with 100,000 tasks. Reads only, through `store.db`; every write goes
through core.service. (Display formatting lives on the page side, in ui_format.py.)"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import ComfyBatchError, NotFound
from core.models import UNFINISHED, TaskStatus
from core.store import Store, filter_clauses
from core.workflows import Workflow

TASK_COLUMNS = ("id", "batch_id", "row_number", "workflow", "prompt", "seed", "status", "priority", "server",
                "attempts", "progress_value", "progress_max", "error", "created_at", "submitted_at", "started_at",
                "finished_at")
IMAGE_COLUMNS = ("i.id", "i.task_id", "i.batch_id", "i.node_id", "i.idx", "i.path", "i.width", "i.height",
                 "i.size_bytes", "i.created_at", "i.remote_state", "i.remote_key", "t.prompt", "t.seed", "t.workflow",
                 "t.server")


@dataclass(frozen=True)
class TaskFilter:
    batch_id: int | None = None
    statuses: tuple[str, ...] = ()
    workflow: str | None = None
    text: str = ""
    person: str | None = None  # only batches this person submitted


@dataclass(frozen=True)
class ImageFilter:
    batch_id: int | None = None
    workflow: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None  # inclusive
    text: str = ""
    person: str | None = None  # only batches this person submitted


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


def has_unfinished_work(store: Store) -> bool:
    return store.has_pending_work()


def summary_batch_ids(store: Store, limit: int = 3) -> list[int]:
    """Batches worth a progress bar: those with work still to do, else the most recent ones."""
    active = [r[0] for r in store.db.execute(
        f"SELECT batch_id FROM tasks WHERE status IN ({','.join('?' * len(UNFINISHED))}) GROUP BY batch_id "
        "ORDER BY batch_id DESC LIMIT ?", [*UNFINISHED, limit]).fetchall()]
    if active:
        return active
    return [b["id"] for b in store.list_batches(limit)]


def batch_errors(store: Store, batch_id: int, limit: int = 5) -> list[dict[str, Any]]:
    return list(store.db.query("SELECT id, error FROM tasks WHERE batch_id = ? AND status = ? ORDER BY id LIMIT ?",
                               [batch_id, TaskStatus.FAILED.value, limit]))


def task_progress(task: dict[str, Any]) -> float:
    """0..1: done steps of the running prompt (ComfyUI's own progress events), 1 once succeeded."""
    if task["status"] == TaskStatus.SUCCEEDED:
        return 1.0
    if task.get("progress_max"):
        return float(min(1.0, (task.get("progress_value") or 0) / task["progress_max"]))
    return 0.0


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


# -- filters ----------------------------------------------------------------------------------------
def _task_where(store: Store, flt: TaskFilter) -> tuple[str, list[Any]]:
    clauses, args = filter_clauses(batch_id=flt.batch_id, statuses=flt.statuses, workflow=flt.workflow,
                                   text=flt.text, fts=store.has_fts, alias="t.")
    _person(clauses, args, flt.person, "t.")
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
    _person(clauses, args, flt.person, "i.")
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _needs_task_join(flt: ImageFilter) -> bool:
    return bool(flt.workflow or flt.text.strip())


def _person(clauses: list[str], args: list[Any], person: str | None, alias: str) -> None:
    if person is not None:
        clauses.append(f"{alias}batch_id IN (SELECT id FROM batches WHERE submitted_by = ?)")
        args.append(person)


def people(store: Store) -> list[str]:
    """Everyone who has submitted a batch, for the pages' person filter."""
    return [r[0] for r in store.db.execute("SELECT DISTINCT submitted_by FROM batches WHERE submitted_by IS NOT "
                                           "NULL ORDER BY submitted_by LIMIT 1000").fetchall()]
