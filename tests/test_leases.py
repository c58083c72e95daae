"""Several scheduler processes on one database: the servers are leased one by one, split between the
`python -m core worker` processes, and a process killed with `kill -9` mid-batch has its servers taken over
once their leases run out, with no task lost and none run twice.

The servers are the simulated fleet (tests/fake_fleet.py): a real ComfyUI per worker process does not fit on
this machine, and the fleet's own record of every prompt it received is what shows nothing ran twice.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from core import service
from core.store import Store
from tests.fake_fleet import Fleet
from tests.support import make_settings, wait_until, worker_env

pytestmark = pytest.mark.slow
GRAPH = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fleet"}}}


def start_worker(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with open(cwd / f"worker-{time.monotonic_ns()}.err", "wb") as err:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "core", "worker", "--until-idle", "--quiet"], env=env,
                                cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)


def owners_by_pid(store: Store) -> dict[str, int]:
    """url -> pid of the scheduler process holding that server's lease (owners are named `<pid>-<random>`)."""
    return {url: int(feeder["owner"].split("-")[0]) for url, feeder in store.server_feeders().items()}


def test_two_workers_split_the_fleet_and_one_killed_mid_batch_is_taken_over(tmp_path):
    with Fleet(4, job=0.25) as fleet:
        settings = make_settings(tmp_path, fleet.urls)
        store = Store(settings.db_path)
        _, ids = store.create_batch("fleet", "fleet", [{"params": {"n": i}, "graph": GRAPH} for i in range(60)])
        env = worker_env(settings)  # COMFYBATCH_LEASE_SECONDS=2
        first, second = start_worker(env, tmp_path), start_worker(env, tmp_path)
        try:
            wait_until(lambda: Counter(owners_by_pid(store).values()) == {first.pid: 2, second.pid: 2}, 60,
                       message="the two workers to hold two servers each")
            # The Servers page, /health and `python -m core servers` say which process feeds each server.
            fed = Counter(s["fed_by"] for s in service.server_health(settings, store))
            host = socket.gethostname()
            assert fed == {f"pid {first.pid} on {host}": 2, f"pid {second.pid} on {host}": 2}, fed
            wait_until(lambda: store.counts().get("succeeded", 0) >= 10, 60, message="ten tasks done")
            victims = [url for url, pid in owners_by_pid(store).items() if pid == first.pid]
            assert len(victims) == 2 and store.counts().get("queued", 0) > 10  # mid-batch, both feeding
            os.kill(first.pid, signal.SIGKILL)
            killed_at = time.time()
            first.wait(30)
            assert second.wait(120) == 0
        finally:
            for proc in (first, second):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        record = fleet.stats()
    assert store.counts() == {"succeeded": 60}
    received = [p for s in record["servers"] for p in s["received"]]
    ran = [r[0] for s in record["servers"] for r in s["runs"]]
    # Nothing posted twice, nothing run twice, and each task's result is from the one prompt that ran for it.
    assert len(received) == len(set(received)) == len(ran) == len(set(ran)) == 60
    assert sorted(store.get_task(i)["prompt_id"] for i in ids) == sorted(received)
    # The survivor took over the killed worker's servers: each ran prompts posted after the kill.
    by_url = {s["url"]: s for s in record["servers"]}
    for url in victims:
        assert any(start > killed_at for _, start, _ in by_url[url]["runs"]), url
    assert len(store.images_for_batch(1)) == 60
    store.close()


def test_a_second_scheduler_takes_half_the_servers_from_the_first(tmp_path):
    """A worker started next to a running one gets its share: the first gives back the servers above it."""
    with Fleet(4, job=0.25) as fleet:
        settings = make_settings(tmp_path, fleet.urls)
        store = Store(settings.db_path)
        store.create_batch("fleet", "fleet", [{"params": {"n": i}, "graph": GRAPH} for i in range(200)])
        env = worker_env(settings)
        first = start_worker(env, tmp_path)
        try:
            wait_until(lambda: Counter(owners_by_pid(store).values()) == {first.pid: 4}, 60,
                       message="the first worker to hold every server")
            second = start_worker(env, tmp_path)
            try:
                wait_until(lambda: Counter(owners_by_pid(store).values()) == {first.pid: 2, second.pid: 2}, 60,
                           message="the servers split two and two")
                store.set_queue_paused(True)  # finish what is in flight, then stop both
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(60)
        finally:
            first.send_signal(signal.SIGTERM)
            first.wait(60)
        record = fleet.stats()
    received = [p for s in record["servers"] for p in s["received"]]
    assert len(received) == len(set(received))
    done = store.counts().get("succeeded", 0)
    assert done >= 1 and store.counts().get("failed", 0) == 0
    store.close()
