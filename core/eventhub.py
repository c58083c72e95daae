"""One thread that reads the websockets of every server a scheduler feeds, as they become readable (epoll
through `selectors`), instead of a thread blocked in recv per websocket.

Why: a fleet of 64 servers running 0.2 s jobs sends about 3,000 frames a second. With a reader thread per
socket, each frame woke its own thread, which then queued for the interpreter lock behind the others (about
110 voluntary context switches per job in `bench/fleet.py --thread-cpu`). One thread reading whatever is ready
handles several sockets' frames per wake-up and never competes with other readers.

A member (`core.comfy.EventSocket`) is attached once its websocket is open and detached before it is closed; the
hub calls `member.readable()` when its socket has data (it returns False once the connection is finished: the
hub then unregisters it and calls `member.lost()`). Handlers run on the hub's thread, so they must not wait on a
server: the scheduler's `on_event` starts its requests (a post, an image download: `core.wire.PendingReply`)
without waiting and attaches them with a deadline; the hub sends what did not fit at once, reads their replies as
they arrive, and gives up on one whose deadline passed. Attached from a handler, a member is watched at once.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)
THREAD_NAME = "comfybatch-events"
DEADLINE_CHECK = 0.25  # seconds between the hub's checks of its members' deadlines
STOP_DRAIN = 2.0  # seconds stop() lets the requests under way finish
DETACH_WAIT = 5.0  # seconds detach() waits for the hub to let go of a socket before its owner closes it


class Member(Protocol):
    def fileno(self) -> int: ...
    def readable(self) -> bool: ...
    def lost(self) -> None: ...


class EventHub:
    """Starts its thread on the first attach (and again after `stop()`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes: list[tuple[str, Any, Any]] = []  # (op, member, done event or deadline)
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False
        self._drain_until = 0.0
        self._members: set[Any] = set()  # used on the hub's thread only
        self._deadlines: dict[Any, float] = {}

    def attach(self, member: Member, deadline: float | None = None) -> None:
        """Watch the member's socket. `deadline` (time.monotonic()): past it the hub lets go of the member and calls
        its `lost()` (a reply that never came). On the hub's own thread (a handler starting a request) it is
        watched at once, without a wake-up."""
        if self._selector is not None and threading.current_thread() is self._thread:
            self._add(self._selector, member, deadline)
            return
        with self._lock:
            if self._thread is None:
                self._start()
            self._changes.append(("add", member, deadline))
            self._wake()

    def on_thread(self) -> bool:
        """Whether the caller runs on the hub's thread (in a handler)."""
        return threading.current_thread() is self._thread

    def detach(self, member: Member) -> None:
        """Stop reading the member's socket; returns once the hub no longer watches it (so its owner may close
        it: a closed descriptor's number can be reused at once by another socket)."""
        done = threading.Event()
        with self._lock:
            if self._thread is None:
                return
            self._changes.append(("remove", member, done))
            self._wake()
        if threading.current_thread() is not self._thread:
            done.wait(DETACH_WAIT)

    def stop(self, timeout: float = 5.0, drain: float = STOP_DRAIN) -> None:
        """Stop the thread, once the requests under way (members with a deadline: posts, downloads) have their
        replies, for at most `drain` seconds; those still open then are given up (their `lost()`)."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._drain_until = time.monotonic() + drain
            self._wake()
        thread.join(timeout)

    # -- the hub's thread --------------------------------------------------------------------------
    def _start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(self._selector, self._wake_r), name=THREAD_NAME,
                                        daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # a full wake-up pipe is already a wake-up
                self._wake_w.send(b"\0")

    def _run(self, selector: selectors.BaseSelector, wake_r: socket.socket) -> None:
        members = self._members = set()
        self._deadlines = {}
        checked = time.monotonic()
        stopping = False
        try:
            while True:
                for key, mask in selector.select(timeout=DEADLINE_CHECK if self._deadlines else 1.0):
                    member = key.data
                    if member is None:
                        stopping = self._apply_changes(selector, wake_r) or stopping
                    elif member in members and not self._handle(selector, member, mask):
                        self._drop(selector, member)
                        self._lose(member)
                now = time.monotonic()
                if stopping and (not self._deadlines or now >= self._drain_until):
                    return
                if self._deadlines and now - checked >= DEADLINE_CHECK:
                    checked = now
                    for member in [m for m, at in self._deadlines.items() if at <= now]:
                        self._drop(selector, member)
                        self._lose(member)
        except Exception:
            log.exception("the websocket event hub failed")
        finally:
            with self._lock:
                self._thread = None
                pending, self._changes = self._changes, []
                wake_w, self._wake_w = self._wake_w, None
                self._selector = None
            for op, member, done in pending:
                if isinstance(done, threading.Event):
                    done.set()
                elif op == "add":
                    self._lose(member)  # never watched: its owner learns it now
            for member in list(members):
                self._drop(selector, member)
                self._lose(member)
            selector.close()
            for sock in (wake_r, wake_w):
                if sock is not None:
                    sock.close()

    def _apply_changes(self, selector: selectors.BaseSelector, wake_r: socket.socket) -> bool:
        """Attach and detach what was asked; True when the hub is to stop."""
        with contextlib.suppress(BlockingIOError):
            while wake_r.recv(4096):
                pass
        with self._lock:
            changes, self._changes = self._changes, []
            stopping = self._stopping
        for op, member, extra in changes:
            if op == "add":
                self._add(selector, member, extra)
            elif op == "remove":
                self._drop(selector, member)
                extra.set()
        return stopping

    def _add(self, selector: selectors.BaseSelector, member: Any, deadline: float | None) -> None:
        if member in self._members:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if getattr(member, "wants_write", False) else 0)
        try:
            selector.register(member, events, member)
        except (OSError, ValueError, KeyError) as exc:
            log.info("socket not watched (%s)", exc)
            self._lose(member)
            return
        self._members.add(member)
        if deadline is not None:
            self._deadlines[member] = deadline

    @staticmethod
    def _handle(selector: selectors.BaseSelector, member: Any, mask: int) -> bool:
        """Let the member send (a request `wants_write`) and read; False once it is finished."""
        try:
            if mask & selectors.EVENT_WRITE:
                if not member.writable():
                    return False
                if not member.wants_write:  # all sent: from now on only its reply is awaited
                    selector.modify(member, selectors.EVENT_READ, member)
            return not mask & selectors.EVENT_READ or bool(member.readable())
        except Exception:
            log.exception("a socket handler failed")
            return False

    @staticmethod
    def _lose(member: Any) -> None:
        try:
            member.lost()
        except Exception:
            log.exception("a handler failed")

    def _drop(self, selector: selectors.BaseSelector, member: Any) -> None:
        if member in self._members:
            self._members.discard(member)
            self._deadlines.pop(member, None)
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.unregister(member)
