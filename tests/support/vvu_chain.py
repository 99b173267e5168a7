"""The whole VVU chain in one process, without VMs: the host side of a consumer
link (``DeviceModel``: VVU device + tunnel on a vfio-user server thread, reached
through ``VfioUserPciFunction``), the appliance side (``Appliance``: endpoints on an
event-loop thread) and the consumer's RAM file (``FileRam``).

Shared by tests/unit/test_driver_vvu.py and tests/unit/test_driver_cli.py.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.blk_driver import BlkDriver
from tests.support.server_thread import ServerThread
from tests.support.vfio_user_client import VfioUserClient
from tests.support.vfio_user_function import VfioUserPciFunction
from tests.support.vhost_user_harness import LoopThread
from vvu_runtime.device.tunnel import VhostUserTunnel
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.vvu import VvuDevice
from vvu_runtime.driver.endpoint import VvuEndpoint
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd

RAM_SIZE = 8 << 20
SECTORS = 2048
QSIZE = 64


class FileRam(GuestRam):
    """Consumer RAM backed by the provisioned file the device model exposes as BAR2."""

    def __init__(self, path: str | Path, size: int = RAM_SIZE, gpa: int = 0) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.region = MemoryRegion(gpa, size, self.UVA_BASE + gpa, 0)
        self.memory = GuestMemory()
        self.memory.add(map_fd(self.region, self.fd))
        self._next = gpa


class DeviceModel:
    """The host side of one consumer link: a VVU device and its vhost-user socket."""

    def __init__(self, tmp: Path, name: str, *, max_queues: int = 8,
                 interrupts: bool = True) -> None:
        self.ram_path = tmp / f"{name}.ram"
        with open(self.ram_path, "wb") as f:
            f.truncate(RAM_SIZE)
        self.sock_path = str(tmp / f"{name}.sock")
        self.device = VvuDevice(name=name, ram_file=self.ram_path, max_queues=max_queues)
        server = VfioUserServer(self.device)
        self.thread = ServerThread(lambda: server)
        self.thread.__enter__()
        self.tunnel = VhostUserTunnel(self.device, self.sock_path, loop=self.thread.loop)
        self.thread.call(self.tunnel.start)
        ours, theirs = socket.socketpair()
        self.thread.call(lambda: server.attach(theirs))
        self.client = VfioUserClient(ours)
        self.client.version()
        self.pci = VfioUserPciFunction(self.client, interrupts=interrupts)

    def status(self) -> int:
        return self.thread.call(lambda: self.device.vvu_status)

    def close(self) -> None:
        self.pci.close()
        self.client.close()
        self.thread.call(self.tunnel.close)
        self.thread.stop()
        self.device.close()


class Appliance:
    """The appliance side: endpoints on one event loop."""

    def __init__(self) -> None:
        self.lt = LoopThread()
        self.endpoints: list[VvuEndpoint] = []

    def serve(self, device: VhostUserDevice, model: DeviceModel, **kw: Any) -> VvuEndpoint:
        ep = VvuEndpoint(device, pci=model.pci, loop=self.lt.loop, **kw)
        self.lt.call(ep.start)
        self.endpoints.append(ep)
        return ep

    def close(self) -> None:
        if self.lt.loop.is_closed():
            return
        for ep in self.endpoints:
            self.lt.call(ep.close)
        self.lt.stop()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.005)


def connect_blk(model: DeviceModel, ram: GuestRam) -> tuple[VhostUserFrontend, BlkDriver]:
    fe = VhostUserFrontend.connect(model.sock_path, retry_for=5.0)
    _, pf = fe.negotiate(features=(1 << 64) - 1 & ~int(VirtioFeature.RING_PACKED))
    # The tunnel masked what it cannot carry (docs/vvu-abi.md).
    assert pf & PF.REPLY_ACK.mask and pf & PF.CONFIG.mask
    assert not pf & (PF.INFLIGHT_SHMFD.mask | PF.LOG_SHMFD.mask)
    fe.set_mem_table([(ram.region, ram.fd)])
    return fe, BlkDriver(setup_queue(fe, ram, 0, QSIZE), ram)
