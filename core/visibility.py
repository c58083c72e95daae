"""Who may see which batches (COMFYBATCH_PRIVATE_BATCHES): with the setting on, a member sees only the batches
they submitted, with their tasks, images and events; admins see everything. Off (the default), everyone sees
everyone's work. Every face's read goes through here: list reads are limited with `person_for` (the person a
query must be limited to), reads of one thing by id with `visible_batch` / `visible_task` / `visible_image`,
which answer NotFound (the same message as a missing id) for someone else's: a member is not told it exists.
Reads only."""

from __future__ import annotations

from typing import Any

from core.config import Settings
from core.errors import NotFound
from core.store import Store
from core.users import Actor

NOBODY = ""  # no batch records an empty submitter (names are never empty): a person filter matching nothing


def own_only(settings: Settings, actor: Actor) -> str | None:
    """The person whose batches alone `actor` may see (their own name), or None: everyone's."""
    return actor.name if settings.private_batches and not actor.is_admin else None


def person_for(settings: Settings, actor: Actor, person: str | None = None) -> str | None:
    """The person a list query must be limited to: the one asked for (None: everyone), narrowed to the actor's
    own batches when batches are private (asking for someone else's then matches nothing)."""
    own = own_only(settings, actor)
    if own is None or person in (None, own):
        return own if own is not None else person
    return NOBODY


def may_see(settings: Settings, actor: Actor, batch: dict[str, Any]) -> bool:
    own = own_only(settings, actor)
    return own is None or batch.get("submitted_by") == own


def visible_batch(settings: Settings, store: Store, actor: Actor, batch_id: int) -> dict[str, Any]:
    batch = store.get_batch(batch_id)
    if not may_see(settings, actor, batch):
        raise NotFound(f"batch {batch_id} does not exist")
    return batch


def visible_task(settings: Settings, store: Store, actor: Actor, task_id: int) -> dict[str, Any]:
    task = store.get_task(task_id)
    if own_only(settings, actor) is not None and not may_see(settings, actor, store.get_batch(task["batch_id"])):
        raise NotFound(f"task {task_id} does not exist")
    return task


def check_image(settings: Settings, store: Store, actor: Actor, image_id: int) -> None:
    """NotFound unless `actor` may see the image (a missing image is NotFound too, from its first read)."""
    if own_only(settings, actor) is None:
        return
    row = store.db.execute("SELECT b.submitted_by FROM images i JOIN batches b ON b.id = i.batch_id WHERE i.id = ?",
                           (image_id,)).fetchone()
    if row is None or row[0] != actor.name:
        raise NotFound(f"image {image_id} does not exist")


def list_batches(store: Store, limit: int, person: str | None = None) -> list[dict[str, Any]]:
    """The newest batches, only `person`'s when given (see person_for)."""
    if person is None:
        return store.list_batches(limit)
    return list(store.db.query("SELECT * FROM batches WHERE submitted_by = ? ORDER BY id DESC LIMIT ?",
                               [person, limit]))


def visible_batch_ids(store: Store, person: str | None) -> set[int] | None:
    """The ids of `person`'s batches (None: no limit), for filtering a stream of events."""
    if person is None:
        return None
    return {r[0] for r in store.db.execute("SELECT id FROM batches WHERE submitted_by = ?", (person,)).fetchall()}
