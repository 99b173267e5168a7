"""The virtio-vhost-user (VVU) PCI function, as ``docs/vvu-abi.md`` defines it.

This module is the PCI/virtio half of a VVU device: identity, device config
(``status``, ``max_vhost_queues``, ``uuid``), the rxq/txq rings, the driver
auxiliary notification table (kick → MSI-X vector, cap 7), the device auxiliary
notifications (doorbells, cap 6) and the shared-memory BAR that *is* the
consumer's RAM file (cap 8, shmid 1). It knows nothing about sockets: the
vhost-user half (:class:`vvu_runtime.device.tunnel.VhostUserTunnel`) attaches as
the device's :class:`VvuLink` and the two talk through a handful of calls::

    tunnel → device                         device → tunnel (VvuLink)
    frontend_connected()   FRONTEND_UP+irq  backend_up()      driver set BACKEND_UP
    frontend_disconnected() status 0 (+irq) backend_down()    BACKEND_UP cleared, reset,
    rx_ready() / rx_put() / rx_flush()                        NEEDS_RESET: drop the link
    notify_kick(i)         MSI-X or ISR 4   rx_space()        the driver posted rxq buffers
    tx_resume()            pop txq again    tx_ready()        may txq be popped?
    appliance_error(why)   NEEDS_RESET      tx_message(bytes) one txq message
                                            doorbell(kind, q) fire call/err/log eventfd

Bad input from the appliance (undefined status bits, writes to read-only or
undefined registers, a doorbell past ``2N``, a vector for a notification past
``N``, malformed txq buffers, rxq buffers too small) never raises into the
vfio-user server: it is logged with the device name, counted, the device sets
DEVICE_NEEDS_RESET and the link to the consumer is dropped. Nothing here writes
into the consumer's RAM on its own; BAR2 is only touched by the appliance (via
QEMU's mmap, or a trapped access QEMU forwards).
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import uuid as uuid_mod
from dataclasses import dataclass, fields
from typing import Protocol

from vvu_runtime.device.dma import PAGE_SIZE
from vvu_runtime.device.errors import DeviceModelError
from vvu_runtime.device.pci import Bar, MappedBar
from vvu_runtime.device.vfio_user.protocol import SparseArea
from vvu_runtime.device.virtio_pci import (
    NO_VECTOR,
    DeviceStatus,
    VirtioPciCapType,
    VirtioPciDevice,
    VirtioStructure,
)
from vvu_runtime.vhost_user.messages import HEADER, HEADER_SIZE
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.queue import DescriptorChain
from vvu_runtime.virtio.vvu_abi import (
    AUX_BAR,
    AUX_BAR_SIZE,
    CONFIG_DOORBELL_PEER,
    CONFIG_STATUS,
    CONFIG_STATUS_SIZE,
    DEVICE_CONFIG,
    DEVICE_CONFIG_SIZE,
    DOORBELL_CONFIG,
    DOORBELL_MULTIPLIER,
    DOORBELL_OFFSET,
    ISR_DRIVER_AUX,
    KICK_CFG_OFFSET,
    KICK_CFG_SIZE,
    MAX_VHOST_QUEUES,
    MESSAGE_BUFFER_SIZE,
    NO_DOORBELL_PEER,
    RXQ,
    SHM_BAR,
    SHMID_MEMORY,
    STATUS_DEFINED,
    TXQ,
    VIRTIO_ID_VVU,
    DoorbellKind,
    VvuStatus,
    doorbell_count,
    doorbell_target,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUES = 64
DEFAULT_QUEUE_SIZE = 256
#: What an rxq buffer must hold (docs/vvu-abi.md "Virtqueues").
RX_BUFFER_SIZE = MESSAGE_BUFFER_SIZE
#: Largest txq message accepted (one rxq buffer's worth).
MAX_TX_MESSAGE = MESSAGE_BUFFER_SIZE


@dataclass(slots=True)
class VvuStats:
    """Per-device counters (shown by ``vvu-devd`` on SIGUSR1 and at exit)."""

    #: Front-end connections accepted.
    connections: int = 0
    #: Messages put into rxq (front-end requests and its replies to back-end requests).
    rx_messages: int = 0
    #: txq messages sent to the front-end's socket (replies).
    tx_replies: int = 0
    #: txq messages sent to the back-end request socket.
    tx_requests: int = 0
    #: txq messages with nowhere to go (no front-end, no back-end request socket).
    tx_dropped: int = 0
    #: Kick eventfd events turned into a driver notification.
    kicks: int = 0
    #: Kicks whose notification has no MSI-X vector programmed.
    kicks_unrouted: int = 0
    #: Kick events that carried more than one kick (delivered as one notification).
    kicks_coalesced: int = 0
    #: Doorbells that signalled an eventfd.
    doorbells: int = 0
    #: Doorbells whose eventfd the front-end has not given (yet).
    doorbells_unset: int = 0
    #: Doorbells whose eventfd was saturated (a wake-up was pending: not written).
    doorbells_coalesced: int = 0
    #: Trapped notifies of rxq (the driver re-posted buffers) and of txq (messages).
    #: With EVENT_IDX the driver writes them only when the device asked for one.
    rxq_notifies: int = 0
    txq_notifies: int = 0
    #: Bad input from either side (each is logged).
    errors: int = 0
    #: Front-end connections dropped because of an error.
    link_resets: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class VvuLink(Protocol):
    """What the device needs from its vhost-user side (the tunnel)."""

    def backend_up(self) -> None:
        """The driver set BACKEND_UP: accept a front-end (or keep the one there)."""

    def backend_down(self) -> None:
        """BACKEND_UP went away (driver write, reset, NEEDS_RESET): drop the front-end."""

    def rx_space(self) -> None:
        """The driver made rxq buffers available: front-end messages may flow again."""

    def tx_ready(self) -> bool:
        """Whether the next txq message can be taken now (back-pressure)."""

    def tx_message(self, data: bytes) -> None:
        """One vhost-user message the driver put in txq (header checked, 12 + size bytes)."""

    def doorbell(self, kind: DoorbellKind, queue: int) -> bool:
        """Fire the call/err/log eventfd; False if the front-end gave none."""


class DoorbellSource(Protocol):
    """The link's peer at the doorbell companion (``device/ivshmem.DoorbellPeer``)."""

    @property
    def owner_id(self) -> int:
        """The companion's own ID (its IVPosition)."""

    def current_peer(self) -> int:
        """The peer ID to ring now (NO_DOORBELL_PEER: none, use the trapped doorbells)."""

    def driver_saw(self, peer: int) -> None:
        """The driver read ``doorbell_peer`` (and got ``peer``)."""


