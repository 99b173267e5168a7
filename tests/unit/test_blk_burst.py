"""BlkDevice.process() with its compiled loop (``_serve_c.serve_burst``) against the
reference (the Python loop), on real split rings.

Every scenario is built twice from scratch - guest memory (a memfd), a compiled
split ring in it with the driver side writing chains (direct or through indirect
tables), an inflight region when the scenario tracks, a raw image - and
``process()`` runs once with the compiled loop and once with it off. Both runs
must leave byte-identical guest memory (data, status bytes, used ring, event
indexes), image, inflight region and next inflight counter, the same ring
position and state (failed or not), the same calls and err signals, and raise
the same exception if any.

The C loop may only serve what it serves exactly as Python would, and must
leave the rest untouched for Python: guard tests check that it serves the
common requests itself, and the hostile scenarios (buffers over rings, tables
and other requests' headers, bad chains, index jumps) reach it and are handed
back.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_split_compiled import compiled_class
from tests.unit.test_switch_compiled import Counting
from vvu_runtime.backends.blk import device as device_mod
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.vhost_user.transport import Notifier
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio import blk
from vvu_runtime.virtio.blk import RequestType
from vvu_runtime.virtio.driver_ring import SplitDriverRing
from vvu_runtime.virtio.features import DescFlag, VirtioFeature
from vvu_runtime.virtio.inflight import SplitInflight, inflight_region_size
from vvu_runtime.virtio.memory import GuestMemory, memfd_region
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.split import DESC, split_ring_layout

IN, OUT, FLUSH, GET_ID = (int(RequestType.IN), int(RequestType.OUT), int(RequestType.FLUSH),
                          int(RequestType.GET_ID))
N, W, IND = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
SIZE = 128  # ring entries (20 requests of up to 6 descriptors)
REGION = 1 << 20
GPA = 1 << 32
UVA = 0x7F00_0000_0000
RING = 0x1000  # the ring's offset in guest memory
TABLES = 0x8000  # indirect tables, 1 KiB each
BUFS = 0x2_0000  # headers, data and status bytes from here
SECTORS = 256  # a 128 KiB image
HOLE = 0xF0_0000_0000  # mapped by nobody
REPO = Path(__file__).resolve().parents[2]
BASE = int(VirtioFeature.VERSION_1) | int(VirtioFeature.INDIRECT_DESC)
EVENT_IDX = int(VirtioFeature.EVENT_IDX)


def serve_burst() -> device_mod.ServeBurst:
    compiled_class()  # fails or skips as the ring's tests do
    fn = device_mod._compiled_serve_burst
    if fn is None:
        pytest.fail("the compiled ring is built but _serve_c.serve_burst is not: run ./setup",
                    pytrace=False)
    return fn


@dataclass
class Req:
    """One chain, as the driver writes it. Buffers are (guest offset | None, length):
    None takes fresh memory. ``raw``: descriptors given as they are (flags, next),
    for chains no driver would write."""

    rtype: int = IN
    sector: int = 0
    data: list[int] = field(default_factory=lambda: [4096])
    indirect: bool = False
    header: list[tuple[int | None, int]] | None = None  # default: one 16-byte buffer
    status: tuple[int | None, int] = (None, 1)
    data_at: list[int | None] | None = None  # guest offsets of the data buffers
    raw: list[tuple[int, int, int, int]] | None = None  # (offset, len, flags, next)
    #: raw + indirect: descriptors written right after the table, outside its length.
    beyond: list[tuple[int, int, int, int]] = field(default_factory=list)


class Rig:
    """Guest memory with one compiled split ring, its driver side, and a BlkDevice."""

    def __init__(self, tmp: Path, name: str, *, features: int, inflight: bool,
                 read_only: bool = False, bounce: bool = False) -> None:
        self.mem = GuestMemory()
        mapped, fd = memfd_region(REGION, guest_phys_addr=GPA, userspace_addr=UVA)
        self.fd = fd
        mapped.view[:] = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (REGION // 256)
        self.mem.add(mapped)
        self.region = mapped.view
        lay = split_ring_layout(SIZE)
        self.region[RING:RING + lay.total] = bytes(lay.total)
        self.driver: SplitDriverRing[int] = SplitDriverRing(
            self.mem, SIZE, GPA + RING + lay.desc_offset, GPA + RING + lay.avail_offset,
            GPA + RING + lay.used_offset, event_idx=bool(features & EVENT_IDX), reset=False)
        self.desc_at = RING + lay.desc_offset
        self.avail_at = RING + lay.avail_offset
        self.next_buf = BUFS
        self.next_table = TABLES
        self.calls, self.errs = Counting(), Counting()
        v = Vring(0, "disk", queue_factory=compiled_class())
        v.size = SIZE
        v.addresses = RingAddresses(UVA + RING + lay.desc_offset, UVA + RING + lay.avail_offset,
                                    UVA + RING + lay.used_offset)
        v.kick_nofd = True
        v.enabled = True
        v.features = features
        v.call, v.err = self.calls, self.errs
        self.area = memoryview(bytearray(inflight_region_size(1, SIZE)))
        if inflight:
            v.inflight = SplitInflight.for_queues(self.area, 1, SIZE)[0]
        v.start(self.mem)
        self.vring = v
        self.path = tmp / f"{name}.raw"
        self.path.write_bytes(bytes((i * 13 + 1) & 0xFF for i in range(256)) * (SECTORS * 2))
        self.image = RawImage(str(self.path), read_only=read_only, direct=bounce)
        if bounce:  # as in an appliance: O_DIRECT cannot pin guest memory (BAR2)
            self.image._pinnable = False
        self.dev = BlkDevice(self.image, serial="burst")
        self.dev.set_features(features | self.dev.features() & ~int(VirtioFeature.RING_PACKED))

    def close(self) -> None:
        self.image.close()
        os.close(self.fd)

    def alloc(self, n: int) -> int:
        at = self.next_buf
        self.next_buf += (n + 15) & ~15
        return at

    def add(self, req: Req) -> None:
        if req.raw is not None:
            self._raw(req.raw, req.indirect, req.beyond)
            return
        hdr = struct.pack("<IIQ", req.rtype, 0, req.sector)
        header = req.header or [(None, 16)]
        bufs: list[tuple[int, int, bool]] = []
        left = hdr
        for at, n in header:
            off = self.alloc(n) if at is None else at
            self.region[off:off + min(n, len(left))] = left[:n]
            left = left[n:]
            bufs.append((off, n, False))
        writes_data = req.rtype != OUT
        data_at = req.data_at or [None] * len(req.data)
        for n, at in zip(req.data, data_at, strict=True):
            off = self.alloc(n) if at is None else at
            bufs.append((off, n, writes_data))
        s_at, s_len = req.status
        bufs.append((self.alloc(s_len) if s_at is None else s_at, s_len, True))
        readable = [(GPA + off, n) for off, n, w in bufs if not w]
        writable = [(GPA + off, n) for off, n, w in bufs if w]
        if req.indirect:
            table = self.next_table
            self.next_table += 1024
            self.driver.add_indirect(readable, writable, 0, GPA + table)
        else:
            self.driver.add(readable, writable, 0)

    def _raw(self, descs: list[tuple[int, int, int, int]], indirect: bool,
             beyond: list[tuple[int, int, int, int]]) -> None:
        """Descriptors as given, from the driver's free list (or an indirect table)."""
        if indirect:
            table = self.next_table
            self.next_table += 1024
            for k, (off, n, flags, nxt) in enumerate(descs + beyond):
                DESC.pack_into(self.region, table + 16 * k, GPA + off if off >= 0 else HOLE,
                               n, flags, nxt)
            head = self.driver._free.pop()
            DESC.pack_into(self.region, self.desc_at + 16 * head, GPA + table, 16 * len(descs),
                           IND, 0)
        else:
            first = self.driver._free[-1]
            for off, n, flags, nxt in descs:
                i = self.driver._free.pop()
                DESC.pack_into(self.region, self.desc_at + 16 * i,
                               GPA + off if off >= 0 else HOLE, n, flags,
                               first + nxt if nxt < SIZE else nxt)  # >= SIZE: as it is
            head = first
        self.driver._publish(head, 0, [head])

    def state(self) -> dict[str, object]:
        q = self.vring.queue
        tracker = self.vring.inflight
        return {
            "memory": bytes(self.region),
            "image": self.path.read_bytes(),
            "inflight": bytes(self.area),
            "counter": getattr(tracker, "_counter", None),
            "position": None if q is None else (q.last_avail_idx, q.used_idx),
            "failed": self.vring.failed,
            "calls": self.calls.count,
            "missed call": self.vring.missed_call,
            "errs": self.errs.count,
        }


def run(tmp: Path, reqs: list[Req], compiled: bool, *, features: int = BASE | EVENT_IDX,
        inflight: bool = True, read_only: bool = False, bounce: bool = False,
        busy_poll_us: float = 0.0, prepare: Callable[[Rig], None] | None = None,
        call: bool = True) -> tuple[dict[str, object], Rig]:
    rig = Rig(tmp, "compiled" if compiled else "python", features=features, inflight=inflight,
              read_only=read_only, bounce=bounce)
    if not call:  # SET_VRING_CALL not sent (yet): notifications are remembered instead
        rig.vring.call = None
    try:
        for req in reqs:
            rig.add(req)
        if prepare is not None:
            prepare(rig)
        rig.dev._serve_burst = serve_burst() if compiled else None
        rig.dev.busy_poll_us = busy_poll_us
        try:
            rig.dev.process(rig.vring)
            outcome: object = None
        except Exception as exc:
            outcome = (type(exc), str(exc))
        state = rig.state()
        state["outcome"] = outcome
        return state, rig
    finally:
        rig.close()


def same(tmp: Path, reqs: list[Req], **kw: object) -> dict[str, object]:
    """Run both ways; assert identical results; the compiled run's state."""
    ref, _ = run(tmp, reqs, False, **kw)  # type: ignore[arg-type]
    got, _ = run(tmp, reqs, True, **kw)  # type: ignore[arg-type]
    for key in ref:
        assert got[key] == ref[key], f"{key} differs from the Python loop's"
    return got


def reads(n: int, **kw: object) -> list[Req]:
    return [Req(IN, (k * 8) % SECTORS, **kw) for k in range(n)]  # type: ignore[arg-type]


def writes(n: int, **kw: object) -> list[Req]:
    return [Req(OUT, (k * 8 + 4) % SECTORS, **kw) for k in range(n)]  # type: ignore[arg-type]


# Offsets of the first few buffers a scenario allocates (headers are 16 bytes,
# 4 KiB data, status bytes padded to 16): what the overlap scenarios aim at.
FIRST_HDR, FIRST_DATA = BUFS, BUFS + 16
SECOND_HDR = BUFS + 16 + 4096 + 16
#: Where the overlap scenarios put a later request's header over an earlier one's buffer.
LATER = 0xA_0000

SCENARIOS: dict[str, list[Req]] = {
    "reads over two groups": reads(20),
    "writes over two groups": writes(20),
    "mixed, indirect, several segments": [
        Req(IN, 0, [512, 1024, 2560], indirect=True), Req(OUT, 16, [4096, 512], indirect=True),
        Req(IN, 40, [512]), Req(OUT, 60, [1024, 1024, 2048]), Req(IN, 100, [8192])],
    "a flush in the middle": [*reads(3), Req(FLUSH, 0, []), *writes(3)],
    "get id and an unsupported type": [Req(GET_ID, 0, [20]), Req(9, 0, [512]), *reads(2)],
    "read past the end": [*reads(2), Req(IN, SECTORS - 4, [4096]), *reads(2)],
    "read at the last sector": [Req(IN, SECTORS - 1, [512])],
    "a huge sector": [Req(IN, 1 << 60, [512]), Req(OUT, (1 << 64) - 1, [512])],
    "not whole sectors": [Req(IN, 0, [100]), Req(OUT, 0, [513]), *reads(1)],
    "no data": [Req(IN, 0, []), Req(OUT, 0, [])],
    "header over two buffers": [Req(IN, 8, header=[(None, 8), (None, 8)]), *reads(1)],
    "header with data in its buffer": [Req(OUT, 8, [], header=[(None, 16 + 512)]), *writes(1)],
    "status with data in its buffer": [Req(IN, 8, [512], status=(None, 2)), *reads(1)],
    "data read into the next request's header": [
        Req(IN, 0, [4096]), Req(OUT, 8, [512]),
        Req(IN, 16, [512], data_at=[SECOND_HDR - 256])],
    "data read over the descriptor table": [
        Req(IN, 0, [4096]), Req(IN, 8, [4096], data_at=[RING])],
    "data read over its own indirect table": [
        Req(IN, 0, [4096], indirect=True, data_at=[TABLES])],
    "status over the avail ring": [
        *reads(1), Req(IN, 8, [512], status=(RING + 0x400 + 4, 1)), *reads(1)],
    "status over the next header": [
        Req(IN, 0, [4096], status=(SECOND_HDR + 3, 1)), Req(IN, 8, [4096])],
    "two reads into the same buffer": [
        Req(IN, 0, [4096], data_at=[0x9_0000]), Req(IN, 8, [4096], data_at=[0x9_0000])],
    "write then read of the same sectors": [
        Req(OUT, 12, [4096]), Req(IN, 12, [4096]), Req(OUT, 12, [512]), Req(IN, 12, [4096])],
    "readable after writable": [*reads(1), Req(raw=[
        (BUFS + 0x8000, 16, N, 1), (BUFS + 0x8100, 512, W | N, 2), (BUFS + 0x8400, 512, N, 3),
        (BUFS + 0x8800, 1, W, 0)])],
    "a chain that loops": [*reads(1), Req(raw=[
        (BUFS + 0x8000, 16, N, 1), (BUFS + 0x8100, 512, W | N, 0)])],
    "a buffer outside memory": [*reads(1), Req(raw=[
        (BUFS + 0x8000, 16, N, 1), (-1, 512, W | N, 2), (BUFS + 0x8800, 1, W, 0)])],
    "a zero-length buffer": [*reads(1), Req(raw=[
        (BUFS + 0x8000, 16, N, 1), (BUFS + 0x8100, 0, W | N, 2), (BUFS + 0x8200, 512, W | N, 3),
        (BUFS + 0x8800, 1, W, 0)]), *reads(1)],
    "nested indirect": [*reads(1), Req(indirect=True, raw=[
        (BUFS + 0x8000, 16, N, 1), (TABLES + 0x4000, 32, IND, 0)])],
    "indirect and next": [*reads(1), Req(raw=[(TABLES + 0x4000, 48, IND | N, 1),
                                             (BUFS + 0x8800, 1, W, 0)])],
    "data read into a later request's header": [
        Req(IN, 0, [4096], data_at=[LATER]), Req(OUT, 8, [512], header=[(LATER + 512, 16)])],
    "data read over the end of a later request's header": [
        Req(IN, 0, [512], data_at=[LATER + 8]), Req(OUT, 8, [512], header=[(LATER, 16)])],
    "status written over a later request's header": [
        Req(IN, 0, [4096], status=(LATER, 1)), Req(OUT, 8, [512], header=[(LATER, 16)])],
    "data written out from a later request's status": [
        Req(OUT, 0, [4096], data_at=[LATER]), Req(IN, 8, [512], status=(LATER + 7, 1))],
    "an indirect next past its table": [*reads(1), Req(indirect=True, raw=[
        (BUFS + 0x8000, 16, N, 1), (BUFS + 0x8100, 512, W | N, 2)],
        beyond=[(BUFS + 0x8800, 1, W, 0)])],
    "a ring next past the ring": [*reads(1), Req(raw=[
        (BUFS + 0x8000, 16, N, 1), (BUFS + 0x8100, 512, W | N, SIZE)])],
    "no status byte": [*reads(2), Req(raw=[(BUFS + 0x8000, 16, N, 1),
                                          (BUFS + 0x8100, 512, 0, 0)]), *reads(1)],
}


