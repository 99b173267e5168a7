"""The PCI layer's pieces that need no VM: vfio ioctl numbers and structs, the pagemap
reader, address parsing, register access widths, and the sysfs function over a fake
sysfs tree (regular files stand in for ``config`` and ``resourceN``)."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from vvu_runtime.driver import sysfs, vfio
from vvu_runtime.driver.errors import PciError
from vvu_runtime.driver.pci import DmaArena, DmaBuffer, MmioRegisters, normalize_address


def test_vfio_ioctl_numbers_match_linux_vfio_h() -> None:
    # _IO(';', 100 + n) as in linux/vfio.h
    assert vfio.VFIO_GET_API_VERSION == 0x3B64
    assert vfio.VFIO_SET_IOMMU == 0x3B66
    assert vfio.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert vfio.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert vfio.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert vfio.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert vfio.VFIO_IOMMU_UNMAP_DMA == 0x3B72
    assert vfio.REGION_INFO.size == 32 and vfio.DMA_MAP.size == 32
    assert vfio.DMA_UNMAP.size == 24 and vfio.IRQ_SET.size == 20


def test_pci_addresses_are_normalized() -> None:
    assert normalize_address("00:05.0") == "0000:00:05.0"
    assert normalize_address("0000:01:00.7") == "0000:01:00.7"
    for bad in ("5", "00:05", "0000:00:05.8", "zz:00.0", "0000:00:005.0"):
        with pytest.raises(PciError):
            normalize_address(bad)


def test_pagemap_translation(tmp_path: Path) -> None:
    page = mmap.PAGESIZE
    present = 1 << 63
    entries = [0] * 8 + [present | 0x1234, present | 0x1235, present | 0x1237, 0]
    pm = tmp_path / "pagemap"
    pm.write_bytes(struct.pack(f"<{len(entries)}Q", *entries))
    phys = sysfs.physical_addresses(8 * page + 16, 2 * page - 16, str(pm))
    assert phys == [0x1234 * page, 0x1235 * page]
    assert sysfs.contiguous_base(phys) == 0x1234 * page
    assert sysfs.contiguous_base(sysfs.physical_addresses(9 * page, 2 * page, str(pm))) is None
    with pytest.raises(PciError, match="no physical address"):
        sysfs.physical_addresses(10 * page, 2 * page, str(pm))


def test_mmio_registers_use_one_access_per_width() -> None:
    mapping = mmap.mmap(-1, 4096)
    regs = MmioRegisters(mapping, 4096)
    regs.write(0, 4, 0x11223344)
    regs.write(6, 2, 0xBEEF)
    regs.write(9, 1, 0x7F)
    regs.write64(16, 0x0102030405060708)
    assert mapping[:10] == bytes.fromhex("44332211 0000 efbe 007f".replace(" ", ""))
    assert regs.read(0, 2) == 0x3344 and regs.read(6, 2) == 0xBEEF and regs.read(9, 1) == 0x7F
    assert regs.read64(16) == 0x0102030405060708
    for offset, size in ((2, 4), (1, 2), (4096, 4), (0, 8)):
        with pytest.raises(PciError):
            regs.write(offset, size, 0)
    regs.close()


def test_dma_arena_hands_out_aligned_zeroed_iovas() -> None:
    mapping = mmap.mmap(-1, 8192)
    mapping[:] = b"\xff" * 8192
    arena = DmaArena(DmaBuffer(memoryview(mapping), 0x4000_0000))
    a = arena.alloc(10)
    b = arena.alloc(100, 64)
    assert a == 0x4000_0000 and b == 0x4000_0040
    assert bytes(arena.view(b, 100)) == bytes(100)
    with pytest.raises(PciError, match="full"):
        arena.alloc(8192)
    arena.close()


@pytest.fixture
def fake_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dev = tmp_path / "0000:00:05.0"
    dev.mkdir()
    config = bytearray(256)
    struct.pack_into("<HHHH", config, 0, 0x1AF4, 0x107F, 0x0000, 0x0010)
    config[0x34] = 0x40
    config[0x40:0x44] = bytes([0x09, 0x00, 16, 1])
    (dev / "config").write_bytes(bytes(config))
    (dev / "resource0").write_bytes(bytes(0x4000))
    (dev / "resource2").write_bytes(b"RAM!" + bytes(0x10000 - 4))
    (dev / "driver_override").write_text("")
    monkeypatch.setattr(sysfs, "sysfs_device_dir", lambda addr: str(tmp_path / addr))
    monkeypatch.setattr(vfio, "sysfs_device_dir", lambda addr: str(tmp_path / addr))
    return dev


def test_sysfs_function_over_a_fake_tree(fake_function: Path) -> None:
    fn = sysfs.SysfsPciFunction("00:05.0")
    assert (fn.vendor_id, fn.device_id) == (0x1AF4, 0x107F)
    assert not fn.interrupts
    assert [c.cap_id for c in fn.capabilities()] == [0x09]
    fn.enable_bus_master()
    assert struct.unpack_from("<H", (fake_function / "config").read_bytes(), 4)[0] & 6 == 6
    assert (fake_function / "driver_override").read_text() == sysfs.NO_DRIVER
    fn.registers(0).write(0x1000, 4, 0xCAFE)
    assert (fake_function / "resource0").read_bytes()[0x1000:0x1004] == b"\xfe\xca\0\0"
    window = fn.map_bar(2, 0, 4)
    assert bytes(window.view) == b"RAM!"
    window.close()
    with pytest.raises(PciError, match="outside"):
        fn.map_bar(2, 0xF000, 0x2000)
    with pytest.raises(PciError, match="no interrupts"):
        fn.enable_msix(1)
    assert fn.bar_size(4) == 0
    fn.close()
    os.sync()
