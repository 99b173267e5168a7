"""The virtio-vhost-user device, driven from the appliance (docs/vvu-abi.md).

:class:`VvuDriver` owns one VVU function and offers what the VVU transport needs:

* **messages**: :meth:`~VvuDriver.receive` returns the vhost-user messages the
  device put on rxq (queue 0) and re-posts their buffers; :meth:`~VvuDriver.send`
  puts one message on txq (queue 1). rxq buffers hold 4096 bytes, one message
  each; the device reads the next front-end message only while a buffer is
  posted, so buffers go back at once;
* **status** (device config ``le32 status``): :meth:`~VvuDriver.set_backend_up`
  writes BACKEND_UP; the device sets/clears FRONTEND_UP and raises a configuration
  interrupt (``config_eventfd``) when the front-end comes or goes;
* **doorbells** (device aux notifications, cap 6): :meth:`~VvuDriver.doorbell` -
  index ``i`` = call of vhost-user queue ``i``, ``N+i`` = its err, ``2N`` = log;
  when the device names a doorbell companion (``doorbell_peer``) and that
  ivshmem-doorbell function is there, :meth:`~VvuDriver.ring_call` rings calls
  through it instead, without vvu-devd (driver/companion.py), under the peer ID
  the device shows now (:meth:`~VvuDriver.refresh_doorbell_peer`);
* **kicks** (driver aux notifications, cap 7): :meth:`~VvuDriver.kick_eventfd`
  programs notification ``i`` to its own MSI-X vector (``3 + i``) once and
  returns that vector's eventfd;
* **shared memory** (cap 8, shmid 1, BAR2 = the consumer's RAM file):
  :meth:`~VvuDriver.map_shared_memory` maps the window of one memory region, at
  BAR offset = the region's ``mmap_offset``.

MSI-X vectors: 0 configuration change, 1 rxq, 2 txq (not used: NO_VECTOR), 3+i
kick notification i. Without interrupts (sysfs) everything is polled and INTx is
disabled (QEMU without KVM would otherwise trap the mmapped BARs while an INTx
is pending).

Every register access is a trapped MMIO exit (tens of µs under TCG): the
message path costs one notify per batch when EVENT_IDX asks for it, the data
path (the consumer's rings in BAR2) none.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass

from vvu_runtime.driver.companion import DoorbellCompanion, find_companion
from vvu_runtime.driver.errors import DeviceFault, PciError
from vvu_runtime.driver.pci import (
    COMMAND,
    COMMAND_INTX_DISABLE,
    BarFile,
    BarWindow,
    DmaArena,
    DmaBuffer,
    PciFunction,
)
from vvu_runtime.driver.virtio_pci import DriverQueue, Structure, VirtioPciDriver, ring_bytes
from vvu_runtime.vhost_user.transport import Register32
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.pci_layout import NO_VECTOR, DeviceStatus, VirtioPciCapType
from vvu_runtime.virtio.vvu_abi import (
    CONFIG_DOORBELL_OWNER,
    CONFIG_DOORBELL_PEER,
    CONFIG_MAX_VHOST_QUEUES,
    CONFIG_STATUS,
    CONFIG_UUID,
    DEVICE_CONFIG,
    DEVICE_CONFIG_SIZE,
    KICK_SELECT,
    KICK_VECTOR,
    MESSAGE_BUFFER_SIZE,
    NO_DOORBELL_PEER,
    RXQ,
    SHMID_MEMORY,
    TXQ,
    DoorbellKind,
    VvuStatus,
    doorbell_index,
    ivshmem_doorbell,
)

log = logging.getLogger(__name__)

#: MSI-X vectors the driver programs: config changes, rxq, then one kick per queue.
VECTOR_CONFIG = 0
VECTOR_RXQ = 1
VECTOR_KICK_BASE = 3

#: Features the driver accepts (VERSION_1 is required; the device offers no own bits).
WANTED_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
                      | VirtioFeature.EVENT_IDX)
#: How long send() waits for a txq slot before giving up.
SEND_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class VvuIdentity:
    """Read-only device configuration."""

    max_vhost_queues: int
    uuid: uuidlib.UUID
    #: The link's peer ID at the doorbell companion when read (NO_DOORBELL_PEER:
    #: none now) and the companion's own ID (0: no companion, or a device older
    #: than the fields).
    doorbell_peer: int = NO_DOORBELL_PEER
    doorbell_owner: int = 0


class VvuDriver:
    """One VVU function, set up and running (see the module docstring).

    ``rx_size``/``tx_size`` are the rxq/txq sizes asked for (capped by the device).
    Call :meth:`start` before anything else, and again to recover from
    DEVICE_NEEDS_RESET; :meth:`close` resets the device and frees everything.
    """

    def __init__(self, pci: PciFunction, *, virtio_id: int | None = None,
                 rx_size: int = 128, tx_size: int = 64, companion: bool = True) -> None:
        self.pci = pci
        #: Look for the doorbell companion when the device names one.
        self.use_companion = companion
        self.companion: DoorbellCompanion | None = None
        #: The peer ID to ring the companion under (the device changes it with every
        #: new call set: refresh_doorbell_peer()).
        self.doorbell_peer = NO_DOORBELL_PEER
        self.virtio = VirtioPciDriver(pci, virtio_id=virtio_id)
        for cfg_type in (VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG,
                         VirtioPciCapType.DRIVER_AUX_NOTIFY_CFG):
            if not self.virtio.has_cap(cfg_type):
                raise DeviceFault(f"{pci.address}: not a VVU device: no {cfg_type.name} "
                                  "capability")
        if self.virtio.device_cfg is None or self.virtio.device_cfg.length < DEVICE_CONFIG.size:
            raise DeviceFault(f"{pci.address}: not a VVU device: device config shorter than "
                              f"{DEVICE_CONFIG.size} bytes")
        self.name = f"vvu {pci.address}"
        self.rx_size = rx_size
        self.tx_size = tx_size
        self.doorbells: Structure = self.virtio.structure(VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG)
        self._doorbell_regs = self.doorbells.regs
        self._doorbell_base = self.doorbells.base
        self._doorbell_mult = self.doorbells.cap.multiplier
        self.aux: Structure = self.virtio.structure(VirtioPciCapType.DRIVER_AUX_NOTIFY_CFG)
        shm = self.virtio.cap(VirtioPciCapType.SHARED_MEMORY_CFG, SHMID_MEMORY)
        self.shm_bar = shm.bar
        self.shm_offset = shm.offset
        self.shm_size = shm.length
        self.identity = VvuIdentity(0, uuidlib.UUID(int=0))
        self.interrupts = pci.interrupts
        self.eventfds: list[int] = []
        self._dma: DmaBuffer | None = None
        self._arena: DmaArena | None = None
        self.rxq: DriverQueue | None = None
        self.txq: DriverQueue | None = None
        self._rx_bufs: list[int] = []
        self._tx_bufs: list[int] = []
        self._tx_free: list[int] = []
        self._kick_vectors: dict[int, int | None] = {}
        self.started = False
        #: Counters (for logs and tests).
        self.received = 0
        self.sent = 0
        self.doorbells_rung = 0

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """(Re)initialise: reset, negotiate, vectors, queues, rx buffers, DRIVER_OK.

        BACKEND_UP is not set here: the caller does that when it is ready.
        """
        self.started = False
        virtio = self.virtio
        pci = self.pci
        pci.enable_bus_master()
        virtio.negotiate(WANTED_FEATURES)
        self.identity = virtio.read_config(self._read_identity)
        n = self.identity.max_vhost_queues
        self._find_companion()
        if self.interrupts and not self.eventfds:
            table = pci.msix_table_size()
            if table < VECTOR_KICK_BASE:
                raise DeviceFault(f"{pci.address}: {table} MSI-X vectors, at least "
                                  f"{VECTOR_KICK_BASE} needed")
            self.eventfds = pci.enable_msix(min(table, VECTOR_KICK_BASE + n))
        if not self.interrupts:
            cmd = pci.config_read(COMMAND, 2)
            pci.config_write(COMMAND, 2, cmd | COMMAND_INTX_DISABLE)
        self._kick_vectors.clear()
        self._layout()
        assert self._arena is not None
        if self.interrupts:
            virtio.set_config_vector(VECTOR_CONFIG)
        self.rxq = virtio.setup_queue(RXQ, self.rx_size, self._arena,
                                      vector=VECTOR_RXQ if self.interrupts else NO_VECTOR)
        self.txq = virtio.setup_queue(TXQ, self.tx_size, self._arena, vector=NO_VECTOR)
        self.txq.ring.disable_interrupts()
        arena = self._arena
        self._rx_bufs = [arena.alloc(MESSAGE_BUFFER_SIZE, 64) for _ in range(self.rxq.size)]
        self._tx_bufs = [arena.alloc(MESSAGE_BUFFER_SIZE, 64) for _ in range(self.txq.size)]
        self._tx_free = list(range(self.txq.size - 1, -1, -1))
        virtio.driver_ok()
        if virtio.needs_reset:
            # E.g. the device model cannot reach our rings (a guest whose RAM is not
            # shared with it, an IOVA it has no mapping for): its log says why.
            raise DeviceFault(f"{pci.address}: the device set DEVICE_NEEDS_RESET during "
                              "setup (see the device model's log)")
        for i, iova in enumerate(self._rx_bufs):
            self.rxq.ring.add((), ((iova, MESSAGE_BUFFER_SIZE),), i)
        # kick(), not notify(): it notifies (the ring is fresh, avail_event 0) and
        # starts EVENT_IDX's batch here, so the first re-post is not taken for news.
        self.rxq.kick()
        self.started = True
        log.info("%s: VVU device ready: virtio ID %d, %d vhost queues, uuid %s, rxq %d, "
                 "txq %d, %s, shared memory BAR%d of %d MiB", self.name, virtio.virtio_id, n,
                 self.identity.uuid, self.rxq.size, self.txq.size,
                 f"{len(self.eventfds)} MSI-X vectors" if self.interrupts else "poll mode",
                 self.shm_bar, self.shm_size >> 20)

    def _read_identity(self, cfg: Structure) -> VvuIdentity:
        n = cfg.read(CONFIG_MAX_VHOST_QUEUES, 4)
        raw = b"".join(cfg.read(CONFIG_UUID + 4 * i, 4).to_bytes(4, "little") for i in range(4))
        if cfg.length < DEVICE_CONFIG_SIZE:
            return VvuIdentity(n, uuidlib.UUID(bytes=raw))
        return VvuIdentity(n, uuidlib.UUID(bytes=raw), cfg.read(CONFIG_DOORBELL_PEER, 2),
                           cfg.read(CONFIG_DOORBELL_OWNER, 2))

    def _find_companion(self) -> None:
        ident = self.identity
        self.doorbell_peer = ident.doorbell_peer
        if self.companion is not None or not self.use_companion or not ident.doorbell_owner:
            return
        self.companion = find_companion(ident.doorbell_owner)
        if self.companion is None:
            log.warning("%s: the device names doorbell companion %#x, but no "
                        "ivshmem-doorbell function reads that IVPosition: calls stay on the "
                        "trapped doorbells", self.name, ident.doorbell_owner)
        else:
            log.info("%s: calls of queues 0..%d through the doorbell companion %s",
                     self.name, self.companion.call_vectors() - 1, self.companion.address)

    def refresh_doorbell_peer(self) -> None:
        """Read ``doorbell_peer`` again (after SET_VRING_CALL: the device announced the
        new call set under a new ID; reading it also lets the device drop old ones)."""
        if self.companion is None:
            return
        cfg = self.virtio.device_cfg
        assert cfg is not None
        self.doorbell_peer = cfg.read(CONFIG_DOORBELL_PEER, 2)

    def _layout(self) -> None:
        need = (ring_bytes(self.rx_size) + ring_bytes(self.tx_size)
                + (self.rx_size + self.tx_size) * MESSAGE_BUFFER_SIZE + 4096)
        if self._dma is None:
            self._dma = self.pci.alloc_dma(need)  # once: every (un)map costs the device
            self._arena = DmaArena(self._dma)
        assert self._arena is not None
        self._arena.reset()

    def close(self) -> None:
        """Reset the device (it stops using our memory), then free DMA and vectors."""
        if self.started or self._dma is not None:
            try:
                self.virtio.set_status(0)
            except (PciError, DeviceFault) as exc:
                log.warning("%s: reset on close failed: %s", self.name, exc)
        self.started = False
        self.rxq = self.txq = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None
            self._dma = None
        self.pci.disable_msix()
        self.eventfds = []
        if self.companion is not None:
            self.companion.close()
            self.companion = None

    # -- status ---------------------------------------------------------------------------
    def read_status(self) -> int:
        cfg = self.virtio.device_cfg
        assert cfg is not None
        value = cfg.read(CONFIG_STATUS, 4)
        if value == 0xFFFFFFFF:
            _ = self.virtio.status  # raises DeviceGone when the whole function is all-ones
        return value

    def set_backend_up(self, up: bool) -> None:
        cfg = self.virtio.device_cfg
        assert cfg is not None
        cfg.write(CONFIG_STATUS, 4, VvuStatus.BACKEND_UP if up else 0)

    @property
    def needs_reset(self) -> bool:
        return bool(self.virtio.status & DeviceStatus.DEVICE_NEEDS_RESET)

    # -- interrupts -------------------------------------------------------------------------
    @property
    def config_eventfd(self) -> int | None:
        return self.eventfds[VECTOR_CONFIG] if self.eventfds else None

    @property
    def rx_eventfd(self) -> int | None:
        return self.eventfds[VECTOR_RXQ] if self.eventfds else None

    def kick_eventfd(self, index: int) -> int | None:
        """The eventfd that kicks of vhost-user queue ``index`` raise (None: poll it).

        Programs driver aux notification ``index`` → vector ``3 + index`` the first
        time (select, vector, read back; refused reads 0xffff).
        """
        if not self.eventfds or not 0 <= index < self.identity.max_vhost_queues:
            return None
        vector = VECTOR_KICK_BASE + index
        if vector >= len(self.eventfds):
            return None
        if index not in self._kick_vectors:
            self.aux.write(KICK_SELECT, 2, index)
            self.aux.write(KICK_VECTOR, 2, vector)
            got = self.aux.read(KICK_VECTOR, 2)
            if got != vector:
                log.warning("%s: kick notification %d: vector %d refused (reads %#x); that "
                            "queue is polled", self.name, index, vector, got)
                self._kick_vectors[index] = None
            else:
                self._kick_vectors[index] = vector
        programmed = self._kick_vectors[index]
        return None if programmed is None else self.eventfds[programmed]

    # -- doorbells ----------------------------------------------------------------------------
    def doorbell_index(self, kind: DoorbellKind, queue: int) -> int | None:
        """Doorbell of ``kind`` for ``queue`` (None: none exists)."""
        return doorbell_index(kind, queue, self.identity.max_vhost_queues)

    def bypasses(self, queue: int) -> bool:
        """Whether calls of ``queue`` can go through the doorbell companion (else
        only the trapped doorbell: no companion, or a queue past its vectors)."""
        companion = self.companion
        return companion is not None and 0 <= queue < companion.call_vectors()

    def ring_call(self, queue: int, doorbell: int) -> None:
        """The call of ``queue``: through the companion under the current peer ID, or
        the trapped ``doorbell`` when the device shows none (its IDs ran out)."""
        companion = self.companion
        peer = self.doorbell_peer
        if companion is None or peer == NO_DOORBELL_PEER:
            self.doorbell(doorbell)
            return
        companion.ring(ivshmem_doorbell(peer, queue))

    def call_register(self, queue: int) -> Register32 | None:
        """:meth:`ring_call` of ``queue`` as the register store a compiled loop makes
        itself, while the companion carries it under the current peer ID; None
        otherwise (call ring_call)."""
        companion = self.companion
        peer = self.doorbell_peer
        if companion is None or peer == NO_DOORBELL_PEER:
            return None
        return companion.register(ivshmem_doorbell(peer, queue))

    def doorbell(self, index: int) -> None:
        """Ring doorbell ``index`` (one trapped 16-bit write)."""
        self.doorbells_rung += 1
        self._doorbell_regs.write(self._doorbell_base + index * self._doorbell_mult, 2, index)

    # -- shared memory --------------------------------------------------------------------------
    def map_shared_memory(self, offset: int, length: int) -> BarWindow:
        """Map ``[offset, offset+length)`` of the shared memory (the consumer's RAM file)."""
        if offset < 0 or length <= 0 or offset + length > self.shm_size:
            raise DeviceFault(f"{self.name}: [{offset:#x}, +{length:#x}) is outside the "
                              f"{self.shm_size:#x}-byte shared memory")
        return self.pci.map_bar(self.shm_bar, self.shm_offset + offset, length)

    def shared_memory_file(self) -> BarFile:
        """A new fd of the shared memory for another process: shared-memory offset
        ``x`` (= a region's ``mmap_offset``) is at file offset ``offset + x``."""
        bar = self.pci.bar_file(self.shm_bar)
        return BarFile(bar.fd, bar.offset + self.shm_offset, self.shm_size, bar.what)

    # -- messages ---------------------------------------------------------------------------------
    def rx_pending(self) -> bool:
        return self.rxq is not None and self.rxq.ring.has_used()

    def receive(self) -> list[bytes]:
        """Every message the device put on rxq since the last call; buffers re-posted."""
        rxq = self.rxq
        if rxq is None:
            return []
        ring = rxq.ring
        out: list[bytes] = []
        arena = self._arena
        assert arena is not None
        while True:
            done = ring.get_used()
            if not done:
                if not ring.enable_interrupts():
                    break
                continue
            for slot, written in done:
                iova = self._rx_bufs[slot]
                if written > MESSAGE_BUFFER_SIZE:
                    raise DeviceFault(f"{self.name}: rxq used length {written} > "
                                      f"{MESSAGE_BUFFER_SIZE}")
                out.append(bytes(arena.view(iova, written)))
                ring.add((), ((iova, MESSAGE_BUFFER_SIZE),), slot)
        if out:
            self.received += len(out)
            rxq.kick()
        return out

    def drain(self) -> int:
        """Discard whatever sits on rxq (a front-end that is gone); returns the count."""
        return len(self.receive())

    def send(self, message: bytes | bytearray | memoryview, *, kick: bool = True) -> None:
        """Put one message (header + payload) on txq and notify if the device asks.

        With ``kick=False`` the notify waits for :meth:`flush` (one per batch).
        """
        txq = self.txq
        if txq is None:
            raise DeviceFault(f"{self.name}: not started")
        n = len(message)
        if n > MESSAGE_BUFFER_SIZE:
            raise DeviceFault(f"{self.name}: a {n}-byte message does not fit a txq buffer")
        ring = txq.ring
        if not self._tx_free:
            self._reclaim_tx(wait=True)
        slot = self._tx_free.pop()
        iova = self._tx_bufs[slot]
        assert self._arena is not None
        self._arena.view(iova, n)[:] = message
        ring.add(((iova, n),), (), slot)
        if kick:
            txq.kick()
        self.sent += 1
        if len(self._tx_free) < txq.size // 2:
            self._reclaim_tx(wait=False)

    def flush(self) -> None:
        """Notify txq if messages were added since the last notify and the device asks."""
        if self.txq is not None:
            self.txq.kick()

    def _reclaim_tx(self, *, wait: bool) -> None:
        assert self.txq is not None
        ring = self.txq.ring
        deadline = time.monotonic() + SEND_TIMEOUT
        while True:
            for slot, _written in ring.get_used():
                self._tx_free.append(slot)
            if self._tx_free or not wait:
                return
            if time.monotonic() > deadline:
                raise DeviceFault(f"{self.name}: txq stays full for {SEND_TIMEOUT} s")
            self.txq.notify()
            time.sleep(0.001)


def drain_eventfd(fd: int | None) -> int:
    """Read (and so reset) an eventfd's counter; 0 when it was not signalled."""
    if fd is None:
        return 0
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


__all__ = [
    "VvuDriver",
    "VvuIdentity",
    "drain_eventfd",
]
