"""Local backends (core/backends.py): ComfyUI processes ComfyBatch starts, registers, restarts and stops.

The slow tests supervise the real harness ComfyUI (the PyPI install under .cache/comfyui/, a valid
COMFYBATCH_BACKEND_DIR) on CPU: a real batch, a `kill -9` of the backend mid-batch, shutdown, and a `kill -9`
of ComfyBatch itself. The fast tests use small Python processes as the "command" where only process handling
is under test (a stale process left on the port, the log cap), and check the settings' messages.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import backends, service
from core.config import Settings
from core.errors import InputError
from core.scheduler import Scheduler
from core.store import Store
from tests.comfyui_harness import server as harness
from tests.support import cli_env, make_settings, run_cli, submit_rows, wait_until, worker_env

# A stand-in "ComfyUI" for process handling only: listens on --port and prints a line per 10 ms.
CHATTY = (f"{shlex.quote(sys.executable)} -c \"import socket, sys, time; s = socket.socket(); "
          "s.bind(('127.0.0.1', int(sys.argv[sys.argv.index('--port') + 1]))); s.listen()\n"
          "while True: print('x' * 2000, flush=True); time.sleep(0.01)\"")


def alive(pid: int) -> bool:
    return backends._start_time(pid) is not None


def backend_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings that supervise the harness ComfyUI on CPU on one free port, its folders under tmp_path."""
    home = tmp_path / "comfy"
    for sub in ("input", "output", "temp", "user"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    port = harness.free_port()
    values = dict(backend_dir=str(harness.COMFY_DIR), backend_gpus="cpu", backend_ports=f"{port}-{port + 3}",
                  backend_args=" ".join(f"--{sub}-directory {home / sub}" for sub in ("input", "output", "temp",
                                                                                        "user")))
    values.update(overrides)
    return make_settings(tmp_path, [], **values)


@pytest.fixture
def supervised(tmp_path: Path, comfy_installed, sd15_checkpoint
               ) -> Iterator[tuple[Settings, Store, backends.Supervisor]]:
    settings = backend_settings(tmp_path)
    store = Store(settings.db_path)
    supervisor = service.start_local_backends(settings, store)
    assert supervisor is not None
    yield settings, store, supervisor
    supervisor.stop()
    store.close()


def running_pid(supervisor: backends.Supervisor, timeout: float = 240.0, other_than: int | None = None) -> int:
    b = supervisor.backends[0]
    wait_until(lambda: b.state == "running" and b.proc is not None and b.proc.pid != other_than, timeout,
               message=f"backend running (state {b.state}: {b.message})")
    assert b.proc is not None
    return b.proc.pid


# -- the real ComfyUI, supervised ------------------------------------------------------------------------------
def test_backend_is_registered_runs_a_batch_survives_kill_9_and_leaves_nothing_behind(supervised):
    settings, store, supervisor = supervised
    url = supervisor.backends[0].spec.url
    assert [(s["url"], s["source"]) for s in store.servers()] == [(url, "local")]
    first_pid = running_pid(supervisor)
    scheduler = Scheduler(settings, store)
    scheduler.start()
    try:
        # Distinct colours: ComfyUI answers a prompt identical to the last one from its cache in no time, and the
        # whole batch would be done before the kill.
        result = submit_rows(settings, store, "slow_blur", [{"1.color": i, "1.width": 768, "1.height": 768}
                                                             for i in range(8)])
        wait_until(lambda: store.counts().get("succeeded", 0) >= 2 and store.in_flight_tasks(url), 240,
                   message="a batch half done with work on the backend")
        os.kill(first_pid, signal.SIGKILL)
        second_pid = running_pid(supervisor, other_than=first_pid)
        assert service.wait_for_tasks(store, result.task_ids, 300) == {"succeeded": 8}
    finally:
        scheduler.stop()
    # Nothing lost, nothing run twice: one image per task, and the killed run shows as a requeue.
    images = store.db.execute("SELECT task_id, COUNT(*) FROM images GROUP BY task_id").fetchall()
    assert sorted(images) == [(task_id, 1) for task_id in sorted(result.task_ids)]
    requeued = store.db.execute("SELECT COUNT(*) FROM events WHERE status = 'queued' AND detail LIKE ?",
                                ("%local backend cpu exited with code -9%",)).fetchone()[0]
    assert requeued >= 1
    status = service.local_backends(settings)
    assert [(b["name"], b["state"], b["pid"], b["restarts"], b["last_exit"]) for b in status["backends"]] == [
        ("cpu", "running", second_pid, 1, -9)]
    assert "Prompt executed in" in status["backends"][0]["log"]
    supervisor.stop()
    assert not alive(first_pid) and not alive(second_pid)
    assert [(b["state"], b["pid"]) for b in service.local_backends(settings)["backends"]] == [("stopped", None)]


@pytest.mark.slow
def test_kill_9_of_comfybatch_takes_its_backend_with_it(tmp_path, comfy_installed):
    settings = backend_settings(tmp_path)
    env = {**worker_env(settings), "COMFYBATCH_BACKEND_DIR": settings.backend_dir, "COMFYBATCH_BACKEND_GPUS": "cpu",
           "COMFYBATCH_BACKEND_PORTS": settings.backend_ports, "COMFYBATCH_BACKEND_ARGS": settings.backend_args}
    worker = subprocess.Popen([sys.executable, "-m", "core", "worker", "--backends", "--quiet"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = settings.log_dir / "backends" / "cpu.json"
    try:
        wait_until(lambda: backends._read_json(state_file).get("state") == "running", 240,
                   message="the worker's backend running")
        pid = backends._read_json(state_file)["pid"]
        assert alive(pid)
    finally:
        worker.kill()
        worker.wait(30)
    wait_until(lambda: not alive(pid), 30, message=f"backend {pid} gone with its ComfyBatch")
    assert service.local_backends(settings)["backends"][0]["state"] == "stopped"


@pytest.mark.slow
def test_a_bad_folder_is_a_clear_message_from_the_worker(tmp_path):
    env = {**cli_env(tmp_path, []), "COMFYBATCH_BACKEND_DIR": str(tmp_path / "nowhere")}
    done = run_cli(env, "worker", "--backends")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: local ComfyUI backends cannot start; fix these settings",
        f"- field 'COMFYBATCH_BACKEND_DIR': {tmp_path / 'nowhere'} is not a ComfyUI folder (it has no main.py); "
        "name the folder that holds ComfyUI's main.py"]



# -- settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "problems"), [
    ({"backend_dir": "/no/such/comfyui"},
     [("COMFYBATCH_BACKEND_DIR", "/no/such/comfyui is not a ComfyUI folder (it has no main.py); name the folder "
                                 "that holds ComfyUI's main.py")]),
    ({"backend_command": "no-such-comfyui-program --fast"},
     [("COMFYBATCH_BACKEND_COMMAND", "program 'no-such-comfyui-program' not found (not a file, or not on PATH)")]),
    ({"backend_command": "python3 'main.py", "backend_gpus": "0,x", "backend_ports": "80-90"},
     [("COMFYBATCH_BACKEND_COMMAND", "cannot split the command: No closing quotation"),
      ("COMFYBATCH_BACKEND_GPUS", "expected auto, cpu, or GPU numbers such as 0,1,2,3; got '0,x'"),
      ("COMFYBATCH_BACKEND_PORTS", "expected a port range such as 8188-8199 (ports 1024 to 65535); got '80-90'")]),
    ({"backend_command": "python3", "backend_gpus": "0,1,2", "backend_ports": "9000-9001"},
     [("COMFYBATCH_BACKEND_PORTS", "3 backends need 3 ports; the range has 2")]),
    ({"backend_command": "python3", "backend_dir": "/x"},
     [("COMFYBATCH_BACKEND_COMMAND", "set COMFYBATCH_BACKEND_DIR or COMFYBATCH_BACKEND_COMMAND, not both")]),
])
def test_bad_settings_are_problems_naming_the_setting(tmp_path, overrides, problems):
    settings = make_settings(tmp_path, [], **overrides)
    store = Store(settings.db_path)
    try:
        with pytest.raises(InputError) as err:
            service.start_local_backends(settings, store)
        assert store.servers() == []
    finally:
        store.close()
    assert err.value.summary == "local ComfyUI backends cannot start; fix these settings"
    assert [(p.field, p.message) for p in err.value.problems] == problems
    assert service.local_backends(settings)["problems"] == err.value.problems


