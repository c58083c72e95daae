"""Object storage: the only module that imports boto3 / botocore. S3 and every S3-compatible store through
its S3 endpoint (Alibaba OSS, Tencent COS, MinIO, Cloudflare R2), configured by the COMFYBATCH_S3_* settings.

Owns: object keys (deterministic: prefix + the local file name, so a retried upload overwrites the same
object), one boto3 client per storage configuration (cached; clients are thread-safe), uploads of bytes as
they are (Content-MD5 sent, so the store checks them), HEAD, GET, presigned or public links, and the bucket
health check. Every botocore failure becomes a `StorageError` sentence with credentials blanked out.

boto3 is imported on first use, not with this module: it costs a quarter of a second, and most CLI commands
never touch the store. Side effects: network requests to the configured endpoint only. botocore's own
retries are off (the uploader owns retries and backoff, so one upload is never sent twice behind its back),
and its default CRC checksums are asked for only when an operation requires them: several S3-compatible
stores refuse the newer checksum headers that boto3 sends by default since 1.36.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import mimetypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from core.config import Settings
from core.errors import StorageError, StorageRejected, StorageUnavailable

CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the store
READ_TIMEOUT = 60.0  # seconds to wait for the store's answer (an upload of a large image included)
UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                     "RequestTimeTooSkewed"}


def object_key(settings: Settings, batch_id: int, batch_created_at: float, filename: str) -> str:
    """The key of an image: the prefix with `{batch}` (5 digits, like the local folder) and `{date}` (the
    batch's creation date, UTC) filled in, then the file name. Depends only on stored facts: deterministic."""
    date = dt.datetime.fromtimestamp(batch_created_at, dt.UTC).strftime("%Y-%m-%d")
    prefix = settings.s3_prefix.format(batch=f"{batch_id:05d}", date=date).strip("/")
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{prefix}/{name}" if prefix else name


def content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def where(settings: Settings) -> str:
    """The store as messages name it: bucket and endpoint (never a credential)."""
    endpoint = settings.s3_endpoint_url or f"AWS S3 ({settings.s3_region})"
    return f"bucket '{settings.s3_bucket}' at {endpoint}"


def public_link(settings: Settings, key: str) -> str:
    return f"{settings.s3_public_url.rstrip('/')}/{quote(key)}"


@dataclass(frozen=True)
class Head:
    etag: str  # without quotes
    size: int


class ObjectStore:
    """One bucket of one store, through a boto3 client made for these settings."""

    def __init__(self, settings: Settings):
        import boto3
        import botocore.config
        import botocore.exceptions

        self.settings = settings
        self.bucket = settings.s3_bucket
        self.exc = botocore.exceptions
        config = botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT, signature_version="s3v4",
            retries={"total_max_attempts": 1}, s3={"addressing_style": settings.s3_addressing_style},
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        credentials: dict[str, Any] = {}
        if settings.s3_access_key_id:
            credentials = {"aws_access_key_id": settings.s3_access_key_id,
                           "aws_secret_access_key": settings.s3_secret_access_key}
        # A Session of our own: boto3's default session is shared and not thread-safe.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region or None,
            config=config, **credentials)

    def put(self, key: str, data: bytes, media_type: str) -> str:
        """Upload `data` unchanged under `key`; returns the ETag (without quotes). For a single-part upload
        it is the MD5 of the bytes on AWS and the stores that follow it."""
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        with self._errors("upload", key):
            reply = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=media_type,
                                           ContentMD5=md5)
        return str(reply.get("ETag", "")).strip('"')

    def head(self, key: str) -> Head | None:
        """The object's ETag and size, or None when there is no such object."""
        try:
            reply = self.client.head_object(Bucket=self.bucket, Key=key)
        except self.exc.ClientError as exc:
            if _status(exc) == 404:  # a HEAD reply has no body: a missing bucket shows when we PUT
                return None
            raise self.translate(exc, "check", key) from None
        except self.exc.BotoCoreError as exc:
            raise self.translate(exc, "check", key) from None
        return Head(str(reply.get("ETag", "")).strip('"'), int(reply.get("ContentLength", 0)))

    def get(self, key: str) -> bytes:
        with self._errors("download", key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def presign(self, key: str) -> str:
        with self._errors("sign a link to", key):
            return str(self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.settings.s3_link_expiry))

    def check(self) -> None:
        """Raise StorageError unless the store answers and the bucket exists and may be used."""
        with self._errors("reach", None):
            self.client.head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        self.client.close()

    # -- errors -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        try:
            yield
        except (self.exc.ClientError, self.exc.BotoCoreError) as exc:
            raise self.translate(exc, action, key) from None  # `from None`: botocore's text stays out of logs

    def translate(self, exc: Exception, action: str, key: str | None) -> StorageError:
        """A botocore failure as a StorageError sentence: what we tried, on which bucket and endpoint, why."""
        what = f"cannot {action} " + (f"'{key}' in " if key else "") + where(self.settings)
        errors = self.exc
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
            code = str(error.get("Code") or "")
            status = _status(exc)
            message = str(error.get("Message") or "")
            if status >= 500 or code in UNAVAILABLE_CODES:
                return StorageUnavailable(self.redact(f"{what}: the store answered {status} {code} {message}"
                                                      .rstrip()), "unreachable", maybe_delivered=True)
            if code == "NoSuchBucket" or (status == 404 and key is None):
                return StorageRejected(self.redact(f"{what}: the bucket does not exist (create it, or fix "
                                                   "COMFYBATCH_S3_BUCKET / COMFYBATCH_S3_ENDPOINT_URL)"), "no_bucket")
            if status == 404:
                return StorageRejected(self.redact(f"{what}: the object does not exist"), "no_object")
            if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageRejected(self.redact(
                    f"{what}: access denied ({code or status}); check COMFYBATCH_S3_ACCESS_KEY_ID, "
                    "COMFYBATCH_S3_SECRET_ACCESS_KEY and the bucket's permissions"), "denied")
            return StorageRejected(self.redact(f"{what}: {code or status} {message}".rstrip()))
        if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
            return StorageRejected(f"{what}: no credentials; set COMFYBATCH_S3_ACCESS_KEY_ID and "
                                   "COMFYBATCH_S3_SECRET_ACCESS_KEY (environment or .streamlit/secrets.toml)",
                                   "no_credentials")
        if isinstance(exc, errors.EndpointConnectionError | errors.ConnectTimeoutError):
            return StorageUnavailable(self.redact(f"{what}: the store is unreachable ({type(exc).__name__})"),
                                      "unreachable")
        if isinstance(exc, errors.ReadTimeoutError | errors.ConnectionClosedError | errors.ConnectionError
                      | errors.HTTPClientError):
            return StorageUnavailable(self.redact(f"{what}: the connection failed ({type(exc).__name__})"),
                                      "unreachable", maybe_delivered=True)
        return StorageRejected(self.redact(f"{what}: {type(exc).__name__}: {exc}"))

    def redact(self, text: str) -> str:
        """Blank out the credentials wherever a store's message might have echoed them."""
        for secret in (self.settings.s3_secret_access_key, self.settings.s3_access_key_id):
            if secret:
                text = text.replace(secret, "***")
        return text


