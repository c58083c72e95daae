"""Sweeps (lists of values make the product of tasks) through the one intake path, and their comparison grids:
the grid's cells, the contact sheet's pixels and labels, the grid ZIP."""

from __future__ import annotations

import json
import zipfile

import pytest
import requests
from PIL import Image

from core import grids, service, sweeps
from core.errors import InputError, NotFound
from core.store import Store
from tests.support import finish_next_task, make_settings, png, serve_api, submit_csv, submit_rows

COLORS = ["16711680", "65280", "255"]  # red, green, blue as EmptyImage's 0xRRGGBB integers
WIDTHS = [32, 40, 48, 56]


@pytest.fixture
def settings(tmp_path):
    """No ComfyUI server; conftest's `store` opens these settings' database."""
    return make_settings(tmp_path, [])


def test_a_row_with_lists_makes_every_combination_in_order(settings, store):
    result = submit_rows(settings, store, "empty_image", [{"color": COLORS, "width": WIDTHS, "height": "16"}],
                         name="sweep", count=2)
    assert len(result.task_ids) == 3 * 4 * 2
    batch = store.get_batch(result.batch_ids[0])
    assert json.loads(batch["axes"]) == {"color": COLORS, "width": WIDTHS}
    given = [store.get_task(t)["params"] for t in result.task_ids]
    assert given[:3] == [{"color": "16711680", "width": 32, "height": "16"}] * 2 + [
        {"color": "16711680", "width": 40, "height": "16"}]
    assert given[-1] == {"color": "255", "width": 56, "height": "16"}
    graphs = [store.get_task(t)["graph"]["1"]["inputs"] for t in result.task_ids]
    assert [(g["color"], g["width"]) for g in graphs[::2]] == [(int(c), w) for c in COLORS for w in WIDTHS]


def test_a_random_seed_is_drawn_once_for_the_whole_sweep(settings, store):
    result = submit_rows(settings, store, "sd15_txt2img", [{"prompt": ["a cat", "a dog"], "cfg": [4, 7]}],
                         dry_run=True)
    seeds = {job.resolved["seed"] for job in result.jobs}
    assert len(result.jobs) == 4 and len(seeds) == 1
    assert [job.params["prompt"] for job in result.jobs] == ["a cat", "a cat", "a dog", "a dog"]


def test_the_product_is_refused_from_the_lengths_before_anything_is_expanded(settings, store):
    huge = {"color": list(range(100)), "width": list(range(8, 808, 8)), "height": list(range(1, 101))}
    assert sweeps.size(huge) == 1_000_000
    with pytest.raises(InputError) as exc:
        submit_rows(settings, store, "empty_image", [huge])
    assert [p.message for p in exc.value.problems] == [
        "1 row(s) and their lists with count 1 would make 1,000,000 tasks; at most 20,000 in one submission "
        "(COMFYBATCH_MAX_TASKS): split it"]
    with pytest.raises(InputError) as exc:
        submit_rows(settings, store, "empty_image", [{"color": list(range(101))}])
    assert [str(p) for p in exc.value.problems] == [
        "parameter 'color': a list of 101 values; at most 100 (COMFYBATCH_MAX_SWEEP_VALUES)"]
    assert store.counts() == {}


def test_bad_values_in_lists_are_named_once_each(settings, store):
    with pytest.raises(InputError) as exc:
        submit_rows(settings, store, "empty_image", [{"color": ["1", "x", "3"], "width": [32, "y"]}])
    assert sorted(str(p) for p in exc.value.problems) == [
        "parameter 'color' (1.color): expected an integer, got 'x'",
        "parameter 'width' (1.width): expected an integer, got 'y'"]
    with pytest.raises(InputError) as exc:
        submit_rows(settings, store, "empty_image", [{"color": [], "width": [32, 32], "height": [{"a": 1}]}])
    assert sorted(str(p) for p in exc.value.problems) == [
        "parameter 'color': an empty list: give at least one value",
        "parameter 'height': a list may hold text, numbers or true/false, got {'a': 1}",
        "parameter 'width': the list repeats a value; give each value once"]


def test_a_csv_cell_holding_a_json_array_is_a_list(settings, store):
    data = (b'1.color,width,height\n"[1, 2]","[32,48]",16\n')
    result = submit_csv(settings, store, data, "sweep.csv", "empty_image")
    assert len(result.task_ids) == 4
    assert json.loads(store.get_batch(result.batch_ids[0])["axes"]) == {"1.color": [1, 2], "width": [32, 48]}


def test_list_syntax_in_a_csv_cell(settings, store):
    assert sweeps.parse_cell('["a cat", "a dog"]') == ["a cat", "a dog"]
    assert sweeps.parse_cell("[4, 7.5, 10]") == [4, 7.5, 10]
    assert sweeps.parse_cell("[masterpiece] a cat") is None  # text, as before
    assert sweeps.parse_cell("[a cat]") is None
    assert sweeps.parse_cell("[[1, 2]]") is None
    with pytest.raises(InputError) as exc:
        submit_csv(settings, store, b'1.color,width\n7,"[""a"", ""b"""\n', "bad.csv", "empty_image")
    (problem,) = exc.value.problems
    assert (problem.row, problem.column, problem.file, problem.code) == (2, "width", "bad.csv", "invalid_list")
    assert problem.message.startswith("looks like a list of values but is not a JSON array")


