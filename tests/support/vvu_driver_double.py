"""The appliance's guest driver of a VVU function, reduced to what tests need: a
test double of the driver layer that speaks to a real device model (in-process,
or a ``vvu-devd`` process) through :class:`VfioUserClient`.

It walks the virtio-pci capabilities, negotiates, puts rxq/txq in its own
"guest RAM" (a memfd it DMA_MAPs), enables MSI-X (or INTx) with eventfds, and
reads/writes the VVU registers: status, doorbells, kick vectors.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.guest_ram import sealed_memfd
from tests.support.vfio_user_client import VfioUserClient
from vvu_runtime.device.vfio_user.protocol import IrqSetFlags, PciIrq, PciRegion
from vvu_runtime.device.virtio_pci import Common, DeviceStatus, VirtioPciCapType
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.virtio.driver_ring import SplitDriverRing
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd

MiB = 1 << 20
APPLIANCE_RAM = 4 * MiB
N = 4  # default max_vhost_queues of the test devices
QSIZE = 16
RX_BUF = 4096
CONFIG_VECTOR, RXQ_VECTOR, TXQ_VECTOR = 0, 1, 2
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
TIMEOUT = 5.0


def fired(fd: int, timeout: float = TIMEOUT) -> int:
    """The eventfd's count if it fires within ``timeout``, else 0."""
    if select.select([fd], [], [], timeout)[0]:
        return os.eventfd_read(fd)
    return 0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def header(data: bytes) -> tuple[int, int, int]:
    return m.HEADER.unpack_from(data)


@dataclass
class Cap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_id: int
    extra: bytes


