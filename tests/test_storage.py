"""Object storage: results uploaded to a real S3-compatible server (moto's, on 127.0.0.1, through real boto3),
byte for byte, exactly once per image, through outages and restarts; links (presigned, public) that serve
the same bytes; the backfill command; and credentials that never show up anywhere they could leak."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from api.files import image_response
from api.shapes import batch_json, image_json
from core import service, storage, uploads
from core.config import Settings
from core.errors import ConfigError, NotFound, StorageError
from core.scheduler import Scheduler
from core.store import Store
from core.users import LOCAL
from tests.support import (
    ROOT,
    S3_KEY_ID,
    S3_SECRET,
    S3Server,
    finish_next_task,
    make_settings,
    png,
    run_cli,
    submit_rows,
    wait_until,
    worker_env,
)

CREDENTIALS = (S3_KEY_ID, S3_SECRET)


def key_of(store: Store, batch_id: int, name: str, prefix: str = "comfybatch") -> str:
    """The object key an image of this batch gets with the default prefix (date = the batch's creation date)."""
    created = store.get_batch(batch_id)["created_at"]
    date = dt.datetime.fromtimestamp(created, dt.UTC).strftime("%Y-%m-%d")
    return f"{prefix}/{date}/batch-{batch_id:05d}/{name}"


def finished_batch(settings: Settings, store: Store, colors: list[int]) -> tuple[int, list[dict[str, Any]]]:
    """Play ComfyUI's and the scheduler's part: a batch whose tasks succeeded with one real PNG each, written
    locally and recorded as the scheduler records them (pending for upload when storage is on)."""
    batch_id, _ = store.create_batch("made here", "empty_image", [{"params": {"1.color": c}, "graph": {}}
                                                                   for c in colors])
    for color in colors:
        finish_next_task(settings, store, png(color, (24, 16)), "pending" if settings.storage_enabled else None)
    return batch_id, store.images_for_batch(batch_id)


def local_bytes(settings: Settings, images: list[dict[str, Any]], store: Store, batch_id: int) -> dict[str, bytes]:
    return {key_of(store, batch_id, Path(i["path"]).name): (settings.output_dir / i["path"]).read_bytes()
            for i in images}


@pytest.fixture
def engine(tmp_path: Path, s3: S3Server) -> Any:
    """Settings with object storage on (moto's bucket), no ComfyUI server, and their store."""
    settings = make_settings(tmp_path, [], **s3.settings())
    store = Store(settings.db_path)
    yield settings, store
    store.close()


# -- settings ---------------------------------------------------------------------------------------------
def test_credentials_come_from_secrets_toml_and_never_show_in_a_settings_repr(tmp_path):
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text(
        f'COMFYBATCH_S3_BUCKET = "renders"\nCOMFYBATCH_S3_ACCESS_KEY_ID = "{S3_KEY_ID}"\n'
        f'COMFYBATCH_S3_SECRET_ACCESS_KEY = "{S3_SECRET}/"\nCOMFYBATCH_S3_DELETE_LOCAL = true\n')
    settings = Settings.load(env={"COMFYBATCH_API_TOKENS": "tok-alpha,tok-beta"}, base_dir=tmp_path)
    assert (settings.storage_enabled, settings.s3_access_key_id, settings.s3_secret_access_key,
            settings.s3_delete_local, settings.api_tokens) == (True, S3_KEY_ID, S3_SECRET + "/", True,
                                                               ("tok-alpha", "tok-beta"))
    text = repr(settings) + str(settings)
    assert [s for s in (*CREDENTIALS, "tok-alpha", "tok-beta") if s in text] == []
    assert "s3_bucket='renders'" in text
    assert Settings.load(env={}, base_dir=tmp_path / "nowhere").storage_enabled is False  # off by default


@pytest.mark.parametrize(("env", "message"), [
    ({"COMFYBATCH_S3_LINKS": "signed"}, "COMFYBATCH_S3_LINKS: expected one of presigned, public, got 'signed'"),
    ({"COMFYBATCH_S3_ADDRESSING_STYLE": "host"},
     "COMFYBATCH_S3_ADDRESSING_STYLE: expected one of auto, virtual, path, got 'host'"),
    ({"COMFYBATCH_S3_LINK_EXPIRY": "700000"}, "COMFYBATCH_S3_LINK_EXPIRY: must be from 1 to 604800 seconds (7 "
                                              "days, the longest a presigned link can live), got 700000"),
    ({"COMFYBATCH_S3_DELETE_LOCAL": "maybe"}, "COMFYBATCH_S3_DELETE_LOCAL: expected true or false, got 'maybe'"),
    ({"COMFYBATCH_S3_PREFIX": "out/{user}"},
     "COMFYBATCH_S3_PREFIX: 'out/{user}' may use only the placeholders {batch} and {date}"),
    ({"COMFYBATCH_S3_PREFIX": "out/../up"}, "COMFYBATCH_S3_PREFIX: 'out/../up' must be a plain folder path (no "
                                            "'..', no backslashes, at most 500 characters)"),
    ({"COMFYBATCH_S3_ENDPOINT_URL": "minio:9000"}, "COMFYBATCH_S3_ENDPOINT_URL: 'minio:9000' is not an http(s) URL"),
    ({"COMFYBATCH_S3_ENDPOINT_URL": f"https://{S3_KEY_ID}:{S3_SECRET}@oss-cn-hangzhou.aliyuncs.com"},
     "COMFYBATCH_S3_ENDPOINT_URL: the URL must not contain a user name or password; set "
     "COMFYBATCH_S3_ACCESS_KEY_ID and COMFYBATCH_S3_SECRET_ACCESS_KEY instead"),
    ({"COMFYBATCH_S3_BUCKET": "renders", "COMFYBATCH_S3_LINKS": "public"},
     "COMFYBATCH_S3_PUBLIC_URL: required when COMFYBATCH_S3_LINKS is public (the base URL the bucket's objects are "
     "served from, e.g. https://my-bucket.oss-cn-hangzhou.aliyuncs.com)"),
    ({"COMFYBATCH_S3_BUCKET": "renders", "COMFYBATCH_S3_SECRET_ACCESS_KEY": S3_SECRET},
     "COMFYBATCH_S3_ACCESS_KEY_ID and COMFYBATCH_S3_SECRET_ACCESS_KEY: set both, or neither (boto3's own "
     "credential chain is used then)"),
])
def test_bad_storage_settings_name_the_setting_and_never_echo_a_credential(tmp_path, env, message):
    with pytest.raises(ConfigError) as err:
        Settings.load(env=env, base_dir=tmp_path)
    assert str(err.value) == message


def test_object_keys_are_deterministic_with_batch_and_date_placeholders(tmp_path):
    at = dt.datetime(2025, 1, 2, 23, 30, tzinfo=dt.UTC).timestamp()
    settings = make_settings(tmp_path, [])
    name = "batch-00042/task-000007_9_00.png"
    assert [storage.object_key(s, 42, at, name) for s in (
        settings, settings.with_overrides(s3_prefix=""), settings.with_overrides(s3_prefix="/renders/{batch}/"),
        settings.with_overrides(s3_prefix="team-a/{date}"))] == [
        "comfybatch/2025-01-02/batch-00042/task-000007_9_00.png", "task-000007_9_00.png",
        "renders/00042/task-000007_9_00.png", "team-a/2025-01-02/task-000007_9_00.png"]


# -- uploads, links, backfill (fast: images made here, a real S3 server) ----------------------------------
def test_sync_uploads_bytes_unchanged_and_presigned_links_serve_them(engine, s3):
    settings, store = engine
    batch_id, images = finished_batch(settings, store, [0xFF0000, 0x00FF00])
    expected = local_bytes(settings, images, store, batch_id)

    assert service.sync_storage(settings, store, batch_id) == {"queued": 0, "stored": 2, "already": 0, "failed": 0,
                                                               "retry": 0, "left": 0}
    assert s3.objects() == expected
    assert s3.puts() == {key: 1 for key in expected}
    client = s3.client()
    heads = [client.head_object(Bucket=s3.bucket, Key=k) for k in expected]
    client.close()
    assert [(h["ContentType"], h["ETag"].strip('"')) for h in heads] == [
        ("image/png", storage.md5_hex(data)) for data in expected.values()]
    rows = store.images_for_batch(batch_id)
    assert [(r["remote_state"], r["remote_key"], r["remote_etag"], r["remote_attempts"], r["remote_error"])
            for r in rows] == [("stored", k, storage.md5_hex(d), 1, None) for k, d in expected.items()]

    # Presigned links (API url, results CSV, gallery) download the very bytes.
    links = [service.image_link(settings, r) for r in rows]
    assert [requests.get(link, timeout=10).content for link in links] == list(expected.values())
    assert [link.split("?")[0] for link in links] == [f"{s3.url}/{s3.bucket}/{k}" for k in expected]
    shaped = image_json(settings, rows[0], lambda path: f"http://app/api/v1{path}")
    assert ({k: shaped[k] for k in ("local_url", "storage", "storage_key")}, shaped["url"].split("?")[0]) == (
        {"local_url": f"http://app/api/v1/images/{rows[0]['id']}", "storage": "stored",
         "storage_key": rows[0]["remote_key"]}, links[0].split("?")[0])
    csv_lines = service.results_csv_bytes(settings, store, batch_id).decode("utf-8-sig").splitlines()
    assert csv_lines[0].endswith(",error,images,image_urls,submitted_by")
    csv_links = [line.rsplit(",", 2)[1] for line in csv_lines[1:]]  # image_urls, then submitted_by
    assert [requests.get(link, timeout=10).content for link in csv_links] == list(expected.values())

    summary = service.batch_summary(store, batch_id)
    assert {k: summary[k] for k in ("images", "stored_remotely", "upload_pending", "upload_failed")} == {
        "images": 2, "stored_remotely": 2, "upload_pending": 0, "upload_failed": 0}
    api_batch = batch_json(store, batch_id, lambda path: path)
    assert (api_batch["stored_remotely"], api_batch["images"]) == (2, 2)
    # Nothing left to do: a second sync sends nothing.
    assert service.sync_storage(settings, store) == {"queued": 0, "stored": 0, "already": 0, "failed": 0,
                                                     "retry": 0, "left": 0}
    assert s3.puts() == {key: 1 for key in expected}


def test_public_links_are_the_public_base_url_and_the_key(engine):
    settings, store = engine
    batch_id, _ = finished_batch(settings, store, [0x0000FF])
    service.sync_storage(settings, store, batch_id)
    (row,) = store.images_for_batch(batch_id)
    public = settings.with_overrides(s3_links="public", s3_public_url="https://cdn.example.com/renders")
    assert service.image_link(public, row) == (f"https://cdn.example.com/renders/"
                                               f"{key_of(store, batch_id, 'task-000001_9_00.png')}")
    # Storage turned off again: links are the local routes (None here), the local file still serves.
    off = settings.with_overrides(s3_bucket="")
    assert (service.image_link(off, row), service.image_source(off, store, row["id"], False).redirect) == (None, None)


def test_two_uploaders_at_once_never_upload_an_image_twice(engine, s3):
    """The app's uploader and a `storage sync` may run together: each image is claimed by one of them."""
    settings, store = engine
    batch_id, images = finished_batch(settings, store, list(range(0, 0xFFFFFF, 0xFFFFFF // 16))[:16])
    results: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda: results.append(service.sync_storage(settings, store)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = local_bytes(settings, images, store, batch_id)
    assert (sum(r["stored"] for r in results), s3.puts(), s3.objects()) == (16, {k: 1 for k in expected}, expected)


def test_a_restarted_scheduler_resumes_pending_uploads(engine, s3, monkeypatch):
    """The store is down while the first scheduler runs (its uploader tries, fails, backs off); a second
    image was claimed by an uploader that died mid-upload (its claim ran out). After a restart of the
    scheduler with the store back, both are uploaded, once each."""
    monkeypatch.setattr(uploads, "BACKOFF_MAX", 0.5)
    settings, store = engine
    batch_id, images = finished_batch(settings, store, [0x112233, 0x445566])
    abandoned = store.claim_uploads("a-dead-uploader", lambda row: "ignored/key.png", 1, claim_seconds=0)
    assert [r["id"] for r in abandoned] == [images[0]["id"]]
    s3.stop()
    first = Scheduler(settings, store)
    first.start()
    wait_until(lambda: store.last_upload_error() is not None, 20, message="the uploader to meet the outage")
    first.stop()
    # The abandoned claim was taken over at once; the refused uploads spent no attempt.
    assert [(r["remote_state"], r["remote_attempts"]) for r in store.images_for_batch(batch_id)] == [
        ("pending", 0), ("pending", 0)]
    assert store.last_upload_error() == (f"cannot upload 'ignored/key.png' in bucket '{s3.bucket}' at {s3.url}: "
                                         "the store is unreachable (EndpointConnectionError)")

    s3.start()  # same port, same bucket
    second = Scheduler(settings, store)
    second.start()
    try:
        wait_until(lambda: store.upload_counts(batch_id) == {"stored": 2}, 30, message="uploads to resume")
    finally:
        second.stop()
    objects = s3.objects()
    # The dead uploader's claim had already fixed the first image's key: it is kept.
    assert sorted(objects) == sorted(["ignored/key.png", key_of(store, batch_id, "task-000002_9_00.png")])
    assert (s3.puts(), [r["remote_attempts"] for r in store.images_for_batch(batch_id)]) == (
        {k: 1 for k in objects}, [1, 1])


def test_delete_local_after_a_verified_upload_keeps_thumbnails_links_and_zips(engine, s3):
    settings, store = engine
    settings = settings.with_overrides(s3_delete_local=True)
    batch_id, images = finished_batch(settings, store, [0xABCDEF])
    original = (settings.output_dir / images[0]["path"]).read_bytes()
    service.sync_storage(settings, store, batch_id)
    (row,) = store.images_for_batch(batch_id)
    assert (row["remote_state"], (settings.output_dir / row["path"]).exists(), row["local_deleted_at"] is not None
            ) == ("stored", False, True)

    thumb = service.image_source(settings, store, row["id"], thumbnail=True)
    assert (thumb.path is not None and thumb.path.is_file(), thumb.media_type) == (True, "image/webp")
    full = service.image_source(settings, store, row["id"], thumbnail=False)
    assert full.redirect is not None and requests.get(full.redirect, timeout=10).content == original
    response = image_response(settings, store, row["id"], False, LOCAL)
    assert (response.status_code, response.headers["location"].split("?")[0]) == (
        307, f"{s3.url}/{s3.bucket}/{row['remote_key']}")
    with zipfile.ZipFile(io.BytesIO(service.zip_bytes(settings, [row]))) as zf:
        assert {n: zf.read(n) for n in zf.namelist()} == {row["path"]: original}

    off = settings.with_overrides(s3_bucket="")
    with pytest.raises(NotFound) as err:
        service.image_source(off, store, row["id"], thumbnail=False)
    assert str(err.value) == (f"image {row['id']}: its local file was deleted after it was uploaded to object "
                              "storage, which is not configured now (set COMFYBATCH_S3_BUCKET and the other "
                              "COMFYBATCH_S3_* settings as they were)")


def test_unreachable_or_misconfigured_store_is_one_sentence_without_credentials(engine, s3, caplog):
    settings, store = engine
    caplog.set_level(logging.DEBUG, logger="core")
    batch_id, _ = finished_batch(settings, store, [0x010203])
    missing = settings.with_overrides(s3_bucket="no-such-bucket-here")
    with pytest.raises(StorageError) as err:
        service.sync_storage(missing, store)
    assert (str(err.value), err.value.code) == (
        f"cannot reach bucket 'no-such-bucket-here' at {s3.url}: the bucket does not exist (create it, or fix "
        "COMFYBATCH_S3_BUCKET / COMFYBATCH_S3_ENDPOINT_URL)", "no_bucket")
    assert service.storage_status(missing, store) == {
        "enabled": True, "bucket": "no-such-bucket-here", "endpoint": s3.url, "links": "presigned",
        "delete_local": False, "stored": 0, "pending": 1, "failed": 0, "local_only": 0, "last_error": None,
        "reachable": True, "bucket_exists": False, "error": str(err.value)}
    s3.stop()
    with pytest.raises(StorageError) as down:
        service.sync_storage(settings, store)
    assert str(down.value) == (f"cannot reach bucket '{s3.bucket}' at {s3.url}: the store is unreachable "
                               "(EndpointConnectionError)")
    uploader = uploads.Uploader(settings, store)
    uploader.loop_once(threading.Event())  # the scheduler's loop step: logs the outage, backs off
    assert uploader.busy() is False  # `worker --until-idle` does not wait for an unreachable store
    s3.start()
    assert uploader.loop_once(threading.Event()).state == "stored"
    messages = [str(err.value), str(down.value), caplog.text, *(r.getMessage() for r in caplog.records),
                json.dumps(service.storage_status(settings, store))]
    assert [c for c in CREDENTIALS for m in messages if c in m] == []
    assert any("uploads wait and retry" in r.getMessage() for r in caplog.records)
    db_bytes = b"".join(p.read_bytes() for p in settings.db_path.parent.glob(settings.db_path.name + "*"))
    assert [c for c in CREDENTIALS if c.encode() in db_bytes] == []
    assert store.upload_counts(batch_id) == {"stored": 1}


# -- with a real ComfyUI ------------------------------------------------------------------------------------
ROWS = [{"1.color": 255, "1.width": 16}, {"1.color": 65280, "1.width": 16}, {"1.color": 16711680, "1.width": 16}]


def test_a_real_batch_lands_in_the_bucket_byte_identical(settings, store, scheduler_factory, s3):
    settings = settings.with_overrides(**s3.settings())
    scheduler_factory(settings)
    result = submit_rows(settings, store, "empty_image", ROWS)
    assert service.wait_for_tasks(store, result.task_ids, 60) == {"succeeded": 3}
    batch_id = result.batch_ids[0]
    wait_until(lambda: store.upload_counts(batch_id) == {"stored": 3}, 30, message="three uploads")
    images = store.images_for_batch(batch_id)
    expected = local_bytes(settings, images, store, batch_id)
    objects = s3.objects()
    assert (objects, s3.puts()) == (expected, {k: 1 for k in expected})
    # ComfyUI's PNG metadata (the graph it ran) travels with the bytes.
    assert ["prompt" in Image.open(io.BytesIO(data)).info for data in objects.values()] == [True, True, True]
    summary = service.batch_summary(store, batch_id)
    assert (summary["stored_remotely"], summary["images"]) == (3, 3)


def test_the_store_stopped_mid_run_every_image_uploaded_exactly_once(settings, store, scheduler_factory, s3,
                                                                    monkeypatch):
    """The S3 server is stopped while work goes on and started again on the same port. Stopping closes its
    listening socket, so uploads meet "connection refused" as from a store that is down; moto keeps its
    buckets in this process's memory, so the restarted server still has every object stored before the
    outage (a fresh `moto_server` process would not). PUTs are counted by the server as they arrive.
    A first batch has stored at least one image when the store stops; a second batch is submitted only after
    that, so images are certainly made during the outage however fast the machine is."""
    monkeypatch.setattr(uploads, "BACKOFF_MAX", 1.0)
    settings = settings.with_overrides(**s3.settings())
    scheduler_factory(settings)
    rows = [{"1.color": c * 4099, "1.width": 512, "1.height": 512} for c in range(12)]
    before = submit_rows(settings, store, "empty_image", rows[:4])
    wait_until(lambda: store.upload_counts(before.batch_ids[0]).get("stored", 0) >= 1, 60, 0.01,
               message="a first upload")
    s3.stop()
    stored_before = len(s3.puts())  # keys whose PUT arrived before the outage
    during = submit_rows(settings, store, "empty_image", rows[4:])
    batches = before.batch_ids + during.batch_ids

    def upload_counts() -> dict[str, int]:
        total: dict[str, int] = {}
        for batch_id in batches:
            for state, n in store.upload_counts(batch_id).items():
                total[state] = total.get(state, 0) + n
        return total

    assert service.wait_for_tasks(store, before.task_ids + during.task_ids, 120) == {"succeeded": 12}
    wait_until(lambda: store.last_upload_error() is not None, 30, message="an upload to meet the outage")
    counts = upload_counts()
    assert counts.get("stored", 0) < 12 and sum(counts.values()) == 12, counts
    s3.start()
    wait_until(lambda: upload_counts() == {"stored": 12}, 60, message="every upload after the outage")
    expected: dict[str, bytes] = {}
    attempts = []
    for batch_id in batches:
        images = store.images_for_batch(batch_id)
        assert all((settings.output_dir / i["path"]).is_file() for i in images)  # nothing local lost
        expected.update(local_bytes(settings, images, store, batch_id))
        attempts += [i["remote_attempts"] for i in images]
    assert (s3.objects(), s3.puts()) == (expected, {k: 1 for k in expected})
    # One uploader thread: at most the one PUT in flight when the store stopped needed a second attempt.
    assert sorted(attempts)[:11] == [1] * 11 and max(attempts) <= 2, attempts
    assert 1 <= stored_before <= 4, stored_before


@pytest.mark.slow  # `python -m core` subprocesses
def test_storage_sync_backfills_a_batch_made_while_storage_was_off(settings, store, scheduler_factory, s3, tmp_path):
    scheduler_factory(settings)  # storage off
    result = submit_rows(settings, store, "empty_image", ROWS[:2])
    assert service.wait_for_tasks(store, result.task_ids, 60) == {"succeeded": 2}
    batch_id = result.batch_ids[0]
    assert store.upload_counts(batch_id) == {"local": 2}
    env = {**worker_env(settings), **s3.env(), "WORK": str(tmp_path)}

    s3.stop()
    down = run_cli(env, "storage", "sync", str(batch_id))
    assert (down.returncode, down.stdout, down.stderr) == (
        1, "", f"error: cannot reach bucket '{s3.bucket}' at {s3.url}: the store is unreachable "
               "(EndpointConnectionError)\n")
    s3.start()
    missing = run_cli({**env, "COMFYBATCH_S3_BUCKET": "no-such-bucket-here"}, "storage", "sync")
    assert (missing.returncode, missing.stderr) == (
        1, f"error: cannot reach bucket 'no-such-bucket-here' at {s3.url}: the bucket does not exist (create it, "
           "or fix COMFYBATCH_S3_BUCKET / COMFYBATCH_S3_ENDPOINT_URL)\n")
    off = run_cli({k: v for k, v in env.items() if k != "COMFYBATCH_S3_BUCKET"}, "storage", "sync")
    assert (off.returncode, off.stderr) == (1, "error: object storage is off: set COMFYBATCH_S3_BUCKET (and the "
                                               "other COMFYBATCH_S3_* settings: endpoint, region, credentials) to "
                                               "upload results\n")
    unknown = run_cli(env, "storage", "sync", "99")
    assert (unknown.returncode, unknown.stderr) == (1, "error: batch 99 does not exist\n")

    synced = run_cli(env, "storage", "sync", str(batch_id))
    assert (synced.returncode, synced.stdout, synced.stderr) == (
        0, "stored 2, already in the store 0, failed 0, to retry 0, still pending 0 (2 image(s) newly queued)\n", "")
    again = run_cli(env, "storage", "sync", "--json")
    assert json.loads(again.stdout) == {"queued": 0, "stored": 0, "already": 0, "failed": 0, "retry": 0, "left": 0}
    status = run_cli(env, "storage", "status")
    assert (status.returncode, status.stdout.splitlines()) == (0, [
        f"bucket '{s3.bucket}' at {s3.url}: reachable, bucket exists",
        "images: 2 stored, 0 pending, 0 failed, 0 local only"])
    images = store.images_for_batch(batch_id)
    expected = local_bytes(settings, images, store, batch_id)
    assert (s3.objects(), s3.puts()) == (expected, {k: 1 for k in expected})

    # The credentials were in the environment of every command: none of them wrote one down.
    outputs = "".join(r.stdout + r.stderr for r in (down, missing, off, unknown, synced, again, status))
    log_text = (settings.log_dir / "comfybatch.log").read_text(encoding="utf-8")
    assert "stored as" in log_text
    db_bytes = b"".join(p.read_bytes() for p in settings.db_path.parent.glob(settings.db_path.name + "*"))
    assert [c for c in CREDENTIALS if c in outputs or c in log_text or c.encode() in db_bytes] == []


@pytest.mark.slow  # `python -m core worker` subprocesses
def test_worker_until_idle_waits_for_uploads_but_not_for_an_unreachable_store(tmp_path, s3):
    settings = make_settings(tmp_path, ["http://127.0.0.1:9"], **s3.settings())
    store = Store(settings.db_path)
    batch_id, images = finished_batch(settings, store, [0x101010, 0x202020])
    env = {**worker_env(settings), **s3.env(), "WORK": str(tmp_path)}
    s3.stop()
    down = run_cli(env, "worker", "--until-idle", "--quiet", timeout=60)
    assert (down.returncode, store.upload_counts(batch_id)) == (0, {"pending": 2})
    s3.start()
    up = run_cli(env, "worker", "--until-idle", "--quiet", timeout=60)
    assert (up.returncode, store.upload_counts(batch_id)) == (0, {"stored": 2})
    expected = local_bytes(settings, images, store, batch_id)
    store.close()
    assert (s3.objects(), s3.puts()) == (expected, {k: 1 for k in expected})


def test_boto3_is_imported_only_by_core_storage():
    importers = sorted(p.relative_to(ROOT).as_posix() for d in ("core", "api", "pages") for p in (ROOT / d).glob("*.py")
                       if "import boto3" in p.read_text(encoding="utf-8")
                       or "import botocore" in p.read_text(encoding="utf-8"))
    assert importers == ["core/storage.py"]