def default_uuid(name: str) -> bytes:
    """A stable, never all-zero identity for device ``name`` (name-based UUID v5)."""
    return uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"vvu:{name}").bytes


def _pow2_at_least(value: int) -> int:
    size = PAGE_SIZE
    while size < value:
        size <<= 1
    return size


@dataclass(frozen=True, slots=True)
class RamFile:
    """The consumer's RAM file as the device model opened it."""

    path: str
    dev: int
    ino: int
    size: int

    @property
    def identity(self) -> tuple[int, int]:
        return self.dev, self.ino

    def describe(self) -> str:
        return f"{self.path} (dev {self.dev:#x} inode {self.ino}, {self.size:#x} bytes)"


def open_ram_file(path: str | os.PathLike[str]) -> tuple[int, RamFile]:
    """Open the provisioned RAM file read-write; (fd, what it is). DeviceModelError if unusable."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceModelError(f"cannot open the consumer RAM file {p}: "
                               f"{exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceModelError(f"consumer RAM file {p} is not a regular file")
        if st.st_size <= 0:
            raise DeviceModelError(f"consumer RAM file {p} is empty: provision it at the "
                                   "consumer's RAM size (e.g. truncate -s 512M) before starting")
    except BaseException:
        os.close(fd)
        raise
    return fd, RamFile(p, st.st_dev, st.st_ino, st.st_size)


class VvuDevice(VirtioPciDevice):
    """One VVU function: a consumer link's device as the appliance sees it."""

    #: docs/vvu-abi.md "Feature bits": no device bits; EVENT_IDX so that the driver
    #: notifies rxq/txq only when the device waits for it (each notify is a trapped
    #: MMIO write, a vfio-user message and a turn of vvu-devd's loop).
    TRANSPORT_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
                          | VirtioFeature.EVENT_IDX)

    def __init__(self, *, name: str, ram_file: str | os.PathLike[str],
                 max_queues: int = DEFAULT_MAX_QUEUES, virtio_id: int = VIRTIO_ID_VVU,
                 uuid: bytes | None = None, queue_size: int = DEFAULT_QUEUE_SIZE,
                 doorbell: DoorbellSource | None = None) -> None:
        if not 1 <= max_queues <= MAX_VHOST_QUEUES:
            raise DeviceModelError(f"{name}: max_vhost_queues {max_queues} is not in "
                                   f"1..{MAX_VHOST_QUEUES} (vhost-user vring indexes are 8-bit)")
        ident = default_uuid(name) if uuid is None else uuid
        if len(ident) != 16 or not any(ident):
            raise DeviceModelError(f"{name}: the uuid must be 16 bytes, not all zero")
        fd, ram = open_ram_file(ram_file)
        try:
            bar2 = self._shared_memory_bar(name, fd, ram)
        except BaseException:
            os.close(fd)
            raise
        self.ram = ram
        self.max_queues = max_queues
        self.uuid = ident
        #: This link's peer at the doorbell companion (docs/vvu-abi.md "Doorbell
        #: bypass"), or None: the driver uses the trapped doorbells only.
        self.doorbell = doorbell
        #: Bytes of BAR2 QEMU maps (the file, page-rounded); the rest is trapped zeros.
        self.shm_size = bar2.areas[0].size
        n = max_queues
        self.doorbell_count = doorbell_count(n)
        doorbell_len = self.doorbell_count * DOORBELL_MULTIPLIER
        if DOORBELL_OFFSET + doorbell_len > AUX_BAR_SIZE:  # pragma: no cover - N <= 256
            raise DeviceModelError(f"{name}: {self.doorbell_count} doorbells do not fit BAR4")
        bar4 = Bar(AUX_BAR, AUX_BAR_SIZE, name="aux notifications")
        structures = [
            VirtioStructure("shm", VirtioPciCapType.SHARED_MEMORY_CFG, SHM_BAR, 0,
                            self.shm_size, cap_id=SHMID_MEMORY,
                            doc="the consumer's RAM file (mmapped)"),
            VirtioStructure("kick-notifications", VirtioPciCapType.DRIVER_AUX_NOTIFY_CFG,
                            AUX_BAR, KICK_CFG_OFFSET, KICK_CFG_SIZE,
                            doc="driver aux notifications: le16 select, le16 msix_vector"),
            VirtioStructure("doorbells", VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG, AUX_BAR,
                            DOORBELL_OFFSET, doorbell_len, multiplier=DOORBELL_MULTIPLIER,
                            doc=f"device aux notifications: call 0..{n - 1}, err {n}.."
                                f"{2 * n - 1}, log {2 * n}"),
        ]
        self._kick_cfg, self._doorbells = structures[1], structures[2]
        self.link: VvuLink | None = None
        self.stats = VvuStats()
        self.vvu_status = 0
        self.kick_select = 0
        self.kick_vectors = [NO_VECTOR] * n
        try:
            super().__init__(name=name, virtio_device_id=virtio_id, num_queues=2,
                             queue_max_size=queue_size,
                             msix_vectors=3 + n, class_code=0xFF0000,
                             device_cfg_size=DEVICE_CONFIG_SIZE,
                             extra_bars=[bar2, bar4], extra_structures=structures)
        except BaseException:
            bar2.close()
            raise

    @staticmethod
    def _shared_memory_bar(name: str, fd: int, ram: RamFile) -> MappedBar:
        """BAR2: the file, page-rounded, mmapped; the BAR is the next power of two."""
        area = -(-ram.size // PAGE_SIZE) * PAGE_SIZE
        size = _pow2_at_least(area)
        return MappedBar(SHM_BAR, size, fd, name="consumer RAM", areas=[SparseArea(0, area)],
                         file_size=ram.size)

    # --- state seen by the tunnel ----------------------------------------------------

    @property
    def backend_up(self) -> bool:
        return bool(self.vvu_status & VvuStatus.BACKEND_UP)

    def describe_state(self) -> str:
        bits = [b.name or "" for b in VvuStatus if self.vvu_status & b]
        virtio = "needs reset" if self.status & DeviceStatus.DEVICE_NEEDS_RESET else (
            "driver ok" if self.status & DeviceStatus.DRIVER_OK else f"status {self.status:#x}")
        return f"{'|'.join(bits) or 'down'} ({virtio})"

    # --- device configuration ----------------------------------------------------------

    def read_device_config(self, offset: int, size: int) -> bytes:
        source = self.doorbell
        peer, owner = ((NO_DOORBELL_PEER, 0) if source is None
                       else (source.current_peer(), source.owner_id))
        image = (DEVICE_CONFIG.pack(self.vvu_status, self.max_queues, self.uuid)
                 + DOORBELL_CONFIG.pack(peer, owner))
        if source is not None and offset <= CONFIG_DOORBELL_PEER < offset + size:
            # The driver rings under this ID from now on: older ones can go.
            source.driver_saw(peer)
        return image[offset:offset + size]

    def write_device_config(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if offset < CONFIG_STATUS or end > CONFIG_STATUS + CONFIG_STATUS_SIZE:
            self.appliance_error(f"driver wrote {len(data)} bytes at device config offset "
                                 f"{offset:#x}: only status (offset 0, 4 bytes) is writable")
            return
        image = bytearray(self.vvu_status.to_bytes(CONFIG_STATUS_SIZE, "little"))
        image[offset:end] = data
        value = int.from_bytes(image, "little")
        written = int.from_bytes(bytes(0xFF if offset <= i < end else 0 for i in range(4)),
                                 "little")
        if value & written & ~STATUS_DEFINED:
            self.appliance_error(f"driver wrote status {value:#x}: undefined bits "
                                 f"{value & written & ~STATUS_DEFINED:#x}")
            return
        if value & written & VvuStatus.FRONTEND_UP:
            self.appliance_error(f"driver wrote status {value:#x}: FRONTEND_UP belongs to the "
                                 "device (the driver writes BACKEND_UP only)")
            return
        if not written & VvuStatus.BACKEND_UP:
            return
        want_up = bool(value & VvuStatus.BACKEND_UP)
        if want_up == self.backend_up:
            return
        if want_up:
            if self.status & DeviceStatus.DEVICE_NEEDS_RESET:
                log.warning("%s: driver set BACKEND_UP while the device needs a reset; "
                            "ignored", self.name)
                return
            self.vvu_status |= VvuStatus.BACKEND_UP
            log.info("%s: driver set BACKEND_UP: accepting a front-end", self.name)
            if self.link is not None:
                self.link.backend_up()
        else:
            log.info("%s: driver cleared BACKEND_UP", self.name)
            self._link_down()

    def _link_down(self) -> None:
        """Status 0 without a config interrupt (the driver caused it), drop the front-end."""
        self.vvu_status = 0
        if self.link is not None:
            self.link.backend_down()

    # --- called by the tunnel ---------------------------------------------------------

    def frontend_connected(self) -> None:
        self.vvu_status |= VvuStatus.FRONTEND_UP
        self.stats.connections += 1
        self.config_changed()

    def frontend_disconnected(self, *, notify: bool = True) -> None:
        """The front-end is gone: both bits clear; a config interrupt if ``notify``."""
        changed = self.vvu_status != 0
        self.vvu_status = 0
        if notify and changed:
            self.config_changed()

    def appliance_error(self, why: str) -> None:
        """Bad input from the appliance: log, count, DEVICE_NEEDS_RESET, drop the link."""
        self.stats.errors += 1
        log.error("%s: appliance error: %s", self.name, why)
        self.needs_reset(why)

    def needs_reset(self, why: str) -> None:
        super().needs_reset(why)
        self._link_down()

    def rx_ready(self) -> bool:
        """Whether rxq can take a message now (live ring with a buffer available)."""
        ring = self.queues[RXQ].ring
        if ring is None or not self.driver_ready:
            return False
        try:
            if ring.has_available():
                return True
            # Out of buffers: the tunnel now waits for rx_space(). With EVENT_IDX the
            # driver re-posts without notifying unless avail_event asks for it, so ask
            # for a notify at the next buffer, then look again (one may have come
            # between the first look and the request).
            return ring.set_kick_suppression(False)
        except VirtioError as exc:
            self.appliance_error(f"rxq: {exc}")
            return False

    def rx_put(self, data: bytes) -> bool:
        """Copy one message into the next rxq buffer; False if the device broke."""
        ring = self.queues[RXQ].ring
        if ring is None or not self.driver_ready:
            return False
        try:
            chain = ring.pop()
        except VirtioError as exc:
            self.appliance_error(f"rxq: {exc}")
            return False
        if chain is None:
            return False
        if chain.readable:
            self.appliance_error(f"rxq buffer {chain.head} has {chain.readable_len} "
                                 "device-readable bytes; rxq buffers are write-only")
            return False
        if any(view.readonly for view in chain.writable):
            self.appliance_error(f"rxq buffer {chain.head} lies in a read-only DMA map; "
                                 "rxq buffers must be mapped writable")
            return False
        if chain.writable_len < len(data):
            self.appliance_error(f"rxq buffer {chain.head} holds {chain.writable_len} bytes, "
                                 f"a {len(data)}-byte message does not fit (the ABI asks for "
                                 f"{RX_BUFFER_SIZE})")
            return False
        ring.push(chain, chain.write(data))
        self.stats.rx_messages += 1
        return True

    def rx_flush(self) -> None:
        """Used-buffer notification for rxq if the driver wants one."""
        ring = self.queues[RXQ].ring
        if ring is not None and ring.should_notify():
            self.interrupt_queue(RXQ)

    def tx_resume(self) -> None:
        """The tunnel can take txq messages again."""
        self._drain_txq()

    def notify_kick(self, index: int) -> None:
        """The front-end kicked vhost-user queue ``index``: driver aux notification."""
        self.stats.kicks += 1
        if self.msix_enabled:
            vector = self.kick_vectors[index]
            if vector == NO_VECTOR:
                self.stats.kicks_unrouted += 1
                log.debug("%s: kick of queue %d has no MSI-X vector", self.name, index)
                return
            self.trigger_msix(vector)
        else:
            self.isr |= ISR_DRIVER_AUX
            self.set_intx(True)

    # --- queues ---------------------------------------------------------------------

    def queue_notified(self, index: int) -> None:
        if index == RXQ:
            self.stats.rxq_notifies += 1
            if self.link is not None:
                self.link.rx_space()
        else:
            self.stats.txq_notifies += 1
            self._drain_txq()

    def _drain_txq(self) -> None:
        ring = self.queues[TXQ].ring
        if ring is None or not self.driver_ready:
            return
        try:
            while self.link is None or self.link.tx_ready():
                chain = ring.pop()
                if chain is None:
                    break
                data = self._tx_message(chain)
                if data is None:
                    return  # NEEDS_RESET: the ring is gone
                ring.push(chain, 0)
                if self.link is None:
                    self.stats.tx_dropped += 1
                else:
                    self.link.tx_message(data)
                if self.queues[TXQ].ring is not ring:
                    return  # the message broke the device (NEEDS_RESET)
        except VirtioError as exc:
            self.appliance_error(f"txq: {exc}")
            return
        if ring.should_notify():
            self.interrupt_queue(TXQ)

    def _tx_message(self, chain: DescriptorChain) -> bytes | None:
        if chain.writable:
            self.appliance_error(f"txq buffer {chain.head} has device-writable parts; txq "
                                 "buffers are read-only")
            return None
        length = chain.readable_len
        if not HEADER_SIZE <= length <= MAX_TX_MESSAGE:
            self.appliance_error(f"txq buffer {chain.head} is {length} bytes: one vhost-user "
                                 f"message of {HEADER_SIZE}..{MAX_TX_MESSAGE} bytes expected")
            return None
        data = chain.read()
        _, _, size = HEADER.unpack_from(data)
        if length != HEADER_SIZE + size:
            self.appliance_error(f"txq buffer {chain.head} is {length} bytes but its header "
                                 f"says {HEADER_SIZE} + {size}: one message per buffer")
            return None
        return data

    # --- BAR4: kick notification table and doorbells -------------------------------------

    def read_structure(self, structure: VirtioStructure, offset: int, size: int) -> bytes:
        if structure is self._kick_cfg:
            return self._kick_image()[offset:offset + size]
        return bytes(size)  # doorbells read as zero

    def write_structure(self, structure: VirtioStructure, offset: int, data: bytes) -> None:
        if structure is self._kick_cfg:
            self._kick_cfg_write(offset, data)
        elif structure is self._doorbells:
            self._doorbell_write(offset, data)

    def _kick_image(self) -> bytes:
        sel = self.kick_select
        vector = self.kick_vectors[sel] if sel < self.max_queues else NO_VECTOR
        return struct.pack("<HH", sel, vector)

    def _kick_cfg_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        image = bytearray(self._kick_image())
        image[offset:end] = data
        select, vector = struct.unpack("<HH", image)
        if offset < 2:
            self.kick_select = select
        if end <= 2:
            return
        if self.kick_select >= self.max_queues:
            self.appliance_error(f"driver programmed a vector for notification "
                                 f"{self.kick_select}; there are {self.max_queues} "
                                 f"(0..{self.max_queues - 1})")
            return
        if vector != NO_VECTOR and (self.msix is None or vector >= self.msix.vectors):
            log.warning("%s: driver asked for MSI-X vector %d for kick %d, the device has %d; "
                        "refused (reads back 0xffff)", self.name, vector, self.kick_select,
                        self.msix.vectors if self.msix else 0)
            vector = NO_VECTOR
        self.kick_vectors[self.kick_select] = vector

    def _doorbell_write(self, offset: int, data: bytes) -> None:
        index, within = divmod(offset, DOORBELL_MULTIPLIER)
        if len(data) not in (1, 2, 4) or within + len(data) > DOORBELL_MULTIPLIER:
            self.appliance_error(f"doorbell write of {len(data)} bytes at +{offset:#x}: "
                                 "one write of 1, 2 or 4 bytes inside one 4-byte doorbell")
            return
        target = doorbell_target(index, self.max_queues)
        if target is None:  # the doorbell structure ends at 2N: region_write refuses
            self.appliance_error(f"doorbell {index} past {2 * self.max_queues}")
            return
        kind, queue = target
        fired = self.link.doorbell(kind, queue) if self.link is not None else False
        if fired:
            self.stats.doorbells += 1
        else:
            self.stats.doorbells_unset += 1
            log.debug("%s: doorbell %d (%s %d) has no eventfd", self.name, index,
                      kind.value, queue)

    # --- writes nobody claims ---------------------------------------------------------

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        bar = self.bars.get(index)
        if bar is not None:
            bar.check(offset, len(data))
            if not _claimed(bar, offset, len(data)):
                self._undefined_write(bar, offset, data)
                return
        super().region_write(index, offset, data)

    def _undefined_write(self, bar: Bar, offset: int, data: bytes) -> None:
        if bar.index == AUX_BAR and offset >= DOORBELL_OFFSET:
            index = (offset - DOORBELL_OFFSET) // DOORBELL_MULTIPLIER
            self.appliance_error(f"doorbell {index} is out of range (there are "
                                 f"{self.doorbell_count}: 0..{self.doorbell_count - 1})")
            return
        self.appliance_error(f"driver wrote {len(data)} bytes at BAR{bar.index}+{offset:#x}, "
                             f"where no register is defined")

    # --- resets -------------------------------------------------------------------------

    def virtio_reset(self) -> None:
        self.kick_select = 0
        self.kick_vectors = [NO_VECTOR] * self.max_queues
        if self.vvu_status:
            log.info("%s: device reset: link down", self.name)
        self._link_down()


def _claimed(bar: Bar, offset: int, length: int) -> bool:
    """Whether every byte of [offset, offset+length) is a register or a mapped area."""
    end = offset + length
    covered = 0
    spans = [(r.offset, r.end) for r in bar.ranges]
    if isinstance(bar, MappedBar):
        spans += [(a.offset, a.offset + a.size) for a in bar.areas]
    for lo, hi in spans:
        covered += max(0, min(end, hi) - max(offset, lo))
    return covered == length
