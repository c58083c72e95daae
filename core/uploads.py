"""Uploading saved images to object storage: claim, upload, verify, record. No threads of its own: the
leader scheduler runs `Uploader.run` on one thread (core.scheduler), and `python -m core storage sync`
calls `upload_next` in the foreground. Both claim images through the store (BEGIN IMMEDIATE), so an image is
never uploaded by two of them at once, and its key is fixed at the first claim, so a retry overwrites the
same object rather than making a second one.

An image is written locally first (the scheduler does that); its row is then `pending`. Per image:

    claim (pending -> uploading) -> [retry only: HEAD; the object is already there with our MD5 -> stored]
      -> PUT the bytes unchanged, with Content-Type and Content-MD5 -> verify (ETag = MD5 of the bytes for a
      single-part PUT; a store whose ETag is not an MD5 is checked by size with a HEAD) -> stored
      -> with COMFYBATCH_S3_DELETE_LOCAL: thumbnail made, then the local file deleted

When the store is unreachable or refuses us (no bucket, bad credentials), the image goes back to `pending`
(no attempt spent unless the request may have reached the store) and `StorageError` propagates: the loop
waits with exponential backoff, `storage sync` stops and reports. A local file that vanished is `failed` at
once; an upload that does not verify is retried UPLOAD_ATTEMPTS times, then `failed`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from core import storage, thumbs
from core.config import Settings
from core.errors import NotFound, StorageError
from core.store import Store

log = logging.getLogger(__name__)
UPLOAD_ATTEMPTS = 5  # uploads of one image that did not verify before it is marked failed
CLAIM_SECONDS = 300.0  # a claim older than this is presumed abandoned (its uploader died) and retaken
BACKOFF_FIRST = 0.5  # seconds to wait after the first failure to reach the store, doubled each time...
BACKOFF_MAX = 30.0  # ...up to this
IDLE_WAIT = 1.0  # seconds between looks at the queue when nothing woke the uploader


@dataclass(frozen=True)
class Outcome:
    image_id: int
    state: str  # stored, already (found in the store, not sent again), retry, failed
    key: str
    error: str | None = None


class Uploader:
    """Uploads one image per `upload_next` call. `objects` (an ObjectStore) is made from the settings unless
    given; `wake` is set by whoever records new images, to cut the idle wait short."""

    def __init__(self, settings: Settings, store: Store, objects: storage.ObjectStore | None = None,
                 wake: threading.Event | None = None):
        self.settings = settings
        self.store = store
        self._objects = objects
        self.wake = wake or threading.Event()
        self.failures = 0  # consecutive failures to reach the store
        self.last_error: str | None = None

    @property
    def objects(self) -> storage.ObjectStore:
        if self._objects is None:
            self._objects = storage.object_store(self.settings)
        return self._objects

    # -- one image ----------------------------------------------------------------------------------
    def upload_next(self, batch_id: int | None = None) -> Outcome | None:
        """Claim and upload one due image (of `batch_id` if given). None when nothing is due. Raises
        StorageError when the store cannot be used (the image is pending again)."""
        claim = uuid.uuid4().hex
        rows = self.store.claim_uploads(claim, self._key_for, 1, CLAIM_SECONDS, batch_id)
        return self.upload(rows[0], claim) if rows else None

    def _key_for(self, row: dict[str, Any]) -> str:
        return storage.object_key(self.settings, row["batch_id"], row["batch_created_at"], row["path"])

    def upload(self, row: dict[str, Any], claim: str) -> Outcome:
        image_id, key = row["id"], row["remote_key"]
        try:
            path = thumbs.source_path(self.settings.output_dir, row["path"])
            data = path.read_bytes()
        except (OSError, NotFound) as exc:
            error = f"the local file {row['path']} cannot be read ({type(exc).__name__}); nothing to upload"
            self.store.finish_upload(image_id, claim, "failed", error=error)
            log.warning("image %s: %s", image_id, error)
            return Outcome(image_id, "failed", key, error)
        md5 = storage.md5_hex(data)
        sent = False
        try:
            if row["remote_attempts"]:
                # An earlier upload may have landed before its answer was lost: do not send it twice.
                head = self.objects.head(key)
                if head is not None and self._verified(head.etag, head.size, md5, len(data)):
                    self._stored(row, claim, head.etag, path, sent=False)
                    return Outcome(image_id, "already", key)
            sent = True
            etag = self.objects.put(key, data, storage.content_type(path.name))
            verified = self._verified(etag, None, md5, len(data))
            if verified is None:  # not an MD5 ETag (some stores, encrypted objects): compare the size
                head = self.objects.head(key)
                verified = head is not None and head.size == len(data)
        except StorageError as exc:
            self.store.finish_upload(image_id, claim, "pending", error=str(exc), sent=sent and exc.maybe_delivered)
            raise
        if not verified:
            attempts = row["remote_attempts"] + 1
            error = f"the store's copy of {key} does not match the local file (ETag {etag}, MD5 {md5})"
            state = "failed" if attempts >= UPLOAD_ATTEMPTS else "pending"
            self.store.finish_upload(image_id, claim, state, error=error, sent=True,
                                     next_at=time.time() + _backoff(attempts))
            log.warning("image %s: %s (attempt %s of %s)", image_id, error, attempts, UPLOAD_ATTEMPTS)
            return Outcome(image_id, "failed" if state == "failed" else "retry", key, error)
        self._stored(row, claim, etag, path, sent=True)
        return Outcome(image_id, "stored", key)

    @staticmethod
    def _verified(etag: str, size: int | None, md5: str, length: int) -> bool | None:
        """True/False when the ETag is an MD5 (a single-part upload); else by size if known, else None."""
        if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower()):
            return etag.lower() == md5
        return None if size is None else size == length

    def _stored(self, row: dict[str, Any], claim: str, etag: str, path: Any, sent: bool) -> None:
        if not self.store.finish_upload(row["id"], claim, "stored", etag=etag, sent=sent):
            return  # our claim ran out and another uploader has the image: it records the outcome
        log.info("image %s stored as %s", row["id"], row["remote_key"])
        if self.settings.s3_delete_local:
            try:
                thumbs.ensure_thumb(self.settings.output_dir, row["path"])  # the gallery keeps its thumbnail
                path.unlink()
            except (OSError, NotFound) as exc:
                log.warning("image %s: local copy not deleted: %s", row["id"], exc)
                return
            self.store.mark_local_deleted(row["id"])

    # -- the loop -----------------------------------------------------------------------------------
    def loop_once(self, stop: threading.Event) -> Outcome | None:
        """One unit of work: upload one image, or wait (backoff after a failure, else until woken)."""
        try:
            outcome = self.upload_next()
        except StorageError as exc:
            self.failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
            if str(exc) != self.last_error:
                log.warning("object storage: %s; uploads wait and retry (next in %.1f s)", exc, delay)
            self.last_error = str(exc)
            stop.wait(delay)
            return None
        if self.failures:
            log.info("object storage answers again: uploads resume")
            self.failures, self.last_error = 0, None
        if outcome is None:
            self.wake.wait(IDLE_WAIT)
            self.wake.clear()
        return outcome

    def run(self, stop: threading.Event) -> None:
        """Upload until `stop` is set (whoever sets it also sets `wake`). Never dies: errors are logged."""
        while not stop.is_set():
            try:
                self.loop_once(stop)
            except Exception:
                log.exception("upload loop error")
                stop.wait(1.0)

    def busy(self) -> bool:
        """Uploads to do that the store lets us do now (False while it is unreachable)."""
        return self.failures == 0 and self.store.has_upload_queue()


def _backoff(attempts: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(attempts - 1, 0)))


def sync(settings: Settings, store: Store, batch_id: int | None = None,
         progress: Any = None) -> dict[str, int]:
    """Queue every image not yet in the store (of one batch, or all) and upload what is due, in the
    foreground. `progress(done, total)` is called after each image. Returns counts: queued (newly marked),
    stored (sent now), already (found in the store), failed, retry (will be retried), left (still pending,
    e.g. claimed by the running app's uploader). Raises StorageError when the store cannot be used."""
    uploader = Uploader(settings, store)
    uploader.objects.check()
    queued = store.queue_uploads(batch_id)
    counts = store.upload_counts(batch_id)
    total = counts.get("pending", 0) + counts.get("uploading", 0)
    result = {"queued": queued, "stored": 0, "already": 0, "failed": 0, "retry": 0}
    done = 0
    while True:
        try:
            outcome = uploader.upload_next(batch_id)
        except StorageError as exc:
            raise type(exc)(f"{exc} ({result['stored'] + result['already']} of {total} image(s) were stored before "
                            "that; the rest stay pending and are retried)", exc.code) from None
        if outcome is None:
            break
        result[outcome.state] += 1
        done += 1
        if progress is not None:
            progress(done, total)
    remaining = store.upload_counts(batch_id)
    result["left"] = remaining.get("pending", 0) + remaining.get("uploading", 0)
    return result