@pytest.fixture(autouse=True)
def _built() -> None:
    serve_burst()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("setup", ["event-idx+inflight", "plain", "bounce", "read-only"])
def test_same_outcome_as_the_python_loop(tmp_path: Path, name: str, setup: str) -> None:
    kw: dict[str, object] = {
        "event-idx+inflight": {},
        "plain": {"features": BASE, "inflight": False},
        "bounce": {"bounce": True},
        "read-only": {"read_only": True},
    }[setup]
    same(tmp_path, SCENARIOS[name], **kw)


@pytest.mark.parametrize("features", [BASE | EVENT_IDX, BASE])
def test_no_call_notifier_is_remembered_as_a_missed_call(tmp_path: Path, features: int) -> None:
    got = same(tmp_path, reads(3), features=features, call=False)
    assert got["missed call"] is True


@pytest.mark.parametrize("features", [BASE | EVENT_IDX, BASE])
def test_a_driver_that_wants_no_interrupts_gets_none(tmp_path: Path, features: int) -> None:
    def quiet(rig: Rig) -> None:
        rig.driver.disable_interrupts()

    got = same(tmp_path, reads(20), features=features, prepare=quiet)
    if not features & EVENT_IDX:  # NO_INTERRUPT is only a hint with EVENT_IDX off
        assert got["calls"] == 0


