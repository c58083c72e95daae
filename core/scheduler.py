"""The scheduler: the only module that starts threads.

`Scheduler` leases servers one by one (several schedulers split a fleet; see its docstring) and runs one
`ServerWorker` per server it holds. A worker keeps a window of our prompts queued or running on its server
(`in_flight`, more when a round trip is long against a run: `ServerWorker.window`), so the GPU never waits on
us while the rest of the work can still go to other servers. Events come
over one websocket per server (a stable client_id per server, kept in the database, so a restarted scheduler
receives the events of prompts its predecessor posted), all read by one thread (`core.eventhub`), whose
handler (`on_event`) also runs the hot path without waiting on any server: a success the events told is
collected there (`_collect_on_hub`: the downloads' replies are read by the hub as they arrive, then the files
and the completion), and the places that frees in the window are claimed and posted there (`_feed_on_hub`).
Everything else (failures, collections from /history, uploads of input images, a post or a download that
cannot start without a new connection) goes to the worker's dispatch thread or the shared collection pool.
After any gap, or a quiet spell, the worker reconciles its in-flight tasks through `/queue` and
`/history/{prompt_id}`.

Every step a worker takes is a method a test can call without threads or sockets: `submit_next_task`,
`on_event`, `reconcile`, `handle_cancels` (and `loop_once`, which strings them together). The ComfyUI edge
is injected: `ServerWorker(..., client=, events=, probe_health=)` default to the real `ComfyClient`,
`EventSocket` and `probe`, and `Scheduler(..., pool=)` to a thread pool, so a test can pass an in-process
stand-in and an executor that runs collection inline. Every pause waits on a stop event (the worker's or
the scheduler's), never in `time.sleep`, so `Scheduler.stop()` returns promptly.

Writes per run: the claim and the completion (which also records a short run's start and `running` event);
a run longer than PROGRESS_INTERVAL also gets `running` with its progress in one write, then its progress
whenever the whole percent changes, at most every PROGRESS_INTERVAL (`_show_progress`, on the dispatch loop,
which wakes at least every half second while prompts are in flight).

With object storage on (COMFYBATCH_S3_BUCKET), the leader (the holder of the database-wide lease) also runs one
uploader thread (core.uploads):
saved images are recorded as `pending` and uploaded off the dispatch path; a collection wakes it. It stops
with the lease, and a new leader resumes the pending uploads from the database.

Which task a server gets next (`Store.claim_next_task`, one `BEGIN IMMEDIATE` transaction):
1. nothing while the whole queue is paused; never a task of a paused batch (both kept in the database, so
   they survive restarts; what is already on a server finishes);
2. the highest task priority first: priority always wins over fairness;
3. at that priority, batches marked "run next" first (the latest mark first);
4. then, with COMFYBATCH_POLICY=fair (the default), round robin between batches: every claim stamps its
   batch with the next value of a counter (`batches.turn`) and the batch with the smallest stamp goes next,
   so a new batch (stamp 0) gets the very next free slot and then batches alternate one task each, however
   large each is. With `fifo`, the oldest batch first (the pre-fleet behaviour: priority, then FIFO);
5. within a batch, the lowest task id;
6. model affinity (COMFYBATCH_AFFINITY): if that task loads other models than the server's last task did,
   the next batch in the same order whose next such task loads the same models goes instead, unless the
   chosen batch has waited COMFYBATCH_AFFINITY_PATIENCE claims since its turn: fairness then wins.
A draining server claims nothing; its in-flight prompts finish, and it then shows as drained.

The watchdog (`check_stalls`, a step like the others): each in-flight prompt has a clock, reset by every event
about it, by its post, and when the prompt ahead of it on that server finishes (ComfyUI runs one at a time, so
waiting behind ours is not a stall). Past the workflow's stall limit (core.watchdog) the prompt is interrupted
and deleted from the server, and the task requeued with one attempt spent and the reason as its error.
The circuit breaker: every finished run is recorded per server; COMFYBATCH_QUARANTINE_AFTER failures in a row
(execution errors or stalls) quarantine the server for COMFYBATCH_QUARANTINE_SECONDS: it claims nothing, and
what it still holds goes back to the queue (no attempt spent) for the other servers. A task whose run fails
the same way (same error, or a stall) on two different servers is failed at once instead of bouncing around.

Retries by cause: server unreachable before the post -> back in the queue at once, no attempt spent;
server lost the prompt (restart, long outage) -> requeued, one attempt spent; HTTP 400 -> failed at once;
execution error or foreign interrupt -> requeued until `max_attempts`, then failed with ComfyUI's message.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from core import files, storage, uploads, watchdog, webhooks
from core.comfy import TERMINAL_EVENTS, ComfyClient, EventSocket, health, outcome, output_images
from core.comfy import started_at as history_start
from core.config import Settings
from core.errors import ComfyError, ExecutionFailed, Interrupted, PromptRejected, ServerUnavailable
from core.eventhub import EventHub
from core.models import TaskStatus
from core.store import IN_FLIGHT, SERVER_LEASE, Store

log = logging.getLogger(__name__)
LEASE = "scheduler"
PROGRESS_INTERVAL = 0.5  # a task's running/progress is written at most this often, and not before it ran this long
CANCEL_INTERVAL = 0.5  # seconds between a worker's reads of the cancels users asked for
DISPATCH_SLACK = 0.15  # seconds of our own delay the in-flight window covers besides the round trip
MAX_WINDOW = 16  # the most prompts the adaptive window queues on one server
COLLECT_THREADS = 256  # the collection pool's ceiling (its threads start on demand)
QUIET_RECONCILE = 3.0  # reconcile in-flight prompts after this long without any websocket message
RECOUNT_INTERVAL = 10.0  # seconds between checks that the database's in-flight tasks here are all tracked
DOWN_GRACE = 10.0  # after this long unreachable, a server's in-flight tasks go back to the queue
HEALTH_INTERVAL = 5.0  # seconds between health snapshots published for the pages
SUMMARY_INTERVAL = 60.0  # seconds between the log lines that count the tasks a scheduler finished
# /history can lag the terminal event by a moment: ask again after these pauses before leaving it to reconcile.
HISTORY_RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0)


class ComfyApi(Protocol):
    """The calls a worker makes to its server: `core.comfy.ComfyClient`, or an in-process stand-in in tests."""

    def submit(self, graph: dict[str, Any], prompt_id: str) -> dict[str, Any]: ...
    def history(self, prompt_id: str) -> dict[str, Any] | None: ...
    def queue(self) -> tuple[list[str], list[str]]: ...
    def delete_pending(self, prompt_ids: list[str]) -> None: ...
    def interrupt(self, prompt_id: str) -> None: ...
    def view(self, image: dict[str, Any]) -> bytes: ...
    def upload_image(self, data: bytes, filename: str) -> str: ...
    def system_stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class EventSource(Protocol):
    """Delivers a server's events to `on_event` while `run` blocks: `core.comfy.EventSocket` in production."""

    def run(self, stop: threading.Event) -> None: ...
    def close(self) -> None: ...


