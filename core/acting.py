"""Who may act on which batch, and the traces acting leaves: the checks core.service makes before a change
(core.users has the roles), the events recording a person acting on someone else's batch, and the per-user
cap on queued tasks (COMFYBATCH_USER_MAX_QUEUED). Side effects: events rows, through core.sessions."""

from __future__ import annotations

from core import sessions
from core.config import Settings
from core.errors import InputError, Problem
from core.store import Store
from core.users import Actor, require_owner


def check_user_cap(settings: Settings, store: Store, actor: Actor, new_tasks: int) -> None:
    """COMFYBATCH_USER_MAX_QUEUED: refuse a submission that would leave `actor` more tasks queued than that."""
    cap = settings.user_max_queued
    if not cap:
        return
    queued = sessions.queued_count(store, actor.name)
    if queued + new_tasks > cap:
        raise InputError(f"{actor.name} has {queued:,} task(s) queued; {new_tasks:,} more would pass the per-user "
                         f"cap of {cap:,} (COMFYBATCH_USER_MAX_QUEUED); nothing was enqueued", [Problem(
                             f"at most {max(cap - queued, 0):,} more task(s) now; wait for queued work to start "
                             "or cancel some", field="count", code="over_user_cap")])


def may_act(store: Store, task_ids: list[int], actor: Actor, what: str) -> list[int]:
    """Refuse (Forbidden) unless `actor` may act on every batch these tasks belong to; returns the tasks of
    batches someone else submitted (their events will say who acted)."""
    if not task_ids:
        return []
    batches: dict[int, list[int]] = {}
    for start in range(0, len(task_ids), 900):  # SQLite's bound on parameters, with room to spare
        chunk = task_ids[start:start + 900]
        for task_id, batch_id in store.db.execute(
                f"SELECT id, batch_id FROM tasks WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall():
            batches.setdefault(batch_id, []).append(task_id)
    others: list[int] = []
    for batch_id, ids in batches.items():
        batch = store.get_batch(batch_id)
        require_owner(actor, batch, what)
        if batch.get("submitted_by") != actor.name:
            others.extend(ids)
    return others


def others_batches(store: Store, task_ids: list[int], actor: Actor) -> list[int]:
    """The batches among these tasks' that `actor` may not act on (someone else's, for a member): what a page
    checks before offering an action the engine would refuse. At most 900 tasks are looked at (a page's worth)."""
    if actor.is_admin or not task_ids:
        return []
    chunk = task_ids[:900]
    return [r[0] for r in store.db.execute(
        f"SELECT DISTINCT t.batch_id FROM tasks t JOIN batches b ON b.id = t.batch_id WHERE t.id IN "
        f"({','.join('?' * len(chunk))}) AND b.submitted_by IS NOT ? ORDER BY t.batch_id", [*chunk, actor.name])]


def batch_action(store: Store, batch_id: int, actor: Actor, what: str, done: str) -> None:
    """Check that `actor` may act on the batch; on someone else's, its unfinished tasks' events say who did."""
    batch = store.get_batch(batch_id)
    require_owner(actor, batch, what)
    if batch.get("submitted_by") != actor.name:
        sessions.note_action(store, sessions.unfinished_ids(store, batch_id), actor, f"batch {done} by {actor.name}")
