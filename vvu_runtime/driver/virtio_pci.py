"""The driver side of the virtio-pci modern transport (VIRTIO 1.2 §4.1.4-§4.1.5).

:class:`VirtioPciDriver` does what a guest kernel's ``virtio_pci`` does, over a
:class:`~vvu_runtime.driver.pci.PciFunction`:

* identity check (vendor 0x1af4, a modern device ID ``0x1040 + virtio ID``);
* the vendor-capability walk: every virtio structure (:class:`VirtioCap`), the
  first of each type wins, shared-memory regions by their id (cap type 8);
* reset (write 0, wait for 0), ACKNOWLEDGE → DRIVER → features → FEATURES_OK
  (checked to stick) → queues → DRIVER_OK (:meth:`VirtioPciDriver.negotiate`);
* queues: :meth:`VirtioPciDriver.setup_queue` lays a split ring out in DMA memory
  (a :class:`~vvu_runtime.driver.pci.DmaArena`), programs size, addresses and the
  MSI-X vector (read back: NO_VECTOR means refused), enables it and returns a
  :class:`DriverQueue` - the driver ring (``virtio.driver_ring``) plus its notify
  register;
* device config reads consistent under ``config_generation``;
* the ISR (read to clear; only without MSI-X).

Every register access is trapped MMIO (tens of µs under TCG): the hot paths
(notify, doorbells) are one write each and happen only when EVENT_IDX says so.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vvu_runtime.driver.errors import DeviceFault, DeviceGone
from vvu_runtime.driver.pci import CAP_ID_VENDOR, DmaArena, PciFunction, Registers
from vvu_runtime.virtio.driver_ring import SplitDriverRing
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.pci_layout import (
    NO_VECTOR,
    VIRTIO_PCI_MODERN_DEVICE_BASE,
    VIRTIO_PCI_MODERN_DEVICE_LAST,
    VIRTIO_PCI_VENDOR_ID,
    Common,
    DeviceStatus,
    VirtioPciCapType,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a reset may take to read back 0 (VIRTIO 1.2 §4.1.4.3.2).
RESET_TIMEOUT = 5.0
#: Config reads retried this often when the generation keeps moving.
CONFIG_RETRIES = 100


@dataclass(frozen=True, slots=True)
class VirtioCap:
    """One virtio vendor capability: where a structure lives."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_id: int
    #: notify_off_multiplier (type 2) or the aux-notification multiplier (type 6).
    multiplier: int
    #: Position of the capability in config space.
    at: int


