"""The vfio-user server against an in-process client that does what QEMU 11.1.3 does.

The device under test mirrors the one of the experiment in
shared/reference/qemu-vfio-user-client.md: BAR0 trapped registers, BAR1 the MSI-X
table and PBA, BAR2 a 2 MiB memfd with two sparse areas and a trapped hole.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.guest_ram import sealed_memfd
from tests.support.server_thread import ServerThread
from tests.support.vfio_user_client import VfioUserClient
from vvu_runtime.device.errors import PeerHungUp, RemoteError
from vvu_runtime.device.pci import (
    Bar,
    MappedBar,
    MsixLayout,
    PciDevice,
    PciIdentity,
)
from vvu_runtime.device.vfio_user.protocol import (
    HEADER_SIZE,
    MAX_DATA_XFER_SIZE,
    Command,
    DmaMap,
    DmaUnmap,
    Header,
    IrqSetFlags,
    MsgFlags,
    PciIrq,
    PciRegion,
    RegionAccess,
    RegionFlags,
    SparseArea,
)
from vvu_runtime.device.vfio_user.server import ServerState, VfioUserServer

MiB = 1 << 20
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER  # 0x24
DISABLE = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER  # 0x21
SCRATCH, FIRE_MSIX, INTX_LEVEL = 0x800, 0x804, 0x808
HOLE = MiB


class ScratchDevice(PciDevice):
    """Test registers in BAR0, MSI-X in BAR1, a memfd with a trapped hole in BAR2."""

    def __init__(self) -> None:
        fd = os.memfd_create("vvu-test-bar2", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * MiB)
        os.pwrite(fd, b"HELLO-FROM-BAR2-area0", 0)
        os.pwrite(fd, b"SECOND-SPARSE-AREA", HOLE + 0x1000)
        bar0 = Bar(0, 0x1000, name="regs")
        bar1 = Bar(1, 0x1000, name="msix")
        bar2 = MappedBar(2, 2 * MiB, fd, name="shm",
                         areas=[SparseArea(0, MiB), SparseArea(MiB + 0x1000, MiB - 0x1000)])
        super().__init__(PciIdentity(0x1AF4, 0x106B, 0x088000, revision=1,
                                     subsystem_vendor_id=0x1AF4, subsystem_id=0x40),
                         [bar0, bar1, bar2], msix=MsixLayout(4, 1, 0, 1, 0x800),
                         name="test-dev")
        self.scratch = 0
        self.hole = bytearray(0x1000)
        self.resets = 0
        bar0.add_range("scratch", SCRATCH, 4, self._scratch_read, self._scratch_write)
        bar0.add_range("fire-msix", FIRE_MSIX, 4, lambda o, n: bytes(n), self._fire)
        bar0.add_range("intx", INTX_LEVEL, 4, lambda o, n: bytes(n), self._intx)
        bar2.add_range("hole", HOLE, 0x1000, lambda o, n: bytes(self.hole[o:o + n]),
                       self._hole_write)

    def _scratch_read(self, offset: int, size: int) -> bytes:
        return self.scratch.to_bytes(4, "little")[offset:offset + size]

    def _scratch_write(self, offset: int, data: bytes) -> None:
        raw = bytearray(self.scratch.to_bytes(4, "little"))
        raw[offset:offset + len(data)] = data
        self.scratch = int.from_bytes(raw, "little")

    def _fire(self, offset: int, data: bytes) -> None:
        self.trigger_msix(int.from_bytes(data, "little"))

    def _intx(self, offset: int, data: bytes) -> None:
        self.set_intx(bool(int.from_bytes(data, "little")))

    def _hole_write(self, offset: int, data: bytes) -> None:
        self.hole[offset:offset + len(data)] = data

    def device_reset(self) -> None:
        self.scratch = 0
        self.resets += 1


@dataclass
class Harness:
    client: VfioUserClient
    thread: ServerThread
    device: ScratchDevice

    @property
    def server(self) -> VfioUserServer:
        assert self.thread.server is not None
        return self.thread.server


def _ram(size: int = 4 * MiB) -> int:
    return sealed_memfd("vvu-test-ram", size)


@pytest.fixture
def harness() -> Iterator[Harness]:
    device = ScratchDevice()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = VfioUserServer(device)
    with ServerThread(lambda: server) as thread:
        thread.call(lambda: server.attach(theirs))
        client = VfioUserClient(ours, timeout=5)
        yield Harness(client, thread, device)
        client.close()
    device.close()


@pytest.fixture
def h(harness: Harness) -> Harness:
    """A harness past VERSION."""
    harness.client.version()
    return harness


def _readable(fd: int, timeout: float = 1.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _eventfd_count(fd: int) -> int:
    return os.eventfd_read(fd) if _readable(fd, 0.5) else 0


# --- the session QEMU runs at realize -------------------------------------------------


def test_version_reply_is_exact_and_nul_terminated(harness: Harness) -> None:
    reply = harness.client.version()
    assert (reply.major, reply.minor) == (0, 0)
    assert reply.capabilities == {"max_msg_fds": 16, "max_data_xfer_size": 1048576,
                                  "pgsizes": 4096, "max_dma_maps": 65535,
                                  "write_multiple": True}


def test_realize_sequence_like_qemu(h: Harness) -> None:
    c = h.client
    ram = _ram()
    try:
        # Maps come right after VERSION, before GET_INFO; ROM ranges without fd.
        c.dma_map(0, 2 * MiB, ram, 0)
        c.dma_map(4 * MiB, 2 * MiB, ram, 2 * MiB)
        c.dma_map(0xFFFC0000, 0x40000, None, flags=1)
    finally:
        os.close(ram)
    assert len(h.device.dma) == 3
    info = c.get_info()
    assert (info.argsz, info.flags, info.num_regions, info.num_irqs) == (16, 3, 9, 5)

    bar0 = c.get_region_info(0)
    assert (bar0.info.size, bar0.info.flags, bar0.fd, bar0.sparse) == (
        0x1000, RegionFlags.READ | RegionFlags.WRITE, None, None)
    assert bar0.requests == (32,)

    bar2 = c.get_region_info(2)
    # The argsz dance: 32 first, then what the server asked for.
    assert bar2.requests == (32, 32 + 8 + 8 + 2 * 16)
    assert bar2.info.flags == RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | \
        RegionFlags.CAPS
    assert bar2.info.cap_offset == 32
    assert bar2.sparse is not None
    assert bar2.sparse.areas == (SparseArea(0, MiB), SparseArea(MiB + 0x1000, MiB - 0x1000))
    assert bar2.fd is not None
    try:
        m = mmap.mmap(bar2.fd, 2 * MiB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:21] == b"HELLO-FROM-BAR2-area0"
        m[100:104] = b"ZERO"  # zero copy: the device sees it with no message
        assert h.thread.call(lambda: h.device.region_read(2, 100, 4)) == b"ZERO"
        m.close()
    finally:
        os.close(bar2.fd)

    for index in (3, 4, 5, PciRegion.ROM, PciRegion.VGA):
        r = c.get_region_info(index)
        assert (r.info.size, r.info.flags, r.fd) == (0, 0, None)
    cfg = c.get_region_info(PciRegion.CONFIG)
    assert (cfg.info.size, cfg.info.flags) == (256, RegionFlags.READ | RegionFlags.WRITE)

    irqs = {i: c.get_irq_info(i) for i in range(5)}
    assert (irqs[PciIrq.INTX].count, irqs[PciIrq.INTX].flags) == (1, 0b0111)
    assert (irqs[PciIrq.MSI].count, irqs[PciIrq.MSI].flags) == (1, 0b1001)
    assert (irqs[PciIrq.MSIX].count, irqs[PciIrq.MSIX].flags) == (4, 0b1011)
    assert irqs[PciIrq.ERR].count == irqs[PciIrq.REQ].count == 0
    c.reset()
    assert h.device.resets == 1


def test_region_info_first_reply_is_truncated_with_cap_offset(h: Harness) -> None:
    c = h.client
    reply = c.request(Command.DEVICE_GET_REGION_INFO,
                      struct.pack("<IIIIQQ", 32, 0, 2, 0, 0, 0))
    assert len(reply.payload) == 32 and reply.fds == []
    argsz, flags, index, cap_offset, size, _ = struct.unpack("<IIIIQQ", reply.payload)
    assert (argsz, index, cap_offset, size) == (80, 2, 32, 2 * MiB)
    assert flags & RegionFlags.CAPS


def test_config_space_capability_walk_and_masks(h: Harness) -> None:
    c = h.client
    cfg = c.region_read(PciRegion.CONFIG, 0, 256)
    vendor, device, command, status = struct.unpack_from("<HHHH", cfg, 0)
    assert (vendor, device, command) == (0x1AF4, 0x106B, 0)
    assert status & 0x10  # capability list
    assert cfg[8] == 1 and int.from_bytes(cfg[9:12], "little") == 0x088000
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x40)
    assert cfg[0x3D] == 1  # INTA
    # Walk the chain like a driver: MSI-X only, table BIR 1 @0, PBA BIR 1 @0x800.
    pos, caps = cfg[0x34], []
    while pos:
        caps.append((pos, cfg[pos]))
        pos = cfg[pos + 1]
    assert caps == [(0x40, 0x11)]
    control, table, pba = struct.unpack_from("<HII", cfg, 0x42)
    assert (control & 0x7FF, table, pba) == (3, 0x0 | 1, 0x800 | 1)
    # BAR sizing through config writes (what firmware does).
    bar0 = struct.unpack_from("<I", cfg, 0x10)[0]
    bar2_lo, bar2_hi = struct.unpack_from("<II", cfg, 0x18)
    assert bar0 == 0 and bar2_lo == 0b1100 and bar2_hi == 0
    c.config_write(0x10, 4, 0xFFFFFFFF)
    assert c.config_read(0x10, 4) == 0xFFFFF000
    c.config_write(0x18, 4, 0xFFFFFFFF)
    c.config_write(0x1C, 4, 0xFFFFFFFF)
    assert c.config_read(0x18, 4) == 0xFFE0000C
    assert c.config_read(0x1C, 4) == 0xFFFFFFFF
    # Read-only identity, writable command bits only, W1C status errors.
    c.config_write(0, 4, 0)
    assert c.config_read(0, 4) == 0x106B1AF4
    c.config_write(0x04, 2, 0xFFFF)
    assert c.config_read(0x04, 2) == 0x0547
    h.thread.call(lambda: h.device.config.set_bits16(0x06, 1 << 13, True))
    c.config_write(0x06, 2, 1 << 13)
    assert c.config_read(0x06, 2) & (1 << 13) == 0
    # MSI-X enable is writable, the table size is not.
    c.config_write(0x42, 2, 0xFFFF)
    assert c.config_read(0x42, 2) == 0xC003
    assert h.thread.call(lambda: h.device.msix_enabled)


def test_trapped_bar_round_trip_and_sparse_hole(h: Harness) -> None:
    c = h.client
    c.region_write(0, SCRATCH, struct.pack("<I", 0xC0FFEE42))
    assert c.region_read(0, SCRATCH, 4) == struct.pack("<I", 0xC0FFEE42)
    assert c.region_read(0, SCRATCH + 2, 2) == struct.pack("<H", 0xC0FF)
    assert h.device.scratch == 0xC0FFEE42
    assert c.region_read(0, 0x10, 8) == bytes(8)  # no register there
    c.region_write(0, 0x10, b"ignored!")
    # A read spanning registers and gaps is stitched together.
    assert c.region_read(0, SCRATCH - 4, 12)[4:8] == struct.pack("<I", 0xC0FFEE42)
    # BAR2: the hole is trapped and served by the device.
    c.region_write(2, HOLE + 8, b"in-the-hole")
    assert c.region_read(2, HOLE + 8, 11) == b"in-the-hole"
    # A trapped access into an mmapped area (QEMU does this while INTx is pending).
    assert c.region_read(2, HOLE + 0x1000, 18) == b"SECOND-SPARSE-AREA"
    c.region_write(2, 0x40, b"via-trap")
    assert c.region_read(2, 0x40, 8) == b"via-trap"


def test_msix_eventfds_in_qemus_sequence(h: Harness) -> None:
    c = h.client
    a, b, d = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3))
    try:
        c.config_write(0x04, 2, 0x6)  # memory + bus master, as the driver must
        # What QEMU sends: de-assign without fd, disable all, then the whole set.
        c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1)
        c.set_irqs(PciIrq.MSIX, DISABLE, 0, 0)
        c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 2, [a, b])
        c.region_write(0, FIRE_MSIX, struct.pack("<I", 1))
        assert _eventfd_count(b) == 1
        assert _eventfd_count(a) == 0
        # A vector without an eventfd yet is pending (PBA) and fires once wired.
        c.region_write(0, FIRE_MSIX, struct.pack("<I", 3))
        assert c.region_read(1, 0x800, 8) == struct.pack("<Q", 1 << 3)
        c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 3, 1, [d])
        assert _eventfd_count(d) == 1
        assert c.region_read(1, 0x800, 8) == bytes(8)
        # Software trigger through SET_IRQS (DATA_BOOL) as vfio allows.
        c.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, 0, 2,
                   data=b"\x01\x00")
        assert _eventfd_count(a) == 1
        # The server holds dups; closing ours does not break it.
        assert len(h.thread.call(h.device.irqs.open_fds)) == 3
        c.set_irqs(PciIrq.MSIX, DISABLE, 0, 0)
        assert h.thread.call(h.device.irqs.open_fds) == []
    finally:
        for fd in (a, b, d):
            os.close(fd)


def test_intx_is_level_triggered_and_automasked(h: Harness) -> None:
    c = h.client
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        c.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
        c.region_write(0, INTX_LEVEL, struct.pack("<I", 1))
        assert _eventfd_count(efd) == 1
        assert c.config_read(0x06, 2) & 0x8  # status: interrupt pending
        # Automasked: nothing more until QEMU unmasks (after the guest's EOI) ...
        c.region_write(0, INTX_LEVEL, struct.pack("<I", 1))
        assert _eventfd_count(efd) == 0
        # ... and then it fires again because the line is still high.
        c.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        assert _eventfd_count(efd) == 1
        c.region_write(0, INTX_LEVEL, struct.pack("<I", 0))
        assert c.config_read(0x06, 2) & 0x8 == 0
        c.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        assert _eventfd_count(efd) == 0
        # Command INTx-disable keeps the line quiet.
        c.config_write(0x04, 2, 0x400)
        c.region_write(0, INTX_LEVEL, struct.pack("<I", 1))
        assert _eventfd_count(efd) == 0
        c.set_irqs(PciIrq.INTX, DISABLE, 0, 0)
    finally:
        os.close(efd)


def test_posted_writes_get_no_reply(h: Harness) -> None:
    c = h.client
    for value in (1, 2, 3):
        c.region_write(0, SCRATCH, struct.pack("<I", value), posted=True)
    # The next reply is the read's own: no stray replies to the posted writes.
    assert c.region_read(0, SCRATCH, 4) == struct.pack("<I", 3)


def test_write_multi_posted_and_acknowledged(h: Harness) -> None:
    c = h.client
    c.region_write_multi([(0, SCRATCH, struct.pack("<I", 7)), (2, HOLE, b"multi")])
    assert c.region_read(0, SCRATCH, 4) == struct.pack("<I", 7)
    assert c.region_read(2, HOLE, 5) == b"multi"
    count = c.region_write_multi([(0, SCRATCH, b"\x09")] * 3, posted=False)
    assert count == 3
    assert h.device.scratch == 9


def test_reset_restores_config_keeps_maps_and_eventfds(h: Harness) -> None:
    c = h.client
    ram = _ram()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        c.dma_map(0, 4 * MiB, ram)
        c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1, [efd])
        c.config_write(0x04, 2, 0x6)
        c.region_write(0, SCRATCH, b"\x01\x02\x03\x04")
        c.reset()
        assert c.config_read(0x04, 2) == 0
        assert h.device.scratch == 0
        assert len(h.device.dma) == 1
        c.region_write(0, FIRE_MSIX, struct.pack("<I", 0))
        assert _eventfd_count(efd) == 1
    finally:
        os.close(ram)
        os.close(efd)


def test_dma_unmap_echoes_and_accepts_ranges_matching_nothing(h: Harness) -> None:
    c = h.client
    ram = _ram()
    try:
        c.dma_map(0x100000, 2 * MiB, ram, 0)
        c.dma_map(0x400000, 0x1000, ram, 0x200000)
    finally:
        os.close(ram)
    # What vfio_iommu_type1 sends on SET_IOMMU: huge power-of-two spans up to 2^64.
    echo = c.dma_unmap(0xFEF00000, 0xFFFFFFFF01100000)
    assert echo == DmaUnmap(24, 0, 0xFEF00000, 0xFFFFFFFF01100000)
    assert len(h.device.dma) == 2
    c.dma_unmap(0x400000, 0x1000)
    assert len(h.device.dma) == 1
    h.thread.call(lambda: h.device.dma.write(0x100000, b"guest ram"))
    c.dma_unmap_all()
    assert len(h.device.dma) == 0


def test_fd_less_maps_are_accepted_but_not_reachable(h: Harness) -> None:
    from vvu_runtime.device.errors import DmaError

    h.client.dma_map(0xFE800000, 0x200000, None)
    assert len(h.device.dma) == 1
    with pytest.raises(DmaError, match="without an fd"):
        h.thread.call(lambda: h.device.dma.read(0xFE800000, 4))


# --- malformed input: error reply, server keeps serving -------------------------------


def _raw(c: VfioUserClient, command: int, payload: bytes, fds: list[int] | None = None,
         flags: int = 0) -> Header:
    header = Header(c.next_id(), command, HEADER_SIZE + len(payload), flags)
    c.send_raw(header.pack() + payload, fds or [])
    reply = c.receive()
    assert reply.header.msg_id == header.msg_id
    assert reply.header.command == command
    assert reply.header.size == HEADER_SIZE and reply.payload == b""
    return reply.header


def _still_serving(h: Harness) -> None:
    assert h.client.get_info().num_regions == 9
    assert h.server.state is ServerState.CONNECTED


BAD_MESSAGES = {
    "unknown command": (99, b"", errno.ENOSYS),
    "GET_REGION_IO_FDS (QEMU never sends it)": (Command.DEVICE_GET_REGION_IO_FDS,
                                                 struct.pack("<IIII", 16, 0, 0, 0),
                                                 errno.ENOSYS),
    "DEVICE_FEATURE": (Command.DEVICE_FEATURE, struct.pack("<II", 8, 1), errno.ENOSYS),
    "short payload": (Command.REGION_READ, struct.pack("<Q", 0), errno.EINVAL),
    "short header-only DMA_MAP": (Command.DMA_MAP, b"", errno.EINVAL),
    "write size mismatch": (Command.REGION_WRITE,
                            RegionAccess(SCRATCH, 0, 8).pack() + b"four", errno.EINVAL),
    "read with trailing bytes": (Command.REGION_READ,
                                 RegionAccess(SCRATCH, 0, 4).pack() + b"xx", errno.EINVAL),
    "region index out of range": (Command.REGION_READ, RegionAccess(0, 12, 4).pack(),
                                  errno.EINVAL),
    "read past region end": (Command.REGION_READ, RegionAccess(0xFFE, 0, 4).pack(),
                             errno.EINVAL),
    "read of a zero-size BAR": (Command.REGION_READ, RegionAccess(0, 4, 4).pack(),
                                errno.EINVAL),
    "config past 256": (Command.REGION_READ, RegionAccess(0xFC, 7, 8).pack(), errno.EINVAL),
    "read over max_data_xfer_size": (Command.REGION_READ,
                                     RegionAccess(0, 2, MAX_DATA_XFER_SIZE + 1).pack(),
                                     errno.E2BIG),
    "region info for index 9": (Command.DEVICE_GET_REGION_INFO,
                                struct.pack("<IIIIQQ", 32, 0, 9, 0, 0, 0), errno.EINVAL),
    "region info argsz too small": (Command.DEVICE_GET_REGION_INFO,
                                    struct.pack("<IIIIQQ", 8, 0, 0, 0, 0, 0), errno.EINVAL),
    "irq info for index 7": (Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 7, 0),
                             errno.EINVAL),
    "set_irqs past the vectors": (Command.DEVICE_SET_IRQS,
                                  struct.pack("<IIIII", 20, 0x21, 2, 3, 2), errno.EINVAL),
    "set_irqs two actions": (Command.DEVICE_SET_IRQS,
                             struct.pack("<IIIII", 20, 0x29, 2, 0, 1), errno.EINVAL),
    "unaligned DMA_MAP": (Command.DMA_MAP, DmaMap(32, 3, 0, 0x1234, 0x1000).pack(),
                          errno.EINVAL),
    "DMA_UNMAP with dirty bitmap": (Command.DMA_UNMAP, DmaUnmap(24, 1, 0, 0x1000).pack(),
                                    errno.ENOTSUP),
    "second VERSION": (Command.VERSION, struct.pack("<HH", 0, 0), errno.EINVAL),
    "reset with payload": (Command.DEVICE_RESET, b"junk", errno.EINVAL),
    "write multi with bad count": (Command.REGION_WRITE_MULTI, struct.pack("<Q", 5),
                                   errno.EINVAL),
    "DMA_READ from the client": (Command.DMA_READ, struct.pack("<QQ", 0, 4), errno.ENOSYS),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_malformed_message_gets_error_reply_and_serving_continues(h: Harness,
                                                                  case: str) -> None:
    command, payload, expected = BAD_MESSAGES[case]
    reply = _raw(h.client, command, payload)
    assert reply.flags == MsgFlags.REPLY | MsgFlags.ERROR
    assert reply.error == expected
    _still_serving(h)


def test_too_many_fds(h: Harness) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(17)]
    try:
        before = h.thread.call(lambda: len(os.listdir("/proc/self/fd")))
        reply = _raw(h.client, Command.DEVICE_SET_IRQS,
                     struct.pack("<IIIII", 20, EVENTFD_TRIGGER, 2, 0, 4), fds)
        assert reply.error == errno.EINVAL
        # Nothing kept: the 16 we received were closed, the 17th never arrived.
        assert h.thread.call(lambda: len(os.listdir("/proc/self/fd"))) == before
    finally:
        for fd in fds:
            os.close(fd)
    _still_serving(h)


def test_fds_on_messages_that_take_none_and_non_eventfds(h: Harness) -> None:
    r, w = os.pipe()
    try:
        assert _raw(h.client, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                    [r]).error == errno.EINVAL
        assert _raw(h.client, Command.DEVICE_SET_IRQS,
                    struct.pack("<IIIII", 20, EVENTFD_TRIGGER, 2, 0, 1),
                    [r]).error == errno.EINVAL
        assert _raw(h.client, Command.DMA_MAP, DmaMap(32, 3, 0, 0, 0x1000).pack(),
                    [r, w]).error == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    _still_serving(h)


def test_overlapping_map_is_eexist(h: Harness) -> None:
    ram = _ram()
    try:
        h.client.dma_map(0, 2 * MiB, ram)
        with pytest.raises(RemoteError) as exc:
            h.client.dma_map(MiB, 2 * MiB, ram)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(RemoteError) as exc:
            h.client.dma_map(8 * MiB, 8 * MiB, ram)  # past the end of the memfd
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(ram)
    _still_serving(h)


def test_reply_type_messages_are_refused(h: Harness) -> None:
    assert _raw(h.client, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                flags=MsgFlags.REPLY).error == errno.EINVAL
    _still_serving(h)


def test_oversized_message_is_drained_and_refused(h: Harness) -> None:
    payload = RegionAccess(0, 2, MAX_DATA_XFER_SIZE + 64).pack() + bytes(MAX_DATA_XFER_SIZE + 64)
    reply = _raw(h.client, Command.REGION_WRITE, payload)
    assert reply.error == errno.E2BIG
    _still_serving(h)


def test_failed_posted_write_stays_silent(h: Harness) -> None:
    h.client.region_write(0, 0x2000, b"past", posted=True)  # past BAR0's end
    _still_serving(h)


def test_commands_before_version_are_refused(harness: Harness) -> None:
    c = harness.client
    assert _raw(c, Command.DEVICE_GET_INFO,
                struct.pack("<IIII", 16, 0, 0, 0)).error == errno.EINVAL
    assert _raw(c, Command.VERSION, struct.pack("<HH", 0, 0) + b"{not json\0").error == \
        errno.EINVAL
    assert _raw(c, Command.VERSION, struct.pack("<HH", 1, 0)).error == errno.ENOTSUP
    c.version()
    _still_serving(harness)


def test_message_dribbled_byte_by_byte(h: Harness) -> None:
    msg = Header(4242, Command.REGION_READ, 32).pack() + RegionAccess(SCRATCH, 0, 4).pack()
    for i in range(len(msg)):
        h.client.sock.send(msg[i:i + 1])
        time.sleep(0.001)
    reply = h.client.receive()
    assert reply.header.msg_id == 4242 and reply.payload[16:] == bytes(4)


def test_pipelined_requests_answered_in_order(h: Harness) -> None:
    c = h.client
    ids = [c.send(Command.REGION_READ, RegionAccess(SCRATCH, 0, 4).pack()).msg_id
           for _ in range(5)]
    assert [c.receive().header.msg_id for _ in ids] == ids


def test_framing_lost_closes_and_cleans_up(h: Harness) -> None:
    c = h.client
    ram = _ram()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        c.dma_map(0, 4 * MiB, ram)
        c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 1, [efd])
    finally:
        os.close(ram)
        os.close(efd)
    c.send_raw(Header(1, Command.DEVICE_GET_INFO, 8).pack())  # claims 8 < 16 bytes
    with pytest.raises(PeerHungUp):
        c.receive()
    assert h.thread.call(lambda: h.server.state) is ServerState.IDLE
    assert h.thread.call(h.device.irqs.open_fds) == []
    assert len(h.device.dma) == 0


def test_internal_device_error_is_eio_not_death(h: Harness) -> None:
    def boom(offset: int, data: bytes) -> None:
        raise RuntimeError("bug in a device handler")

    h.thread.call(lambda: h.device.bars[0].add_range("bug", 0x900, 4, lambda o, n: bytes(n),
                                                     boom))
    with pytest.raises(RemoteError) as exc:
        h.client.region_write(0, 0x900, b"\0\0\0\0")
    assert exc.value.errno == errno.EIO
    _still_serving(h)


# --- lifetime: listening socket, reconnect, leaks --------------------------------------


def _fds_of_process() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_listening_server_reconnect_and_no_leaks(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "dev.sock")
    device = ScratchDevice()
    with ServerThread(lambda: VfioUserServer(device, path)) as thread:
        server = thread.server
        assert server is not None
        thread.call(server.start)
        baseline = thread.call(_fds_of_process)
        for _ in range(2):  # the same device serves a restarted client
            with VfioUserClient.connect(path) as c:
                c.version()
                ram = _ram()
                efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
                c.dma_map(0, 4 * MiB, ram)
                c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, 2, efds)
                bar2 = c.get_region_info(2)
                assert bar2.fd is not None
                os.close(bar2.fd)
                for fd in (ram, *efds):
                    os.close(fd)
                # One client per device: a second one is turned away.
                with VfioUserClient.connect(path) as intruder, pytest.raises(PeerHungUp):
                    intruder.version()
                c.region_write(0, SCRATCH, b"\1\0\0\0")
                assert c.region_read(0, SCRATCH, 4) == b"\1\0\0\0"
            deadline = time.monotonic() + 5
            while thread.call(lambda: server.state) is not ServerState.LISTENING:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert thread.call(_fds_of_process) == baseline
            assert device.scratch == 0  # reset when the client left
        assert server.sessions_served == 2
    assert not os.path.exists(path)
    device.close()


def test_engine_states_refuse_calls_that_do_not_fit(tmp_path: os.PathLike[str]) -> None:
    from vvu_runtime.device.errors import StateError

    not_a_socket = os.path.join(os.fspath(tmp_path), "file")
    with open(not_a_socket, "w"):
        pass
    device = ScratchDevice()
    path = os.path.join(os.fspath(tmp_path), "s.sock")
    with ServerThread(lambda: VfioUserServer(device, path)) as thread:
        server = thread.server
        assert server is not None
        with pytest.raises(StateError, match="needs a socket path"):
            thread.call(VfioUserServer(device).start)
        with pytest.raises(StateError, match="not a socket"):
            thread.call(VfioUserServer(device, not_a_socket).start)
        thread.call(server.start)
        with pytest.raises(StateError, match="start\\(\\) in state listening"):
            thread.call(server.start)
        a, b = socket.socketpair()
        thread.call(lambda: server.attach(b))
        assert thread.call(lambda: server.state) is ServerState.CONNECTED
        with pytest.raises(StateError, match="attach\\(\\) in state connected"):
            thread.call(lambda: server.attach(socket.socket(socket.AF_UNIX)))
        a.close()
        thread.call(server.close)
        assert thread.call(lambda: server.state) is ServerState.CLOSED
        with pytest.raises(StateError):
            thread.call(server.start)
    device.close()
