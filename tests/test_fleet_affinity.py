"""Model affinity on two real ComfyUI servers with two distinct random-weight SD1.5 checkpoints: two batches
(one per checkpoint) interleaved by fair share; with affinity a server keeps to its checkpoint while tasks for
it wait, so each checkpoint is loaded at most once per server (counted from ComfyUI's own log), not once per
task."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import service
from core.scheduler import Scheduler
from core.store import Store
from tests.comfyui_harness import server as harness
from tests.support import make_settings, submit_rows


@pytest.fixture(scope="module")
def two_model_servers(sd15_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[list[harness.ComfyServer]]:
    work = tmp_path_factory.mktemp("affinity")
    config = harness.second_checkpoint_config(work)
    servers = [harness.ComfyServer(work / f"server-{i}", extra_args=("--extra-model-paths-config", str(config)))
               for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_with_affinity_each_checkpoint_loads_once_per_server(two_model_servers: Any, tmp_path: Path):
    servers = two_model_servers
    settings = make_settings(tmp_path, [s.url for s in servers], affinity=True)
    store = Store(settings.db_path)
    before = [s.model_loads() for s in servers]
    batches = []
    for i, checkpoint in enumerate(("random_sd15.safetensors", harness.SECOND_CHECKPOINT)):
        batches.append(submit_rows(settings, store, "sd15_txt2img", [
            {"prompt": "a lighthouse", "seed": 100 * i + n, "steps": 1, "width": 64, "height": 64,
             "checkpoint": checkpoint} for n in range(4)], name=checkpoint))
    sched = Scheduler(settings, store)
    sched.start()
    try:
        ids = [t for b in batches for t in b.task_ids]
        assert service.wait_for_tasks(store, ids, timeout=600) == {"succeeded": 8}
    finally:
        sched.stop()
    # A server switches checkpoints only when no task for its loaded one is waiting: each checkpoint it ran was
    # loaded once (no reload per task), so at most one load per (server, checkpoint).
    ran: dict[str, set[str]] = {s.url: set() for s in servers}
    for batch in batches:
        for task_id in batch.task_ids:
            task = store.get_task(task_id)
            ran[task["server"]].add(task["graph"]["4"]["inputs"]["ckpt_name"])
    loads = [s.model_loads() - b for s, b in zip(servers, before, strict=True)]
    assert loads == [len(ran[s.url]) for s in servers] and sum(loads) <= 4, (loads, ran)
    assert all(ran.values())  # both servers worked
    for server in servers:
        assert service.server_state(store, server.url)["models"] in (["random_sd15.safetensors"],
                                                                     [harness.SECOND_CHECKPOINT])
    store.close()
