"""Choosing and exporting: picks, the gallery's parameter filters and previous/next, streamed results CSVs and
ZIPs (of a batch, of the picked images), the export links' route, and the Overview's bounded aggregates."""

from __future__ import annotations

import csv
import io
import os
import time
import zipfile

import pytest
import requests

from api.files import FileServer
from core import exports, overview, queries, service
from core.errors import InputError, NotFound
from tests.support import finish_next_task, make_settings, png, serve_routes, submit_rows


@pytest.fixture
def settings(tmp_path):
    """No ComfyUI server; conftest's `store` opens these settings' database."""
    return make_settings(tmp_path, [])


@pytest.fixture
def six(settings, store):
    """Six finished tasks with prompts, cfg values and one image each (image i belongs to task i)."""
    rows = [{"prompt": f"a {animal} on a hill", "cfg": cfg, "seed": seed}
            for animal, cfg, seed in [("cat", 4, 1), ("dog", 7, 2), ("cat", 7, 3), ("fox", "7", 4), ("cat", 4, 5),
                                      ("owl", 10, 6)]]
    submit_rows(settings, store, "sd15_txt2img", rows, name="choose")
    return [finish_next_task(settings, store, png((i * 40, 0, 0)))["id"] for i in range(6)]


def test_picks_filter_and_count(store, six):
    assert service.set_picked(store, [2, 4, 999], True) == 2  # an unknown id is skipped
    assert service.set_picked(store, [2], True) == 0
    flt = queries.ImageFilter(picked=True)
    assert [i["id"] for i in queries.page_images(store, flt, 10, 0)] == [4, 2]
    assert (queries.count_images(store, flt), queries.count_picked(store), queries.count_picked(store, 1)) == (2, 2, 2)
    assert queries.picked_ids(store, [1, 2, 3, 4]) == {2, 4}
    assert service.set_picked(store, [4], False) == 1
    assert queries.count_picked(store) == 1


def test_parameter_filters_match_the_values_given_and_the_seed(store, six):
    def ids(text: str) -> list[int]:
        flt = queries.ImageFilter(params=queries.parse_param_filters(text))
        return [i["id"] for i in queries.page_images(store, flt, 10, 0)]

    assert ids("cfg=7") == [4, 3, 2]  # 7 given as a number and as text both match
    assert ids("cfg=4; seed=5") == [5]
    assert ids("cfg=4\nprompt=a cat on a hill") == [5, 1]
    assert ids("sampler_name=euler") == []  # not given by the rows: the filter reads what rows gave


def test_parameter_filters_have_limits_and_clear_messages():
    with pytest.raises(InputError) as exc:
        queries.parse_param_filters("cfg; seed=abc; " + "x" * 101 + "=1")
    assert [str(p) for p in exc.value.problems] == [
        "field 'parameters': condition 1: expected name=value, got 'cfg'",
        "field 'parameters': condition 2: seed is a whole number, got 'abc'",
        "field 'parameters': condition 3: a name of at most 100 and a value of at most 200 characters (no NUL)"]
    with pytest.raises(InputError) as exc:
        queries.parse_param_filters(";".join(f"a{i}=1" for i in range(9)))
    assert [str(p) for p in exc.value.problems] == ["field 'parameters': 9 conditions; at most 8"]
    with pytest.raises(InputError):
        queries.parse_param_filters("a=" + "1" * 3000)


def test_previous_and_next_follow_the_filter(store, six):
    cats = queries.ImageFilter(text="cat")
    assert queries.neighbour_image(store, cats, 5, 1) == 3  # newest first: next is older
    assert queries.neighbour_image(store, cats, 3, 1) == 1
    assert queries.neighbour_image(store, cats, 1, 1) is None
    assert queries.neighbour_image(store, cats, 1, -1) == 3
    assert queries.neighbour_image(store, cats, 5, -1) is None


