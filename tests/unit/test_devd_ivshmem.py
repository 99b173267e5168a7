"""vvu-devd as the appliance's ivshmem server (vvu_runtime/device/ivshmem.py).

The server runs on a loop thread; the test body is the client, as QEMU's
ivshmem-doorbell is: a real UNIX socket, one little-endian int64 per recvmsg,
an fd attached or not. "QEMU installed the announcement" is what QEMU does to
each eventfd it takes: it sets O_NONBLOCK on it (``process_msg_connect``).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.loop_thread import LoopThread
from vvu_runtime.device import ivshmem
from vvu_runtime.device.ivshmem import MESSAGE, SHM_SIZE, DoorbellPeer, IvshmemServer
from vvu_runtime.fds import eventfd_info
from vvu_runtime.virtio.vvu_abi import DOORBELL_OWNER_ID

VECTORS = 5  # calls of queues 0..3, and the fence
TIMEOUT = 5.0


def ident(fd: int) -> int:
    got = eventfd_info(fd).ident
    assert got is not None, "this kernel's fdinfo shows no eventfd-id"
    return got


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Msg:
    value: int
    fd: int | None


class Client:
    """What QEMU's ivshmem-doorbell does with the server's socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.fds: list[int] = []

    def recv(self, timeout: float = TIMEOUT) -> Msg:
        self.sock.settimeout(timeout)
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(MESSAGE.size, socket.CMSG_SPACE(4 * fds.itemsize))
        assert len(data) == MESSAGE.size, data
        for level, kind, blob in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
        assert len(fds) <= 1, "one fd per message"
        fd = fds[0] if fds else None
        if fd is not None:
            self.fds.append(fd)
        return Msg(MESSAGE.unpack(data)[0], fd)

    def nothing(self, settle: float = 0.1) -> bool:
        try:
            self.sock.settimeout(settle)
            return not self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True

    def setup(self) -> int:
        """Version, own ID, shared memory; returns the shm fd."""
        assert self.recv() == Msg(0, None)
        assert self.recv() == Msg(DOORBELL_OWNER_ID, None)
        shm = self.recv()
        assert shm.value == -1 and shm.fd is not None
        return shm.fd

    def announcement(self, peer: int, *, removed_first: bool) -> list[int]:
        """One peer's announcement: its vector fds, the fence last (removal checked)."""
        if removed_first:
            assert self.recv() == Msg(peer, None)
        fds = []
        while True:
            msg = self.recv()
            assert msg.value == peer and msg.fd is not None, msg
            fds.append(msg.fd)
            if not _next_is(self, peer):
                return fds

    def install(self, fd: int) -> None:
        """What QEMU does to an eventfd it installs."""
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _next_is(client: Client, peer: int) -> bool:
    """Whether another vector message of ``peer`` follows right away."""
    client.sock.settimeout(0.2)
    try:
        head = client.sock.recv(MESSAGE.size, socket.MSG_PEEK)
    except TimeoutError:
        return False
    return len(head) == MESSAGE.size and MESSAGE.unpack(head)[0] == peer


