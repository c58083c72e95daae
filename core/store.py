"""The task store: the only module that imports sqlite_utils (and so the only one that writes SQLite).

One database file holds batches, tasks, output images, status events, servers, input uploads and the
scheduler lease. WAL with a busy timeout; one connection per thread; every write runs inside
`BEGIN IMMEDIATE`, so a read-then-write (the claim) never fails with "database is locked" under threads
or processes. Every status change is one guarded UPDATE (`WHERE status IN (...)`) plus an `events` row.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from core.errors import NotFound
from core.models import FINAL_STATUSES, IN_FLIGHT, UNFINISHED, TaskStatus

SCHEMA_VERSION = 9
_JSON_COLUMNS = ("params", "graph", "inputs")

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, workflow TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0,
        source TEXT, created_at REAL NOT NULL);
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL REFERENCES batches(id), row_number INTEGER,
        workflow TEXT NOT NULL, prompt TEXT NOT NULL DEFAULT '', params TEXT NOT NULL, seed INTEGER,
        graph TEXT NOT NULL, inputs TEXT NOT NULL DEFAULT '{}', servers TEXT,
        status TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, server TEXT, prompt_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, progress_value INTEGER, progress_max INTEGER, error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, submitted_at REAL,
        started_at REAL, finished_at REAL, updated_at REAL NOT NULL);
    CREATE INDEX tasks_batch_status ON tasks(batch_id, status);
    CREATE INDEX tasks_claim ON tasks(status, priority DESC, id);
    CREATE INDEX tasks_server_status ON tasks(server, status);
    CREATE UNIQUE INDEX tasks_prompt_id ON tasks(prompt_id);
    CREATE INDEX tasks_workflow ON tasks(workflow, id);
    CREATE TABLE images (
        id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id), batch_id INTEGER NOT NULL,
        node_id TEXT NOT NULL, idx INTEGER NOT NULL, path TEXT NOT NULL, filename TEXT, subfolder TEXT,
        type TEXT, width INTEGER, height INTEGER, mode TEXT, size_bytes INTEGER, created_at REAL NOT NULL,
        UNIQUE(task_id, node_id, idx));
    CREATE INDEX images_batch ON images(batch_id, id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL, batch_id INTEGER NOT NULL, status TEXT NOT NULL,
        at REAL NOT NULL, detail TEXT);
    CREATE INDEX events_task ON events(task_id, id);
    CREATE TABLE servers (
        url TEXT PRIMARY KEY, enabled INTEGER NOT NULL DEFAULT 1, source TEXT NOT NULL, client_id TEXT NOT NULL,
        added_at REAL NOT NULL);
    CREATE TABLE uploads (
        server TEXT NOT NULL, sha256 TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY(server, sha256));
    CREATE TABLE leases (
        name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL, pid INTEGER, host TEXT);
    """,
    # v2: the scheduler publishes each server's health, so pages need not probe servers themselves.
    2: """
    ALTER TABLE servers ADD COLUMN health TEXT;
    ALTER TABLE servers ADD COLUMN health_at REAL;
    """,
    # v3: uploads to object storage. remote_state is NULL (not for the store: storage was off), pending,
    # uploading (claimed until remote_claim_until by the claim token remote_claim), stored or failed.
    # remote_attempts counts uploads that may have reached the store. local_deleted_at: the local copy was
    # deleted after a verified upload (COMFYBATCH_S3_DELETE_LOCAL).
    3: """
    ALTER TABLE images ADD COLUMN remote_state TEXT;
    ALTER TABLE images ADD COLUMN remote_key TEXT;
    ALTER TABLE images ADD COLUMN remote_etag TEXT;
    ALTER TABLE images ADD COLUMN remote_error TEXT;
    ALTER TABLE images ADD COLUMN remote_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE images ADD COLUMN remote_next_at REAL;
    ALTER TABLE images ADD COLUMN remote_claim TEXT;
    ALTER TABLE images ADD COLUMN remote_claim_until REAL;
    ALTER TABLE images ADD COLUMN uploaded_at REAL;
    ALTER TABLE images ADD COLUMN local_deleted_at REAL;
    CREATE INDEX images_upload_queue ON images(remote_state, remote_next_at, id)
        WHERE remote_state IN ('pending', 'uploading');
    CREATE INDEX images_batch_remote ON images(batch_id, remote_state);
    """,
    # v4: fleet scheduling. paused: nothing more of the batch is claimed. run_next: set by "run next" (a
    # sequence number; the latest goes first at its priority). turn: the fair-share clock value of the batch's
    # latest claim (core.scheduler's docstring). servers.draining: no new work for that server. The whole
    # queue's pause is the meta key 'queue_paused'. The circuit breaker: servers.failures counts consecutive
    # failed runs (execution errors, stalls), quarantined_until/quarantine_reason the cool-down it led to;
    # tasks.failed_on/failure_sig are the server and the kind of a task's last failed run. Model affinity:
    # tasks.models lists the model files its graph loads (sorted, '|'-separated), servers.models those of the
    # last task a server took.
    4: """
    ALTER TABLE batches ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batches ADD COLUMN run_next INTEGER;
    ALTER TABLE batches ADD COLUMN turn INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE servers ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE servers ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE servers ADD COLUMN quarantined_until REAL;
    ALTER TABLE servers ADD COLUMN quarantine_reason TEXT;
    ALTER TABLE tasks ADD COLUMN failed_on TEXT;
    ALTER TABLE tasks ADD COLUMN failure_sig TEXT;
    ALTER TABLE tasks ADD COLUMN models TEXT NOT NULL DEFAULT '';
    ALTER TABLE servers ADD COLUMN models TEXT;
    CREATE INDEX tasks_workflow_finished ON tasks(workflow, status, finished_at);
    """,
    # v5: scale-out (issue 10). The claim visits only batches with queued tasks (a skip-scan of this partial
    # index, instead of every batch ever made), and the fair-share clock reads MAX(turn) from an index.
    # Leases are per server now ('server:<url>', plus 'member:<owner>' rows that count the live schedulers);
    # they live in the existing leases table.
    5: """
    CREATE INDEX tasks_queued_batch ON tasks(batch_id) WHERE status = 'queued';
    CREATE INDEX batches_turn ON batches(turn);
    """,
    # v6: people (core.users, core.sessions). batches.submitted_by: the person, token owner or "cli" who
    # submitted; events.actor: who caused the event when a person did (a cancel, a pause of another's batch).
    # sessions/api_tokens keep only SHA-256 hashes of the random ids handed out; sign_in_failures drives the
    # lockout delay.
    6: """
    ALTER TABLE batches ADD COLUMN submitted_by TEXT;
    CREATE INDEX batches_person_turn ON batches(submitted_by, turn);
    ALTER TABLE events ADD COLUMN actor TEXT;
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL, created_at REAL NOT NULL,
        expires_at REAL NOT NULL);
    CREATE TABLE sign_in_failures (
        name TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at REAL NOT NULL, locked_until REAL);
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, user TEXT NOT NULL, role TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, last_used_at REAL, revoked_at REAL,
        revoked_by TEXT);
    """,
    # v7 (issue 12): batches.axes: a sweep's parameters and their values in the order given (JSON object, NULL
    # for a batch without lists), for the grid view. picks: images starred in the gallery. The overview's
    # charts read bounded time windows from covering indexes on finish times (no table reads), and a batch's
    # routes (for its ETA) from one on (batch, status, servers).
    7: """
    ALTER TABLE batches ADD COLUMN axes TEXT;
    CREATE TABLE picks (
        image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE, picked_at REAL NOT NULL);
    CREATE INDEX tasks_finished ON tasks(finished_at, status, workflow, started_at, server);
    CREATE INDEX images_created ON images(created_at, task_id);
    CREATE INDEX tasks_batch_routes ON tasks(batch_id, status, servers);
    """,
    # v9: the old tool's API and webhooks. compat_requests: the request an old client sent for a task (as
    # given) and the note on fields its workflow lacks. webhooks: one per batch that named a URL; state is
    # waiting (batch not final), pending (due at next_at), sending (claimed until claim_until), delivered or
    # failed (retries spent); body is frozen when the batch becomes final, so every retry signs the same bytes.
    # webhook_attempts: every call made, with its HTTP status or error.
    9: """
    CREATE TABLE compat_requests (
        task_id INTEGER PRIMARY KEY, request TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
    CREATE TABLE webhooks (
        id INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL UNIQUE, url TEXT NOT NULL, state TEXT NOT NULL,
        body TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL, claim TEXT, claim_until REAL,
        last_error TEXT, created_at REAL NOT NULL, finished_at REAL);
    CREATE INDEX webhooks_state ON webhooks(state, next_at);
    CREATE TABLE webhook_attempts (
        id INTEGER PRIMARY KEY, webhook_id INTEGER NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL,
        status_code INTEGER, error TEXT, seconds REAL);
    CREATE INDEX webhook_attempts_webhook ON webhook_attempts(webhook_id, id);
    """,
}
POLICIES = ("fair", "fifo")  # COMFYBATCH_POLICY: batches take turns at equal priority, or oldest first
# The batches with queued tasks, one index probe each (a skip scan of the partial index). INDEXED BY: left to
# itself the planner walks tasks_claim through every queued task for each MIN, ~0.4 ms per 3,000 queued tasks
# (0.006 ms this way) on every claim.
_OPEN_BATCHES = ("WITH RECURSIVE open(id) AS (SELECT (SELECT MIN(batch_id) FROM tasks INDEXED BY "
                 "tasks_queued_batch WHERE status = 'queued') UNION ALL SELECT (SELECT MIN(batch_id) FROM tasks "
                 "INDEXED BY tasks_queued_batch WHERE status = 'queued' AND batch_id > open.id) FROM open "
                 "WHERE open.id IS NOT NULL) ")