def read_csv(data: bytes) -> list[dict[str, str]]:
    assert data.startswith("\ufeff".encode())
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def test_streamed_results_csv_reads_pages_and_keeps_every_row(settings, store, six, monkeypatch):
    monkeypatch.setattr(exports, "PAGE", 4)  # several pages for six tasks
    chunks = list(service.results_csv_chunks(settings, store, 1))
    assert len(chunks) == 3  # the header, then two pages of tasks
    rows = read_csv(b"".join(chunks))
    assert [(r["task_id"], r["prompt"], r["cfg"], r["seed"], r["status"]) for r in rows][:2] == [
        ("1", "a cat on a hill", "4", "1", "succeeded"), ("2", "a dog on a hill", "7", "2", "succeeded")]
    assert [r["images"] for r in rows] == [store.images_for_task(t)[0]["path"] for t in range(1, 7)]
    with pytest.raises(NotFound):
        service.results_csv_chunks(settings, store, 99)


def test_picked_exports_hold_only_the_picked_images(settings, store, six):
    service.set_picked(store, [3, 6], True)
    csv_file = service.export_file(settings, store, "csv", batch_id=1, picked=True)
    assert [r["task_id"] for r in read_csv(csv_file.path.read_bytes())] == ["3", "6"]
    zip_file = service.export_file(settings, store, "zip", picked=True)
    with zipfile.ZipFile(zip_file.path) as zf:
        paths = [store.images_for_task(t)[0]["path"] for t in (3, 6)]
        assert sorted(zf.namelist()) == sorted(paths)
        assert zf.read(paths[0]) == (settings.output_dir / paths[0]).read_bytes()
    assert csv_file.url == f"/files/export/{csv_file.token}/batch-1-picked-results.csv"


def test_export_links_are_served_from_disk_and_expire(settings, store, six):
    files = FileServer()
    files.bind(settings, store)
    out = service.export_file(settings, store, "csv", batch_id=1)
    with serve_routes(files.routes) as base:
        answer = requests.get(base + out.url, timeout=10)
        assert (answer.status_code, answer.headers["content-disposition"]) == (
            200, 'attachment; filename="batch-1-results.csv"')
        assert answer.content == out.path.read_bytes()
        assert requests.get(f"{base}/files/export/{out.token}/..%2Ftasks.db", timeout=10).status_code == 404
        assert requests.get(f"{base}/files/export/short/batch-1-results.csv", timeout=10).status_code == 404
        old = time.time() - exports.KEEP_SECONDS - 10
        os.utime(out.path.parent, (old, old))
        assert exports.cleanup(settings) == 1
        assert requests.get(base + out.url, timeout=10).status_code == 404


def test_overview_aggregates_read_bounded_windows(settings, store):
    submit_rows(settings, store, "empty_image", [{"color": str(i)} for i in range(5)], name="ov")
    for i in range(3):
        finish_next_task(settings, store, png((i, i, i)))
    now = time.time()
    with store.write() as conn:
        conn.execute("UPDATE tasks SET started_at = finished_at - 2 WHERE status = 'succeeded'")
        conn.execute("UPDATE tasks SET status = 'failed', finished_at = ?, error = 'ComfyUI execution error: "
                     "out of memory' WHERE id = 4", (now,))
        conn.execute("UPDATE images SET created_at = ? WHERE id = 1", (now - 2 * 3600,))  # outside the hour
    per_minute = overview.images_per_minute(store, now)
    assert sum(r["images"] for r in per_minute) == 2 and {r["server"] for r in per_minute} == {"http://gpu-1:8188"}
    assert [round(d["seconds"]) for d in overview.durations(store, now)] == [2, 2, 2]
    assert [(f["cause"], f["failures"]) for f in overview.failures(store, now)] == [("ComfyUI execution error", 1)]
    assert overview.active_batch_ids(store) == [1]
    assert [i["id"] for i in overview.latest_images(store, 1, 2)] == [3, 2]
