"""The virtio-pci modern transport (VIRTIO 1.2 §4.1) on top of :class:`PciDevice`.

The BAR layout is declarative: a :class:`VirtioPciLayout` lists the BARs and,
for each virtio structure, where it lives and which capability points at it.
The config-space capabilities, the BAR dispatch and :meth:`VirtioPciLayout.describe`
(the table the VVU ABI documentation is generated from) all come from that one
table, so they cannot disagree.

Standard layout (:meth:`VirtioPciLayout.standard`)::

    BAR0  trapped, 32-bit, 16 KiB
          0x0000  common cfg     (cap type 1, 0x3c bytes)
          0x1000  ISR            (cap type 3, read clears)
          0x2000  device cfg     (cap type 4, device specific)
          0x3000  notify         (cap type 2, queue i at i * multiplier)
    BAR1  trapped, 32-bit        MSI-X table at 0, PBA in the upper half
    + the subclass's BARs and structures (VVU: aux notifications, shared memory)
    + the PCI cfg access capability (type 5) in config space

Ring memory is reached through the DMA table (IOVAs, DESIGN decision 6): the
transport builds a :class:`~vvu_runtime.virtio.split.SplitQueue` over
:class:`~vvu_runtime.device.dma.DmaMemory` when the driver enables a queue, and
drops it (NEEDS_RESET) if the driver unmaps that memory while the queue lives.

What a subclass provides (see :class:`VirtioPciDevice`): the virtio device ID and
feature bits, its config space (``read_device_config``/``write_device_config``),
``queue_notified(index)``, ``driver_ok()`` and ``virtio_reset()``. It raises
interrupts with :meth:`VirtioPciDevice.interrupt_queue` and
:meth:`VirtioPciDevice.config_changed`, and reports its own broken state with
:meth:`VirtioPciDevice.needs_reset`.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from vvu_runtime.device.dma import DmaMemory
from vvu_runtime.device.errors import DeviceModelError
from vvu_runtime.device.pci import (
    Bar,
    CapabilityId,
    MappedBar,
    MsixLayout,
    PciDevice,
    PciIdentity,
    ReadHandler,
    WriteHandler,
)
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.pci_layout import (
    COMMON_CFG,
    COMMON_CFG_SIZE,
    NO_VECTOR,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_MODERN_DEVICE_BASE,
    VIRTIO_PCI_SUBSYSTEM_ID,
    VIRTIO_PCI_VENDOR_ID,
    Common,
    DeviceStatus,
    IsrBit,
    VirtioPciCapType,
)
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.split import SplitQueue, check_queue_size

#: Split used ring: le16 flags, le16 idx, then (le32 id, le32 len) per entry.
USED_RING_HEADER = 4
USED_ELEM_SIZE = 8

log = logging.getLogger(__name__)

# --- the declarative layout ------------------------------------------------------------


class BarKind(enum.Enum):
    TRAPPED = "trapped"
    MAPPED = "mmapped"


@dataclass(frozen=True, slots=True)
class BarDecl:
    """One BAR of the layout. MAPPED BARs are supplied as objects by the subclass."""

    index: int
    size: int
    name: str
    kind: BarKind = BarKind.TRAPPED
    is_64bit: bool = False
    prefetchable: bool = False


@dataclass(frozen=True, slots=True)
class VirtioStructure:
    """A virtio structure in a BAR and the vendor capability that points at it."""

    name: str
    cfg_type: VirtioPciCapType
    bar: int
    offset: int
    length: int
    #: The capability's ``id`` byte (the shmid of a shared-memory region).
    cap_id: int = 0
    #: notify_off_multiplier (type 2) or the aux-notification multiplier (type 6).
    multiplier: int = 0
    #: What the structure is, for the generated ABI table.
    doc: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.length

    def capability_body(self) -> bytes:
        """The capability after cap_vndr/cap_next."""
        body = VIRTIO_PCI_CAP.pack(self.cfg_type.cap_len, self.cfg_type, self.bar, self.cap_id,
                                   self.offset & 0xFFFFFFFF, self.length & 0xFFFFFFFF)
        if self.cfg_type.has_multiplier:
            body += struct.pack("<I", self.multiplier)
        elif self.cfg_type is VirtioPciCapType.SHARED_MEMORY_CFG:
            body += struct.pack("<II", self.offset >> 32, self.length >> 32)
        return body


def _pow2_at_least(value: int, floor: int) -> int:
    size = floor
    while size < value:
        size <<= 1
    return size


@dataclass(frozen=True, slots=True)
class VirtioPciLayout:
    """Every BAR and virtio structure of a device: the single source of its PCI ABI."""

    bars: tuple[BarDecl, ...]
    structures: tuple[VirtioStructure, ...]
    msix: MsixLayout

    @classmethod
    def standard(cls, *, num_queues: int, device_cfg_size: int, msix_vectors: int,
                 notify_multiplier: int = 4, extra_bars: Sequence[BarDecl] = (),
                 extra_structures: Sequence[VirtioStructure] = ()) -> VirtioPciLayout:
        """BAR0 = the four standard structures, BAR1 = MSI-X, plus the extras."""
        if device_cfg_size > 0x1000:
            raise DeviceModelError(f"device config of {device_cfg_size} bytes does not fit "
                                   "the 4 KiB slot of the standard layout")
        notify_len = max(2, num_queues * notify_multiplier) if notify_multiplier else 2
        if notify_len > 0x1000:
            raise DeviceModelError(f"{num_queues} queues x {notify_multiplier} bytes of notify "
                                   "area do not fit 4 KiB")
        structures = [
            VirtioStructure("common", VirtioPciCapType.COMMON_CFG, 0, 0x0000, COMMON_CFG_SIZE,
                            doc="common configuration"),
            VirtioStructure("isr", VirtioPciCapType.ISR_CFG, 0, 0x1000, 4,
                            doc="ISR status, read to clear (bit 0 queue, bit 1 config)"),
        ]
        if device_cfg_size:
            structures.append(VirtioStructure("device", VirtioPciCapType.DEVICE_CFG, 0, 0x2000,
                                              device_cfg_size, doc="device configuration"))
        structures.append(VirtioStructure(
            "notify", VirtioPciCapType.NOTIFY_CFG, 0, 0x3000, notify_len,
            multiplier=notify_multiplier,
            doc=f"queue notify: queue i at i * {notify_multiplier}, le16 write"))
        msix_table = msix_vectors * 16
        pba = (msix_vectors + 63) // 64 * 8
        msix_bar_size = _pow2_at_least(2 * max(msix_table, pba), 0x1000)
        msix = MsixLayout(msix_vectors, 1, 0, 1, msix_bar_size // 2)
        bars = (BarDecl(0, 0x4000, "virtio registers"),
                BarDecl(1, msix_bar_size, "MSI-X table and PBA"), *extra_bars)
        return cls(bars, (*structures, *extra_structures), msix)

    def structure(self, cfg_type: VirtioPciCapType, cap_id: int | None = None) -> VirtioStructure:
        for s in self.structures:
            if s.cfg_type is cfg_type and (cap_id is None or s.cap_id == cap_id):
                return s
        raise KeyError(f"no {cfg_type.name} structure in the layout")

    def validate(self) -> None:
        bars = {b.index: b for b in self.bars}
        for s in self.structures:
            bar = bars.get(s.bar)
            if bar is None:
                raise DeviceModelError(f"structure {s.name} is in BAR{s.bar}, which the layout "
                                       "does not declare")
            if s.offset < 0 or s.length <= 0 or s.end > bar.size:
                raise DeviceModelError(f"structure {s.name} [{s.offset:#x}, +{s.length:#x}) "
                                       f"does not fit BAR{s.bar} ({bar.size:#x} bytes)")
            if s.cfg_type is not VirtioPciCapType.SHARED_MEMORY_CFG and (
                    s.offset > 0xFFFFFFFF or s.length > 0xFFFFFFFF):
                raise DeviceModelError(f"structure {s.name}: only shared memory has 64-bit "
                                       "offset/length")
            if s.cfg_type is VirtioPciCapType.SHARED_MEMORY_CFG and (
                    s.offset % 4096 or s.length % 4096):
                raise DeviceModelError(f"shared memory {s.name} must be 4 KiB aligned")

    def describe(self) -> str:
        """A Markdown table of the layout (documentation is generated from this)."""
        rows = ["| BAR | offset | length | what | capability |",
                "| --- | --- | --- | --- | --- |"]
        for b in self.bars:
            width = "64-bit" if b.is_64bit else "32-bit"
            pref = ", prefetchable" if b.prefetchable else ""
            rows.append(f"| {b.index} | | {b.size:#x} | **{b.name}** ({b.kind.value}, "
                        f"{width}{pref}) | |")
            for s in sorted((s for s in self.structures if s.bar == b.index),
                            key=lambda s: s.offset):
                cap = f"vendor cap type {int(s.cfg_type)} ({s.cfg_type.name})"
                if s.cfg_type is VirtioPciCapType.SHARED_MEMORY_CFG:
                    cap += f", shmid {s.cap_id}"
                if s.cfg_type.has_multiplier:
                    cap += f", multiplier {s.multiplier}"
                rows.append(f"| {b.index} | {s.offset:#x} | {s.length:#x} | "
                            f"{s.doc or s.name} | {cap} |")
            m = self.msix
            if m.table_bar == b.index:
                rows.append(f"| {b.index} | {m.table_offset:#x} | {m.table_size:#x} | MSI-X "
                            f"table, {m.vectors} vectors | MSI-X cap |")
            if m.pba_bar == b.index:
                rows.append(f"| {b.index} | {m.pba_offset:#x} | {m.pba_size:#x} | MSI-X PBA | "
                            "MSI-X cap |")
        return "\n".join(rows)


# --- queues ----------------------------------------------------------------------------


@dataclass(slots=True)
class QueueState:
    """What the driver programmed for one queue, and the ring once it is live."""

    index: int
    max_size: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    ring: SplitQueue | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.ring = None

    def ranges(self) -> list[tuple[int, int]]:
        """IOVA ranges of the three ring parts (split layout)."""
        n = self.size
        return [(self.desc, 16 * n), (self.driver, 6 + 2 * n), (self.device, 6 + 8 * n)]


# --- the transport ---------------------------------------------------------------------


class VirtioPciDevice(PciDevice):
    """A virtio device behind the modern PCI transport.

    Subclasses call ``__init__`` with their identity and queues, then override
    the hooks. Everything runs on the server's event loop; hooks must not block.
    """

    #: Transport/ring features always offered: the split ring here supports both
    #: indirect descriptors and EVENT_IDX; ACCESS_PLATFORM because all our DMA goes
    #: through the client's IOVA space (a guest vIOMMU translates it).
    TRANSPORT_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
                          | VirtioFeature.INDIRECT_DESC | VirtioFeature.EVENT_IDX)

    def __init__(self, *, name: str, virtio_device_id: int, num_queues: int,
                 device_features: int = 0, queue_max_size: int | Sequence[int] = 256,
                 device_cfg_size: int = 0, msix_vectors: int | None = None,
                 class_code: int = 0xFF0000, pci_device_id: int | None = None,
                 extra_bars: Sequence[Bar] = (),
                 extra_structures: Sequence[VirtioStructure] = (),
                 notify_multiplier: int = 4) -> None:
        if num_queues < 1:
            raise DeviceModelError(f"{name}: a virtio device needs at least one queue")
        sizes = ([queue_max_size] * num_queues if isinstance(queue_max_size, int)
                 else list(queue_max_size))
        if len(sizes) != num_queues:
            raise DeviceModelError(f"{name}: {len(sizes)} queue sizes for {num_queues} queues")
        for i, s in enumerate(sizes):
            try:
                check_queue_size(s, i)
            except VirtioError as exc:
                raise DeviceModelError(f"{name}: {exc}") from exc
        vectors = msix_vectors if msix_vectors is not None else num_queues + 1
        extra_decls = [BarDecl(b.index, b.size, b.name,
                               BarKind.MAPPED if isinstance(b, MappedBar) else BarKind.TRAPPED,
                               b.is_64bit, b.prefetchable) for b in extra_bars]
        self.layout = VirtioPciLayout.standard(
            num_queues=num_queues, device_cfg_size=device_cfg_size, msix_vectors=vectors,
            notify_multiplier=notify_multiplier, extra_bars=extra_decls,
            extra_structures=extra_structures)
        self.layout.validate()
        bars: list[Bar] = [Bar(d.index, d.size, name=d.name, is_64bit=d.is_64bit,
                               prefetchable=d.prefetchable) for d in self.layout.bars[:2]]
        bars.extend(extra_bars)
        identity = PciIdentity(
            VIRTIO_PCI_VENDOR_ID,
            pci_device_id if pci_device_id is not None
            else VIRTIO_PCI_MODERN_DEVICE_BASE + virtio_device_id,
            class_code, revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID)
        super().__init__(identity, bars, msix=self.layout.msix, intx=True, name=name)

        self.virtio_device_id = virtio_device_id
        self.device_features = device_features
        self.offered_features = device_features | int(self.TRANSPORT_FEATURES)
        self.device_cfg_size = device_cfg_size
        self.notify_multiplier = notify_multiplier
        self.queues = [QueueState(i, s) for i, s in enumerate(sizes)]
        self.memory = DmaMemory(self.dma)
        self.dma.add_unmap_listener(self._dma_unmapped)
        self._reset_transport()
        self._install_structures()
        self._install_pci_cfg_cap()

    # --- state --------------------------------------------------------------------

    def _reset_transport(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        for q in self.queues:
            q.reset()

    @property
    def negotiated_features(self) -> int:
        """Driver features once FEATURES_OK stuck (0 before)."""
        return self.driver_features if self.status & DeviceStatus.FEATURES_OK else 0

    @property
    def driver_ready(self) -> bool:
        return bool(self.status & DeviceStatus.DRIVER_OK) and not (
            self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    # --- layout → BAR ranges and capabilities -------------------------------------------

    def _install_structures(self) -> None:
        handlers = {
            VirtioPciCapType.COMMON_CFG: (self._common_read, self._common_write),
            VirtioPciCapType.ISR_CFG: (self._isr_read, self._isr_write),
            VirtioPciCapType.NOTIFY_CFG: (self._notify_read, self._notify_write),
            VirtioPciCapType.DEVICE_CFG: (self._device_cfg_read, self._device_cfg_write),
        }
        for s in self.layout.structures:
            bar = self.bars[s.bar]
            if not isinstance(bar, MappedBar) or s.cfg_type is not \
                    VirtioPciCapType.SHARED_MEMORY_CFG:
                pair = handlers.get(s.cfg_type)
                if pair is not None:
                    bar.add_range(s.name, s.offset, s.length, *pair)
                elif not isinstance(bar, MappedBar):
                    bar.add_range(s.name, s.offset, s.length,
                                  self._structure_reader(s), self._structure_writer(s))
            self.config.add_capability(CapabilityId.VENDOR, s.capability_body())

    def _structure_reader(self, s: VirtioStructure) -> ReadHandler:
        return lambda offset, size: self.read_structure(s, offset, size)

    def _structure_writer(self, s: VirtioStructure) -> WriteHandler:
        return lambda offset, data: self.write_structure(s, offset, data)

    def _install_pci_cfg_cap(self) -> None:
        """VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space."""
        body = VIRTIO_PCI_CAP.pack(VirtioPciCapType.PCI_CFG.cap_len, VirtioPciCapType.PCI_CFG,
                                   0, 0, 0, 0) + bytes(4)
        # bar, offset, length and the data window are driver-writable.
        wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + bytes(4)
        offset = self.config.add_capability(CapabilityId.VENDOR, body, wmask)
        data_at = offset + 16
        self._pci_cfg_offset = offset
        self.config.add_window(data_at, 4, self._pci_cfg_data_read, self._pci_cfg_data_write)

    def _pci_cfg_target(self) -> tuple[int, int, int] | None:
        c = self.config
        bar = c.u8(self._pci_cfg_offset + 4)
        offset = c.u32(self._pci_cfg_offset + 8)
        length = c.u32(self._pci_cfg_offset + 12)
        if bar not in self.bars or length not in (1, 2, 4):
            return None
        if offset + length > self.bars[bar].size:
            return None
        return bar, offset, length

    def _pci_cfg_data_read(self, offset: int, size: int) -> bytes:
        target = self._pci_cfg_target()
        if target is None:
            return bytes(size)
        bar, off, length = target
        return self.bars[bar].read(off, length).ljust(4, b"\0")[offset:offset + size]

    def _pci_cfg_data_write(self, offset: int, data: bytes) -> None:
        target = self._pci_cfg_target()
        if target is not None and offset == 0:
            bar, off, length = target
            self.bars[bar].write(off, data[:length])

    # --- hooks for the subclass ---------------------------------------------------------

    def read_device_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device-specific config (offset within it). Default: zeros."""
        return bytes(size)

    def write_device_config(self, offset: int, data: bytes) -> None:
        """The driver wrote the device-specific config. Default: ignored."""
        log.debug("%s: driver wrote %d bytes of device config at %#x; ignored", self.name,
                  len(data), offset)

    def read_structure(self, structure: VirtioStructure, offset: int, size: int) -> bytes:
        """Reads of the subclass's own trapped structures (extra_structures)."""
        return bytes(size)

    def write_structure(self, structure: VirtioStructure, offset: int, data: bytes) -> None:
        """Writes to the subclass's own trapped structures."""

    def validate_features(self, features: int) -> str | None:
        """Return why ``features`` (a subset of the offer) is unacceptable, or None."""
        return None

    def queue_notified(self, index: int) -> None:
        """The driver kicked queue ``index`` (live: enabled, DRIVER_OK, ring built)."""

    def driver_ok(self) -> None:
        """The driver set DRIVER_OK: the device is live."""

    def virtio_reset(self) -> None:
        """The device was reset (status 0, DEVICE_RESET, client gone): drop device state.

        The queues' rings are already gone when this is called.
        """

    # --- raising interrupts ----------------------------------------------------------

    def _interrupt(self, vector: int, isr_bit: IsrBit) -> None:
        self.isr |= isr_bit
        if self.msix_enabled:
            if vector != NO_VECTOR:
                self.trigger_msix(vector)
        else:
            self.set_intx(True)

    def interrupt_queue(self, index: int) -> None:
        """Used-buffer notification for queue ``index`` (ask ``ring.should_notify()`` first)."""
        self._interrupt(self.queues[index].msix_vector, IsrBit.QUEUE)

    def config_changed(self) -> None:
        """The device changed its config: new generation, configuration change interrupt."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & DeviceStatus.DRIVER_OK:
            self._interrupt(self.config_msix_vector, IsrBit.CONFIG)

    def needs_reset(self, why: str) -> None:
        """The device cannot go on until the driver resets it (VIRTIO 2.1.2)."""
        if self.status & DeviceStatus.DEVICE_NEEDS_RESET:
            return
        log.error("%s: device needs reset: %s", self.name, why)
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        for q in self.queues:
            q.ring = None
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & DeviceStatus.DRIVER_OK:
            self._interrupt(self.config_msix_vector, IsrBit.CONFIG)

    # --- common configuration -----------------------------------------------------

    def _selected(self) -> QueueState | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_image(self) -> bytes:
        q = self._selected()
        feature_word = (self.offered_features >> (32 * self.device_feature_select)) & 0xFFFFFFFF \
            if self.device_feature_select < 2 else 0
        driver_word = (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF \
            if self.driver_feature_select < 2 else 0
        if q is None:
            qfields = (0, NO_VECTOR, 0, 0, 0, 0, 0, 0, 0)
        else:
            qfields = (q.size, q.msix_vector, int(q.enabled), q.index, q.desc, q.driver,
                       q.device, q.index, 0)
        return COMMON_CFG.pack(self.device_feature_select, feature_word,
                               self.driver_feature_select, driver_word, self.config_msix_vector,
                               len(self.queues), self.status, self.config_generation,
                               self.queue_select, *qfields)

    def _common_read(self, offset: int, size: int) -> bytes:
        return self._common_image()[offset:offset + size]

    def _common_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        field_sizes: dict[int, int] = {
            Common.DEVICE_FEATURE_SELECT: 4, Common.DRIVER_FEATURE_SELECT: 4,
            Common.DRIVER_FEATURE: 4, Common.CONFIG_MSIX_VECTOR: 2,
            Common.DEVICE_STATUS: 1, Common.QUEUE_SELECT: 2, Common.QUEUE_SIZE: 2,
            Common.QUEUE_MSIX_VECTOR: 2, Common.QUEUE_ENABLE: 2, Common.QUEUE_RESET: 2,
        }
        q_addr: dict[int, str] = {Common.QUEUE_DESC: "desc", Common.QUEUE_DRIVER: "driver",
                  Common.QUEUE_DEVICE: "device"}
        base = offset & ~7
        aligned = (size == 8 and offset == base) or (size == 4 and offset % 4 == 0)
        if base in q_addr and aligned:
            self._write_queue_address(q_addr[base], offset - base, data)
            return
        if field_sizes.get(offset) != size:
            log.warning("%s: driver wrote %d bytes at common cfg offset %#x, which is not a "
                        "writable field of that width; ignored", self.name, size, offset)
            return
        field_ = Common(offset)
        if field_ is Common.DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif field_ is Common.DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif field_ is Common.DRIVER_FEATURE:
            self._write_driver_features(value)
        elif field_ is Common.CONFIG_MSIX_VECTOR:
            self.config_msix_vector = self._vector(value)
        elif field_ is Common.DEVICE_STATUS:
            self._write_status(value)
        elif field_ is Common.QUEUE_SELECT:
            self.queue_select = value
        elif field_ is Common.QUEUE_RESET:
            log.warning("%s: driver wrote queue_reset without RING_RESET; ignored", self.name)
        else:
            self._write_queue_field(field_, value)

    def _vector(self, value: int) -> int:
        """An MSI-X vector number the device can map; NO_VECTOR tells the driver no."""
        if value == NO_VECTOR or self.msix is None or value < self.msix.vectors:
            return value
        log.warning("%s: driver asked for MSI-X vector %d, the device has %d; refused",
                    self.name, value, self.msix.vectors)
        return NO_VECTOR

    def _write_driver_features(self, value: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:
            log.warning("%s: driver changed features after FEATURES_OK; ignored", self.name)
            return
        if self.driver_feature_select > 1:
            return
        shift = 32 * self.driver_feature_select
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_field(self, field_: Common, value: int) -> None:
        q = self._selected()
        if q is None:
            log.warning("%s: driver programmed queue %d, the device has %d queues; ignored",
                        self.name, self.queue_select, len(self.queues))
            return
        if field_ is Common.QUEUE_MSIX_VECTOR:
            q.msix_vector = self._vector(value)
            return
        if q.enabled:
            log.warning("%s: driver changed %s of enabled queue %d; ignored", self.name,
                        field_.name.lower(), q.index)
            return
        if field_ is Common.QUEUE_SIZE:
            q.size = value
        elif field_ is Common.QUEUE_ENABLE:
            if value == 1:
                self._enable_queue(q)
            else:
                log.warning("%s: driver wrote queue_enable=%d for queue %d; only 1 is "
                            "allowed (a reset disables queues)", self.name, value, q.index)

    def _write_queue_address(self, name: str, offset: int, data: bytes) -> None:
        q = self._selected()
        if q is None or q.enabled:
            log.warning("%s: driver wrote the %s address of queue %d, which is %s; ignored",
                        self.name, name, self.queue_select,
                        "enabled" if q is not None else "absent")
            return
        raw = bytearray(getattr(q, name).to_bytes(8, "little"))
        raw[offset:offset + len(data)] = data
        setattr(q, name, int.from_bytes(raw, "little"))

    def _enable_queue(self, q: QueueState) -> None:
        if not q.size or q.size > q.max_size or q.size & (q.size - 1):
            self.needs_reset(f"queue {q.index} enabled with size {q.size} (a power of two up to "
                             f"{q.max_size} is needed)")
            return
        q.enabled = True
        if self.status & DeviceStatus.FEATURES_OK:
            self._build_ring(q)

    def _build_ring(self, q: QueueState) -> None:
        try:
            # The device writes the used ring: a read-only map there is the driver's
            # error (NEEDS_RESET), not a TypeError at the first completion.
            self.dma.translate(q.device, USED_RING_HEADER + USED_ELEM_SIZE * q.size,
                               write=True)
            q.ring = SplitQueue(q.index, q.size, RingAddresses(q.desc, q.driver, q.device),
                                self.memory, self.negotiated_features)
        except VirtioError as exc:
            q.ring = None
            self.needs_reset(f"queue {q.index} cannot be set up: {exc}")

    # --- status -------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            log.debug("%s: driver reset the device", self.name)
            self._virtio_reset()
            return
        old = self.status
        device_owned = int(DeviceStatus.DEVICE_NEEDS_RESET)
        value = (value & ~device_owned) | (old & device_owned)
        if old & ~value:
            self.status = old | value
            self.needs_reset(f"driver cleared status bits {old & ~value:#x} (status {old:#x} -> "
                             f"{value:#x}); only a write of 0 may do that")
            return
        new_bits = value & ~old
        if new_bits & DeviceStatus.FEATURES_OK:
            why = self._features_problem(self.driver_features)
            if why is not None:
                log.warning("%s: FEATURES_OK refused: %s", self.name, why)
                value &= ~int(DeviceStatus.FEATURES_OK)
                new_bits &= ~int(DeviceStatus.FEATURES_OK)
        if new_bits & DeviceStatus.DRIVER_OK and not value & DeviceStatus.FEATURES_OK:
            self.status = value & ~int(DeviceStatus.DRIVER_OK)
            self.needs_reset("driver set DRIVER_OK without FEATURES_OK")
            return
        self.status = value
        if new_bits & DeviceStatus.FEATURES_OK:
            for q in self.queues:
                if q.enabled and q.ring is None:
                    self._build_ring(q)
        if new_bits & DeviceStatus.FAILED:
            log.warning("%s: the driver gave up on the device (FAILED)", self.name)
        if new_bits & DeviceStatus.DRIVER_OK:
            log.info("%s: driver ready, features %#x, queues %s", self.name,
                     self.driver_features,
                     [q.index for q in self.queues if q.enabled])
            self.driver_ok()

    def _features_problem(self, features: int) -> str | None:
        extra = features & ~self.offered_features
        if extra:
            return f"driver accepted features {extra:#x} the device did not offer"
        if not features & VirtioFeature.VERSION_1:
            return "driver did not accept VERSION_1 (this is a modern-only device)"
        return self.validate_features(features)

    def _virtio_reset(self) -> None:
        self._reset_transport()
        self.set_intx(False)
        self.virtio_reset()

    def device_reset(self) -> None:
        """PCI-level reset (DEVICE_RESET, client gone) resets the virtio state too."""
        self._virtio_reset()

    # --- ISR, notify, device config -------------------------------------------------------

    def _isr_read(self, offset: int, size: int) -> bytes:
        value = self.isr if offset == 0 else 0
        if offset == 0:
            self.isr = 0
            self.set_intx(False)
        return value.to_bytes(size, "little")

    def _isr_write(self, offset: int, data: bytes) -> None:
        log.debug("%s: driver wrote the read-only ISR; ignored", self.name)

    def _notify_read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def _notify_write(self, offset: int, data: bytes) -> None:
        if self.notify_multiplier:
            index = offset // self.notify_multiplier
        else:
            index = int.from_bytes(data[:2], "little")
        if index >= len(self.queues):
            log.warning("%s: notify for queue %d, the device has %d", self.name, index,
                        len(self.queues))
            return
        q = self.queues[index]
        if not self.driver_ready or q.ring is None:
            log.debug("%s: notify for queue %d ignored (not live)", self.name, index)
            return
        try:
            self.queue_notified(index)
        except VirtioError as exc:
            self.needs_reset(f"queue {index}: {exc}")

    def _device_cfg_read(self, offset: int, size: int) -> bytes:
        return self.read_device_config(offset, size)[:size].ljust(size, b"\0")

    def _device_cfg_write(self, offset: int, data: bytes) -> None:
        self.write_device_config(offset, data)

    # --- DMA unmaps under live rings --------------------------------------------------

    def _dma_unmapped(self, iova: int, size: int) -> None:
        end = iova + size
        for q in self.queues:
            if q.ring is None:
                continue
            if any(start < end and iova < start + length for start, length in q.ranges()):
                q.ring = None
                self.needs_reset(f"the driver unmapped IOVA [{iova:#x}, {end:#x}) under live "
                                 f"queue {q.index}")


__all__ = [
    # The transport's numbers live in vvu_runtime.virtio.pci_layout (the guest driver
    # uses them too); re-exported here for the device modules that import them from here.
    "COMMON_CFG",
    "COMMON_CFG_SIZE",
    "NO_VECTOR",
    "VIRTIO_PCI_CAP",
    "VIRTIO_PCI_MODERN_DEVICE_BASE",
    "VIRTIO_PCI_SUBSYSTEM_ID",
    "VIRTIO_PCI_VENDOR_ID",
    "BarDecl",
    "BarKind",
    "Common",
    "DeviceStatus",
    "IsrBit",
    "QueueState",
    "VirtioPciCapType",
    "VirtioPciDevice",
    "VirtioPciLayout",
    "VirtioStructure",
]
