"""The virtio-pci modern transport, driven like a guest driver would through vfio-user.

A small driver here walks the capabilities, negotiates, sets up split rings in
a memfd that the client DMA_MAPs (guest RAM), and uses the project's driver-side
ring (``virtio.driver_ring``) while the device side uses ``virtio.split``.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.entropy import EntropyDevice
from tests.support.guest_ram import sealed_memfd
from tests.support.server_thread import ServerThread
from tests.support.vfio_user_client import VfioUserClient
from vvu_runtime.device.vfio_user.protocol import IrqSetFlags, PciIrq, PciRegion
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.virtio_pci import (
    NO_VECTOR,
    Common,
    DeviceStatus,
    VirtioPciCapType,
    VirtioPciDevice,
)
from vvu_runtime.virtio.driver_ring import SplitDriverRing
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd

MiB = 1 << 20
RAM_SIZE = 4 * MiB
EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER


class EchoDevice(VirtioPciDevice):
    """Queue 0 (tx, driver→device) is echoed upper-cased into queue 1 (rx).

    Device config: ``le32 echoed`` (read-only), ``le32 tag`` (driver-writable;
    writing it makes the device change ``echoed`` and signal a config change).
    """

    def __init__(self) -> None:
        super().__init__(name="echo", virtio_device_id=0x3F, num_queues=2,
                         queue_max_size=[64, 64], device_cfg_size=8,
                         device_features=1 << 0)
        self.echoed = 0
        self.tag = 0
        self.resets = 0
        self.live = 0

    def read_device_config(self, offset: int, size: int) -> bytes:
        return struct.pack("<II", self.echoed, self.tag)[offset:offset + size]

    def write_device_config(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:
            self.tag = int.from_bytes(data, "little")
            self.echoed = 0
            self.config_changed()

    def queue_notified(self, index: int) -> None:
        tx, rx = self.queues[0].ring, self.queues[1].ring
        if tx is None or rx is None:
            return
        while tx.has_available() and rx.has_available():
            out = tx.pop()
            into = rx.pop()
            assert out is not None and into is not None
            n = into.write(out.read().upper())
            tx.push(out, 0)
            rx.push(into, n)
            self.echoed += 1
        for i, ring in ((0, tx), (1, rx)):
            if ring.should_notify():
                self.interrupt_queue(i)

    def driver_ok(self) -> None:
        self.live += 1

    def virtio_reset(self) -> None:
        self.resets += 1
        self.echoed = 0


@dataclass
class Cap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_id: int
    extra: bytes
    at: int


@dataclass
class Driver:
    """What a guest's virtio-pci driver does, over a vfio-user client."""

    c: VfioUserClient
    thread: ServerThread
    device: VirtioPciDevice
    ram_fd: int
    memory: GuestMemory
    caps: dict[int, Cap] = field(default_factory=dict)
    eventfds: list[int] = field(default_factory=list)
    next_free: int = 0x10000

    def walk_caps(self) -> None:
        cfg = self.c.region_read(PciRegion.CONFIG, 0, 256)
        pos = cfg[0x34]
        while pos:
            if cfg[pos] == 0x09:
                cap_len, cfg_type, bar, cap_id, off, length = struct.unpack_from(
                    "<BBBBxxII", cfg, pos + 2)
                self.caps.setdefault(cfg_type, Cap(cfg_type, bar, off, length, cap_id,
                                                   bytes(cfg[pos + 16:pos + cap_len]), pos))
            pos = cfg[pos + 1]

    def _at(self, cfg_type: int, offset: int) -> tuple[int, int]:
        cap = self.caps[cfg_type]
        return cap.bar, cap.offset + offset

    def read(self, cfg_type: int, offset: int, size: int) -> int:
        bar, off = self._at(cfg_type, offset)
        return int.from_bytes(self.c.region_read(bar, off, size), "little")

    def write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        bar, off = self._at(cfg_type, offset)
        self.c.region_write(bar, off, value.to_bytes(size, "little"))

    def common(self, field_: int, size: int, value: int | None = None) -> int:
        if value is not None:
            self.write(VirtioPciCapType.COMMON_CFG, field_, size, value)
            return value
        return self.read(VirtioPciCapType.COMMON_CFG, field_, size)

    @property
    def status(self) -> int:
        return self.common(Common.DEVICE_STATUS, 1)

    def device_features(self) -> int:
        self.common(Common.DEVICE_FEATURE_SELECT, 4, 0)
        lo = self.common(Common.DEVICE_FEATURE, 4)
        self.common(Common.DEVICE_FEATURE_SELECT, 4, 1)
        return lo | self.common(Common.DEVICE_FEATURE, 4) << 32

    def negotiate(self, wanted: int) -> int:
        self.common(Common.DEVICE_STATUS, 1, 0)
        assert self.status == 0
        self.common(Common.DEVICE_STATUS, 1, DeviceStatus.ACKNOWLEDGE)
        self.common(Common.DEVICE_STATUS, 1, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        features = self.device_features() & wanted
        for word in (0, 1):
            self.common(Common.DRIVER_FEATURE_SELECT, 4, word)
            self.common(Common.DRIVER_FEATURE, 4, (features >> (32 * word)) & 0xFFFFFFFF)
        self.common(Common.DEVICE_STATUS, 1, 0b1011)
        return features

    def enable_msix(self, vectors: int) -> None:
        self.c.config_write(0x04, 2, 0x6)  # memory + bus master
        msix = 0x40
        self.c.config_write(msix + 2, 2, 1 << 15)
        self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                         for _ in range(vectors)]
        self.c.set_irqs(PciIrq.MSIX, EVENTFD_TRIGGER, 0, vectors, self.eventfds)

    def alloc(self, size: int, align: int = 4096) -> int:
        addr = (self.next_free + align - 1) & ~(align - 1)
        self.next_free = addr + size
        assert self.next_free <= RAM_SIZE
        return addr

    def setup_queue(self, index: int, size: int, vector: int,
                    event_idx: bool = False) -> SplitDriverRing[int]:
        self.common(Common.QUEUE_SELECT, 2, index)
        assert self.common(Common.QUEUE_SIZE, 2) >= size
        self.common(Common.QUEUE_SIZE, 2, size)
        base = self.alloc(16 * size + 6 + 2 * size + 4096 + 6 + 8 * size)
        ring: SplitDriverRing[int] = SplitDriverRing.contiguous(self.memory, size, base,
                                                                event_idx=event_idx)
        for field_, addr in ((Common.QUEUE_DESC, ring.desc_addr),
                             (Common.QUEUE_DRIVER, ring.avail_addr),
                             (Common.QUEUE_DEVICE, ring.used_addr)):
            self.common(field_, 4, addr & 0xFFFFFFFF)
            self.common(field_ + 4, 4, addr >> 32)
        self.common(Common.QUEUE_MSIX_VECTOR, 2, vector)
        assert self.common(Common.QUEUE_MSIX_VECTOR, 2) == vector
        self.common(Common.QUEUE_ENABLE, 2, 1)
        return ring

    def driver_ok(self) -> None:
        self.common(Common.DEVICE_STATUS, 1, self.status | DeviceStatus.DRIVER_OK)

    def notify(self, index: int) -> None:
        mult = struct.unpack("<I", self.caps[VirtioPciCapType.NOTIFY_CFG].extra)[0]
        self.common(Common.QUEUE_SELECT, 2, index)
        off = self.common(Common.QUEUE_NOTIFY_OFF, 2)
        self.write(VirtioPciCapType.NOTIFY_CFG, off * mult, 2, index)

    def buffer(self, data: bytes = b"", size: int = 0) -> int:
        addr = self.alloc(max(len(data), size, 1), 16)
        self.memory.translate(addr, len(data))[:] = data
        return addr

    def bytes_at(self, addr: int, n: int) -> bytes:
        return bytes(self.memory.translate(addr, n))


