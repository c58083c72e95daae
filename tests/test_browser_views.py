"""Seeing the work, in real Chromium against `streamlit run app.py` and a real ComfyUI: the Overview with a
running batch (live, pause, cancel), the Gallery's previous/next and picks with the picked-only downloads, and
a 3 x 4 sweep made on the Generate page, its grid and its contact sheet's pixels. Screenshots land in
test-artifacts/screenshots/."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect

from core import grids, queries
from core.store import Store
from tests.appserver import AppServer, start_app
from tests.support import add_option, choose, open_expander, open_page, settle, shot, submit_rows, wait_until

pytestmark = pytest.mark.browser
expect.set_options(timeout=30_000)

COLORS = [16711680, 65280, 255]  # red, green, blue
WIDTHS = [64, 72, 80, 88]


@pytest.fixture
def app(comfy, tmp_path) -> Iterator[AppServer]:
    server = start_app(tmp_path, [comfy.url])
    yield server
    server.stop()


@pytest.fixture
def store(app) -> Iterator[Store]:
    s = Store(app.settings.db_path)
    yield s
    s.close()


def card_counts(page) -> dict[str, int]:
    """The numbers of batch 2's status line on the Overview, as the page shows them now."""
    line = page.get_by_text(re.compile(r"^Batch 2: ")).first.inner_text()
    return {name: int(n) for n, name in re.findall(r"(\d+) (succeeded|failed|running|queued)", line)}


def test_overview_shows_a_running_batch_live_and_pauses_and_cancels_it(app, browser, store):
    submit_rows(app.settings, store, "empty_image", [{"color": str(c)} for c in COLORS], name="quick")
    wait_until(lambda: store.counts(1) == {"succeeded": 3}, 120, message="the quick batch")
    rows = [{"1.color": str(i), "1.width": "512", "1.height": "512"} for i in range(40)]
    submit_rows(app.settings, store, "slow_blur", rows, name="slow blur", source="browser test")
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    try:
        page = open_page(context.new_page(), app.url + "/")
        expect(page.get_by_role("heading", name="Overview", level=1)).to_be_visible()
        expect(page.get_by_text("#2 slow blur")).to_be_visible()
        expect(page.get_by_text("local · browser test · workflow slow_blur")).to_be_visible()  # who, from where
        expect(page.get_by_text(re.compile(r"^Batch 2: \d+ succeeded"))).to_be_visible()
        expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible()  # images per minute
        expect(page.get_by_text(re.compile(r"^active · \d+ in its queue"))).to_be_visible()
        first = card_counts(page)
        # Live: the fragment redraws the card as tasks land, without a reload.
        page.wait_for_function(
            "n => { const m = document.body.innerText.match(/Batch 2: (\\d+) succeeded/); return m && +m[1] >= n; }",
            arg=first["succeeded"] + 2, timeout=120_000)
        page.locator("[class*='st-key-ov_card_2'] img").first.wait_for()  # the card's strip of latest images
        assert page.locator("[class*='st-key-ov_card_1']").count() == 0  # the quick batch is done: no card
        shot(page, "overview-running")
        page.locator(".st-key-ov_pause_2 button").click()
        expect(page.get_by_text("Batch 2 paused: what is on a server finishes.")).to_be_visible()
        expect(page.get_by_text(re.compile(r"^Batch 2: .* ETA paused$"))).to_be_visible()
        assert store.get_batch(2)["paused"] == 1
        page.locator(".st-key-ov_cancel_2 button").click()
        # The fragment reruns alone and says what the button did: the click reached the engine.
        expect(page.get_by_text(re.compile(r"^Batch 2: \d+ task\(s\) cancelled, \d+ being stopped"))).to_be_visible()
        unfinished = ("queued", "running", "submitted")
        try:
            wait_until(lambda: not any(store.counts(2).get(s) for s in unfinished), 90, message="the cancel")
        except AssertionError as exc:  # say where the tasks are stuck
            stuck = [tuple(t) for t in store.db.execute(
                "SELECT id, status, server, prompt_id, cancel_requested FROM tasks "
                "WHERE batch_id = 2 AND status IN ('queued', 'running', 'submitted')")]
            raise AssertionError(f"{exc}: {stuck}") from None
        expect(page.get_by_text("Nothing is running.")).to_be_visible()
        assert store.counts(2).get("cancelled", 0) > 0
        shot(page, "overview-after-cancel")
    finally:
        context.close()


