"""Fair share: time to the first image of a small batch submitted behind a big one, fair versus fifo.

Two real ComfyUI servers (started here). A big batch of SD1.5 random-weight 64x64 2-step tasks is running;
then a small batch of 3 such tasks arrives at the same priority. Measured: seconds from the small batch's
submission to its first image and to its last. With `fair` the big batch is cancelled once the small one is
done (nothing more to learn); with `fifo` the small batch waits for the big one to finish.

    .venv/bin/python bench/fairness.py [--big N]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from fleet_common import run_until_idle, servers

from core import service
from core.store import Store
from tests.support import make_settings, submit_rows


def rows(n: int, offset: int) -> list[dict]:
    return [{"prompt": "a lighthouse", "seed": offset + i, "steps": 2, "width": 64, "height": 64} for i in range(n)]


def one_policy(work: Path, urls: list[str], policy: str, big: int) -> tuple[float, float]:
    home = work / policy
    home.mkdir()
    settings = make_settings(home, urls, policy=policy)
    store = Store(settings.db_path)
    marks: dict[str, float] = {}
    try:
        big_id = submit_rows(settings, store, "sd15_txt2img", rows(big, 0), name="big").batch_ids[0]

        def submit_small_when_running() -> None:
            while store.counts(big_id).get("succeeded", 0) < 4:
                time.sleep(0.05)
            marks["submitted"] = time.perf_counter()
            small = submit_rows(settings, store, "sd15_txt2img", rows(3, 10_000), name="small").batch_ids[0]
            while store.counts(small).get("succeeded", 0) < 1:
                time.sleep(0.02)
            marks["first"] = time.perf_counter()
            while store.counts(small).get("succeeded", 0) < 3:
                time.sleep(0.02)
            marks["last"] = time.perf_counter()
            if policy == "fair":
                service.cancel_batch(store, big_id)

        watcher = threading.Thread(target=submit_small_when_running, daemon=True)
        watcher.start()
        run_until_idle(settings, store, stop_when=lambda: "last" in marks and not store.in_flight_tasks())
        watcher.join(5)
    finally:
        store.close()
    return marks["first"] - marks["submitted"], marks["last"] - marks["submitted"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=40, help="tasks in the big batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="comfybatch-fairness-") as tmp:
        work = Path(tmp)
        with servers(work, 2) as started:
            results = {policy: one_policy(work, [s.url for s in started], policy, args.big)
                       for policy in ("fifo", "fair")}
    print("| policy | big batch | small batch | first image of the small batch s | all 3 s |")
    print("|---|---|---|---|---|")
    for policy, (first, last) in results.items():
        print(f"| {policy} | {args.big} | 3 | {first:.1f} | {last:.1f} |")


if __name__ == "__main__":
    main()
