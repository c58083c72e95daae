"""The real thing: `streamlit run app.py` as a subprocess against a real ComfyUI, driven in headless Chromium.

Waits on the app's own state (health endpoint, connection and script state, texts the pages print), never on
fixed sleeps. Screenshots of every page land in test-artifacts/screenshots/.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect

from core.scheduler import LEASE, Scheduler
from core.store import Store
from tests.appserver import AppServer, start_app
from tests.support import choose, make_settings, open_page, settle, settle_after_change, shot, upload

pytestmark = pytest.mark.browser
expect.set_options(timeout=20_000)

GOOD_CSV = "1.color,width,height,count\n16711680,32,32,1\n65280,48,32,2\n"
BAD_CSV = "1.color,width,heigth\n255,abc,32\n7,32,count\n"


@pytest.fixture
def app(comfy, tmp_path) -> Iterator[AppServer]:
    server = start_app(tmp_path, [comfy.url])
    yield server
    server.stop()


def test_csv_batch_to_live_tasks_to_gallery_zip(app, browser, tmp_path):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1300})
    store = Store(app.settings.db_path)
    try:
        # Tasks is open before anything is submitted; it must pick the work up by itself.
        tasks = open_page(context.new_page(), app.url + "/tasks")
        expect(tasks.get_by_text("Showing 0-0 of 0 task(s)")).to_be_visible()
        expect(tasks.get_by_role("dialog")).to_have_count(0)  # a deep link on a fresh server: no "Page not found"

        page = open_page(context.new_page(), app.url + "/batch")
        choose(page, "Workflow", "(empty_image)")
        (tmp_path / "bad.csv").write_text(BAD_CSV)
        upload(page, tmp_path / "bad.csv")
        alert = page.get_by_test_id("stAlertContentError")
        expect(alert).to_contain_text("problem(s) in 2 row(s); nothing will be enqueued until they are fixed.")
        expect(alert).to_contain_text("row 2, column 'width': expected an integer, got 'abc'")
        expect(alert).to_contain_text("row 3, column 'heigth': not a named parameter of this workflow")
        expect(page.get_by_role("button", name="Submit batch")).to_have_count(0)
        shot(page, "batch-errors")
        assert store.counts() == {}

        (tmp_path / "good.csv").write_text(GOOD_CSV)
        upload(page, tmp_path / "good.csv")
        expect(page.get_by_text("Ready: 3 task(s) from 2 row(s) in 1 batch(es).")).to_be_visible()
        page.get_by_role("button", name="Submit batch").click()
        settle(page)
        expect(page.get_by_text("Batch 1: 3 task(s) queued.")).to_be_visible()
        shot(page, "batch")

        expect(tasks.get_by_text("Batch 1: 3/3 done (100%) - 3 succeeded")).to_be_visible(timeout=60_000)
        expect(tasks.get_by_text("Showing 1-3 of 3 task(s)")).to_be_visible()
        tasks.bring_to_front()  # a background tab does not repaint the grid's canvas
        tasks.wait_for_timeout(500)
        shot(tasks, "tasks")
        assert store.counts() == {"succeeded": 3}

        gallery = open_page(page, app.url + "/gallery")
        thumbs = gallery.locator("img[src^='/files/thumb/']")
        expect(thumbs).to_have_count(3)
        gallery.wait_for_function("() => [...document.querySelectorAll(\"img[src^='/files/thumb/']\")]"
                                  ".every(i => i.complete && i.naturalWidth > 0)")
        shot(gallery, "gallery")
        gallery.get_by_role("button", name="Pick all on this page", exact=True).click()
        settle(gallery)
        expect(gallery.get_by_text("Showing 1-3 of 3 image(s); 3 picked in all batches")).to_be_visible()
        gallery.get_by_role("button", name="Prepare ZIP of 3 picked").click()
        settle(gallery)
        with gallery.expect_download() as download:
            gallery.get_by_role("link", name="Download picked images ZIP").click()
        images = store.images_for_batch(1)
        with zipfile.ZipFile(download.value.path()) as zf:
            assert sorted(zf.namelist()) == sorted(img["path"] for img in images)
            for img in images:
                assert zf.read(img["path"]) == (app.settings.output_dir / img["path"]).read_bytes()

        gallery.locator("[class*='st-key-gopen_'] button").first.click()
        settle(gallery)
        dialog = gallery.get_by_role("dialog")
        expect(dialog).to_contain_text("workflow empty_image")
        expect(dialog).to_contain_text(f"server {app.settings.comfyui_urls[0]}")
        expect(dialog.get_by_test_id("stTable")).to_contain_text("color")  # every parameter, as a table
        shot(gallery, "gallery-detail")
        dialog.get_by_role("button", name="Re-run with changes").click()
        settle(gallery)
        expect(gallery.get_by_text("Prefilled from task")).to_be_visible()
        settle(gallery)
        expect(gallery.get_by_test_id("stNumberInput").first).to_be_visible()
        shot(gallery, "generate")

        servers = open_page(gallery, app.url + "/servers")
        expect(servers.get_by_text(f"{app.settings.comfyui_urls[0]}: up, ComfyUI 0.")).to_be_visible()
        shot(servers, "servers")

        thumb = requests.get(f"{app.url}/files/thumb/{images[0]['id']}", timeout=5)
        assert (thumb.status_code, thumb.headers["content-type"]) == (200, "image/webp")
        assert requests.get(f"{app.url}/files/image/999", timeout=5).status_code == 404
        assert requests.get(f"{app.url}/files/image/..%2Ftasks.db", timeout=5).status_code in (400, 404)
    finally:
        context.close()
        store.close()

    assert app.stop() in (0, -signal.SIGTERM)
    log = app.log.read_text()
    assert "took the lease" in log and "INFO core.app: scheduler" in log and log.rstrip().endswith("stopped")
    assert "page error" not in log and "callback error" not in log
    after = Store(app.settings.db_path)
    try:
        assert after.lease_holder(LEASE) is None  # released on shutdown, not left to expire
    finally:
        after.close()


def test_a_deep_link_on_a_fresh_server_gets_the_same_frame_on_every_page(app, browser):
    """The first session of a fresh server opens a deep link (not the root): every page must still come with
    ComfyBatch's navigation, sidebar status and wide layout, as it does after a visit to the root."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        seen = {}
        for key, title in (("gallery", "Gallery"), ("servers", "Servers"), ("batch", "Batch"), ("tasks", "Tasks"),
                           ("generate", "Generate"), ("", "Overview")):
            page = open_page(context.new_page(), f"{app.url}/{key}")
            expect(page.get_by_role("heading", name=title, level=1)).to_be_visible()
            expect(page.get_by_test_id("stSidebar")).to_contain_text("Servers: 1 up")
            nav = page.get_by_test_id("stSidebarNav").get_by_role("link")
            links = [text.split("\n")[-1] for text in nav.all_inner_texts()]  # after the icon's name
            width = page.get_by_test_id("stMainBlockContainer").bounding_box()["width"]
            seen[key] = (links, page.title(), width > 1000)
            if key == "gallery":
                shot(page, "deep-link-gallery")
            page.close()
        nav = ["Overview", "Generate", "Batch", "Tasks", "Gallery", "Grid", "Servers", "Account"]
        assert {k: v[0] for k, v in seen.items()} == {k: nav for k in seen}
        assert {k: v[2] for k, v in seen.items()} == {k: True for k in seen}  # the wide layout of page_config
        assert all("ComfyBatch" in v[1] for v in seen.values())
    finally:
        context.close()