class Bell(Notifier):
    """A call whose register() is a word in a bytearray; signal() must not be used."""

    def __init__(self) -> None:
        self.window = memoryview(bytearray(16))

    def register(self) -> tuple[memoryview, int, int]:
        return self.window, 2, 0xABCD_0001

    def signal(self) -> None:
        raise AssertionError("signal() called although the doorbell register was given")


def test_a_doorbell_register_is_stored_to_instead_of_signal(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "bell", features=BASE | EVENT_IDX, inflight=True)
    try:
        bell = Bell()
        rig.vring.call = bell
        for req in reads(3):
            rig.add(req)
        rig.dev._serve_burst = serve_burst()
        rig.dev.process(rig.vring)
        assert bytes(bell.window[8:12]) == (0xABCD_0001).to_bytes(4, "little")
        assert len(rig.driver.get_used()) == 3
        q = rig.vring.queue
        assert q is not None and q._signalled_used == 3  # type: ignore[attr-defined]
        # should_notify's state went back to the ring: nothing new, no notification.
        assert not q.should_notify()
    finally:
        rig.close()


def test_indirect_without_the_feature(tmp_path: Path) -> None:
    same(tmp_path, reads(2, indirect=True), features=int(VirtioFeature.VERSION_1))


def test_an_avail_index_jump(tmp_path: Path) -> None:
    def jump(rig: Rig) -> None:
        rig.region[rig.avail_at + 2:rig.avail_at + 4] = struct.pack("<H", SIZE + 5)

    got = same(tmp_path, reads(2), prepare=jump)
    assert got["outcome"] is not None  # the ring's RingError, from split.py


def test_a_head_past_the_ring(tmp_path: Path) -> None:
    def bad_head(rig: Rig) -> None:
        struct.pack_into("<H", rig.region, rig.avail_at + 4 + 2, SIZE + 1)

    same(tmp_path, reads(3), prepare=bad_head)


