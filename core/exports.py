"""Results CSVs and ZIPs of any size, streamed: rows and images are read from SQLite a page at a time (keyset
paging on ids) and written straight to a file or yielded in chunks, so memory stays flat however large the
batch. The pages get a temporary file under `<output>/_exports/<token>/`, served by the app's
`/files/export/<token>/<name>` route (the unguessable token is the link's only key, like a signed image link)
and deleted after `KEEP_SECONDS`; the API streams the same chunks.

Side effects: files under the exports folder (and the removal of old ones).
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import files
from core.config import Settings
from core.errors import NotFound
from core.store import Store, filter_clauses

PAGE = 500
KEEP_SECONDS = 3600.0
EXPORT_URL = "/files/export/{token}/{name}"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
_NAME = re.compile(r"^[\w.-]{1,120}$")


@dataclass(frozen=True)
class Selection:
    """Which tasks and images an export covers: a batch, the picked images (of a batch, or of all), or both;
    with `person`, only batches that person submitted (core.visibility.person_for)."""

    batch_id: int | None = None
    picked: bool = False
    person: str | None = None

    def image_where(self) -> tuple[str, list[Any]]:
        clauses, args = filter_clauses(batch_id=self.batch_id, person=self.person, alias="i.")
        if self.picked:
            clauses.append("i.id IN (SELECT image_id FROM picks)")
        return (" AND ".join(clauses) or "1"), args

    def task_where(self) -> tuple[str, list[Any]]:
        if self.picked:
            where, args = self.image_where()
            return f"t.id IN (SELECT i.task_id FROM images i WHERE {where})", args
        clauses, args = filter_clauses(person=self.person, alias="t.")
        if self.batch_id is not None:
            # `+`: walk the ids (a batch's tasks are contiguous), not the (batch, status) index, which would
            # sort the whole batch for every page.
            clauses.append("+t.batch_id = ?")
            args.append(self.batch_id)
        return (" AND ".join(clauses) or "1"), args


@dataclass(frozen=True)
class ExportFile:
    token: str
    name: str
    path: Path

    @property
    def url(self) -> str:
        return EXPORT_URL.format(token=self.token, name=self.name)


# -- reading a page at a time -----------------------------------------------------------------------
def iter_images(store: Store, sel: Selection) -> Iterator[dict[str, Any]]:
    """The selected image rows in id order, `PAGE` at a time."""
    where, args = sel.image_where()
    last = 0
    while True:
        rows = list(store.db.query(f"SELECT i.* FROM images i WHERE {where} AND i.id > ? ORDER BY i.id LIMIT ?",
                                   [*args, last, PAGE]))
        yield from rows
        if len(rows) < PAGE:
            return
        last = rows[-1]["id"]


def param_keys(store: Store, sel: Selection) -> list[str]:
    """Every parameter name the selected tasks were given, in the order first given (one SQL pass)."""
    where, args = sel.task_where()
    rows = store.db.execute(f"SELECT j.key FROM tasks t, json_each(t.params) j WHERE {where} GROUP BY j.key "
                            "ORDER BY MIN(t.id * 100000 + j.id)", args).fetchall()
    return [r[0] for r in rows]


def csv_chunks(store: Store, sel: Selection, link: Callable[[dict[str, Any]], str | None]) -> Iterator[bytes]:
    """A results CSV (UTF-8 with BOM, spreadsheet-safe cells; see core.files.results_row) in chunks of about
    `PAGE` tasks; with `picked`, only tasks with a picked image, listing only those images."""
    keys = param_keys(store, sel)
    yield ("\ufeff" + _line(files.results_header(keys))).encode("utf-8")
    where, args = sel.task_where()
    image_where, image_args = sel.image_where()
    last = 0
    if sel.batch_id is not None:  # start at the batch's first task, not at the first task of all
        first = store.db.execute("SELECT MIN(id) FROM tasks WHERE batch_id = ?", (sel.batch_id,)).fetchone()[0]
        last = (first or 1) - 1
    while True:
        tasks = [{**r, "params": json.loads(r["params"])} for r in store.db.query(
            "SELECT t.id, t.row_number, t.params, t.seed, t.status, t.server, t.attempts, t.error, "
            "(SELECT b.submitted_by FROM batches b WHERE b.id = t.batch_id) AS submitted_by FROM tasks t "
            f"WHERE {where} AND t.id > ? ORDER BY t.id LIMIT ?", [*args, last, PAGE])]
        if not tasks:
            return
        ids = [t["id"] for t in tasks]
        by_task: dict[int, list[dict[str, Any]]] = {}
        links: dict[int, str] = {}
        for img in store.db.query(f"SELECT i.* FROM images i WHERE {image_where} AND i.task_id IN "
                                  f"({','.join('?' * len(ids))}) ORDER BY i.task_id, i.node_id, i.idx",
                                  [*image_args, *ids]):
            by_task.setdefault(img["task_id"], []).append(img)
            if (url := link(img)) is not None:
                links[img["id"]] = url
        out = io.StringIO()
        writer = csv.writer(out)
        for t in tasks:
            writer.writerow(files.results_row(t, keys, by_task.get(t["id"], []), links, t["submitted_by"] or ""))
        yield out.getvalue().encode("utf-8")
        last = ids[-1]


def _line(cells: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue()


# -- files the pages link to --------------------------------------------------------------------------
def export_dir(settings: Settings) -> Path:
    return settings.output_dir / "_exports"


def new_file(settings: Settings, name: str, now: float | None = None) -> ExportFile:
    """A fresh path for an export named `name` under an unguessable token; removes exports older than
    KEEP_SECONDS first."""
    cleanup(settings, now)
    token = secrets.token_urlsafe(18)
    folder = export_dir(settings) / token
    folder.mkdir(parents=True)
    safe = re.sub(r"[^\w.-]+", "_", name)[:120] or "export"
    return ExportFile(token, safe, folder / safe)


def find(settings: Settings, token: str, name: str) -> Path:
    """The file of an export link, or NotFound (a malformed, expired or unknown link)."""
    if not _TOKEN.match(token) or not _NAME.match(name):
        raise NotFound("no such export")
    path = export_dir(settings) / token / name
    if not path.is_file():
        raise NotFound("this export link has expired or never existed: prepare the download again")
    return path


def cleanup(settings: Settings, now: float | None = None) -> int:
    """Remove export folders older than KEEP_SECONDS; returns how many."""
    now = time.time() if now is None else now
    root = export_dir(settings)
    removed = 0
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > KEEP_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed
