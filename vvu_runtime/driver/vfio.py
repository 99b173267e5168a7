"""A PCI function through Linux vfio-pci (behind an IOMMU): the appliance's primary path.

What :class:`VfioPciFunction` does (DESIGN decision 6, reference/qemu-vfio-user-client.md):

1. bind: ``modprobe vfio-pci``, ``driver_override = vfio-pci``, unbind the current
   driver (the guest's ``virtio_pci`` claims every 1af4:10xx function),
   ``drivers_probe``;
2. the legacy group/container API (Debian's kernels have no iommufd):
   ``/dev/vfio/vfio`` (API version 0, TYPE1v2), ``/dev/vfio/GROUP`` (viable),
   GROUP_SET_CONTAINER, SET_IOMMU(TYPE1v2), GROUP_GET_DEVICE_FD;
3. regions: DEVICE_GET_REGION_INFO per BAR; mmappable BARs are mmapped (a
   register access is then one load/store), the others go through pread/pwrite
   on the device fd; config space likewise through region 7;
4. MSI-X: DEVICE_SET_IRQS with one eventfd per vector, once (vfio-pci sets the
   MSI-X enable bit); Bus Master is ours to set (vfio-pci leaves it off);
5. DMA: an anonymous mapping (2 MiB hugetlb pages when available) mapped once
   with IOMMU_MAP_DMA at an IOVA we choose. Under a vIOMMU every 4 KiB page of a
   MAP_DMA becomes one DMA_MAP message to the device model (~75 ms per 2 MiB
   under TCG): allocate long-lived buffers once.

ioctls go through :func:`fcntl.ioctl` on ``bytearray`` structs (the kernel writes
the replies in place); struct layouts are those of ``linux/vfio.h``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vvu_runtime.driver.errors import PciError
from vvu_runtime.driver.pci import (
    BarFile,
    BarWindow,
    DmaBuffer,
    FileRegisters,
    MmioRegisters,
    PciFunction,
    Registers,
    map_window,
    normalize_address,
    sysfs_device_dir,
)

log = logging.getLogger(__name__)

# --- linux/vfio.h -----------------------------------------------------------------------
VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
_VFIO_TYPE = ord(";")
_VFIO_BASE = 100


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)``: vfio's ioctls carry no size in the number."""
    return (_VFIO_TYPE << 8) | (_VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

GROUP_STATUS = struct.Struct("<II")  # argsz, flags
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count (+ s32 fds)
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, iova, size

HUGEPAGE = 2 << 20
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
#: Where our IOVAs start (clear of the x86 MSI window at 0xfee00000 and of page 0).
IOVA_BASE = 0x1000_0000

VFIO_DRIVER = "vfio-pci"


def _ioctl(fd: int, request: int, arg: bytearray | int, what: str) -> int:
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise PciError(f"{what}: {os.strerror(exc.errno or 0)}") from exc


def _write_sysfs(path: str, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as exc:
        raise PciError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def current_driver(address: str) -> str | None:
    link = os.path.join(sysfs_device_dir(address), "driver")
    try:
        return os.path.basename(os.readlink(link))
    except FileNotFoundError:
        return None


def bind_to_vfio(address: str) -> None:
    """Move the function to vfio-pci (driver_override + drivers_probe)."""
    if current_driver(address) == VFIO_DRIVER:
        return
    if not os.path.isdir(f"/sys/bus/pci/drivers/{VFIO_DRIVER}"):
        done = subprocess.run(["modprobe", VFIO_DRIVER], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or not os.path.isdir(f"/sys/bus/pci/drivers/{VFIO_DRIVER}"):
            raise PciError(f"{address}: cannot load {VFIO_DRIVER}: "
                           f"{done.stderr.strip() or 'modprobe failed'}")
    dev = sysfs_device_dir(address)
    _write_sysfs(os.path.join(dev, "driver_override"), VFIO_DRIVER)
    driver = current_driver(address)
    if driver is not None:
        log.info("%s: unbinding %s", address, driver)
        _write_sysfs(os.path.join(dev, "driver", "unbind"), address)
    _write_sysfs("/sys/bus/pci/drivers_probe", address)
    for _ in range(100):
        if current_driver(address) == VFIO_DRIVER:
            log.info("%s: bound to %s", address, VFIO_DRIVER)
            return
        time.sleep(0.01)
    raise PciError(f"{address}: {VFIO_DRIVER} did not bind (driver is "
                   f"{current_driver(address)}); is the function behind an IOMMU?")


def iommu_group(address: str) -> int:
    link = os.path.join(sysfs_device_dir(address), "iommu_group")
    try:
        return int(os.path.basename(os.readlink(link)))
    except (FileNotFoundError, ValueError) as exc:
        raise PciError(f"{address}: no IOMMU group (the appliance needs -device "
                       "intel-iommu,caching-mode=on and intel_iommu=on, or use the sysfs "
                       "poll-mode path)") from exc


@dataclass(frozen=True, slots=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(eq=False, slots=True)
class _Dma:
    iova: int
    size: int
    mapping: mmap.mmap
    view: memoryview


class VfioPciFunction(PciFunction):
    """The function at ``address`` through vfio-pci (type1 IOMMU)."""

    def __init__(self, address: str, *, bind: bool = True, iova_base: int = IOVA_BASE) -> None:
        self.address = normalize_address(address)
        self._container = -1
        self._group = -1
        self._device = -1
        self._regions: dict[int, RegionInfo] = {}
        self._registers: dict[int, Registers] = {}
        self._eventfds: list[int] = []
        self._dma: list[_Dma] = []
        self._next_iova = iova_base
        self._bar_fd_warned = False
        try:
            if bind:
                bind_to_vfio(self.address)
            self._open()
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------------
    def _open(self) -> None:
        group = iommu_group(self.address)
        try:
            self._container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
            self._group = os.open(f"/dev/vfio/{group}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise PciError(f"{self.address}: cannot open vfio: {exc}") from exc
        version = _ioctl(self._container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
        if version != VFIO_API_VERSION:
            raise PciError(f"{self.address}: vfio API version {version}, expected "
                           f"{VFIO_API_VERSION}")
        if not _ioctl(self._container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU,
                      "VFIO_CHECK_EXTENSION"):
            raise PciError(f"{self.address}: the kernel's vfio has no TYPE1v2 IOMMU")
        status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
        _ioctl(self._group, VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
            raise PciError(f"{self.address}: IOMMU group {group} is not viable (another "
                           "device in it is bound to a host driver)")
        _ioctl(self._group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i",
               self._container)), "VFIO_GROUP_SET_CONTAINER")
        _ioctl(self._container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU,
               "VFIO_SET_IOMMU(TYPE1v2) (no interrupt remapping? use intel-iommu)")
        name = bytearray(self.address.encode() + b"\0")
        self._device = _ioctl(self._group, VFIO_GROUP_GET_DEVICE_FD, name,
                              "VFIO_GROUP_GET_DEVICE_FD")
        info = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        _ioctl(self._device, VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        _argsz, _flags, num_regions, num_irqs = DEVICE_INFO.unpack(info)
        log.info("%s: vfio device fd (group %d): %d regions, %d irq indexes", self.address,
                 group, num_regions, num_irqs)
        self._config = FileRegisters(self._device,
                                     self._region(VFIO_PCI_CONFIG_REGION_INDEX).offset,
                                     self._region(VFIO_PCI_CONFIG_REGION_INDEX).size or 256,
                                     f"{self.address} config")

    def _region(self, index: int) -> RegionInfo:
        info = self._regions.get(index)
        if info is None:
            buf = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
            _ioctl(self._device, VFIO_DEVICE_GET_REGION_INFO, buf,
                   f"{self.address}: VFIO_DEVICE_GET_REGION_INFO({index})")
            _argsz, flags, _index, _cap, size, offset = REGION_INFO.unpack(buf)
            info = self._regions[index] = RegionInfo(index, flags, size, offset)
        return info

    # -- PciFunction --------------------------------------------------------------------
    @property
    def interrupts(self) -> bool:
        return True

    def config_read(self, offset: int, size: int) -> int:
        return self._config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._config.write(offset, size, value)

    def bar_size(self, index: int) -> int:
        return self._region(index).size

    def registers(self, index: int) -> Registers:
        regs = self._registers.get(index)
        if regs is not None:
            return regs
        info = self._region(index)
        if not info.size:
            raise PciError(f"{self.address}: BAR{index} is not implemented")
        if info.mmappable and info.size % mmap.PAGESIZE == 0:
            try:
                mapping = mmap.mmap(self._device, info.size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=info.offset)
                regs = MmioRegisters(mapping, info.size)
            except (OSError, ValueError) as exc:
                log.info("%s: BAR%d cannot be mmapped (%s); using pread/pwrite",
                         self.address, index, exc)
        if regs is None:
            regs = FileRegisters(self._device, info.offset, info.size,
                                 f"{self.address} BAR{index}")
        self._registers[index] = regs
        return regs

    def map_bar(self, index: int, offset: int, length: int) -> BarWindow:
        info = self._region(index)
        if not info.mmappable:
            raise PciError(f"{self.address}: BAR{index} is not mmappable through vfio")
        return map_window(self._device, info.offset, info.size, offset, length,
                          f"{self.address} BAR{index}")

    def bar_file(self, index: int) -> BarFile:
        """The sysfs ``resourceN`` file if the kernel lets it be mapped while vfio-pci
        owns the BAR (offset 0: every back-end can use it, and it grants nothing but
        the mapping); else the vfio device fd, the BAR at its region offset (not 0:
        DPDK cannot use it; and whoever holds it can drive the whole function)."""
        resource = os.path.join(sysfs_device_dir(self.address), f"resource{index}")
        try:
            fd = os.open(resource, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("%s: %s cannot be opened: %s", self.address, resource, exc)
        else:
            try:
                mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE).close()
                return BarFile(fd, 0, os.fstat(fd).st_size, resource)
            except (OSError, ValueError) as exc:
                # CONFIG_IO_STRICT_DEVMEM refuses a BAR a driver has claimed.
                log.debug("%s: %s cannot be mapped: %s", self.address, resource, exc)
                os.close(fd)
        info = self._region(index)
        if not info.mmappable:
            raise PciError(f"{self.address}: BAR{index} is not mmappable through vfio")
        if not self._bar_fd_warned:
            self._bar_fd_warned = True
            log.warning("%s: handing the vfio device fd to a back-end for BAR%d (%s cannot "
                        "be mapped): it can drive the whole function", self.address, index,
                        resource)
        return BarFile(os.dup(self._device), info.offset, info.size,
                       f"{self.address} BAR{index} (vfio)")

    def _irq_count(self, index: int) -> int:
        buf = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        _ioctl(self._device, VFIO_DEVICE_GET_IRQ_INFO, buf, "VFIO_DEVICE_GET_IRQ_INFO")
        return int(IRQ_INFO.unpack(buf)[3])

    def _set_irqs(self, flags: int, start: int, count: int, fds: Sequence[int]) -> None:
        data = struct.pack(f"<{len(fds)}i", *fds)
        buf = bytearray(IRQ_SET.pack(IRQ_SET.size + len(data), flags, VFIO_PCI_MSIX_IRQ_INDEX,
                                     start, count) + data)
        _ioctl(self._device, VFIO_DEVICE_SET_IRQS, buf,
               f"{self.address}: VFIO_DEVICE_SET_IRQS(MSI-X, {count})")

    def enable_msix(self, count: int) -> list[int]:
        have = self._irq_count(VFIO_PCI_MSIX_IRQ_INDEX)
        if count > have:
            raise PciError(f"{self.address}: {count} MSI-X vectors wanted, vfio offers {have}")
        self.disable_msix()
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        try:
            self._set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, count,
                           fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._eventfds = fds
        return list(fds)

    def disable_msix(self) -> None:
        if not self._eventfds:
            return
        with contextlib.suppress(PciError):
            self._set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, ())
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []

    def alloc_dma(self, size: int) -> DmaBuffer:
        size = -(-size // HUGEPAGE) * HUGEPAGE if size > mmap.PAGESIZE * 16 else \
            -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        mapping = _anonymous(size)
        view = memoryview(mapping)
        view[:] = bytes(size)  # fault every page in before pinning
        holder = ctypes.c_char.from_buffer(mapping)
        vaddr = ctypes.addressof(holder)
        del holder
        iova = self._next_iova
        buf = bytearray(DMA_MAP.pack(DMA_MAP.size,
                                     VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                     vaddr, iova, size))
        try:
            _ioctl(self._container, VFIO_IOMMU_MAP_DMA, buf,
                   f"{self.address}: VFIO_IOMMU_MAP_DMA({size:#x} at {iova:#x})")
        except BaseException:
            view.release()
            mapping.close()
            raise
        self._next_iova += -(-size // HUGEPAGE) * HUGEPAGE + HUGEPAGE  # keep a gap
        entry = _Dma(iova, size, mapping, view)
        self._dma.append(entry)
        log.info("%s: DMA buffer of %d KiB at IOVA %#x", self.address, size >> 10, iova)
        return DmaBuffer(view, iova, lambda: self._release_dma(entry))

    def _release_dma(self, entry: _Dma) -> None:
        if entry not in self._dma:
            return
        self._dma.remove(entry)
        buf = bytearray(DMA_UNMAP.pack(DMA_UNMAP.size, 0, entry.iova, entry.size))
        with contextlib.suppress(PciError):
            _ioctl(self._container, VFIO_IOMMU_UNMAP_DMA, buf, "VFIO_IOMMU_UNMAP_DMA")
        entry.view.release()
        with contextlib.suppress(BufferError):
            entry.mapping.close()

    def close(self) -> None:
        if self._device >= 0:
            self.disable_msix()
        for entry in list(self._dma):
            self._release_dma(entry)
        for regs in self._registers.values():
            regs.close()
        self._registers.clear()
        for attr in ("_device", "_group", "_container"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)


def _anonymous(size: int) -> mmap.mmap:
    """Anonymous memory for DMA: 2 MiB hugetlb pages if the pool has them."""
    if size % HUGEPAGE == 0:
        try:
            return mmap.mmap(-1, size, mmap.MAP_PRIVATE | MAP_HUGETLB,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if exc.errno not in (errno.ENOMEM, errno.EINVAL):
                raise
    mapping = mmap.mmap(-1, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(AttributeError, OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


__all__ = ["VfioPciFunction", "bind_to_vfio", "iommu_group"]
