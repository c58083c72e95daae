"""Resident memory of the `streamlit run app.py` process (pages + scheduler + API in one process) while a
5,000-task batch runs on a real ComfyUI with two headless Chromium sessions open on live pages (`--paths`: the
Tasks and Gallery pages by default; `--paths /,/` for two sessions on the Overview), for `--minutes` (the
target scenario is an hour; pass --minutes 60).

    .venv/bin/python bench/ui_memory.py [--tasks 5000] [--minutes 60] [--paths /tasks,/gallery] [--slow]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from core.store import Store  # noqa: E402
from tests.appserver import start_app  # noqa: E402
from tests.comfyui_harness import server as harness  # noqa: E402
from tests.support import CHROMIUM, CHROMIUM_ARGS, settle, submit_rows  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--paths", default="/tasks,/gallery", help="comma-separated pages, one browser session each")
    ap.add_argument("--slow", action="store_true",
                    help="512 px blur jobs (about 0.7 s each here), so 5,000 tasks take about an hour")
    args = ap.parse_args()
    harness.ensure_installed()
    with tempfile.TemporaryDirectory() as tmp:
        comfy = harness.ComfyServer(Path(tmp) / "comfy").start()
        app = start_app(Path(tmp) / "app", [comfy.url])
        samples: list[tuple[float, float]] = []
        try:
            store = Store(app.settings.db_path)
            if args.slow:
                rows = [{"1.color": str(i), "1.width": "512", "1.height": "512"} for i in range(args.tasks)]
            else:
                rows = [{"color": str(i), "width": "64", "height": "64"} for i in range(args.tasks)]
            result = submit_rows(app.settings, store, "slow_blur" if args.slow else "empty_image", rows,
                                         name="memory bench")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                pages = []
                for path in args.paths.split(","):
                    page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
                    page.goto(app.url + path)
                    settle(page)
                    pages.append(page)
                start = time.monotonic()
                finished_at = None
                while time.monotonic() - start < args.minutes * 60:
                    samples.append((time.monotonic() - start, rss_mb(app.proc.pid)))
                    print(f"{samples[-1][0]:.0f} s: {samples[-1][1]:.0f} MB", file=sys.stderr, flush=True)
                    if finished_at is None and not store.has_pending_work():
                        finished_at = time.monotonic() - start
                        pages[-1].reload()  # a page opened anew after the batch finished
                    pages[0].wait_for_timeout(10_000)
                browser.close()
            counts = store.counts(result.batch_ids[0])
            store.close()
        finally:
            app.stop()
            comfy.stop()
    peak = max(s[1] for s in samples)
    kind = "slow" if args.slow else "trivial"
    print(f"| streamlit process RSS | {args.tasks} {kind} tasks ({counts}), batch done after "
          f"{finished_at if finished_at is None else round(finished_at)} s, {len(pages)} Chromium sessions on "
          f"{args.paths}, "
          f"{args.minutes:g} min | start {samples[0][1]:.0f} MB | peak {peak:.0f} MB | end {samples[-1][1]:.0f} MB "
          f"| target < 500 MB |")


if __name__ == "__main__":
    main()