class Structure:
    """A virtio structure: a window of a BAR's registers."""

    __slots__ = ("base", "cap", "length", "regs")

    def __init__(self, regs: Registers, cap: VirtioCap) -> None:
        self.regs = regs
        self.cap = cap
        self.base = cap.offset
        self.length = cap.length

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.length:
            raise DeviceFault(f"access [{offset:#x}, +{size}) outside the {self.length:#x}-byte "
                              f"structure (cap type {self.cap.cfg_type})")

    def read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        return self.regs.read(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        self.regs.write(self.base + offset, size, value)

    def read64(self, offset: int) -> int:
        self._check(offset, 8)
        return self.regs.read64(self.base + offset)

    def write64(self, offset: int, value: int) -> None:
        self._check(offset, 8)
        self.regs.write64(self.base + offset, value)


class DriverQueue:
    """One virtqueue the driver set up: its ring and its notify register."""

    __slots__ = ("index", "notify_offset", "notify_regs", "ring", "size", "vector")

    def __init__(self, index: int, ring: SplitDriverRing[Any], vector: int,
                 notify_regs: Registers, notify_offset: int) -> None:
        self.index = index
        self.ring = ring
        self.size = ring.size
        self.vector = vector
        self.notify_regs = notify_regs
        self.notify_offset = notify_offset

    def notify(self) -> None:
        """Write the queue index to its notify address (always: see :meth:`kick`)."""
        self.notify_regs.write(self.notify_offset, 2, self.index)

    def kick(self) -> bool:
        """After adding buffers: notify the device if it wants it (EVENT_IDX aware)."""
        if self.ring.kick_needed():
            self.notify()
            return True
        return False


def ring_bytes(size: int) -> int:
    """DMA bytes a split ring of ``size`` needs with the alignment padding of setup_queue."""
    return 16 * size + 16 + (6 + 2 * size) + 4 + (6 + 8 * size) + 4


class VirtioPciDriver:
    """Driver side of one virtio-pci modern device (see the module docstring).

    ``virtio_id`` (optional) is the virtio device ID the function must carry.
    """

    def __init__(self, pci: PciFunction, *, virtio_id: int | None = None) -> None:
        self.pci = pci
        vendor, device = pci.vendor_id, pci.device_id
        if vendor == 0xFFFF:
            raise DeviceGone(f"{pci.address}: config space reads all-ones (no device)")
        if vendor != VIRTIO_PCI_VENDOR_ID or not (
                VIRTIO_PCI_MODERN_DEVICE_BASE <= device <= VIRTIO_PCI_MODERN_DEVICE_LAST):
            raise DeviceFault(f"{pci.address}: {vendor:04x}:{device:04x} is not a modern "
                              "virtio-pci device")
        self.virtio_id = device - VIRTIO_PCI_MODERN_DEVICE_BASE
        if virtio_id is not None and virtio_id != self.virtio_id:
            raise DeviceFault(f"{pci.address}: virtio device ID {self.virtio_id}, expected "
                              f"{virtio_id}")
        self.caps = self._walk_caps()
        self.common = self._structure(VirtioPciCapType.COMMON_CFG)
        self.notify_cap = self._cap(VirtioPciCapType.NOTIFY_CFG)
        self.notify_regs = pci.registers(self.notify_cap.bar)
        self.isr = self._structure(VirtioPciCapType.ISR_CFG)
        self.device_cfg = (self._structure(VirtioPciCapType.DEVICE_CFG)
                           if self.has_cap(VirtioPciCapType.DEVICE_CFG) else None)
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}

    # -- capabilities -------------------------------------------------------------------
    def _walk_caps(self) -> list[VirtioCap]:
        caps: list[VirtioCap] = []
        read = self.pci.config_read
        for cap in self.pci.capabilities():
            if cap.cap_id != CAP_ID_VENDOR:
                continue
            at = cap.offset
            cap_len = read(at + 2, 1)
            if cap_len < 16 or at + cap_len > 256:
                log.warning("%s: virtio capability at %#x has length %d; skipped",
                            self.pci.address, at, cap_len)
                continue
            # Dword reads: each config read is a trapped access (one REGION_READ).
            raw = b"".join(read(at + i, 4).to_bytes(4, "little")
                           for i in range(0, cap_len, 4))[:cap_len]
            _len, cfg_type, bar, cap_id, offset, length = struct.unpack_from(
                "<BBBBxxII", raw, 2)
            multiplier = 0
            if cfg_type in (VirtioPciCapType.NOTIFY_CFG,
                            VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG) and cap_len >= 20:
                multiplier = struct.unpack_from("<I", raw, 16)[0]
            elif cfg_type == VirtioPciCapType.SHARED_MEMORY_CFG and cap_len >= 24:
                hi_off, hi_len = struct.unpack_from("<II", raw, 16)
                offset |= hi_off << 32
                length |= hi_len << 32
            if bar > 5:
                continue  # reserved BAR values: the spec says ignore
            caps.append(VirtioCap(cfg_type, bar, offset, length, cap_id, multiplier, at))
        return caps

    def has_cap(self, cfg_type: int, cap_id: int | None = None) -> bool:
        return any(c.cfg_type == cfg_type and (cap_id is None or c.cap_id == cap_id)
                   for c in self.caps)

    def _cap(self, cfg_type: int, cap_id: int | None = None) -> VirtioCap:
        for c in self.caps:
            if c.cfg_type == cfg_type and (cap_id is None or c.cap_id == cap_id):
                return c
        try:
            what = VirtioPciCapType(cfg_type).name
        except ValueError:
            what = str(cfg_type)
        raise DeviceFault(f"{self.pci.address}: no virtio capability {what}"
                          + (f" id {cap_id}" if cap_id is not None else ""))

    def cap(self, cfg_type: int, cap_id: int | None = None) -> VirtioCap:
        """The first capability of ``cfg_type`` (and ``cap_id``); DeviceFault if absent."""
        return self._cap(cfg_type, cap_id)

    def _structure(self, cfg_type: int, cap_id: int | None = None) -> Structure:
        cap = self._cap(cfg_type, cap_id)
        bar_size = self.pci.bar_size(cap.bar)
        if cap.offset + cap.length > bar_size:
            raise DeviceFault(f"{self.pci.address}: capability type {cfg_type} "
                              f"[{cap.offset:#x}, +{cap.length:#x}) does not fit BAR{cap.bar} "
                              f"({bar_size:#x} bytes)")
        return Structure(self.pci.registers(cap.bar), cap)

    def structure(self, cfg_type: int, cap_id: int | None = None) -> Structure:
        """Register access to the structure of a capability (DeviceFault if absent)."""
        return self._structure(cfg_type, cap_id)

    # -- status and features ----------------------------------------------------------
    @property
    def status(self) -> int:
        value = self.common.read(Common.DEVICE_STATUS, 1)
        if value == 0xFF and self.pci.vendor_id == 0xFFFF:
            raise DeviceGone(f"{self.pci.address}: the device reads all-ones (device model "
                             "gone?)")
        return value

    def set_status(self, value: int) -> None:
        self.common.write(Common.DEVICE_STATUS, 1, value)

    def add_status(self, bits: int) -> None:
        self.set_status(self.status | bits)

    def reset(self) -> None:
        """Write 0 and wait until the device reads 0 (queues and vectors are gone)."""
        self.set_status(0)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self.status != 0:
            if time.monotonic() > deadline:
                raise DeviceFault(f"{self.pci.address}: device status does not read 0 after "
                                  "a reset")
            time.sleep(0.001)
        self.features = 0
        self.queues.clear()

    def device_features(self) -> int:
        value = 0
        for word in (0, 1):
            self.common.write(Common.DEVICE_FEATURE_SELECT, 4, word)
            value |= self.common.read(Common.DEVICE_FEATURE, 4) << (32 * word)
        return value

    def negotiate(self, wanted: int, required: int = int(VirtioFeature.VERSION_1)) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept ``wanted & offered``, FEATURES_OK.

        ``required`` bits must be offered; FEATURES_OK must stick. Returns the features.
        """
        self.reset()
        self.set_status(DeviceStatus.ACKNOWLEDGE)
        self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        offered = self.device_features()
        missing = required & ~offered
        if missing:
            self.set_status(DeviceStatus.FAILED)
            raise DeviceFault(f"{self.pci.address}: device does not offer required features "
                              f"{missing:#x} (offers {offered:#x})")
        features = offered & (wanted | required)
        for word in (0, 1):
            self.common.write(Common.DRIVER_FEATURE_SELECT, 4, word)
            self.common.write(Common.DRIVER_FEATURE, 4, (features >> (32 * word)) & 0xFFFFFFFF)
        self.add_status(DeviceStatus.FEATURES_OK)
        if not self.status & DeviceStatus.FEATURES_OK:
            self.set_status(DeviceStatus.FAILED)
            raise DeviceFault(f"{self.pci.address}: device refused features {features:#x}")
        self.features = features
        log.debug("%s: features %#x (offered %#x)", self.pci.address, features, offered)
        return features

    def driver_ok(self) -> None:
        self.add_status(DeviceStatus.DRIVER_OK)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    # -- vectors -------------------------------------------------------------------------
    def set_config_vector(self, vector: int) -> None:
        self.common.write(Common.CONFIG_MSIX_VECTOR, 2, vector)
        got = self.common.read(Common.CONFIG_MSIX_VECTOR, 2)
        if got != vector:
            raise DeviceFault(f"{self.pci.address}: config MSI-X vector {vector} refused "
                              f"(reads {got:#x})")

    # -- queues --------------------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return self.common.read(Common.NUM_QUEUES, 2)

    def queue_max_size(self, index: int) -> int:
        self.common.write(Common.QUEUE_SELECT, 2, index)
        return self.common.read(Common.QUEUE_SIZE, 2)

    def setup_queue(self, index: int, size: int, arena: DmaArena, *,
                    vector: int = NO_VECTOR) -> DriverQueue:
        """Lay out and program queue ``index`` (not yet live: DRIVER_OK does that).

        ``size`` is capped to the device's maximum. The ring parts come from ``arena``.
        """
        if index >= self.num_queues:
            raise DeviceFault(f"{self.pci.address}: queue {index} does not exist "
                              f"({self.num_queues} queues)")
        self.common.write(Common.QUEUE_SELECT, 2, index)
        if self.common.read(Common.QUEUE_ENABLE, 2):
            raise DeviceFault(f"{self.pci.address}: queue {index} is already enabled")
        max_size = self.common.read(Common.QUEUE_SIZE, 2)
        if max_size == 0:
            raise DeviceFault(f"{self.pci.address}: queue {index} is not available")
        size = min(size, max_size)
        desc = arena.alloc(16 * size, 16)
        avail = arena.alloc(6 + 2 * size, 4)
        used = arena.alloc(6 + 8 * size, 4)
        ring: SplitDriverRing[Any] = SplitDriverRing(
            arena.memory, size, desc, avail, used,
            event_idx=bool(self.features & VirtioFeature.EVENT_IDX))
        self.common.write(Common.QUEUE_SIZE, 2, size)
        self.common.write64(Common.QUEUE_DESC, desc)
        self.common.write64(Common.QUEUE_DRIVER, avail)
        self.common.write64(Common.QUEUE_DEVICE, used)
        self.common.write(Common.QUEUE_MSIX_VECTOR, 2, vector)
        got = self.common.read(Common.QUEUE_MSIX_VECTOR, 2)
        if got != vector:
            raise DeviceFault(f"{self.pci.address}: queue {index} MSI-X vector {vector} "
                              f"refused (reads {got:#x})")
        notify_off = self.common.read(Common.QUEUE_NOTIFY_OFF, 2)
        self.common.write(Common.QUEUE_ENABLE, 2, 1)
        cap = self.notify_cap
        offset = cap.offset + notify_off * cap.multiplier
        if offset + 2 > cap.offset + max(cap.length, 2):
            raise DeviceFault(f"{self.pci.address}: queue {index} notify offset {offset:#x} "
                              "is outside the notify structure")
        queue = DriverQueue(index, ring, vector, self.notify_regs, offset)
        self.queues[index] = queue
        return queue

    # -- device configuration ---------------------------------------------------------
    @property
    def config_generation(self) -> int:
        return self.common.read(Common.CONFIG_GENERATION, 1)

    def read_config(self, fn: Callable[[Structure], T]) -> T:
        """Run ``fn(device_cfg)`` until the config generation did not move under it."""
        cfg = self.device_cfg
        if cfg is None:
            raise DeviceFault(f"{self.pci.address}: the device has no device configuration")
        for _ in range(CONFIG_RETRIES):
            before = self.config_generation
            value = fn(cfg)
            if self.config_generation == before:
                return value
        raise DeviceFault(f"{self.pci.address}: config generation keeps changing")


__all__ = ["DriverQueue", "Structure", "VirtioCap", "VirtioPciDriver", "ring_bytes"]