def test_busy_polling_ends_with_kicks_on(tmp_path: Path) -> None:
    for features in (BASE | EVENT_IDX, BASE):
        same(tmp_path, [*reads(3), *writes(2)], features=features, busy_poll_us=2000.0)


def test_dirty_logging_rings_are_left_to_python(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "log", features=BASE | EVENT_IDX, inflight=True)
    try:
        rig.vring.queue.log_all = True  # type: ignore[union-attr]
        rig.dev._serve_burst = serve_burst()
        assert rig.dev._burst_args(rig.vring) is None
        rig.vring.queue.log_all = False  # type: ignore[union-attr]
        assert rig.dev._burst_args(rig.vring) is not None
    finally:
        rig.close()


# --- the compiled loop does the common requests itself ---------------------------------

def counted(rig: Rig) -> dict[str, int]:
    """Count Python serve() calls and serve_burst results while the rig runs."""
    seen = {"serve": 0, "burst": 0, "deferred": 0}
    serve = rig.dev.serve
    burst = serve_burst()

    def counting_serve(chain: object) -> int:
        seen["serve"] += 1
        return serve(chain)  # type: ignore[arg-type]

    def counting_burst(*args: object) -> tuple[int, int]:
        served, why = burst(*args)  # type: ignore[arg-type]
        seen["burst"] += served
        seen["deferred"] += why == device_mod.BURST_DEFER
        return served, why

    rig.dev.serve = counting_serve  # type: ignore[method-assign]
    rig.dev._serve_burst = counting_burst
    return seen


@pytest.mark.parametrize("inflight", [True, False])
@pytest.mark.parametrize("bounce", [False, True])
@pytest.mark.parametrize("features", [BASE | EVENT_IDX, BASE])
def test_linux_requests_never_reach_python(tmp_path: Path, inflight: bool, bounce: bool,
                                           features: int) -> None:
    rig = Rig(tmp_path, "guard", features=features, inflight=inflight, bounce=bounce)
    try:
        reqs = [*reads(8), *writes(8), *reads(5, indirect=True, data=[512, 3584])]
        for req in reqs:
            rig.add(req)
        seen = counted(rig)
        rig.dev.process(rig.vring)
        assert seen == {"serve": 0, "burst": 21, "deferred": 0}
        assert len(rig.driver.get_used()) == 21
        assert rig.calls.count >= 1
        if inflight:  # every record cleared, the used idx recorded
            tracker = rig.vring.inflight
            assert isinstance(tracker, SplitInflight)
            assert tracker._counter == 22
            assert tracker.pending(21) == []
    finally:
        rig.close()


def test_write_through_writes_are_left_to_python(tmp_path: Path) -> None:
    """With the write cache off (CONFIG_WCE) a write must reach the image durably:
    RawImage's path (dsync), not the compiled one."""
    rig = Rig(tmp_path, "wt", features=BASE | EVENT_IDX, inflight=True)
    try:
        rig.dev.set_config(blk.CONFIG_WRITEBACK_OFFSET, b"\0")
        for req in [*writes(3), *reads(2)]:
            rig.add(req)
        seen = counted(rig)
        rig.dev.process(rig.vring)
        assert seen["serve"] == 3 + 2 and seen["burst"] == 0  # one group, left whole
        assert len(rig.driver.get_used()) == 5
    finally:
        rig.close()


def test_hostile_chains_reach_the_loop_and_are_handed_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path, "guard", features=BASE | EVENT_IDX, inflight=True)
    try:
        for req in SCENARIOS["data read into the next request's header"]:
            rig.add(req)
        seen = counted(rig)
        rig.dev.process(rig.vring)
        # All three chains of the group go to Python: overlaps are judged per group.
        assert seen == {"serve": 3, "burst": 0, "deferred": 1}
    finally:
        rig.close()