def test_results_csv_and_a_second_app_waits_for_the_lease(comfy, browser, tmp_path):
    settings = make_settings(tmp_path, [comfy.url])
    store = Store(settings.db_path)
    holder = Scheduler(settings, store, owner="test-holder")
    holder.start()  # holds the lease: the app's own scheduler must stand by
    try:
        deadline = time.monotonic() + 10
        while store.lease_holder(LEASE) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        server = start_app(tmp_path, [comfy.url])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1100})
            page = open_page(context.new_page(), server.url + "/generate")
            expect(page.get_by_text(f"Scheduler: running in another process (pid {os.getpid()}")).to_be_visible()
            choose(page, "Workflow", "(empty_image)")
            page.get_by_label("Width").fill("24")
            page.get_by_label("Width").press("Enter")
            settle_after_change(page)
            expect(page.get_by_label("Width")).to_have_value("24")
            page.get_by_role("button", name="Generate", exact=True).click()
            settle(page)
            expect(page.get_by_text("Batch 1: 1/1 done (100%) - 1 succeeded")).to_be_visible(timeout=60_000)
            page = open_page(page, server.url + "/gallery")
            choose(page, "Batch", "#1 ")
            page.get_by_role("button", name="Prepare batch 1 results CSV").click()
            settle(page)
            with page.expect_download() as download:
                page.get_by_role("link", name="Download results CSV").click()
            rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text("utf-8-sig"))))
            assert [(r["task_id"], r["width"], r["status"], r["server"]) for r in rows] == [
                ("1", "24", "succeeded", comfy.url)]
            assert rows[0]["images"] == store.images_for_task(1)[0]["path"]
            context.close()
        finally:
            assert server.stop() in (0, -signal.SIGTERM)
        assert store.lease_holder(LEASE)["owner"] == "test-holder"
    finally:
        holder.stop()
        store.close()
