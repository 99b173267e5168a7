"""A :class:`PciFunction` over the in-process vfio-user client: a test double of the
PCI layer only.

``VfioUserPciFunction`` plays the part that the guest kernel (vfio-pci) and QEMU's
vfio-user client play in an appliance, so everything above it - the virtio-pci
driver, the VVU driver, the VVU transport, the backend session - is the real code
talking to a real device model (``vvu_runtime.device``) over a socket:

* config and trapped BAR accesses are REGION_READ/REGION_WRITE;
* a BAR whose region is mmappable (the VVU shared-memory BAR) is mmapped from the
  region fd, at the region's ``offset``, as QEMU does;
* MSI-X: the MSI-X enable bit is set in config space (QEMU and the guest kernel
  do that) and one eventfd per vector goes to the server with SET_IRQS;
* DMA buffers are memfds DMA_MAPped at IOVAs allocated from ``iova_base``
  (the guest's VFIO_IOMMU_MAP_DMA, one message for the whole buffer here).

``interrupts=False`` makes it behave like the sysfs path: no MSI-X, the driver polls.
The client is blocking: run the device model's server in another thread
(``ServerThread``) or process.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from tests.support.guest_ram import sealed_memfd
from tests.support.vfio_user_client import RegionInfoResult, VfioUserClient
from vvu_runtime.device.errors import DeviceError as VfioUserError
from vvu_runtime.device.vfio_user.protocol import (
    IrqSetFlags,
    PciIrq,
    RegionFlags,
)
from vvu_runtime.driver.errors import PciError
from vvu_runtime.driver.pci import (
    CAP_ID_MSIX,
    MSIX_CONTROL_ENABLE,
    BarFile,
    BarWindow,
    DmaBuffer,
    PciFunction,
    Registers,
    map_window,
)

_TRIGGER_EVENTFD = int(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER)
_DISABLE = int(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER)


@dataclass(eq=False, slots=True)
class _DmaMapping:
    iova: int
    size: int
    fd: int
    mapping: mmap.mmap
    view: memoryview


class ClientRegisters(Registers):
    """Trapped accesses as REGION_READ / REGION_WRITE."""

    __slots__ = ("client", "index", "length")

    def __init__(self, client: VfioUserClient, index: int, length: int) -> None:
        self.client = client
        self.index = index
        self.length = length

    def read(self, offset: int, size: int) -> int:
        try:
            return int.from_bytes(self.client.region_read(self.index, offset, size), "little")
        except VfioUserError as exc:
            raise PciError(f"BAR{self.index} read at {offset:#x}: {exc}") from exc

    def write(self, offset: int, size: int, value: int) -> None:
        try:
            self.client.region_write(self.index, offset, value.to_bytes(size, "little"))
        except VfioUserError as exc:
            raise PciError(f"BAR{self.index} write at {offset:#x}: {exc}") from exc


class VfioUserPciFunction(PciFunction):
    """The PCI function a vfio-user server presents, driven through ``client``.

    The client must have negotiated VERSION already. ``close()`` unmaps the DMA
    buffers, disables MSI-X and closes the region fds, not the client.
    """

    def __init__(self, client: VfioUserClient, *, interrupts: bool = True,
                 iova_base: int = 0x1000_0000, name: str = "vfio-user") -> None:
        self.client = client
        self.address = name
        self._interrupts = interrupts
        self._next_iova = iova_base
        self._regions: dict[int, RegionInfoResult] = {}
        self._registers: dict[int, Registers] = {}
        self._eventfds: list[int] = []
        self._dma: list[_DmaMapping] = []

    @property
    def interrupts(self) -> bool:
        return self._interrupts

    def _region(self, index: int) -> RegionInfoResult:
        info = self._regions.get(index)
        if info is None:
            try:
                info = self.client.get_region_info(index)
            except VfioUserError as exc:
                raise PciError(f"{self.address}: region {index} info: {exc}") from exc
            self._regions[index] = info
        return info

    def config_read(self, offset: int, size: int) -> int:
        try:
            return self.client.config_read(offset, size)
        except VfioUserError as exc:
            raise PciError(f"{self.address}: config read at {offset:#x}: {exc}") from exc

    def config_write(self, offset: int, size: int, value: int) -> None:
        try:
            self.client.config_write(offset, size, value)
        except VfioUserError as exc:
            raise PciError(f"{self.address}: config write at {offset:#x}: {exc}") from exc

    def bar_size(self, index: int) -> int:
        return self._region(index).info.size

    def registers(self, index: int) -> Registers:
        regs = self._registers.get(index)
        if regs is None:
            size = self.bar_size(index)
            if not size:
                raise PciError(f"{self.address}: BAR{index} is not implemented")
            regs = self._registers[index] = ClientRegisters(self.client, index, size)
        return regs

    def map_bar(self, index: int, offset: int, length: int) -> BarWindow:
        region = self._region(index)
        if not region.info.flags & RegionFlags.MMAP or region.fd is None:
            raise PciError(f"{self.address}: BAR{index} is not mmappable")
        return map_window(region.fd, region.info.offset, region.info.size, offset, length,
                          f"{self.address} BAR{index}")

    def bar_file(self, index: int) -> BarFile:
        """The region fd QEMU would mmap (for the in-process chain: the RAM file)."""
        region = self._region(index)
        if not region.info.flags & RegionFlags.MMAP or region.fd is None:
            raise PciError(f"{self.address}: BAR{index} is not mmappable")
        return BarFile(os.dup(region.fd), region.info.offset, region.info.size,
                       f"{self.address} BAR{index}")

    def enable_msix(self, count: int) -> list[int]:
        if not self._interrupts:
            raise PciError(f"{self.address}: no interrupts on this function (poll mode)")
        cap = self.find_capability(CAP_ID_MSIX)
        if cap is None or count > self.msix_table_size():
            raise PciError(f"{self.address}: {count} MSI-X vectors wanted, the function has "
                           f"{self.msix_table_size()}")
        self.disable_msix()
        control = self.config_read(cap.offset + 2, 2)
        self.config_write(cap.offset + 2, 2, control | MSIX_CONTROL_ENABLE)
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        try:
            self._set_irqs(_TRIGGER_EVENTFD, 0, count, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._eventfds = fds
        return list(fds)

    def _set_irqs(self, flags: int, start: int, count: int, fds: Sequence[int]) -> None:
        try:
            self.client.set_irqs(PciIrq.MSIX, flags, start, count, fds)
        except VfioUserError as exc:
            raise PciError(f"{self.address}: SET_IRQS: {exc}") from exc

    def disable_msix(self) -> None:
        if not self._eventfds:
            return
        with contextlib.suppress(PciError):
            self._set_irqs(_DISABLE, 0, 0, ())
            cap = self.find_capability(CAP_ID_MSIX)
            if cap is not None:
                control = self.config_read(cap.offset + 2, 2)
                self.config_write(cap.offset + 2, 2, control & ~MSIX_CONTROL_ENABLE)
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []

    def alloc_dma(self, size: int) -> DmaBuffer:
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = sealed_memfd("vvu-driver-dma", size)
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        iova = self._next_iova
        try:
            self.client.dma_map(iova, size, fd)
        except VfioUserError as exc:
            mapping.close()
            os.close(fd)
            raise PciError(f"{self.address}: DMA_MAP of {size:#x} bytes at {iova:#x}: "
                           f"{exc}") from exc
        self._next_iova += size + 0x10000  # a guard gap between buffers
        entry = _DmaMapping(iova, size, fd, mapping, memoryview(mapping))
        self._dma.append(entry)
        return DmaBuffer(entry.view, iova, lambda: self._release_dma(entry))

    def _release_dma(self, entry: _DmaMapping) -> None:
        if entry not in self._dma:
            return
        self._dma.remove(entry)
        with contextlib.suppress(VfioUserError, OSError):
            self.client.dma_unmap(entry.iova, entry.size)
        entry.view.release()
        with contextlib.suppress(BufferError):
            entry.mapping.close()  # a slice still held elsewhere keeps it until it goes
        os.close(entry.fd)

    def close(self) -> None:
        self.disable_msix()
        for entry in list(self._dma):
            self._release_dma(entry)
        for regs in self._registers.values():
            regs.close()
        self._registers.clear()
        for info in self._regions.values():
            if info.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(info.fd)
        self._regions.clear()


__all__ = ["ClientRegisters", "VfioUserPciFunction"]
