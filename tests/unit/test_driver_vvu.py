"""The whole VVU chain in one process, without VMs.

    front-end (vhost_user.frontend, consumer RAM = a file)
      -> real UNIX socket -> VVU device model (device.vvu + device.tunnel)
      -> vfio-user over a socketpair (device.vfio_user server / client)
      -> tests/support VfioUserPciFunction (stands in for vfio-pci: the only double)
      -> the real driver: virtio_pci, vvu, VvuChannel / VvuTransport / VvuSession
      -> BackendSession -> vvu-blk's BlkDevice on a temp image, or a switch port

Threads: the device model runs on its vfio-user server thread, the appliance
(driver + session + backend device) on an event-loop thread, the test body is the
consumer (a blocking front-end).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.vfio_user_function import VfioUserPciFunction
from tests.support.vvu_chain import (
    RAM_SIZE,
    SECTORS,
    Appliance,
    DeviceModel,
    FileRam,
    connect_blk,
    wait_for,
)
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.driver.transport import had_eventfd
from vvu_runtime.vhost_user import frontend as frontend_mod
from vvu_runtime.vhost_user.frontend import (
    GuestRam,
    VhostUserFrontend,
)
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.virtio.blk import BlkConfig, RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.vvu_abi import VvuStatus

STATUS_BACKEND_UP = VvuStatus.BACKEND_UP
STATUS_FRONTEND_UP = VvuStatus.FRONTEND_UP


@pytest.fixture
def appliance() -> Iterator[Appliance]:
    app = Appliance()
    yield app
    app.close()


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(SECTORS * 512))
    return p


# --------------------------------------------------------------------------- blk


def test_block_write_read_and_frontend_reconnect(tmp_path: Path, image_path: Path,
                                                 appliance: Appliance) -> None:
    model = DeviceModel(tmp_path, "disk0")
    try:
        with RawImage(str(image_path)) as image:
            ep = appliance.serve(BlkDevice(image, serial="vvu-disk"), model)
            wait_for(lambda: model.status() == STATUS_BACKEND_UP, what="BACKEND_UP")
            ram = FileRam(model.ram_path)
            fe, drv = connect_blk(model, ram)
            assert appliance.lt.call(lambda: ep.session is not None)
            assert model.status() == STATUS_BACKEND_UP | STATUS_FRONTEND_UP
            cfg = BlkConfig.unpack(fe.get_config(0, 60))
            assert cfg.capacity == SECTORS

            pattern = os.urandom(16384)
            assert drv.run(RequestType.OUT, 64, out=pattern) == (Status.OK, b"")
            assert drv.run(RequestType.FLUSH) == (Status.OK, b"")
            assert image_path.read_bytes()[64 * 512:64 * 512 + len(pattern)] == pattern
            assert drv.run(RequestType.IN, 64, into=len(pattern)) == (Status.OK, pattern)
            assert drv.run(RequestType.GET_ID, into=20) == (Status.OK,
                                                            b"vvu-disk".ljust(20, b"\0"))
            doorbells = appliance.lt.call(lambda: ep.vvu.doorbells_rung if ep.vvu else 0)
            assert doorbells >= 4  # a call per completion: each request waits for its own
            # EVENT_IDX on rxq: the driver re-posts rxq buffers without a notify (the
            # device never ran out: one notify, the first post). txq: a front-end that
            # waits for each reply finds the device idle and re-armed every time, so
            # one notify per reply, never more (tests/unit/test_vvu_device.py has the
            # batch case).
            stats = model.thread.call(lambda: model.device.stats.as_dict())
            assert stats["rx_messages"] > 10 and stats["rxq_notifies"] == 1, stats
            assert stats["txq_notifies"] <= stats["tx_replies"], stats

            # The consumer goes away: FRONTEND_UP drops, the session ends, BACKEND_UP again.
            drv.dq.close()
            fe.close()
            wait_for(lambda: appliance.lt.call(lambda: ep.session is None),
                     what="the session to end")
            wait_for(lambda: model.status() == STATUS_BACKEND_UP, what="re-armed")
            assert image.fd >= 0  # the device lives on (reset, not closed)

            # ... and comes back, on the same RAM, and sees its data.
            ram2 = FileRam(model.ram_path)
            fe2, drv2 = connect_blk(model, ram2)
            assert drv2.run(RequestType.IN, 64, into=512) == (Status.OK, pattern[:512])
            assert appliance.lt.call(lambda: ep.connections) == 2
            drv2.dq.close()
            fe2.close()
            ram.close()
            ram2.close()
    finally:
        appliance.close()
        model.close()


def test_only_vring_eventfds_leave_a_token() -> None:
    assert had_eventfd(FR.SET_VRING_KICK, struct.pack("=Q", 2))
    assert not had_eventfd(FR.SET_VRING_CALL, struct.pack("=Q", 0x102))  # NOFD
    assert not had_eventfd(FR.SET_VRING_ERR, b"")  # malformed: the codec refuses it
    assert not had_eventfd(FR.SET_MEM_TABLE, struct.pack("=II", 1, 0) + bytes(32))
    assert not had_eventfd(FR.SET_BACKEND_REQ_FD, b"")


# --------------------------------------------------------------------------- switch


@pytest.fixture
def file_backed_ports(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """DriverPort builds its GuestRam itself: make it use the device's RAM file.

    Fill the dict with ``{socket path: RAM file}`` before creating a DriverPort.
    """
    files: dict[str, Path] = {}
    real_connect = VhostUserFrontend.connect
    current: list[Path] = []

    def connect(path: str, **kw: Any) -> VhostUserFrontend:
        current[:] = [files[path]]
        return real_connect(path, **kw)

    def ram(size: int, *args: Any, **kw: Any) -> GuestRam:
        assert size <= RAM_SIZE
        return FileRam(current[0], size)

    monkeypatch.setattr(VhostUserFrontend, "connect", staticmethod(connect))
    monkeypatch.setattr(frontend_mod, "GuestRam", ram)
    return files


def test_packets_cross_a_switch_of_vvu_ports(tmp_path: Path, appliance: Appliance,
                                             file_backed_ports: dict[str, Path]) -> None:
    from tests.support.net_frames import BROADCAST, DriverPort, ether, mac
    from vvu_runtime.backends.switch.port import SwitchPort
    from vvu_runtime.backends.switch.switch import Switch

    models = {n: DeviceModel(tmp_path, n) for n in ("vm1", "vm2")}
    try:
        switch = Switch()
        for name, model in models.items():
            appliance.serve(SwitchPort(switch, name), model)
            file_backed_ports[model.sock_path] = model.ram_path
        split = int(VirtioFeature.RING_PACKED)  # DriverPort lays out split rings
        with DriverPort(models["vm1"].sock_path, queue_size=64, exclude=split) as a, \
                DriverPort(models["vm2"].sock_path, queue_size=64, exclude=split) as b:
            hello = ether(BROADCAST, mac(1), 0x0806, bytes(28))
            a.send(hello)
            assert [f for _, f in b.receive()] == [hello]
            frames = [ether(mac(1), mac(2), 0x0800, os.urandom(200 + i)) for i in range(50)]
            for f in frames:
                b.send(f, kick=False)
            b.txq.kick()
            assert [f for _, f in a.receive(50)] == frames
            counters = appliance.lt.call(lambda: switch.ports[0].counters)
            assert counters.in_packets == 1 and counters.out_packets == 50
    finally:
        appliance.close()
        for model in models.values():
            model.close()


# --------------------------------------------------------------------------- poll mode


def test_poll_mode_without_interrupts(tmp_path: Path, image_path: Path,
                                      appliance: Appliance) -> None:
    """The sysfs path's situation: no MSI-X; status, rxq and rings are polled."""
    model = DeviceModel(tmp_path, "disk0", interrupts=False)
    try:
        with RawImage(str(image_path)) as image:
            ep = appliance.serve(BlkDevice(image), model, status_poll=0.01)
            assert ep.vvu is not None and not ep.vvu.interrupts
            wait_for(lambda: model.status() == STATUS_BACKEND_UP, what="BACKEND_UP")
            ram = FileRam(model.ram_path)
            fe, drv = connect_blk(model, ram)
            data = os.urandom(4096)
            assert drv.run(RequestType.OUT, 8, out=data) == (Status.OK, b"")
            assert drv.run(RequestType.IN, 8, into=4096) == (Status.OK, data)
            # Kicks reach a polled ring; the doorbell (call) still rings.
            assert appliance.lt.call(lambda: ep.vvu.doorbells_rung if ep.vvu else 0) >= 2
            drv.dq.close()
            fe.close()
            wait_for(lambda: appliance.lt.call(lambda: ep.session is None), what="session end")
            ram.close()
    finally:
        appliance.close()
        model.close()


