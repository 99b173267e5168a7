"""vvu-devd as the appliance's ivshmem server (vvu_runtime/device/ivshmem.py).

The server runs on a loop thread; the client side is a real UNIX socket: a raw
reader for the wire format, and tests/support/ivshmem_client.IvshmemStandIn for
what QEMU's ivshmem-doorbell does with it (install vectors, making each eventfd
non-blocking; remove peers; ring Doorbell values).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ivshmem_client import IvshmemStandIn
from tests.support.loop_thread import LoopThread
from vvu_runtime.device import ivshmem
from vvu_runtime.device.ivshmem import MESSAGE, SHM_SIZE, DoorbellPeer, IvshmemServer
from vvu_runtime.fds import eventfd_info
from vvu_runtime.virtio.vvu_abi import DOORBELL_OWNER_ID, NO_DOORBELL_PEER, ivshmem_doorbell

VECTORS = 5  # calls of queues 0..3, and the fence
TIMEOUT = 5.0


def ident(fd: int) -> int:
    got = eventfd_info(fd).ident
    assert got is not None, "this kernel's fdinfo shows no eventfd-id"
    return got


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def fired(fd: int, timeout: float = TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.002)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class RawClient:
    """The wire format as it arrives: one int64 per recvmsg, at most one fd."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.fds: list[int] = []

    def recv(self) -> tuple[int, int | None]:
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(MESSAGE.size, socket.CMSG_SPACE(4 * fds.itemsize))
        assert len(data) == MESSAGE.size, data
        for _, _, blob in anc:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
        assert len(fds) <= 1, "one fd per message"
        fd = fds[0] if fds else None
        if fd is not None:
            self.fds.append(fd)
        return MESSAGE.unpack(data)[0], fd

    def nothing(self, settle: float = 0.1) -> bool:
        self.sock.settimeout(settle)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


@dataclass
class Rig:
    lt: LoopThread
    server: IvshmemServer
    a: DoorbellPeer
    b: DoorbellPeer
    path: str

    def set_calls(self, peer: DoorbellPeer, calls: dict[int, int]) -> None:
        self.lt.call(peer.set_calls, calls)
        self.lt.sync()

    def get(self, fn: Callable[[], object]) -> object:
        return self.lt.call(fn)

    def stand_in(self) -> IvshmemStandIn:
        qemu = IvshmemStandIn(self.path)
        qemu.start()
        wait_for(lambda: qemu.shm is not None, "the setup")
        return qemu


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    before = open_fds()
    lt = LoopThread()
    path = str(tmp_path / "doorbell.sock")

    def build() -> tuple[IvshmemServer, DoorbellPeer, DoorbellPeer]:
        server = IvshmemServer(path, vectors=VECTORS, loop=lt.loop)
        a, b = server.add_peer("link-a"), server.add_peer("link-b")
        server.start()
        return server, a, b

    server, a, b = lt.call(build)
    try:
        yield Rig(lt, server, a, b, path)
    finally:
        lt.call(server.close)
        lt.stop()
    assert open_fds() <= before


def test_setup_is_version_own_id_shared_memory(rig: Rig) -> None:
    c = RawClient(rig.path)
    try:
        assert c.recv() == (0, None)
        assert c.recv() == (DOORBELL_OWNER_ID, None)
        value, shm = c.recv()
        assert value == -1 and shm is not None and os.fstat(shm).st_size == SHM_SIZE
        assert c.nothing()  # no calls yet: no peer to announce
        assert rig.get(rig.a.current_peer) == NO_DOORBELL_PEER
        other = RawClient(rig.path)  # one client at a time
        try:
            assert other.sock.recv(8) == b""
        finally:
            other.close()
        assert rig.get(lambda: rig.server.refused) == 1
    finally:
        c.close()