@dataclass
class VvuDriverDouble:
    """What the guest driver in the appliance does, over a vfio-user client."""

    client: VfioUserClient
    ram_fd: int
    memory: GuestMemory
    #: max_vhost_queues of the device (one kick vector each).
    max_queues: int = N
    caps: dict[int, Cap] = field(default_factory=dict)
    vectors: list[int] = field(default_factory=list)
    intx: int | None = None
    rx: SplitDriverRing[int] | None = None
    tx: SplitDriverRing[int] | None = None
    next_free: int = 0x10000
    #: Negotiate EVENT_IDX when offered and drive rxq/txq with it (the real driver
    #: does); off, the double notifies after every change, as before it existed.
    event_idx: bool = False

    # -- registers
    def walk_caps(self) -> None:
        cfg = self.client.region_read(PciRegion.CONFIG, 0, 256)
        pos = cfg[0x34]
        while pos:
            if cfg[pos] == 0x09:
                cap_len, cfg_type, bar, cap_id, off, length = struct.unpack_from(
                    "<BBBBxxII", cfg, pos + 2)
                self.caps.setdefault(cfg_type, Cap(cfg_type, bar, off, length, cap_id,
                                                   bytes(cfg[pos + 16:pos + cap_len])))
            pos = cfg[pos + 1]

    def read(self, cfg_type: int, offset: int, size: int) -> int:
        cap = self.caps[cfg_type]
        return int.from_bytes(self.client.region_read(cap.bar, cap.offset + offset, size),
                              "little")

    def write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        cap = self.caps[cfg_type]
        self.client.region_write(cap.bar, cap.offset + offset, value.to_bytes(size, "little"))

    def common(self, field_: int, size: int, value: int | None = None) -> int:
        if value is not None:
            self.write(VirtioPciCapType.COMMON_CFG, field_, size, value)
            return value
        return self.read(VirtioPciCapType.COMMON_CFG, field_, size)

    @property
    def virtio_status(self) -> int:
        return self.common(Common.DEVICE_STATUS, 1)

    @property
    def vvu_status(self) -> int:
        return self.read(VirtioPciCapType.DEVICE_CFG, 0, 4)

    def set_backend_up(self, up: bool = True) -> None:
        self.write(VirtioPciCapType.DEVICE_CFG, 0, 4, int(up))

    def doorbell(self, index: int, width: int = 4) -> None:
        self.write(VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG, 4 * index, width, 1)

    def kick_vector(self, notification: int, vector: int | None = None) -> int:
        self.write(VirtioPciCapType.DRIVER_AUX_NOTIFY_CFG, 0, 2, notification)
        if vector is not None:
            self.write(VirtioPciCapType.DRIVER_AUX_NOTIFY_CFG, 2, 2, vector)
        return self.read(VirtioPciCapType.DRIVER_AUX_NOTIFY_CFG, 2, 2)

    # -- bring-up
    def alloc(self, size: int, align: int = 4096) -> int:
        addr = (self.next_free + align - 1) & ~(align - 1)
        self.next_free = addr + size
        assert self.next_free <= APPLIANCE_RAM
        return addr

    def negotiate(self) -> int:
        self.common(Common.DEVICE_STATUS, 1, 0)
        self.common(Common.DEVICE_STATUS, 1, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        self.common(Common.DEVICE_FEATURE_SELECT, 4, 0)
        lo = self.common(Common.DEVICE_FEATURE, 4)
        self.common(Common.DEVICE_FEATURE_SELECT, 4, 1)
        offered = lo | self.common(Common.DEVICE_FEATURE, 4) << 32
        accepted = offered if self.event_idx else offered & ~VirtioFeature.EVENT_IDX
        for word in (0, 1):
            self.common(Common.DRIVER_FEATURE_SELECT, 4, word)
            self.common(Common.DRIVER_FEATURE, 4, (accepted >> (32 * word)) & 0xFFFFFFFF)
        self.common(Common.DEVICE_STATUS, 1, 0b1011)
        assert self.virtio_status & DeviceStatus.FEATURES_OK
        return offered

    def enable_msix(self, count: int) -> None:
        self.client.config_write(0x04, 2, 0x6)  # memory space + bus master
        self.client.config_write(0x40 + 2, 2, 1 << 15)
        for fd in self.vectors:
            os.close(fd)
        self.vectors = [eventfd() for _ in range(count)]
        self.client.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, count, self.vectors)

    def enable_intx(self) -> None:
        self.client.config_write(0x04, 2, 0x6)
        if self.intx is not None:
            os.close(self.intx)
        self.intx = eventfd()
        self.client.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [self.intx])

    def setup_queue(self, index: int, vector: int) -> SplitDriverRing[int]:
        self.common(Common.QUEUE_SELECT, 2, index)
        self.common(Common.QUEUE_SIZE, 2, QSIZE)
        base = self.alloc(16 * QSIZE + 6 + 2 * QSIZE + 4096 + 6 + 8 * QSIZE)
        ring: SplitDriverRing[int] = SplitDriverRing.contiguous(self.memory, QSIZE, base,
                                                                event_idx=self.event_idx)
        for field_, addr in ((Common.QUEUE_DESC, ring.desc_addr),
                             (Common.QUEUE_DRIVER, ring.avail_addr),
                             (Common.QUEUE_DEVICE, ring.used_addr)):
            self.common(field_, 4, addr & 0xFFFFFFFF)
            self.common(field_ + 4, 4, addr >> 32)
        self.common(Common.QUEUE_MSIX_VECTOR, 2, vector)
        self.common(Common.QUEUE_ENABLE, 2, 1)
        return ring

    def bring_up(self, *, msix: bool = True, rx_buffer: int = RX_BUF,
                 rx_at: int | None = None, rx_count: int = QSIZE) -> None:
        """Reset, negotiate, queues, vectors, DRIVER_OK, rx buffers (not BACKEND_UP)."""
        self.negotiate()
        if msix:
            self.enable_msix(3 + self.max_queues)
            self.common(Common.CONFIG_MSIX_VECTOR, 2, CONFIG_VECTOR)
        else:
            self.enable_intx()
        self.rx = self.setup_queue(0, RXQ_VECTOR)
        self.tx = self.setup_queue(1, TXQ_VECTOR)
        for i in range(self.max_queues):
            assert self.kick_vector(i, 3 + i) == 3 + i
        self.common(Common.DEVICE_STATUS, 1, self.virtio_status | DeviceStatus.DRIVER_OK)
        self.post_rx(rx_count, rx_buffer, rx_at)

    def post_rx(self, count: int, size: int = RX_BUF, at: int | None = None) -> None:
        """``count`` rxq buffers from the appliance RAM (or from IOVA ``at`` on)."""
        assert self.rx is not None
        for i in range(count):
            addr = self.alloc(size, 16) if at is None else at + i * size
            self.rx.add([], [(addr, size)], addr)
        self.notify_if_asked(0)

    def notify(self, queue: int) -> None:
        self.write(VirtioPciCapType.NOTIFY_CFG, 4 * queue, 2, queue)

    def notify_if_asked(self, queue: int, *, posted: bool = False) -> bool:
        """After adding buffers: notify only if the device asked (EVENT_IDX), as the
        real driver does; without EVENT_IDX, always (the double never reads flags).
        ``posted``: do not wait for the device (QEMU posts BAR writes)."""
        ring = self.rx if queue == 0 else self.tx
        assert ring is not None
        if self.event_idx and not ring.kick_needed():
            return False
        cap = self.caps[VirtioPciCapType.NOTIFY_CFG]
        self.client.region_write(cap.bar, cap.offset + 4 * queue,
                                 queue.to_bytes(2, "little"), posted=posted)
        return True

    # -- messages
    def recv(self, timeout: float = TIMEOUT) -> bytes:
        """The one next message the device put in rxq (its buffer is reposted)."""
        first, *rest = self.recv_all(timeout)
        assert not rest, "one message at a time in these tests"
        return first

    def recv_all(self, timeout: float = TIMEOUT) -> list[bytes]:
        """Every message waiting in rxq (at least one); buffers are reposted."""
        assert self.rx is not None
        rx = self.rx
        wait_for(rx.has_used, "a message in rxq", timeout)
        out = []
        for addr, written in rx.get_used():
            out.append(bytes(self.memory.translate(addr, written)))
            rx.add([], [(addr, RX_BUF)], addr)
        self.notify_if_asked(0)
        return out

    def rx_empty(self, settle: float = 0.05) -> bool:
        assert self.rx is not None
        time.sleep(settle)
        return not self.rx.has_used()

    def add_tx(self, data: bytes) -> None:
        """Put one message in txq, without a notify."""
        assert self.tx is not None
        addr = self.alloc(max(len(data), 1), 16)
        self.memory.translate(addr, len(data))[:] = data
        self.tx.add([(addr, len(data))], [], addr)

    def send(self, data: bytes, wait: bool = True) -> None:
        """Put one message in txq and notify."""
        assert self.tx is not None
        self.add_tx(data)
        self.notify_if_asked(1)
        if wait:
            tx = self.tx
            wait_for(lambda: tx.has_used() or not self.live(), "txq completion")
            if tx.has_used():
                tx.get_used()

    def reply(self, request: int, payload: m.Payload) -> None:
        self.send(m.encode_bytes(request, payload, reply=True))

    def live(self) -> bool:
        """Whether the device is usable (DEVICE_NEEDS_RESET clear)."""
        return not self.virtio_status & DeviceStatus.DEVICE_NEEDS_RESET

    def close(self) -> None:
        self.client.close()
        for fd in self.vectors:
            os.close(fd)
        if self.intx is not None:
            os.close(self.intx)
        self.rx = self.tx = None  # their views pin the mapping (and its fd)
        self.memory.clear()
        os.close(self.ram_fd)


def attach_driver(client: VfioUserClient, name: str, *, max_queues: int = N
                  ) -> VvuDriverDouble:
    """A driver on ``client`` (past VERSION) with its RAM DMA_MAPped and caps walked."""
    app_ram = sealed_memfd(f"{name}-appliance-ram", APPLIANCE_RAM)
    memory = GuestMemory()
    memory.add(map_fd(MemoryRegion(0, APPLIANCE_RAM, 0, 0), app_ram))
    client.dma_map(0, APPLIANCE_RAM, app_ram)
    driver = VvuDriverDouble(client, app_ram, memory, max_queues)
    driver.walk_caps()
    return driver


__all__ = [
    "APPLIANCE_RAM",
    "CONFIG_VECTOR",
    "EVENTFD_TRIGGER",
    "QSIZE",
    "RXQ_VECTOR",
    "RX_BUF",
    "TIMEOUT",
    "TXQ_VECTOR",
    "Cap",
    "N",
    "VvuDriverDouble",
    "attach_driver",
    "eventfd",
    "fired",
    "header",
    "wait_for",
]