SERVER_LEASE = "server:"  # + url: the scheduler feeding that server
MEMBER_LEASE = "member:"  # + owner: a live scheduler (counted to split the servers)
_ELIGIBLE = ("t.status = 'queued' AND t.cancel_requested = 0 "
             "AND (t.servers IS NULL OR instr(',' || t.servers || ',', ',' || :server || ',') > 0)")


class _Pending:
    """One write waiting for its group's commit (Store._group_write)."""

    __slots__ = ("op", "done", "result", "error")

    def __init__(self, op: Callable[[sqlite3.Connection], Any]):
        self.op = op
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None


class Store:
    """Thread-safe access to one SQLite file: each thread reads on a connection of its own; every write
    transaction of this process goes through one shared connection, taken in turn (the write lock).

    Why one writer connection: SQLite drops a connection's whole page cache whenever another connection has
    written since its last transaction. With a connection per thread (a fleet's scheduler runs hundreds of
    threads) every write started on a cold cache and paid for it in page reads, about 0.1 ms of CPU a
    statement; the shared writer keeps its cache, as only it (and other processes) write."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Weak: a connection dies with the thread that opened it (Streamlit runs each rerun in a new thread).
        self._all: weakref.WeakSet[sqlite_utils.Database] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._writer: sqlite3.Connection | None = None
        self._pending_lock = threading.Lock()
        self._pending: list[_Pending] = []  # claims and completions waiting for a group commit
        self._has_fts: bool | None = None
        self._columns: dict[str, list[str]] = {}
        self.migrate()

    # -- connections and transactions -------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite_utils.Database(self._connect())
            self._local.db = db
            with self._lock:
                self._all.add(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in list(self._all):
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            self._all.clear()
        self._local = threading.local()
        with self._write_lock:
            if self._writer is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._writer.close()
            self._writer = None

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken with BEGIN IMMEDIATE (the lock is held from the first statement), on the
        shared writer connection: read what the transaction needs through the connection it yields."""
        # Threads of this process queue on a Python lock (woken at once) instead of SQLite's busy handler,
        # which sleeps in steps of milliseconds; other processes still wait through busy_timeout.
        with self._write_lock:
            if self._writer is None:
                self._writer = self._connect()
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _group_write(self, op: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `op(conn)` in a write transaction and return its result; group commit: writes that queue while
        another thread holds the write lock are run together, in arrival order, in one transaction, by the first
        of them to get the lock (each caller returns once its own write is committed). A fleet's scheduler
        claims and completes hundreds of tasks a second, and a transaction's cost is mostly its commit (the
        pages it changed, the task indexes' above all, written to the WAL), which neighbouring tasks share.
        Should a group's transaction fail, each of its writes is run again alone, so one bad write fails alone.
        Inside a `write()` block of the same thread, `op` simply joins that transaction."""
        if self._write_lock._is_owned() and self._writer is not None and self._writer.in_transaction:  # type: ignore[attr-defined]
            # This thread holds the write lock (only its holder uses the writer): the open transaction is ours.
            return op(self._writer)
        item = _Pending(op)
        with self._pending_lock:
            self._pending.append(item)
        with self._write_lock:
            if not item.done:
                with self._pending_lock:
                    group, self._pending = self._pending, []
                self._run_group(group)
        if item.error is not None:
            raise item.error
        return item.result

    def _run_group(self, group: list[_Pending]) -> None:
        try:
            try:
                with self.write() as conn:
                    for item in group:
                        item.result = item.op(conn)
            except Exception as exc:
                if len(group) == 1:
                    group[0].error = exc
                    return
                for item in group:
                    try:
                        with self.write() as conn:
                            item.result = item.op(conn)
                    except Exception as one:
                        item.error = one
        finally:
            for item in group:
                item.done = True

    def migrate(self) -> None:
        db = self.db
        if db.journal_mode != "wal":
            db.enable_wal()
        with self.write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            for target in sorted(v for v in _MIGRATIONS if v > version):
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(target),))
        if "tasks_fts" not in db.table_names():
            try:
                db.table("tasks").enable_fts(["prompt"], tokenize="trigram", create_triggers=True)
            except sqlite3.OperationalError:
                pass  # SQLite older than 3.34 has no trigram tokenizer: search falls back to LIKE
        self._narrow_fts_trigger()

    def _narrow_fts_trigger(self) -> None:
        """sqlite-utils' update trigger re-indexes a task's prompt (every trigram of it) on ANY update of the
        row: the claim, `running`, progress and the completion each paid for it. A prompt never changes after
        its insert in practice, so the trigger fires on an update OF prompt only (idempotent: databases made
        before this get the narrow trigger at their next start). Checked with a read: opening a store whose
        trigger is already narrow takes no write lock."""
        find = "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'tasks_au'"
        row = self.db.execute(find).fetchone()
        if row is None or "UPDATE OF" in row[0].upper():
            return
        with self.write() as conn:
            row = conn.execute(find).fetchone()  # again in the transaction: another process may have done it
            if row is None or "UPDATE OF" in row[0].upper():
                return
            conn.execute("DROP TRIGGER tasks_au")
            conn.execute(
                'CREATE TRIGGER "tasks_au" AFTER UPDATE OF "prompt" ON "tasks" BEGIN\n'
                '  INSERT INTO "tasks_fts" ("tasks_fts", rowid, "prompt") '
                'VALUES(\'delete\', old.rowid, old."prompt");\n'
                '  INSERT INTO "tasks_fts" (rowid, "prompt") VALUES (new.rowid, new."prompt");\nEND')

    @property
    def has_fts(self) -> bool:
        """Whether the trigram prompt index exists (SQLite 3.34+); read once."""
        if self._has_fts is None:
            self._has_fts = "tasks_fts" in self.db.table_names()
        return self._has_fts

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # -- batches and tasks ------------------------------------------------------------------------
    def create_batch(self, name: str, workflow: str, tasks: list[dict[str, Any]], priority: int = 0,
                     source: str | None = None, submitted_by: str | None = None,
                     axes: dict[str, list[Any]] | None = None) -> tuple[int, list[int]]:
        """Insert a batch and all its tasks in one transaction; returns (batch id, task ids). `axes`: a sweep's
        parameters and their values (core.sweeps), kept for the grid view."""
        now = time.time()
        with self.write() as conn:
            batch_id = conn.execute(
                "INSERT INTO batches (name, workflow, priority, source, created_at, submitted_by, axes) VALUES "
                "(?, ?, ?, ?, ?, ?, ?)", (name, workflow, priority, source, now, submitted_by,
                                          json.dumps(axes, ensure_ascii=False) if axes else None)).lastrowid
            assert batch_id is not None
            first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM tasks").fetchone()[0]
            rows = [(first + i, batch_id, t.get("row_number"), workflow, t.get("prompt") or "",
                     json.dumps(t["params"], ensure_ascii=False), t.get("seed"),
                     json.dumps(t["graph"], ensure_ascii=False), json.dumps(t.get("inputs") or {}),
                     t.get("servers"), TaskStatus.QUEUED.value, priority, now, now, "|".join(t.get("models") or ()))
                    for i, t in enumerate(tasks)]
            conn.executemany(
                "INSERT INTO tasks (id, batch_id, row_number, workflow, prompt, params, seed, graph, inputs, "
                "servers, status, priority, created_at, updated_at, models) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows)
            conn.executemany("INSERT INTO events (task_id, batch_id, status, at) VALUES (?, ?, 'queued', ?)",
                             [(r[0], batch_id, now) for r in rows])
        return batch_id, [r[0] for r in rows]

    def claim_next_task(self, server: str, prompt_id: str, policy: str = "fair",
                        affinity_patience: int = 0, lease_owner: str | None = None,
                        probe: bool = True) -> dict[str, Any] | None:
        """Atomically move the next queued task for `server` to `submitted` (None when there is none, the
        queue is paused, every waiting batch is paused, or the server is draining or quarantined).

        Priority first. At the top priority, batches marked "run next" go first (latest mark first); then,
        with `policy` "fair", the person (batches.submitted_by) whose latest turn came longest ago, and of their
        batches the one whose turn came longest ago (round robin between people, then between a person's
        batches: each claim stamps the batch with the next value of a clock), with "fifo" the oldest
        batch. Within a batch, lowest task id.
        Model affinity (`affinity_patience` > 0): when that task loads other models than the server's last
        task did, a batch whose next matching task loads the same ones goes instead, unless the chosen batch
        has already waited `affinity_patience` claims since its turn (or is marked "run next"): fairness then
        requires the switch.
        The prompt_id is stored before anything is posted, so a crash after the post can be reconciled.
        With `lease_owner`, nothing is claimed unless that scheduler holds the server's lease (checked in the
        claim's transaction: a scheduler whose lease ran out can never feed a server another one now feeds).
        `probe`: look for a queued task with a read first (default), so an idle poll never takes the write lock.
        """
        # Most empty claims (an idle fleet polling) end here, on a read, without taking the write lock. `probe`
        # False skips that read (a busy server's claims: its previous claim found a task).
        if probe and self.db.execute("SELECT 1 FROM tasks WHERE status = 'queued' LIMIT 1").fetchone() is None:
            return None
        result: dict[str, Any] | None = self._group_write(
            lambda conn: self._claim(conn, server, prompt_id, policy, affinity_patience, lease_owner))
        return result

    def _claim(self, conn: sqlite3.Connection, server: str, prompt_id: str, policy: str, affinity_patience: int,
               lease_owner: str | None) -> dict[str, Any] | None:
        now = time.time()
        args = {"server": server}
        # One read for the four gates, in the claim's own transaction: the whole queue paused; the server's
        # lease not ours; the server draining or quarantined. A drain or a quarantine that lands a moment
        # before a claim is always seen by it (a check before the claim could race the collector's quarantine).
        paused, leased, draining, quarantined = conn.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'queue_paused'), "
            "(SELECT 1 FROM leases WHERE name = :lease AND owner = :owner AND expires_at > :now), "
            "(SELECT draining FROM servers WHERE url = :server), "
            "(SELECT quarantined_until FROM servers WHERE url = :server)",
            {"lease": SERVER_LEASE + server, "owner": lease_owner, "now": now, "server": server}).fetchone()
        if paused == "1" or (lease_owner is not None and leased is None):
            return None
        if draining or (quarantined is not None and quarantined > now):
            return None
        top = conn.execute(
            f"SELECT t.priority FROM tasks t WHERE {_ELIGIBLE} AND t.batch_id NOT IN "
            "(SELECT id FROM batches WHERE paused = 1) ORDER BY t.priority DESC, t.id LIMIT 1", args).fetchone()
        if top is None:
            return None
        # Fair: between people first (the person whose latest claim is oldest), then that person's batches.
        fairness = ("(SELECT MAX(p.turn) FROM batches p WHERE p.submitted_by IS b.submitted_by), b.turn, b.id"
                    if policy == "fair" else "b.id")
        # One probe of the (batch_id, status) index per batch, instead of sorting every queued task.
        pick = (_OPEN_BATCHES + "SELECT b.id, (SELECT t.id FROM tasks t WHERE t.batch_id = b.id AND "
                "{eligible} AND t.priority = :priority {match} ORDER BY t.id LIMIT 1) AS task, b.turn, b.run_next "
                "FROM batches b WHERE b.id IN (SELECT id FROM open) AND b.paused = 0 AND task IS NOT NULL "
                "ORDER BY b.run_next IS NULL, b.run_next DESC, {fairness} LIMIT 1")
        params = {**args, "priority": top[0]}
        row = conn.execute(pick.format(eligible=_ELIGIBLE, match="", fairness=fairness), params).fetchone()
        if row is None:
            return None
        batch_id, task_id = row[0], row[1]
        models_known = False  # whether the server's models already are those of the task it gets
        if affinity_patience > 0 and row[3] is None:
            loaded, wanted, clock = conn.execute(
                "SELECT (SELECT models FROM servers WHERE url = ?), (SELECT models FROM tasks WHERE id = ?), "
                "(SELECT COALESCE(MAX(turn), 0) FROM batches)", (server, task_id)).fetchone()
            models_known = loaded == wanted
            if loaded is not None and wanted != loaded and clock - row[2] < affinity_patience:
                same = conn.execute(pick.format(eligible=_ELIGIBLE, match="AND t.models = :models",
                                                fairness=fairness), {**params, "models": loaded}).fetchone()
                if same is not None and same[3] is None:
                    batch_id, task_id, models_known = same[0], same[1], True
        conn.execute("UPDATE batches SET turn = (SELECT COALESCE(MAX(turn), 0) + 1 FROM batches) WHERE id = ?",
                     (batch_id,))
        if not models_known:
            conn.execute("UPDATE servers SET models = (SELECT models FROM tasks WHERE id = ?) WHERE url = ?",
                         (task_id, server))
        conn.execute(
            "UPDATE tasks SET status = 'submitted', server = ?, prompt_id = ?, attempts = attempts + 1, "
            "submitted_at = ?, started_at = NULL, progress_value = NULL, progress_max = NULL, "
            "updated_at = ? WHERE id = ?", (server, prompt_id, now, now, task_id))
        conn.execute("INSERT INTO events (task_id, batch_id, status, at, detail) VALUES (?, ?, ?, ?, ?)",
                     (task_id, batch_id, "submitted", now, server))
        # (Not UPDATE ... RETURNING: SQLite's RETURNING costs about 4x the update itself.)
        return self._task(conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone())

    @staticmethod
    def _queue_paused(conn: sqlite3.Connection) -> bool:
        row = conn.execute("SELECT value FROM meta WHERE key = 'queue_paused'").fetchone()
        return bool(row and row[0] == "1")

    # -- pause, run next, drain -------------------------------------------------------------------
    def queue_paused(self) -> bool:
        return self._queue_paused(self.db.conn)

    def set_queue_paused(self, paused: bool) -> None:
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('queue_paused', ?)", ("1" if paused else "0",))

    def set_batch_paused(self, batch_id: int, paused: bool) -> None:
        with self.write() as conn:
            if conn.execute("UPDATE batches SET paused = ? WHERE id = ?", (int(paused), batch_id)).rowcount != 1:
                raise NotFound(f"batch {batch_id} does not exist")

    def set_run_next(self, batch_id: int) -> None:
        """Put the batch ahead of every other batch at its priority (the latest "run next" first)."""
        with self.write() as conn:
            if conn.execute("UPDATE batches SET run_next = (SELECT COALESCE(MAX(run_next), 0) + 1 FROM batches) "
                            "WHERE id = ?", (batch_id,)).rowcount != 1:
                raise NotFound(f"batch {batch_id} does not exist")

    def set_server_draining(self, url: str, draining: bool) -> None:
        with self.write() as conn:
            if conn.execute("UPDATE servers SET draining = ? WHERE url = ?", (int(draining), url)).rowcount != 1:
                raise NotFound(f"server {url} is not configured")

    def record_server_run(self, url: str, failure: str | None, threshold: int, cooldown: float) -> float | None:
        """Count a finished run for the circuit breaker: a success resets the count; the `threshold`-th failure
        in a row quarantines the server for `cooldown` seconds (and starts the count again). Returns the end of
        a quarantine this call began, else None."""
        # The common case, a success after a success: a read, not a write transaction per task.
        if failure is None and self.db.execute("SELECT failures FROM servers WHERE url = ?",
                                               (url,)).fetchone() in (None, (0,)):
            return None
        with self.write() as conn:
            if failure is None:
                conn.execute("UPDATE servers SET failures = 0 WHERE url = ?", (url,))
                return None
            row = conn.execute("UPDATE servers SET failures = failures + 1 WHERE url = ? RETURNING failures",
                               (url,)).fetchone()
            if row is None or row[0] < threshold:
                return None
            # Its start is read once the write lock is ours: every claim stamped later (claims read the clock in
            # their transaction) sees the quarantine.
            until = time.time() + cooldown
            conn.execute("UPDATE servers SET failures = 0, quarantined_until = ?, quarantine_reason = ? WHERE url = ?",
                         (until, f"its last {row[0]} tasks failed; the last one: {failure}"[:500], url))
            return until

    def quarantine(self, url: str) -> tuple[float, str] | None:
        """(until, reason) while the server is quarantined, else None."""
        row = self.db.execute("SELECT quarantined_until, quarantine_reason FROM servers WHERE url = ?",
                              (url,)).fetchone()
        return (row[0], row[1] or "") if row and row[0] and row[0] > time.time() else None

    def run_durations(self, workflow: str, limit: int = 200) -> list[float]:
        """Seconds from execution start to finish of the workflow's latest succeeded tasks, newest first."""
        rows = self.db.execute(
            "SELECT finished_at - started_at FROM tasks WHERE workflow = ? AND status = 'succeeded' AND "
            "started_at IS NOT NULL AND finished_at >= started_at ORDER BY finished_at DESC LIMIT ?",
            (workflow, limit)).fetchall()
        return [float(r[0]) for r in rows]

    def run_durations_by_server(self, workflow: str, limit: int = 200) -> dict[str, list[float]]:
        """run_durations of the workflow's latest succeeded tasks, grouped by the server that ran them."""
        rows = self.db.execute(
            "SELECT server, finished_at - started_at FROM tasks WHERE workflow = ? AND status = 'succeeded' AND "
            "started_at IS NOT NULL AND finished_at >= started_at ORDER BY finished_at DESC LIMIT ?",
            (workflow, limit)).fetchall()
        found: dict[str, list[float]] = {}
        for server, seconds in rows:
            found.setdefault(server, []).append(float(seconds))
        return found

    def batch_routes(self, batch_id: int) -> list[str | None]:
        """The distinct server lists (comma-separated; None: any server) of a batch's queued tasks."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT servers FROM tasks WHERE batch_id = ? AND "
                                              "status = 'queued'", (batch_id,)).fetchall()]

    def server_draining(self, url: str) -> bool:
        row = self.db.execute("SELECT draining FROM servers WHERE url = ?", (url,)).fetchone()
        return bool(row and row[0])

    def transition(self, task_id: int, status: TaskStatus, from_statuses: Iterable[str],
                   detail: str | None = None, *, run: str | None = None, **fields: Any) -> bool:
        """Set a task's status if it is currently in one of `from_statuses` (and, with `run`, still on the run
        with that prompt_id: a late decision about an earlier run never touches the next); record the event."""
        now = time.time()
        fields = {**fields, "status": status.value, "updated_at": now}
        if status == TaskStatus.RUNNING:
            fields.setdefault("started_at", now)
        if status in FINAL_STATUSES:
            fields.setdefault("finished_at", now)
        if status == TaskStatus.QUEUED:
            fields.update(server=None, prompt_id=None, progress_value=None, progress_max=None)
        froms = [str(s) for s in from_statuses]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.write() as conn:
            cur = conn.execute(
                f"UPDATE tasks SET {sets} WHERE id = ? AND status IN ({','.join('?' * len(froms))})"
                + (" AND prompt_id = ?" if run is not None else ""),
                [*fields.values(), task_id, *froms, *([run] if run is not None else [])])
            if cur.rowcount != 1:
                return False
            conn.execute(
                "INSERT INTO events (task_id, batch_id, status, at, detail) "
                "SELECT id, batch_id, ?, ?, ? FROM tasks WHERE id = ?", (status.value, now, detail, task_id))
        return True

    def record_running(self, task_id: int, started_at: float, value: int | None = None,
                       maximum: int | None = None) -> bool:
        """One write for what a page shows of a running task: `submitted` -> `running` (its start time and
        event) merged with its latest progress; for a task already running, just the progress. False when the
        task is no longer in flight."""
        now = time.time()
        with self.write() as conn:
            row = conn.execute("SELECT status, batch_id FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None or row[0] not in IN_FLIGHT:
                return False
            conn.execute("UPDATE tasks SET status = 'running', started_at = COALESCE(started_at, ?), "
                         "progress_value = COALESCE(?, progress_value), progress_max = COALESCE(?, progress_max), "
                         "updated_at = ? WHERE id = ?", (started_at, value, maximum, now, task_id))
            if row[0] == TaskStatus.SUBMITTED.value:
                conn.execute("INSERT INTO events (task_id, batch_id, status, at) VALUES (?, ?, 'running', ?)",
                             (task_id, row[1], started_at))
        return True

    def set_progress(self, task_id: int, value: int, maximum: int) -> None:
        with self.write() as conn:
            conn.execute("UPDATE tasks SET progress_value = ?, progress_max = ?, updated_at = ? "
                         "WHERE id = ? AND status IN ('submitted', 'running')", (value, maximum, time.time(), task_id))

    def set_graph(self, task_id: int, graph: dict[str, Any]) -> None:
        with self.write() as conn:
            conn.execute("UPDATE tasks SET graph = ? WHERE id = ?", (json.dumps(graph, ensure_ascii=False), task_id))

    def complete_task(self, task_id: int, images: list[dict[str, Any]], started_at: float | None = None,
                      steps: int | None = None, prompt_id: str | None = None) -> bool:
        """Record the images and mark the task succeeded, in one transaction. Images already recorded
        (same task, node, index) are kept as they are, so collecting a task twice never duplicates.
        `started_at`: when its execution started, for a task that finished before its `running` was written
        (record_running): the start time and the `running` event are written here, in the same transaction.
        `steps`: its sampler steps, when its progress was never written (a short run): it shows steps/steps.
        Returns False for a task no longer in flight (nothing written), or, with `prompt_id`, no longer in flight
        as that prompt (requeued and claimed again meanwhile).

        Group-committed with other completions and claims (`_group_write`)."""
        now = time.time()
        return bool(self._group_write(
            lambda conn: self._complete_one(conn, task_id, images, started_at, steps, now, prompt_id)))

    @staticmethod
    def _complete_one(conn: sqlite3.Connection, task_id: int, images: list[dict[str, Any]],
                      started_at: float | None, steps: int | None, now: float, prompt_id: str | None) -> bool:
        # Four statements: the check (nothing is written for a task no longer in flight), the update, the
        # images, and the events. (UPDATE ... RETURNING would save the read but costs 4x a plain update here.)
        row = conn.execute("SELECT status, batch_id, started_at, prompt_id FROM tasks WHERE id = ?",
                           (task_id,)).fetchone()
        if row is None or row[0] not in IN_FLIGHT or (prompt_id is not None and row[3] != prompt_id):
            return False
        batch_id, started = row[1], row[2]
        conn.execute(
            "UPDATE tasks SET status = 'succeeded', finished_at = :now, updated_at = :now, error = NULL, "
            "started_at = COALESCE(started_at, :started), progress_max = COALESCE(progress_max, :steps), "
            "progress_value = COALESCE(progress_max, :steps, progress_value) WHERE id = :id",
            {"now": now, "started": started_at, "steps": steps, "id": task_id})
        if images:
            conn.executemany(
                "INSERT OR IGNORE INTO images (task_id, batch_id, node_id, idx, path, filename, subfolder, type, "
                "width, height, mode, size_bytes, created_at, remote_state) VALUES (:task_id, :batch_id, :node_id, "
                ":idx, :path, :filename, :subfolder, :type, :width, :height, :mode, :size_bytes, :created_at, "
                ":remote_state)",
                [{**img, "task_id": task_id, "created_at": now, "remote_state": img.get("remote_state")}
                 for img in images])
        if started_at is not None and started is None:  # its `running` was never written: recorded here
            conn.execute("INSERT INTO events (task_id, batch_id, status, at) VALUES (?, ?, 'running', ?), "
                         "(?, ?, 'succeeded', ?)", (task_id, batch_id, started_at, task_id, batch_id, now))
        else:
            conn.execute("INSERT INTO events (task_id, batch_id, status, at) VALUES (?, ?, 'succeeded', ?)",
                         (task_id, batch_id, now))
        return True

    def image_exists(self, task_id: int, node_id: str, idx: int) -> bool:
        return self.db.execute("SELECT 1 FROM images WHERE task_id = ? AND node_id = ? AND idx = ?",
                               (task_id, node_id, idx)).fetchone() is not None

    def request_cancel(self, task_ids: Iterable[int]) -> tuple[list[int], list[dict[str, Any]]]:
        """Cancel queued tasks at once; flag in-flight ones. Returns (cancelled ids, in-flight task rows)."""
        ids = list(task_ids)
        cancelled = [i for i in ids if self.transition(i, TaskStatus.CANCELLED, [TaskStatus.QUEUED])]
        in_flight = []
        for i in ids:
            with self.write() as conn:
                cur = conn.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)",
                                   (i, *IN_FLIGHT))
            if cur.rowcount:
                in_flight.append(self.get_task(i))
        return cancelled, in_flight

    def retry(self, task_ids: Iterable[int]) -> list[int]:
        """Put failed or cancelled tasks back in the queue with a fresh attempt count."""
        return [i for i in task_ids if self.transition(
            i, TaskStatus.QUEUED, [TaskStatus.FAILED, TaskStatus.CANCELLED], detail="retry",
            attempts=0, error=None, cancel_requested=0, finished_at=None, started_at=None)]

    def set_priority(self, task_ids: Iterable[int], priority: int) -> int:
        ids = list(task_ids)
        with self.write() as conn:
            return conn.execute(f"UPDATE tasks SET priority = ? WHERE id IN ({','.join('?' * len(ids))})",
                                [priority, *ids]).rowcount if ids else 0

    def set_picked(self, image_ids: Iterable[int], picked: bool) -> int:
        """Star (or unstar) images; ids that do not exist are skipped. Returns how many rows changed."""
        ids = sorted({int(i) for i in image_ids})
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self.write() as conn:
            if picked:
                return conn.execute(f"INSERT OR IGNORE INTO picks (image_id, picked_at) SELECT id, ? FROM images "
                                    f"WHERE id IN ({marks})", [time.time(), *ids]).rowcount
            return conn.execute(f"DELETE FROM picks WHERE image_id IN ({marks})", ids).rowcount

    # -- reads ------------------------------------------------------------------------------------
    def get_task(self, task_id: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"task {task_id} does not exist")
        return self._task(row)

    def _task(self, row: tuple[Any, ...]) -> dict[str, Any]:
        """A `SELECT * FROM tasks` row as a dict, JSON columns decoded."""
        return _decode(dict(zip(self.columns("tasks"), row, strict=True)))

    def task_head(self, task_id: int) -> dict[str, Any] | None:
        """id, batch_id, status and prompt_id of a task (None if there is none): the collector's check, without
        reading and decoding its graph."""
        row = self.db.execute("SELECT id, batch_id, status, prompt_id FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return dict(zip(("id", "batch_id", "status", "prompt_id"), row, strict=True)) if row else None

    def task_by_prompt_id(self, prompt_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT id FROM tasks WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return self.get_task(row[0]) if row else None

    def columns(self, table: str) -> list[str]:
        """A table's column names, read once (the schema only changes in migrate(), before any read)."""
        names = self._columns.get(table)
        if names is None:
            names = self._columns[table] = [c.name for c in self.db[table].columns]  # type: ignore[union-attr]
        return names

    def orphaned_tasks(self) -> list[dict[str, Any]]:
        """In-flight tasks on a server that is disabled or no longer configured."""
        sql = ("SELECT id FROM tasks WHERE status IN (?, ?) AND server NOT IN (SELECT url FROM servers WHERE "
               "enabled = 1) ORDER BY id")
        return [self.get_task(r[0]) for r in self.db.execute(sql, IN_FLIGHT).fetchall()]

    def in_flight_tasks(self, server: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id FROM tasks WHERE status IN (?, ?)" + (" AND server = ?" if server else "") + " ORDER BY id"
        args = [*IN_FLIGHT, server] if server else list(IN_FLIGHT)
        return [self.get_task(r[0]) for r in self.db.execute(sql, args).fetchall()]

    def in_flight_count(self, server: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM tasks WHERE server = ? AND status IN (?, ?)",
                                   (server, *IN_FLIGHT)).fetchone()[0])

    def requeue_lost(self, task: dict[str, Any], reason: str, max_attempts: int, spend_attempt: bool = True
                     ) -> TaskStatus | None:
        """A task whose prompt its server lost (restart, outage, a local backend that died): back to the queue,
        or failed once its attempts are used up. `spend_attempt=False` gives the attempt back (the prompt was
        stopped by us, not by its own doing). Returns the new status, or None if the task was no longer in flight."""
        if spend_attempt and task["attempts"] >= max_attempts:
            status, fields = TaskStatus.FAILED, {"error": reason}
        else:
            status, fields = TaskStatus.QUEUED, {"error": reason}
            if not spend_attempt:
                fields["attempts"] = max(task["attempts"] - 1, 0)
        return status if self.transition(task["id"], status, IN_FLIGHT, detail=reason[:500],
                                         run=task["prompt_id"], **fields) else None

    def release_in_flight(self, server: str, reason: str, max_attempts: int, keep: Container[str] = (),
                          spend_attempt: bool = True) -> int:
        """`requeue_lost` for every task in flight on `server` except the prompts in `keep` (being collected).
        Returns how many were requeued or failed."""
        return sum(self.requeue_lost(task, f"{server}: {reason}", max_attempts, spend_attempt) is not None
                   for task in self.in_flight_tasks(server) if task["prompt_id"] not in keep)

    def cancel_requested_ids(self, server: str) -> list[int]:
        return self.cancel_requests().get(server, [])

    def cancel_requests(self) -> dict[str, list[int]]:
        """server -> the ids of its in-flight tasks whose cancel was asked for (every server, one read)."""
        found: dict[str, list[int]] = {}
        for server, task_id in self.db.execute(
                "SELECT server, id FROM tasks WHERE cancel_requested = 1 AND status IN (?, ?) ORDER BY id", IN_FLIGHT):
            found.setdefault(server, []).append(task_id)
        return found

    def counts(self, batch_id: int | None = None) -> dict[str, int]:
        sql = "SELECT status, COUNT(*) FROM tasks" + (" WHERE batch_id = ?" if batch_id is not None else "")
        rows = self.db.execute(sql + " GROUP BY status", [batch_id] if batch_id is not None else []).fetchall()
        return {status: n for status, n in sorted(rows)}

    def has_pending_work(self) -> bool:
        return self.db.execute(f"SELECT 1 FROM tasks WHERE status IN ({','.join('?' * len(UNFINISHED))}) LIMIT 1",
                               UNFINISHED).fetchone() is not None

    def get_batch(self, batch_id: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"batch {batch_id} does not exist")
        return dict(zip(self.columns("batches"), row, strict=True))

    def list_batches(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM batches ORDER BY id DESC LIMIT ?", [limit]))

    def task_ids(self, batch_id: int | None = None, statuses: Iterable[str] | None = None) -> list[int]:
        where, args = _where(batch_id=batch_id, statuses=statuses)
        return [r[0] for r in self.db.execute(f"SELECT id FROM tasks {where} ORDER BY id", args).fetchall()]

    def list_tasks(self, batch_id: int | None = None, statuses: Iterable[str] | None = None,
                   workflow: str | None = None, text: str | None = None, limit: int = 50, offset: int = 0,
                   newest_first: bool = True, person: str | None = None) -> list[dict[str, Any]]:
        where, args = _where(batch_id=batch_id, statuses=statuses, workflow=workflow, text=text,
                             fts=self.has_fts, person=person)
        order = "DESC" if newest_first else "ASC"
        rows = self.db.query(f"SELECT * FROM tasks {where} ORDER BY id {order} LIMIT ? OFFSET ?",
                             [*args, limit, offset])
        return [_decode(r) for r in rows]

    def count_tasks(self, **filters: Any) -> int:
        where, args = _where(**filters, fts=self.has_fts)
        return int(self.db.execute(f"SELECT COUNT(*) FROM tasks {where}", args).fetchone()[0])

    def images_for_task(self, task_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM images WHERE task_id = ? ORDER BY node_id, idx", [task_id]))

    def images_for_batch(self, batch_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM images WHERE batch_id = ? ORDER BY task_id, node_id, idx",
                                  [batch_id]))

    def events(self, task_id: int | None = None, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE id > ?" + (" AND task_id = ?" if task_id is not None else "")
        args: list[Any] = [after_id] + ([task_id] if task_id is not None else [])
        return list(self.db.query(sql + " ORDER BY id LIMIT ?", [*args, limit]))

    # -- object storage uploads -------------------------------------------------------------------
    def claim_uploads(self, claim: str, key_for: Callable[[dict[str, Any]], str], limit: int = 1,
                      claim_seconds: float = 300.0, batch_id: int | None = None, now: float | None = None
                      ) -> list[dict[str, Any]]:
        """Atomically take up to `limit` images due for upload (pending and due, or claimed by someone whose
        claim ran out) and mark them uploading under `claim`. A row's key is set once, by `key_for(row)`
        (the row has the batch's `batch_created_at`), and kept for every later attempt."""
        now = time.time() if now is None else now
        batch = " AND i.batch_id = ?" if batch_id is not None else ""
        with self.write() as conn:
            cur = conn.execute(
                "SELECT i.*, b.created_at AS batch_created_at FROM images i JOIN batches b ON b.id = i.batch_id "
                "WHERE i.remote_state IN ('pending', 'uploading') AND ((i.remote_state = 'pending' AND "
                "COALESCE(i.remote_next_at, 0) <= ?) OR (i.remote_state = 'uploading' AND i.remote_claim_until < ?))"
                f"{batch} ORDER BY i.id LIMIT ?", [now, now, *([batch_id] if batch_id is not None else []), limit])
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            for row in rows:
                row["remote_key"] = row["remote_key"] or key_for(row)
                row["remote_claim"] = claim
                conn.execute("UPDATE images SET remote_state = 'uploading', remote_key = ?, remote_claim = ?, "
                             "remote_claim_until = ? WHERE id = ?", (row["remote_key"], claim, now + claim_seconds,
                                                                     row["id"]))
        return rows

    def finish_upload(self, image_id: int, claim: str, state: str, *, etag: str | None = None,
                      error: str | None = None, sent: bool = False, next_at: float | None = None) -> bool:
        """End a claimed upload: `stored` (with its ETag), `pending` again (retried from `next_at`) or
        `failed`. `sent`: an upload request may have reached the store (counted in remote_attempts). False
        when the claim is no longer ours (it ran out and another uploader took the image)."""
        assert state in ("stored", "pending", "failed")
        now = time.time()
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE images SET remote_state = ?, remote_etag = COALESCE(?, remote_etag), remote_error = ?, "
                "remote_attempts = remote_attempts + ?, remote_next_at = ?, remote_claim = NULL, "
                "remote_claim_until = NULL, uploaded_at = CASE WHEN ? = 'stored' THEN ? ELSE uploaded_at END "
                "WHERE id = ? AND remote_state = 'uploading' AND remote_claim = ?",
                (state, etag, error, int(sent), next_at, state, now, image_id, claim))
        return cur.rowcount == 1

    def queue_uploads(self, batch_id: int | None = None) -> int:
        """Mark for upload every image not in the store yet (never queued, or failed: attempts start again).
        Returns how many were queued."""
        batch = " AND batch_id = ?" if batch_id is not None else ""
        with self.write() as conn:
            return conn.execute(
                "UPDATE images SET remote_state = 'pending', remote_error = NULL, remote_attempts = 0, "
                f"remote_next_at = NULL WHERE (remote_state IS NULL OR remote_state = 'failed'){batch}",
                [batch_id] if batch_id is not None else []).rowcount

    def mark_local_deleted(self, image_id: int) -> None:
        with self.write() as conn:
            conn.execute("UPDATE images SET local_deleted_at = ? WHERE id = ?", (time.time(), image_id))

    def upload_counts(self, batch_id: int | None = None) -> dict[str, int]:
        """Images by remote state ("local" for images never queued for the store)."""
        sql = "SELECT COALESCE(remote_state, 'local'), COUNT(*) FROM images"
        sql += " WHERE batch_id = ?" if batch_id is not None else ""
        rows = self.db.execute(sql + " GROUP BY 1", [batch_id] if batch_id is not None else []).fetchall()
        return {state: n for state, n in sorted(rows)}

    def last_upload_error(self) -> str | None:
        """The error of the most recently failed or retried upload still waiting (or failed)."""
        row = self.db.execute("SELECT remote_error FROM images WHERE remote_state IN ('pending', 'uploading', "
                              "'failed') AND remote_error IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def uploads_due(self, now: float | None = None) -> bool:
        """Whether an image could be claimed for upload now."""
        now = time.time() if now is None else now
        return self.db.execute(
            "SELECT 1 FROM images WHERE remote_state IN ('pending', 'uploading') AND ((remote_state = 'pending' "
            "AND COALESCE(remote_next_at, 0) <= ?) OR (remote_state = 'uploading' AND remote_claim_until < ?)) "
            "LIMIT 1", (now, now)).fetchone() is not None

    def has_upload_queue(self) -> bool:
        """Whether any image waits for upload or is being uploaded."""
        return self.db.execute("SELECT 1 FROM images WHERE remote_state IN ('pending', 'uploading') LIMIT 1"
                               ).fetchone() is not None

    # -- servers, uploads, lease ------------------------------------------------------------------
    def sync_servers(self, configured: Iterable[str], client_id_factory: Any) -> None:
        with self.write() as conn:
            for url in configured:
                conn.execute("INSERT OR IGNORE INTO servers (url, enabled, source, client_id, added_at) "
                             "VALUES (?, 1, 'config', ?, ?)", (url, client_id_factory(), time.time()))

    def add_server(self, url: str, client_id: str) -> None:
        with self.write() as conn:
            conn.execute("INSERT INTO servers (url, enabled, source, client_id, added_at) VALUES (?, 1, 'runtime', "
                         "?, ?) ON CONFLICT(url) DO UPDATE SET enabled = 1", (url, client_id, time.time()))

    def add_local_server(self, url: str, client_id: str) -> None:
        """A local backend's server (source 'local'); a user's enabled/disabled choice for it is kept."""
        with self.write() as conn:
            conn.execute("INSERT INTO servers (url, enabled, source, client_id, added_at) VALUES (?, 1, 'local', "
                         "?, ?) ON CONFLICT(url) DO UPDATE SET source = 'local'", (url, client_id, time.time()))

    def set_server_enabled(self, url: str, enabled: bool) -> None:
        with self.write() as conn:
            if conn.execute("UPDATE servers SET enabled = ? WHERE url = ?", (int(enabled), url)).rowcount != 1:
                raise NotFound(f"server {url} is not configured")

    def remove_server(self, url: str) -> None:
        with self.write() as conn:
            if conn.execute("DELETE FROM servers WHERE url = ?", (url,)).rowcount != 1:
                raise NotFound(f"server {url} is not configured")

    def servers(self, enabled_only: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT * FROM servers" + (" WHERE enabled = 1" if enabled_only else "") + " ORDER BY added_at, url"
        return list(self.db.query(sql))

    def set_server_health(self, url: str, health: dict[str, Any]) -> None:
        with self.write() as conn:
            conn.execute("UPDATE servers SET health = ?, health_at = ? WHERE url = ?",
                         (json.dumps(health), time.time(), url))

    def get_upload(self, server: str, sha256: str) -> str | None:
        row = self.db.execute("SELECT name FROM uploads WHERE server = ? AND sha256 = ?", (server, sha256)).fetchone()
        return row[0] if row else None

    def put_upload(self, server: str, sha256: str, name: str) -> None:
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO uploads VALUES (?, ?, ?)", (server, sha256, name))

    def acquire_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take or renew the named lease; False while another live owner holds it."""
        now = time.time()
        with self.write() as conn:
            row = conn.execute("SELECT owner, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if row and row[0] != owner and row[1] > now:
                return False
            conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                         (name, owner, now + seconds, os.getpid(), socket.gethostname()))
        return True

    def hold_server_leases(self, owner: str, seconds: float, urls: list[str]) -> tuple[list[str], int]:
        """One scheduler's lease round, in one transaction: renew its membership and the server leases it
        holds, then take free (absent or expired) leases of `urls` up to its share of them, ceil(servers /
        live schedulers). Returns (the urls whose leases it now holds, its share). A scheduler holding more
        than its share (another one started) releases the rest itself (release_lease), after stopping them."""
        now = time.time()
        until = now + seconds
        me = (os.getpid(), socket.gethostname())
        with self.write() as conn:
            conn.execute("DELETE FROM leases WHERE name LIKE ? AND expires_at <= ?", (MEMBER_LEASE + "%", now))
            conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                         (MEMBER_LEASE + owner, owner, until, *me))
            held = {r[0][len(SERVER_LEASE):] for r in conn.execute(
                "UPDATE leases SET expires_at = ? WHERE owner = ? AND name LIKE ? RETURNING name",
                (until, owner, SERVER_LEASE + "%"))}
            members = conn.execute("SELECT COUNT(*) FROM leases WHERE name LIKE ? AND expires_at > ?",
                                   (MEMBER_LEASE + "%", now)).fetchone()[0]
            share = -(-len(urls) // max(members, 1))
            busy = {r[0][len(SERVER_LEASE):] for r in conn.execute(
                "SELECT name FROM leases WHERE name LIKE ? AND expires_at > ?", (SERVER_LEASE + "%", now))}
            for url in urls:
                if len(held & set(urls)) >= share:
                    break
                if url not in busy and url not in held:
                    conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                                 (SERVER_LEASE + url, owner, until, *me))
                    held.add(url)
        return [u for u in urls if u in held] + sorted(held - set(urls)), share

    def server_feeders(self) -> dict[str, dict[str, Any]]:
        """url -> {owner, pid, host} of the scheduler process holding each live server lease."""
        return {r[0][len(SERVER_LEASE):]: {"owner": r[1], "pid": r[2], "host": r[3]} for r in self.db.execute(
            "SELECT name, owner, pid, host FROM leases WHERE name LIKE ? AND expires_at > ?",
            (SERVER_LEASE + "%", time.time()))}

    def release_lease(self, name: str, owner: str) -> None:
        with self.write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def release_leases(self, owner: str) -> None:
        """Every lease of `owner` (a scheduler stopping)."""
        with self.write() as conn:
            conn.execute("DELETE FROM leases WHERE owner = ?", (owner,))

    def lease_holder(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM leases WHERE name = ? AND expires_at > ?", [name, time.time()]))
        return rows[0] if rows else None




def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for key in _JSON_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row


def filter_clauses(batch_id: int | None = None, statuses: Iterable[str] | None = None, workflow: str | None = None,
                   text: str | None = None, fts: bool = False, alias: str = "", person: str | None = None
                   ) -> tuple[list[str], list[Any]]:
    """SQL conditions for the task filters the UI and API offer; `alias` prefixes columns (e.g. "t.").
    Prompt search uses the trigram index for 3+ characters when SQLite has it, else LIKE. `person`: only
    batches that person submitted."""
    clauses: list[str] = []
    args: list[Any] = []
    if person is not None:
        clauses.append(f"{alias}batch_id IN (SELECT id FROM batches WHERE submitted_by = ?)")
        args.append(person)
    if batch_id is not None:
        clauses.append(f"{alias}batch_id = ?")
        args.append(batch_id)
    statuses = [str(s) for s in statuses or []]
    if statuses:
        clauses.append(f"{alias}status IN ({','.join('?' * len(statuses))})")
        args.extend(statuses)
    if workflow:
        clauses.append(f"{alias}workflow = ?")
        args.append(workflow)
    if text and text.strip():
        text = text.replace("\x00", "").strip()  # FTS5 reads a NUL as the end of its query
        if fts and len(text) >= 3:
            clauses.append(f"{alias}id IN (SELECT rowid FROM tasks_fts WHERE tasks_fts MATCH ?)")
            args.append('"' + text.replace('"', '""') + '"')
        else:
            clauses.append(f"{alias}prompt LIKE ? ESCAPE '\\'")
            args.append("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    return clauses, args


def _where(**filters: Any) -> tuple[str, list[Any]]:
    clauses, args = filter_clauses(**filters)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
