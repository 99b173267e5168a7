"""The driver's doorbell companion (driver/companion.py) in the in-process VVU chain.

The device names a companion (``doorbell_peer``/``doorbell_owner``); vvu-devd's
ivshmem server keeps the link's peer (device/ivshmem.py) in step with the
consumer's call eventfds. QEMU's ivshmem-doorbell is played by a stand-in
(tests/support/ivshmem_client.py) that installs what the server announces and
does what QEMU's ioeventfd does with a Doorbell write: it signals the peer's
vector eventfd (tests/integration/test_doorbell_qemu.py shows real QEMU doing
it). Completions then reach the consumer with no trapped doorbell at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ivshmem_client import IvshmemStandIn
from tests.support.vvu_chain import SECTORS, Appliance, DeviceModel, FileRam, connect_blk, wait_for
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.device.ivshmem import DoorbellPeer, IvshmemServer
from vvu_runtime.driver import vvu as vvu_mod
from vvu_runtime.driver.companion import DoorbellCompanion
from vvu_runtime.driver.transport import CompanionNotifier, DoorbellNotifier, VvuTransport
from vvu_runtime.vhost_user.transport import NotifierKind
from vvu_runtime.virtio.blk import RequestType, Status
from vvu_runtime.virtio.vvu_abi import DOORBELL_OWNER_ID, NO_DOORBELL_PEER, VvuStatus

VECTORS = 3  # calls of queues 0 and 1, and the fence


class StandInCompanion(DoorbellCompanion):
    """The companion function as the driver sees it, writing to the stand-in QEMU."""

    def __init__(self, qemu: IvshmemStandIn) -> None:  # no PCI function behind it
        self.qemu = qemu
        self.address = "stand-in"
        self.vectors = VECTORS
        self.rung = 0

    @property
    def position(self) -> int:
        return DOORBELL_OWNER_ID

    def ring(self, value: int) -> None:
        self.rung += 1
        self.qemu.ring(value)

    def register(self, value: int) -> None:
        return None  # no mapped register: every call goes through ring()

    def close(self) -> None:
        pass


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(SECTORS * 512))
    return p


@pytest.fixture
def companion_model(tmp_path: Path
                    ) -> Iterator[tuple[DeviceModel, DoorbellPeer, IvshmemStandIn]]:
    model = DeviceModel(tmp_path, "disk0")
    path = tmp_path / "doorbell.sock"

    def build() -> tuple[IvshmemServer, DoorbellPeer]:
        server = IvshmemServer(str(path), vectors=VECTORS, loop=model.thread.loop)
        peer = server.add_peer("disk0")
        model.tunnel.on_calls = peer.set_calls
        model.device.doorbell = peer
        server.start()
        return server, peer

    server, peer = model.thread.call(build)
    qemu = IvshmemStandIn(path)
    qemu.start()
    try:
        yield model, peer, qemu
    finally:
        qemu.close()
        model.thread.call(server.close)
        model.close()


def _io(model: DeviceModel, appliance: Appliance, image_path: Path) -> None:
    with RawImage(str(image_path)) as image:
        ep = appliance.serve(BlkDevice(image, serial="vvu-disk"), model)
        wait_for(lambda: model.status() == VvuStatus.BACKEND_UP, what="BACKEND_UP")
        ram = FileRam(model.ram_path)
        fe, drv = connect_blk(model, ram)
        try:
            data = os.urandom(8192)
            for sector in range(0, 64, 16):
                assert drv.run(RequestType.OUT, sector, out=data) == (Status.OK, b"")
                assert drv.run(RequestType.IN, sector, into=len(data)) == (Status.OK, data)
        finally:
            drv.dq.close()
            fe.close()
            ram.close()
        appliance.lt.call(ep.close)


def test_calls_go_through_the_companion_not_through_vvu_devd(
        companion_model: tuple[DeviceModel, DoorbellPeer, IvshmemStandIn], image_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, peer, qemu = companion_model
    stand_in = StandInCompanion(qemu)
    asked: list[int] = []

    def find(owner: int) -> DoorbellCompanion | None:
        asked.append(owner)
        return stand_in

    monkeypatch.setattr(vvu_mod, "find_companion", find)
    appliance = Appliance()
    try:
        _io(model, appliance, image_path)
    finally:
        appliance.close()
    assert asked == [DOORBELL_OWNER_ID]
    stats = model.device.stats
    # Every completion (8 requests, each waited for on the call eventfd) was a
    # companion write; none a trapped doorbell. The driver rang under the ID it
    # read after SET_VRING_CALL, and QEMU never saw an ID again after its removal.
    assert stand_in.rung >= 8 and stats.doorbells == 0 and stats.doorbells_unset == 0
    assert qemu.reused == [] and peer.announcements >= 1


def test_without_the_companion_function_calls_stay_trapped(
        companion_model: tuple[DeviceModel, DoorbellPeer, IvshmemStandIn], image_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = companion_model
    monkeypatch.setattr(vvu_mod, "find_companion", lambda owner: None)
    appliance = Appliance()
    try:
        _io(model, appliance, image_path)
    finally:
        appliance.close()
    assert model.device.stats.doorbells >= 8


def test_only_calls_within_the_vectors_use_the_companion(
        companion_model: tuple[DeviceModel, DoorbellPeer, IvshmemStandIn],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, qemu = companion_model
    monkeypatch.setattr(vvu_mod, "find_companion", lambda owner: StandInCompanion(qemu))
    drv = vvu_mod.VvuDriver(model.pci)
    try:
        drv.start()
        # No call set yet: no peer to ring, but the companion is known.
        assert (drv.identity.doorbell_peer, drv.identity.doorbell_owner) == (
            NO_DOORBELL_PEER, DOORBELL_OWNER_ID)

        class Chan:
            vvu = drv

        transport = VvuTransport(Chan())  # type: ignore[arg-type]
        token = os.eventfd(0)
        assert isinstance(transport.notifier(NotifierKind.CALL, 0, os.dup(token)),
                          CompanionNotifier)
        assert isinstance(transport.notifier(NotifierKind.CALL, 1, os.dup(token)),
                          CompanionNotifier)
        # Past the vectors (queue 2 of 3 vectors), and every err: trapped doorbells.
        assert isinstance(transport.notifier(NotifierKind.CALL, 2, os.dup(token)),
                          DoorbellNotifier)
        assert isinstance(transport.notifier(NotifierKind.ERR, 0, os.dup(token)),
                          DoorbellNotifier)
        os.close(token)
    finally:
        drv.close()
