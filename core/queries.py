"""Read-only queries behind the pages and the API: narrow columns, filters that use the store's indexes, and
LIMIT/OFFSET paging, so a page stays fast with 100,000 tasks. Reads only, through `store.db`; every write goes
through core.service. (Display formatting lives on the page side, in ui_format.py.)"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import ComfyBatchError, InputError, NotFound, Problem, clip
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


MAX_PARAM_FILTERS = 8  # conditions in one gallery parameter filter
MAX_FILTER_TEXT = 2000  # characters of the whole filter
MAX_FILTER_KEY = 100
MAX_FILTER_VALUE = 200


@dataclass(frozen=True)
class ImageFilter:
    batch_id: int | None = None
    workflow: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None  # inclusive
    text: str = ""
    person: str | None = None  # only batches this person submitted
    picked: bool = False  # starred images only
    params: tuple[tuple[str, str], ...] = ()  # parameter = value conditions (parse_param_filters)


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


def summary_batch_ids(store: Store, limit: int = 3, person: str | None = None) -> list[int]:
    """Batches worth a progress bar (only `person`'s when given): those with work still to do, else the most
    recent ones."""
    clauses, args = filter_clauses(statuses=UNFINISHED, person=person)
    active = [r[0] for r in store.db.execute(
        f"SELECT batch_id FROM tasks WHERE {' AND '.join(clauses)} GROUP BY batch_id ORDER BY batch_id DESC "
        "LIMIT ?", [*args, limit]).fetchall()]
    if active:
        return active
    if person is None:
        return [b["id"] for b in store.list_batches(limit)]
    return [r[0] for r in store.db.execute("SELECT id FROM batches WHERE submitted_by = ? ORDER BY id DESC LIMIT ?",
                                           [person, limit]).fetchall()]


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
    return list(store.db.query(f"SELECT {cols}, i.id IN (SELECT image_id FROM picks) AS picked FROM images i "
                               f"JOIN tasks t ON t.id = i.task_id {where} ORDER BY i.id DESC LIMIT ? OFFSET ?",
                               [*args, limit, offset]))


def neighbour_image(store: Store, flt: ImageFilter, image_id: int, step: int) -> int | None:
    """The image after (`step` 1) or before (-1) `image_id` in the gallery's order (newest first) among the
    images the filter matches, or None at either end."""
    where, args = _image_where(store, flt)
    where = (where + " AND" if where else "WHERE") + (" i.id < ?" if step > 0 else " i.id > ?")
    order = "DESC" if step > 0 else "ASC"
    row = store.db.execute(f"SELECT i.id FROM images i JOIN tasks t ON t.id = i.task_id {where} "
                           f"ORDER BY i.id {order} LIMIT 1", [*args, image_id]).fetchone()
    return int(row[0]) if row else None


def picked_ids(store: Store, ids: Iterable[int]) -> set[int]:
    """Which of the given images are picked (starred)."""
    ids = list(ids)
    if not ids:
        return set()
    return {r[0] for r in store.db.execute(f"SELECT image_id FROM picks WHERE image_id IN "
                                           f"({','.join('?' * len(ids))})", ids).fetchall()}


def count_picked(store: Store, batch_id: int | None = None, person: str | None = None) -> int:
    """Picked images (of a batch; of `person`'s batches when given)."""
    where, args = filter_clauses(batch_id=batch_id, person=person, alias="i.")
    sql = "SELECT COUNT(*) FROM picks p" + (f" JOIN images i ON i.id = p.image_id WHERE {' AND '.join(where)}"
                                            if where else "")
    return int(store.db.execute(sql, args).fetchone()[0])


def parse_param_filters(text: str) -> tuple[tuple[str, str], ...]:
    """`name=value` conditions, one per line or separated by `;` (e.g. `cfg=7; checkpoint=sd15.safetensors`),
    matched against the values each task was given (and, for `seed`, the seed it ran with). InputError naming
    the condition when one is malformed or the filter is over its limits."""
    if len(text) > MAX_FILTER_TEXT:
        raise InputError("the parameter filter is too long", [Problem(
            f"{len(text):,} characters; at most {MAX_FILTER_TEXT:,}", field="parameters", code="too_large")])
    parts = [p.strip() for line in text.splitlines() for p in line.split(";") if p.strip()]
    problems = []
    if len(parts) > MAX_PARAM_FILTERS:
        problems.append(Problem(f"{len(parts)} conditions; at most {MAX_PARAM_FILTERS}", field="parameters",
                                code="too_large"))
    found = []
    for n, part in enumerate(parts[:MAX_PARAM_FILTERS], start=1):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            problems.append(Problem(f"condition {n}: expected name=value, got {clip(part, 60)!r}", field="parameters"))
        elif len(name) > MAX_FILTER_KEY or len(value) > MAX_FILTER_VALUE or "\x00" in part:
            problems.append(Problem(f"condition {n}: a name of at most {MAX_FILTER_KEY} and a value of at most "
                                    f"{MAX_FILTER_VALUE} characters (no NUL)", field="parameters", code="too_large"))
        elif name == "seed" and not value.lstrip("-").isdigit():
            problems.append(Problem(f"condition {n}: seed is a whole number, got {clip(value, 40)!r}",
                                    field="parameters"))
        else:
            found.append((name, value))
    if problems:
        raise InputError("the parameter filter needs fixing", problems)
    return tuple(found)


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
                                   text=flt.text, fts=store.has_fts, alias="t.", person=flt.person)
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
    person, person_args = filter_clauses(person=flt.person, alias="i.")
    clauses, args = clauses + person, args + person_args
    if flt.picked:
        clauses.append("i.id IN (SELECT image_id FROM picks)")
    for name, value in flt.params:
        if name == "seed":
            clauses.append("t.seed = ?")
            args.append(int(value))
        else:  # the value as given (text in a CSV, a number in JSON): compared as text, "7" matches 7 and "7"
            clauses.append("CAST(t.params ->> ? AS TEXT) = ?")
            args.extend(['$."' + name.replace('"', "") + '"', value])
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args


def _needs_task_join(flt: ImageFilter) -> bool:
    return bool(flt.workflow or flt.text.strip() or flt.params)


def people(store: Store) -> list[str]:
    """Everyone who has submitted a batch, for the pages' person filter."""
    return [r[0] for r in store.db.execute("SELECT DISTINCT submitted_by FROM batches WHERE submitted_by IS NOT "
                                           "NULL ORDER BY submitted_by LIMIT 1000").fetchall()]
