"""PCI building blocks: BAR declarations, config space, interrupt lines, virtio layout;
and the vfio-user wire structs (codec round trips, rejection of short input)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.server_thread import ServerThread
from tests.support.vfio_user_client import VfioUserClient
from vvu_runtime.device.errors import DeviceModelError, IrqError, MessageError
from vvu_runtime.device.pci import (
    Bar,
    ConfigSpace,
    IrqLines,
    MappedBar,
    MsixLayout,
    PciDevice,
    PciIdentity,
)
from vvu_runtime.device.vfio_user import protocol as p
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.virtio_pci import (
    BarDecl,
    BarKind,
    VirtioPciCapType,
    VirtioPciLayout,
    VirtioStructure,
)

IDENT = PciIdentity(0x1AF4, 0x1050, 0xFF0000)


def _noop_read(offset: int, size: int) -> bytes:
    return bytes(size)


def _noop_write(offset: int, data: bytes) -> None:
    pass


# --- device definition errors ------------------------------------------------------------


def test_bar_declaration_errors() -> None:
    with pytest.raises(DeviceModelError, match="power of two"):
        Bar(0, 0x3000, name="x")
    with pytest.raises(DeviceModelError, match="64-bit"):
        Bar(0, 1 << 33, name="x")
    with pytest.raises(DeviceModelError, match="usable BAR slot"):
        Bar(5, 0x1000, name="x", is_64bit=True)
    bar = Bar(0, 0x1000, name="regs")
    bar.add_range("a", 0, 0x10, _noop_read, _noop_write)
    with pytest.raises(DeviceModelError, match="overlaps a"):
        bar.add_range("b", 0x8, 0x10, _noop_read, _noop_write)
    with pytest.raises(DeviceModelError, match="does not fit"):
        bar.add_range("c", 0xFF8, 0x10, _noop_read, _noop_write)
    fd = os.memfd_create("bar", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x4000)
    mapped = MappedBar(2, 0x4000, fd, name="shm",
                       areas=[p.SparseArea(0, 0x1000), p.SparseArea(0x2000, 0x2000)])
    with pytest.raises(DeviceModelError, match="mmapped area"):
        mapped.add_range("in-area", 0x2000, 4, _noop_read, _noop_write)
    mapped.add_range("hole", 0x1000, 0x1000, _noop_read, _noop_write)
    with pytest.raises(DeviceModelError, match="declared twice"):
        PciDevice(IDENT, [mapped, Bar(3, 0x1000, name="clash")])
    mapped.close()
    with pytest.raises(DeviceModelError, match="not page aligned"):
        MappedBar(2, 0x4000, -1, name="bad", areas=[p.SparseArea(0x100, 0x1000)])


def test_whole_mapped_bar_has_no_sparse_cap() -> None:
    fd = os.memfd_create("bar", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x2000)
    bar = MappedBar(2, 0x2000, fd, name="shm")
    desc = bar.description()
    assert desc.flags == p.RegionFlags.READ | p.RegionFlags.WRITE | p.RegionFlags.MMAP
    assert desc.sparse_areas == () and desc.fd == fd
    bar.close()
    assert bar.fd == -1


def test_capability_chain_overflow_and_walk() -> None:
    c = ConfigSpace()
    offsets = [c.add_capability(0x09, bytes(14)) for _ in range(12)]
    assert offsets[0] == 0x40 and offsets[1] == 0x50
    assert [o for o, _ in c.capabilities()] == offsets
    with pytest.raises(DeviceModelError, match="config space is full"):
        for _ in range(10):
            c.add_capability(0x09, bytes(14))


def test_msix_layout_must_point_into_a_bar() -> None:
    with pytest.raises(DeviceModelError, match="declared BAR"):
        PciDevice(IDENT, [Bar(0, 0x1000, name="r")], msix=MsixLayout(2, 1, 0, 1, 0x800))


def test_irq_lines_validation() -> None:
    irqs = IrqLines("t", intx=True, msix_vectors=2)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with pytest.raises(IrqError, match="does not exist"):
            irqs.set_irqs(0x24, 9, 0, 1, [], b"")
        with pytest.raises(IrqError, match="unknown flag"):
            irqs.set_irqs(0x124, 2, 0, 1, [], b"")
        with pytest.raises(IrqError, match="fds for"):
            irqs.set_irqs(0x24, 2, 0, 2, [efd], b"")
        with pytest.raises(IrqError, match="without DATA_EVENTFD"):
            irqs.set_irqs(0x21, 2, 0, 1, [efd], b"")
        with pytest.raises(IrqError, match="not maskable"):
            irqs.set_irqs(0x09, 1, 0, 1, [], b"")
        with pytest.raises(IrqError, match="does not exist"):
            irqs.fire(2, 5)
        irqs.set_irqs(0x24, 2, 1, 1, [efd], b"")
        # MASK then trigger: pending; UNMASK delivers.
        irqs.set_irqs(0x09, 2, 1, 1, [], b"")
        assert not irqs.fire(2, 1) and irqs.pending(2, 1)
        irqs.set_irqs(0x11, 2, 1, 1, [], b"")
        assert os.eventfd_read(efd) == 1 and not irqs.pending(2, 1)
        assert len(irqs.open_fds()) == 1
        irqs.close()
        assert irqs.open_fds() == []
    finally:
        os.close(efd)


def test_virtio_layout_validation_and_doc() -> None:
    extra = VirtioStructure("shm", VirtioPciCapType.SHARED_MEMORY_CFG, 2, 0, 1 << 33, cap_id=1,
                            doc="consumer memory")
    layout = VirtioPciLayout.standard(
        num_queues=2, device_cfg_size=24, msix_vectors=5,
        extra_bars=[BarDecl(2, 1 << 34, "memory", BarKind.MAPPED, True, True)],
        extra_structures=[extra])
    layout.validate()
    body = extra.capability_body()
    assert body[0] == 24 and body[1] == 8 and body[3] == 1
    assert struct.unpack_from("<IIII", body, 6) == (0, 0, 0, 2)  # 64-bit length: hi = 2
    doc = layout.describe()
    assert "| 2 | 0x0 | 0x200000000 | consumer memory | vendor cap type 8" in doc
    assert "shmid 1" in doc
    bad = VirtioPciLayout(layout.bars, (*layout.structures,
                                        VirtioStructure("x", VirtioPciCapType.VENDOR_CFG, 4, 0,
                                                        8)), layout.msix)
    with pytest.raises(DeviceModelError, match="does not declare"):
        bad.validate()
    with pytest.raises(DeviceModelError, match="4 KiB slot"):
        VirtioPciLayout.standard(num_queues=1, device_cfg_size=0x2000, msix_vectors=2)


# --- wire structs ------------------------------------------------------------------------

STRUCTS = [
    p.Header(7, 9, 32, 1, 0), p.DmaMap(32, 3, 0x1000, 0x2000, 0x3000),
    p.DmaUnmap(24, 2, 0, 0), p.DeviceInfo(16, 3, 9, 5), p.RegionInfo(80, 15, 2, 32, 1 << 21, 0),
    p.CapHeader(1, 1, 0), p.SparseArea(0x1000, 0x2000), p.IrqInfo(16, 9, 2, 4),
    p.IrqSet(20, 0x24, 2, 0, 2), p.RegionAccess(0x800, 0, 4),
    p.WriteMultiEntry(0x10, 0, 4, b"abcd\0\0\0\0"),
]


@pytest.mark.parametrize("obj", STRUCTS, ids=lambda o: type(o).__name__)
def test_struct_round_trip_and_short_input(obj: object) -> None:
    cls = type(obj)
    raw = obj.pack()  # type: ignore[attr-defined]
    assert len(raw) == cls.STRUCT.size  # type: ignore[attr-defined]
    assert cls.unpack(raw) == obj  # type: ignore[attr-defined]
    with pytest.raises(MessageError):
        cls.unpack(raw[:-1])  # type: ignore[attr-defined]


def test_variable_structs() -> None:
    v = p.Version(0, 0, {"max_msg_fds": 16})
    assert p.Version.unpack(v.pack()) == v and v.pack().endswith(b"\0")
    assert p.Version.unpack(struct.pack("<HH", 0, 0)).capabilities == {}
    for bad in (b"\0\0\0\0{}", b"\0\0\0\0[]\0", b"\0\0\0\0{\"capabilities\": 3}\0"):
        with pytest.raises(MessageError):
            p.Version.unpack(bad)
    cap = p.SparseMmapCap((p.SparseArea(0, 0x1000), p.SparseArea(0x2000, 0x1000)))
    assert p.SparseMmapCap.unpack(cap.pack()) == cap and len(cap.pack()) == cap.packed_size
    with pytest.raises(MessageError):
        p.SparseMmapCap.unpack(cap.pack()[:-1])
    multi = p.WriteMulti((p.WriteMultiEntry(0, 0, 1, b"x".ljust(8, b"\0")),))
    assert p.WriteMulti.unpack(multi.pack()) == multi
    with pytest.raises(MessageError):
        p.WriteMulti.unpack(multi.pack() + b"\0")
    with pytest.raises(MessageError):
        p.WriteMulti.unpack(struct.pack("<Q", 1 << 40))


@given(st.binary(max_size=64))
def test_decoders_never_raise_anything_but_message_error(data: bytes) -> None:
    for cls in (p.Header, p.Version, p.DmaMap, p.DmaUnmap, p.DeviceInfo, p.RegionInfo,
                p.IrqInfo, p.IrqSet, p.RegionAccess, p.WriteMulti, p.SparseMmapCap):
        with contextlib.suppress(MessageError):
            cls.unpack(data)


def test_random_messages_never_kill_the_server() -> None:
    """500 well-framed messages of random commands, flags and payloads."""
    rng = random.Random(1234)
    device = PciDevice(IDENT, [Bar(0, 0x1000, name="r"), Bar(1, 0x1000, name="m")],
                       msix=MsixLayout(2, 1, 0, 1, 0x800), name="fuzz")
    ours, theirs = socket.socketpair()
    server = VfioUserServer(device)
    with ServerThread(lambda: server) as thread:
        thread.call(lambda: server.attach(theirs))
        c = VfioUserClient(ours)
        c.version()
        for _ in range(500):
            command = rng.choice([*range(0, 20), 0xFFFF])
            flags = rng.choice([0, 0, 0, p.MsgFlags.NO_REPLY, p.MsgFlags.REPLY, 0x7])
            payload = rng.randbytes(rng.choice([0, 4, 16, 20, 24, 32, 40, 64]))
            header = p.Header(c.next_id(), command, p.HEADER_SIZE + len(payload), flags)
            c.send_raw(header.pack() + payload)
            if not flags & p.MsgFlags.NO_REPLY:
                reply = c.receive()
                assert reply.header.msg_id == header.msg_id
                for fd in reply.fds:
                    os.close(fd)
        assert c.get_info().num_regions == 9
        c.close()
    device.close()
