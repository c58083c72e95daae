"""The read side behind the pages and the API: paged queries, display rows, thumbnails, the CSV table as the Batch
page reads it, the image routes and signed links."""

from __future__ import annotations

import datetime as dt
import io
import os
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image
from starlette.requests import Request

import ui_format
from api.files import FileServer
from core import access, csvin, files, queries, service, thumbs
from core.errors import InputError, NotFound
from core.store import Store
from tests.support import finish_next_task, make_settings, submit_rows


@pytest.fixture
def offline(tmp_path):
    return make_settings(tmp_path, [])


@pytest.fixture
def db(offline):
    store = Store(offline.db_path)
    yield store
    store.close()


def png(color, size=(40, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def finish(settings, store, data: bytes) -> dict:
    return finish_next_task(settings, store, data)


# -- views ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_task_pages_stay_fast_at_a_hundred_thousand_tasks(offline, db):
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}}
    for b in range(10):
        db.create_batch(f"b{b}", "empty_image", [{"row_number": i + 2, "params": {"1.color": str(i)}, "graph": graph,
                                                  "prompt": f"prompt {b}-{i} a red fox" if i % 100 == 0 else "x"}
                                                 for i in range(10_000)])
    flt = queries.TaskFilter()
    started = time.perf_counter()
    assert queries.count_tasks(db, flt) == 100_000
    last_page = queries.page_tasks(db, flt, 50, 99_950)
    assert [r["id"] for r in last_page] == list(range(50, 0, -1))
    by_batch = queries.TaskFilter(batch_id=7, statuses=("queued",))
    assert queries.count_tasks(db, by_batch) == 10_000
    assert queries.page_tasks(db, by_batch, 50, 0)[0]["id"] == 70_000
    assert queries.count_tasks(db, queries.TaskFilter(text="red fox")) == 1_000
    assert queries.summary_batch_ids(db) == [10, 9, 8]
    assert time.perf_counter() - started < 2.0


def test_task_rows_and_status_lines(offline, db):
    result = submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a fox", "steps": "2"}], count=2,
                                 name="foxes")
    db.claim_next_task("http://gpu-1:8188", str(uuid.uuid4()))
    db.set_progress(result.task_ids[0], 1, 2)
    row = ui_format.task_row(queries.tasks_by_ids(db, [result.task_ids[0]])[0])
    assert (row["status"], row["progress"], row["server"], row["attempts"], row["prompt"]) == (
        "submitted", 0.5, "http://gpu-1:8188", 1, "a fox")
    summary = service.batch_summary(db, result.batch_ids[0])
    assert ui_format.batch_status_line(summary) == "Batch 1: 0/2 done (0%) - 1 queued, 1 submitted - ETA unknown"
    assert queries.tasks_by_ids(db, [2, 999, 1])[0]["id"] == 2
    assert queries.task_workflows(db) == ["sd15_txt2img"]


def test_image_views_filter_by_batch_workflow_date_and_prompt(offline, db):
    submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a red fox"}, {"prompt": "a blue bird"}])
    submit_rows(offline, db, "empty_image", [{"1.color": "1"}])
    images = [finish(offline, db, png((i, 0, 0))) for i in range(3)]
    assert queries.count_images(db, queries.ImageFilter()) == 3
    assert [i["id"] for i in queries.page_images(db, queries.ImageFilter(), 2, 0)] == [3, 2]
    assert queries.count_images(db, queries.ImageFilter(batch_id=2)) == 1
    assert queries.count_images(db, queries.ImageFilter(workflow="sd15_txt2img")) == 2
    assert [i["prompt"] for i in queries.page_images(db, queries.ImageFilter(text="fox"), 10, 0)] == ["a red fox"]
    day = dt.date.today()
    assert queries.count_images(db, queries.ImageFilter(since=day, until=day)) == 3
    assert queries.count_images(db, queries.ImageFilter(until=day - dt.timedelta(days=1))) == 0
    assert [i["id"] for i in queries.images_by_ids(db, {3, 1})] == [1, 3]
    detail = queries.image_detail(db, images[0]["id"])
    assert (detail["task"]["prompt"], detail["batch"]["id"]) == ("a red fox", 1)
    workflow = service.load_workflow(offline, "sd15_txt2img")
    values = queries.task_parameters(detail["task"], workflow)
    assert values["prompt"] == "a red fox" and values["seed"] == detail["task"]["seed"]
    assert values["steps"] == 20 and values["checkpoint"] == "random_sd15.safetensors"
    with pytest.raises(NotFound, match="image 99 does not exist"):
        queries.get_image(db, 99)


# -- thumbnails -----------------------------------------------------------------------------------------
def test_thumbnails_are_made_once_keep_alpha_and_follow_a_newer_image(tmp_path):
    rel = "batch-00001/task-000001_9_00.png"
    files.write_atomic(tmp_path / rel, png((255, 0, 0, 128), (1024, 512), "RGBA"))
    thumb = thumbs.ensure_thumb(tmp_path, rel)
    assert thumb == tmp_path.resolve() / "_thumbs" / "batch-00001" / "task-000001_9_00.webp"
    with Image.open(thumb) as im:
        assert (im.format, im.size, im.mode) == ("WEBP", (320, 160), "RGBA")
        assert im.getpixel((10, 10))[3] in range(120, 137)
    made = thumb.stat().st_mtime_ns
    assert thumbs.ensure_thumb(tmp_path, rel) == thumb and thumb.stat().st_mtime_ns == made
    files.write_atomic(tmp_path / rel, png((0, 0, 255), (100, 50)))
    os.utime(tmp_path / rel, (time.time() + 5, time.time() + 5))
    with Image.open(thumbs.ensure_thumb(tmp_path, rel)) as im:
        assert (im.size, im.mode, im.getpixel((5, 5))[2] > 200) == ((100, 50), "RGB", True)