# --------------------------------------------------------------------------- recovery


def test_device_needs_reset_is_recovered(tmp_path: Path, image_path: Path,
                                         appliance: Appliance) -> None:
    model = DeviceModel(tmp_path, "disk0")
    try:
        with RawImage(str(image_path)) as image:
            ep = appliance.serve(BlkDevice(image), model)
            ram = FileRam(model.ram_path)
            fe, drv = connect_blk(model, ram)
            assert drv.run(RequestType.OUT, 0, out=b"A" * 512)[0] == Status.OK
            model.thread.call(lambda: model.device.appliance_error("test: break the link"))
            # The device dropped the front-end and asked for a reset; the driver
            # re-initialises it and arms BACKEND_UP again.
            wait_for(lambda: model.status() == STATUS_BACKEND_UP, what="re-armed after reset")
            wait_for(lambda: appliance.lt.call(lambda: ep.session is None), what="session end")
            fe.close()
            ram2 = FileRam(model.ram_path)
            fe2, drv2 = connect_blk(model, ram2)
            assert drv2.run(RequestType.IN, 0, into=512) == (Status.OK, b"A" * 512)
            drv.dq.close()
            drv2.dq.close()
            fe2.close()
            ram.close()
            ram2.close()
    finally:
        appliance.close()
        model.close()


