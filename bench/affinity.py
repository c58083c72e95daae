"""Model affinity: checkpoint loads with COMFYBATCH_AFFINITY on and off.

Two real ComfyUI servers (started here) and two distinct random-weight SD1.5 checkpoints; two batches of N
tasks each (one per checkpoint), submitted one after the other, so that fair share interleaves them. The
scheduler runs in process until both are done; model loads are counted from each server's log (ComfyUI logs
`model_type ...` for every checkpoint it loads). Servers are restarted between modes (cold caches).

    .venv/bin/python bench/affinity.py [--tasks N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fleet_common import SECOND, run_until_idle, servers

from core.store import Store
from tests.support import make_settings, submit_rows


def one_mode(work: Path, fleet: list, affinity: bool, tasks: int) -> tuple[int, float, list[int]]:
    for server in fleet:
        server.restart()
    before = [s.model_loads() for s in fleet]
    home = work / ("on" if affinity else "off")
    home.mkdir()
    settings = make_settings(home, [s.url for s in fleet], affinity=affinity)
    store = Store(settings.db_path)
    try:
        for i, checkpoint in enumerate(("random_sd15.safetensors", SECOND)):
            submit_rows(settings, store, "sd15_txt2img", [
                {"prompt": "a lighthouse", "seed": 1000 * i + n, "steps": 2, "width": 64, "height": 64,
                 "checkpoint": checkpoint} for n in range(tasks)], name=f"model {i}")
        seconds = run_until_idle(settings, store)
        assert store.counts() == {"succeeded": 2 * tasks}, store.counts()
    finally:
        store.close()
    per_server = [s.model_loads() - b for s, b in zip(fleet, before, strict=True)]
    return sum(per_server), seconds, per_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8, help="tasks per batch (one batch per checkpoint)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="comfybatch-affinity-") as tmp:
        work = Path(tmp)
        with servers(work, 2) as started:
            rows = []
            for affinity in (False, True):
                loads, seconds, per_server = one_mode(work, started, affinity, args.tasks)
                rows.append((affinity, loads, seconds, per_server))
    print("| affinity | tasks | checkpoint loads | loads per server | wall s |")
    print("|---|---|---|---|---|")
    for affinity, loads, seconds, per_server in rows:
        print(f"| {'on' if affinity else 'off'} | {2 * args.tasks} | {loads} | {per_server} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
