"""Scale-out benchmark: `python -m core worker --until-idle` (one or several processes) feeding a simulated
fleet (tests/fake_fleet.py, run in a process of its own) of N servers with fixed job times.

For each scenario it prints the ratio of ideal (servers / job time) in two ways: **steady** = the fraction of
server time spent running prompts between the moment the last server started its first prompt and the moment
the first server ran out of work (start-up and the final drain left out), and **end-to-end** = ideal time /
the worker's wall time from process start to exit. Also: collection lag (a task's `finished_at` in SQLite
minus the moment its server finished it; p50 and p95), how long the worker took to exit after the last
result, the scheduler's CPU (user+sys of the worker processes) per job, over the whole run and over the steady
window alone (the process's start, its imports and websocket handshakes, left out), the simulated fleet's own CPU
per job (it
shares the machine: the two together bound what one 2-core box can show), the CPU one small file write costs in
the batch's image folder (`file_create_ms`: this machine's ext4 varies 30-fold by folder), and, with several
workers, how the fleet's servers were split between them (sampled from the leases table).

    .venv/bin/python bench/fleet.py                       # the issue 10 table
    .venv/bin/python bench/fleet.py --only 64x0.2 --profile prof.out   # one scenario, worker under cProfile
    .venv/bin/python bench/fleet.py --dir /dev/shm        # database and images on tmpfs: no file system noise
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
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import files  # noqa: E402
from core.store import Store  # noqa: E402
from tests.support import make_settings, worker_env  # noqa: E402

# (servers, job seconds, rtt seconds, worker processes)
SCENARIOS = {"1x0.2": (1, 0.2, 0.0, 1), "8x0.2": (8, 0.2, 0.0, 1), "32x0.2": (32, 0.2, 0.0, 1),
             "64x0.2": (64, 0.2, 0.0, 1), "32x0.1": (32, 0.1, 0.0, 1), "32x0.2-rtt80": (32, 0.2, 0.08, 1),
             "64x0.2-2workers": (64, 0.2, 0.0, 2)}
GRAPH = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fleet"}}}
# Every task carries a prompt of the length our users write (it is indexed for search, like theirs).
PROMPT = ("masterpiece, best quality, a watercolor picture-book illustration of a small fox reading a book under "
          "an oak tree, soft afternoon light, 绘本插画, 柔和的色彩, falling autumn leaves")


def file_create_ms(folder: Path, n: int = 300) -> float:
    """CPU ms to write one small file the way the collector does (create a temp name, write, rename) in `folder`.
    On this machine's ext4 it ranges from about 0.03 to 0.9 ms by folder (where the folder's inodes landed),
    and it is part of the worker's CPU per job: the column tells a slow folder from a slow scheduler."""
    folder.mkdir(parents=True, exist_ok=True)
    data = bytes(300)
    start = time.process_time()
    for i in range(n):
        tmp, final = folder / f".calib-{i}.part", folder / f".calib-{i}.png"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.replace(tmp, final)
    spent = time.process_time() - start
    for i in range(n):
        (folder / f".calib-{i}.png").unlink()
    return 1000 * spent / n


def start_fleet(servers: int, job: float, rtt: float) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_fleet", "--servers", str(servers), "--job", str(job),
                             "--rtt", str(rtt)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    urls = [proc.stdout.readline().strip() for _ in range(servers)]
    return proc, urls


def process_cpu(pid: int) -> float:
    """user+sys CPU seconds a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_at(samples: list[tuple[float, float]], moment: float) -> float:
    """The workers' CPU seconds at `moment`, interpolated between the samples around it."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:], strict=False):
        if t0 <= moment <= t1:
            return c0 + (c1 - c0) * (moment - t0) / (t1 - t0) if t1 > t0 else c1
    return samples[-1][1] if samples and moment > samples[-1][0] else (samples[0][1] if samples else 0.0)


