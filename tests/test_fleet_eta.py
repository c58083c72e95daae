"""ETA from measured run times: unknown until a task of the workflow has finished, then the tasks left over
the servers that can take them now (each at its own mean run time), unknown again while paused; shown by the
front door (and so the API's batch shape), the Tasks page line and `python -m core status`."""

from __future__ import annotations

import time

import pytest

import ui_format
from core import service
from core.__main__ import main as cli
from core.store import Store
from tests.support import make_settings

A, B = "http://gpu-a:8188", "http://gpu-b:8188"


@pytest.fixture
def engine(tmp_path):
    settings = make_settings(tmp_path, [A, B])
    store = Store(settings.db_path)
    store.sync_servers(settings.comfyui_urls, lambda: "c")
    yield settings, store
    store.close()


def ran(store: Store, server: str, seconds: float) -> None:
    """One finished task of workflow `wf` on `server` that ran `seconds` (execution start to finish)."""
    task_id = store.create_batch("old", "wf", [{"params": {}, "graph": {}}])[1][0]
    store.db.execute("UPDATE tasks SET status = 'succeeded', server = ?, started_at = 100, finished_at = ? "
                     "WHERE id = ?", (server, 100 + seconds, task_id))


def test_eta_is_unknown_without_data_then_measured_per_server_and_unknown_while_paused(engine):
    _, store = engine
    batch = store.create_batch("new", "wf", [{"params": {}, "graph": {}}] * 12)[0]
    summary = service.batch_summary(store, batch)
    assert (summary["eta_seconds"], summary["eta_at"]) == (None, None)
    assert ui_format.eta_text(summary) == "ETA unknown"
    ran(store, A, 2.0)
    ran(store, A, 4.0)  # A: 3 s a task; B has not run `wf`: the workflow's mean, 3 s
    assert service.batch_summary(store, batch)["eta_seconds"] == pytest.approx(12 / (1 / 3 + 1 / 3))
    ran(store, B, 1.0)  # B: 1 s a task
    summary = service.batch_summary(store, batch)
    assert summary["eta_seconds"] == pytest.approx(12 / (1 / 3 + 1 / 1))
    assert summary["eta_at"] == pytest.approx(time.time() + summary["eta_seconds"], abs=5)
    service.drain_server(store, B)  # only A takes new work now
    assert service.batch_summary(store, batch)["eta_seconds"] == pytest.approx(36.0)
    service.pause_batch(store, batch)
    assert service.batch_summary(store, batch)["eta_seconds"] is None
    service.resume_batch(store, batch)
    service.pause_queue(store)
    assert service.batch_summary(store, batch)["eta_seconds"] is None
    service.resume_queue(store)
    service.drain_server(store, A)
    assert service.batch_summary(store, batch)["eta_seconds"] is None  # no server to run it


def test_status_prints_the_eta_or_unknown(engine, monkeypatch, capsys):
    settings, store = engine
    for name, value in (("COMFYUI_URL", f"{A},{B}"), ("COMFYBATCH_DB", str(settings.db_path)),
                        ("COMFYBATCH_LOG_DIR", str(settings.log_dir))):
        monkeypatch.setenv(name, value)
    batch = store.create_batch("new", "wf", [{"params": {}, "graph": {}}] * 4)[0]
    assert cli(["status", str(batch)]) == 0
    assert capsys.readouterr().out == "queued     4\neta        unknown\n"
    ran(store, A, 2.0)
    ran(store, B, 2.0)
    assert cli(["status", str(batch)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "queued     4" and out[1].startswith("eta        4 s (done about ")
