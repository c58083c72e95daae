"""Peak memory of a large batch's results CSV and ZIP: streamed from disk (this code: core.exports, what the
pages' export links and the API use) against building the bytes in memory (`--base`: another checkout's
`service.results_csv_bytes` and `service.zip_bytes`, e.g. main before issue 12).

Each export runs in a fresh subprocess that reports its peak RSS (VmHWM) and wall time, over one database
filled here: `--tasks` tasks with an SD1.5-sized graph each in one batch, the first `--images` with a 64 KiB PNG.

    .venv/bin/python bench/exports.py [--tasks 100000] [--images 5000] [--base ../main]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from core.store import Store  # noqa: E402
from tests.support import make_settings  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from core import service
from core.config import Settings
from core.store import Store
kind, mode, db, out_dir, target = sys.argv[2:7]
settings = Settings(db_path=Path(db), output_dir=Path(out_dir))
store = Store(settings.db_path)
start = time.perf_counter()
if mode == "streamed":
    export = service.export_file(settings, store, kind, batch_id=1)
    size = export.path.stat().st_size
else:
    if kind == "csv":
        data = service.results_csv_bytes(settings, store, 1)
    else:
        data = service.zip_bytes(settings, store.images_for_batch(1))
    Path(target).write_bytes(data)
    size = len(data)
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so it would report the parent's peak.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss_mb": hwm / 1024, "seconds": seconds, "bytes": size}))
"""


def fill(settings, tasks: int, images: int) -> None:
    store = Store(settings.db_path)
    graph = json.loads((ROOT / "workflows" / "sd15_txt2img.json").read_text())
    rows = [{"params": {"prompt": f"一只小猪 pig number {i}, watercolour, soft light", "seed": i, "cfg": 7},
             "graph": graph, "seed": i, "prompt": f"一只小猪 pig number {i}", "row_number": i + 2}
            for i in range(tasks)]
    store.create_batch("export bench", "sd15_txt2img", rows)
    folder = settings.output_dir / "batch-00001"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.frombytes("RGB", (148, 148), os.urandom(148 * 148 * 3)).save(buf, "PNG")  # ~64 KiB, incompressible
    now = time.time()
    with store.write() as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded', finished_at = ?, attempts = 1 WHERE id <= ?",
                     (now, images))
        image_rows = []
        for task_id in range(1, images + 1):
            name = f"task-{task_id:06d}_9_00.png"
            (folder / name).write_bytes(buf.getvalue())
            image_rows.append((task_id, 1, "9", 0, f"batch-00001/{name}", name, "", "output", 148, 148, "RGB",
                               len(buf.getvalue()), now))
        conn.executemany("INSERT INTO images (task_id, batch_id, node_id, idx, path, filename, subfolder, type, "
                         "width, height, mode, size_bytes, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", image_rows)
    store.close()


def run(root: Path, kind: str, mode: str, settings, target: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), kind, mode, str(settings.db_path),
                          str(settings.output_dir), str(target)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--base", type=Path, help="a checkout whose service builds the bytes in memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), [])
        start = time.perf_counter()
        fill(settings, args.tasks, args.images)
        print(f"filled {args.tasks} tasks, {args.images} images in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        print("| export | code | peak RSS MB | seconds | output MB |\n|---|---|---|---|---|")
        for kind in ("csv", "zip"):
            variants = [(ROOT, "streamed", "this branch, streamed to a file")]
            if args.base:
                variants.append((args.base.resolve(), "bytes", f"{args.base.name}: bytes in memory"))
            for root, mode, label in variants:
                r = run(root, kind, mode, settings, Path(tmp) / f"out-{kind}-{mode}")
                print(f"| {kind} of {args.tasks:,} tasks / {args.images:,} images | {label} | {r['rss_mb']:.0f} | "
                      f"{r['seconds']:.1f} | {r['bytes'] / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