def fired(fd: int, timeout: float = TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            time.sleep(0.002)
    return 0


def efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@dataclass
class Rig:
    lt: LoopThread
    server: IvshmemServer
    peers: list[DoorbellPeer]
    path: str

    def client(self) -> Client:
        return Client(self.path)

    def set_calls(self, peer: int, calls: dict[int, int]) -> None:
        self.lt.call(self.peers[peer].set_calls, calls)
        self.lt.sync()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    before = open_fds()
    lt = LoopThread()
    path = str(tmp_path / "doorbell.sock")

    def build() -> tuple[IvshmemServer, list[DoorbellPeer]]:
        server = IvshmemServer(path, vectors=VECTORS, loop=lt.loop)
        peers = [server.add_peer("link-a"), server.add_peer("link-b")]
        server.start()
        return server, peers

    server, peers = lt.call(build)
    try:
        yield Rig(lt, server, peers, path)
    finally:
        lt.call(server.close)
        lt.stop()
    assert open_fds() <= before


def test_setup_version_own_id_shared_memory_then_every_peer(rig: Rig) -> None:
    c = rig.client()
    try:
        shm = c.setup()
        assert os.fstat(shm).st_size == SHM_SIZE
        assert [p.peer_id for p in rig.peers] == [1, 2]
        for peer in (1, 2):
            # No call eventfd yet: the fence alone (a fresh, blocking eventfd).
            (fence,) = c.announcement(peer, removed_first=False)
            assert not fcntl.fcntl(fence, fcntl.F_GETFL) & os.O_NONBLOCK
        assert c.nothing()
        # A second client is refused while the first is served.
        other = rig.client()
        try:
            assert other.sock.recv(8) == b""
        finally:
            other.close()
        assert rig.lt.call(lambda: rig.server.refused) == 1
    finally:
        c.close()


def test_calls_are_the_peers_vectors_and_holes_get_the_sink(rig: Rig) -> None:
    c = rig.client()
    a0, a2 = efd(), efd()
    try:
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        rig.set_calls(0, {0: a0, 2: a2})
        vectors = c.announcement(1, removed_first=True)
        assert len(vectors) == 4  # queue 0, 1 (hole), 2, fence
        sink = rig.lt.call(lambda: rig.server.sink)
        assert [ident(fd) for fd in vectors[:3]] == [ident(a0), ident(sink), ident(a2)]
        fence = vectors[3]
        assert ident(fence) not in {ident(a0), ident(a2), ident(sink)}
        assert c.nothing()  # peer 2 untouched
        # QEMU installs the fence: every call of the peer is signalled once, so a
        # doorbell rung while the set was changing is not lost.
        c.install(fence)
        assert fired(a0) == 1 and fired(a2) == 1
        assert rig.lt.call(lambda: rig.peers[0].applied) == 1
        assert fired(a0, 0.1) == 0  # once
    finally:
        c.close()
        os.close(a0)
        os.close(a2)


def test_a_fence_never_installed_still_signals_after_the_timeout(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ivshmem, "APPLY_TIMEOUT", 0.2)
    c = rig.client()
    a0 = efd()
    try:
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        rig.set_calls(0, {0: a0})
        c.announcement(1, removed_first=True)
        assert fired(a0, 2.0) == 1
        assert rig.lt.call(lambda: (rig.peers[0].applied, rig.peers[0].apply_timeouts)) == (0, 1)
    finally:
        c.close()
        os.close(a0)


def test_peer_removal_when_the_front_end_goes(rig: Rig) -> None:
    c = rig.client()
    a0 = efd()
    try:
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        rig.set_calls(1, {0: a0})
        assert len(c.announcement(2, removed_first=True)) == 2
        rig.set_calls(1, {})  # the front-end disconnected: no calls any more
        # The removal (peer ID, no fd), then only a fence: no vector is left.
        assert len(c.announcement(2, removed_first=True)) == 1
        assert rig.lt.call(lambda: rig.peers[1].calls) == {}
    finally:
        c.close()
        os.close(a0)


def test_the_same_eventfd_again_is_no_change(rig: Rig) -> None:
    c = rig.client()
    a0 = efd()
    again = os.dup(a0)
    try:
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        rig.set_calls(0, {0: a0})
        c.announcement(1, removed_first=True)
        rig.set_calls(0, {0: again})  # another fd, the same eventfd
        assert c.nothing()
        assert rig.lt.call(lambda: rig.peers[0].announcements) == 2
    finally:
        c.close()
        os.close(a0)
        os.close(again)


def test_a_storm_of_replacements_is_coalesced_and_leaks_nothing(rig: Rig) -> None:
    c = rig.client()
    b0 = efd()
    try:
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        rig.set_calls(1, {0: b0})
        c.announcement(2, removed_first=True)
        baseline = open_fds()
        start = time.monotonic()
        for _ in range(2000):
            new = efd()
            rig.lt.call(rig.peers[0].set_calls, {0: new, 3: new})
            os.close(new)  # the front-end closes (and may reuse) what it gave
        rig.lt.sync()
        elapsed = time.monotonic() - start
        time.sleep(0.1)
        got = rig.lt.call(lambda: rig.peers[0].announcements)
        # Rate-limited: at most one announcement per MIN_INTERVAL, not one per change.
        assert 1 <= got <= (elapsed + 0.1) / ivshmem.MIN_INTERVAL + 2 < 2000
        # Drain what was sent; the last announcement carries the latest set.
        seen = 0
        while not c.nothing(0.3):
            msg = c.recv()
            assert msg.value == 1, "nothing for peer 2 meanwhile"
            if msg.fd is not None:
                os.close(msg.fd)
                c.fds.remove(msg.fd)
            seen += 1
        assert seen <= got * (2 + 4 + 1)
        # Our duplicates of the closed eventfds are closed as they are replaced.
        assert open_fds() <= baseline + 2
        assert rig.lt.call(lambda: len(rig.peers[0].calls)) == 2
        # Peer 2 still works: its call is signalled when its set is installed.
        rig.set_calls(1, {})
        vectors = c.announcement(2, removed_first=True)
        c.install(vectors[-1])
    finally:
        c.close()
        os.close(b0)


def test_a_client_that_goes_away_gets_everything_again_when_it_comes_back(rig: Rig) -> None:
    a0 = efd()
    try:
        c = rig.client()
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        c.close()
        rig.lt.sync()
        time.sleep(0.05)
        rig.set_calls(0, {1: a0})  # meanwhile: nothing to send to
        c = rig.client()
        try:
            c.setup()
            vectors = c.announcement(1, removed_first=False)  # in full, no removal
            assert len(vectors) == 3 and ident(vectors[1]) == ident(a0)
            c.announcement(2, removed_first=False)
        finally:
            c.close()
    finally:
        os.close(a0)


def test_queues_past_the_vectors_are_left_to_the_trapped_doorbells(rig: Rig) -> None:
    c = rig.client()
    fds = [efd() for _ in range(6)]
    try:
        c.setup()
        c.announcement(1, removed_first=False)
        c.announcement(2, removed_first=False)
        rig.set_calls(0, dict(enumerate(fds)))
        vectors = c.announcement(1, removed_first=True)
        assert len(vectors) == VECTORS  # queues 0..3 and the fence: QEMU has no more
    finally:
        c.close()
        for fd in fds:
            os.close(fd)