def test_one_backend_per_gpu_or_one_on_cpu(tmp_path):
    settings = make_settings(tmp_path, [], backend_dir=str(harness.COMFY_DIR), backend_gpus="0,2",
                             backend_ports="9100-9110", backend_args="--highvram")
    plan = backends.plan(settings)
    folder = harness.COMFY_DIR.resolve()  # its Python: the venv beside it, as the install lays it out
    launch = (str(folder.parent / "venv" / "bin" / "python"), str(backends.LAUNCHER), str(folder))
    assert plan.mode == "configured"
    assert [(s.name, s.url, s.argv, dict(s.env)["CUDA_VISIBLE_DEVICES"]) for s in plan.specs] == [
        ("gpu0", "http://127.0.0.1:9100", (*launch, "--listen", "127.0.0.1", "--port", "9100",
                                           "--disable-auto-launch", "--highvram"), "0"),
        ("gpu2", "http://127.0.0.1:9101", (*launch, "--listen", "127.0.0.1", "--port", "9101",
                                           "--disable-auto-launch", "--highvram"), "2")]
    cpu = backends.plan(settings.with_overrides(backend_gpus="cpu", backend_args=""))
    assert [s.argv[-1] for s in cpu.specs] == ["--cpu"]


def test_with_comfyui_url_set_there_is_no_demo_and_no_backend(tmp_path):
    assert backends.plan(make_settings(tmp_path, ["http://127.0.0.1:8188"], demo="auto")) == backends.Plan("off")
    assert backends.plan(make_settings(tmp_path, [], demo="off")) == backends.Plan("off")
    assert not backends.demo_wanted(make_settings(tmp_path, [], backend_command="python3"))
    assert backends.demo_wanted(make_settings(tmp_path, [], demo="auto"))


