"""The hot path on the event hub's thread: HTTP replies parsed as their bytes arrive (`wire.parse_reply`), a
request whose reply the hub reads (`HttpPool.begin`, `wire.PendingReply`), and the scheduler collecting a finished
prompt there (download, file, completion) instead of in a pool thread, handing it to the pool when a download
fails, and claiming and posting the next prompts there as earlier ones finish. Real sockets on loopback; the
servers are the simulated fleet (tests/fake_fleet.py), whose downloads can fail on cue."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest

from core import wire
from core.comfy import ComfyClient
from core.eventhub import EventHub
from core.scheduler import Saver, Scheduler, ServerWorker
from core.store import Store
from tests.fake_fleet import Fleet
from tests.support import make_settings, wait_until
from tests.test_wire import reply, serve  # noqa: F401  (the `serve` fixture: a scripted HTTP server)

GRAPH = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hot"}}}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LENGTH = CONTINUE + b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Pad: " + b"p" * 40 + b"\r\n\r\nhello world"
CHUNKED = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
TO_CLOSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"


@pytest.mark.parametrize(("raw", "status", "keep"), [(LENGTH, 200, True), (CHUNKED, 201, True)])
def test_a_reply_cut_anywhere_is_whole_only_with_its_last_byte(raw, status, keep):
    for cut in range(len(raw)):
        assert wire.parse_reply(bytearray(raw[:cut]), "GET") is None, cut
        with pytest.raises(ConnectionError):  # the server closed it there: never a short body
            wire.parse_reply(bytearray(raw[:cut]), "GET", eof=True)
    follow = b"HTTP/1.1 204 No Content\r\n\r\n"  # the next reply on the connection is not consumed
    assert wire.parse_reply(bytearray(raw + follow), "GET") == (status, b"hello world", keep, len(raw))


def test_a_reply_without_a_length_ends_with_the_connection_and_oversized_parts_are_refused():
    for cut in range(len(TO_CLOSE) + 1):
        assert wire.parse_reply(bytearray(TO_CLOSE[:cut]), "GET") is None, cut
    assert wire.parse_reply(bytearray(TO_CLOSE), "GET", eof=True) == (200, b"until the end", False, len(TO_CLOSE))
    with pytest.raises(ValueError, match="headers of the reply are too long"):
        wire.parse_reply(bytearray(b"HTTP/1.1 200 OK\r\nX: " + b"x" * (wire.MAX_HEADER + 1)), "GET")
    with pytest.raises(ValueError, match="out of bounds"):
        wire.parse_reply(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (wire.MAX_BODY + 1)), "GET")
    with pytest.raises(ValueError, match="not an HTTP reply"):
        wire.parse_reply(bytearray(b"SSH-2.0-OpenSSH\r\n\r\n"), "GET")


def run_on_hub(hub: EventHub, pool: wire.HttpPool, path: str, timeout: float = 5.0) -> list:
    """HttpPool.begin of a GET from a handler on the hub's thread (as the scheduler calls it); what on_done got."""
    got: list = []
    done = threading.Event()
    started: list = []

    class Starter:  # a member whose socket is readable at once: its handler runs on the hub's thread
        def __init__(self) -> None:
            self.a, self.b = socket.socketpair()
            self.b.send(b"go")

        def fileno(self) -> int:
            return self.a.fileno()

        def readable(self) -> bool:
            self.a.recv(16)
            pending = pool.begin("GET", path, None, None, lambda outcome: (got.append(outcome), done.set()))
            started.append(pending)
            if pending is not None:
                hub.attach(pending, time.monotonic() + timeout)
            else:
                done.set()
            return False

        def lost(self) -> None:
            self.a.close()
            self.b.close()

    hub.attach(Starter())
    assert done.wait(timeout + 5)
    return [started[0], *got]


def test_a_get_read_by_the_hub_arrives_whole_and_gives_its_connection_back(serve):  # noqa: F811
    def handler(conn: socket.socket, request: bytes, n: int) -> bool:
        if b"/slow" in request:
            data = reply(b"x" * 300_000)
            conn.sendall(data[:100])  # the headers cut in two, the body in many reads
            time.sleep(0.2)
            conn.sendall(data[100:])
        elif b"/stall" in request:
            time.sleep(3)
            return False
        elif b"/cut" in request:
            conn.sendall(reply(b"y" * 1000)[:500])  # half the body, then the connection closes
            return False
        else:
            conn.sendall(reply(b"ok"))
        return True

    server = serve(handler)
    pool = wire.HttpPool(server.url, 2.0, 5.0)
    hub = EventHub()
    try:
        # No kept-alive connection yet: the caller makes the call the blocking way.
        assert pool.begin("GET", "/first", None, None, lambda outcome: None) is None
        assert pool.request("GET", "/first") == (200, b"ok")
        pending, outcome = run_on_hub(hub, pool, "/slow")
        assert outcome == (200, b"x" * 300_000)
        assert pending.conn in pool._idle and server.connections == 1  # given back, and used again below
        assert pool.request("GET", "/again") == (200, b"ok") and server.connections == 1

        _, outcome = run_on_hub(hub, pool, "/cut")
        assert isinstance(outcome, wire.WireError) and not pool._idle  # closed, not given back
        assert pool.request("GET", "/again") == (200, b"ok")
        _, outcome = run_on_hub(hub, pool, "/stall", timeout=0.5)  # past its deadline: given up, closed
        assert isinstance(outcome, wire.WireError) and "in time" in str(outcome) and not pool._idle
    finally:
        hub.stop()
        pool.close()


