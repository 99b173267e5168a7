"""What the vfio-user server needs from a device: the contract ``PciDevice`` fulfils.

The server owns the socket, framing and message validation; the device owns the
regions, interrupts and the DMA table. Every method may raise a
:class:`~vvu_runtime.device.errors.DeviceError`, which becomes an error reply to the
message being served. Methods never receive fds they must close: the server closes
every fd of a message after handling it, and a device keeping one ``os.dup``s it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from vvu_runtime.device.dma import DmaTable
from vvu_runtime.device.vfio_user.protocol import IrqInfoFlags, RegionFlags, SparseArea


@dataclass(frozen=True, slots=True)
class RegionDescription:
    """One region as DEVICE_GET_REGION_INFO describes it."""

    size: int
    flags: RegionFlags
    #: Sent with the reply when ``flags`` has MMAP (QEMU takes exactly one fd).
    fd: int | None = None
    #: mmap offset of the region inside ``fd``.
    fd_offset: int = 0
    #: Windows QEMU may mmap (relative to ``fd_offset``); the rest stays trapped.
    #: Empty with MMAP set means "the whole region".
    sparse_areas: tuple[SparseArea, ...] = ()


@dataclass(frozen=True, slots=True)
class IrqDescription:
    """One interrupt index as DEVICE_GET_IRQ_INFO describes it."""

    flags: IrqInfoFlags
    count: int


class VfioUserDevice(ABC):
    """A device served over vfio-user."""

    #: Names the device in every log line and error message.
    name: str
    #: The IOVA table DMA_MAP/DMA_UNMAP fill.
    dma: DmaTable

    @property
    @abstractmethod
    def device_flags(self) -> int:
        """DEVICE_GET_INFO flags (RESET, PCI)."""

    @property
    @abstractmethod
    def num_regions(self) -> int: ...

    @property
    @abstractmethod
    def num_irqs(self) -> int: ...

    @abstractmethod
    def region_info(self, index: int) -> RegionDescription:
        """Raise RegionAccessError for an index past ``num_regions``."""

    @abstractmethod
    def irq_info(self, index: int) -> IrqDescription:
        """Raise IrqError for an index past ``num_irqs``."""

    @abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Exactly ``count`` bytes; RegionAccessError when out of range."""

    @abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """RegionAccessError when out of range."""

    @abstractmethod
    def set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int],
                 data: bytes) -> None:
        """DEVICE_SET_IRQS; ``fds`` stay owned by the caller."""

    @abstractmethod
    def reset(self) -> None:
        """DEVICE_RESET: back to the power-on state (DMA maps and eventfds stay)."""

    @abstractmethod
    def client_connected(self) -> None:
        """A client connected; it will negotiate, map memory and probe from scratch."""

    @abstractmethod
    def client_disconnected(self) -> None:
        """The client is gone: drop its DMA maps and eventfds, reset the device."""
