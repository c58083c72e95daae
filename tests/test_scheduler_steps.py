"""The server worker's state machine, stepped one decision at a time: no ComfyUI, no threads, no sockets.

Each test builds a real `Store` on a temporary SQLite file and a `ServerWorker` whose ComfyUI edge is an
in-process stand-in (`StandInComfy`, an object with the client's methods that records every call), collects
inline (`tests.support.inline_executor`), then calls the worker's step methods (`submit_next_task`,
`on_event`, `reconcile`, `handle_cancels`, `loop_once`) and compares whole values: counts, task rows, the
events list, the calls made.
The event payloads follow the real server's (see /work/shared/comfyui-transcripts/).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.comfy import ComfyClient, EventSocket
from core.config import Settings
from core.errors import PromptRejected, ServerUnavailable
from core.scheduler import Scheduler, ServerWorker
from core.store import Store
from tests.support import NoEvents, inline_executor, make_settings, png

URL = "http://comfy-a.test:8188"
GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16, "batch_size": 1, "color": 0}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ComfyBatch"}}}
OOM = {"node_id": "3", "node_type": "KSampler", "executed": ["4", "5"], "exception_type": "torch.OutOfMemoryError",
       "exception_message": "CUDA out of memory. Tried to allocate 20.00 MiB\n", "traceback": ["..."]}
OOM_MESSAGE = ("ComfyUI failed while running node 3 (KSampler): torch.OutOfMemoryError: CUDA out of memory. "
               "Tried to allocate 20.00 MiB")
RED, BLUE = png((200, 10, 10)), png((10, 10, 200), size=(8, 8))
TASK_FIELDS = ("status", "server", "attempts", "error", "progress_value", "progress_max", "cancel_requested")


class StandInComfy:
    """One ComfyUI server, in process: answers what the test set up and records every call in `calls`.

    `submit` also records the status the task had in the store at the moment of the post, which shows the
    prompt_id was stored before anything was sent."""

    def __init__(self, store: Store):
        self.store = store
        self.calls: list[tuple[Any, ...]] = []
        self.graphs: dict[str, dict[str, Any]] = {}
        self.submit_error: Exception | None = None
        self.running: list[str] = []
        self.pending: list[str] = []
        self.histories: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.history_asked = threading.Event()
        self.closed = False

    def submit(self, graph: dict[str, Any], prompt_id: str) -> dict[str, Any]:
        task = self.store.task_by_prompt_id(prompt_id)
        self.calls.append(("submit", prompt_id, task["status"] if task else None))
        if self.submit_error is not None:
            raise self.submit_error
        self.graphs[prompt_id] = graph
        self.pending.append(prompt_id)
        return {"prompt_id": prompt_id, "number": len(self.graphs) - 1, "node_errors": {}}

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        self.calls.append(("history", prompt_id))
        self.history_asked.set()
        return self.histories.get(prompt_id)

    def queue(self) -> tuple[list[str], list[str]]:
        self.calls.append(("queue",))
        return list(self.running), list(self.pending)

    def delete_pending(self, prompt_ids: list[str]) -> None:
        self.calls.append(("delete_pending", prompt_ids))
        self.pending = [p for p in self.pending if p not in prompt_ids]

    def interrupt(self, prompt_id: str) -> None:
        self.calls.append(("interrupt", prompt_id))

    def view(self, image: dict[str, Any]) -> bytes:
        self.calls.append(("view", image["filename"]))
        return self.files[image["filename"]]

    def upload_image(self, data: bytes, filename: str) -> str:
        self.calls.append(("upload_image", filename, len(data)))
        return f"uploads/{filename}"

    def system_stats(self) -> dict[str, Any]:
        self.calls.append(("system_stats",))
        return {"system": {"comfyui_version": "0.3.64"}, "devices": [{"name": "cpu"}]}

    def close(self) -> None:
        self.closed = True

    # -- what the server does on its own ------------------------------------------------------------
    def start_running(self, prompt_id: str) -> None:
        self.pending.remove(prompt_id)
        self.running.append(prompt_id)

    def finish(self, prompt_id: str, outputs: dict[str, Any]) -> None:
        """The prompt ran to success while nobody listened: gone from the queue, its entry in /history."""
        for lst in (self.pending, self.running):
            if prompt_id in lst:
                lst.remove(prompt_id)
        self.histories[prompt_id] = {
            "prompt": [0, prompt_id, self.graphs[prompt_id], {"client_id": "steps"}, ["2"]], "outputs": outputs,
            "status": {"status_str": "success", "completed": True,
                       "messages": [["execution_start", {"prompt_id": prompt_id}],
                                    ["execution_success", {"prompt_id": prompt_id}]]}}

    def forget_everything(self) -> None:
        """A restart: the queue and the history are gone."""
        self.pending.clear()
        self.running.clear()
        self.histories.clear()


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, [URL], max_attempts=2, in_flight=2)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    s = Store(settings.db_path)
    s.sync_servers([URL], lambda: "steps-client")
    yield s
    s.close()


@pytest.fixture
def server(store: Store) -> StandInComfy:
    return StandInComfy(store)


@pytest.fixture
def new_worker(settings: Settings, store: Store, server: StandInComfy) -> Callable[[], ServerWorker]:
    """A fresh worker on the same database and server (a second one plays a restarted scheduler)."""
    scheduler = Scheduler(settings, store, owner="steps", pool=inline_executor())

    def make() -> ServerWorker:
        return ServerWorker(scheduler, URL, "steps-client", client=server, events=NoEvents(),
                            probe_health=lambda: {"up": True, "version": "0.3.64"})

    return make


@pytest.fixture
def worker(new_worker: Callable[[], ServerWorker]) -> ServerWorker:
    return new_worker()


def enqueue(store: Store, n: int = 1, inputs: dict[str, Any] | None = None) -> list[int]:
    rows = [{"row_number": i + 1, "params": {"color": i}, "graph": GRAPH, "prompt": f"row {i + 1}", "inputs": inputs}
            for i in range(n)]
    return store.create_batch("steps", "empty_image.json", rows)[1]


def fields(store: Store, task_id: int) -> dict[str, Any]:
    row = store.get_task(task_id)
    return {k: row[k] for k in TASK_FIELDS}


def history_of(store: Store, task_id: int) -> list[tuple[str, str | None]]:
    return [(e["status"], e["detail"]) for e in store.events(task_id)]


def image_output(*names: str) -> dict[str, Any]:
    return {"images": [{"filename": n, "subfolder": "", "type": "output"} for n in names]}


# -- claim and submit -----------------------------------------------------------------------------
def test_submit_next_task_stores_the_prompt_id_before_posting(worker, store, server):
    [task_id] = enqueue(store)
    claimed = worker.submit_next_task()
    pid = claimed["prompt_id"]
    assert server.calls == [("submit", pid, "submitted")]  # the row already held the prompt_id when posted
    assert server.graphs == {pid: GRAPH}
    assert fields(store, task_id) == {"status": "submitted", "server": URL, "attempts": 1, "error": None,
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}
    assert store.get_task(task_id)["prompt_id"] == pid
    assert worker.inflight == {pid: task_id}
    assert store.counts() == {"submitted": 1}
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL)]
    assert worker.submit_next_task() is None  # nothing left to claim
    assert server.calls == [("submit", pid, "submitted")]


def test_input_images_are_uploaded_once_per_file_and_the_graph_points_at_them(worker, store, server, tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(RED)
    inputs = {"1.image": {"sha256": "ab" * 32, "path": str(picture), "name": "cat.png"}}
    first, second = enqueue(store, 2, inputs=inputs)
    pid1 = worker.submit_next_task()["prompt_id"]
    pid2 = worker.submit_next_task()["prompt_id"]
    patched = {**GRAPH, "1": {**GRAPH["1"], "inputs": {**GRAPH["1"]["inputs"], "image": "uploads/cat.png"}}}
    assert server.calls == [("upload_image", "cat.png", len(RED)), ("submit", pid1, "submitted"),
                            ("submit", pid2, "submitted")]
    assert server.graphs == {pid1: patched, pid2: patched}
    assert [store.get_task(i)["graph"] for i in (first, second)] == [patched, patched]


def test_loop_once_publishes_health_reconciles_and_submits_up_to_in_flight(worker, store, server):
    ids = enqueue(store, 3)
    now = time.monotonic()
    worker.loop_once(now=now)
    worker.loop_once(now=now + 0.1)
    pids = [store.get_task(i)["prompt_id"] for i in ids[:2]]
    assert server.calls == [("system_stats",), ("queue",), ("submit", pids[0], "submitted"),
                            ("submit", pids[1], "submitted")]
    assert store.counts() == {"queued": 1, "submitted": 2}
    assert worker.inflight == dict(zip(pids, ids[:2], strict=True))
    assert [(s["url"], s["health"]) for s in store.servers()] == [(URL, '{"up": true, "version": "0.3.64"}')]


# -- events ---------------------------------------------------------------------------------------
def test_a_run_is_marked_running_once_it_has_run_half_a_second_even_without_progress(worker, store):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    worker.on_event("execution_start", {"prompt_id": pid, "timestamp": 1795461085862}, now=100.0)
    worker.loop_once(now=100.3)  # not yet: a shorter run is recorded by its completion alone
    assert store.counts() == {"submitted": 1}
    worker.loop_once(now=100.6)
    assert store.counts() == {"running": 1}
    assert store.get_task(task_id)["started_at"] is not None
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("running", None)]


def test_events_of_other_clients_prompts_are_ignored(worker, store):
    [task_id] = enqueue(store)
    worker.submit_next_task()
    worker.on_event("execution_start", {"prompt_id": "someone-elses", "timestamp": 1})
    worker.on_event("status", {"status": {"exec_info": {"queue_remaining": 1}}})
    assert fields(store, task_id)["status"] == "submitted"


def test_progress_is_written_with_running_then_when_the_percent_changes_at_most_every_half_second(
        worker, store, server):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    worker.on_event("execution_start", {"prompt_id": pid}, now=100.0)
    seen = []
    for value, at in ((1, 100.0), (2, 100.2), (3, 100.5), (4, 100.7), (5, 101.0), (30, 101.2)):
        worker.on_event("progress", {"value": value, "max": 30, "prompt_id": pid, "node": "3"}, now=at)
        assert store.get_task(task_id)["progress_value"] == (seen[-1][1] if seen else None)  # events never write
        worker.loop_once(now=at)  # the dispatch loop writes what is due
        row = store.get_task(task_id)
        seen.append((row["status"], row["progress_value"]))
    # Nothing for the first half second; then `running` and its progress in one write; then a new whole percent
    # at most every half second (4/30 at 100.7 and 30/30 at 101.2 came too soon).
    assert seen == [("submitted", None), ("submitted", None), ("running", 3), ("running", 3), ("running", 5),
                    ("running", 5)]
    worker.loop_once(now=101.3)
    assert fields(store, task_id)["progress_value"] == 5
    worker.loop_once(now=101.6)  # the dispatch loop writes the latest progress once it is due
    assert fields(store, task_id)["progress_value"] == 30
    written = store.get_task(task_id)["updated_at"]
    worker.on_event("progress", {"value": 30, "max": 30, "prompt_id": pid, "node": "3"}, now=103.0)
    worker.loop_once(now=104.0)
    assert store.get_task(task_id)["updated_at"] == written  # the same percent: nothing a page shows changed
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("running", None)]


def test_a_short_run_costs_two_write_transactions_and_keeps_its_running_event(worker, store, server, monkeypatch):
    [task_id] = enqueue(store)
    writes = []
    write = store.write

    def counted() -> Any:
        writes.append(1)
        return write()

    monkeypatch.setattr(store, "write", counted)
    pid = worker.submit_next_task()["prompt_id"]
    server.files = {"ComfyBatch_00001_.png": RED}
    worker.on_event("execution_start", {"prompt_id": pid}, now=100.0)
    for step in (1, 2, 3, 4):
        worker.on_event("progress", {"value": step, "max": 4, "prompt_id": pid, "node": "3"}, now=100.0 + step / 20)
    worker.on_event("executed", {"node": "2", "prompt_id": pid, "output": image_output("ComfyBatch_00001_.png")},
                    now=100.2)
    worker.on_event("execution_success", {"prompt_id": pid}, now=100.2)
    assert len(writes) == 2  # the claim and the completion (with its start time and `running` event)
    row = store.get_task(task_id)
    # Its progress was never written while it ran; the completion records the steps it counted: 4 of 4.
    assert (row["status"], row["progress_value"], row["progress_max"]) == ("succeeded", 4, 4)
    assert row["started_at"] is not None and row["finished_at"] >= row["started_at"]
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("running", None),
                                          ("succeeded", None)]
    assert store.run_durations("empty_image.json") == [row["finished_at"] - row["started_at"]]


def test_execution_success_saves_the_images_and_records_them(worker, store, server, settings):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    server.start_running(pid)
    server.files = {"ComfyBatch_00001_.png": RED, "ComfyBatch_00002_.png": BLUE}
    worker.on_event("execution_start", {"prompt_id": pid})
    worker.on_event("executing", {"node": "2", "display_node": "2", "prompt_id": pid})
    worker.on_event("executed", {"node": "2", "display_node": "2", "prompt_id": pid,
                                 "output": image_output("ComfyBatch_00001_.png", "ComfyBatch_00002_.png")})
    worker.on_event("execution_success", {"prompt_id": pid, "timestamp": 1795461085871})
    # The events told the outputs: nothing read from /history on this path.
    assert server.calls == [("submit", pid, "submitted"), ("view", "ComfyBatch_00001_.png"),
                            ("view", "ComfyBatch_00002_.png")]
    assert store.counts() == {"succeeded": 1}
    assert fields(store, task_id) == {"status": "succeeded", "server": URL, "attempts": 1, "error": None,
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}
    images = [{k: img[k] for k in ("node_id", "idx", "path", "filename", "type", "width", "height", "mode",
                                   "size_bytes")} for img in store.images_for_task(task_id)]
    assert images == [
        {"node_id": "2", "idx": 0, "path": "batch-00001/task-000001_2_00.png", "filename": "ComfyBatch_00001_.png",
         "type": "output", "width": 32, "height": 16, "mode": "RGB", "size_bytes": len(RED)},
        {"node_id": "2", "idx": 1, "path": "batch-00001/task-000001_2_01.png", "filename": "ComfyBatch_00002_.png",
         "type": "output", "width": 8, "height": 8, "mode": "RGB", "size_bytes": len(BLUE)}]
    saved = settings.output_dir / "batch-00001" / "task-000001_2_00.png"
    assert saved.read_bytes() == RED
    with Image.open(saved) as im:
        assert (im.size, im.getpixel((31, 15))) == ((32, 16), (200, 10, 10))
    assert worker.inflight == {} and worker.collecting == set()
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("running", None),
                                          ("succeeded", None)]


def test_finished_tasks_are_logged_once_a_minute_and_each_task_only_at_debug(worker, store, server, caplog):
    """Two lines per task would roll a capped log over in minutes at fleet rates: a count per minute instead."""
    caplog.set_level(logging.DEBUG, logger="core.scheduler")
    scheduler = worker.scheduler
    start = time.monotonic() + 1000
    scheduler.summarise(now=start)  # nothing finished yet: no line, the next minute starts
    caplog.clear()
    for _ in range(3):
        [task_id] = enqueue(store)
        pid = worker.submit_next_task()["prompt_id"]
        worker.on_event("execution_start", {"prompt_id": pid})
        worker.on_event("execution_success", {"prompt_id": pid, "timestamp": 1795461085871})
    scheduler.summarise(now=start + 59)  # not a minute yet
    assert store.counts() == {"succeeded": 3}
    assert {r.levelname for r in caplog.records if r.message.startswith("task ")} == {"DEBUG"}
    assert [r.message for r in caplog.records if r.levelno >= logging.INFO] == []
    scheduler.summarise(now=start + 61)
    scheduler.summarise(now=start + 125)  # nothing finished since: no line
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    worker.on_event("execution_start", {"prompt_id": pid})
    worker.on_event("execution_success", {"prompt_id": pid, "timestamp": 1795461085871})
    scheduler.summarise(now=start + 130, final=True, servers=2)  # stopping: the rest at once, with the servers fed
    assert [(r.levelname, r.message) for r in caplog.records if r.levelno >= logging.INFO] == [
        ("INFO", "3 task(s) succeeded in the last 61 s on 0 server(s)"),
        ("INFO", "1 task(s) succeeded in the last 5 s on 2 server(s)")]


def test_success_without_a_seen_start_reads_the_outputs_from_history(worker, store, server, settings):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    server.files = {"ComfyBatch_00001_.png": RED}
    server.finish(pid, {"2": image_output("ComfyBatch_00001_.png")})
    # The socket reconnected mid-run: this connection never saw execution_start, so `executed` may be missing.
    worker.on_event("execution_success", {"prompt_id": pid})
    assert server.calls == [("submit", pid, "submitted"), ("history", pid), ("view", "ComfyBatch_00001_.png")]
    assert store.counts() == {"succeeded": 1}
    assert (settings.output_dir / store.images_for_task(task_id)[0]["path"]).read_bytes() == RED


def test_execution_error_is_retried_then_fails_with_comfyuis_message(worker, store, server):
    [task_id] = enqueue(store)
    for attempt in (1, 2):
        pid = worker.submit_next_task()["prompt_id"]
        worker.on_event("execution_start", {"prompt_id": pid})
        worker.on_event("execution_error", {"prompt_id": pid, **OOM})
        if attempt == 1:
            assert fields(store, task_id) == {"status": "queued", "server": None, "attempts": 1, "error": OOM_MESSAGE,
                                              "progress_value": None, "progress_max": None, "cancel_requested": 0}
            assert store.get_task(task_id)["prompt_id"] is None
    assert fields(store, task_id) == {"status": "failed", "server": URL, "attempts": 2, "error": OOM_MESSAGE,
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}
    assert store.counts() == {"failed": 1}
    assert history_of(store, task_id) == [
        ("queued", None), ("submitted", URL), ("running", None), ("queued", OOM_MESSAGE),
        ("submitted", URL), ("running", None), ("failed", OOM_MESSAGE)]
    assert worker.submit_next_task() is None
    assert [c[0] for c in server.calls] == ["submit", "submit"]  # the error came with the event: no /history


def test_a_foreign_interrupt_is_retried(worker, store):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    worker.on_event("execution_start", {"prompt_id": pid})
    worker.on_event("execution_interrupted", {"prompt_id": pid, "node_id": "3", "node_type": "KSampler",
                                              "executed": ["6", "7", "5"]})
    reason = f"the prompt was interrupted on {URL} at node 3 (KSampler)"
    assert fields(store, task_id) == {"status": "queued", "server": None, "attempts": 1, "error": reason,
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}


# -- submit failures ------------------------------------------------------------------------------
def test_a_rejected_prompt_fails_at_once_and_is_never_retried(worker, store, server):
    [task_id] = enqueue(store)
    server.submit_error = PromptRejected({
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}},
        "node_errors": {"1": {"errors": [{"type": "required_input_missing", "message": "Required input is missing",
                                          "details": "color", "extra_info": {"input_name": "color"}}],
                              "dependent_outputs": ["2"], "class_type": "EmptyImage"}}}, URL)
    pid = worker.submit_next_task()["prompt_id"]
    message = "ComfyUI rejected the prompt: node 1 (EmptyImage) input 'color': Required input is missing"
    assert fields(store, task_id) == {"status": "failed", "server": URL, "attempts": 1, "error": message,
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("failed", message)]
    assert worker.inflight == {}
    assert worker.submit_next_task() is None
    assert server.calls == [("submit", pid, "submitted")]


def test_refused_before_the_post_requeues_without_spending_an_attempt(worker, store, server):
    [task_id] = enqueue(store)
    refused = (f"ComfyUI at {URL} is unreachable (ConnectionError: HTTPConnectionPool(host='comfy-a.test', "
               "port=8188): Max retries exceeded (NewConnectionError: [Errno 111] Connection refused))")
    server.submit_error = ServerUnavailable(refused, URL, maybe_delivered=False)
    worker.healthy = True
    worker.submit_next_task()
    assert fields(store, task_id) == {"status": "queued", "server": None, "attempts": 0, "error": refused,
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("queued", refused)]
    assert (worker.inflight, worker.healthy, worker.needs_reconcile) == ({}, False, True)
    server.submit_error = None
    worker.submit_next_task()
    assert fields(store, task_id)["status"] == "submitted" and fields(store, task_id)["attempts"] == 1


def test_a_post_that_may_have_arrived_waits_for_reconcile(worker, store, server):
    [task_id] = enqueue(store)
    server.submit_error = ServerUnavailable(f"ComfyUI at {URL} is unreachable (ReadTimeout: read timed out)", URL,
                                            maybe_delivered=True)
    pid = worker.submit_next_task()["prompt_id"]
    assert (fields(store, task_id)["status"], worker.inflight, worker.needs_reconcile) == ("submitted", {}, True)
    server.pending.append(pid)  # it did arrive
    server.graphs[pid] = GRAPH
    worker.reconcile()
    assert (fields(store, task_id)["status"], worker.inflight) == ("submitted", {pid: task_id})


# -- reconcile ------------------------------------------------------------------------------------
def test_reconcile_requeues_a_prompt_the_server_forgot_then_fails_at_max_attempts(new_worker, store, server):
    [task_id] = enqueue(store)
    reasons = []
    for _ in (1, 2):
        pid = new_worker().submit_next_task()["prompt_id"]
        server.forget_everything()  # ComfyUI restarted
        restarted = new_worker()  # and so did we: a new worker knows the task only from the database
        restarted.reconcile()
        # Claimed within the lease time: the previous owner's post may still be on the way, so it is watched...
        assert restarted.inflight == {pid: task_id} and fields(store, task_id)["status"] == "submitted"
        with store.write() as conn:  # ... and decided once that time has passed
            conn.execute("UPDATE tasks SET submitted_at = submitted_at - 60 WHERE id = ?", (task_id,))
        restarted.reconcile()
        reasons.append(f"ComfyUI at {URL} no longer knows prompt {pid} (server restarted?)")
        if len(reasons) == 1:
            assert fields(store, task_id) == {"status": "queued", "server": None, "attempts": 1,
                                              "error": reasons[0], "progress_value": None, "progress_max": None,
                                              "cancel_requested": 0}
    assert fields(store, task_id) == {"status": "failed", "server": URL, "attempts": 2, "error": reasons[1],
                                      "progress_value": None, "progress_max": None, "cancel_requested": 0}
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("queued", reasons[0]),
                                          ("submitted", URL), ("failed", reasons[1])]


def test_reconcile_keeps_prompts_the_server_still_queues(new_worker, store, server):
    ids = enqueue(store, 2)
    first = new_worker()
    pids = [first.submit_next_task()["prompt_id"] for _ in ids]
    server.start_running(pids[0])
    restarted = new_worker()
    restarted.reconcile()
    assert restarted.inflight == dict(zip(pids, ids, strict=True))
    assert store.counts() == {"submitted": 2}


def test_a_prompt_finishing_while_reconcile_waits_on_the_server_does_not_keep_its_slot(worker, store, server):
    ids = enqueue(store, 3)
    pids = [worker.submit_next_task()["prompt_id"] for _ in ids[:2]]
    server.start_running(pids[0])
    server.files = {"ComfyBatch_00001_.png": RED}
    worker.on_event("execution_start", {"prompt_id": pids[0]})
    asked = server.history

    def history_meanwhile(prompt_id: str) -> dict[str, Any] | None:
        if prompt_id == pids[1]:
            # reconcile() has read the queue (both ours were in it) and is asking about the second prompt when
            # the first one's success arrives on the websocket thread.
            server.finish(pids[0], {"2": image_output("ComfyBatch_00001_.png")})
            worker.on_event("executed", {"node": "2", "prompt_id": pids[0],
                                         "output": image_output("ComfyBatch_00001_.png")})
            worker.on_event("execution_success", {"prompt_id": pids[0]})
        return asked(prompt_id)

    server.history = history_meanwhile  # type: ignore[method-assign]
    worker.reconcile()
    assert store.counts() == {"succeeded": 1, "submitted": 1, "queued": 1}
    assert worker.inflight == {pids[1]: ids[1]}  # not the finished prompt, from the snapshot before the calls
    assert worker.submit_next_task()["id"] == ids[2]  # its slot is free at once


def test_a_task_in_flight_here_that_the_worker_lost_track_of_is_reconciled_within_ten_seconds(worker, store, server):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    server.files = {"ComfyBatch_00001_.png": BLUE}
    server.finish(pid, {"2": image_output("ComfyBatch_00001_.png")})
    worker.loop_once(now=worker.recounted + 1)  # the first pass reconciles; the prompt is collected
    assert store.counts() == {"succeeded": 1}
    [other] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    worker.inflight.clear()  # tracking lost (say, its terminal event went to another scheduler's socket)
    server.finish(pid, {"2": image_output("ComfyBatch_00001_.png")})
    worker.loop_once(now=worker.recounted + 5)
    assert store.counts() == {"succeeded": 1, "submitted": 1}
    worker.loop_once(now=worker.recounted + 10)  # the recount sees one in flight here, none tracked
    assert store.counts() == {"succeeded": 2}


def test_reconcile_collects_a_prompt_found_finished_in_history(worker, store, server, settings):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    server.files = {"ComfyBatch_00001_.png": BLUE}
    server.finish(pid, {"2": image_output("ComfyBatch_00001_.png")})  # finished during a websocket gap
    worker.on_connect()
    worker.reconcile()
    assert server.calls == [("submit", pid, "submitted"), ("queue",), ("history", pid), ("history", pid),
                            ("view", "ComfyBatch_00001_.png")]
    assert store.counts() == {"succeeded": 1}
    assert (settings.output_dir / store.images_for_task(task_id)[0]["path"]).read_bytes() == BLUE
    assert worker.inflight == {}


# -- cancel ---------------------------------------------------------------------------------------
def test_cancelling_a_pending_prompt_deletes_it_from_the_servers_queue(worker, store, server):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    assert store.request_cancel([task_id])[0] == []  # in flight: flagged, the worker does the rest
    worker.handle_cancels()
    assert server.calls == [("submit", pid, "submitted"), ("queue",), ("delete_pending", [pid])]
    assert server.pending == []
    assert fields(store, task_id) == {"status": "cancelled", "server": URL, "attempts": 1,
                                      "error": "cancelled by user", "progress_value": None, "progress_max": None,
                                      "cancel_requested": 1}
    assert worker.inflight == {}


def test_cancelling_a_running_prompt_interrupts_it(worker, store, server):
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    server.start_running(pid)
    worker.on_event("execution_start", {"prompt_id": pid})
    store.request_cancel([task_id])
    worker.handle_cancels()
    assert server.calls == [("submit", pid, "submitted"), ("queue",), ("interrupt", pid)]
    # In flight until the server says it stopped (`running` is written once a run has lasted half a second).
    assert fields(store, task_id)["status"] == "submitted"
    worker.on_event("execution_interrupted", {"prompt_id": pid, "node_id": "3", "node_type": "KSampler"})
    assert fields(store, task_id) == {"status": "cancelled", "server": URL, "attempts": 1,
                                      "error": "cancelled by user", "progress_value": None, "progress_max": None,
                                      "cancel_requested": 1}
    assert history_of(store, task_id) == [("queued", None), ("submitted", URL), ("running", None),
                                          ("cancelled", "cancelled by user")]


# -- the seam and shutdown ------------------------------------------------------------------------
def test_a_worker_built_without_a_stand_in_talks_to_the_real_server(settings, store):
    scheduler = Scheduler(settings, store, owner="steps", pool=inline_executor())
    worker = ServerWorker(scheduler, URL, "steps-client")
    try:
        assert isinstance(worker.client, ComfyClient) and isinstance(worker.socket, EventSocket)
        assert (worker.client.url, worker.client.client_id, worker.client.timeout) == (URL, "steps-client",
                                                                                       (3.0, 30.0))
    finally:
        worker.client.close()


def test_stop_cuts_short_a_collect_waiting_for_history(settings, store, server):
    """A finished-looking prompt whose /history entry never shows up: stop() must not sit out the retries."""
    scheduler = Scheduler(settings, store, owner="steps")  # the real thread pool
    worker = ServerWorker(scheduler, URL, "steps-client", client=server, events=NoEvents(),
                          probe_health=lambda: {"up": True})
    scheduler.workers[URL] = worker
    [task_id] = enqueue(store)
    pid = worker.submit_next_task()["prompt_id"]
    worker.on_event("execution_success", {"prompt_id": pid})  # no execution_start seen: ask /history
    assert server.history_asked.wait(5.0)
    started = time.monotonic()
    scheduler.stop()
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"stop() took {elapsed:.2f} s"
    # Left in flight for reconcile (this process's, or the next one's), not failed.
    assert fields(store, task_id)["status"] == "submitted"
    assert (worker.collecting, worker.needs_reconcile, server.closed) == (set(), True, True)
