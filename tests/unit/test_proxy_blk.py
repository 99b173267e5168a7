"""vvu-proxy with a real back-end doing real I/O: vvu-blk's device on a plain
vhost-user socket, the way qemu-storage-daemon would sit behind the proxy.

    front-end (consumer RAM = a file) -> VVU device model -> vfio-user
      -> the real driver -> ProxyLink (appliance loop)
      -> UNIX socket -> VhostUserServer(BlkDevice) on its own loop (or, supervised,
         the vvu-blk program as a child process)

Checked: writes land in the image and read back, the consumer's reconnect and the
back-end's restart (requests popped by the dead back-end are resubmitted by the
next one from the proxy's inflight area, out-of-order completions included), the
proxy listening for a back-end that connects, a supervised back-end killed mid-I/O
and restarted, and that nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blk_driver import BlkDriver
from tests.support.ivshmem_client import IvshmemStandIn
from tests.support.loop_thread import LoopThread
from tests.support.vhost_user_harness import open_fds
from tests.support.vvu_chain import DeviceModel, FileRam, wait_for
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.device.ivshmem import IvshmemServer
from vvu_runtime.driver import vvu as vvu_mod
from vvu_runtime.driver.companion import DoorbellCompanion
from vvu_runtime.launch.procs import pid_alive
from vvu_runtime.proxy.link import BackendMode, ProxyLink
from vvu_runtime.proxy.relay import EndCause
from vvu_runtime.vhost_user.errors import VhostUserError
from vvu_runtime.vhost_user.frontend import DriverQueue, VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.server import VhostUserClient, VhostUserServer
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio.blk import BlkConfig, RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.vvu_abi import DOORBELL_OWNER_ID, VvuStatus

ROOT = Path(__file__).resolve().parents[2]
SECTORS = 2048
QSIZE = 64
UP = int(VvuStatus.BACKEND_UP)
SPLIT = (1 << 64) - 1 & ~int(VirtioFeature.RING_PACKED)


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(SECTORS * 512))
    return p


@pytest.fixture
def loops() -> Iterator[tuple[LoopThread, LoopThread]]:
    """(the appliance's loop: the proxy; the back-end's loop: a separate program)."""
    appliance, backend = LoopThread("appliance"), LoopThread("backend")
    yield appliance, backend
    appliance.stop()
    backend.stop()


def connect(model: DeviceModel, ram: FileRam) -> VhostUserFrontend:
    """QEMU's order up to the rings: negotiate, queue count, memory."""
    fe = VhostUserFrontend.connect(model.sock_path, retry_for=10.0, timeout=5.0)
    fe.negotiate(features=SPLIT)
    fe.get_queue_num()
    fe.set_mem_table([(ram.region, ram.fd)])
    return fe