def _fired(fd: int, timeout: float = 1.0) -> int:
    if select.select([fd], [], [], timeout)[0]:
        return os.eventfd_read(fd)
    return 0


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Driver]:
    device: VirtioPciDevice = getattr(request, "param", EchoDevice)()
    ours, theirs = socket.socketpair()
    server = VfioUserServer(device)
    ram = sealed_memfd("vvu-test-guest-ram", RAM_SIZE)
    memory = GuestMemory()
    memory.add(map_fd(MemoryRegion(0, RAM_SIZE, 0, 0), ram))
    with ServerThread(lambda: server) as thread:
        thread.call(lambda: server.attach(theirs))
        client = VfioUserClient(ours)
        client.version()
        client.dma_map(0, RAM_SIZE, ram)
        drv = Driver(client, thread, device, ram, memory)
        drv.walk_caps()
        yield drv
        client.close()
        for fd in drv.eventfds:
            os.close(fd)
    memory.clear()
    os.close(ram)
    device.close()


def test_capabilities_follow_the_layout_table(rig: Driver) -> None:
    caps = rig.caps
    assert set(caps) == {1, 2, 3, 4, 5}
    layout = rig.device.layout
    for cfg_type in (1, 2, 3, 4):
        s = layout.structure(VirtioPciCapType(cfg_type))
        assert (caps[cfg_type].bar, caps[cfg_type].offset, caps[cfg_type].length) == (
            s.bar, s.offset, s.length)
    assert caps[2].extra == struct.pack("<I", 4)  # notify_off_multiplier
    assert caps[1].length >= 0x38
    ident = rig.c.region_read(PciRegion.CONFIG, 0, 4)
    assert struct.unpack("<HH", ident) == (0x1AF4, 0x1040 + 0x3F)
    assert rig.c.config_read(0x08, 1) >= 1  # modern devices: revision >= 1
    table = layout.describe()
    assert "| 0 | 0x3000 | 0x8 | queue notify" in table
    assert "MSI-X table, 3 vectors" in table