def test_backend_request_over_txq_and_its_ack_over_rxq(tmp_path: Path, image_path: Path,
                                                       appliance: Appliance) -> None:
    import concurrent.futures

    from vvu_runtime.vhost_user.messages import BackendRequest

    model = DeviceModel(tmp_path, "disk0")
    try:
        with RawImage(str(image_path)) as image:
            ep = appliance.serve(BlkDevice(image), model)
            ram = FileRam(model.ram_path)
            fe, drv = connect_blk(model, ram)
            assert fe.protocol_features & PF.BACKEND_REQ.mask
            fe.set_backend_req_fd()
            session = appliance.lt.call(lambda: ep.session)
            assert session is not None and session.backend is not None
            result: concurrent.futures.Future[bool] = concurrent.futures.Future()
            appliance.lt.loop.call_soon_threadsafe(
                lambda: result.set_result(session.config_changed()))
            msg = fe.recv_backend_request()  # answers the ack
            assert msg.request == BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
            assert result.result(5)
            # The session goes on: a front-end request after the exchange works.
            assert BlkConfig.unpack(fe.get_config(0, 60)).capacity == SECTORS
            drv.dq.close()
            fe.close()
            ram.close()
    finally:
        appliance.close()
        model.close()


def test_rings_the_device_cannot_reach_fail_cleanly(tmp_path: Path, image_path: Path,
                                                    appliance: Appliance) -> None:
    """Seen in a real appliance whose RAM was not shared with QEMU: the DMA maps reach
    the device model without an fd, the device sets NEEDS_RESET during setup."""
    import mmap

    from vvu_runtime.driver.pci import DmaBuffer
    from vvu_runtime.vhost_user.errors import TransportError

    class FdLessDma(VfioUserPciFunction):
        def alloc_dma(self, size: int) -> DmaBuffer:
            size = -(-size // 4096) * 4096
            mapping = mmap.mmap(-1, size)
            self.client.dma_map(0x2000_0000, size)  # no fd: unreachable for the device
            return DmaBuffer(memoryview(mapping), 0x2000_0000)

    model = DeviceModel(tmp_path, "disk0")
    try:
        model.pci = FdLessDma(model.client)
        with RawImage(str(image_path)) as image, \
                pytest.raises(TransportError, match="DEVICE_NEEDS_RESET during setup"):
            appliance.serve(BlkDevice(image), model)
        assert model.status() == 0  # never armed: a front-end would wait, not hang in rxq
    finally:
        appliance.close()
        model.close()