# -- process handling with a stand-in command -------------------------------------------------------------------
def test_a_stale_backend_left_by_a_dead_comfybatch_is_replaced(tmp_path):
    port = harness.free_port()
    settings = make_settings(tmp_path, [], backend_command=CHATTY, backend_gpus="cpu", backend_ports=str(port))
    plan = backends.plan(settings)
    # What a ComfyBatch killed before PR_SET_PDEATHSIG could act (or on another OS) leaves: a backend on the
    # port and a state file whose owner is gone.
    stale = subprocess.Popen(plan.specs[0].argv, stdout=subprocess.DEVNULL, start_new_session=True)
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    wait_until(lambda: not backends._port_free(port), 30, message="the stale process listening")
    folder = settings.log_dir / "backends"
    folder.mkdir(parents=True)
    (folder / "cpu.json").write_text(json.dumps({
        "name": "cpu", "port": port, "pid": stale.pid, "pid_start": backends._start_time(stale.pid),
        "owner_pid": dead_owner.pid, "owner_start": "1", "state": "running"}))
    store = Store(settings.db_path)
    supervisor = backends.Supervisor(settings, store, plan, grace=5.0)
    try:
        supervisor.step()
        assert stale.wait(10) == -signal.SIGTERM
        b = supervisor.backends[0]
        assert b.state == "starting" and b.proc is not None and b.proc.pid != stale.pid
    finally:
        supervisor.stop()
        store.close()