def test_feature_negotiation_and_status_rules(rig: Driver) -> None:
    offered = rig.device_features()
    assert offered == (1 | VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
                       | VirtioFeature.INDIRECT_DESC | VirtioFeature.EVENT_IDX)
    # A feature the device did not offer: FEATURES_OK does not stick.
    rig.negotiate(offered)
    rig.common(Common.DRIVER_FEATURE_SELECT, 4, 0)
    rig.common(Common.DEVICE_STATUS, 1, 0)
    rig.common(Common.DEVICE_STATUS, 1, 3)
    rig.common(Common.DRIVER_FEATURE_SELECT, 4, 1)
    rig.common(Common.DRIVER_FEATURE, 4, 1 << 20)
    rig.common(Common.DEVICE_STATUS, 1, 0b1011)
    assert rig.status == 0b0011
    # Without VERSION_1 neither.
    assert rig.negotiate(1) == 1
    assert rig.status == 0b0011
    # A proper set sticks, and the driver cannot change it afterwards.
    got = rig.negotiate(VirtioFeature.VERSION_1 | 1)
    assert rig.status == 0b1011
    rig.common(Common.DRIVER_FEATURE_SELECT, 4, 0)
    rig.common(Common.DRIVER_FEATURE, 4, 0)
    assert rig.thread.call(lambda: rig.device.negotiated_features) == got
    # Clearing a status bit other than by writing 0 is a driver bug: NEEDS_RESET.
    rig.common(Common.DEVICE_STATUS, 1, 0b0011)
    assert rig.status & DeviceStatus.DEVICE_NEEDS_RESET
    rig.common(Common.DEVICE_STATUS, 1, 0)
    assert rig.status == 0
    # DRIVER_OK without FEATURES_OK likewise.
    rig.common(Common.DEVICE_STATUS, 1, 0b0111)
    assert rig.status & DeviceStatus.DEVICE_NEEDS_RESET and not rig.status & 4