def test_gallery_previous_next_picks_and_picked_downloads(app, browser, store):
    prompts = [f"a small {animal} sitting on a green hill under a very wide evening sky in oil paint"
               for animal in ("fox", "owl", "cat", "hare")]
    submit_rows(app.settings, store, "captioned_image", [{"prompt": p, "seed": 11 + i} for i, p in enumerate(prompts)])
    wait_until(lambda: store.counts() == {"succeeded": 4}, 180, message="four images")
    # Image ids follow the order the images landed in, not the order of the rows.
    prompt_of = dict(store.db.execute("SELECT i.id, t.prompt FROM images i JOIN tasks t ON t.id = i.task_id"))
    hare = next(i for i, p in prompt_of.items() if p == prompts[3])
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1300})
    try:
        page = open_page(context.new_page(), app.url + "/gallery")
        expect(page.locator("img[src^='/files/thumb/']")).to_have_count(4)
        expect(page.get_by_text("a small hare sitting on a green hill under a ve… · seed 14 · 64×64", exact=True)
               ).to_be_visible()
        assert page.locator("a[title]").filter(has=page.locator(f"img[data-image-id='{hare}']")).get_attribute(
            "title") == prompts[3]
        shot(page, "gallery-captions")
        page.locator(".st-key-gopen_4 button").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Image 4 · 64×64")
        dialog.get_by_role("button", name="Next").click()
        expect(dialog).to_contain_text("Image 3 · 64×64")
        expect(dialog).to_contain_text(f"Prompt: {prompt_of[3]}")
        page.keyboard.press("ArrowRight")  # the keyboard works as well as the buttons
        expect(dialog).to_contain_text("Image 2 · 64×64")
        page.keyboard.press("ArrowLeft")
        expect(dialog).to_contain_text("Image 3 · 64×64")
        dialog.get_by_role("button", name="Pick", exact=False).click()
        expect(dialog.get_by_role("button", name="Picked")).to_be_visible()
        shot(page, "gallery-detail-picked")
        page.keyboard.press("Escape")
        expect(page.get_by_role("dialog")).to_have_count(0)
        settle(page)
        page.locator(".st-key-gpick_1 button").first.click()
        settle(page)
        expect(page.get_by_text("Showing 1-4 of 4 image(s); 2 picked in all batches")).to_be_visible()
        expect(page.locator(".st-key-gpick_3 button").first).to_have_text("★")
        page.get_by_text("Picked only").click()
        settle(page)
        expect(page.get_by_text("Showing 1-2 of 2 image(s); 2 picked in all batches")).to_be_visible()
        expect(page.locator("img[src^='/files/thumb/']")).to_have_count(2)
        shot(page, "gallery-picked-only")
        page.get_by_role("button", name="Prepare ZIP of 2 picked").click()
        settle(page)
        page.get_by_role("button", name="Prepare CSV of picked").click()
        settle(page)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download picked images ZIP").click()
        picked = queries.images_by_ids(store, [1, 3])  # images are numbered as they land, not by task
        paths = [img["path"] for img in picked]
        with zipfile.ZipFile(download.value.path()) as zf:
            assert sorted(zf.namelist()) == sorted(paths)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download picked results CSV").click()
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text("utf-8-sig"))))
        tasks = sorted(img["task_id"] for img in picked)
        assert [(r["task_id"], r["seed"]) for r in rows] == [(str(t), str(10 + t)) for t in tasks]
        page.get_by_text("Picked only").click()
        page.get_by_role("textbox", name="Parameter values").fill("seed=14")
        page.get_by_role("textbox", name="Parameter values").press("Enter")
        settle(page)
        expect(page.get_by_text("Showing 1-1 of 1 image(s)")).to_be_visible()
    finally:
        context.close()


def rgb(color: int) -> tuple[int, int, int]:
    return (color >> 16 & 255, color >> 8 & 255, color & 255)


def test_a_3x4_sweep_from_the_generate_page_its_grid_and_contact_sheet(app, browser, store):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1400})
    try:
        page = open_page(context.new_page(), app.url + "/generate")
        choose(page, "Workflow", "(empty_image)")
        open_expander(page, "Sweep: give parameters several values")
        for name in ("color", "width"):
            add_option(page, "Parameters to vary", name)
        page.get_by_label("Values of color, one per line").fill("\n".join(map(str, COLORS)))
        page.get_by_label("Values of color, one per line").press("Control+Enter")
        settle(page)
        page.get_by_label("Values of width, one per line").fill("\n".join(map(str, WIDTHS)))
        page.get_by_label("Values of width, one per line").press("Control+Enter")
        settle(page)
        expect(page.get_by_text("This makes 12 task(s) (3 color x 4 width)")).to_be_visible()
        shot(page, "generate-sweep")
        page.get_by_role("button", name="Generate", exact=True).click()
        settle(page)
        expect(page.get_by_text("Batch 1: 12 task(s) queued.")).to_be_visible()
        wait_until(lambda: store.counts(1) == {"succeeded": 12}, 180, message="the sweep")
        assert json.loads(store.get_batch(1)["axes"]) == {"color": [str(c) for c in COLORS], "width": [
            str(w) for w in WIDTHS]}

        page.get_by_role("link", name="See it as a comparison grid").click()
        settle(page)
        expect(page.get_by_text("Grid of batch 1: 3 x 4 cells, 12 with an image; batch 12/12 done")).to_be_visible()
        table = page.locator("table.cb-grid")
        expect(table.locator("img")).to_have_count(12)
        expect(table.locator("th.cb-col")).to_have_text([f"width = {w}" for w in WIDTHS])
        expect(table.locator("th.cb-row")).to_have_text([f"color = {c}" for c in COLORS])
        page.wait_for_function("() => [...document.querySelectorAll('table.cb-grid img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        shot(page, "grid-3x4")
        page.get_by_role("button", name="Prepare contact sheet (PNG)").click()
        settle(page)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download batch-1-grid.png").click()
        grid = grids.build(store, 1, "color", "width")
        lay = grids.layout(grid)
        with Image.open(download.value.path()) as sheet:
            labels = json.loads(sheet.text["comfybatch-grid"])
            sheet = sheet.convert("RGB")
            assert sheet.size == lay.size
            for r, color in enumerate(COLORS):
                for c in range(len(WIDTHS)):
                    x0, y0, x1, y1 = lay.cell_box(r, c)
                    assert sheet.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == rgb(color), (r, c)
            for box in [*(lay.row_label_box(r) for r in range(3)), *(lay.column_label_box(c) for c in range(4))]:
                assert sum(1 for p in sheet.crop(box).get_flattened_data() if sum(p) < 200) > 20, box
        assert labels["rows"] == [f"color = {c}" for c in COLORS]
        assert labels["cols"] == [f"width = {w}" for w in WIDTHS]
        page.get_by_role("button", name="Prepare grid ZIP").click()
        settle(page)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download batch-1-grid.zip").click()
        with zipfile.ZipFile(download.value.path()) as zf:
            assert len(zf.namelist()) == 12
    finally:
        context.close()
