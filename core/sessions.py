"""The people tables of the task store (schema v6 in core.store): sign-in sessions, sign-in failures (the
lockout), API tokens per user, and events that record who acted on a batch. Every write goes through the
Store's one write path (`store.write()`, BEGIN IMMEDIATE). Faces never call this module: core.accounts and
core.service do.

Secrets never reach the database: a session id and an API token are 32 random bytes handed out once; only
their SHA-256 (hex) is stored and looked up, so a copy of the database signs nobody in.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from core.models import UNFINISHED
from core.store import Store
from core.users import Actor

TOKEN_PREFIX = "cbt_"  # per-user API tokens start with this, so a leaked one is recognisable in a scan


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


# -- sessions --------------------------------------------------------------------------------------
def create_session(store: Store, actor: Actor, seconds: float) -> str:
    """A new session for `actor`; returns its random id (for the cookie), stores only its hash."""
    session_id = secrets.token_urlsafe(32)
    now = time.time()
    with store.write() as conn:
        conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
        conn.execute("INSERT INTO sessions (id_hash, user, role, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                     (digest(session_id), actor.name, actor.role, now, now + seconds))
    return session_id


def session_actor(store: Store, session_id: str | None) -> Actor | None:
    if not session_id or len(session_id) > 200:
        return None
    row = store.db.execute("SELECT user, role FROM sessions WHERE id_hash = ? AND expires_at > ?",
                           (digest(session_id), time.time())).fetchone()
    return Actor(row[0], row[1]) if row else None


def end_session(store: Store, session_id: str | None) -> None:
    if session_id:
        with store.write() as conn:
            conn.execute("DELETE FROM sessions WHERE id_hash = ?", (digest(session_id),))


def end_sessions_of(store: Store, name: str) -> None:
    with store.write() as conn:
        conn.execute("DELETE FROM sessions WHERE user = ?", (name,))


# -- sign-in failures --------------------------------------------------------------------------------
def locked_until(store: Store, name: str) -> float | None:
    row = store.db.execute("SELECT locked_until FROM sign_in_failures WHERE name = ?", (name,)).fetchone()
    return row[0] if row and row[0] and row[0] > time.time() else None


def record_failure(store: Store, name: str, after: int, delay: float) -> float | None:
    """Count a failed sign-in for `name`; the `after`-th in a row locks it for `delay` seconds, doubling with
    each further failure (at most an hour). Returns the end of the lockout it started, else None."""
    now = time.time()
    with store.write() as conn:
        failures = conn.execute(
            "INSERT INTO sign_in_failures (name, failures, last_at) VALUES (?, 1, ?) ON CONFLICT(name) DO UPDATE "
            "SET failures = failures + 1, last_at = excluded.last_at RETURNING failures", (name[:200], now)
        ).fetchone()[0]
        if failures < after:
            return None
        until = now + min(delay * 2 ** (failures - after), 3600.0)
        conn.execute("UPDATE sign_in_failures SET locked_until = ? WHERE name = ?", (until, name[:200]))
        return until


def clear_failures(store: Store, name: str) -> None:
    with store.write() as conn:
        conn.execute("DELETE FROM sign_in_failures WHERE name = ?", (name,))


# -- API tokens per user -----------------------------------------------------------------------------
def create_token(store: Store, owner: Actor, label: str) -> tuple[int, str]:
    """A new token for `owner` (in their role); returns (id, the token), storing only its hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.write() as conn:
        token_id = conn.execute("INSERT INTO api_tokens (token_hash, user, role, label, created_at) VALUES "
                                "(?, ?, ?, ?, ?)", (digest(token), owner.name, owner.role, label, time.time())
                                ).lastrowid
    assert token_id is not None
    return token_id, token


def token_actor(store: Store, token: str) -> Actor | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = store.db.execute("SELECT user, role FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                           (digest(token),)).fetchone()
    return Actor(row[0], row[1]) if row else None


def list_tokens(store: Store, owner: str | None = None) -> list[dict[str, Any]]:
    """Tokens (never the hash), newest first; only `owner`'s when given."""
    sql = "SELECT id, user, role, label, created_at, revoked_at, revoked_by FROM api_tokens"
    args: list[Any] = []
    if owner is not None:
        sql += " WHERE user = ?"
        args.append(owner)
    return list(store.db.query(sql + " ORDER BY id DESC LIMIT 500", args))


def get_token(store: Store, token_id: int) -> dict[str, Any] | None:
    rows = list(store.db.query("SELECT id, user, role, label, created_at, revoked_at FROM api_tokens WHERE id = ?",
                               [token_id]))
    return rows[0] if rows else None


def revoke_token(store: Store, token_id: int, by: str) -> bool:
    with store.write() as conn:
        return conn.execute("UPDATE api_tokens SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
                            (time.time(), by, token_id)).rowcount == 1


# -- who acted on a batch ------------------------------------------------------------------------------
def note_action(store: Store, task_ids: list[int], actor: Actor, detail: str) -> None:
    """An event per task (its status unchanged) saying who did what to it: a person acting on someone else's
    batch leaves this trace in the task events."""
    if not task_ids:
        return
    now = time.time()
    with store.write() as conn:
        conn.executemany("INSERT INTO events (task_id, batch_id, status, at, detail, actor) SELECT id, batch_id, "
                         "status, ?, ?, ? FROM tasks WHERE id = ?", [(now, detail, actor.name, i) for i in task_ids])


def unfinished_ids(store: Store, batch_id: int) -> list[int]:
    return store.task_ids(batch_id=batch_id, statuses=UNFINISHED)


def queued_count(store: Store, name: str) -> int:
    """Tasks queued (not yet on a server) in `name`'s batches: what the per-user cap counts."""
    return int(store.db.execute("SELECT COUNT(*) FROM tasks t JOIN batches b ON b.id = t.batch_id WHERE "
                                "b.submitted_by = ? AND t.status = 'queued'", (name,)).fetchone()[0])