def reconnect(model: DeviceModel, ram: FileRam, timeout: float = 10.0) -> VhostUserFrontend:
    """connect() once the link is armed again, retried as QEMU's reconnect would: the
    proxy may arm on a connection the dying back-end still accepted, then reset the
    link when that one hangs up (a transient UP under load)."""
    deadline = time.monotonic() + timeout
    while True:
        wait_for(lambda: model.status() == UP, timeout=timeout, what="re-armed")
        try:
            return connect(model, ram)
        except (VhostUserError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def restart_ring(fe: VhostUserFrontend, dq: DriverQueue, ram: FileRam) -> None:
    """What QEMU does for a ring after its back-end died: no GET_VRING_BASE was
    possible, so the next base is the used idx it reads (vhost-user-blk)."""
    ring = dq.ring
    used_idx = struct.unpack_from("<H", ram.view(ring.used_addr + 2, 2))[0]
    fe.set_vring_num(0, QSIZE)
    fe.set_vring_base(0, used_idx)
    ram_uva = FileRam.UVA_BASE
    fe.set_vring_addr(0, RingAddresses(ram_uva + ring.desc_addr, ram_uva + ring.avail_addr,
                                       ram_uva + ring.used_addr))
    os.close(dq.kick_fd)
    dq.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.set_vring_kick(0, dq.kick_fd)
    fe.set_vring_call(0, dq.call_fd)
    fe.set_vring_enable(0, True)


def test_block_io_through_the_proxy_and_a_consumer_reconnect(
        tmp_path: Path, image_path: Path, loops: tuple[LoopThread, LoopThread]) -> None:
    app, back = loops
    before = open_fds()
    sock = str(tmp_path / "qsd-like.sock")
    model = DeviceModel(tmp_path, "disk0")
    with RawImage(str(image_path)) as image:
        server = VhostUserServer(sock, BlkDevice(image, serial="behind-proxy"), loop=back.loop)
        back.call(server.start)
        proxy = ProxyLink(sock, pci=model.pci, loop=app.loop)
        try:
            app.call(proxy.start)
            wait_for(lambda: model.status() == UP, what="armed")
            ram = FileRam(model.ram_path)
            fe = connect(model, ram)
            assert BlkConfig.unpack(fe.get_config(0, 60)).capacity == SECTORS
            drv = BlkDriver(setup_queue(fe, ram, 0, QSIZE), ram)
            pattern = os.urandom(64 << 10)
            assert drv.run(RequestType.OUT, 128, out=pattern) == (Status.OK, b"")
            assert drv.run(RequestType.FLUSH) == (Status.OK, b"")
            assert image_path.read_bytes()[128 * 512:128 * 512 + len(pattern)] == pattern
            assert drv.run(RequestType.IN, 128, into=len(pattern)) == (Status.OK, pattern)
            assert drv.run(RequestType.GET_ID, into=20) == (
                Status.OK, b"behind-proxy".ljust(20, b"\0"))
            # The back-end mapped the consumer's RAM file itself (zero copy) ...
            regions = back.call(lambda: [mr.region for mr in server.session.memory]
                                if server.session is not None else [])
            assert [(r.guest_phys_addr, r.mmap_offset) for r in regions] == [(0, 0)]
            # ... and each completion rang a doorbell of the VVU device.
            assert app.call(lambda: proxy.vvu.doorbells_rung if proxy.vvu else 0) >= 4

            # The consumer goes and comes back: a fresh back-end session, same data.
            drv.dq.close()
            fe.close()
            wait_for(lambda: EndCause.FRONTEND in proxy.ends, what="the session to end")
            wait_for(lambda: model.status() == UP, what="re-armed")
            assert back.call(lambda: server.connections) == 2  # the proxy reconnected
            fe = connect(model, ram)
            drv = BlkDriver(setup_queue(fe, ram, 0, QSIZE), ram)
            assert drv.run(RequestType.IN, 128, into=4096) == (Status.OK, pattern[:4096])
            drv.dq.close()
            fe.close()
            ram.close()
        finally:
            app.call(proxy.close)
            back.call(server.close)
            model.close()
    app.sync()
    del drv  # its ring views keep the consumer's RAM mapped (and its fd)
    assert open_fds() <= before, "the chain leaked fds"


class DyingBlkDevice(BlkDevice):
    """Serves every request it pops but completes only those in ``complete`` (by pop
    order), out of order: the rest were written, the used ring never heard of them
    (a back-end killed between the two)."""

    def __init__(self, image: RawImage, complete: set[int]) -> None:
        super().__init__(image)
        self.complete = complete
        self.popped = 0

    def process(self, vring: Vring) -> None:
        later = []
        while (chain := vring.pop()) is not None:
            written = self.serve(chain)
            if self.popped in self.complete:
                later.append((chain, written))
            self.popped += 1
        for chain, written in reversed(later):  # out of order
            vring.push(chain, written)
        vring.notify()


def test_restarted_backend_resumes_what_was_in_flight(
        tmp_path: Path, image_path: Path, loops: tuple[LoopThread, LoopThread]) -> None:
    """The consumer cannot carry INFLIGHT_SHMFD through the tunnel; the proxy keeps
    the area, so the next back-end resubmits exactly the requests that never
    completed, though completions were out of order (the used idx alone would
    lose one and redo another)."""
    app, back = loops
    sock = str(tmp_path / "backend.sock")
    model = DeviceModel(tmp_path, "disk0")
    with RawImage(str(image_path)) as image:
        dying = VhostUserServer(sock, DyingBlkDevice(image, complete={0, 1, 2, 5}),
                                loop=back.loop)
        back.call(dying.start)
        proxy = ProxyLink(sock, pci=model.pci, loop=app.loop)
        server = None
        try:
            app.call(proxy.start)
            ram = FileRam(model.ram_path)
            fe = connect(model, ram)
            dq = setup_queue(fe, ram, 0, QSIZE)
            drv = BlkDriver(dq, ram)
            writes = {i: os.urandom(4096) for i in range(10)}
            status = {i: drv.submit(RequestType.OUT, 8 * i, out=d, token=i)[1]
                      for i, d in writes.items()}
            acked = {t for t, _ in drv.complete(4)}
            assert acked == {0, 1, 2, 5}

            # The back-end dies: the proxy resets the link (the consumer is dropped).
            back.call(dying.close)
            wait_for(lambda: EndCause.BACKEND_GONE in proxy.ends, what="the link reset")
            with pytest.raises((VhostUserError, OSError)):
                fe.get_queue_num()
            fe.close()
            # Its successor listens on the same socket; the consumer reconnects.
            server = VhostUserServer(sock, BlkDevice(image), loop=back.loop)
            back.call(server.start)
            fe = reconnect(model, ram)
            restart_ring(fe, dq, ram)
            acked |= {t for t, _ in drv.complete(6)}
            assert acked == set(writes)
            assert all(drv.status(status[i]) == Status.OK for i in writes)
            data = image_path.read_bytes()
            assert all(data[4096 * i:4096 * (i + 1)] == d for i, d in writes.items())
            assert app.call(lambda: proxy.inflight.made) == 1  # the same area throughout
            dq.close()
            fe.close()
            ram.close()
        finally:
            app.call(proxy.close)
            if server is not None:
                back.call(server.close)
            model.close()


def test_proxy_listens_for_a_backend_that_connects(
        tmp_path: Path, image_path: Path, loops: tuple[LoopThread, LoopThread]) -> None:
    """DPDK-style (client=1): the back-end connects to the proxy's socket."""
    app, back = loops
    sock = str(tmp_path / "proxy.sock")
    model = DeviceModel(tmp_path, "disk0")
    with RawImage(str(image_path)) as image:
        proxy = ProxyLink(sock, pci=model.pci, loop=app.loop, mode=BackendMode.LISTEN)
        client = VhostUserClient(sock, BlkDevice(image), loop=back.loop, retry_interval=0.05)
        try:
            app.call(proxy.start)
            assert model.status() == 0  # nobody behind the link yet
            back.call(client.start)
            wait_for(lambda: model.status() == UP, what="armed once the back-end connected")
            ram = FileRam(model.ram_path)
            fe = connect(model, ram)
            drv = BlkDriver(setup_queue(fe, ram, 0, QSIZE), ram)
            data = os.urandom(8192)
            assert drv.run(RequestType.OUT, 8, out=data) == (Status.OK, b"")
            assert drv.run(RequestType.IN, 8, into=len(data)) == (Status.OK, data)
            drv.dq.close()
            fe.close()
            ram.close()
            # The back-end reconnects after the session, and the link re-arms.
            wait_for(lambda: proxy.backend_connections == 2, what="the back-end's reconnect")
            wait_for(lambda: model.status() == UP, what="re-armed")
        finally:
            back.call(client.close)
            app.call(proxy.close)
            model.close()
    assert not Path(sock).exists()


def test_supervised_backend_killed_mid_io_is_restarted(
        tmp_path: Path, image_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy runs the back-end (the vvu-blk program) and restarts it when it
    dies; the consumer reconnects and every acknowledged write is on disk."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    sock = str(tmp_path / "vvu-blk.sock")
    command = [sys.executable, "-m", "vvu_runtime.serve.blk", "--socket", sock,
               "--image", str(image_path), "--log-level", "WARNING"]
    app = LoopThread("appliance")
    model = DeviceModel(tmp_path, "disk0")
    proxy = ProxyLink(sock, pci=model.pci, loop=app.loop, command=command, retry=0.05)
    pids: list[int] = []
    try:
        app.call(proxy.start)
        wait_for(lambda: model.status() == UP, timeout=30, what="the back-end up and armed")
        ram = FileRam(model.ram_path)
        fe = connect(model, ram)
        dq = setup_queue(fe, ram, 0, QSIZE)
        drv = BlkDriver(dq, ram)
        first = {i: os.urandom(4096) for i in range(4)}
        for i, d in first.items():
            assert drv.run(RequestType.OUT, 8 * i, out=d) == (Status.OK, b"")
        process = proxy.process
        assert process is not None and process.proc is not None
        pids.append(process.proc.pid)
        os.kill(process.proc.pid, signal.SIGKILL)
        wait_for(lambda: EndCause.BACKEND_GONE in proxy.ends, what="the link reset")
        fe.close()
        wait_for(lambda: process.starts == 2, timeout=10, what="the restart")
        assert process.proc is not None
        pids.append(process.proc.pid)
        wait_for(lambda: model.status() == UP, timeout=30, what="re-armed")
        fe = connect(model, ram)
        restart_ring(fe, dq, ram)
        second = os.urandom(4096)
        assert drv.run(RequestType.OUT, 64, out=second) == (Status.OK, b"")
        for i, d in first.items():
            assert drv.run(RequestType.IN, 8 * i, into=4096) == (Status.OK, d)
        assert image_path.read_bytes()[64 * 512:64 * 512 + 4096] == second
        dq.close()
        fe.close()
        ram.close()
    finally:
        app.call(proxy.close)
        app.stop()
        model.close()
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids), "a supervised back-end outlived the proxy"
    assert not Path(sock).exists()


class StandInCompanion(DoorbellCompanion):
    """The doorbell companion as the driver sees it, writing to a stand-in for the
    appliance QEMU's ivshmem-doorbell (as tests/unit/test_driver_companion.py)."""

    def __init__(self, qemu: IvshmemStandIn) -> None:  # no PCI function behind it
        self.qemu = qemu
        self.address = "stand-in"
        self.vectors = 3
        self.rung = 0

    @property
    def position(self) -> int:
        return DOORBELL_OWNER_ID

    def ring(self, value: int) -> None:
        self.rung += 1
        self.qemu.ring(value)

    def close(self) -> None:
        pass


def test_backend_calls_take_the_doorbell_companion(
        tmp_path: Path, image_path: Path, loops: tuple[LoopThread, LoopThread],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The relayed calls go the fast way when the device names a companion: one
    ivshmem-doorbell write each, no trapped doorbell through vvu-devd."""
    app, back = loops
    model = DeviceModel(tmp_path, "disk0")
    path = tmp_path / "doorbell.sock"

    def build() -> IvshmemServer:
        server = IvshmemServer(str(path), vectors=3, loop=model.thread.loop)
        peer = server.add_peer("disk0")
        model.tunnel.on_calls = peer.set_calls
        model.device.doorbell = peer
        server.start()
        return server

    ivshmem = model.thread.call(build)
    qemu = IvshmemStandIn(path)
    qemu.start()
    stand_in = StandInCompanion(qemu)
    monkeypatch.setattr(vvu_mod, "find_companion", lambda owner: stand_in)
    sock = str(tmp_path / "backend.sock")
    with RawImage(str(image_path)) as image:
        server = VhostUserServer(sock, BlkDevice(image), loop=back.loop)
        back.call(server.start)
        proxy = ProxyLink(sock, pci=model.pci, loop=app.loop)
        try:
            app.call(proxy.start)
            ram = FileRam(model.ram_path)
            fe = connect(model, ram)
            drv = BlkDriver(setup_queue(fe, ram, 0, QSIZE), ram)
            data = os.urandom(8192)
            for sector in range(0, 64, 16):
                assert drv.run(RequestType.OUT, sector, out=data) == (Status.OK, b"")
                assert drv.run(RequestType.IN, sector, into=len(data)) == (Status.OK, data)
            drv.dq.close()
            fe.close()
            ram.close()
        finally:
            app.call(proxy.close)
            back.call(server.close)
            qemu.close()
            model.thread.call(ivshmem.close)
            model.close()
    # Not one ring per request: the backend's call eventfd counts, so two calls
    # written before the proxy reads it are one ring (seen: 7 rings for 8 requests).
    # Every request completed on a call, and none of them took a trapped doorbell.
    assert stand_in.rung >= 1 and model.device.stats.doorbells == 0
    assert qemu.reused == []
