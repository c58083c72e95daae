"""The first run: the README's first command on a machine with no ComfyUI ends with the app making images.

`scripts/setup.sh` (no COMFYUI_URL) installs the ComfyUI and the random-weight checkpoint under .cache/comfyui/,
which is exactly what the session fixtures `comfy_installed` and `sd15_checkpoint` make sure of; then a real
`streamlit run app.py` with nothing configured starts that ComfyUI on CPU as its local backend (the demo), and a
real Chromium clicks Generate on the page as it opens. With COMFYUI_URL set, no backend is started.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, expect

from core import backends
from core.store import Store
from tests.appserver import start_app
from tests.comfyui_harness import server as harness
from tests.support import ROOT, settle, wait_until

pytestmark = pytest.mark.browser
SHOTS = ROOT / "test-artifacts" / "screenshots"


def test_with_nothing_configured_the_generate_page_makes_an_image_with_the_demo(
        tmp_path: Path, browser: Browser, sd15_checkpoint: Path):
    assert harness.CACHE.resolve() == backends.DEMO_DIR.resolve()  # the install setup.sh makes is the harness's
    home = tmp_path / "comfy"
    for sub in ("input", "output", "temp", "user"):  # keep the shared install's own folders untouched
        (home / sub).mkdir(parents=True)
    port = harness.free_port()
    app = start_app(tmp_path / "app", [], demo="auto", backend_ports=f"{port}-{port}", backend_args=" ".join(
        f"--{sub}-directory {home / sub}" for sub in ("input", "output", "temp", "user")))
    state_file = app.settings.log_dir / "backends" / "cpu.json"
    store = Store(app.settings.db_path)
    try:
        wait_until(lambda: backends._read_json(state_file).get("state") == "running", 300,
                   message="the demo backend running")
        pid = backends._read_json(state_file)["pid"]
        assert [(s["url"], s["source"]) for s in store.servers()] == [(f"http://127.0.0.1:{port}", "local")]
        context = browser.new_context(viewport={"width": 1400, "height": 1300})
        page = context.new_page()
        page.goto(app.url + "/")
        settle(page)
        expect(page.get_by_text("its images are coloured noise").first).to_be_visible()  # on the Overview
        page.get_by_role("link", name="Make an image on the Generate page").click()
        page.wait_for_url("**/generate")
        settle(page)
        expect(page.get_by_text("its images are coloured noise").first).to_be_visible()  # and on Generate
        expect(page.get_by_test_id("stSidebar")).to_contain_text("Demo ComfyUI")
        # The demo's workflow is the one selected, and its form is drawn (server choices come from the backend).
        expect(page.get_by_role("combobox", name="Workflow")).to_have_value(
            "Demo: noise images (random-weight SD1.5) (demo_noise_sd15)", timeout=120_000)
        generate = page.get_by_role("button", name="Generate", exact=True)
        expect(generate).to_be_enabled(timeout=120_000)
        settle(page)
        generate.click()
        settle(page)
        wait_until(lambda: store.counts() == {"succeeded": 1}, 600, interval=1.0,
                   message=f"the demo image (counts {store.counts()})")
        image = page.locator("img[data-image-id]").first
        expect(image).to_be_visible(timeout=30_000)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "first-run-demo.png"))
        saved = app.settings.output_dir / store.images_for_task(1)[0]["path"]
        assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        context.close()
    finally:
        store.close()
        assert app.stop() in (0, -signal.SIGTERM)
    assert backends._start_time(pid) is None  # stopped with the app
    assert backends._read_json(state_file)["state"] == "stopped"


def test_with_comfyui_url_set_no_backend_is_started(tmp_path: Path, comfy: harness.ComfyServer):
    app = start_app(tmp_path, [comfy.url], demo="auto")
    try:
        health = requests.get(app.api + "/health", timeout=30).json()
        assert [(s["url"], s["source"]) for s in health["servers"]] == [(comfy.url, "config")]
    finally:
        assert app.stop() in (0, -signal.SIGTERM)
    assert not (app.settings.log_dir / "backends").exists()