def test_reset_by_writing_zero_clears_the_transport(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.enable_msix(3)
    rig.common(Common.CONFIG_MSIX_VECTOR, 2, 0)
    rig.setup_queue(0, 16, 1)
    rig.driver_ok()
    assert isinstance(rig.device, EchoDevice) and rig.device.live == 1
    rig.common(Common.DEVICE_STATUS, 1, 0)
    assert rig.status == 0
    assert rig.common(Common.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    rig.common(Common.QUEUE_SELECT, 2, 0)
    assert rig.common(Common.QUEUE_ENABLE, 2) == 0
    assert rig.common(Common.QUEUE_SIZE, 2) == 64
    assert rig.common(Common.QUEUE_DESC, 4) == 0
    assert rig.device.queues[0].ring is None
    assert isinstance(rig.device, EchoDevice) and rig.device.resets >= 2


def test_queue_fields_and_vectors(rig: Driver) -> None:
    assert rig.common(Common.NUM_QUEUES, 2) == 2
    rig.common(Common.QUEUE_SELECT, 2, 1)
    assert rig.common(Common.QUEUE_NOTIFY_OFF, 2) == 1
    assert rig.common(Common.QUEUE_SIZE, 2) == 64
    # A vector the device cannot map reads back as NO_VECTOR.
    rig.common(Common.QUEUE_MSIX_VECTOR, 2, 7)
    assert rig.common(Common.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    rig.common(Common.QUEUE_DESC, 4, 0x12345000)
    rig.common(Common.QUEUE_DESC + 4, 4, 0x1)
    assert rig.read(VirtioPciCapType.COMMON_CFG, Common.QUEUE_DESC, 8) == 0x1_12345000
    # Queues past num_queues read as absent (size 0).
    rig.common(Common.QUEUE_SELECT, 2, 5)
    assert rig.common(Common.QUEUE_SIZE, 2) == 0


@pytest.mark.parametrize("rig", [lambda: EntropyDevice(source=lambda n: b"\xab" * n)],
                         indirect=True)
def test_entropy_device_fills_buffers_and_raises_msix(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.enable_msix(2)
    rig.common(Common.CONFIG_MSIX_VECTOR, 2, 0)
    ring = rig.setup_queue(0, 32, 1)
    rig.driver_ok()
    bufs = [rig.buffer(size=64) for _ in range(4)]
    for i, addr in enumerate(bufs):
        ring.add([], [(addr, 64)], i)
    assert ring.kick_needed()
    rig.notify(0)
    assert _fired(rig.eventfds[1]) == 1
    assert _fired(rig.eventfds[0], 0.05) == 0
    assert sorted(ring.get_used()) == [(i, 64) for i in range(4)]
    assert all(rig.bytes_at(a, 64) == b"\xab" * 64 for a in bufs)


def test_echo_with_indirect_descriptors_and_event_idx(rig: Driver) -> None:
    features = rig.negotiate(VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX
                             | VirtioFeature.INDIRECT_DESC)
    assert features & VirtioFeature.EVENT_IDX
    rig.enable_msix(3)
    tx = rig.setup_queue(0, 16, 1, event_idx=True)
    rx = rig.setup_queue(1, 16, 2, event_idx=True)
    rig.driver_ok()
    inbox = [rig.buffer(size=32) for _ in range(3)]
    for i, addr in enumerate(inbox):
        rx.add([], [(addr, 32)], i)
    rig.notify(1)
    # One message in two readable pieces through an indirect table.
    table = rig.alloc(32, 16)
    tx.add_indirect([(rig.buffer(b"hello "), 6), (rig.buffer(b"vfio-user"), 9)], [], 100,
                    table)
    rig.notify(0)
    assert _fired(rig.eventfds[2]) == 1
    assert rx.get_used() == [(0, 15)]
    assert rig.bytes_at(inbox[0], 15) == b"HELLO VFIO-USER"
    assert tx.get_used() == [(100, 0)]
    assert rig.read(VirtioPciCapType.DEVICE_CFG, 0, 4) == 1


def test_config_change_interrupt_and_generation(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.enable_msix(3)
    rig.common(Common.CONFIG_MSIX_VECTOR, 2, 0)
    rig.setup_queue(0, 16, 1)
    rig.driver_ok()
    gen = rig.common(Common.CONFIG_GENERATION, 1)
    rig.write(VirtioPciCapType.DEVICE_CFG, 4, 4, 0xBEEF)
    assert _fired(rig.eventfds[0]) == 1
    assert rig.common(Common.CONFIG_GENERATION, 1) == (gen + 1) & 0xFF
    assert rig.read(VirtioPciCapType.DEVICE_CFG, 4, 4) == 0xBEEF


def test_intx_and_isr_read_to_clear(rig: Driver) -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    rig.eventfds.append(efd)
    rig.c.set_irqs(PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
    rig.negotiate(VirtioFeature.VERSION_1)
    tx = rig.setup_queue(0, 16, NO_VECTOR)
    rx = rig.setup_queue(1, 16, NO_VECTOR)
    rig.driver_ok()
    addr = rig.buffer(size=8)
    rx.add([], [(addr, 8)], 1)
    tx.add([(rig.buffer(b"intx"), 4)], [], 2)
    rig.notify(0)
    assert _fired(efd) == 1
    assert rig.c.config_read(0x06, 2) & 0x8
    assert rig.read(VirtioPciCapType.ISR_CFG, 0, 1) == 1
    assert rig.read(VirtioPciCapType.ISR_CFG, 0, 1) == 0  # read cleared it
    assert rig.c.config_read(0x06, 2) & 0x8 == 0
    assert rx.get_used() == [(1, 4)]


def test_notify_before_driver_ok_is_ignored(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    tx = rig.setup_queue(0, 16, NO_VECTOR)
    rig.setup_queue(1, 16, NO_VECTOR)
    tx.add([(rig.buffer(b"early"), 5)], [], 1)
    rig.notify(0)
    assert isinstance(rig.device, EchoDevice) and rig.device.echoed == 0
    assert not tx.has_used()


def test_unmapping_live_ring_memory_needs_reset(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.enable_msix(3)
    rig.common(Common.CONFIG_MSIX_VECTOR, 2, 0)
    rig.setup_queue(0, 16, 1)
    rig.driver_ok()
    rig.c.dma_unmap(0, RAM_SIZE)
    assert rig.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert _fired(rig.eventfds[0]) == 1  # config interrupt tells the driver
    assert rig.device.queues[0].ring is None
    rig.notify(0)  # harmless now
    assert rig.c.get_info().num_regions == 9


def test_ring_outside_mapped_memory_needs_reset(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.common(Common.QUEUE_SELECT, 2, 0)
    rig.common(Common.QUEUE_DESC, 4, RAM_SIZE + 0x1000)  # past the DMA map
    rig.common(Common.QUEUE_ENABLE, 2, 1)
    assert rig.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_hostile_descriptor_fails_the_device_not_the_server(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    tx = rig.setup_queue(0, 16, NO_VECTOR)
    rx = rig.setup_queue(1, 16, NO_VECTOR)
    rig.driver_ok()
    rx.add([], [(rig.buffer(size=8), 8)], 1)
    tx.add([(RAM_SIZE * 4, 64)], [], 2)  # a buffer nowhere in guest memory
    rig.notify(0)
    assert rig.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert rig.c.get_info().num_regions == 9


def test_pci_cfg_capability_window(rig: Driver) -> None:
    cap = rig.caps[VirtioPciCapType.PCI_CFG].at
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.c.config_write(cap + 4, 1, 0)  # bar 0
    rig.c.config_write(cap + 8, 4, Common.DEVICE_STATUS)
    rig.c.config_write(cap + 12, 4, 1)
    assert rig.c.config_read(cap + 16, 1) == 0b1011
    rig.c.config_write(cap + 8, 4, Common.NUM_QUEUES)
    rig.c.config_write(cap + 12, 4, 2)
    assert rig.c.config_read(cap + 16, 2) == 2


def test_device_reset_message_resets_virtio_state(rig: Driver) -> None:
    rig.negotiate(VirtioFeature.VERSION_1)
    rig.setup_queue(0, 16, NO_VECTOR)
    rig.driver_ok()
    rig.c.reset()
    assert rig.status == 0
    assert rig.device.queues[0].ring is None
