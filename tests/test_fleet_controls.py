"""Pause, resume, run next and drain through every face: the front door (core.service), a stepped server
worker, the CLI (in process), the HTTP API (the real ASGI app on uvicorn in a thread) and the Tasks and
Servers pages (AppTest). The real-ComfyUI behaviour is in tests/test_fleet_comfyui.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import streamlit as st
from streamlit.testing.v1 import AppTest

import ui
from core import service
from core.__main__ import main as cli
from core.errors import NotFound
from core.scheduler import Scheduler, ServerWorker
from core.store import Store
from tests.support import NoEvents, inline_executor, make_settings, serve_api

GPU = "http://gpu-1:8188"


@pytest.fixture
def engine(tmp_path) -> Iterator[tuple[Any, Store]]:
    settings = make_settings(tmp_path, [GPU])
    store = Store(settings.db_path)
    store.sync_servers(settings.comfyui_urls, lambda: "client-1")
    yield settings, store
    store.close()


def add(store: Store, n: int, name: str = "b") -> int:
    return store.create_batch(name, "wf", [{"params": {}, "graph": {"1": {"inputs": {}}}}] * n)[0]


# -- the front door -------------------------------------------------------------------------------
def test_pause_resume_and_run_next_through_the_front_door(engine):
    _, store = engine
    a, b = add(store, 2, "a"), add(store, 2, "b")
    paused = service.pause_batch(store, a)
    assert (paused["id"], paused["paused"], paused["run_next"], "turn" in paused) == (a, True, False, False)
    assert store.claim_next_task(GPU, "p1")["batch_id"] == b
    assert service.resume_batch(store, a)["paused"] is False
    assert service.run_batch_next(store, b)["run_next"] is True
    assert [store.claim_next_task(GPU, f"q{i}")["batch_id"] for i in range(3)] == [b, a, a]
    assert service.pause_queue(store) == {"paused": True, "counts": {"submitted": 4}}
    assert service.resume_queue(store) == {"paused": False, "counts": {"submitted": 4}}
    with pytest.raises(NotFound, match="^batch 99 does not exist$"):
        service.pause_batch(store, 99)
    with pytest.raises(NotFound, match="^batch 99 does not exist$"):
        service.run_batch_next(store, 99)


def test_drain_finishes_in_flight_work_then_shows_drained(engine):
    _, store = engine
    add(store, 3)
    first = store.claim_next_task(GPU, "p1")
    assert service.drain_server(store, "gpu-1:8188") == {
        "url": GPU, "state": "draining", "draining": True, "in_flight": 1, "models": [], "quarantined_until": None,
        "quarantine_reason": None}
    assert store.complete_task(first["id"], [])
    calm = {"models": [], "quarantined_until": None, "quarantine_reason": None}
    assert service.server_state(store, GPU) == {"url": GPU, "state": "drained", "draining": True, "in_flight": 0,
                                                **calm}
    assert service.undrain_server(store, GPU) == {"url": GPU, "state": "active", "draining": False, "in_flight": 0,
                                                  **calm}
    with pytest.raises(NotFound, match="^server 'http://gpu-9:8188' is not configured$"):
        service.drain_server(store, "http://gpu-9:8188")
    with pytest.raises(NotFound, match="^server 'not a url' is not configured$"):
        service.drain_server(store, "not a url")


class QuietComfy:
    """Takes every prompt and never finishes one: enough to see what the worker posts."""

    def __init__(self) -> None:
        self.posted: list[str] = []

    def submit(self, graph: dict[str, Any], prompt_id: str) -> dict[str, Any]:
        self.posted.append(prompt_id)
        return {"prompt_id": prompt_id, "number": len(self.posted), "node_errors": {}}

    def close(self) -> None:
        pass


def test_a_draining_worker_posts_nothing_new_and_a_restarted_one_still_drains(engine):
    settings, store = engine
    add(store, 3)
    scheduler = Scheduler(settings, store, pool=inline_executor())
    comfy = QuietComfy()
    worker = ServerWorker(scheduler, GPU, "client-1", client=comfy, events=NoEvents(),  # type: ignore[arg-type]
                          probe_health=lambda: {"up": True})
    assert worker.submit_next_task() is not None
    service.drain_server(store, GPU)
    assert (worker.submit_next_task(), len(comfy.posted), store.counts()) == (None, 1, {"queued": 2, "submitted": 1})
    again = ServerWorker(scheduler, GPU, "client-1", client=comfy, events=NoEvents(),  # type: ignore[arg-type]
                         probe_health=lambda: {"up": True})
    assert again.submit_next_task() is None  # the drain is in the database, not in the worker
    service.undrain_server(store, GPU)
    assert again.submit_next_task() is not None and len(comfy.posted) == 2
    scheduler.pool.shutdown()


# -- the CLI ----------------------------------------------------------------------------------------
def run_cli(monkeypatch, capsys, settings, *args: str) -> tuple[int, str, str]:
    for name, value in (("COMFYUI_URL", ",".join(settings.comfyui_urls)), ("COMFYBATCH_DB", str(settings.db_path)),
                        ("COMFYBATCH_OUTPUT_DIR", str(settings.output_dir)),
                        ("COMFYBATCH_WORKFLOWS_DIR", str(settings.workflows_dir)),
                        ("COMFYBATCH_LOG_DIR", str(settings.log_dir))):
        monkeypatch.setenv(name, value)
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_pause_resume_run_next_drain(engine, monkeypatch, capsys):
    settings, store = engine
    a = add(store, 2)
    assert run_cli(monkeypatch, capsys, settings, "pause", str(a)) == (0, f"batch {a} paused\n", "")
    assert store.get_batch(a)["paused"] == 1
    assert run_cli(monkeypatch, capsys, settings, "resume", str(a)) == (0, f"batch {a} resumed\n", "")
    assert run_cli(monkeypatch, capsys, settings, "pause") == (
        0, "queue paused: nothing new starts until `resume`\n", "")
    assert store.queue_paused() is True
    assert run_cli(monkeypatch, capsys, settings, "resume") == (0, "queue resumed\n", "")
    assert run_cli(monkeypatch, capsys, settings, "run-next", str(a)) == (0, f"batch {a} runs next at priority 0\n",
                                                                          "")
    store.claim_next_task(GPU, "p1")
    assert run_cli(monkeypatch, capsys, settings, "drain", GPU) == (
        0, f"{GPU}: draining (1 task(s) still on it)\n", "")
    assert run_cli(monkeypatch, capsys, settings, "undrain", GPU) == (0, f"{GPU}: active\n", "")
    assert run_cli(monkeypatch, capsys, settings, "pause", "42") == (1, "", "error: batch 42 does not exist\n")
    assert run_cli(monkeypatch, capsys, settings, "drain", "http://elsewhere:1") == (
        1, "", "error: server 'http://elsewhere:1' is not configured\n")


# -- the HTTP API ---------------------------------------------------------------------------------
@pytest.fixture
def api_base(engine) -> Iterator[str]:
    from api.app import Api

    settings, store = engine
    api = Api()
    api.bind(settings, store)
    with serve_api(api) as base:
        yield base


def test_api_pause_resume_run_next_queue_and_drain(engine, api_base):
    _, store = engine
    a = add(store, 2)
    with requests.Session() as web:
        batch = web.post(f"{api_base}/batches/{a}/pause", timeout=10).json()["batch"]
        assert (batch["id"], batch["paused"], batch["run_next"], batch["eta_seconds"], batch["eta_at"]) == (
            a, True, False, None, None)
        assert web.post(f"{api_base}/batches/{a}/resume", timeout=10).json()["batch"]["paused"] is False
        assert web.post(f"{api_base}/batches/{a}/run-next", timeout=10).json()["batch"]["run_next"] is True
        assert web.post(f"{api_base}/queue/pause", timeout=10).json() == {"paused": True, "counts": {"queued": 2}}
        assert web.get(f"{api_base}/queue", timeout=10).json() == {"paused": True, "counts": {"queued": 2}}
        assert web.post(f"{api_base}/queue/resume", timeout=10).json() == {"paused": False, "counts": {"queued": 2}}
        reply = web.post(f"{api_base}/servers/drain", json={"url": GPU}, timeout=10)
        assert (reply.status_code, reply.json()) == (200, {"url": GPU, "state": "drained", "draining": True,
                                                           "in_flight": 0, "models": [], "quarantined_until": None,
                                                           "quarantine_reason": None})
        reply = web.post(f"{api_base}/servers/undrain", json={"url": GPU}, timeout=10)
        assert reply.json()["state"] == "active"
        reply = web.post(f"{api_base}/batches/77/pause", timeout=10)
        assert (reply.status_code, reply.json()) == (404, {"error": "batch 77 does not exist", "problems": []})
        reply = web.post(f"{api_base}/servers/drain", json={"url": "http://nope:1"}, timeout=10)
        assert (reply.status_code, reply.json()["error"]) == (404, "server 'http://nope:1' is not configured")
        reply = web.post(f"{api_base}/servers/drain", json={"url": 5}, timeout=10)
        assert (reply.status_code, reply.json()["error"], reply.json()["problems"][0]["message"]) == (
            422, "1 problem(s) found; nothing was changed",
            'field \'url\': expected the server\'s URL as a string, e.g. "http://127.0.0.1:8188"')


# -- the pages ------------------------------------------------------------------------------------
@pytest.fixture
def page_env(engine, monkeypatch) -> Iterator[Store]:
    settings, store = engine
    for name, value in (("COMFYUI_URL", GPU), ("COMFYBATCH_DB", str(settings.db_path)),
                        ("COMFYBATCH_OUTPUT_DIR", str(settings.output_dir)),
                        ("COMFYBATCH_WORKFLOWS_DIR", str(settings.workflows_dir)),
                        ("COMFYBATCH_LOG_DIR", str(settings.log_dir))):
        monkeypatch.setenv(name, value)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield store
    ui.close_stores()
    st.cache_data.clear()
    st.cache_resource.clear()


def open_page(name: str) -> AppTest:
    at = AppTest.from_file("../ui_main.py", default_timeout=30)
    at.switch_page(f"pages/{name}.py")
    return at.run()


def click(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    assert [e.value for e in at.exception] == []
    return at


def test_tasks_page_pauses_and_resumes_the_queue_and_a_batch_and_runs_it_next(page_env):
    store = page_env
    a = add(store, 2, "first")
    at = open_page("tasks")
    click(at, "Pause queue")
    assert ([m.value for m in at.success], store.queue_paused()) == (
        ["Queue paused: no new task starts; tasks already on a server finish."], True)
    click(at, "Resume queue")
    assert store.queue_paused() is False
    at.selectbox(key="tasks_batch").set_value(a).run()
    click(at, f"Pause batch {a}")
    assert store.get_batch(a)["paused"] == 1
    assert f"Batch {a}: 0/2 done (0%) - 2 queued - paused - ETA unknown" in [t.value for t in at.text]
    click(at, f"Resume batch {a}")
    click(at, f"Run batch {a} next")
    assert [m.value for m in at.success] == [f"Batch {a} runs next: ahead of every other batch at priority 0."]
    assert (store.get_batch(a)["paused"], store.get_batch(a)["run_next"]) == (0, 1)


def test_servers_page_drains_and_undrains(page_env):
    store = page_env
    add(store, 1)
    store.claim_next_task(GPU, "p1")
    at = open_page("servers")
    click(at, "Drain")
    assert [m.value for m in at.success] == [f"Draining {GPU}: it takes no new work and finishes the 1 task(s) on "
                                             "it, then shows as drained."]
    assert f"{GPU}: down (draining)" in [t.value for t in at.text]
    click(at, "Undrain")
    assert (store.server_draining(GPU), [m.value for m in at.success]) == (False, [f"{GPU} takes work again."])


def test_servers_page_says_why_and_until_when_a_server_is_quarantined(page_env):
    store = page_env
    until = store.record_server_run(GPU, "ComfyUI failed while running node 3 (KSampler): boom", 1, 300.0)
    assert until is not None
    at = open_page("servers")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
    assert (f"{GPU}: down - quarantined until {stamp}: its last 1 tasks failed; the last one: ComfyUI failed while "
            "running node 3 (KSampler): boom") in [t.value for t in at.text]