def test_a_port_held_by_another_program_waits_with_a_message(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = make_settings(tmp_path, [], backend_command=CHATTY, backend_gpus="cpu", backend_ports=str(port))
        store = Store(settings.db_path)
        supervisor = backends.Supervisor(settings, store, backends.plan(settings))
        supervisor.folder.mkdir(parents=True)
        try:
            supervisor.step()
            b = supervisor.backends[0]
            assert (b.state, b.proc, b.message) == (
                "waiting", None, f"port {port} is in use by another program; free it or change "
                                 "COMFYBATCH_BACKEND_PORTS")
        finally:
            supervisor.stop()
            store.close()


# A stand-in "ComfyUI" that answers /system_stats and /queue until the file named by --hang-flag exists, then
# accepts connections and never answers (what a deadlocked server looks like from outside).
HANGING = (f"{shlex.quote(sys.executable)} -c \"import http.server, json, os, sys, time\n"
           "port = int(sys.argv[sys.argv.index('--port') + 1]); flag = sys.argv[sys.argv.index('--hang-flag') + 1]\n"
           "class H(http.server.BaseHTTPRequestHandler):\n"
           "    def do_GET(self):\n"
           "        while os.path.exists(flag): time.sleep(0.1)\n"
           "        body = json.dumps({'system': {}, 'devices': [], 'queue_running': [], 'queue_pending': []})\n"
           "        body = body.encode()\n"
           "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
           "        self.wfile.write(body)\n"
           "    def log_message(self, *a): pass\n"
           "http.server.ThreadingHTTPServer(('127.0.0.1', port), H).serve_forever()\"")


def test_a_backend_that_stops_answering_is_killed_restarted_and_its_tasks_requeued(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "HANG_PROBE_TIMEOUT", 0.5)
    port, flag = harness.free_port(), tmp_path / "hang"
    settings = make_settings(tmp_path, [], backend_command=HANGING, backend_gpus="cpu", backend_ports=str(port),
                             backend_args=f"--hang-flag {flag}", backend_hang_seconds=20)
    store = Store(settings.db_path)
    supervisor = backends.Supervisor(settings, store, backends.plan(settings), grace=5.0)
    supervisor.folder.mkdir(parents=True)
    b = supervisor.backends[0]
    try:
        supervisor.step(now=0.0)
        wait_until(lambda: (supervisor.step(now=1.0), b.state)[1] == "running", 30, message="the backend answering")
        first = b.proc.pid
        store.sync_servers([b.spec.url], lambda: "c")
        store.create_batch("b", "wf", [{"params": {}, "graph": {}}])
        assert store.claim_next_task(b.spec.url, "p1")["status"] == "submitted"
        supervisor.step(now=10.0)  # answers: still running
        assert (b.state, b.proc.pid) == ("running", first)
        flag.touch()
        supervisor.step(now=20.0)  # silent, but for less than 20 s since its last answer (at 10)
        assert (b.state, b.proc.pid) == ("running", first)
        supervisor.step(now=31.0)  # silent for 21 s: killed, its task back in the queue
        assert b.state == "backoff" and b.proc is None and not alive(first)
        assert b.message == "did not answer for 20 s while running: killed; restarting in 1 s (see its log)"
        assert store.counts() == {"queued": 1}
        flag.unlink()
        supervisor.step(now=33.0)
        assert b.state == "starting" and b.proc is not None and b.proc.pid != first and b.restarts == 1
        wait_until(lambda: (supervisor.step(now=34.0), b.state)[1] == "running", 30, message="the restarted backend")
    finally:
        flag.unlink(missing_ok=True)
        supervisor.stop()
        store.close()


def test_the_log_is_capped_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "LOG_CAP", 200_000)
    settings = make_settings(tmp_path, [], backend_command=CHATTY, backend_gpus="cpu",
                             backend_ports=str(harness.free_port()))
    store = Store(settings.db_path)
    supervisor = backends.Supervisor(settings, store, backends.plan(settings))
    supervisor.start()
    log = settings.log_dir / "backends" / "cpu.log"
    try:
        wait_until(lambda: log.with_name("cpu.log.1").is_file(), 60, message="a rotation")
        wait_until(lambda: log.with_name("cpu.log.1").stat().st_size > 0 and log.stat().st_size > 0, 60,
                   message="writes after the rotation")
        for _ in range(5):  # the child keeps writing ~200 KB/s; the files stay near the cap
            time.sleep(0.5)
            assert log.stat().st_size < 3 * 200_000
            assert log.with_name("cpu.log.1").stat().st_size < 3 * 200_000
        assert backends.tail(log, 3).splitlines() == ["x" * 2000] * 3
        pid = supervisor.backends[0].proc.pid
    finally:
        supervisor.stop()
        store.close()
    assert not alive(pid)


@pytest.mark.slow
def test_the_servers_page_shows_each_backend_with_its_log(tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import ui

    port = harness.free_port()
    settings = make_settings(tmp_path, [], backend_command=CHATTY, backend_gpus="cpu", backend_ports=str(port))
    for name, value in (("COMFYUI_URL", ""), ("COMFYBATCH_DB", settings.db_path), ("COMFYBATCH_LOG_DIR",
                        settings.log_dir), ("COMFYBATCH_WORKFLOWS_DIR", settings.workflows_dir),
                        ("COMFYBATCH_OUTPUT_DIR", settings.output_dir), ("COMFYBATCH_BACKEND_COMMAND", CHATTY),
                        ("COMFYBATCH_BACKEND_GPUS", "cpu"), ("COMFYBATCH_BACKEND_PORTS", str(port))):
        monkeypatch.setenv(name, str(value))
    store = Store(settings.db_path)
    supervisor = service.start_local_backends(settings, store)
    assert supervisor is not None
    st.cache_data.clear()
    try:
        wait_until(lambda: "x" * 2000 in backends.tail(settings.log_dir / "backends" / "cpu.log", 2), 60,
                   message="the backend's output in its log")
        pid = supervisor.backends[0].proc.pid
        at = AppTest.from_file("../ui_main.py", default_timeout=30)
        at.switch_page("pages/servers.py")
        at.run()
        assert not at.exception
        assert f"cpu (http://127.0.0.1:{port}): starting, pid {pid}, 0 restart(s)" in [t.value for t in at.text]
        assert at.code[0].value.splitlines()[-1] == "x" * 2000
        assert [s["source"] for s in store.servers()] == ["local"]
    finally:
        supervisor.stop()
        store.close()
        ui.close_stores()
        st.cache_data.clear()
        st.cache_resource.clear()