def test_a_failed_transfer_is_redone_by_python(tmp_path: Path) -> None:
    def shrink(rig: Rig) -> None:  # the file shrank under us: reads past its end come up short
        os.truncate(rig.path, 64 * 512)

    got = same(tmp_path, [Req(IN, 0, [4096]), Req(IN, 100, [4096]), Req(IN, 8, [4096])],
               prepare=shrink)
    assert got["outcome"] is None


# --- busy polling in C -----------------------------------------------------------------

def test_a_request_published_while_spinning_is_served_in_the_same_call(tmp_path: Path) -> None:
    """The C spin holds the GIL, so the driver is another process writing the ring's
    shared memory (as a guest would)."""
    rig = Rig(tmp_path, "spin", features=BASE | EVENT_IDX, inflight=True)
    try:
        rig.add(Req(IN, 0, [4096]))
        seen = counted(rig)
        rig.dev.busy_poll_us = 500_000.0
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                time.sleep(0.1)
                rig.add(Req(OUT, 8, [4096]))
            finally:
                os._exit(0)
        start = time.monotonic()
        rig.dev.process(rig.vring)
        took = time.monotonic() - start
        os.waitpid(pid, 0)
        assert seen["serve"] == 0 and seen["burst"] == 2
        lay = split_ring_layout(SIZE)
        used_idx = struct.unpack_from("<H", rig.region, RING + lay.used_offset + 2)[0]
        assert used_idx == 2  # (the child's chain is unknown to this driver object)
        assert took >= 0.5  # the window after the second request passed too
        q = rig.vring.queue
        # Kicks are back on: avail_event asks for the next index.
        avail_event = struct.unpack_from("<H", rig.region,
                                         RING + lay.used_offset + 4 + 8 * SIZE)[0]
        assert q is not None and avail_event == q.last_avail_idx == 2
    finally:
        rig.close()


# --- random chains ------------------------------------------------------------------------

buffer_len = st.sampled_from([1, 8, 16, 100, 512, 1024, 4096, 4097])
offsets = st.one_of(st.none(), st.sampled_from(
    [FIRST_HDR, FIRST_DATA, SECOND_HDR, SECOND_HDR + 8, RING, RING + 0x400, TABLES, 0x9_0000,
     LATER, LATER + 4, LATER + 512]))


@st.composite
def requests(draw: st.DrawFn) -> Req:
    rtype = draw(st.sampled_from([IN, IN, IN, OUT, OUT, FLUSH, GET_ID, 7]))
    n = draw(st.integers(0, 3))
    data = [draw(buffer_len) for _ in range(n)]
    return Req(
        rtype, draw(st.one_of(st.integers(0, SECTORS + 8), st.just((1 << 64) - 1))), data,
        indirect=draw(st.booleans()),
        header=draw(st.sampled_from([None, None, [(None, 8), (None, 8)], [(None, 16 + 512)],
                                     [(LATER, 16)], [(LATER + 512, 16)]])),
        status=(draw(offsets), draw(st.sampled_from([1, 1, 1, 2]))),
        data_at=[draw(offsets) for _ in range(n)] if draw(st.booleans()) else None)


@settings(max_examples=int(os.environ.get("VVU_BURST_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(requests(), min_size=1, max_size=20), event_idx=st.booleans(),
       inflight=st.booleans())
def test_random_requests(tmp_path: Path, reqs: list[Req], event_idx: bool,
                         inflight: bool) -> None:
    same(tmp_path, reqs, features=BASE | (EVENT_IDX if event_idx else 0), inflight=inflight)


def test_the_loop_benchmark_runs_all_three_loops(tmp_path: Path) -> None:
    """benchmarks/blk_loop.py, briefly, in its own process (with the compiled path on,
    whatever this run forces)."""
    env = {k: v for k, v in os.environ.items() if k != "VVU_PURE_PYTHON"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "blk_loop.py"),
                          "--seconds", "0.05", "--depths", "1,4"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"QD1", "QD4"}, out.stdout
    for cells in rows.values():
        assert len(cells) == 5 and all(float(c) > 0 for c in cells), out.stdout
