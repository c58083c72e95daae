"""The watchdog and the circuit breaker on real sockets: the fake ComfyUI for what a real server cannot do
on cue (hang mid-job forever, fail every job), beside a real ComfyUI that does the work in the end."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from core import preflight, service
from core.scheduler import Scheduler
from core.store import Store
from tests.fake_comfy import FakeComfy
from tests.support import make_settings, submit_rows, wait_until

FAILED = "ComfyUI failed while running node 1 (EmptyImage): RuntimeError: fake failure"


@pytest.fixture
def run(tmp_path: Any) -> Iterator[Any]:
    """Start a scheduler for the given settings (and their store); both are closed at the end."""
    running: list[tuple[Scheduler, Store]] = []

    def start(settings: Any) -> tuple[Scheduler, Store]:
        store = Store(settings.db_path)
        sched = Scheduler(settings, store)
        sched.start()
        running.append((sched, store))
        return sched, store

    yield start
    for sched, store in running:
        sched.stop()
        store.close()


def test_a_job_hanging_forever_is_interrupted_requeued_and_done_elsewhere(comfy, tmp_path, run):
    info = preflight.object_info(comfy.url, refresh=True)
    with FakeComfy(info, mode="hang") as fake:
        settings = make_settings(tmp_path, [fake.url, comfy.url], stall_ceiling=2.0, quarantine_after=1)
        store = Store(settings.db_path)
        store.sync_servers(settings.comfyui_urls, lambda: "c")
        store.set_server_draining(comfy.url, True)  # the hanging server gets the first tasks
        result = submit_rows(settings, store, "empty_image", [{"color": i, "width": 8} for i in range(4)])
        _, live = run(settings)
        wait_until(lambda: len(fake.prompts) == 2, 30, message="two prompts on the hanging server")
        service.undrain_server(live, comfy.url)
        assert service.wait_for_tasks(live, result.task_ids, timeout=60) == {"succeeded": 4}
        tasks = [live.get_task(t) for t in result.task_ids]
        assert {t["server"] for t in tasks} == {comfy.url}
        assert sorted(t["attempts"] for t in tasks) == [1, 1, 1, 2]  # the stalled one spent an attempt
        stalled = next(t for t in tasks if t["attempts"] == 2)
        (reason,) = [e["detail"] for e in live.events(stalled["id"]) if e["status"] == "queued" and e["detail"]]
        assert re.fullmatch(rf"no word from ComfyUI at {re.escape(fake.url)} about this task for \d+ s, past the "
                            r"stall limit of 2 s \(the ceiling for a workflow with fewer than 5 finished tasks, "
                            r"COMFYBATCH_STALL_CEILING\); interrupted and requeued", reason), reason
        assert fake.interrupted[0] == fake.prompts[0] and fake.prompts[0] in fake.deleted
        state = service.server_state(live, fake.url)
        assert (state["state"], state["quarantine_reason"]) == ("quarantined",
                                                                f"its last 1 tasks failed; the last one: {reason}")
        store.close()


def test_a_server_failing_every_job_is_quarantined_and_its_work_goes_elsewhere(comfy, tmp_path, run):
    info = preflight.object_info(comfy.url, refresh=True)
    with FakeComfy(info, mode="fail") as fake:
        settings = make_settings(tmp_path, [fake.url, comfy.url], quarantine_after=3, max_attempts=3)
        store = Store(settings.db_path)
        store.sync_servers(settings.comfyui_urls, lambda: "c")
        store.set_server_draining(comfy.url, True)
        result = submit_rows(settings, store, "empty_image", [{"color": i, "width": 8} for i in range(6)])
        _, live = run(settings)
        wait_until(lambda: live.quarantine(fake.url) is not None, 60, message="the failing server quarantined")
        service.undrain_server(live, comfy.url)
        assert service.wait_for_tasks(live, result.task_ids, timeout=60) == {"succeeded": 6}
        assert {live.get_task(t)["server"] for t in result.task_ids} == {comfy.url}
        until, reason = live.quarantine(fake.url)  # type: ignore[misc]
        assert reason == f"its last 3 tasks failed; the last one: {FAILED}"
        sent_there = [e["at"] for e in live.events(limit=10_000) if e["status"] == "submitted"
                      and e["detail"] == fake.url]
        assert len(sent_there) == len(fake.prompts) >= 3
        assert [at for at in sent_there if at > until - settings.quarantine_seconds] == []  # none once quarantined
        store.close()


def test_a_task_failing_the_same_way_on_two_servers_is_failed(comfy, tmp_path, run):
    info = preflight.object_info(comfy.url, refresh=True)
    with FakeComfy(info, mode="fail") as one, FakeComfy(info, mode="fail") as two:
        settings = make_settings(tmp_path, [one.url, two.url], quarantine_after=1, max_attempts=5)
        _, live = run(settings)
        live.set_queue_paused(True)  # both servers start their workers before the task can go to either
        result = submit_rows(settings, live, "empty_image", [{"color": 1}])
        live.set_queue_paused(False)
        assert service.wait_for_tasks(live, result.task_ids, timeout=60) == {"failed": 1}
        task = live.get_task(result.task_ids[0])
        first, second = (e["detail"] for e in live.events(task["id"]) if e["status"] == "submitted")
        assert {first, second} == {one.url, two.url}
        assert (task["attempts"], task["error"]) == (
            2, f"{FAILED} (the same failure on {first} and {second}: not retried on other servers)")
