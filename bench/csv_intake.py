"""CSV intake: 10,000 rows (Chinese and English prompts, GBK-encoded) read, validated against the SD1.5
template and enqueued in one transaction. Median of several runs, each into a fresh database.

    .venv/bin/python bench/csv_intake.py [--rows N] [--runs R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.store import Store  # noqa: E402
from tests.support import make_settings, submit_csv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    lines = ["prompt,negative_prompt,seed,steps,width,height,count"]
    for i in range(args.rows):
        lines.append(f"第{i}页：一只粉色的小猪在花园里 page {i} a pig in a garden,模糊,{i},{20 + i % 10},"
                     f"{512 + 64 * (i % 4)},768,1")
    data = "\n".join(lines).encode("gb18030")
    times = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            settings = make_settings(Path(tmp), [])
            store = Store(settings.db_path)
            start = time.perf_counter()
            result = submit_csv(settings, store, data, "jobs.csv", "sd15_txt2img")
            times.append(time.perf_counter() - start)
            assert store.counts() == {"queued": args.rows} and len(result.task_ids) == args.rows
            store.close()
    print(f"| CSV intake, {args.rows} rows GB18030 -> validated -> enqueued | {args.runs} runs | "
          f"median {statistics.median(times):.3f} s | min {min(times):.3f} s | max {max(times):.3f} s |")


if __name__ == "__main__":
    main()
