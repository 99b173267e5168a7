"""What a hostile appliance driver does to a VVU function, as a list of operations.

Both the register-file harness (operations applied to the device object) and the
vfio-user harness (operations encoded as vfio-user messages) draw their
operations here: usually the bring-up a driver does (bus master, MSI-X with
eventfds, reset, feature negotiation, rxq/txq in DMA-mapped memory, kick
vectors, DRIVER_OK, BACKEND_UP, notifies, doorbells), then arbitrary register
reads and writes aimed mostly at real registers, DMA maps and unmaps, interrupt
setups, resets, and a driver rewriting its rings.

The appliance's RAM is one memfd of :data:`~fuzz.guest_ram.RAM_SIZE` bytes,
DMA-mapped at IOVA 0, so the ring layouts of :mod:`fuzz.guest_ram` (whose
guest-physical addresses start at 0) are the rings' DMA addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuzz.guest_ram import AVAIL_AT, DESC_AT, RAM_SIZE, REGION_SIZE, USED_AT
from fuzz.source import ByteSource
from vvu_runtime.device.vfio_user.protocol import IrqSetFlags, PciIrq, PciRegion
from vvu_runtime.device.virtio_pci import DeviceStatus
from vvu_runtime.device.vvu import VvuDevice
from vvu_runtime.virtio.pci_layout import Common
from vvu_runtime.virtio.vvu_abi import AUX_BAR, DOORBELL_OFFSET, KICK_CFG_OFFSET

COMMON_BAR, COMMON_AT, DEVICE_CFG_AT, NOTIFY_AT = 0, 0x0, 0x2000, 0x3000
EVENTFD_TRIGGER = int(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER)


@dataclass(frozen=True, slots=True)
class Read:
    region: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Write:
    region: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DmaMapOp:
    iova: int
    size: int
    flags: int
    fd_offset: int
    fd_kind: str  # "ram", "none", "event", "devnull"


@dataclass(frozen=True, slots=True)
class DmaUnmapOp:
    iova: int
    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class SetIrqs:
    index: int
    flags: int
    start: int
    count: int
    nfds: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Other:
    """reset, info queries, ring scribbles, interrupt pokes (by ``what``)."""

    what: str
    index: int = 0


Op = Read | Write | DmaMapOp | DmaUnmapOp | SetIrqs | Other


def _common(field: int, size: int, value: int) -> Write:
    return Write(COMMON_BAR, COMMON_AT + field, (value & ((1 << 8 * size) - 1)).to_bytes(
        size, "little"))


class Driver:
    """Turns an input into operations on one :class:`VvuDevice`."""

    def __init__(self, device: VvuDevice) -> None:
        self.device = device
        self.structures = [(s.bar, s.offset, s.length) for s in device.layout.structures]
        self.msix_cap = device.msix_cap_offset
        self.vectors = device.layout.msix.vectors
        self.regions = [(b.index, b.size) for b in device.layout.bars]

    def bring_up(self, src: ByteSource, ring_size: int) -> list[Op]:
        ops: list[Op] = [
            DmaMapOp(0, RAM_SIZE, 3, 0, "ram"),
            Write(PciRegion.CONFIG, 0x04, (0x6).to_bytes(2, "little")),
            Write(PciRegion.CONFIG, self.msix_cap + 2, (1 << 15).to_bytes(2, "little")),
            SetIrqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, self.vectors, self.vectors, b""),
            _common(Common.DEVICE_STATUS, 1, 0),
            _common(Common.DEVICE_STATUS, 1, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER),
            _common(Common.DEVICE_FEATURE_SELECT, 4, 0),
            Read(COMMON_BAR, Common.DEVICE_FEATURE, 4),
            _common(Common.DRIVER_FEATURE_SELECT, 4, 0),
            _common(Common.DRIVER_FEATURE, 4, src.edge_int(32, 0)),
            _common(Common.DRIVER_FEATURE_SELECT, 4, 1),
            _common(Common.DRIVER_FEATURE, 4, src.edge_int(32, 0x3)),  # VERSION_1, PLATFORM
            _common(Common.DEVICE_STATUS, 1, src.edge_int(8, 0b1011)),
        ]
        for q, base in ((0, 0), (1, REGION_SIZE)):
            ops += [
                _common(Common.QUEUE_SELECT, 2, q),
                _common(Common.QUEUE_SIZE, 2, src.edge_int(16, ring_size)),
                _common(Common.QUEUE_DESC, 8, src.edge_int(64, base + DESC_AT)),
                _common(Common.QUEUE_DRIVER, 8, src.edge_int(64, base + AVAIL_AT)),
                _common(Common.QUEUE_DEVICE, 8, src.edge_int(64, base + USED_AT)),
                _common(Common.QUEUE_MSIX_VECTOR, 2, src.edge_int(16, 1 + q)),
                _common(Common.QUEUE_ENABLE, 2, src.edge_int(16, 1)),
            ]
        for i in range(src.below(4)):
            ops += [Write(AUX_BAR, KICK_CFG_OFFSET, i.to_bytes(2, "little")),
                    Write(AUX_BAR, KICK_CFG_OFFSET + 2, (3 + i).to_bytes(2, "little"))]
        ops += [
            _common(Common.DEVICE_STATUS, 1, src.edge_int(8, 0b1111)),
            Write(COMMON_BAR, DEVICE_CFG_AT, src.edge_int(32, 1).to_bytes(4, "little")),
            Write(COMMON_BAR, NOTIFY_AT, (0).to_bytes(2, "little")),
            Write(COMMON_BAR, NOTIFY_AT + 4, (1).to_bytes(2, "little")),  # txq
        ]
        return ops

    def _value(self, src: ByteSource, size: int) -> bytes:
        if size == 0:
            return b""
        return src.edge_int(8 * size, src.below(4)).to_bytes(size, "little")

    def random_op(self, src: ByteSource) -> Op:
        kind = src.below(32)
        size = src.pick((4, 2, 1, 8, 3, 16, 0, 64))
        if kind < 14:  # a register of a virtio structure
            bar, offset, length = src.pick(self.structures)
            at = offset + (src.below(length) & ~(min(size, 8) - 1) if size else 0)
            if src.chance(50):
                return Read(bar, src.edge_int(32, at), size)
            return Write(bar, src.edge_int(32, at), self._value(src, size))
        if kind < 18:  # config space: header, capabilities, MSI-X control
            at = src.pick((0x04, self.msix_cap, self.msix_cap + 2, 0x3C, 0x10, 0x18, 0x20,
                           src.below(256), src.below(4096)))
            if src.chance(50):
                return Read(PciRegion.CONFIG, at, size)
            return Write(PciRegion.CONFIG, at, self._value(src, size))
        if kind < 20:  # anywhere in a BAR (MSI-X table, shared memory, doorbells...)
            index, bar_size = src.pick(self.regions)
            at = src.edge_int(64, src.below(max(bar_size, 1)))
            if src.chance(50):
                return Read(index, at, src.edge_int(32, size))
            return Write(index, at, src.take(size))
        if kind == 20:
            return Write(AUX_BAR, DOORBELL_OFFSET + 4 * src.below(16), self._value(src, 4))
        if kind == 21:
            return Write(COMMON_BAR, NOTIFY_AT + 4 * src.below(3), self._value(src, 2))
        if kind == 22:
            return DmaMapOp(src.edge_int(64, src.pick((0, RAM_SIZE, 0x100000))),
                            src.edge_int(64, src.pick((4096, RAM_SIZE, 0x10000))),
                            src.edge_int(32, 3), src.edge_int(64, 0),
                            src.pick(("ram", "none", "event", "devnull")))
        if kind == 23:
            return DmaUnmapOp(src.edge_int(64, 0), src.edge_int(64, 4096),
                              src.pick((0, 2, 1, src.uint(4))))
        if kind == 24:
            flags = src.pick((EVENTFD_TRIGGER,
                              int(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER),
                              int(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER),
                              int(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK),
                              int(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK),
                              src.uint(4)))
            count = src.edge_int(32, src.below(self.vectors + 1))
            nfds = min(count, 16) if flags & IrqSetFlags.DATA_EVENTFD else 0
            return SetIrqs(src.pick((PciIrq.MSIX, PciIrq.INTX, PciIrq.MSI, PciIrq.ERR, 9)),
                           flags, src.edge_int(32, 0), count, src.edge_int(8, nfds),
                           src.take(src.below(8)))
        return Other(src.pick(("scribble", "scribble", "poke", "reset", "region_info",
                               "irq_info", "info")), src.below(12))
