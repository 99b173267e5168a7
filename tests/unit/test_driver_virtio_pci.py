"""The guest-side virtio-pci driver against the device model's virtio-rng, through the
vfio-user client standing in for vfio-pci (tests/support/vfio_user_function.py).

Everything above the PCI layer is the real driver code; the device is the real
device model (``tests.support.entropy``) on its vfio-user server.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from tests.support.entropy import EntropyDevice
from tests.support.server_thread import ServerThread
from tests.support.vfio_user_client import VfioUserClient
from tests.support.vfio_user_function import VfioUserPciFunction
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.driver.errors import DeviceFault
from vvu_runtime.driver.pci import CAP_ID_MSIX, DmaArena, PciFunction
from vvu_runtime.driver.virtio_pci import VirtioPciDriver
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.pci_layout import NO_VECTOR, DeviceStatus, VirtioPciCapType


class Rig:
    def __init__(self, device: EntropyDevice, thread: ServerThread, pci: VfioUserPciFunction):
        self.device = device
        self.thread = thread
        self.pci = pci


def _rig(device: EntropyDevice, *, interrupts: bool = True) -> Iterator[Rig]:
    ours, theirs = socket.socketpair()
    server = VfioUserServer(device)
    with ServerThread(lambda: server) as thread:
        thread.call(lambda: server.attach(theirs))
        client = VfioUserClient(ours)
        client.version()
        pci = VfioUserPciFunction(client, interrupts=interrupts)
        try:
            yield Rig(device, thread, pci)
        finally:
            pci.close()
            client.close()
    device.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield from _rig(EntropyDevice(source=lambda n: b"\x5a" * n, shared_memory=0x10000))


def _fired(fd: int, timeout: float = 2.0) -> int:
    if select.select([fd], [], [], timeout)[0]:
        return os.eventfd_read(fd)
    return 0


def test_pci_helpers_walk_config_space(rig: Rig) -> None:
    pci: PciFunction = rig.pci
    assert (pci.vendor_id, pci.device_id) == (0x1AF4, 0x1044)
    assert pci.class_code == 0xFF0000
    ids = [c.cap_id for c in pci.capabilities()]
    assert CAP_ID_MSIX in ids and ids.count(0x09) >= 5
    assert pci.msix_table_size() == 2
    pci.enable_bus_master()
    assert pci.config_read(0x04, 2) & 0x6 == 0x6
    assert rig.thread.call(lambda: rig.device.bus_master)


def test_capability_walk_finds_every_structure(rig: Rig) -> None:
    drv = VirtioPciDriver(rig.pci, virtio_id=4)
    assert drv.virtio_id == 4
    types = {c.cfg_type for c in drv.caps}
    assert {1, 2, 3, 4, 5, 8} <= types or {1, 2, 3, 5, 8} <= types
    shm = drv.cap(VirtioPciCapType.SHARED_MEMORY_CFG, 1)
    assert (shm.bar, shm.offset, shm.length) == (2, 0, 0x10000)
    assert drv.notify_cap.multiplier == 4
    with pytest.raises(DeviceFault, match="virtio device ID 4, expected 63"):
        VirtioPciDriver(rig.pci, virtio_id=63)


def test_negotiation_and_reset(rig: Rig) -> None:
    drv = VirtioPciDriver(rig.pci)
    offered = drv.device_features()
    assert offered & VirtioFeature.VERSION_1 and offered & VirtioFeature.EVENT_IDX
    got = drv.negotiate(VirtioFeature.EVENT_IDX | VirtioFeature.ACCESS_PLATFORM | (1 << 50))
    assert got == (VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX
                   | VirtioFeature.ACCESS_PLATFORM)
    assert drv.status == DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    assert rig.thread.call(lambda: rig.device.negotiated_features) == got
    drv.reset()
    assert drv.status == 0
    with pytest.raises(DeviceFault, match="required"):
        drv.negotiate(0, required=1 << 50)


def _entropy_round(rig: Rig, *, event_idx: bool) -> None:
    pci = rig.pci
    pci.enable_bus_master()
    drv = VirtioPciDriver(pci)
    drv.negotiate(VirtioFeature.ACCESS_PLATFORM
                  | (VirtioFeature.EVENT_IDX if event_idx else 0))
    fds = pci.enable_msix(2)
    drv.set_config_vector(0)
    arena = DmaArena(pci.alloc_dma(0x10000))
    q = drv.setup_queue(0, 512, arena, vector=1)
    assert q.size == 256  # capped to the device's maximum
    drv.driver_ok()
    bufs = [arena.alloc(64) for _ in range(8)]
    for i, iova in enumerate(bufs):
        q.ring.add([], [(iova, 64)], i)
    assert q.kick()
    assert _fired(fds[1]) == 1
    assert sorted(q.ring.get_used()) == [(i, 64) for i in range(8)]
    assert all(bytes(arena.view(b, 64)) == b"\x5a" * 64 for b in bufs)
    # Second round: with EVENT_IDX the device asked to be kicked again only now.
    q.ring.enable_interrupts()
    q.ring.add([], [(bufs[0], 16)], 99)
    assert q.kick()
    assert _fired(fds[1]) == 1
    assert q.ring.get_used() == [(99, 16)]
    arena.close()


def test_entropy_device_through_the_driver(rig: Rig) -> None:
    _entropy_round(rig, event_idx=False)


def test_entropy_device_with_event_idx(rig: Rig) -> None:
    _entropy_round(rig, event_idx=True)


def test_refused_vector_and_absent_queue(rig: Rig) -> None:
    drv = VirtioPciDriver(rig.pci)
    drv.negotiate(0)
    arena = DmaArena(rig.pci.alloc_dma(0x4000))
    with pytest.raises(DeviceFault, match="vector 7 refused"):
        drv.setup_queue(0, 16, arena, vector=7)
    with pytest.raises(DeviceFault, match="does not exist"):
        drv.setup_queue(3, 16, arena)
    drv.reset()
    q = drv.setup_queue(0, 16, arena, vector=NO_VECTOR)
    assert q.vector == NO_VECTOR
    arena.close()


def test_shared_memory_bar_is_mapped_not_trapped(rig: Rig) -> None:
    window = rig.pci.map_bar(2, 0x1000, 0x2000)
    window.view[:4] = b"ABCD"
    assert rig.thread.call(lambda: rig.device.bars[2].read(0x1000, 4)) == b"ABCD"
    head = rig.pci.map_bar(2, 0, 22)
    assert bytes(head.view) == b"VVU-SHARED-MEMORY-BAR2"
    window.close()
    head.close()


def test_poll_mode_function_has_no_interrupts() -> None:
    for r in _rig(EntropyDevice(source=lambda n: b"\x01" * n), interrupts=False):
        assert not r.pci.interrupts
        drv = VirtioPciDriver(r.pci)
        drv.negotiate(0)
        arena = DmaArena(r.pci.alloc_dma(0x4000))
        q = drv.setup_queue(0, 8, arena)
        drv.driver_ok()
        iova = arena.alloc(8)
        q.ring.add([], [(iova, 8)], "x")
        q.notify()
        assert q.ring.get_used() == [("x", 8)]  # non-posted write: done when it returns
        arena.close()
