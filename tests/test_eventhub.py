"""core.eventhub: one thread reads many sockets as they become readable (real socket pairs, real threads)."""

from __future__ import annotations

import socket
import threading
import time

from core import wire
from core.eventhub import EventHub


def frame(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 126
    return bytes([0x81, len(data)]) + data


class Member:
    """A websocket stand-in: the hub calls readable() when its socket has data."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(False)
        self.reader = wire.FrameReader()
        self.messages: list[str] = []
        self.gone = threading.Event()
        self.threads: set[str] = set()

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self) -> bool:
        self.threads.add(threading.current_thread().name)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.reader.feed(chunk)
        while (message := self.reader.pop()) is not None:
            self.messages.append(message[1].decode())
        return True

    def lost(self) -> None:
        self.gone.set()


def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_one_thread_reads_every_socket_and_split_frames_arrive_whole():
    hub = EventHub()
    pairs = [socket.socketpair() for _ in range(20)]
    members = [Member(ours) for ours, _ in pairs]
    try:
        for member in members:
            hub.attach(member)
        for i, (_, theirs) in enumerate(pairs):
            data = frame(f"first {i}") + frame(f"second {i}")
            theirs.sendall(data[:3])  # a frame split across two reads
        time.sleep(0.05)
        for i, (_, theirs) in enumerate(pairs):
            theirs.sendall((frame(f"first {i}") + frame(f"second {i}"))[3:])
        wait_for(lambda: all(len(m.messages) == 2 for m in members))
        assert [m.messages for m in members] == [[f"first {i}", f"second {i}"] for i in range(20)]
        assert set().union(*(m.threads for m in members)) == {"comfybatch-events"}
        # The peer closing one socket: that member is lost and no longer read; the others go on.
        pairs[3][1].close()
        members[3].gone.wait(5)
        assert members[3].gone.is_set()
        pairs[4][1].sendall(frame("still here"))
        wait_for(lambda: members[4].messages[-1:] == ["still here"])
        # Detached: nothing more is read from it, even though data arrives.
        hub.detach(members[5])
        pairs[5][1].sendall(frame("unread"))
        time.sleep(0.1)
        assert members[5].messages == ["first 5", "second 5"] and not members[5].gone.is_set()
    finally:
        hub.stop()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    # Stopped: the thread is gone and every member still attached was told.
    assert not any(t.name == "comfybatch-events" for t in threading.enumerate())
    assert all(m.gone.is_set() for i, m in enumerate(members) if i != 5)


def test_a_handler_that_raises_loses_only_its_own_connection_and_the_hub_restarts_after_stop():
    hub = EventHub()
    (a, a_peer), (b, b_peer), (c, c_peer) = socket.socketpair(), socket.socketpair(), socket.socketpair()
    bad, good = Member(a), Member(b)
    bad.readable = lambda: 1 / 0  # type: ignore[method-assign]
    try:
        hub.attach(bad)
        hub.attach(good)
        a_peer.sendall(frame("boom"))
        bad.gone.wait(5)
        assert bad.gone.is_set()
        b_peer.sendall(frame("fine"))
        wait_for(lambda: good.messages == ["fine"])
        hub.stop()
        assert good.gone.is_set()
        later = Member(c)
        hub.attach(later)  # a new thread
        c_peer.sendall(frame("after"))
        wait_for(lambda: later.messages == ["after"])
    finally:
        hub.stop()
        for s in (a, a_peer, b, b_peer, c, c_peer):
            s.close()