def run(name: str, seconds: float, in_flight: int | None, profile: str | None,
        thread_cpu: bool = False, where: str | None = None) -> dict[str, Any]:
    servers, job, rtt, workers = SCENARIOS[name]
    tasks = max(20, int(servers / job * seconds))
    fleet, urls = start_fleet(servers, job, rtt)
    try:
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            settings = make_settings(Path(tmp), urls)
            store = Store(settings.db_path)
            batch_id, _ = store.create_batch("fleet", "fleet", [{"params": {"prompt": PROMPT}, "prompt": PROMPT,
                                                                "graph": GRAPH} for _ in range(tasks)])
            create_ms = file_create_ms(files.batch_dir(settings.output_dir, batch_id))
            env = {**worker_env(settings), "COMFYBATCH_LEASE_SECONDS": "5"}
            if in_flight:
                env["COMFYBATCH_IN_FLIGHT"] = str(in_flight)
            wrap = ([str(ROOT / "bench" / "profile_threads.py"), profile] if profile
                    else [str(ROOT / "bench" / "thread_cpu.py")] if thread_cpu else [])
            cmd = [sys.executable, *wrap, "-m", "core", "worker", "--until-idle", "--quiet"]
            start = time.time()
            procs = [subprocess.Popen(cmd, cwd=tmp, env=env, stderr=subprocess.PIPE if thread_cpu else None,
                                      text=True) for _ in range(workers)]
            cpu, sys_cpu, exits, splits = 0.0, 0.0, [], []
            samples: list[tuple[float, float]] = []  # (wall time, the workers' CPU seconds so far)
            left = {p.pid for p in procs}
            while left:
                try:
                    samples.append((time.time(), cpu + sum(process_cpu(p) for p in left)))
                except (OSError, ValueError, IndexError):
                    pass  # a worker exiting between the reap and the read: no sample this round
                # Reap as they exit (wait4 gives each child's own CPU); sample the lease split meanwhile.
                pid, status, usage = os.wait4(-1, os.WNOHANG)
                if pid:
                    left.discard(pid)
                    cpu += usage.ru_utime + usage.ru_stime
                    sys_cpu += usage.ru_stime
                    exits.append(time.time())
                    continue
                owners = Counter(r[0] for r in store.db.execute(
                    "SELECT owner FROM leases WHERE name LIKE 'server:%' AND expires_at > ?", (time.time(),)))
                if owners:
                    splits.append(tuple(sorted(owners.values(), reverse=True)))
                time.sleep(0.2)
            wall = max(exits) - start
            by_thread = [line for p in procs if p.stderr for line in p.stderr.read().splitlines()
                         if line.startswith("THREAD-CPU ")]
            counts = store.counts()
            finished = {r[0]: r[1] for r in store.db.execute(
                "SELECT prompt_id, finished_at FROM tasks WHERE status = 'succeeded'")}
            store.close()
        with urllib.request.urlopen(urls[0] + "/_stats", timeout=30) as reply:
            stats = json.loads(reply.read())
        fleet_cpu = process_cpu(fleet.pid)
    finally:
        fleet.terminate()
        fleet.wait()
    runs = [r for s in stats["servers"] for r in s["runs"]]
    received = [p for s in stats["servers"] for p in s["received"]]
    first_all = max(min(r[1] for r in s["runs"]) for s in stats["servers"])
    last_all = min(max(r[2] for r in s["runs"]) for s in stats["servers"])
    window = last_all - first_all
    busy = sum(max(0.0, min(f, last_all) - max(b, first_all)) for _, b, f in runs)
    # The workers' CPU per job between those two moments: what a fleet's scheduler costs once it runs, without
    # the process's start (imports, websocket handshakes, the first reconciles) and its exit.
    steady_jobs = sum(1 for _, _, f in runs if first_all <= f <= last_all)
    steady_cpu = cpu_at(samples, last_all) - cpu_at(samples, first_all)
    lags = sorted(finished[p] - f for p, _, f in runs if p in finished)
    return {
        "scenario": name, "servers": servers, "job": job, "rtt": rtt, "workers": workers, "tasks": tasks,
        "counts": counts, "prompts_received": len(received), "duplicates": len(received) - len(set(received)),
        "steady": busy / (servers * window) if window > 0 else float("nan"), "window_s": window,
        "end_to_end": tasks * job / servers / wall, "wall_s": wall,
        "lag_p50": statistics.median(lags), "lag_p95": lags[int(0.95 * (len(lags) - 1))],
        "exit_after_last_s": max(exits) - max(finished.values()), "cpu_ms_per_job": 1000 * cpu / tasks,
        "sys_cpu_ms_per_job": 1000 * sys_cpu / tasks,
        "steady_cpu_ms_per_job": 1000 * steady_cpu / steady_jobs if steady_jobs else float("nan"),
        "fleet_cpu_ms_per_job": 1000 * fleet_cpu / tasks, "file_create_ms": create_ms,
        "thread_cpu_ms_per_job": {k: round(1000 * float(v) / tasks, 3) for line in by_thread
                                  for k, v in (kv.split("=") for kv in line.split()[1:])},
        "split": Counter(splits).most_common(1)[0][0] if splits else (), "load": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="scenario(s) to run")
    parser.add_argument("--seconds", type=float, default=15.0, help="ideal duration of each scenario's queue")
    parser.add_argument("--in-flight", type=int, help="COMFYBATCH_IN_FLIGHT for the worker")
    parser.add_argument("--profile", help="run the (single) worker under cProfile, writing this file")
    parser.add_argument("--thread-cpu", action="store_true",
                        help="print the worker's CPU ms per job by thread kind (ws, dispatch, collect, ...)")
    parser.add_argument("--json", action="store_true", help="also print each result as JSON")
    parser.add_argument("--dir", help="make each run's database and images under this folder (e.g. /dev/shm, a "
                                      "tmpfs: the scheduler's CPU without this machine's ext4 file creation cost)")
    args = parser.parse_args()
    print("| scenario | tasks | steady | end-to-end | wall s | lag p50 s | lag p95 s | exit after last s | "
          "CPU ms/job | steady CPU ms/job | file create ms | fleet CPU ms/job | split | ok | load avg (1/5 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.only or list(SCENARIOS):
        r = run(name, args.seconds, args.in_flight, args.profile, args.thread_cpu, args.dir)
        ok = r["counts"] == {"succeeded": r["tasks"]} and r["prompts_received"] == r["tasks"] and not r["duplicates"]
        print(f"| {name} | {r['tasks']} | **{r['steady']:.3f}** | {r['end_to_end']:.3f} | {r['wall_s']:.2f} | "
              f"{r['lag_p50']:.3f} | {r['lag_p95']:.3f} | {r['exit_after_last_s']:.2f} | {r['cpu_ms_per_job']:.2f} | "
              f"{r['steady_cpu_ms_per_job']:.2f} | "
              f"{r['file_create_ms']:.2f} | {r['fleet_cpu_ms_per_job']:.2f} | "
              f"{'/'.join(map(str, r['split']))} | {'yes' if ok else 'NO ' + str(r['counts'])} | "
              f"{r['load'][0]:.2f} / {r['load'][1]:.2f} |", flush=True)
        if args.thread_cpu:
            print(f"  per job by thread kind (CPU ms; *_switches_k: context switches): "
                  f"{r['thread_cpu_ms_per_job']}", flush=True)
        if args.json:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
