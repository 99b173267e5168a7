"""BlkDevice against a fake vring whose chains are memoryviews of bytearrays."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vvu_runtime.backends.blk import device as device_mod
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.virtio.blk import (
    ID_BYTES,
    BlkConfig,
    BlkRequestHeader,
    BlkSegment,
    Feature,
    RequestType,
    Status,
)
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.queue import DescriptorChain

SECTORS = 64  # 32 KiB image


class FakeVring:
    """Just what BlkDevice uses of vhost_user.vring.Vring."""

    def __init__(self, chains: list[DescriptorChain], index: int = 0) -> None:
        self.index = index
        self.enabled = True
        self.available = list(chains)
        self.pushed: list[tuple[DescriptorChain, int]] = []
        self.notified = 0
        self.failed: list[BaseException] = []
        self.suppressions: list[bool] = []  # kick_suppression() calls, in order
        #: No ring of its own: BlkDevice.process() runs its Python loop over it.
        self.tracked_queue = None

    def pop(self) -> DescriptorChain | None:
        return self.available.pop(0) if self.available else None

    def push(self, chain: DescriptorChain, written: int) -> None:
        self.pushed.append((chain, written))

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        chains = []
        while len(chains) < limit and (chain := self.pop()) is not None:
            chains.append(chain)
        return chains

    def push_many(self, completions: list[tuple[DescriptorChain, int]]) -> None:
        for chain, written in completions:
            self.push(chain, written)

    def notify(self) -> None:
        self.notified += 1

    def has_available(self) -> bool:
        return bool(self.available)

    def kick_suppression(self, suppress: bool) -> bool:
        self.suppressions.append(suppress)
        return bool(self.available)  # re-reads the ring, as the real one does

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)
        self.available.clear()


def views(*sizes: int) -> list[memoryview]:
    return [memoryview(bytearray(n)) for n in sizes]


def header(rtype: int, sector: int = 0) -> memoryview:
    return memoryview(bytearray(BlkRequestHeader(rtype, 0, sector).pack()))


def request(rtype: int, sector: int = 0, *, out: list[memoryview] | None = None,
            into: list[memoryview] | None = None, head: int = 0) -> DescriptorChain:
    """A chain in the layout Linux uses: header, OUT data | IN data, status."""
    return DescriptorChain(head=head, readable=[header(rtype, sector), *(out or [])],
                           writable=[*(into or []), *views(1)])


def status(chain: DescriptorChain) -> int:
    return chain.writable[-1][-1]


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


@pytest.fixture
def device(image_path: Path) -> Iterator[BlkDevice]:
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image, serial="vvu-serial-1")
        dev.set_features(dev.features())
        yield dev


def run(dev: BlkDevice, *chains: DescriptorChain) -> FakeVring:
    vring = FakeVring(list(chains))
    dev.process(vring)  # type: ignore[arg-type]
    return vring


# --- features and config ---------------------------------------------------------------

def test_features_and_config(device: BlkDevice) -> None:
    feats = device.features()
    for f in (Feature.SIZE_MAX, Feature.SEG_MAX, Feature.BLK_SIZE, Feature.TOPOLOGY,
              Feature.FLUSH, Feature.DISCARD, Feature.WRITE_ZEROES, Feature.CONFIG_WCE):
        assert feats & f.mask, f
    assert not feats & Feature.RO.mask
    assert not feats & Feature.MQ.mask
    for f in (VirtioFeature.VERSION_1, VirtioFeature.EVENT_IDX, VirtioFeature.INDIRECT_DESC,
              VirtioFeature.RING_PACKED):
        assert feats & f, f
    cfg = BlkConfig.unpack(device.get_config(0, 72))
    assert cfg.capacity == SECTORS
    assert cfg.blk_size == 512 and cfg.seg_max > 0 and cfg.size_max > 0
    assert cfg.writeback == 1 and cfg.num_queues == 1
    assert cfg.max_discard_seg > 0 and cfg.max_write_zeroes_seg > 0
    assert cfg.write_zeroes_may_unmap == 1
    # Partial reads, and reads past the end, as QEMU may ask for them.
    assert device.get_config(0, 8) == struct.pack("<Q", SECTORS)
    assert device.get_config(60, 40)[12:] == bytes(28)


def test_multiqueue_features(image_path: Path) -> None:
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image, queues=4)
        assert dev.num_queues() == 4
        assert dev.features() & Feature.MQ.mask
        assert BlkConfig.unpack(dev.get_config(0, 60)).num_queues == 4


def test_read_only_features(image_path: Path) -> None:
    with RawImage(str(image_path), read_only=True) as image:
        dev = BlkDevice(image)
        feats = dev.features()
        assert feats & Feature.RO.mask
        assert not feats & (Feature.DISCARD.mask | Feature.WRITE_ZEROES.mask)


# --- READ / WRITE ------------------------------------------------------------------------

def test_read(device: BlkDevice, image_path: Path) -> None:
    chain = request(RequestType.IN, 2, into=views(512, 1024))
    vring = run(device, chain)
    assert vring.pushed == [(chain, 1537)] and vring.notified == 1
    assert status(chain) == Status.OK
    expected = image_path.read_bytes()[1024:1024 + 1536]
    assert bytes(chain.writable[0]) + bytes(chain.writable[1]) == expected


def test_read_data_and_status_in_one_buffer(device: BlkDevice, image_path: Path) -> None:
    chain = DescriptorChain(head=3, readable=[header(RequestType.IN, 1)], writable=views(513))
    run(device, chain)
    assert status(chain) == Status.OK
    assert bytes(chain.writable[0][:512]) == image_path.read_bytes()[512:1024]


def test_write_then_read(device: BlkDevice, image_path: Path) -> None:
    data = memoryview(bytearray(b"\xa5" * 1024))
    w = request(RequestType.OUT, 4, out=[data])
    r = request(RequestType.IN, 4, into=views(1024))
    vring = run(device, w, r)
    assert [s for _, s in vring.pushed] == [1, 1025]
    assert status(w) == status(r) == Status.OK
    assert bytes(r.writable[0]) == bytes(data)
    assert image_path.read_bytes()[2048:3072] == bytes(data)
    assert vring.notified == 1  # one notify per batch


def test_write_header_merged_with_data(device: BlkDevice, image_path: Path) -> None:
    buf = bytearray(BlkRequestHeader(RequestType.OUT, 0, 1).pack() + b"\x11" * 512)
    chain = DescriptorChain(head=0, readable=[memoryview(buf)], writable=views(1))
    run(device, chain)
    assert status(chain) == Status.OK
    assert image_path.read_bytes()[512:1024] == b"\x11" * 512


def test_write_header_split_over_descriptors(device: BlkDevice, image_path: Path) -> None:
    raw = BlkRequestHeader(RequestType.OUT, 0, 3).pack() + b"\x22" * 512
    parts = [raw[:10], raw[10:20], raw[20:]]
    chain = DescriptorChain(head=0, readable=[memoryview(bytearray(p)) for p in parts],
                            writable=views(1))
    run(device, chain)
    assert status(chain) == Status.OK
    assert image_path.read_bytes()[1536:2048] == b"\x22" * 512


@pytest.mark.parametrize("sector,length", [(SECTORS - 1, 1024), (SECTORS, 512), (1 << 60, 512)])
def test_beyond_capacity_is_ioerr(device: BlkDevice, sector: int, length: int,
                                  caplog: pytest.LogCaptureFixture) -> None:
    r = request(RequestType.IN, sector, into=views(length))
    w = request(RequestType.OUT, sector, out=views(length))
    with caplog.at_level(logging.WARNING):
        run(device, r, w)
    assert status(r) == status(w) == Status.IOERR
    assert "beyond capacity" in caplog.text and "disk " in caplog.text


def test_last_sector_is_readable(device: BlkDevice) -> None:
    chain = request(RequestType.IN, SECTORS - 1, into=views(512))
    run(device, chain)
    assert status(chain) == Status.OK


def test_partial_sector_is_ioerr(device: BlkDevice) -> None:
    r = request(RequestType.IN, 0, into=views(100))
    w = request(RequestType.OUT, 0, out=views(513))
    run(device, r, w)
    assert status(r) == status(w) == Status.IOERR


def test_wrong_direction_is_ioerr(device: BlkDevice, image_path: Path) -> None:
    before = image_path.read_bytes()
    r = request(RequestType.IN, 0, out=views(512), into=views(512))
    w = request(RequestType.OUT, 0, out=views(512), into=views(512))
    vring = run(device, r, w)
    assert status(r) == status(w) == Status.IOERR
    assert len(vring.pushed) == 2
    assert image_path.read_bytes() == before


def test_read_only_rejects_writes(image_path: Path) -> None:
    before = image_path.read_bytes()
    with RawImage(str(image_path), read_only=True) as image:
        dev = BlkDevice(image)
        dev.set_features(dev.features())
        w = request(RequestType.OUT, 0, out=views(512))
        r = request(RequestType.IN, 0, into=views(512))
        f = request(RequestType.FLUSH)
        d = request(RequestType.DISCARD, out=[memoryview(bytearray(BlkSegment(0, 1).pack()))])
        run(dev, w, r, f, d)
        assert status(w) == Status.IOERR
        assert status(r) == Status.OK
        assert status(f) == Status.OK
        assert status(d) == Status.UNSUPP  # DISCARD is not offered on a read-only disk
    assert image_path.read_bytes() == before


def test_io_error_is_ioerr(device: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(device.image, "readv", broken)
    monkeypatch.setattr(device_mod, "_preadv", broken)  # the fast path's own syscall
    # The compiled fast path (when built) makes its own preadv on device._fd: a
    # write-only fd makes that one fail too (EBADF), so it must hand over as well.
    wronly = os.open(os.devnull, os.O_WRONLY)
    monkeypatch.setattr(device, "_fd", wronly)
    try:
        chain = request(RequestType.IN, 0, into=views(512))
        vring = run(device, chain)
    finally:
        os.close(wronly)
    assert status(chain) == Status.IOERR and len(vring.pushed) == 1


# --- FLUSH, GET_ID, unsupported ------------------------------------------------------------

def test_flush_calls_fdatasync(device: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    chain = request(RequestType.FLUSH)
    run(device, chain)
    assert status(chain) == Status.OK
    assert synced == [device.image.fd]


def test_get_id(device: BlkDevice) -> None:
    chain = request(RequestType.GET_ID, into=views(ID_BYTES))
    vring = run(device, chain)
    assert status(chain) == Status.OK
    assert bytes(chain.writable[0]) == b"vvu-serial-1".ljust(ID_BYTES, b"\0")
    assert vring.pushed[0][1] == ID_BYTES + 1


def test_get_id_short_buffer_and_long_serial(image_path: Path) -> None:
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image, serial="x" * 30)
        short = request(RequestType.GET_ID, into=views(8))
        full = request(RequestType.GET_ID, into=views(ID_BYTES))
        run(dev, short, full)
        assert bytes(short.writable[0]) == b"x" * 8
        assert bytes(full.writable[0]) == b"x" * ID_BYTES  # not NUL-terminated when full


@pytest.mark.parametrize("rtype", [RequestType.GET_LIFETIME, RequestType.SECURE_ERASE, 2, 5, 99,
                                   0x80000001])
def test_unsupported_types(device: BlkDevice, rtype: int) -> None:
    chain = request(rtype, into=views(8))
    run(device, chain)
    assert status(chain) == Status.UNSUPP


# --- DISCARD and WRITE_ZEROES -----------------------------------------------------------------

def segments(*segs: BlkSegment) -> list[memoryview]:
    return [memoryview(bytearray(b"".join(s.pack() for s in segs)))]


def test_discard_reads_back_zero_or_old(device: BlkDevice, image_path: Path) -> None:
    chain = request(RequestType.DISCARD, out=segments(BlkSegment(8, 8), BlkSegment(32, 8)))
    run(device, chain)
    assert status(chain) == Status.OK
    data = image_path.read_bytes()
    assert len(data) == SECTORS * 512  # the image keeps its size
    # Punched (zero) on file systems with holes; unchanged where discard is a no-op.
    assert data[4096:8192] in (bytes(4096), (bytes(range(256)) * 16))


def test_discard_with_flags_is_unsupp(device: BlkDevice) -> None:
    chain = request(RequestType.DISCARD, out=segments(BlkSegment(0, 8, 1)))
    run(device, chain)
    assert status(chain) == Status.UNSUPP


def test_discard_not_negotiated_is_unsupp(device: BlkDevice) -> None:
    device.set_features(device.features() & ~Feature.DISCARD.mask)
    chain = request(RequestType.DISCARD, out=segments(BlkSegment(0, 8)))
    run(device, chain)
    assert status(chain) == Status.UNSUPP


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(device: BlkDevice, image_path: Path, unmap: int) -> None:
    chain = request(RequestType.WRITE_ZEROES,
                    out=segments(BlkSegment(1, 3, unmap), BlkSegment(10, 1, unmap)))
    run(device, chain)
    assert status(chain) == Status.OK
    data = image_path.read_bytes()
    assert data[512:2048] == bytes(1536)
    assert data[5120:5632] == bytes(512)
    assert data[2048:2560] == bytes(range(256)) * 2  # untouched neighbour
    assert len(data) == SECTORS * 512


@pytest.mark.parametrize("payload,expected", [
    (segments(BlkSegment(SECTORS - 1, 2)), Status.IOERR),          # beyond capacity
    ([memoryview(bytearray(15))], Status.IOERR),                    # not whole segments
    ([], Status.IOERR),                                              # no segment at all
    (segments(*[BlkSegment(0, 1)] * 33), Status.IOERR),              # too many segments
    (segments(BlkSegment(0, 1 << 17)), Status.IOERR),                # too many sectors
    (segments(BlkSegment(0, 1, 2)), Status.UNSUPP),                  # unknown flag
])
def test_write_zeroes_rejects(device: BlkDevice, image_path: Path,
                              payload: list[memoryview], expected: Status) -> None:
    before = image_path.read_bytes()
    chain = request(RequestType.WRITE_ZEROES, out=payload)
    run(device, chain)
    assert status(chain) == expected
    assert image_path.read_bytes() == before  # nothing applied when any segment is bad


# --- bad chains, batching, ring state ------------------------------------------------------

def test_no_status_byte_fails_the_ring(device: BlkDevice) -> None:
    good = request(RequestType.IN, 0, into=views(512))
    bad = DescriptorChain(head=1, readable=[header(RequestType.IN)], writable=[])
    never = request(RequestType.IN, 0, into=views(512))
    vring = run(device, good, bad, never)
    assert len(vring.failed) == 1
    assert [c for c, _ in vring.pushed] == [good]
    assert vring.notified == 1  # the good completion is still announced


def test_short_header_fails_the_ring(device: BlkDevice) -> None:
    bad = DescriptorChain(head=0, readable=[memoryview(bytearray(8))], writable=views(1))
    vring = run(device, bad)
    assert vring.failed and not vring.pushed and vring.notified == 0


def test_no_header_fails_the_ring(device: BlkDevice) -> None:
    vring = run(device, DescriptorChain(head=0, readable=[], writable=views(1)))
    assert vring.failed


def test_disabled_ring_is_left_alone(device: BlkDevice) -> None:
    vring = FakeVring([request(RequestType.IN, 0, into=views(512))])
    vring.enabled = False
    device.process(vring)  # type: ignore[arg-type]
    assert len(vring.available) == 1 and not vring.pushed


def test_empty_ring_does_not_notify(device: BlkDevice) -> None:
    assert run(device).notified == 0


def test_pop_error_still_notifies(device: BlkDevice) -> None:
    good = request(RequestType.IN, 0, into=views(512))
    vring = FakeVring([good])
    real_pop = vring.pop

    def pop() -> DescriptorChain | None:
        if vring.pushed:
            raise RuntimeError("hostile ring")
        return real_pop()

    vring.pop = pop  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        device.process(vring)  # type: ignore[arg-type]
    assert vring.notified == 1


# --- write cache ---------------------------------------------------------------------------

def test_write_through_after_config_write(device: BlkDevice,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = device.image.writev

    def spy(buffers: list[memoryview], offset: int, *, dsync: bool = False) -> None:
        calls.append(dsync)
        real(buffers, offset, dsync=dsync)

    monkeypatch.setattr(device.image, "writev", spy)
    run(device, request(RequestType.OUT, 0, out=views(512)))
    assert True not in calls  # writeback: no per-write sync (fast path or dsync=False)
    device.set_config(32, b"\0")
    assert not device.writeback
    assert BlkConfig.unpack(device.get_config(0, 60)).writeback == 0
    calls.clear()
    run(device, request(RequestType.OUT, 0, out=views(512)))
    assert calls == [True]
    device.reset()  # a reconnecting QEMU does not repeat SET_CONFIG: the choice stays
    assert not device.writeback


def test_config_write_without_wce_is_ignored(device: BlkDevice) -> None:
    device.set_features(device.features() & ~Feature.CONFIG_WCE.mask)
    device.set_config(32, b"\0")
    assert device.writeback
    device.set_features(device.features())
    device.set_config(0, b"\0" * 8)  # capacity is read-only
    assert device.capacity == SECTORS


def test_fast_path_short_transfer_falls_back(device: BlkDevice, image_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "_preadv", lambda fd, bufs, off: 0)
    monkeypatch.setattr(device_mod, "_pwritev", lambda fd, bufs, off: 100)
    w = request(RequestType.OUT, 1, out=[memoryview(bytearray(b"\x42" * 512))])
    r = request(RequestType.IN, 1, into=views(512))
    run(device, w, r)
    assert status(w) == status(r) == Status.OK
    assert bytes(r.writable[0]) == b"\x42" * 512
    assert image_path.read_bytes()[512:1024] == b"\x42" * 512


def test_long_batches_notify_every_few_completions(device: BlkDevice) -> None:
    chains = [request(RequestType.IN, 0, into=views(512)) for _ in range(40)]
    vring = run(device, *chains)
    assert len(vring.pushed) == 40
    assert vring.notified == 3  # after 16, after 32, and at the end


def test_busy_ring_is_polled_briefly(device: BlkDevice) -> None:
    """After a busy drain finds the ring empty, requests arriving within poll_us are
    served in the same call (no kick, no wakeup); an idle ring is not polled."""
    late = [request(RequestType.IN, 0, into=views(512)) for _ in range(3)]
    vring = FakeVring([request(RequestType.IN, 0, into=views(512)) for _ in range(16)])
    real_has = vring.has_available
    polls = 0

    def has_available() -> bool:
        nonlocal polls
        polls += 1
        if polls == 5:  # the driver publishes more while we spin
            vring.available.extend(late)
        return real_has()

    vring.has_available = has_available  # type: ignore[method-assign]
    device.poll_us = 50
    device.process(vring)  # type: ignore[arg-type]
    assert len(vring.pushed) == 19

    quiet = FakeVring([request(RequestType.IN, 0, into=views(512))])
    quiet.has_available = lambda: pytest.fail("an idle ring must not be polled")  # type: ignore[method-assign]
    device.process(quiet)  # type: ignore[arg-type]
    assert len(quiet.pushed) == 1

    device.poll_us = 0
    vring = FakeVring([request(RequestType.IN, 0, into=views(512)) for _ in range(16)])
    vring.has_available = lambda: pytest.fail("polling is off")  # type: ignore[method-assign]
    device.process(vring)  # type: ignore[arg-type]


def _arriving(vring: FakeVring, late: dict[int, list[DescriptorChain]]) -> list[int]:
    """Make ``vring.has_available`` publish ``late[n]`` on its n-th call (the driver
    submitting while we poll); returns the list that counts the calls."""
    real_has = vring.has_available
    calls = [0]

    def has_available() -> bool:
        calls[0] += 1
        vring.available.extend(late.pop(calls[0], []))
        return real_has()

    vring.has_available = has_available  # type: ignore[method-assign]
    return calls


def test_busy_poll_serves_the_next_request_without_a_kick(device: BlkDevice) -> None:
    """QD1: after each completion the ring is polled with kicks off; a request the
    driver submits within the window is served in the same call, then kicks go
    back on once a window passes with nothing."""
    device.busy_poll_us = 2000
    vring = FakeVring([request(RequestType.IN, 0, into=views(512))])
    _arriving(vring, {3: [request(RequestType.IN, 1, into=views(512))],
                      9: [request(RequestType.IN, 2, into=views(512))]})
    device.process(vring)  # type: ignore[arg-type]
    assert len(vring.pushed) == 3 and vring.notified == 3  # each completion announced
    # off while polling, on for good at the end
    assert vring.suppressions[0] is True and vring.suppressions[-1] is False
    assert vring.suppressions.count(False) == 1


def test_busy_poll_catches_what_came_as_kicks_went_back_on(device: BlkDevice) -> None:
    """A request published between our last look and the driver seeing kicks on again
    would get no kick: re-enabling re-reads the ring and serves it."""
    device.busy_poll_us = 1  # the window passes at once
    vring = FakeVring([request(RequestType.IN, 0, into=views(512))])
    real = vring.kick_suppression

    def kick_suppression(suppress: bool) -> bool:
        if not suppress and len(vring.pushed) == 1:
            vring.available.append(request(RequestType.IN, 1, into=views(512)))
        return real(suppress)

    vring.kick_suppression = kick_suppression  # type: ignore[method-assign]
    vring.has_available = lambda: False  # type: ignore[method-assign]
    device.process(vring)  # type: ignore[arg-type]
    assert len(vring.pushed) == 2
    assert vring.suppressions[-1] is False


def test_busy_poll_is_off_by_default_and_skips_an_idle_ring(device: BlkDevice) -> None:
    assert BlkDevice.busy_poll_us == 0
    vring = run(device, request(RequestType.IN, 0, into=views(512)))
    assert vring.suppressions == [] and len(vring.pushed) == 1
    device.busy_poll_us = 2000
    idle = run(device)  # a kick with nothing to serve: no spinning
    assert idle.suppressions == []


def test_kicks_are_back_on_when_the_turn_ends_or_serving_fails(
        device: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving with kicks off would leave the ring unserved forever."""
    device.busy_poll_us = 2000
    device.turn_budget = 2
    vring = FakeVring([request(RequestType.IN, 0, into=views(512))])
    _arriving(vring, {1: [request(RequestType.IN, i, into=views(512)) for i in range(4)]})
    turns: list[object] = []
    monkeypatch.setattr(device._turns, "come_back", lambda ring: turns.append(ring) or True)
    device.process(vring)  # type: ignore[arg-type]
    assert turns == [vring] and len(vring.pushed) == 5  # our turn ended after the poll
    assert vring.suppressions == [True, False]

    device.turn_budget = 256
    real_serve = device.serve
    served = [0]

    def second_fails(chain: DescriptorChain) -> int:
        served[0] += 1
        if served[0] == 2:
            raise RuntimeError("a bug")
        return real_serve(chain)

    monkeypatch.setattr(device, "serve", second_fails)
    vring = FakeVring([request(RequestType.IN, 0, into=views(512))])
    _arriving(vring, {1: [request(RequestType.IN, 1, into=views(512))]})
    with pytest.raises(RuntimeError, match="a bug"):
        device.process(vring)  # type: ignore[arg-type]
    assert vring.suppressions == [True, False]


def test_a_trickling_driver_cannot_keep_the_loop_while_we_busy_poll(
        device: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request inside every window would keep one call busy-polling for ever;
    after busy_turn the loop gets the process back (other disks, session messages)."""
    now = [0.0]
    monkeypatch.setattr(device_mod, "_clock", lambda: now[0])
    device.busy_poll_us = 2000
    vring = FakeVring([request(RequestType.IN, 0, into=views(512))])
    real_has = vring.has_available

    def has_available() -> bool:
        now[0] += 0.001  # 1 ms passes per look: always inside the 2 ms window
        if not vring.available:
            vring.available.append(request(RequestType.IN, 0, into=views(512)))
        return real_has()

    vring.has_available = has_available  # type: ignore[method-assign]
    turns: list[object] = []
    monkeypatch.setattr(device._turns, "come_back", lambda ring: turns.append(ring) or True)
    device.process(vring)  # type: ignore[arg-type]
    assert turns == [vring]  # handed back instead of spinning on
    assert 3 <= len(vring.pushed) <= 10  # ~busy_turn (5 ms) of 1 ms requests
    assert vring.suppressions[-1] is False  # and the driver can kick us again
