"""One thread that reads the websockets of every server a scheduler feeds, as they become readable (epoll
through `selectors`), instead of a thread blocked in recv per websocket.

Why: a fleet of 64 servers running 0.2 s jobs sends about 3,000 frames a second. With a reader thread per
socket, each frame woke its own thread, which then queued for the interpreter lock behind the others (about
110 voluntary context switches per job in `bench/fleet.py --thread-cpu`). One thread reading whatever is ready
handles several sockets' frames per wake-up and never competes with other readers.

A member (`core.comfy.EventSocket`) is attached once its websocket is open and detached before it is closed; the
hub calls `member.readable()` when its socket has data (it returns False once the connection is finished: the
hub then unregisters it and calls `member.lost()`). Handlers run on the hub's thread, so they must not block:
the scheduler's `on_event` only updates memory and hands finished prompts to the collection pool.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)
THREAD_NAME = "comfybatch-events"
DETACH_WAIT = 5.0  # seconds detach() waits for the hub to let go of a socket before its owner closes it


class Member(Protocol):
    def fileno(self) -> int: ...
    def readable(self) -> bool: ...
    def lost(self) -> None: ...


class EventHub:
    """Starts its thread on the first attach (and again after `stop()`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes: list[tuple[str, Any, threading.Event | None]] = []
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False

    def attach(self, member: Member) -> None:
        with self._lock:
            if self._thread is None:
                self._start()
            self._changes.append(("add", member, None))
            self._wake()

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

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
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
        members: set[Any] = set()
        try:
            while True:
                for key, _ in selector.select(timeout=1.0):
                    member = key.data
                    if member is None:
                        if self._apply_changes(selector, wake_r, members):
                            return
                    elif member in members and not self._read(member):
                        self._drop(selector, member, members)
                        member.lost()
        except Exception:
            log.exception("the websocket event hub failed")
        finally:
            with self._lock:
                self._thread = None
                pending, self._changes = self._changes, []
                wake_w, self._wake_w = self._wake_w, None
            for _, _, done in pending:
                if done is not None:
                    done.set()
            for member in list(members):
                self._drop(selector, member, members)
                member.lost()
            selector.close()
            for sock in (wake_r, wake_w):
                if sock is not None:
                    sock.close()

    def _apply_changes(self, selector: selectors.BaseSelector, wake_r: socket.socket, members: set[Any]) -> bool:
        """Attach and detach what was asked; True when the hub is to stop."""
        with contextlib.suppress(BlockingIOError):
            while wake_r.recv(4096):
                pass
        with self._lock:
            changes, self._changes = self._changes, []
            stopping = self._stopping
        for op, member, done in changes:
            if op == "add" and member not in members:
                try:
                    selector.register(member, selectors.EVENT_READ, member)
                    members.add(member)
                except (OSError, ValueError, KeyError) as exc:
                    log.info("websocket not watched (%s): reconnecting", exc)
                    member.lost()
            elif op == "remove":
                self._drop(selector, member, members)
            if done is not None:
                done.set()
        return stopping

    @staticmethod
    def _read(member: Any) -> bool:
        try:
            return bool(member.readable())
        except Exception:
            log.exception("websocket handler failed")
            return False

    @staticmethod
    def _drop(selector: selectors.BaseSelector, member: Any, members: set[Any]) -> None:
        if member in members:
            members.discard(member)
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.unregister(member)
