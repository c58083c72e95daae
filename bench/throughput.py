"""Throughput of `python -m core worker --until-idle` versus posting the same prompts straight to ComfyUI.

Both sides run against the same real ComfyUI (started here on a free loopback port), alternating, several
rounds; medians and the ratio are printed as one Markdown table. Every prompt is unique (no ComfyUI cache hits).

    .venv/bin/python bench/throughput.py [--trivial N] [--sd N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
import websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.comfy import ComfyClient  # noqa: E402
from core.store import Store  # noqa: E402
from tests.comfyui_harness import server as harness  # noqa: E402
from tests.support import make_settings, submit_rows  # noqa: E402

SALT = int(time.time()) % 100_000


def trivial_rows(n: int, round_no: int, offset: int) -> list[dict[str, str]]:
    return [{"1.color": str((SALT * 7919 + round_no * 100_003 + offset + i) % 16_777_215), "1.width": "64",
             "1.height": "64"} for i in range(n)]


def sd_rows(n: int, round_no: int, offset: int) -> list[dict[str, str]]:
    return [{"prompt": "a lighthouse at dusk", "seed": str(SALT * 1000 + round_no * 100_000 + offset + i),
             "steps": "2", "width": "64", "height": "64"} for i in range(n)]


def direct(url: str, graphs: list[dict], download: bool = False) -> float:
    """Post every prompt at once, then wait (on ComfyUI's websocket, no polling) until all have finished;
    seconds. With `download`, also fetch every output image as each prompt finishes, the least any tool that
    keeps the images must do."""
    client_id = uuid.uuid4().hex
    client = ComfyClient(url, client_id, 10, 120)
    ws = websocket.create_connection(url.replace("http://", "ws://") + f"/ws?clientId={client_id}",
                                     skip_utf8_validation=True)
    ids = [str(uuid.uuid4()) for _ in graphs]
    left = set(ids)
    start = time.perf_counter()
    for pid, graph in zip(ids, graphs, strict=True):
        client.submit(graph, pid)
    while left:
        message = json.loads(ws.recv())
        data = message.get("data", {})
        if message.get("type") == "executed" and download:
            for img in data.get("output", {}).get("images", []):
                client.view(img)
        if message.get("type") in ("execution_success", "execution_error"):
            left.discard(data.get("prompt_id"))
    elapsed = time.perf_counter() - start
    ws.close()
    client.close()
    return elapsed


def clear_history(url: str) -> None:
    requests.post(url + "/history", json={"clear": True}, timeout=30).raise_for_status()


def ours(settings, workflow: str, rows: list[dict]) -> tuple[float, int]:
    """Enqueue, then time `python -m core worker --until-idle` from start to exit; returns (seconds, images)."""
    store = Store(settings.db_path)
    result = submit_rows(settings, store, workflow, rows)
    env = {**os.environ, "COMFYUI_URL": settings.comfyui_urls[0], "COMFYBATCH_DB": str(settings.db_path),
           "COMFYBATCH_OUTPUT_DIR": str(settings.output_dir), "COMFYBATCH_WORKFLOWS_DIR": str(settings.workflows_dir),
           "COMFYBATCH_LOG_DIR": str(settings.log_dir), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "core", "worker", "--until-idle", "--quiet"], env=env, check=True)
    elapsed = time.perf_counter() - start
    counts = store.counts(result.batch_ids[0])
    images = len(store.images_for_batch(result.batch_ids[0]))
    store.close()
    assert counts == {"succeeded": len(rows)}, counts
    return elapsed, images


def measure(name: str, url: str, settings, workflow: str, make_rows, n: int, rounds: int) -> dict:
    from core.workflows import build_graph, get_workflow

    wf = get_workflow(settings.workflows_dir, workflow)
    d_times, dl_times, o_times = [], [], []
    make_rows(2, 99, 0)
    # warm-up: load models / first-run costs out of the measurement
    direct(url, [build_graph(wf, r)[1] for r in make_rows(2, 98, 0)])
    for r in range(rounds):
        d_rows, o_rows, dl_rows = make_rows(n, r, 0), make_rows(n, r, n), make_rows(n, r, 2 * n)
        # ComfyUI slows down as its in-memory history fills up (up to 10,000 entries): clear it before each
        # measurement so no side runs against a fuller server than the other.
        clear_history(url)
        d_times.append(direct(url, [build_graph(wf, row)[1] for row in d_rows]))
        clear_history(url)
        dl_times.append(direct(url, [build_graph(wf, row)[1] for row in dl_rows], download=True))
        clear_history(url)
        t, images = ours(settings, workflow, o_rows)
        assert images == n
        o_times.append(t)
    d, dl, o = statistics.median(d_times), statistics.median(dl_times), statistics.median(o_times)
    return {"bench": name, "n": n, "rounds": rounds, "direct_s": d, "direct_dl_s": dl, "ours_s": o,
            "direct_jobs_s": n / d, "direct_dl_jobs_s": n / dl, "ours_jobs_s": n / o, "ratio": d / o,
            "ratio_dl": dl / o, "direct_all": d_times, "direct_dl_all": dl_times, "ours_all": o_times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trivial", type=int, default=1000)
    ap.add_argument("--sd", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    harness.ensure_installed()
    harness.ensure_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        comfy = harness.ComfyServer(Path(tmp) / "comfy").start()
        try:
            settings = make_settings(Path(tmp), [comfy.url])
            results = []
            if args.trivial:
                results.append(measure("trivial EmptyImage 64x64", comfy.url, settings, "empty_image", trivial_rows,
                                       args.trivial, args.rounds))
            if args.sd:
                results.append(measure("SD1.5 random weights 64x64, 2 steps", comfy.url, settings, "sd15_txt2img",
                                       sd_rows, args.sd, args.rounds))
        finally:
            comfy.stop()
    print("| job | N | direct s | direct+download s | worker --until-idle s | direct jobs/s | "
          "direct+download jobs/s | ours jobs/s | ours/direct | ours/(direct+download) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['bench']} | {r['n']} | {r['direct_s']:.2f} | {r['direct_dl_s']:.2f} | {r['ours_s']:.2f} | "
              f"{r['direct_jobs_s']:.1f} | {r['direct_dl_jobs_s']:.1f} | {r['ours_jobs_s']:.1f} | {r['ratio']:.3f} | "
              f"{r['ratio_dl']:.3f} |")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
