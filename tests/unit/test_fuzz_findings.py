"""Regression tests for what the fuzz harnesses found (docs/fuzzing.md, "Findings").

Each test replays the shape of one finding against the code that was fixed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from tests.support.kick_sources import RegularFileKickTransport
from tests.support.vhost_user_harness import EchoDevice, LoopThread, session_pair
from vvu_runtime.device.errors import MessageError
from vvu_runtime.device.vfio_user.protocol import Version
from vvu_runtime.vhost_user.errors import FrontendError
from vvu_runtime.vhost_user.frontend import GuestRam, setup_queue
from vvu_runtime.virtio.errors import RingError
from vvu_runtime.virtio.inflight import PackedInflight, SplitInflight, inflight_region_size
from vvu_runtime.virtio.memory import GuestMemory, memfd_region
from vvu_runtime.virtio.packed import PackedQueue
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.split import SplitQueue

UVA = 0x7F66_0000_0000


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                       # nesting past the recursion limit
    b'{"capabilities":{"x":' + b"9" * 100_000 + b"}}",      # past int's digit limit
], ids=["deep-nesting", "huge-number"])
def test_version_json_that_python_cannot_parse_is_a_parse_error(body: bytes) -> None:
    # Found by the vfio-user harness: these raised RecursionError / ValueError out of
    # Version.unpack, which the server logged as an internal error (answered EIO).
    with pytest.raises(MessageError, match="capability JSON does not parse"):
        Version.unpack(struct.pack("<HH", 0, 0) + body + b"\0")


def test_a_kick_source_the_loop_cannot_wait_on_is_polled_instead() -> None:
    # Found by the session harness: a memfd as the kick fd made epoll refuse
    # add_reader (EPERM) inside SET_VRING_KICK; the session logged an internal error
    # and dropped the connection. Such a ring is now polled, as with a NOFD kick.
    lt = LoopThread()
    ram = GuestRam(1 << 20)
    try:
        with session_pair(EchoDevice(), lt, transport=RegularFileKickTransport()) as (
                fe, session):
            fe.negotiate()
            fe.set_mem_table([(ram.region, ram.fd)])
            dq = setup_queue(fe, ram, 0, 8)
            src, dst = ram.alloc(2), ram.alloc(8)
            ram.view(src, 2)[:] = b"ok"
            dq.ring.add([(src, 2)], [(dst, 8)], token=dst)
            assert dq.wait_call(), "the polled ring was not served"
            assert dq.ring.get_used() == [(dst, 2)]
            assert bytes(ram.view(dst, 2)) == b"OK"
            assert fe.get_queue_num() == 2
            assert not session.closed
            dq.close()
    finally:
        ram.close()
        lt.stop()


def _split_queue(memory: GuestMemory, size: int) -> SplitQueue:
    addrs = RingAddresses(UVA, UVA + 0x1000, UVA + 0x2000)
    return SplitQueue(0, size, addrs, memory, 0)


def _packed_queue(memory: GuestMemory, size: int) -> PackedQueue:
    addrs = RingAddresses(UVA, UVA + 0x1000, UVA + 0x2000)
    return PackedQueue(0, size, addrs, memory, 0)


@pytest.fixture
def ring_memory() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    mapped, fd = memfd_region(1 << 16, guest_phys_addr=0, userspace_addr=UVA)
    os.close(fd)
    memory.add(mapped)
    yield memory
    memory.clear()


def test_an_inflight_region_smaller_than_its_ring_is_refused(ring_memory: GuestMemory) -> None:
    # Found by the session harness: GET_INFLIGHT_FD for queues of 4 entries, then a
    # ring of 16; a head past 3 indexed past the records (IndexError in begin()), the
    # session logged a device error and dropped the connection.
    split = SplitInflight(memoryview(bytearray(inflight_region_size(1, 4))), 4)
    with pytest.raises(RingError, match="tracks 4 entries, the ring has 16"):
        split.resubmit(_split_queue(ring_memory, 16))
    assert split.resubmit(_split_queue(ring_memory, 4)) == []  # as big: fine
    packed = PackedInflight(memoryview(bytearray(inflight_region_size(1, 4, True))), 4)
    with pytest.raises(RingError, match="ring of 4 entries, this one has 8"):
        packed.bind(_packed_queue(ring_memory, 8))


def test_a_session_refuses_to_start_a_ring_bigger_than_its_inflight_region() -> None:
    lt = LoopThread()
    ram = GuestRam(1 << 20)
    dev = EchoDevice()
    try:
        with session_pair(dev, lt) as (fe, session):
            fe.negotiate()
            _, fd = fe.get_inflight_fd(2, 4)
            os.close(fd)
            fe.set_mem_table([(ram.region, ram.fd)])
            with pytest.raises(FrontendError):
                setup_queue(fe, ram, 0, 16)  # refused when the ring would start
            assert not session.closed
            assert fe.get_queue_num() == 2  # the connection lives on
            assert dev.started == []
    finally:
        ram.close()
        lt.stop()
