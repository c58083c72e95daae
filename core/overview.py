"""Read-only queries behind the Overview page: the active batches, the charts and the servers' current work.

Each query is aggregated in SQL over a bounded time window (or a bounded number of rows) through an index
(`tasks_finished`, `images_created`, `tasks_batch_status`), so the page costs about the same with 100 tasks
or 100,000: nothing here loads rows in proportion to the size of the queue or the history.
"""

from __future__ import annotations

import time
from typing import Any

from core.models import IN_FLIGHT, UNFINISHED
from core.store import Store

ACTIVE_BATCHES = 6  # cards on the overview
HOUR = 3600.0
DURATION_SAMPLE = 2000  # latest finished tasks whose run time feeds the distribution chart
FAILURE_WINDOW = 24 * HOUR
NO_CAUSE = "unknown"


def active_batch_ids(store: Store, limit: int = ACTIVE_BATCHES, person: str | None = None) -> list[int]:
    """Batches with work still to do (only `person`'s when given), newest first: walks the batches from the
    newest with one probe of the (batch, status) index each, never the queue itself."""
    marks = ",".join("?" * len(UNFINISHED))
    mine, args = ("b.submitted_by = ? AND ", [person]) if person is not None else ("", [])
    return [r[0] for r in store.db.execute(
        f"SELECT b.id FROM batches b WHERE {mine}EXISTS (SELECT 1 FROM tasks t WHERE t.batch_id = b.id AND "
        f"t.status IN ({marks})) ORDER BY b.id DESC LIMIT ?", [*args, *UNFINISHED, limit]).fetchall()]


def latest_images(store: Store, batch_id: int, limit: int = 8) -> list[dict[str, Any]]:
    """The newest images of a batch, narrow columns (the thumbnail strip of a card)."""
    return list(store.db.query("SELECT id, task_id, width, height FROM images WHERE batch_id = ? ORDER BY id DESC "
                               "LIMIT ?", [batch_id, limit]))


def images_per_minute(store: Store, now: float | None = None, window: float = HOUR) -> list[dict[str, Any]]:
    """Images finished per minute and server over the last `window` seconds: {minute (epoch s), server, images}."""
    now = time.time() if now is None else now
    since = now - window
    rows = store.db.execute(
        "SELECT CAST((i.created_at - ?) / 60 AS INTEGER) AS m, COALESCE(t.server, '?'), COUNT(*) FROM images i "
        "JOIN tasks t ON t.id = i.task_id WHERE i.created_at >= ? GROUP BY m, t.server ORDER BY m",
        (since, since)).fetchall()
    return [{"minute": since + m * 60, "server": server, "images": n} for m, server, n in rows]


def durations(store: Store, now: float | None = None, window: float = 24 * HOUR,
              limit: int = DURATION_SAMPLE) -> list[dict[str, Any]]:
    """Run time (execution start to finish) of the latest succeeded tasks, by workflow: {workflow, seconds}."""
    now = time.time() if now is None else now
    rows = store.db.execute(
        # INDEXED BY: the planner would otherwise walk every succeeded task through the claim index.
        "SELECT workflow, finished_at - started_at FROM tasks INDEXED BY tasks_finished WHERE finished_at >= ? "
        "AND status = 'succeeded' "
        "AND started_at IS NOT NULL AND finished_at >= started_at ORDER BY finished_at DESC LIMIT ?",
        (now - window, limit)).fetchall()
    return [{"workflow": w, "seconds": float(s)} for w, s in rows]


def failures(store: Store, now: float | None = None, window: float = FAILURE_WINDOW,
             bucket: float = HOUR) -> list[dict[str, Any]]:
    """Failed tasks per `bucket` seconds and cause over the last `window`: {at (epoch s), cause, failures}.
    The cause is the scheduler's failure kind when it recorded one, else the error's first words."""
    now = time.time() if now is None else now
    since = now - window
    rows = store.db.execute(
        "SELECT CAST((finished_at - ?) / ? AS INTEGER) AS b, COALESCE(failure_sig, error) AS cause, COUNT(*) "
        "FROM tasks INDEXED BY tasks_finished WHERE finished_at >= ? AND status = 'failed' GROUP BY b, cause "
        "ORDER BY b",
        (since, bucket, since)).fetchall()
    found: dict[tuple[float, str], int] = {}
    for b, cause, n in rows:
        key = (since + b * bucket, short_cause(cause))
        found[key] = found.get(key, 0) + n
    return [{"at": at, "cause": cause, "failures": n} for (at, cause), n in found.items()]


def short_cause(error: str | None) -> str:
    """A failure's cause in a few words, for a chart legend: the text before the first colon or full stop."""
    text = (error or "").strip()
    if not text:
        return NO_CAUSE
    for stop in (":", ".", "\n", " ("):
        text = text.split(stop, 1)[0]
    return text[:40]


def current_work(store: Store) -> dict[str, list[dict[str, Any]]]:
    """What each server is doing now: its in-flight tasks with progress, narrow columns."""
    marks = ",".join("?" * len(IN_FLIGHT))
    rows = store.db.query(
        f"SELECT id, batch_id, server, status, progress_value, progress_max, prompt FROM tasks "
        f"WHERE status IN ({marks}) ORDER BY id", list(IN_FLIGHT))
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        found.setdefault(row["server"] or "?", []).append(row)
    return found
