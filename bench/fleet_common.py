"""Shared by bench/affinity.py and bench/fairness.py: real ComfyUI servers that also see a second, distinct
random-weight SD1.5 checkpoint (tests/comfyui_harness/server.py: second_checkpoint_config), and running the
engine's scheduler in process until the work is done."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.scheduler import Scheduler  # noqa: E402
from core.store import Store  # noqa: E402
from tests.comfyui_harness import server as harness  # noqa: E402

SECOND = harness.SECOND_CHECKPOINT


@contextlib.contextmanager
def servers(work: Path, n: int) -> Iterator[list[harness.ComfyServer]]:
    """`n` real ComfyUI servers under `work` that also see the second checkpoint; stopped on leaving."""
    harness.ensure_installed()
    config = harness.second_checkpoint_config(work)
    started: list[harness.ComfyServer] = []
    try:
        for i in range(n):
            started.append(harness.ComfyServer(work / f"server-{i}", extra_args=(
                "--extra-model-paths-config", str(config))).start())
        yield started
    finally:
        for server in started:
            server.stop()


def run_until_idle(settings: Any, store: Store, stop_when: Any = None, timeout: float = 1800) -> float:
    """Run the scheduler until nothing is left (or `stop_when()` holds); seconds."""
    sched = Scheduler(settings, store)
    start = time.perf_counter()
    sched.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if stop_when is not None and stop_when():
                break
            if sched.ticked.is_set() and not sched.busy():
                break
        return time.perf_counter() - start
    finally:
        sched.stop()