class ServerWorker:
    """Feeds one ComfyUI server. Two threads: the dispatch loop (the first posts, health, reconciles, cancels,
    progress writes, the watchdog, and the posts handed to it), and one that keeps the websocket connected (its
    frames are read by the scheduler's `EventHub`, one thread for all servers, which calls `on_event` and, from
    there, collects successes and posts the next prompts).

    `client`, `events` and `probe_health` replace the real ComfyUI edge (HTTP client, websocket, health
    probe); left out, they are built for `url` from the settings. `lease_owner`: claim only while that
    scheduler holds the server's lease (the Scheduler always passes it; a step test may leave it out)."""

    def __init__(self, scheduler: Scheduler, url: str, client_id: str, *, client: ComfyApi | None = None,
                 events: EventSource | None = None, probe_health: Callable[[], dict[str, Any]] | None = None,
                 lease_owner: str | None = None):
        self.scheduler = scheduler
        self.lease_owner = lease_owner
        self.settings = scheduler.settings
        self.store = scheduler.store
        self.url = url
        self.client_id = client_id
        timeout = self.settings.connect_timeout
        self.client: ComfyApi = (client if client is not None
                                 else ComfyClient(url, client_id, timeout, self.settings.read_timeout))
        self.socket: EventSource = (events if events is not None
                                    else EventSocket(url, client_id, self.on_event, self.on_connect, scheduler.hub,
                                                     timeout))
        # The health snapshot goes through this worker's client: its connections are kept alive.
        self.probe_health = probe_health if probe_health is not None else (lambda: health(self.client))
        self.stop_event = threading.Event()
        self.slot_free = threading.Condition()
        self.inflight: dict[str, int] = {}  # prompt_id -> task_id
        self.batch_of: dict[str, int] = {}  # prompt_id -> batch_id, of the prompts in flight
        self.outputs: dict[str, dict[str, Any]] = {}  # prompt_id -> outputs reported by `executed` events
        self.started: set[str] = set()  # prompts whose execution_start this connection saw (all events seen)
        self.collecting: set[str] = set()
        self.began: dict[str, tuple[float, float]] = {}  # prompt_id -> (wall, monotonic) time of execution_start
        self.progress: dict[str, tuple[int, int]] = {}  # prompt_id -> its latest (value, max)
        self.progress_written: dict[str, tuple[float, int]] = {}  # prompt_id -> (monotonic, percent) last written
        self.job_time: float | None = None  # moving averages for the in-flight window: a run on this server,
        self.rtt: float | None = None  # and a post to it
        self.reconciling: set[str] | None = None  # prompts dropped while reconcile() waits on the server
        self.posted_during: set[str] = set()  # prompts posted (from the event thread) while reconcile() ran
        self.handoff: collections.deque[dict[str, Any]] = collections.deque()  # claimed on the event thread, to post
        self.cancels_checked = float("-inf")
        self.runs_clear = False  # this server's failure count is known to be 0 (only this worker changes it)
        self.claimed = False  # the latest claim found a task
        self.recounted = time.monotonic()
        self.activity: dict[str, float] = {}  # prompt_id -> monotonic time of the latest sign of life (watchdog)
        self.limits: dict[str, tuple[float, watchdog.StallLimit]] = {}  # workflow -> (read at, stall limit)
        self.healthy = False
        self.down_since: float | None = None
        self.needs_reconcile = True
        self.last_message = time.monotonic()
        self.health_published = 0.0
        self.health_running = False
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for name, target in (("ws", lambda: self.socket.run(self.stop_event)), ("dispatch", self.run)):
            t = threading.Thread(target=target, name=f"comfybatch-{name}-{self.url}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self.begin_stop()
        self.join(timeout)

    def begin_stop(self) -> None:
        """Tell both threads to stop, without waiting (stopping many workers: signal all, then join all)."""
        self.stop_event.set()
        self.socket.close()
        with self.slot_free:
            self.slot_free.notify_all()

    def join(self, timeout: float = 5.0) -> None:
        for t in self.threads:
            t.join(timeout)
        while self.handoff:  # claimed on the event thread, never posted
            self._unclaim(self.handoff.popleft(), f"not posted to {self.url}: the scheduler stopped feeding it")
        self.client.close()

    # -- dispatch loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.loop_once()
            except Exception:  # never let the thread die: log and go on
                log.exception("server %s: dispatch loop error", self.url)
                self.stop_event.wait(1.0)

    def loop_once(self, now: float | None = None) -> None:
        """One unit of work: check health, reconcile if needed, handle cancels, submit at most one task.
        `now` (time.monotonic() by default) lets a test step the timers without sleeping."""
        now = time.monotonic() if now is None else now
        if now - self.health_published > HEALTH_INTERVAL and not self.health_running:
            # Off the dispatch path: a slow or remote server's probe never delays the next post.
            self.health_published, self.health_running = now, True
            self.scheduler.pool.submit(self._publish_health)
        if not self.healthy and not self._check_health():
            return
        if now - self.recounted >= RECOUNT_INTERVAL:
            # A safety net: a task the database has in flight here that this worker tracks neither in flight
            # nor in collection (say, taken over from another scheduler mid-post) gets a reconcile.
            self.recounted = now
            if self.store.in_flight_count(self.url) > len(self.inflight) + len(self.collecting):
                self.needs_reconcile = True
        if self.needs_reconcile or (self.inflight and now - self.last_message > QUIET_RECONCILE):
            self.needs_reconcile = False
            self.reconcile()
        if now - self.cancels_checked >= CANCEL_INTERVAL:
            self.cancels_checked = now
            self.handle_cancels(self.scheduler.cancel_requests(now).get(self.url, []))
        for prompt_id, task_id in list(self.inflight.items()):
            self._show_progress(prompt_id, task_id, now)
        self.check_stalls(now)
        if self.handoff:  # claimed on the event thread (and perhaps counted in flight already): posted first
            self.submit(self.handoff.popleft())
            return
        with self.slot_free:
            if len(self.inflight) >= self.window():
                self.slot_free.wait(0.5)
                return
        if self.submit_next_task() is None:
            self.stop_event.wait(0.2)

    def submit_next_task(self) -> dict[str, Any] | None:
        """Claim the best queued task for this server (its prompt_id stored before anything is posted) and
        post it. Returns the claimed task as it was claimed, or None when nothing is queued for this server."""
        task = self._claim()
        if task is not None:
            self.submit(task)
        return task

    def _claim(self) -> dict[str, Any] | None:
        # A draining or quarantined server gets nothing: the claim itself checks, in its transaction.
        task = self.store.claim_next_task(self.url, str(uuid.uuid4()), self.settings.policy,
                                          self.settings.affinity_patience if self.settings.affinity else 0,
                                          lease_owner=self.lease_owner, probe=not self.claimed)
        self.claimed = task is not None  # busy: the next claim goes straight to its transaction
        return task

    def _feed_on_hub(self) -> bool:
        """Right after a prompt finished here, on the event hub's thread: claim the next tasks and post them
        without waiting (`ComfyClient.begin_submit`: the hub reads the replies along with the websockets), so the
        dispatch thread is not woken for every job; it still claims whenever it finds the window short (at least
        every half second), which may now and then queue one prompt above the window. A task with input images
        to upload, or a post that cannot start so (no open kept-alive connection), is handed to the dispatch
        thread (`handoff`). False when this server is not fed here now (not on the hub's thread, a client
        without `begin_submit`, the server down or due a reconcile, a stop): the caller wakes the dispatch
        thread."""
        begin = getattr(self.client, "begin_submit", None)
        hub = self.scheduler.hub
        if (begin is None or not hub.on_thread() or not self.healthy or self.needs_reconcile
                or self.stop_event.is_set()):
            return False
        try:
            for _ in range(self.window() - len(self.inflight)):
                task = self._claim()
                if task is None:
                    break
                if task.get("inputs"):  # uploads first: they wait on the server
                    self._hand_off(task)
                    break
                graph = self._ready_to_post(task)
                if graph is None:
                    continue
                if not begin(graph, task["prompt_id"], hub, functools.partial(self._posted, task, time.monotonic())):
                    self._hand_off(task)
                    break
        except Exception:
            log.exception("server %s: feeding it from the event thread failed", self.url)
            self.needs_reconcile = True
            return False
        return True

    def _hand_off(self, task: dict[str, Any]) -> None:
        """A claimed task for the dispatch thread to post (woken at once)."""
        self.handoff.append(task)
        with self.slot_free:
            self.slot_free.notify_all()

    def window(self) -> int:
        """How many of our prompts to keep on this server: COMFYBATCH_IN_FLIGHT, or more when a round trip
        (plus our own delay) is long against a run, so the next prompt is always there when one finishes."""
        if self.job_time is None or self.rtt is None:
            return self.settings.in_flight
        need = 1 + math.ceil((self.rtt + DISPATCH_SLACK) / max(self.job_time, 0.01))
        return max(self.settings.in_flight, min(need, MAX_WINDOW))

    def _publish_health(self) -> None:
        """Write this server's health for the pages (they then need not probe it themselves). Runs in the pool."""
        try:
            self.store.set_server_health(self.url, self.probe_health())
        finally:
            self.health_running = False

    def _check_health(self) -> bool:
        try:
            self.client.system_stats()
        except ServerUnavailable as exc:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = now
                log.warning("server %s is unavailable: %s", self.url, exc)
            elif now - self.down_since > DOWN_GRACE:
                self._release_in_flight(f"server unreachable for more than {DOWN_GRACE:g} s")
            self.stop_event.wait(min(5.0, 0.5 + (now - self.down_since) / 4))
            return False
        if self.down_since is not None:
            log.info("server %s is back", self.url)
        self.healthy, self.down_since, self.needs_reconcile = True, None, True
        return True

    def _mark_down(self, exc: Exception) -> None:
        if self.healthy:
            log.warning("server %s went down: %s", self.url, exc)
        self.healthy = False
        if self.down_since is None:
            self.down_since = time.monotonic()

    def submit(self, task: dict[str, Any]) -> None:
        graph = self._ready_to_post(task)
        if graph is None:
            return
        posted = time.monotonic()
        try:
            self.client.submit(graph, task["prompt_id"])
        except (PromptRejected, ServerUnavailable) as exc:
            self._posted(task, posted, exc)
            return
        self._posted(task, posted, None)

    def _ready_to_post(self, task: dict[str, Any]) -> dict[str, Any] | None:
        """The graph to post for a claimed task (its input images uploaded first), the prompt marked in flight
        here; None when it is not to be posted (failed, or back in the queue)."""
        prompt_id = task["prompt_id"]
        try:
            graph = self._prepare_graph(task)
        except ServerUnavailable as exc:
            self._requeue_unsent(task, exc)
            return None
        except ComfyError as exc:
            self._finish(task, TaskStatus.FAILED, str(exc))
            return None
        if self.lease_owner is not None and time.time() - (task["submitted_at"] or 0) > self.settings.lease_seconds / 2:
            # This thread was held up between the claim and the post for half a lease: another scheduler may
            # have taken the server over and judged the prompt forgotten. Not posted; back in the queue.
            self._unclaim(task, f"not posted to {self.url}: held up for more than half the lease time after its claim")
            return None
        with self.slot_free:
            self.inflight[prompt_id] = task["id"]
            self.batch_of[prompt_id] = task["batch_id"]
            self.activity[prompt_id] = time.monotonic()
            if self.reconciling is not None:  # a reconcile under way keeps it (its snapshot may predate it)
                self.posted_during.add(prompt_id)
        return graph

    def _unclaim(self, task: dict[str, Any], reason: str) -> None:
        """A claimed task that was never posted goes back to the queue, its attempt not spent."""
        log.warning("task %s: %s", task["id"], reason)
        self.store.transition(task["id"], TaskStatus.QUEUED, IN_FLIGHT, detail=reason, run=task["prompt_id"],
                              attempts=max(task["attempts"] - 1, 0), error=task.get("error"))

    def _posted(self, task: dict[str, Any], posted: float, reply: dict[str, Any] | ComfyError | None) -> None:
        """What follows a post (`posted`: when it was sent): its round trip, or its failure (`reply` an error)."""
        prompt_id = task["prompt_id"]
        error = reply if isinstance(reply, ComfyError) else None
        if error is None:
            self.rtt = _average(self.rtt, time.monotonic() - posted)
            log.debug("task %s submitted to %s as %s (attempt %s)", task["id"], self.url, prompt_id, task["attempts"])
        elif isinstance(error, PromptRejected):
            self._drop(prompt_id)
            log.info("task %s rejected by %s: %s", task["id"], self.url, error)
            self._finish(task, TaskStatus.FAILED, str(error))
        else:
            self._drop(prompt_id)
            # The post may have reached the server (read timeout): reconcile decides once it answers.
            self._mark_down(error)
            self.needs_reconcile = True
            if not (isinstance(error, ServerUnavailable) and error.maybe_delivered):
                self._requeue_unsent(task, error)

    def _prepare_graph(self, task: dict[str, Any]) -> dict[str, Any]:
        """Upload the task's input images to this server (once per identical file) and point LoadImage at
        the names ComfyUI gave them; store the graph exactly as it will be submitted."""
        inputs = task.get("inputs") or {}
        graph: dict[str, Any] = task["graph"]
        if not inputs:
            return graph
        for target, spec in inputs.items():
            node_id, input_name = target.rsplit(".", 1)
            name = self.store.get_upload(self.url, spec["sha256"])
            if name is None:
                data = Path(spec["path"]).read_bytes()
                name = self.client.upload_image(data, spec["name"])
                self.store.put_upload(self.url, spec["sha256"], name)
            graph[node_id]["inputs"][input_name] = name
        self.store.set_graph(task["id"], graph)
        return graph

    def _requeue_unsent(self, task: dict[str, Any], exc: Exception) -> None:
        """The prompt never reached ComfyUI: back in the queue for any server, attempt not spent."""
        self._mark_down(exc)
        self.store.transition(task["id"], TaskStatus.QUEUED, IN_FLIGHT, detail=str(exc)[:500],
                              run=task["prompt_id"], attempts=max(task["attempts"] - 1, 0), error=str(exc))

    def _drop(self, prompt_id: str, wake: bool = True) -> None:
        """Forget a prompt that is no longer in flight here (`wake`: tell the dispatch thread a slot is free)."""
        with self.slot_free:
            if self.activity.pop(prompt_id, None) is not None:
                now = time.monotonic()  # the next prompt only starts now: its wait so far was no stall
                self.activity.update({p: max(t, now) for p, t in self.activity.items()})
            self.inflight.pop(prompt_id, None)
            self.batch_of.pop(prompt_id, None)
            self.progress_written.pop(prompt_id, None)
            self.progress.pop(prompt_id, None)
            self.began.pop(prompt_id, None)
            self.outputs.pop(prompt_id, None)
            self.started.discard(prompt_id)
            if self.reconciling is not None:
                self.reconciling.add(prompt_id)
            if wake:
                self.slot_free.notify_all()

    # -- events -----------------------------------------------------------------------------------
    def on_connect(self) -> None:
        """The websocket (re)connected: events may have been missed, so reconcile."""
        self.last_message = time.monotonic()
        self.started.clear()
        self.needs_reconcile = True

    def on_event(self, kind: str, data: dict[str, Any], now: float | None = None) -> None:
        """Handle one websocket message of this server (`now`: time.monotonic() by default)."""
        now = time.monotonic() if now is None else now
        self.last_message = now
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            return
        task_id = self.inflight.get(prompt_id)
        if task_id is None:
            return
        self.activity[prompt_id] = now
        if kind == "execution_start":
            # Written with its first progress, or by its completion if it finishes first (_show_progress).
            self.started.add(prompt_id)
            self.began[prompt_id] = (time.time(), now)
        elif kind == "progress":
            # Written by the dispatch loop (`_show_progress`): this runs on the event hub's thread, which reads
            # every server's websocket and never waits on the database.
            self.progress[prompt_id] = (int(data.get("value", 0)), int(data.get("max", 0)))
        elif kind == "executed" and isinstance(data.get("output"), dict):
            self.outputs.setdefault(prompt_id, {})[str(data.get("node"))] = data["output"]
        elif kind in TERMINAL_EVENTS or (kind == "executing" and data.get("node") is None):
            # The events already tell the outcome (and the outputs): no /history round trip on the hot path.
            result: Any = None
            if kind == "execution_success" and prompt_id in self.started:
                result = self.outputs.get(prompt_id, {})  # else some `executed` events may be missing: /history
            elif kind == "execution_error":
                result = ExecutionFailed(data, self.url)
            elif kind == "execution_interrupted":
                result = Interrupted(f"the prompt was interrupted on {self.url} at node {data.get('node_id')} "
                                     f"({data.get('node_type')})", self.url)
            began = self.began.get(prompt_id)
            if began is not None:
                self.job_time = _average(self.job_time, now - began[1])
            written = prompt_id in self.progress_written
            steps = self.progress.get(prompt_id, (None, None))[1]  # a run too short for a progress write: its steps
            batch_id = self.batch_of.get(prompt_id)
            self._drop(prompt_id, wake=False)
            self.collect(prompt_id, task_id, result, None if began is None or written else began[0], steps, batch_id)
            if not self._feed_on_hub():
                with self.slot_free:
                    self.slot_free.notify_all()

    def _show_progress(self, prompt_id: str, task_id: int, now: float) -> None:
        """Write what a page shows of a running prompt when it changed: `running` (with its start time and
        first progress, one transaction) once it has run PROGRESS_INTERVAL, then its progress when the whole
        percent changed, at most every PROGRESS_INTERVAL. A shorter run is recorded by its completion alone."""
        began = self.began.get(prompt_id)
        value, maximum = self.progress.get(prompt_id, (None, None))
        if began is None and value is None:
            return  # not started yet (or its start was missed and no progress came yet)
        if began is not None and now - began[1] < PROGRESS_INTERVAL:
            return
        percent = 100 * value // maximum if value is not None and maximum else -1
        last = self.progress_written.get(prompt_id)
        if last is not None and (percent == last[1] or now - last[0] < PROGRESS_INTERVAL):
            return
        self.progress_written[prompt_id] = (now, percent)
        self.store.record_running(task_id, began[0] if began else time.time(), value, maximum)

    # -- collection -------------------------------------------------------------------------------
    def collect(self, prompt_id: str, task_id: int, result: dict[str, Any] | ComfyError | None = None,
                started_at: float | None = None, steps: int | None = None, batch_id: int | None = None) -> None:
        """Finish a prompt: `result` is the outputs or the error its events reported, or None to read the outcome
        from /history (after a gap, or for prompts of a previous process). `started_at`: its execution start,
        when its `running` was not written yet; `steps`: the sampler steps its progress events counted (a
        finished task shows steps/steps however short its run). A success told by the events, on the event hub's
        thread, is collected there (`_collect_on_hub`, with its task's `batch_id`); the rest in the pool."""
        with self.slot_free:
            if prompt_id in self.collecting:
                return
            self.collecting.add(prompt_id)
        if (batch_id is not None and isinstance(result, dict)
                and self._collect_on_hub(prompt_id, task_id, batch_id, result, started_at, steps)):
            return
        self._collect_in_pool(prompt_id, task_id, result, started_at, steps)

    def _collect_on_hub(self, prompt_id: str, task_id: int, batch_id: int, outputs: dict[str, Any],
                        started_at: float | None, steps: int | None) -> bool:
        """Collect a success without a thread waiting on it: each image is downloaded as its bytes arrive
        (`ComfyClient.begin_view`: the event hub reads the reply along with the websockets), then its
        files are written and the task completed (`Saver`: on the hub's thread while writing a file is cheap,
        else on the saver's). Why: handing every finished prompt to a pool thread, which then waited on the
        download, the interpreter lock and the write lock, cost about half a millisecond of CPU per job in
        thread switches alone (64 x 0.2 s, bench/fleet.py). False when it cannot start so (not on the hub's
        thread, a client without `begin_view`, no open kept-alive connection): the caller hands it to the pool. A
        download that fails midway hands it to the pool too, which starts it over."""
        hub = self.scheduler.hub
        begin = getattr(self.client, "begin_view", None)
        if begin is None or not hub.on_thread():
            return False
        images = output_images(outputs)
        downloaded: list[bytes] = []

        def next_image() -> bool:
            if len(downloaded) < len(images):
                return bool(begin(images[len(downloaded)][2], hub, arrived))
            self.scheduler.saver.put(Saving(self, prompt_id, task_id, batch_id, outputs, images, downloaded,
                                            started_at, steps), inline=True)
            return True

        def arrived(data: bytes | ComfyError) -> None:
            going = False
            if not isinstance(data, ComfyError):
                downloaded.append(data)
                try:
                    going = next_image()
                except Exception:
                    log.exception("task %s: collecting %s failed; trying again", task_id, prompt_id)
            if not going:  # the pool starts the collection over (and marks the server down if it is)
                self._collect_in_pool(prompt_id, task_id, outputs, started_at, steps)

        return next_image()

    def _collect_in_pool(self, prompt_id: str, task_id: int, result: dict[str, Any] | ComfyError | None,
                         started_at: float | None, steps: int | None) -> None:
        try:
            self.scheduler.pool.submit(self._collect, prompt_id, task_id, result, started_at, steps)
        except RuntimeError:  # the pool has shut down (a stop): the next reconcile collects it
            with self.slot_free:
                self.collecting.discard(prompt_id)
            self.needs_reconcile = True

    def _collect(self, prompt_id: str, task_id: int, result: dict[str, Any] | ComfyError | None,
                 started_at: float | None = None, steps: int | None = None) -> None:
        try:
            task = self.store.task_head(task_id)
            if task is None or task["status"] not in IN_FLIGHT or task["prompt_id"] != prompt_id:
                return
            if result is None:
                entry = self._await_history(prompt_id)
                if entry is None:
                    # Not finished after all, lost, or we are stopping: reconcile (ours or the next process's)
                    # decides.
                    self.needs_reconcile = True
                    return
                if started_at is None:  # collected after a gap: its start from the server's record
                    started_at = history_start(entry)
                try:
                    result = outcome(entry, self.url)
                except (ExecutionFailed, Interrupted) as exc:
                    result = exc
            if isinstance(result, ComfyError):
                if started_at is not None:  # a failed run keeps its `running` event (rare: a write of its own)
                    self.store.record_running(task_id, started_at)
                self._failed_run(task, result)  # it reads the whole task afresh
                return
            self._save_outputs(task, result, started_at, steps)
        except ServerUnavailable as exc:
            self._mark_down(exc)
            self.needs_reconcile = True
        except Exception:
            log.exception("task %s: collecting %s failed", task_id, prompt_id)
            self.needs_reconcile = True
        finally:
            with self.slot_free:
                self.collecting.discard(prompt_id)

    def _await_history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's /history entry, asked again after short pauses; None if it does not show up. The
        pauses wait on the scheduler's stop event, so a stop cuts them short instead of holding up shutdown."""
        entry = self.client.history(prompt_id)
        for delay in HISTORY_RETRY_DELAYS:
            if entry is not None or self.scheduler.stop_event.wait(delay):
                break
            entry = self.client.history(prompt_id)
        return entry

    def _save_outputs(self, task: dict[str, Any], outputs: dict[str, Any], started_at: float | None = None,
                      steps: int | None = None) -> None:
        folder = files.batch_dir(self.settings.output_dir, task["batch_id"])
        records = []
        for node_id, idx, img in output_images(outputs):
            path = folder / files.image_name(task["id"], node_id, idx, img.get("filename", ""))
            if path.is_file() and self.store.image_exists(task["id"], node_id, idx):  # stat first: no query
                continue
            records.append(self._save_image(folder, task["id"], task["batch_id"], node_id, idx, img,
                                            self.client.view(img)))
        self._succeeded(task["id"], task["prompt_id"], records, started_at, steps)

    def _save_image(self, folder: Path, task_id: int, batch_id: int, node_id: str, idx: int, img: dict[str, Any],
                    data: bytes) -> dict[str, Any]:
        """Write one downloaded image (bytes unchanged) and return its record for `complete_task`."""
        name = files.image_name(task_id, node_id, idx, img.get("filename", ""))
        files.write_atomic(folder / name, data, sole_writer=True)
        return {"batch_id": batch_id, "node_id": node_id, "idx": idx, "path": f"{folder.name}/{name}",
                "filename": img.get("filename"), "subfolder": img.get("subfolder", ""),
                "type": img.get("type", "output"), "size_bytes": len(data), **files.describe_image(data),
                "remote_state": "pending" if self.settings.storage_enabled else None}

    def _succeeded(self, task_id: int, prompt_id: str, records: list[dict[str, Any]], started_at: float | None,
                   steps: int | None) -> None:
        """Record a successful run (if its task is still in flight as that prompt) and what follows from it."""
        self._after_success(self.store.complete_task(task_id, records, started_at, steps, prompt_id=prompt_id),
                            task_id, len(records))

    def _after_success(self, completed: bool, task_id: int, images: int) -> None:
        """What follows a successful run's completion (`completed`: it was recorded)."""
        if completed:
            if not self.runs_clear:  # the circuit breaker's count goes back to 0 (known 0 after that, in memory)
                self.store.record_server_run(self.url, None, self.settings.quarantine_after,
                                             self.settings.quarantine_seconds)
                self.runs_clear = True
            log.debug("task %s succeeded on %s: %d image(s)", task_id, self.url, images)
            self.scheduler.count_success()
            if images and self.settings.storage_enabled:
                self.scheduler.upload_wake.set()

    def _failed_run(self, task: dict[str, Any], exc: ComfyError) -> None:
        current = self.store.get_task(task["id"])
        if current["cancel_requested"]:
            self._finish(current, TaskStatus.CANCELLED, "cancelled by user")
            return
        signature = str(exc) if isinstance(exc, ExecutionFailed) else None
        self._retry_or_fail(current, str(exc), signature)
        if signature is not None:
            self._count_failure(str(exc))

    def _retry_or_fail(self, task: dict[str, Any], error: str, signature: str | None) -> None:
        """Requeue a task whose run failed here (an attempt spent), or fail it: out of attempts, or the same
        failure (`signature`) already happened on another server."""
        previous = task.get("failed_on")
        if signature is not None and task.get("failure_sig") == signature and previous and previous != self.url:
            log.warning("task %s failed the same way on %s and %s: %s", task["id"], previous, self.url, error)
            self._finish(task, TaskStatus.FAILED, f"{error} (the same failure on {previous} and {self.url}: not "
                                                  "retried on other servers)")
        elif task["attempts"] < self.settings.max_attempts:
            log.info("task %s: attempt %s failed on %s, retrying: %s", task["id"], task["attempts"], self.url, error)
            self.store.transition(task["id"], TaskStatus.QUEUED, IN_FLIGHT, detail=error[:500], error=error,
                                  run=task["prompt_id"], failed_on=self.url, failure_sig=signature)
        else:
            log.warning("task %s failed after %s attempts: %s", task["id"], task["attempts"], error)
            self._finish(task, TaskStatus.FAILED, error)

    def _count_failure(self, reason: str) -> None:
        """The circuit breaker: a failed run here; the Nth in a row quarantines the server."""
        self.runs_clear = False  # before the write: a success collected meanwhile then resets the count
        until = self.store.record_server_run(self.url, reason, self.settings.quarantine_after,
                                             self.settings.quarantine_seconds)
        if until is None:
            return
        log.warning("server %s quarantined for %g s: %s", self.url, self.settings.quarantine_seconds, reason)
        for task in self.store.in_flight_tasks(self.url):
            pid = task["prompt_id"]
            if pid in self.collecting:
                continue
            try:
                self.client.delete_pending([pid])
                self.client.interrupt(pid)
            except ComfyError:
                pass
            self._drop(pid)
            self.store.transition(task["id"], TaskStatus.QUEUED, IN_FLIGHT, attempts=max(task["attempts"] - 1, 0),
                                  detail=f"{self.url} was quarantined", error=task["error"], run=pid)

    # -- the watchdog ------------------------------------------------------------------------------
    def stall_limit(self, workflow: str) -> watchdog.StallLimit:
        """The workflow's stall limit from its measured run times, read at most every 30 s."""
        now = time.monotonic()
        cached = self.limits.get(workflow)
        if cached is None or now - cached[0] > 30.0:
            cached = (now, watchdog.stall_limit(self.store.run_durations(workflow), self.settings))
            self.limits[workflow] = cached
        return cached[1]

    def check_stalls(self, now: float | None = None) -> None:
        """Interrupt and requeue the prompt here with no sign of life for longer than its stall limit, if any."""
        now = time.monotonic() if now is None else now
        with self.slot_free:
            quiet = [(p, self.inflight[p], now - t) for p, t in self.activity.items()
                     if p in self.inflight and p not in self.collecting]
        # ComfyUI runs one prompt at a time: only the longest-silent of ours can be stalled; the others' clocks
        # start again when it is dropped. No limit is below the floor or the ceiling: no read before that.
        lowest = min(self.settings.stall_floor, self.settings.stall_ceiling)
        for prompt_id, task_id, silent in sorted(quiet, key=lambda q: -q[2])[:1]:
            if silent <= lowest:
                continue
            task = self.store.get_task(task_id)
            limit = self.stall_limit(task["workflow"])
            if silent <= limit.seconds or task["prompt_id"] != prompt_id:
                continue
            reason = (f"no word from ComfyUI at {self.url} about this task for {silent:.0f} s, past the stall limit "
                      f"of {limit.seconds:.0f} s ({limit.reason}); interrupted and requeued")
            log.warning("task %s: %s", task_id, reason)
            try:
                self.client.interrupt(prompt_id)
                self.client.delete_pending([prompt_id])
            except ComfyError:
                pass
            self._drop(prompt_id)
            self._retry_or_fail(task, reason, "stalled")
            self._count_failure(reason)

    def _finish(self, task: dict[str, Any], status: TaskStatus, error: str) -> None:
        self.store.transition(task["id"], status, IN_FLIGHT, detail=error[:500], error=error, run=task["prompt_id"])

    # -- reconciliation ---------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Match every task the database believes is on this server with what the server knows.

        A prompt that finishes (its terminal event is handled) while this waits on the server is never put
        back in the in-flight map from the snapshot taken before: `_drop` notes it in `reconciling`."""
        with self.slot_free:
            self.reconciling, self.posted_during = set(), set()
        try:
            running, pending = self.client.queue()
            known = set(running) | set(pending)
            tasks = self.store.in_flight_tasks(self.url)
            attached: dict[str, int] = {}
            for task in tasks:
                pid = task["prompt_id"]
                if pid in self.collecting:
                    continue
                if self.client.history(pid) is not None:
                    self.collect(pid, task["id"])
                elif pid in known:
                    attached[pid] = task["id"]
                elif time.time() - (task["submitted_at"] or 0) < max(1.0, self.settings.lease_seconds):
                    # Claimed a moment ago, here or by a scheduler that fed this server until its lease ran out
                    # (its post may still be on the way): the queue read may predate it. Watched; decided later.
                    attached[pid] = task["id"]
                elif self.client.history(pid) is not None:
                    self.collect(pid, task["id"])
                elif task["cancel_requested"]:
                    self._finish(task, TaskStatus.CANCELLED, "cancelled by user")
                else:
                    self._lost(task, f"ComfyUI at {self.url} no longer knows prompt {pid} (server restarted?)")
            with self.slot_free:
                gone = self.reconciling or set()
                batches = {**{t["prompt_id"]: t["batch_id"] for t in tasks}, **self.batch_of}
                fresh = {p: self.inflight[p] for p in self.posted_during if p in self.inflight}  # posted meanwhile
                attached = {p: t for p, t in attached.items() if p not in gone and p not in self.collecting}
                self.inflight = {**attached, **fresh}
                self.batch_of = {p: batches[p] for p in self.inflight if p in batches}
                now = time.monotonic()
                self.activity = {p: self.activity.get(p, now) for p in self.inflight}
                self.slot_free.notify_all()
            self.last_message = time.monotonic()
        except ServerUnavailable as exc:
            self._mark_down(exc)
            self.needs_reconcile = True
        finally:
            with self.slot_free:
                self.reconciling = None

    def _lost(self, task: dict[str, Any], reason: str) -> None:
        if self.store.requeue_lost(task, reason, self.settings.max_attempts) == TaskStatus.QUEUED:
            log.warning("task %s: %s; requeued", task["id"], reason)

    def _release_in_flight(self, reason: str) -> None:
        self.store.release_in_flight(self.url, reason, self.settings.max_attempts, keep=self.collecting)
        with self.slot_free:
            self.inflight.clear()

    def handle_cancels(self, ids: list[int] | None = None) -> None:
        """Act on the cancels users asked for (`ids`: the tasks here they asked to cancel, read afresh when left
        out): delete a pending prompt, interrupt a running one."""
        ids = self.store.cancel_requested_ids(self.url) if ids is None else ids
        if not ids:
            return
        running, pending = self.client.queue()
        for task_id in ids:
            task = self.store.get_task(task_id)
            if task["status"] not in IN_FLIGHT or task["server"] != self.url:
                continue  # handled since the read
            pid = task["prompt_id"]
            if pid in pending:
                self.client.delete_pending([pid])
                self._drop(pid)
                self._finish(task, TaskStatus.CANCELLED, "cancelled by user")
            elif pid in running:
                self.client.interrupt(pid)  # the terminal event then marks it cancelled
            elif pid not in self.collecting:
                self.needs_reconcile = True


class Saving:
    """A success whose images were downloaded on the event thread, for the saver to write and record."""

    __slots__ = ("worker", "prompt_id", "task_id", "batch_id", "outputs", "images", "data", "started_at", "steps")

    def __init__(self, worker: ServerWorker, prompt_id: str, task_id: int, batch_id: int, outputs: dict[str, Any],
                 images: list[tuple[str, int, dict[str, Any]]], data: list[bytes], started_at: float | None,
                 steps: int | None):
        self.worker, self.prompt_id, self.task_id, self.batch_id = worker, prompt_id, task_id, batch_id
        self.outputs, self.images, self.data, self.started_at, self.steps = outputs, images, data, started_at, steps


class Saver:
    """Writes the images the event thread downloaded and completes their tasks. While writing a file costs
    little here (a moving average of the CPU it took, under INLINE_FILE_MS), on the caller's thread, the event
    hub's: no thread woken per job. Else on a thread of its own, which takes whatever has queued up since it last
    woke, the files first, then every completion in one transaction (under load it wakes once for many tasks,
    and they share a commit): creating a file costs up to 1.5 ms of CPU on some disks (this VM's ext4, by
    folder), and that on the hub's thread would hold up every server's events (64 x 0.2 s jobs: 0.69 of ideal,
    results 1.9 s late). A file that cannot be written sends its task to the collection pool, which starts it
    over. The thread starts on the first task it gets; `stop()` saves what is queued first."""

    INLINE_FILE_MS = 0.25

    def __init__(self, store: Store):
        self.store = store
        self._queue: collections.deque[Saving] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.file_ms: float | None = None  # moving average of the CPU one image's file took

    def put(self, item: Saving, inline: bool = False) -> None:
        """Save it now on this thread (`inline`, while files are cheap), or queue it for the saver's."""
        if inline and self.file_ms is not None and self.file_ms < self.INLINE_FILE_MS:
            self.save([item])
            return
        with self._wake:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="comfybatch-saver", daemon=True)
                self._thread.start()
            self._queue.append(item)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            thread, self._stopping = self._thread, True
            self._wake.notify()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue:
                    self._thread = None
                    return
                items = list(self._queue)
                self._queue.clear()
            try:
                self.save(items)
            except Exception:
                log.exception("saving collected images failed")

    def save(self, items: list[Saving]) -> None:
        written: list[tuple[Saving, list[dict[str, Any]]]] = []
        for item in items:
            worker = item.worker
            folder = files.batch_dir(worker.settings.output_dir, item.batch_id)
            try:
                started = time.thread_time()
                written.append((item, [worker._save_image(folder, item.task_id, item.batch_id, node_id, idx, img, data)
                                       for (node_id, idx, img), data in zip(item.images, item.data, strict=True)]))
                if item.images:
                    spent = 1000 * (time.thread_time() - started) / len(item.images)
                    self.file_ms = _average(self.file_ms, spent, 0.05)
            except Exception:
                log.exception("task %s: saving an image of %s failed; trying again", item.task_id, item.prompt_id)
                worker._collect_in_pool(item.prompt_id, item.task_id, item.outputs, item.started_at, item.steps)
        if not written:
            return
        try:
            with self.store.write():  # one commit for them all (each joins this transaction)
                done = [self._complete(item, records) for item, records in written]
        except Exception:
            log.exception("recording %d collected task(s) together failed; one by one", len(written))
            done = []
            for item, records in written:
                try:
                    done.append(self._complete(item, records))
                except Exception:
                    log.exception("task %s: recording %s failed", item.task_id, item.prompt_id)
                    item.worker.needs_reconcile = True
                    done.append(False)
        for (item, records), completed in zip(written, done, strict=True):
            worker = item.worker
            try:
                worker._after_success(completed, item.task_id, len(records))
            finally:
                with worker.slot_free:
                    worker.collecting.discard(item.prompt_id)

    def _complete(self, item: Saving, records: list[dict[str, Any]]) -> bool:
        return self.store.complete_task(item.task_id, records, item.started_at, item.steps, prompt_id=item.prompt_id)


