"""Webhooks: a batch may name a URL (Submission.webhook, from the pages, the API or the CLI) that is called once
when every task of the batch is final. Everything lives in the database (migration 9), so a delivery survives
restarts: whichever process leads the scheduler runs `Deliverer.run` on one thread (core.scheduler starts it as
it starts the uploader) and picks up where the last leader stopped.

    submit -> register: webhooks row `waiting`
    Deliverer, every second:
      waiting, batch all final -> body frozen (JSON: batch, counts, results URL, image URLs) -> `pending`
      pending and due (or `sending` whose claim ran out: its process died mid-call) -> claimed `sending`
        -> POST body, headers X-ComfyBatch-Event / -Delivery / -Signature-256 (HMAC-SHA256 of the body keyed
           by COMFYBATCH_WEBHOOK_SECRET; no signature header when the secret is empty)
        -> 2xx: `delivered`; else `pending` again after COMFYBATCH_WEBHOOK_BACKOFF[attempt - 1] seconds, or
           `failed` once the schedule is spent. Every call is a webhook_attempts row (status code or error).

The body is frozen once, so every retry sends (and signs) the same bytes; a receiver de-duplicates by the
X-ComfyBatch-Delivery id. URLs in the body are absolute when COMFYBATCH_PUBLIC_URL is set, else paths of this
app. Image links are signed (core.access) so a receiver can fetch them without a token. The secret is never
written to the database, the log or an error: only the signature computed with it leaves this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Any

import requests

from core import access
from core.config import Settings
from core.errors import clip
from core.models import UNFINISHED
from core.store import Store

log = logging.getLogger(__name__)
EVENT = "batch.finished"
SIGNATURE_HEADER = "X-ComfyBatch-Signature-256"
CLAIM_SECONDS = 120.0  # a `sending` row older than this was abandoned by a process that died mid-call
CALL_TIMEOUT = (5.0, 20.0)  # connect, read
TICK = 1.0  # seconds between looks at the table when nothing woke the deliverer
MAX_IMAGES_IN_BODY = 10_000  # a body lists at most this many image URLs (`images_total` says how many exist)


def register(store: Store, batch_ids: list[int], url: str | None) -> None:
    """Record that each batch calls `url` when it is final (the URL was checked by core.intake)."""
    if not url:
        return
    now = time.time()
    with store.write() as conn:
        conn.executemany("INSERT OR IGNORE INTO webhooks (batch_id, url, state, created_at) "
                         "VALUES (?, ?, 'waiting', ?)", [(b, url.strip(), now) for b in batch_ids])


def first_calls_due(store: Store) -> bool:
    """Whether a finished batch's webhook has not been called even once yet (`worker --until-idle` waits for
    those; later retries wait for the next scheduler run)."""
    marks = ",".join("?" * len(UNFINISHED))
    return store.db.execute(
        f"SELECT 1 FROM webhooks w WHERE (w.state = 'pending' AND w.attempts = 0) OR (w.state = 'waiting' AND NOT "
        f"EXISTS (SELECT 1 FROM tasks t WHERE t.batch_id = w.batch_id AND t.status IN ({marks}))) LIMIT 1",
        list(UNFINISHED)).fetchone() is not None


def signature(secret: str, body: bytes) -> str:
    """The value of the signature header: 'sha256=' + hex HMAC-SHA256 of the body keyed by the secret."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def status(store: Store, batch_id: int) -> dict[str, Any] | None:
    """A batch's webhook as pages and the API show it (None when it has none): URL, state, attempts, the next
    try and every attempt made (newest last)."""
    row = store.db.execute("SELECT id, url, state, attempts, next_at, last_error, created_at, finished_at "
                           "FROM webhooks WHERE batch_id = ?", [batch_id]).fetchone()
    if row is None:
        return None
    keys = ("id", "url", "state", "attempts", "next_at", "last_error", "created_at", "finished_at")
    data = dict(zip(keys, row, strict=True))
    data["calls"] = [dict(zip(("attempt", "at", "status_code", "error", "seconds"), r, strict=True)) for r in
                     store.db.execute("SELECT attempt, at, status_code, error, seconds FROM webhook_attempts "
                                      "WHERE webhook_id = ? ORDER BY id LIMIT 100", [data["id"]]).fetchall()]
    return data


def body_for(settings: Settings, store: Store, batch_id: int) -> dict[str, Any]:
    """What the call says about a final batch."""
    batch = store.get_batch(batch_id)
    counts = store.counts(batch_id)
    base = settings.public_url
    images = store.images_for_batch(batch_id)
    return {"event": EVENT, "batch": {"id": batch_id, "name": batch["name"], "workflow": batch["workflow"],
                                      "source": batch.get("source"), "created_at": batch["created_at"]},
            "counts": counts, "total": sum(counts.values()),
            "results_url": f"{base}/api/v1/batches/{batch_id}/results.csv",
            "batch_url": f"{base}/api/v1/batches/{batch_id}",
            "images_total": len(images),
            "images": [{"id": i["id"], "task_id": i["task_id"], "url": base + access.image_url(settings, i["id"])}
                       for i in images[:MAX_IMAGES_IN_BODY]]}


