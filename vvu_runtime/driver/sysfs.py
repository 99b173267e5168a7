"""A PCI function through sysfs, without an IOMMU: the poll-mode fallback.

For an appliance VM without a vIOMMU (Debian's kernels have no no-IOMMU vfio),
DESIGN decision 6:

* the current driver (the guest's ``virtio_pci``) is unbound and
  ``driver_override`` is set to a name no driver has, so nothing rebinds;
* config space is the ``config`` file (pread/pwrite); memory decoding and Bus
  Master are set there by the driver;
* BARs are ``resourceN`` files, mmapped (registers and shared-memory windows);
* DMA buffers are 2 MiB hugetlb pages (they neither move nor swap) whose
  guest-physical addresses come from ``/proc/self/pagemap`` (root only); with
  no IOMMU the bus address is the guest-physical address. The device model
  reaches them through the guest-RAM fd it got at boot: no DMA_MAP messages;
* no interrupts: ``interrupts`` is False and the driver polls.

Trapped BAR writes are non-posted here (the shared-memory BAR is mmapped), so a
register write the device handles synchronously is done when the store returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import struct

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
from vvu_runtime.driver.vfio import HUGEPAGE, MAP_HUGETLB, current_driver

log = logging.getLogger(__name__)

#: driver_override value that matches no driver: keeps the function unbound.
NO_DRIVER = "vvu-userspace"
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def physical_addresses(vaddr: int, size: int, pagemap: str = "/proc/self/pagemap"
                       ) -> list[int]:
    """Physical address of every 4 KiB page of ``[vaddr, vaddr+size)`` (must be resident)."""
    page = mmap.PAGESIZE
    first = vaddr // page
    count = -(-(vaddr % page + size) // page)
    try:
        with open(pagemap, "rb", buffering=0) as f:
            f.seek(first * 8)
            raw = f.read(count * 8)
    except OSError as exc:
        raise PciError(f"cannot read {pagemap}: {exc.strerror or exc}") from exc
    if len(raw) != count * 8:
        raise PciError(f"{pagemap}: short read")
    out = []
    for i, entry in enumerate(struct.unpack(f"<{count}Q", raw)):
        pfn = entry & PAGEMAP_PFN_MASK
        if not entry & PAGEMAP_PRESENT or pfn == 0:
            raise PciError(f"page {first + i:#x} of a DMA buffer has no physical address in "
                           f"{pagemap} (not resident, or not root)")
        out.append(pfn * page)
    return out


def contiguous_base(phys: list[int]) -> int | None:
    """The first page's address if ``phys`` is one physically contiguous run."""
    page = mmap.PAGESIZE
    base = phys[0]
    return base if all(p == base + i * page for i, p in enumerate(phys)) else None


def _reserve_hugepages(count: int) -> None:
    """Make sure the hugetlb pool could hold ``count`` more pages (best effort, root)."""
    try:
        with open(NR_HUGEPAGES, encoding="ascii") as f:
            current = int(f.read())
        with open("/proc/meminfo", encoding="ascii") as f:
            free = next((int(line.split()[1]) for line in f if line.startswith("HugePages_Free")),
                        0)
        if free < count:
            with open(NR_HUGEPAGES, "w", encoding="ascii") as f:
                f.write(str(current + count - free))
    except (OSError, ValueError) as exc:
        log.debug("cannot grow the hugetlb pool: %s", exc)


