"""Server-side time to build the Overview and Tasks pages with 100,000 tasks and the Gallery page with 10,000
images (the first `--images` tasks succeeded in the last hour, a few failed, the rest queued in 10 batches).

Runs the real page scripts through Streamlit's AppTest (the script run is what the server does per refresh;
the browser's rendering is not included), against a database filled here. Median of several reruns after
a first warm-up run (which also writes the visible thumbnails once).

    .venv/bin/python bench/ui_pages.py [--tasks N] [--images N] [--runs R]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from core.store import Store  # noqa: E402
from tests.support import make_settings  # noqa: E402


def fill(settings, tasks: int, images: int) -> None:
    store = Store(settings.db_path)
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 1}}}
    done = 0
    while done < tasks:
        n = min(10_000, tasks - done)
        rows = [{"params": {"prompt": f"一只小猪 pig number {done + i}"}, "graph": graph, "seed": done + i,
                 "prompt": f"一只小猪 pig number {done + i}", "row_number": i + 2} for i in range(n)]
        store.create_batch(f"bench {done // 10_000}", "empty_image", rows)
        done += n
    # the first `images` tasks succeed, with one small PNG each
    folder = settings.output_dir / "batch-00001"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, "PNG")
    now = time.time()
    with store.write() as conn:
        # finished over the last hour, each run 2-5 s (the Overview's charts read these)
        conn.execute("UPDATE tasks SET status = 'succeeded', finished_at = ? - (id % 3600), started_at = "
                     "? - (id % 3600) - 2 - (id % 4), server = 'http://gpu-' || (id % 2 + 1) || ':8188', "
                     "attempts = 1, progress_value = 20, progress_max = 20 WHERE id <= ?", (now, now, images))
        conn.execute("UPDATE tasks SET status = 'failed', finished_at = ? - id, error = 'ComfyUI execution error: "
                     "out of memory' WHERE id > ? AND id <= ? AND id % 7 = 0", (now, images + 2, images + 200))
        conn.execute("UPDATE tasks SET status = 'running', progress_value = 5, progress_max = 20 "
                     "WHERE id > ? AND id <= ?", (images, images + 2))
        rows = []
        for task_id in range(1, images + 1):
            name = f"task-{task_id:06d}_9_00.png"
            (folder / name).write_bytes(buf.getvalue())
            rows.append((task_id, 1, "9", 0, f"batch-00001/{name}", name, "", "output", 64, 64, "RGB",
                         len(buf.getvalue()), now - task_id % 3600))
        conn.executemany("INSERT INTO images (task_id, batch_id, node_id, idx, path, filename, subfolder, type, "
                         "width, height, mode, size_bytes, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    store.close()


def time_page(page: str, runs: int) -> list[float]:
    at = AppTest.from_file(str(ROOT / "ui_main.py"), default_timeout=120)
    if page != "overview":
        at.switch_page(f"pages/{page}.py")
    at.run()  # warm-up: imports, caches, thumbnails of the first page
    assert not at.exception, [e.value for e in at.exception]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        assert not at.exception, [e.value for e in at.exception]
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), ["http://127.0.0.1:9"])  # a closed port: no server answers
        os.environ.update(COMFYUI_URL="http://127.0.0.1:9", COMFYBATCH_DB=str(settings.db_path),
                          COMFYBATCH_OUTPUT_DIR=str(settings.output_dir),
                          COMFYBATCH_WORKFLOWS_DIR=str(settings.workflows_dir),
                          COMFYBATCH_LOG_DIR=str(settings.log_dir))
        start = time.perf_counter()
        fill(settings, args.tasks, args.images)
        print(f"filled {args.tasks} tasks and {args.images} images in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        for page, target in (("overview", 0.3), ("tasks", 0.3), ("gallery", 0.5)):
            times = time_page(page, args.runs)
            print(f"| {page} page | {args.tasks} tasks, {args.images} images | {args.runs} reruns | median "
                  f"{statistics.median(times):.3f} s | min {min(times):.3f} s | max {max(times):.3f} s | "
                  f"target < {target} s |")


if __name__ == "__main__":
    main()