def test_thumbnails_refuse_paths_outside_the_output_folder(tmp_path):
    with pytest.raises(NotFound, match="outside the output folder"):
        thumbs.ensure_thumb(tmp_path / "out", "../secret.png")
    with pytest.raises(NotFound, match="missing"):
        thumbs.ensure_thumb(tmp_path, "batch-00001/none.png")


# -- image routes -----------------------------------------------------------------------------------------
def request(path: str, image_id: object, query: bytes = b"", headers: list | None = None) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "headers": headers or [], "query_string": query,
                    "path_params": {"image_id": str(image_id)}})


def test_file_routes_serve_by_integer_id_only(offline, db):
    submit_rows(offline, db, "empty_image", [{"1.color": "1"}])
    image = finish(offline, db, png((0, 255, 0)))
    server = FileServer()
    assert server.thumb(request("/files/thumb/1", 1)).status_code == 503
    server.bind(offline, db)
    thumb = server.thumb(request("/files/thumb/1", image["id"]))
    assert (thumb.status_code, thumb.media_type) == (200, "image/webp")
    assert str(thumb.path).endswith("_thumbs/batch-00001/task-000001_9_00.webp")
    original = server.image(request("/files/image/1", image["id"]))
    assert (original.media_type, original.headers["content-disposition"]) == (
        "image/png", 'inline; filename="task-000001_9_00.png"')
    assert Path(original.path).read_bytes() == png((0, 255, 0))
    missing = server.image(request("/files/image/7", 7))
    assert (missing.status_code, missing.body) == (404, b'{"error":"image 7 does not exist"}')
    huge = server.image(request("/files/image/" + "9" * 5000, "9" * 5000))  # int() would refuse 4,300+ digits
    assert huge.status_code == 404 and len(huge.body) < 200
    assert [r.path for r in server.routes] == ["/files/thumb/{image_id}", "/files/image/{image_id}",
                                               "/files/export/{token}/{name}"]
    assert (access.thumb_url(offline, 3), access.image_url(offline, 3)) == ("/files/thumb/3", "/files/image/3")


def test_file_routes_take_a_token_or_a_signed_link_and_never_fail_on_odd_values(offline, db):
    submit_rows(offline, db, "empty_image", [{"1.color": "1"}])
    image = finish(offline, db, png((0, 0, 255)))
    locked = offline.with_overrides(api_tokens=("tok-1", "tok-2"))
    server = FileServer()
    server.bind(locked, db)
    path = f"/files/image/{image['id']}"

    def status(query: bytes = b"", auth: bytes | None = None) -> int:
        headers = [(b"authorization", auth)] if auth is not None else []
        return server.image(request(path, image["id"], query, headers)).status_code

    sig = access.signature(locked, image["id"]).encode()
    assert access.image_url(locked, image["id"]) == f"{path}?sig={sig.decode()}"
    assert status() == 401
    assert status(b"sig=" + sig) == 200
    assert status(b"sig=" + sig[:-1] + b"0") == 401
    assert status("sig=é".encode()) == 401  # was a 500 (non-ASCII str into hmac.compare_digest)
    assert status(b"sig=%C3%A9") == 401
    assert status(auth=b"Bearer tok-2") == 200
    assert status(auth=b"bearer tok-1") == 200  # the scheme is case-insensitive (RFC 7235), as on /api/v1
    assert status(auth=b"BEARER  tok-1 ") == 200
    assert status(auth="Bearer tök-1".encode("latin-1")) == 401  # was a 500
    assert status(auth=b"Bearer \xff\xfe") == 401
    assert status(auth=b"Basic tok-1") == 401
    assert server.thumb(request(path, image["id"], b"sig=" + sig)).status_code == 200
    other = access.signature(locked, image["id"] + 1).encode()
    assert status(b"sig=" + other) == 401  # a link signs one image only


# -- the CSV table as the Batch page reads it ------------------------------------------------------------
def test_csv_table_keeps_row_numbers_text_and_marks_ragged_rows():
    data = "prompt;seed\n一只小猪;1\n\n\"a, b\";2\n;;extra\nshort\n\n\n".encode("gbk")
    table = csvin.read_table(data, "in.csv", max_bytes=1 << 20, max_rows=100)
    assert (table.columns, table.rows, table.numbers) == (
        ["prompt", "seed"], [["一只小猪", "1"], ["a, b", "2"], ["", ""], ["short", ""]], [2, 4, 5, 6])
    assert [(p.row, p.code) for p in table.problems] == [(5, "ragged_row"), (6, "ragged_row")]
    rows = csvin.table_rows(table.columns, [["一只小猪", "1"], ["x", "7"]], [2, 9], "in.csv", max_count=10)
    assert [(r.number, r.params) for r in rows] == [(2, {"prompt": "一只小猪", "seed": "1"}),
                                                    (9, {"prompt": "x", "seed": "7"})]


def test_csv_table_header_problems_are_reported_not_shown():
    with pytest.raises(InputError) as info:
        csvin.read_table(b"prompt,Prompt,\n1,2,3\n", "h.csv", max_bytes=1 << 20, max_rows=100)
    assert [str(p) for p in info.value.problems] == ["h.csv row 1: column 2: duplicate column 'Prompt'",
                                                     "h.csv row 1: column 3 has no name"]
    assert [(p.row, p.file) for p in info.value.problems] == [(1, "h.csv"), (1, "h.csv")]
    with pytest.raises(InputError, match="the header\\) is empty"):
        csvin.read_table(b"\n", "e.csv", max_bytes=1 << 20, max_rows=100)