def test_calls_are_vectors_in_order_with_the_sink_for_holes_and_the_fence_last(
        rig: Rig) -> None:
    c = RawClient(rig.path)
    a0, a2 = efd(), efd()
    try:
        for _ in range(3):
            c.recv()
        rig.set_calls(rig.a, {0: a0, 2: a2})
        assert rig.get(rig.a.current_peer) == 1  # shown to the driver at once
        got = [c.recv() for _ in range(4)]
        assert [v for v, _ in got] == [1, 1, 1, 1]
        fds = [fd for _, fd in got]
        assert all(fd is not None for fd in fds)
        sink = rig.get(lambda: rig.server.sink)
        assert isinstance(sink, int)
        assert [ident(fd) for fd in fds[:3] if fd is not None] == [ident(a0), ident(sink),
                                                                   ident(a2)]
        fence = fds[3]
        assert fence is not None and not fcntl.fcntl(fence, fcntl.F_GETFL) & os.O_NONBLOCK
        assert c.nothing()
        # QEMU installs it (the fence turns non-blocking): each call signalled once.
        os.set_blocking(fence, False)
        assert fired(a0) == 1 and fired(a2) == 1
        assert fired(a0, 0.1) == 0
        assert rig.get(lambda: (rig.a.applied, rig.a.apply_timeouts)) == (1, 0)
    finally:
        c.close()
        os.close(a0)
        os.close(a2)


def test_a_new_set_gets_a_new_id_and_the_old_one_goes_when_the_driver_read_it(
        rig: Rig) -> None:
    qemu = rig.stand_in()
    a0, b0 = efd(), efd()
    try:
        rig.set_calls(rig.a, {0: a0})
        wait_for(lambda: rig.get(lambda: rig.a.applied) == 1, "the first set")
        fired(a0)
        rig.set_calls(rig.a, {0: b0})
        assert rig.get(rig.a.current_peer) == 2
        wait_for(lambda: rig.get(lambda: rig.a.applied) == 2, "the new set")
        fired(b0)
        # A driver still ringing under ID 1 reaches the old set; ID 2 the new one.
        assert qemu.ring(ivshmem_doorbell(1, 0)) and fired(a0) == 1
        assert qemu.ring(ivshmem_doorbell(2, 0)) and fired(b0) == 1
        assert qemu.removed == []
        rig.lt.call(rig.a.driver_saw, 1)  # an old value: nothing goes
        rig.lt.sync()
        assert qemu.removed == []
        rig.lt.call(rig.a.driver_saw, 2)
        wait_for(lambda: qemu.removed == [1], "ID 1 removed")
        assert not qemu.ring(ivshmem_doorbell(1, 0))
        assert qemu.reused == []  # never an ID again after its removal (QEMU would crash)
    finally:
        qemu.close()
        os.close(a0)
        os.close(b0)


def test_a_fence_never_installed_still_signals_after_the_timeout(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ivshmem, "APPLY_TIMEOUT", 0.2)
    c = RawClient(rig.path)  # reads, never installs
    a0 = efd()
    try:
        rig.set_calls(rig.a, {0: a0})
        assert fired(a0, 2.0) == 1
        assert rig.get(lambda: (rig.a.applied, rig.a.apply_timeouts)) == (0, 1)
    finally:
        c.close()
        os.close(a0)


def test_the_peer_goes_with_the_front_end(rig: Rig) -> None:
    qemu = rig.stand_in()
    a0 = efd()
    try:
        rig.set_calls(rig.a, {0: a0})
        wait_for(lambda: len(qemu.installed(1)) == 2, "the set")
        rig.set_calls(rig.a, {})  # disconnected: no calls any more
        wait_for(lambda: qemu.removed == [1], "the removal")
        assert rig.get(rig.a.current_peer) == NO_DOORBELL_PEER
        assert rig.get(lambda: rig.a.calls) == {}
    finally:
        qemu.close()
        os.close(a0)


def test_the_same_eventfd_again_is_no_change(rig: Rig) -> None:
    qemu = rig.stand_in()
    a0 = efd()
    again = os.dup(a0)
    try:
        rig.set_calls(rig.a, {0: a0})
        rig.set_calls(rig.a, {0: again})  # another fd, the same eventfd
        time.sleep(0.05)
        assert rig.get(lambda: (rig.a.announcements, rig.a.current_peer())) == (1, 1)
    finally:
        qemu.close()
        os.close(a0)
        os.close(again)


