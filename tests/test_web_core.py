"""The web app's engine-side modules: paged views, thumbnails, the CSV table and the image file routes."""

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

from core import csvtable, files, service, thumbs, views, webfiles
from core.errors import InputError, NotFound
from core.store import Store
from tests.conftest import make_settings


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
    task = store.claim_next_task("http://gpu-1:8188", str(uuid.uuid4()))
    rel = f"batch-{task['batch_id']:05d}/{files.image_name(task['id'], '9', 0, 'x.png')}"
    files.write_atomic(settings.output_dir / rel, data)
    store.complete_task(task["id"], [{"batch_id": task["batch_id"], "node_id": "9", "idx": 0, "path": rel,
                                      "filename": "x.png", "subfolder": "", "type": "output", "width": 40,
                                      "height": 20, "mode": "RGB", "size_bytes": len(data)}])
    return store.images_for_task(task["id"])[0]


# -- views ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_task_pages_stay_fast_at_a_hundred_thousand_tasks(offline, db):
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}}
    for b in range(10):
        db.create_batch(f"b{b}", "empty_image", [{"row_number": i + 2, "params": {"1.color": str(i)}, "graph": graph,
                                                  "prompt": f"prompt {b}-{i} a red fox" if i % 100 == 0 else "x"}
                                                 for i in range(10_000)])
    flt = views.TaskFilter()
    started = time.perf_counter()
    assert views.count_tasks(db, flt) == 100_000
    last_page = views.page_tasks(db, flt, 50, 99_950)
    assert [r["id"] for r in last_page] == list(range(50, 0, -1))
    by_batch = views.TaskFilter(batch_id=7, statuses=("queued",))
    assert views.count_tasks(db, by_batch) == 10_000
    assert views.page_tasks(db, by_batch, 50, 0)[0]["id"] == 70_000
    assert views.count_tasks(db, views.TaskFilter(text="red fox")) == 1_000
    assert views.summary_batch_ids(db) == [10, 9, 8]
    assert time.perf_counter() - started < 2.0


def test_task_rows_and_status_lines(offline, db):
    result = service.submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a fox", "steps": "2"}], count=2,
                                 batch_name="foxes")
    db.claim_next_task("http://gpu-1:8188", str(uuid.uuid4()))
    db.set_progress(result.task_ids[0], 1, 2)
    row = views.task_row(views.tasks_by_ids(db, [result.task_ids[0]])[0])
    assert (row["status"], row["progress"], row["server"], row["attempts"], row["prompt"]) == (
        "submitted", 0.5, "http://gpu-1:8188", 1, "a fox")
    summary = service.batch_summary(db, result.batch_ids[0])
    assert views.batch_status_line(summary) == "Batch 1: 0/2 done (0%) - 1 queued, 1 submitted"
    assert views.tasks_by_ids(db, [2, 999, 1])[0]["id"] == 2
    assert views.task_workflows(db) == ["sd15_txt2img"]


def test_image_views_filter_by_batch_workflow_date_and_prompt(offline, db):
    service.submit_rows(offline, db, "sd15_txt2img", [{"prompt": "a red fox"}, {"prompt": "a blue bird"}])
    service.submit_rows(offline, db, "empty_image", [{"1.color": "1"}])
    images = [finish(offline, db, png((i, 0, 0))) for i in range(3)]
    assert views.count_images(db, views.ImageFilter()) == 3
    assert [i["id"] for i in views.page_images(db, views.ImageFilter(), 2, 0)] == [3, 2]
    assert views.count_images(db, views.ImageFilter(batch_id=2)) == 1
    assert views.count_images(db, views.ImageFilter(workflow="sd15_txt2img")) == 2
    assert [i["prompt"] for i in views.page_images(db, views.ImageFilter(text="fox"), 10, 0)] == ["a red fox"]
    day = dt.date.today()
    assert views.count_images(db, views.ImageFilter(since=day, until=day)) == 3
    assert views.count_images(db, views.ImageFilter(until=day - dt.timedelta(days=1))) == 0
    assert [i["id"] for i in views.images_by_ids(db, {3, 1})] == [1, 3]
    detail = views.image_detail(db, images[0]["id"])
    assert (detail["task"]["prompt"], detail["batch"]["id"]) == ("a red fox", 1)
    workflow = service.load_workflow(offline, "sd15_txt2img")
    values = views.task_parameters(detail["task"], workflow)
    assert values["prompt"] == "a red fox" and values["seed"] == detail["task"]["seed"]
    assert values["steps"] == 20 and values["checkpoint"] == "random_sd15.safetensors"
    with pytest.raises(NotFound, match="image 99 does not exist"):
        views.get_image(db, 99)


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
def request(path: str, image_id: int) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"",
                    "path_params": {"image_id": image_id}})


def test_file_routes_serve_by_integer_id_only(offline, db):
    service.submit_rows(offline, db, "empty_image", [{"1.color": "1"}])
    image = finish(offline, db, png((0, 255, 0)))
    server = webfiles.FileServer()
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
    assert [r.path for r in server.routes] == ["/files/thumb/{image_id:int}", "/files/image/{image_id:int}"]
    assert (webfiles.thumb_url(3), webfiles.image_url(3)) == ("/files/thumb/3", "/files/image/3")


# -- the CSV table ----------------------------------------------------------------------------------------
def test_csv_table_round_trip_keeps_row_numbers_and_text():
    data = "prompt;seed\n一只小猪;1\n\n\"a, b\";2\n;;extra\n\n\n".encode("gbk")
    columns, rows = csvtable.read_table(data, "in.csv")
    assert columns == ["prompt", "seed", "extra 1"]
    assert rows == [["一只小猪", "1", ""], ["", "", ""], ["a, b", "2", ""], ["", "", "extra"]]
    again = csvtable.table_to_csv(columns, rows)
    assert again.decode().splitlines()[1] == '"一只小猪","1",""'
    assert csvtable.read_table(again, "again.csv") == (columns, rows)


def test_csv_table_header_problems_are_reported_not_shown():
    with pytest.raises(InputError) as info:
        csvtable.read_table(b"prompt,Prompt,\n1,2,3\n", "h.csv")
    assert info.value.problems == ["h.csv row 1 column 2: duplicate column 'Prompt'",
                                   "h.csv row 1 column 3: empty column name"]
    with pytest.raises(InputError, match="the header\\) is empty"):
        csvtable.read_table(b"\n", "e.csv")


def test_engine_problems_are_located_by_row_and_column():
    located = csvtable.locate_problems([
        "jobs.csv row 3: parameter 'steps' (3.steps): expected an integer, got 'abc'",
        "jobs.csv row 4 column 'count': expected a whole number from 1 to 1000, got '0'",
        "jobs.csv row 5: unknown parameter 'stpes': not a named parameter of this workflow",
        "jobs.csv row 6: parameter 'image': image file 'a.png' is not among the uploaded images (none uploaded)",
        "jobs.csv row 1 column 2: duplicate column 'x'",
        "jobs.csv: no data rows below the header"])
    assert [(p.position, p.column, p.reason) for p in located] == [
        (1, "steps", "expected an integer, got 'abc'"),
        (2, "count", "expected a whole number from 1 to 1000, got '0'"),
        (3, "stpes", "not a named parameter of this workflow"),
        (4, "image", "image file 'a.png' is not among the uploaded images (none uploaded)"),
        (None, None, "duplicate column 'x'"),
        (None, None, "jobs.csv: no data rows below the header")]