class Deliverer:
    """Promotes finished batches' webhooks and makes due calls, one at a time. `session` is for tests."""

    def __init__(self, settings: Settings, store: Store, session: requests.Session | None = None):
        self.settings = settings
        self.store = store
        self.delays = settings.webhook_delays
        self.session = session or requests.Session()
        self.session.trust_env = False  # a webhook goes where its URL says, never through an env proxy

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.promote()
                while not stop.is_set() and self.deliver_next():
                    pass
            except Exception:
                log.exception("webhook delivery loop failed; trying again shortly")
            stop.wait(TICK)
        self.session.close()

    def promote(self, now: float | None = None) -> int:
        """Freeze the body of every waiting webhook whose batch is final and make it due now."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(UNFINISHED))
        ready = [r[0] for r in self.store.db.execute(
            f"SELECT w.batch_id FROM webhooks w WHERE w.state = 'waiting' AND NOT EXISTS (SELECT 1 FROM tasks t "
            f"WHERE t.batch_id = w.batch_id AND t.status IN ({marks}))", list(UNFINISHED)).fetchall()]
        for batch_id in ready:
            body = json.dumps(body_for(self.settings, self.store, batch_id), ensure_ascii=False,
                              separators=(",", ":"))
            with self.store.write() as conn:
                conn.execute("UPDATE webhooks SET state = 'pending', body = ?, next_at = ? WHERE batch_id = ? "
                             "AND state = 'waiting'", (body, now, batch_id))
        return len(ready)

    def deliver_next(self, now: float | None = None) -> bool:
        """Claim one due call and make it. False when nothing is due."""
        now = time.time() if now is None else now
        claim = uuid.uuid4().hex
        with self.store.write() as conn:
            row = conn.execute(
                "SELECT id, batch_id, url, body, attempts FROM webhooks WHERE (state = 'pending' AND next_at <= ?) "
                "OR (state = 'sending' AND claim_until < ?) ORDER BY next_at, id LIMIT 1", (now, now)).fetchone()
            if row is None:
                return False
            webhook_id, batch_id, url, body, attempts = row
            conn.execute("UPDATE webhooks SET state = 'sending', claim = ?, claim_until = ?, attempts = ? "
                         "WHERE id = ?", (claim, now + CLAIM_SECONDS, attempts + 1, webhook_id))
        self._call(webhook_id, batch_id, url, body.encode("utf-8"), attempts + 1, claim)
        return True

    def _call(self, webhook_id: int, batch_id: int, url: str, body: bytes, attempt: int, claim: str) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "ComfyBatch-Webhook/1",
                   "X-ComfyBatch-Event": EVENT, "X-ComfyBatch-Delivery": str(webhook_id),
                   "X-ComfyBatch-Attempt": str(attempt)}
        if self.settings.webhook_secret:
            headers[SIGNATURE_HEADER] = signature(self.settings.webhook_secret, body)
        started = time.monotonic()
        code: int | None = None
        error: str | None = None
        try:
            reply = self.session.post(url, data=body, headers=headers, timeout=CALL_TIMEOUT, allow_redirects=False)
            code = reply.status_code
            reply.close()
            if not 200 <= code < 300:
                error = f"the receiver answered HTTP {code}"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {clip(str(exc), 300)}"
        self._record(webhook_id, batch_id, attempt, claim, code, error, time.monotonic() - started)

    def _record(self, webhook_id: int, batch_id: int, attempt: int, claim: str, code: int | None,
                error: str | None, seconds: float) -> None:
        now = time.time()
        if error is None:
            state, next_at = "delivered", None
        elif attempt > len(self.delays):
            state, next_at = "failed", None
        else:
            state, next_at = "pending", now + self.delays[attempt - 1]
        with self.store.write() as conn:
            conn.execute("INSERT INTO webhook_attempts (webhook_id, attempt, at, status_code, error, seconds) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (webhook_id, attempt, now, code, error, round(seconds, 3)))
            conn.execute("UPDATE webhooks SET state = ?, next_at = ?, last_error = ?, claim = NULL, "
                         "claim_until = NULL, finished_at = ? WHERE id = ? AND claim = ?",
                         (state, next_at, error, now if next_at is None else None, webhook_id, claim))
        level = logging.INFO if error is None else logging.WARNING
        log.log(level, "webhook of batch %s, attempt %s: %s%s", batch_id, attempt, error or f"delivered (HTTP {code})",
                f"; next try in {self.delays[attempt - 1]:g} s" if state == "pending" else
                "; retries spent, giving up" if state == "failed" else "")


class WebhookThread:
    """The deliverer on its own thread while this process leads the scheduler: `start` and `stop` may be called
    every tick (each does nothing when already in that state)."""

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=Deliverer(self.settings, self.store).run, args=(self._stop,),
                                        name="comfybatch-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
