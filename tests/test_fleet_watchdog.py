"""The watchdog and the circuit breaker, stepped: a server worker with an in-process stand-in ComfyUI whose
prompts never report anything, the stall limit from measured run times, quarantine after N failures in a
row, and a task failed at once when it fails the same way on two servers. (On real sockets with the fake
ComfyUI: tests/test_fleet_faults.py.)"""

from __future__ import annotations

import time
from typing import Any

import pytest

from core import service, watchdog
from core.errors import ExecutionFailed
from core.scheduler import Scheduler, ServerWorker
from core.store import Store
from tests.support import NoEvents, inline_executor, make_settings

A, B = "http://gpu-a:8188", "http://gpu-b:8188"
FAILURE = {"node_id": "3", "node_type": "KSampler", "exception_type": "RuntimeError",
           "exception_message": "bad weights"}
FAILED = "ComfyUI failed while running node 3 (KSampler): RuntimeError: bad weights"


class SilentComfy:
    """Takes prompts, keeps them queued (as a hung server does) and records interrupts and deletes."""

    def __init__(self) -> None:
        self.posted: list[str] = []
        self.calls: list[tuple[str, Any]] = []

    def submit(self, graph: dict[str, Any], prompt_id: str) -> dict[str, Any]:
        self.posted.append(prompt_id)
        return {"prompt_id": prompt_id, "number": len(self.posted), "node_errors": {}}

    def queue(self) -> tuple[list[str], list[str]]:
        return self.posted[:1], self.posted[1:]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        return None

    def interrupt(self, prompt_id: str) -> None:
        self.calls.append(("interrupt", prompt_id))

    def delete_pending(self, prompt_ids: list[str]) -> None:
        self.calls.append(("delete", prompt_ids))

    def close(self) -> None:
        pass


@pytest.fixture
def fleet(tmp_path):
    settings = make_settings(tmp_path, [A, B], stall_floor=60.0, stall_ceiling=600.0, quarantine_after=2,
                             quarantine_seconds=300.0, max_attempts=3)
    store = Store(settings.db_path)
    store.sync_servers(settings.comfyui_urls, lambda: "client")
    scheduler = Scheduler(settings, store, pool=inline_executor())
    yield settings, store, scheduler
    scheduler.pool.shutdown()
    store.close()


def worker(scheduler: Scheduler, url: str) -> tuple[ServerWorker, SilentComfy]:
    comfy = SilentComfy()
    return ServerWorker(scheduler, url, "client", client=comfy, events=NoEvents(),  # type: ignore[arg-type]
                        probe_health=lambda: {"up": True}), comfy


def add(store: Store, n: int, workflow: str = "wf") -> list[int]:
    return store.create_batch("b", workflow, [{"params": {}, "graph": {"1": {"inputs": {}}}}] * n)[1]


def finished_runs(store: Store, workflow: str, seconds: list[float]) -> None:
    """Tasks of `workflow` that ran for these many seconds (execution start to finish)."""
    for i, ids in enumerate(add(store, 1, workflow) for _ in seconds):
        store.db.execute("UPDATE tasks SET status = 'succeeded', started_at = 1000, finished_at = ? WHERE id = ?",
                         (1000 + seconds[i], ids[0]))


def test_stall_limit_is_five_p95_with_a_floor_and_a_ceiling_without_history(fleet):
    settings, store, _ = fleet
    assert watchdog.stall_limit([], settings) == watchdog.StallLimit(
        600.0, "the ceiling for a workflow with fewer than 5 finished tasks, COMFYBATCH_STALL_CEILING")
    assert watchdog.stall_limit([1, 2, 3, 4, 40, 5, 6, 7, 8, 9] * 2, settings) == watchdog.StallLimit(
        200.0, "5 x the workflow's p95 run time of 40.0 s")
    assert watchdog.stall_limit([1.0] * 6, settings) == watchdog.StallLimit(
        60.0, "the floor, COMFYBATCH_STALL_FLOOR (5 x p95 = 5.0 s is less)")
    finished_runs(store, "timed", [2.0, 3.0, 4.0, 5.0, 30.0])
    assert store.run_durations("timed") == [30.0, 5.0, 4.0, 3.0, 2.0]


def test_a_silent_prompt_is_interrupted_and_requeued_as_an_attempt_with_the_reason(fleet):
    _, store, scheduler = fleet
    first, second = add(store, 2)
    w, comfy = worker(scheduler, A)
    w.submit_next_task()
    w.submit_next_task()
    start = time.monotonic()
    w.check_stalls(start + 599)  # within the ceiling: nothing happens
    assert comfy.calls == [] and store.counts() == {"submitted": 2}
    w.check_stalls(start + 601)
    stuck = comfy.posted[0]
    assert comfy.calls[:2] == [("interrupt", stuck), ("delete", [stuck])]
    task = store.get_task(first)
    reason = (f"no word from ComfyUI at {A} about this task for 601 s, past the stall limit of 600 s (the ceiling "
              "for a workflow with fewer than 5 finished tasks, COMFYBATCH_STALL_CEILING); interrupted and requeued")
    assert (task["status"], task["attempts"], task["error"], task["failed_on"], task["failure_sig"]) == (
        "queued", 1, reason, A, "stalled")
    # The second prompt waited behind the first: its clock starts when the first is dropped.
    assert store.get_task(second)["status"] == "submitted"
    assert store.servers()[0]["failures"] == 1


def test_two_failures_in_a_row_quarantine_the_server_and_its_work_goes_elsewhere(fleet):
    _, store, scheduler = fleet
    ids = add(store, 3)
    w, comfy = worker(scheduler, A)
    for _ in range(3):
        w.submit_next_task()
    w._failed_run(store.get_task(ids[0]), ExecutionFailed(FAILURE, A))
    assert store.quarantine(A) is None
    w._failed_run(store.get_task(ids[1]), ExecutionFailed(FAILURE, A))
    until, reason = store.quarantine(A)  # type: ignore[misc]
    assert (reason, round(until - time.time())) == (f"its last 2 tasks failed; the last one: {FAILED}", 300)
    third = store.get_task(ids[2])
    assert (third["status"], third["attempts"]) == ("queued", 0)  # given back, no attempt spent
    assert ("interrupt", comfy.posted[2]) in comfy.calls
    assert w.submit_next_task() is None  # cooling down
    other, _ = worker(scheduler, B)
    assert other.submit_next_task()["id"] == ids[0]
    state = service.server_state(store, A)
    assert (state["state"], state["quarantine_reason"]) == ("quarantined", reason)


def test_a_task_failing_the_same_way_on_two_servers_is_failed_not_bounced(fleet):
    _, store, scheduler = fleet
    (task_id,) = add(store, 1)
    wa, _ = worker(scheduler, A)
    wb, _ = worker(scheduler, B)
    wa.submit_next_task()
    wa._failed_run(store.get_task(task_id), ExecutionFailed(FAILURE, A))
    assert store.get_task(task_id)["status"] == "queued"
    wb.submit_next_task()
    wb._failed_run(store.get_task(task_id), ExecutionFailed(FAILURE, B))
    task = store.get_task(task_id)
    assert (task["status"], task["attempts"], task["error"]) == (
        "failed", 2, f"{FAILED} (the same failure on {A} and {B}: not retried on other servers)")


def test_a_success_resets_the_failure_count(fleet):
    _, store, _ = fleet
    assert store.record_server_run(A, "boom", 2, 60.0) is None
    assert store.record_server_run(A, None, 2, 60.0) is None
    assert store.record_server_run(A, "boom", 2, 60.0) is None
    assert store.quarantine(A) is None and store.servers()[0]["failures"] == 1