_stores: dict[tuple[Any, ...], ObjectStore] = {}
_stores_lock = threading.Lock()


def object_store(settings: Settings) -> ObjectStore:
    """The ObjectStore of these settings, made once per storage configuration (a client costs tens of ms)."""
    key = (settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region, settings.s3_addressing_style,
           settings.s3_access_key_id, settings.s3_secret_access_key, settings.s3_link_expiry)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            try:
                store = ObjectStore(settings)
            except Exception as exc:  # botocore refuses the configuration (e.g. an unknown region format)
                raise StorageRejected(f"cannot use {where(settings)}: {type(exc).__name__}") from None
            _stores[key] = store
        return store


def close_clients() -> None:
    """Close and forget every cached client (tests; a process that changes its storage settings)."""
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def _status(exc: Any) -> int:
    return int((exc.response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def link(settings: Settings, key: str) -> str:
    """The URL a browser opens for a stored object: presigned (expiring) or public, as configured."""
    if settings.s3_links == "public":
        return public_link(settings, key)
    return object_store(settings).presign(key)


def health(settings: Settings) -> dict[str, Any]:
    """Whether the store answers and the bucket exists: {"reachable", "bucket_exists", "error"}."""
    try:
        object_store(settings).check()
    except StorageUnavailable as exc:
        return {"reachable": False, "bucket_exists": None, "error": str(exc)}
    except StorageError as exc:
        return {"reachable": None if exc.code == "no_credentials" else True,
                "bucket_exists": False if exc.code == "no_bucket" else None, "error": str(exc)}
    return {"reachable": True, "bucket_exists": True, "error": None}


__all__ = ["Head", "ObjectStore", "StorageError", "close_clients", "content_type", "health", "link", "md5_hex",
           "object_key", "object_store", "public_link", "where"]