def test_a_stopping_hub_lets_the_requests_under_way_finish_and_gives_up_on_the_rest(serve):  # noqa: F811
    def handler(conn: socket.socket, request: bytes, n: int) -> bool:
        time.sleep(0.3 if b"/late" in request else 5)
        conn.sendall(reply(b"late but whole"))
        return True

    server = serve(handler)
    pool = wire.HttpPool(server.url, 2.0, 30.0)
    hub = EventHub()
    got: list = []
    try:
        for path in ("/late", "/never"):
            conn = pool._take(reuse=False)[0]  # an open connection, as a kept-alive one would be
            pool._give_back(conn)
            pending = pool.begin("GET", path, None, None, got.append)
            assert pending is not None
            hub.attach(pending, time.monotonic() + 30)
        started = time.monotonic()
        hub.stop(timeout=10, drain=1.0)
        stopped = time.monotonic() - started
    finally:
        pool.close()
    # The reply that came within the drain was read whole; the other was given up when it ended.
    assert (200, b"late but whole") in got and len(got) == 2
    assert any(isinstance(outcome, wire.WireError) for outcome in got)
    assert 0.9 < stopped < 3.0


def fleet_scheduler(tmp_path, fleet: Fleet, tasks: int) -> tuple[Scheduler, Store, list[int]]:
    settings = make_settings(tmp_path, fleet.urls)
    store = Store(settings.db_path)
    _, ids = store.create_batch("hot", "hot", [{"params": {"n": i}, "graph": GRAPH} for i in range(tasks)])
    scheduler = Scheduler(settings, store)
    return scheduler, store, ids


@pytest.mark.parametrize("inline_ms", [1000.0, 0.0], ids=["files-cheap", "files-dear"])
def test_finished_prompts_are_collected_on_the_event_thread_and_a_failed_download_in_the_pool(tmp_path,
                                                                                              monkeypatch, inline_ms):
    """Cheap files are written on the event thread (once the first one is measured); dear ones on the saver's."""
    monkeypatch.setattr(Saver, "INLINE_FILE_MS", inline_ms)
    saved_on: list[str] = []
    save = Saver.save

    def recorded(self, items):
        saved_on.extend(threading.current_thread().name for _ in items)
        return save(self, items)

    monkeypatch.setattr(Saver, "save", recorded)
    in_pool: list[str] = []
    collect = ServerWorker._collect

    def counted(self, prompt_id, *args):
        in_pool.append(threading.current_thread().name)
        return collect(self, prompt_id, *args)

    monkeypatch.setattr(ServerWorker, "_collect", counted)
    posted_blocking: list[str] = []
    submit = ComfyClient.submit

    def blocking_post(self, graph, prompt_id):
        posted_blocking.append(prompt_id)
        return submit(self, graph, prompt_id)

    monkeypatch.setattr(ComfyClient, "submit", blocking_post)
    with Fleet(2, job=0.05) as fleet:
        scheduler, store, ids = fleet_scheduler(tmp_path, fleet, 40)
        scheduler.start()
        try:
            wait_until(lambda: store.counts() == {"succeeded": 40}, 60, message="the first 40 tasks")
            # Every one collected on the hub (the events told the outputs): no pool thread took part. The posts:
            # the first fill (two per server) by the dispatch threads, then mostly from the event thread as prompts
            # finish (a dispatch thread still claims when it wakes to a slot free, every half second at least).
            assert in_pool == []
            assert 4 <= len(posted_blocking) <= 20, posted_blocking  # of 40 (all 40 before)
            # Until the saver has measured a file, the events thread queues to it; from then on by the cost.
            assert len(saved_on) == 40 and saved_on[0] == "comfybatch-saver"
            assert set(saved_on[-30:]) == ({"comfybatch-events"} if inline_ms else {"comfybatch-saver"})
            assert fleet.views == 40
            fleet.fail_views = 3  # the next three downloads fail: the pool starts those collections over
            _, more = store.create_batch("hot", "hot", [{"params": {"n": i}, "graph": GRAPH} for i in range(10)])
            wait_until(lambda: store.counts() == {"succeeded": 50}, 60, message="the next 10 tasks")
        finally:
            scheduler.stop()
    assert len(in_pool) >= 1 and all(name.startswith("comfybatch-collect") for name in in_pool)
    assert fleet.fail_views == 0 and fleet.views == 50  # each image downloaded once when it came whole
    images = store.images_for_batch(1) + store.images_for_batch(2)
    assert len(images) == 50 and len({i["task_id"] for i in images}) == 50
    png = hashlib.sha256(fleet.png).hexdigest()
    for image in images:  # bytes unchanged, described from the header
        path = scheduler.settings.output_dir / image["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == png
        assert (image["width"], image["height"], image["size_bytes"]) == (64, 64, len(fleet.png))
    for task_id in [*ids, *more]:
        task = store.get_task(task_id)
        # A task collected after a gap (its download failed twice: reconcile found it in /history) has its start
        # from the server's record; its steps are known only from the events.
        assert task["started_at"] is not None and task["finished_at"] >= task["started_at"]
        if task_id in ids:
            assert (task["progress_value"], task["progress_max"]) == (4, 4)
    store.close()