class Scheduler:
    """Runs one ServerWorker per server whose lease it holds, and, while it holds the database-wide lease,
    the singleton jobs. `start()` returns at once.

    Several schedulers (the app, any number of `python -m core worker`) share a database: each server is
    leased to one of them at a time (`server:<url>` in the leases table, renewed every tick), and every live
    scheduler (a `member:<owner>` row) takes at most its share, ceil(servers / schedulers); one above its
    share (another scheduler started) stops its extra workers and releases their leases, which the newcomer
    then takes. A scheduler that dies stops renewing: its servers are taken over once their leases run out
    (COMFYBATCH_LEASE_SECONDS), and the new owner's worker reconciles their in-flight prompts from the
    database and the server (nothing lost, nothing posted twice). The claim itself checks the lease, in its
    transaction, so a scheduler whose lease ran out (a long pause) cannot post to a server another one feeds.
    The database-wide lease (`LEASE`) guards what must run once per database: the object-storage uploader
    and the requeue of tasks left on disabled or removed servers (`is_leader`)."""

    def __init__(self, settings: Settings, store: Store | None = None, owner: str | None = None,
                 pool: Executor | None = None):
        self.settings = settings
        self.store = store or Store(settings.db_path)
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.workers: dict[str, ServerWorker] = {}
        # Collection (and each worker's health snapshot) runs here; a test may pass an executor that runs it
        # inline, on the caller's thread. Threads are started on demand, so the pool grows with the work in
        # hand (about one thread per server finishing at the same moment), up to COLLECT_THREADS.
        self.pool: Executor = (pool if pool is not None else ThreadPoolExecutor(
            max_workers=COLLECT_THREADS, thread_name_prefix="comfybatch-collect"))
        self.stop_event = threading.Event()
        self.is_leader = False
        self.ticked = threading.Event()  # set after the first lease round: `busy()` is meaningful from then
        self._thread: threading.Thread | None = None
        # Object storage: one uploader thread while this scheduler leads (see core.uploads).
        self.upload_wake = threading.Event()
        self.uploader: uploads.Uploader | None = None
        self._upload_stop = threading.Event()
        self._upload_thread: threading.Thread | None = None
        self.webhooks = webhooks.WebhookThread(settings, self.store)  # calls finished batches' webhooks while leading
        self.hub = EventHub()  # reads every worker's websocket on one thread (started by the first worker)
        self.saver = Saver(self.store)  # writes and records what the hub's thread downloaded
        # Tasks finished here since the last summary line (the per-task lines are DEBUG: two per task would roll a
        # capped log over in minutes at fleet rates, taking the problems with them).
        self._succeeded = 0
        self._succeeded_lock = threading.Lock()
        self._summarised = time.monotonic()
        self._cancels: dict[str, list[int]] = {}
        self._cancels_read = float("-inf")
        self._cancels_lock = threading.Lock()

    def start(self) -> None:
        self.store.sync_servers(self.settings.comfyui_urls, lambda: uuid.uuid4().hex)
        self._thread = threading.Thread(target=self.run, name="comfybatch-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread:
            self._thread.join(timeout)
        feeding = len(self.workers)
        self._stop_workers()
        self.hub.stop()
        self.saver.stop()
        self._stop_uploader()
        self.webhooks.stop()
        self.pool.shutdown(wait=True)
        self.summarise(final=True, servers=feeding)  # after the pool: a collection may finish during the stop
        # Given back at once, so another scheduler takes the servers over now, not when the leases run out.
        self.store.release_leases(self.owner)
        self.is_leader = False

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            self.stop_event.wait(min(1.0, self.settings.lease_seconds / 3))

    def cancel_requests(self, now: float) -> dict[str, list[int]]:
        """server -> the in-flight tasks there whose cancel users asked for: one read for all the servers, at most
        every CANCEL_INTERVAL (`now`: time.monotonic()), instead of one per server (128 reads a second at 64)."""
        with self._cancels_lock:
            if now - self._cancels_read >= CANCEL_INTERVAL:
                self._cancels, self._cancels_read = self.store.cancel_requests(), now
            return self._cancels

    def count_success(self) -> None:
        with self._succeeded_lock:
            self._succeeded += 1

    def summarise(self, now: float | None = None, final: bool = False, servers: int | None = None) -> None:
        """Log how many tasks this scheduler finished since the last summary, once a SUMMARY_INTERVAL (and what is
        left to tell when it stops: `final`, with the number of `servers` it fed until then)."""
        now = time.monotonic() if now is None else now
        if now - self._summarised < SUMMARY_INTERVAL and not final:
            return
        with self._succeeded_lock:
            done, self._succeeded = self._succeeded, 0
        if done:
            log.info("%d task(s) succeeded in the last %.0f s on %d server(s)", done, now - self._summarised,
                     len(self.workers) if servers is None else servers)
        self._summarised = now

    def tick(self) -> None:
        """Renew (or try to take) the leases, then start/stop workers to match the servers leased to us."""
        self.summarise()
        leader = self.store.acquire_lease(LEASE, self.owner, self.settings.lease_seconds)
        if leader != self.is_leader:
            log.info("scheduler %s %s the lease", self.owner, "took" if leader else "lost")
            self.is_leader = leader
        if leader and self.settings.storage_enabled:
            self._start_uploader()
        elif not leader:
            self._stop_uploader()
        if leader:
            self.webhooks.start()
        else:
            self.webhooks.stop()
        wanted = {s["url"]: s["client_id"] for s in self.store.servers(enabled_only=True)}
        held, share = self.store.hold_server_leases(self.owner, self.settings.lease_seconds, list(wanted))
        mine = [url for url in held if url in wanted]
        # Above our share (another scheduler joined): give back the servers with the least in flight.
        extra = sorted(mine, key=lambda u: len(self.workers[u].inflight) if u in self.workers else -1)
        extra = extra[:max(len(mine) - share, 0)]
        gone = [url for url in self.workers if url not in mine or url in extra]
        self._stop_workers(gone)
        for url in [*extra, *(u for u in held if u not in wanted)]:
            self.store.release_lease(SERVER_LEASE + url, self.owner)
        if leader:
            self._requeue_orphans()
        for url in mine:
            if url not in self.workers and url not in extra:
                worker = ServerWorker(self, url, wanted[url], lease_owner=self.owner)
                self.workers[url] = worker
                worker.start()
        self.ticked.set()

    def _requeue_orphans(self) -> None:
        """Tasks left in flight on a server that was disabled or removed go back to the queue (no attempt
        spent): nothing watches that server any more. A pending prompt there is deleted if it still answers."""
        for task in self.store.orphaned_tasks():
            reason = f"server {task['server']} was disabled or removed"
            if self.store.transition(task["id"], TaskStatus.QUEUED, IN_FLIGHT, detail=reason, run=task["prompt_id"],
                                     attempts=max(task["attempts"] - 1, 0), error=reason):
                log.info("task %s requeued: %s", task["id"], reason)
                client = ComfyClient(task["server"], "comfybatch-cleanup", 2.0, 5.0)
                try:
                    client.delete_pending([task["prompt_id"]])
                except ComfyError:
                    pass
                finally:
                    client.close()

    def _stop_workers(self, urls: list[str] | None = None) -> None:
        """Stop the given workers (all by default): every one told first, then each joined."""
        stopping = [self.workers.pop(url) for url in (list(self.workers) if urls is None else urls)]
        for worker in stopping:
            worker.begin_stop()
        for worker in stopping:
            worker.join()

    def _start_uploader(self) -> None:
        if self._upload_thread is not None and self._upload_thread.is_alive():
            return
        self._upload_stop = threading.Event()
        self.uploader = uploads.Uploader(self.settings, self.store, wake=self.upload_wake)
        self._upload_thread = threading.Thread(target=self.uploader.run, args=(self._upload_stop,),
                                               name="comfybatch-upload", daemon=True)
        self._upload_thread.start()
        log.info("uploading results to %s", storage.where(self.settings))

    def _stop_uploader(self, timeout: float = 10.0) -> None:
        self._upload_stop.set()
        self.upload_wake.set()
        if self._upload_thread is not None:
            self._upload_thread.join(timeout)
            self._upload_thread = None

    def busy(self) -> bool:
        """Anything still to do: queued or in-flight tasks, results being collected, or uploads the object
        store accepts now (pending uploads wait for the next start while it is unreachable)."""
        if self.store.has_pending_work() or any(w.collecting for w in self.workers.values()):
            return True
        if webhooks.first_calls_due(self.store):  # a finished batch's webhook gets its first call before exit
            return True
        # Uploads count until the uploader finds the store unreachable (or before it has started at all).
        return (self.settings.storage_enabled and self.store.has_upload_queue()
                and (self.uploader is None or self.uploader.failures == 0))


def _average(previous: float | None, sample: float, weight: float = 0.2) -> float:
    """An exponential moving average (the first sample alone to begin with)."""
    return sample if previous is None else previous + weight * (sample - previous)
