"""Crashes: kill -9 of the worker mid-batch, two real servers, and a ComfyUI restarted mid-batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from core import preflight, service
from core.store import Store
from tests.fake_comfy import FakeComfy
from tests.support import ROOT, make_settings, submit_rows, wait_until


def worker_env(settings) -> dict[str, str]:
    return {**os.environ, "COMFYUI_URL": ",".join(settings.comfyui_urls), "COMFYBATCH_DB": str(settings.db_path),
            "COMFYBATCH_OUTPUT_DIR": str(settings.output_dir), "COMFYBATCH_WORKFLOWS_DIR": str(settings.workflows_dir),
            "COMFYBATCH_LOG_DIR": str(settings.log_dir), "COMFYBATCH_LEASE_SECONDS": "2", "PYTHONPATH": str(ROOT)}


def test_kill_9_worker_mid_batch_then_restart_loses_and_duplicates_nothing(settings, store):
    rows = [{"1.color": str(i), "1.width": "512", "1.height": "512"} for i in range(24)]
    result = submit_rows(settings, store, "slow_blur", rows)
    env = worker_env(settings)
    worker = subprocess.Popen([sys.executable, "-m", "core", "worker", "--quiet"], env=env, cwd=ROOT)
    try:
        wait_until(lambda: store.counts().get("succeeded", 0) >= 5, 120, message="5 tasks done")
        wait_until(lambda: any(t["status"] in ("submitted", "running") for t in store.in_flight_tasks()), 30,
                   message="a task in flight")
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        in_flight_at_kill = store.in_flight_tasks()
        assert in_flight_at_kill, "the kill should land while prompts are on ComfyUI"
    finally:
        if worker.poll() is None:
            worker.kill()
    done = subprocess.run([sys.executable, "-m", "core", "worker", "--until-idle", "--quiet"], env=env, cwd=ROOT,
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert store.counts() == {"succeeded": 24}
    images = store.images_for_batch(result.batch_ids[0])
    assert Counter(img["task_id"] for img in images) == Counter({t: 1 for t in result.task_ids})
    files = list((settings.output_dir / f"batch-{result.batch_ids[0]:05d}").iterdir())
    assert sorted(f.name for f in files) == sorted(img["path"].split("/")[-1] for img in images)
    # the in-flight tasks were re-attached or collected, not run a second time
    assert all(store.get_task(t["id"])["attempts"] == 1 for t in in_flight_at_kill)


@pytest.fixture
def two_servers(comfy, comfy_factory, tmp_path):
    """Settings and a store for the shared real ComfyUI plus a second real one; yields (settings, store, urls)."""
    second = comfy_factory()
    settings = make_settings(tmp_path, [comfy.url, second.url])
    store = Store(settings.db_path)
    yield settings, store, (comfy.url, second.url)
    store.close()


def test_two_servers_share_the_work(two_servers, scheduler_factory):
    settings, store, (first_url, second_url) = two_servers
    rows = [{"1.color": str(i), "1.width": "256", "1.height": "256"} for i in range(16)]
    result = submit_rows(settings, store, "slow_blur", rows)
    scheduler_factory(settings)
    assert service.wait_for_tasks(store, result.task_ids, timeout=120) == {"succeeded": 16}
    per_server = Counter(store.get_task(t)["server"] for t in result.task_ids)
    assert set(per_server) == {first_url, second_url}
    assert min(per_server.values()) >= 4, per_server


def test_comfyui_restarted_mid_batch_the_batch_still_completes(comfy_factory, tmp_path, scheduler_factory):
    server = comfy_factory()
    settings = make_settings(tmp_path, [server.url])
    store = Store(settings.db_path)
    try:
        rows = [{"1.color": str(i), "1.width": "512", "1.height": "512"} for i in range(12)]
        result = submit_rows(settings, store, "slow_blur", rows)
        scheduler_factory(settings)
        wait_until(lambda: store.counts().get("succeeded", 0) >= 3, 120, message="3 tasks done")
        server.restart()  # kill -9 and start again on the same port: its queue and history are gone
        assert service.wait_for_tasks(store, result.task_ids, timeout=240) == {"succeeded": 12}
        images = store.images_for_batch(result.batch_ids[0])
        assert Counter(img["task_id"] for img in images) == Counter({t: 1 for t in result.task_ids})
        requeued = [e for e in store.events() if e["status"] == "queued" and e["detail"]]
        assert requeued, "prompts lost with the restart should have been requeued"
    finally:
        store.close()


def test_a_server_that_freezes_mid_job_loses_nothing(comfy, tmp_path, scheduler_factory):
    """The fake accepts the first prompt, then hangs on every call: that task goes to the real server."""
    info = preflight.object_info(comfy.url, refresh=True)
    with FakeComfy(info, freeze_after_prompts=1) as fake:
        settings = make_settings(tmp_path, [fake.url, comfy.url], read_timeout=2.0, connect_timeout=2.0)
        store = Store(settings.db_path)
        try:
            result = submit_rows(settings, store, "empty_image",
                                         [{"color": str(i), "width": "8"} for i in range(6)])
            scheduler_factory(settings)
            assert service.wait_for_tasks(store, result.task_ids, timeout=90) == {"succeeded": 6}
            assert len(fake.prompts) == 1
            stuck = store.task_by_prompt_id(fake.prompts[0])
            assert stuck is None  # its prompt id was replaced when it was requeued
            assert Counter(store.get_task(t)["server"] for t in result.task_ids) == Counter({comfy.url: 6})
            assert any(e["status"] == "queued" and e["detail"] and fake.url in e["detail"] for e in store.events())
        finally:
            store.close()


def test_two_schedulers_on_one_database_never_both_dispatch(settings, store, scheduler_factory):
    first = scheduler_factory(settings)
    wait_until(lambda: first.is_leader, 10, message="the first scheduler to take the lease")
    second = scheduler_factory(settings)
    result = submit_rows(settings, store, "empty_image", [{"color": str(i)} for i in range(30)])
    assert service.wait_for_tasks(store, result.task_ids, timeout=60) == {"succeeded": 30}
    assert (first.is_leader, second.is_leader, second.workers) == (True, False, {})
    submits = Counter(e["task_id"] for e in store.events() if e["status"] == "submitted")
    assert submits == Counter({t: 1 for t in result.task_ids})
    first.stop()  # releases the lease: the standby takes over within a tick
    wait_until(lambda: second.is_leader, 10, message="the standby to take over")
    more = submit_rows(settings, store, "empty_image", [{"color": "99"}])
    assert service.wait_for_tasks(store, more.task_ids, timeout=30) == {"succeeded": 1}


def test_disabling_a_server_mid_batch_moves_its_tasks_to_the_others(two_servers, scheduler_factory):
    settings, store, (first_url, second_url) = two_servers
    rows = [{"1.color": str(i), "1.width": "512", "1.height": "512"} for i in range(10)]
    result = submit_rows(settings, store, "slow_blur", rows)
    scheduler_factory(settings)
    wait_until(lambda: any(t["server"] == second_url for t in store.in_flight_tasks()), 60,
               message="a task on the second server")
    store.set_server_enabled(second_url, False)
    assert service.wait_for_tasks(store, result.task_ids, timeout=180) == {"succeeded": 10}
    moved = [e for e in store.events() if e["status"] == "queued" and e["detail"]
             and "disabled or removed" in e["detail"]]
    assert moved
    assert all(store.get_task(e["task_id"])["server"] == first_url for e in moved)
    images = store.images_for_batch(result.batch_ids[0])
    assert Counter(img["task_id"] for img in images) == Counter({t: 1 for t in result.task_ids})