def test_a_storm_of_replacements_is_coalesced_bounded_and_leaks_nothing(rig: Rig) -> None:
    qemu = rig.stand_in()
    b0 = efd()
    try:
        rig.set_calls(rig.b, {0: b0})
        wait_for(lambda: rig.get(lambda: rig.b.applied) == 1, "link b's set")
        fired(b0)
        def ours() -> int:  # fds of this process but the stand-in's installed vectors
            with qemu.lock:
                return open_fds() - sum(len(v) for v in qemu.vectors.values())

        baseline = ours()
        start = time.monotonic()
        for _ in range(2000):
            new = efd()
            rig.lt.call(rig.a.set_calls, {0: new, 3: new})
            os.close(new)  # the front-end closes (and may reuse) what it gave
        rig.lt.sync()
        elapsed = time.monotonic() - start
        time.sleep(0.1)
        rig.lt.sync()
        sent = rig.get(lambda: rig.a.announcements)
        assert isinstance(sent, int)
        # At most one announcement (and one ID) per MIN_INTERVAL, not one per change.
        assert 1 <= sent <= (elapsed + 0.2) / ivshmem.MIN_INTERVAL + 2 < 2000
        assert rig.get(lambda: rig.a.ids_used) in (sent, sent + 1)
        # No driver read the new IDs: at most MAX_RETIRED old ones stay installed.
        live = [p for p in qemu.vectors if p != rig.b.peer_id]
        assert len(live) <= ivshmem.MAX_RETIRED + 1
        assert qemu.reused == []
        # Our duplicates of the closed eventfds are closed as they are replaced.
        assert ours() <= baseline + 4
        # Link b never moved and still rings.
        b_id = rig.get(rig.b.current_peer)
        assert b_id == 1 and rig.get(lambda: rig.b.announcements) == 1
        assert qemu.ring(ivshmem_doorbell(1, 0)) and fired(b0) == 1
    finally:
        qemu.close()
        os.close(b0)


def test_a_link_out_of_ids_falls_back_to_trapped_doorbells_alone(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ivshmem, "IVSHMEM_MAX_PEER", 7)  # 3 IDs per link
    monkeypatch.setattr(ivshmem, "MIN_INTERVAL", 0.0)
    qemu = rig.stand_in()
    b0 = efd()
    fds = [efd() for _ in range(5)]
    try:
        rig.set_calls(rig.b, {0: b0})
        for fd in fds:
            rig.set_calls(rig.a, {0: fd})
            rig.lt.call(rig.a.driver_saw, rig.get(rig.a.current_peer))
            rig.lt.sync()
        assert rig.get(rig.a.current_peer) == NO_DOORBELL_PEER  # trapped from now on
        assert rig.get(lambda: (rig.a.exhausted, rig.a.ids_used)) == (True, 3)
        wait_for(lambda: not [p for p in qemu.vectors if p != rig.b.peer_id],
                 "link a's IDs removed")
        assert rig.get(rig.b.current_peer) == 1
        assert qemu.ring(ivshmem_doorbell(1, 0))
    finally:
        qemu.close()
        os.close(b0)
        for fd in fds:
            os.close(fd)


def test_a_new_client_gets_every_set_again_under_fresh_ids(rig: Rig) -> None:
    a1 = efd()
    try:
        first = rig.stand_in()
        rig.set_calls(rig.a, {1: a1})
        wait_for(lambda: len(first.installed(1)) == 3, "the set")
        first.close()
        wait_for(lambda: rig.get(lambda: rig.server.client) is None, "the client gone")
        second = rig.stand_in()  # a new QEMU: IDs start again
        try:
            wait_for(lambda: len(second.installed(1)) == 3, "the set again")
            assert ident(second.installed(1)[1]) == ident(a1)
            assert rig.get(rig.a.current_peer) == 1
        finally:
            second.close()
    finally:
        os.close(a1)


def test_queues_past_the_vectors_are_left_to_the_trapped_doorbells(rig: Rig) -> None:
    qemu = rig.stand_in()
    fds = [efd() for _ in range(6)]
    try:
        rig.set_calls(rig.a, dict(enumerate(fds)))
        wait_for(lambda: len(qemu.installed(1)) == VECTORS, "the set")  # 0..3 and the fence
    finally:
        qemu.close()
        for fd in fds:
            os.close(fd)