class SysfsPciFunction(PciFunction):
    """The function at ``address`` through sysfs files (poll mode, no IOMMU)."""

    def __init__(self, address: str, *, unbind: bool = True) -> None:
        self.address = normalize_address(address)
        self.dir = sysfs_device_dir(self.address)
        self._registers: dict[int, Registers] = {}
        self._dma: list[tuple[mmap.mmap, memoryview]] = []
        self._config_fd = -1
        try:
            if unbind:
                self._unbind()
            self._config_fd = os.open(os.path.join(self.dir, "config"), os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise PciError(f"{self.address}: cannot open its config space: {exc}") from exc
        size = os.fstat(self._config_fd).st_size or 256
        self._config = FileRegisters(self._config_fd, 0, size, f"{self.address} config")

    def _unbind(self) -> None:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "driver_override"), "w",
                                                encoding="ascii") as f:
            f.write(NO_DRIVER)
        driver = current_driver(self.address)
        if driver is not None:
            log.info("%s: unbinding %s (sysfs poll mode)", self.address, driver)
            with open(os.path.join(self.dir, "driver", "unbind"), "w", encoding="ascii") as f:
                f.write(self.address)

    @property
    def interrupts(self) -> bool:
        return False

    def config_read(self, offset: int, size: int) -> int:
        return self._config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._config.write(offset, size, value)

    def _resource(self, index: int) -> str:
        return os.path.join(self.dir, f"resource{index}")

    def bar_size(self, index: int) -> int:
        try:
            return os.stat(self._resource(index)).st_size
        except FileNotFoundError:
            return 0

    def _open_resource(self, index: int) -> int:
        try:
            return os.open(self._resource(index), os.O_RDWR | os.O_CLOEXEC | os.O_SYNC)
        except OSError as exc:
            raise PciError(f"{self.address}: cannot open resource{index}: {exc}") from exc

    def registers(self, index: int) -> Registers:
        regs = self._registers.get(index)
        if regs is None:
            size = self.bar_size(index)
            if not size:
                raise PciError(f"{self.address}: BAR{index} is not implemented")
            fd = self._open_resource(index)
            try:
                mapping = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise PciError(f"{self.address}: cannot mmap resource{index}: {exc}") from exc
            finally:
                os.close(fd)
            regs = self._registers[index] = MmioRegisters(mapping, size)
        return regs

    def map_bar(self, index: int, offset: int, length: int) -> BarWindow:
        fd = self._open_resource(index)
        try:
            return map_window(fd, 0, self.bar_size(index), offset, length,
                              f"{self.address} resource{index}")
        finally:
            os.close(fd)

    def bar_file(self, index: int) -> BarFile:
        """The sysfs ``resourceN`` file: offset 0 is the BAR's start."""
        return BarFile(self._open_resource(index), 0, self.bar_size(index),
                       self._resource(index))

    def enable_msix(self, count: int) -> list[int]:
        raise PciError(f"{self.address}: no interrupts without vfio (sysfs poll mode)")

    def disable_msix(self) -> None:
        pass

    def alloc_dma(self, size: int) -> DmaBuffer:
        """Hugetlb memory, physically contiguous (one 2 MiB page, or a contiguous run)."""
        size = -(-size // HUGEPAGE) * HUGEPAGE
        _reserve_hugepages(size // HUGEPAGE)
        try:
            mapping = mmap.mmap(-1, size, mmap.MAP_PRIVATE | MAP_HUGETLB,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise PciError(f"{self.address}: no hugetlb memory for a {size >> 20} MiB DMA "
                           f"buffer ({exc.strerror}); reserve some in {NR_HUGEPAGES}") from exc
        view = memoryview(mapping)
        view[:] = bytes(size)  # fault the pages in
        holder = ctypes.c_char.from_buffer(mapping)
        vaddr = ctypes.addressof(holder)
        del holder
        try:
            base = contiguous_base(physical_addresses(vaddr, size))
        except PciError:
            view.release()
            mapping.close()
            raise
        if base is None:
            view.release()
            mapping.close()
            raise PciError(f"{self.address}: a {size >> 20} MiB DMA buffer is not physically "
                           "contiguous; allocate 2 MiB at a time")
        entry = (mapping, view)
        self._dma.append(entry)
        log.info("%s: DMA buffer of %d KiB at guest-physical %#x", self.address, size >> 10,
                 base)
        return DmaBuffer(view, base, lambda: self._release(entry))

    def _release(self, entry: tuple[mmap.mmap, memoryview]) -> None:
        if entry in self._dma:
            self._dma.remove(entry)
            entry[1].release()
            with contextlib.suppress(BufferError):
                entry[0].close()

    def close(self) -> None:
        for entry in list(self._dma):
            self._release(entry)
        for regs in self._registers.values():
            regs.close()
        self._registers.clear()
        if self._config_fd >= 0:
            os.close(self._config_fd)
            self._config_fd = -1


__all__ = ["SysfsPciFunction", "contiguous_base", "physical_addresses"]
