"""VvuChannel / VvuTransport against a scripted stand-in of the VVU driver: fd holes,
NOFD for kicks that cannot arrive, replies to back-end requests interleaved with
front-end requests, and what cannot travel over a VVU device."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator

import pytest

from vvu_runtime.driver.errors import DeviceFault
from vvu_runtime.driver.transport import (
    DoorbellNotifier,
    VectorKick,
    VvuBackendChannel,
    VvuChannel,
    VvuTransport,
)
from vvu_runtime.driver.vvu import VvuIdentity
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import ConnectionClosed, FramingError, TransportError
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import format_message
from vvu_runtime.virtio.errors import GuestMemoryError
from vvu_runtime.virtio.memory import MemoryRegion

REPLY = int(m.HeaderFlags.REPLY)
V1 = int(m.HeaderFlags.VERSION_1)


class FakeVvu:
    """What VvuChannel and VvuTransport use of a VvuDriver."""

    name = "fake vvu"

    def __init__(self, kick_fds: dict[int, int] | None = None) -> None:
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.flushes = 0
        self.doorbells: list[int] = []
        self.kick_fds = kick_fds or {}
        self.rx_eventfd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.identity = VvuIdentity(4, __import__("uuid").UUID(int=1))
        self.interrupts = True

    def receive(self) -> list[bytes]:
        out, self.inbox = self.inbox, []
        return out

    def rx_pending(self) -> bool:
        return bool(self.inbox)

    def bypasses(self, queue: int) -> bool:
        return False  # no doorbell companion: calls ring the trapped doorbells

    def refresh_doorbell_peer(self) -> None:
        pass

    def send(self, data: bytes, *, kick: bool = True) -> None:
        self.sent.append(bytes(data))

    def flush(self) -> None:
        self.flushes += 1

    def kick_eventfd(self, index: int) -> int | None:
        return self.kick_fds.get(index)

    def doorbell_index(self, kind: str, queue: int) -> int | None:
        n = 4
        if kind == "log":
            return 2 * n
        if queue >= n:
            return None
        return queue if kind == "call" else n + queue

    def doorbell(self, index: int) -> None:
        if index == 99:
            raise DeviceFault("gone")
        self.doorbells.append(index)

    def map_shared_memory(self, offset: int, length: int) -> object:
        raise DeviceFault(f"[{offset:#x}, +{length:#x}) is outside the shared memory")


@pytest.fixture
def vvu() -> Iterator[FakeVvu]:
    fake = FakeVvu()
    yield fake
    assert fake.rx_eventfd is not None
    os.close(fake.rx_eventfd)


def channel(vvu: FakeVvu, loop: asyncio.AbstractEventLoop | None = None) -> VvuChannel:
    return VvuChannel(vvu, loop=loop)  # type: ignore[arg-type]


def vring_file(index: int, nofd: bool = False) -> bytes:
    return struct.pack("=Q", index | (m.VRING_NOFD if nofd else 0))


def test_tokens_mark_the_eventfds_the_device_kept(vvu: FakeVvu) -> None:
    kick = os.eventfd(0)
    vvu.kick_fds[1] = kick
    ch = channel(vvu)
    assert not ch.carries_fds
    table = struct.pack("=II", 2, 0) + bytes(64)
    vvu.inbox += [format_message(FR.SET_MEM_TABLE, V1, table),
                  format_message(FR.SET_VRING_KICK, V1, vring_file(1)),
                  format_message(FR.SET_VRING_KICK, V1, vring_file(2)),
                  format_message(FR.SET_VRING_CALL, V1, vring_file(0, nofd=True)),
                  format_message(FR.SET_VRING_CALL, V1, vring_file(0))]
    frames = [ch.recv_frame_nowait() for _ in range(5)]
    assert ch.recv_frame_nowait() is None
    assert [len(f.fds) for f in frames if f] == [0, 1, 0, 0, 1]
    # Queue 2 has no kick vector: the session is told NOFD, so it polls that ring.
    assert frames[2] is not None and frames[2].payload == vring_file(2, nofd=True)
    for f in frames:
        assert f is not None
        msg = m.decode_message(m.Direction.FRONTEND, f.request, f.flags, f.payload, f.fds,
                               check_fds=False)
        msg.close_fds()
    os.close(kick)
    ch.close()


def test_replies_interleaved_with_requests(vvu: FakeVvu) -> None:
    ch = channel(vvu)
    backend = VvuBackendChannel(ch)
    backend.send_frame(m.BackendRequest.CONFIG_CHANGE_MSG, V1 | int(m.HeaderFlags.NEED_REPLY),
                       b"")
    assert len(vvu.sent) == 1
    vvu.inbox += [format_message(FR.GET_FEATURES, V1, b""),
                  format_message(m.BackendRequest.CONFIG_CHANGE_MSG, V1 | REPLY,
                                 struct.pack("=Q", 0)),
                  format_message(FR.GET_QUEUE_NUM, V1, b"")]
    reply = backend.recv_frame(1.0)
    assert reply.request == m.BackendRequest.CONFIG_CHANGE_MSG and reply.flags & REPLY
    # The front-end requests found meanwhile wait for the session, which is woken up.
    assert vvu.rx_eventfd is not None and os.eventfd_read(vvu.rx_eventfd) >= 1
    got = [ch.recv_frame_nowait(), ch.recv_frame_nowait(), ch.recv_frame_nowait()]
    assert [f.request if f else None for f in got] == [FR.GET_FEATURES, FR.GET_QUEUE_NUM, None]
    with pytest.raises(TransportError, match="no reply"):
        backend.recv_frame(0.01)
    ch.close()


def test_a_reply_nobody_waits_for_is_dropped(vvu: FakeVvu, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    ch = channel(vvu)
    vvu.inbox.append(format_message(FR.GET_FEATURES, V1 | REPLY, bytes(8)))
    assert ch.recv_frame_nowait() is None
    assert "nobody waits" in caplog.text
    ch.close()


def test_malformed_message_and_closed_channel(vvu: FakeVvu) -> None:
    ch = channel(vvu)
    vvu.inbox.append(struct.pack("=III", FR.GET_FEATURES, V1, 8))  # 8 bytes promised, 0 given
    with pytest.raises(FramingError, match="header says 8"):
        ch.recv_frame_nowait()
    with pytest.raises(TransportError, match="cannot travel"):
        ch.send_frame(FR.GET_INFLIGHT_FD, V1 | REPLY, bytes(24), [0])
    ch.close()
    with pytest.raises(ConnectionClosed):
        ch.recv_frame_nowait()
    with pytest.raises(ConnectionClosed):
        ch.send_frame(FR.GET_FEATURES, V1 | REPLY, bytes(8))


def test_sends_in_one_loop_turn_share_one_notify(vvu: FakeVvu) -> None:
    loop = asyncio.new_event_loop()
    try:
        ch = channel(vvu, loop)
        ch.send_frame(FR.GET_FEATURES, V1 | REPLY, bytes(8))
        ch.send_frame(FR.GET_QUEUE_NUM, V1 | REPLY, bytes(8))
        assert vvu.flushes == 0
        loop.run_until_complete(asyncio.sleep(0))
        assert vvu.flushes == 1 and len(vvu.sent) == 2
        ch.close()
    finally:
        loop.close()


def test_poll_mode_channel_wakes_itself(vvu: FakeVvu) -> None:
    assert vvu.rx_eventfd is not None
    os.close(vvu.rx_eventfd)
    vvu.rx_eventfd = None
    loop = asyncio.new_event_loop()
    try:
        ch = VvuChannel(vvu, loop=loop, poll_interval=0.001)  # type: ignore[arg-type]
        fd = ch.fileno()
        vvu.inbox.append(format_message(FR.GET_FEATURES, V1, b""))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert os.eventfd_read(fd) >= 1
        frame = ch.recv_frame(1.0)
        assert frame.request == FR.GET_FEATURES
        ch.close()
    finally:
        loop.close()
    vvu.rx_eventfd = os.eventfd(0)


def test_transport_resources_by_queue_index(vvu: FakeVvu) -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    vvu.kick_fds[0] = kick
    ch = channel(vvu)
    tr = VvuTransport(ch)
    assert not tr.passes_fds
    placeholder = os.eventfd(0)
    source = tr.kick_source(0, placeholder)
    assert isinstance(source, VectorKick) and source.fileno() == kick
    with pytest.raises(OSError):
        os.fstat(placeholder)  # the transport closed the placeholder
    os.eventfd_write(kick, 3)
    source.drain()
    source.close()
    os.fstat(kick)  # not ours to close
    assert tr.kick_source(1, None) is None
    call = tr.notifier("call", 2, os.eventfd(0))
    err = tr.notifier("err", 2, os.eventfd(0))
    log = tr.notifier("log", 0, os.eventfd(0))
    assert tr.notifier("call", 7, os.eventfd(0)) is None  # past max_vhost_queues
    assert tr.notifier("call", 0, None) is None  # NOFD
    assert tr.notifier("log", 0, None) is not None  # SET_LOG_FD: the device kept its fd
    for n in (call, err, log):
        assert n is not None
        n.signal()
    assert vvu.doorbells == [2, 6, 8]
    broken = DoorbellNotifier(vvu, 99)  # type: ignore[arg-type]
    broken.signal()
    broken.signal()  # logged once, never raises
    with pytest.raises(GuestMemoryError, match="outside"):
        tr.map_region(MemoryRegion(0, 4096, 0x7F00_0000_0000, 1 << 40), None)
    with pytest.raises(GuestMemoryError, match="not tunnelled"):
        tr.map_log(4096, 0, None)
    assert isinstance(tr.backend_channel(None), VvuBackendChannel)
    os.close(kick)
    ch.close()