def sweep_with_images(settings, store):
    """A 3 x 4 sweep whose every task has a distinct solid-colour image; returns {(color, width): rgb}."""
    submit_rows(settings, store, "empty_image", [{"color": COLORS, "width": WIDTHS, "height": "16"}], name="grid")
    expected = {}
    for n, (color, width) in enumerate((c, w) for c in COLORS for w in WIDTHS):
        rgb = (20 * n, 255 - 20 * n, (n * 70) % 256)
        finish_next_task(settings, store, png(rgb, (width, 24)))
        expected[(color, width)] = rgb
    return expected


def test_the_grid_of_a_sweep_and_its_contact_sheet_pixels(settings, store, tmp_path):
    expected = sweep_with_images(settings, store)
    grid = grids.build(store, 1, "color", "width")
    assert (grid.rows, grid.cols, len(grid.cells)) == (COLORS, WIDTHS, 12)
    target = tmp_path / "sheet.png"
    lay = grids.contact_sheet(settings.output_dir, grid, target)
    with Image.open(target) as sheet:
        labels = json.loads(sheet.text["comfybatch-grid"])
        sheet = sheet.convert("RGB")
        assert sheet.size == lay.size and max(sheet.size) <= grids.MAX_SIDE
        for r, color in enumerate(COLORS):
            for c, width in enumerate(WIDTHS):
                x0, y0, x1, y1 = lay.cell_box(r, c)
                assert sheet.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == expected[(color, width)], (r, c)
        for box in [*(lay.row_label_box(r) for r in range(3)), *(lay.column_label_box(c) for c in range(4))]:
            inked = [p for p in sheet.crop(box).get_flattened_data() if sum(p) < 200]
            assert len(inked) > 20, box  # the label's text is drawn there
    assert labels["rows"] == [f"color = {c}" for c in COLORS]
    assert labels["cols"] == [f"width = {w}" for w in WIDTHS]


def test_fixed_values_limits_and_the_grid_zip(settings, store, tmp_path):
    expected = sweep_with_images(settings, store)
    one_row = grids.build(store, 1, None, "width", {"color": "65280"})
    assert [one_row.cells[(0, c)]["path"] for c in range(4)] == [
        store.images_for_task(t)[0]["path"] for t in (5, 6, 7, 8)]
    with pytest.raises(InputError) as exc:
        grids.build(store, 1, "seed", "width", {"color": "7"})
    assert sorted(str(p) for p in exc.value.problems) == [
        "parameter 'color': not one of the batch's values for it: 7",
        "parameter 'seed': batch 1 did not sweep this parameter (it swept: color, width)"]
    plain = submit_rows(settings, store, "empty_image", [{"color": "1"}])
    with pytest.raises(NotFound):
        grids.build(store, plain.batch_ids[0], None, None)
    out = service.export_grid(settings, store, 1, "color", "width", None, "zip")
    with zipfile.ZipFile(out.path) as zf:
        names = sorted(zf.namelist())
        assert len(names) == 12
        assert names[0] == "r01_color_=_16711680__c01_width_=_32.png"
        with zf.open(names[0]) as f, Image.open(f) as im:
            assert im.convert("RGB").getpixel((0, 0)) == expected[("16711680", 32)]


def test_the_api_takes_lists_in_json_rows_and_streams_the_results_csv(tmp_path):
    from api.app import Api

    settings = make_settings(tmp_path, [])
    api = Api()
    with serve_api(api) as base:
        store = Store(settings.db_path)
        try:
            api.bind(settings, store)
            reply = requests.post(base + "/batches", json={"workflow": "empty_image", "rows": [
                {"color": [1, 2, 3], "width": [32, 48], "height": 16}]}, timeout=30)
            assert reply.status_code == 201, reply.text
            assert len(store.task_ids(batch_id=1)) == 6
            too_many = requests.post(base + "/batches", json={"workflow": "empty_image", "rows": [
                {"color": list(range(100)), "width": list(range(8, 808, 8)), "height": list(range(1, 4))}]},
                timeout=30)
            assert too_many.status_code == 422
            assert "would make 30,000 tasks" in too_many.json()["problems"][0]["message"]
            answer = requests.get(base + "/batches/1/results.csv", timeout=30)
            assert answer.headers.get("transfer-encoding") == "chunked"  # streamed, not one body
            lines = answer.content.decode("utf-8-sig").splitlines()
            assert lines[0].startswith("task_id,row_number,color,width,height,resolved_seed,status")
            # submitted_by is last: "local" with open access
            assert lines[1:3] == ["1,1,1,32,16,,queued,,0,,,,local", "2,1,1,48,16,,queued,,0,,,,local"]
        finally:
            store.close()
