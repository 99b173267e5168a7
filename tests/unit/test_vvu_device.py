"""The VVU device model between a real vhost-user front-end and an appliance driver.

The appliance is the in-process vfio-user client (``VfioUserClient``, talking the
way QEMU's does) plus a small driver written here: it walks the capabilities,
negotiates, puts rxq/txq in its own "guest RAM" (a memfd it DMA_MAPs), enables
MSI-X with eventfds and reads/writes the VVU registers. The consumer is
``vvu_runtime.vhost_user.frontend`` over the device's real UNIX socket, with a
memfd as the consumer's RAM file. Two VVU devices share one server loop, as in
``vvu-devd``: every bad input on the first leaves the second working.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.guest_ram import sealed_memfd
from tests.support.loop_thread import LoopThread
from tests.support.vfio_user_client import VfioUserClient
from tests.support.vvu_driver_double import (
    APPLIANCE_RAM,
    CONFIG_VECTOR,
    QSIZE,
    TIMEOUT,
    N,
    VvuDriverDouble,
    eventfd,
    fired,
    header,
    wait_for,
)
from vvu_runtime.device.tunnel import TUNNEL_PROTOCOL_FEATURES, VhostUserTunnel
from vvu_runtime.device.vfio_user.protocol import DmaMapFlags, IrqSetFlags, PciIrq, PciRegion
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.virtio_pci import DeviceStatus, VirtioPciCapType
from vvu_runtime.device.vvu import VvuDevice
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import ConnectionClosed, TransportError
from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend
from vvu_runtime.vhost_user.messages import BackendRequest as BR
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.transport import UnixChannel
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd
from vvu_runtime.virtio.vvu_abi import AUX_BAR, DOORBELL_OFFSET, VvuStatus

MiB = 1 << 20
CONSUMER_RAM = 16 * MiB
#: What a front-end sees when the device model drops its connection.
DROPPED = (ConnectionClosed, TransportError)

T = TypeVar("T")


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def assert_no_fds_beyond(before: set[int]) -> None:
    def extra() -> dict[int, str]:
        out = {}
        for fd in open_fds() - before:
            with contextlib.suppress(OSError):
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        return out

    deadline = time.monotonic() + TIMEOUT
    while extra():
        if time.monotonic() > deadline:
            raise AssertionError(f"fds left open: {extra()}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- appliance


@dataclass(kw_only=True)
class Appliance(VvuDriverDouble):
    """The driver double, with the in-process device and loop it drives."""

    device: VvuDevice
    thread: LoopThread

    def live(self) -> bool:
        return not self.device.status & DeviceStatus.DEVICE_NEEDS_RESET


# --------------------------------------------------------------------------- the rig


@dataclass
class Link:
    """One VVU device: its tunnel, its vfio-user server, the appliance driving it."""

    name: str
    device: VvuDevice
    tunnel: VhostUserTunnel
    server: VfioUserServer
    appliance: Appliance
    vhost_path: Path
    ram: GuestRam
    frontends: list[VhostUserFrontend] = field(default_factory=list)

    def connect(self, timeout: float = TIMEOUT) -> VhostUserFrontend:
        fe = VhostUserFrontend.connect(self.vhost_path, timeout=timeout)
        self.frontends.append(fe)
        return fe

    def up(self) -> VhostUserFrontend:
        """BACKEND_UP, a front-end connects, FRONTEND_UP arrives with a config interrupt."""
        a = self.appliance
        a.set_backend_up()
        fe = self.connect()
        wait_for(lambda: a.vvu_status == VvuStatus.BACKEND_UP | VvuStatus.FRONTEND_UP,
                 "FRONTEND_UP")
        assert fired(a.vectors[CONFIG_VECTOR])
        return fe

    def round_trip(self, fe: VhostUserFrontend) -> None:
        """GET_FEATURES through rxq, its reply through txq: the link works."""
        a = self.appliance
        fe.channel.send_frame(*m.encode(FR.GET_FEATURES))
        assert header(a.recv()) == (FR.GET_FEATURES, 1, 0)
        a.reply(FR.GET_FEATURES, m.U64(0x1234))
        frame = fe.channel.recv_frame(TIMEOUT)
        assert (frame.request, frame.payload) == (FR.GET_FEATURES, m.U64(0x1234).pack())

    def call(self, fn: Callable[[], object]) -> object:
        return self.appliance.thread.call(fn)

    @property
    def stats(self) -> dict[str, int]:
        return self.device.stats.as_dict()


@dataclass
class Rig:
    thread: LoopThread
    links: list[Link]


def make_link(thread: LoopThread, tmp: Path, name: str, ram_size: int = CONSUMER_RAM,
              refuse_while_down: bool = False) -> Link:
    ram = GuestRam(ram_size, name=f"{name}-consumer-ram")
    path = tmp / f"{name}.vhost.sock"

    def build() -> tuple[VvuDevice, VhostUserTunnel, VfioUserServer]:
        device = VvuDevice(name=name, ram_file=f"/proc/self/fd/{ram.fd}", max_queues=N)
        tunnel = VhostUserTunnel(device, path, loop=thread.loop,
                                 refuse_while_down=refuse_while_down)
        tunnel.start()
        return device, tunnel, VfioUserServer(device, loop=thread.loop)

    device, tunnel, server = thread.call(build)
    ours, theirs = socket.socketpair()
    thread.call(lambda: server.attach(theirs))
    client = VfioUserClient(ours)
    client.version()
    app_ram = sealed_memfd(f"{name}-appliance-ram", APPLIANCE_RAM)
    memory = GuestMemory()
    memory.add(map_fd(MemoryRegion(0, APPLIANCE_RAM, 0, 0), app_ram))
    client.dma_map(0, APPLIANCE_RAM, app_ram)
    appliance = Appliance(client=client, ram_fd=app_ram, memory=memory, max_queues=N,
                          device=device, thread=thread)
    appliance.walk_caps()
    return Link(name, device, tunnel, server, appliance, path, ram)


def close_link(link: Link) -> None:
    for fe in link.frontends:
        fe.close()
    link.appliance.close()

    def shut() -> None:
        link.server.close()
        link.tunnel.close()
        link.device.close()

    link.appliance.thread.call(shut)
    link.ram.close()


@contextlib.contextmanager
def rig_of(tmp: Path, count: int = 2, **kw: int) -> Iterator[Rig]:
    thread = LoopThread()
    links: list[Link] = []
    try:
        for i in range(count):
            links.append(make_link(thread, tmp, f"vvu{i}", **kw))
        yield Rig(thread, links)
    finally:
        for link in links:
            close_link(link)
        thread.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    before = open_fds()
    with rig_of(tmp_path) as r:
        for link in r.links:
            link.appliance.bring_up()
        yield r
    assert_no_fds_beyond(before)


# --------------------------------------------------------------------------- identity


def test_function_identity_config_and_bars(rig: Rig) -> None:
    link = rig.links[0]
    a, c = link.appliance, link.appliance.client
    assert c.config_read(0x00, 2) == 0x1AF4
    assert c.config_read(0x02, 2) == 0x107F
    assert c.region_read(PciRegion.CONFIG, 0x09, 3) == bytes([0, 0, 0xFF])  # class ff0000
    assert c.config_read(0x08, 1) == 1
    assert set(a.caps) == {1, 2, 3, 4, 5, 6, 7, 8}
    assert (a.caps[6].bar, a.caps[6].offset, a.caps[6].length) == (4, 0x1000, (2 * N + 1) * 4)
    assert struct.unpack("<I", a.caps[6].extra)[0] == 4
    assert (a.caps[7].bar, a.caps[7].offset, a.caps[7].length) == (4, 0, 4)
    shm = a.caps[8]
    assert (shm.bar, shm.offset, shm.length, shm.cap_id) == (2, 0, CONSUMER_RAM, 1)
    assert struct.unpack("<II", shm.extra) == (0, 0)
    # Device config: status, max_vhost_queues, uuid (stable, not all zero).
    cfg = c.region_read(0, 0x2000, 24)
    status, max_queues, uuid = struct.unpack("<II16s", cfg)
    assert (status, max_queues) == (0, N) and any(uuid)
    assert uuid != struct.unpack("<II16s", rig.links[1].appliance.client.region_read(
        0, 0x2000, 24))[2]
    # Features: VERSION_1, ACCESS_PLATFORM and EVENT_IDX (rxq/txq notify suppression).
    assert a.negotiate() == (VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
                             | VirtioFeature.EVENT_IDX)
    # MSI-X: config + rxq + txq + one per kick.
    assert c.get_irq_info(PciIrq.MSIX).count == 3 + N
    # BAR2 is the consumer's RAM file, mmappable as a whole.
    info = c.get_region_info(2)
    assert info.fd is not None
    try:
        assert info.info.size == CONSUMER_RAM and info.info.flags & 4 and info.sparse is None
        st, ram = os.fstat(info.fd), os.fstat(link.ram.fd)
        assert (st.st_dev, st.st_ino) == (ram.st_dev, ram.st_ino)
    finally:
        os.close(info.fd)
    for bar, size in ((0, 0x4000), (4, 0x4000)):
        assert c.get_region_info(bar).info.size == size


def test_bar2_of_a_file_that_is_not_a_power_of_two(tmp_path: Path) -> None:
    before = open_fds()
    size = 3 * MiB + 100
    with rig_of(tmp_path, count=1, ram_size=size) as r:
        a = r.links[0].appliance
        info = a.client.get_region_info(2)
        assert info.fd is not None
        os.close(info.fd)
        assert info.info.size == 4 * MiB
        assert info.sparse is not None
        assert [(x.offset, x.size) for x in info.sparse.areas] == [(0, 3 * MiB + 4096)]
        assert a.caps[8].length == 3 * MiB + 4096
        # The tail past the file is trapped: reads zero, writes are an error.
        assert a.client.region_read(2, 3 * MiB + 8192, 8) == bytes(8)
        a.bring_up()
        a.client.region_write(2, 3 * MiB + 8192, b"x")
        assert a.virtio_status & DeviceStatus.DEVICE_NEEDS_RESET
    assert_no_fds_beyond(before)


# --------------------------------------------------------------------------- messages


def test_messages_cross_both_ways_and_fds_are_consumed(rig: Rig) -> None:
    link = rig.links[0]
    a = link.appliance
    fe = link.up()
    # GET_PROTOCOL_FEATURES: the driver's reply is masked on the way out.
    fe.channel.send_frame(*m.encode(FR.GET_PROTOCOL_FEATURES))
    assert header(a.recv()) == (FR.GET_PROTOCOL_FEATURES, 1, 0)
    a.reply(FR.GET_PROTOCOL_FEATURES, m.U64((1 << 21) - 1))
    frame = fe.channel.recv_frame(TIMEOUT)
    assert m.U64.unpack(frame.payload).value == TUNNEL_PROTOCOL_FEATURES
    # SET_PROTOCOL_FEATURES asking for more than the tunnel carries is masked too.
    fe.channel.send_frame(*m.encode(FR.SET_PROTOCOL_FEATURES, m.U64((1 << 21) - 1)))
    got = a.recv()
    assert m.U64.unpack(got[12:]).value == TUNNEL_PROTOCOL_FEATURES
    # SET_MEM_TABLE with the provisioned file: forwarded byte for byte, fd consumed.
    regions = (MemoryRegion(0, 8 * MiB, 0x7F0000000000, 0),
               MemoryRegion(1 << 32, 8 * MiB, 0x7F0000800000, 8 * MiB))
    table = m.MemoryTable(regions)
    fd_before = len(open_fds())
    fe.channel.send_frame(*m.encode(FR.SET_MEM_TABLE, table), [link.ram.fd, link.ram.fd])
    got = a.recv()
    assert got == m.encode_bytes(FR.SET_MEM_TABLE, table)
    # ADD_MEM_REG / REM_MEM_REG likewise.
    single = m.SingleRegion(MemoryRegion(2 << 32, MiB, 0x7F0001000000, 15 * MiB))
    fe.channel.send_frame(*m.encode(FR.ADD_MEM_REG, single), [link.ram.fd])
    assert a.recv() == m.encode_bytes(FR.ADD_MEM_REG, single)
    fe.channel.send_frame(*m.encode(FR.REM_MEM_REG, single))
    assert a.recv() == m.encode_bytes(FR.REM_MEM_REG, single)
    # Vring eventfds stay in the device model; the payload goes on unchanged.
    kick, call, err, logfd = eventfd(), eventfd(), eventfd(), eventfd()
    try:
        for req, fd in ((FR.SET_VRING_KICK, kick), (FR.SET_VRING_CALL, call),
                        (FR.SET_VRING_ERR, err)):
            fe.channel.send_frame(*m.encode(req, m.VringFile(1, False)), [fd])
            assert a.recv() == m.encode_bytes(req, m.VringFile(1, False))
        fe.channel.send_frame(*m.encode(FR.SET_LOG_FD), [logfd])
        assert a.recv() == m.encode_bytes(FR.SET_LOG_FD)
        conn = link.tunnel.conn
        assert conn is not None and set(conn.kicks) == {1} and set(conn.calls) == {1}
        # A request that needs a reply, answered through txq (REPLY_ACK style ack too).
        fe.channel.send_frame(*m.encode(FR.SET_VRING_NUM, m.VringState(1, 256),
                                        need_reply=True))
        got = a.recv()
        assert header(got)[:2] == (FR.SET_VRING_NUM, 0x9)
        a.reply(FR.SET_VRING_NUM, m.U64(0))
        assert fe.channel.recv_frame(TIMEOUT).payload == m.U64(0).pack()
        fe.channel.send_frame(*m.encode(FR.GET_VRING_BASE, m.VringState(1, 0)))
        assert header(a.recv())[0] == FR.GET_VRING_BASE
        a.reply(FR.GET_VRING_BASE, m.VringState(1, 42))
        assert m.VringState.unpack(fe.channel.recv_frame(TIMEOUT).payload) == \
            m.VringState(1, 42)
    finally:
        for fd in (kick, call, err, logfd):
            os.close(fd)
    # The device model keeps its copies of the 4 eventfds; the memory fds are closed.
    assert len(open_fds()) == fd_before + 4
    stats = link.stats
    assert stats["rx_messages"] == 11 and stats["tx_replies"] == 3 and stats["errors"] == 0


def test_kick_eventfd_raises_the_programmed_msix_vector(rig: Rig) -> None:
    link = rig.links[0]
    a = link.appliance
    fe = link.up()
    kicks = [eventfd() for _ in range(N)]
    try:
        for i, fd in enumerate(kicks):
            fe.set_vring_kick(i, fd)
            a.recv()
        for i in range(N):
            os.eventfd_write(kicks[i], 1)
            assert fired(a.vectors[3 + i]) == 1
            assert not fired(a.vectors[3 + (i + 1) % N], 0.02)
        # Re-route kick 2 to the vector of kick 0 (vectors may be shared) ...
        assert a.kick_vector(2, 3) == 3
        os.eventfd_write(kicks[2], 1)
        assert fired(a.vectors[3]) == 1
        # ... and to a vector the device does not have: refused, reads back 0xffff.
        assert a.kick_vector(2, 3 + N) == 0xFFFF
        os.eventfd_write(kicks[2], 1)
        wait_for(lambda: link.stats["kicks_unrouted"] == 1, "an unrouted kick")
        # A selector past N reads NO_VECTOR.
        assert a.kick_vector(N) == 0xFFFF
        # Replacing a kick fd stops watching the old one.
        new = eventfd()
        try:
            fe.set_vring_kick(0, new)
            a.recv()
            os.eventfd_write(kicks[0], 1)
            assert not fired(a.vectors[3], 0.05)
            os.eventfd_write(new, 1)
            assert fired(a.vectors[3]) == 1
        finally:
            os.close(new)
    finally:
        for fd in kicks:
            os.close(fd)
    assert link.stats["kicks"] == N + 3 and link.stats["errors"] == 0


def test_kick_without_msix_sets_isr_bit_2_and_intx(tmp_path: Path) -> None:
    with rig_of(tmp_path, count=1) as r:
        link = r.links[0]
        a = link.appliance
        a.bring_up(msix=False)
        a.set_backend_up()
        fe = link.connect()
        wait_for(lambda: a.vvu_status == 3, "FRONTEND_UP")
        assert a.intx is not None
        assert fired(a.intx)  # the config change
        assert a.read(VirtioPciCapType.ISR_CFG, 0, 1) == 2
        a.client.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        kick = eventfd()
        try:
            fe.set_vring_kick(0, kick)
            a.recv()
            a.read(VirtioPciCapType.ISR_CFG, 0, 1)  # clear the rxq interrupt
            a.client.set_irqs(PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK,
                              0, 1)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(a.intx)
            os.eventfd_write(kick, 1)
            assert fired(a.intx)
            assert a.read(VirtioPciCapType.ISR_CFG, 0, 1) == 0x4
        finally:
            os.close(kick)


def test_doorbells_signal_call_err_and_log_eventfds(rig: Rig) -> None:
    link = rig.links[0]
    a = link.appliance
    fe = link.up()
    calls = [eventfd() for _ in range(N)]
    errs = [eventfd() for _ in range(N)]
    logfd = eventfd()
    try:
        # Before SET_VRING_CALL a doorbell does nothing (and is counted).
        a.doorbell(0)
        assert link.stats["doorbells_unset"] == 1
        for i in range(N):
            fe.set_vring_call(i, calls[i])
            a.recv()
            fe.set_vring_err(i, errs[i])
            a.recv()
        fe.set_log_fd(logfd)
        a.recv()
        for i in range(N):
            a.doorbell(i, width=(1, 2, 4)[i % 3])
            assert os.eventfd_read(calls[i]) == 1  # the write is non-posted: already done
            a.doorbell(N + i)
            assert os.eventfd_read(errs[i]) == 1
        a.doorbell(2 * N)
        assert os.eventfd_read(logfd) == 1
        # NOFD takes the call eventfd away again.
        fe.set_vring_call(0, None)
        a.recv()
        a.doorbell(0)
        assert not fired(calls[0], 0.02)
    finally:
        for fd in (*calls, *errs, logfd):
            os.close(fd)
    assert link.stats["doorbells"] == 2 * N + 1
    assert link.stats["doorbells_unset"] == 2 and link.stats["errors"] == 0


def test_backend_requests_reach_the_backend_request_socket(rig: Rig) -> None:
    link = rig.links[0]
    a = link.appliance
    fe = link.up()
    # Without BACKEND_REQ negotiated a back-end request is dropped with a log line.
    a.send(m.encode_bytes(BR.CONFIG_CHANGE_MSG))
    assert link.stats["tx_dropped"] == 1
    features = TUNNEL_PROTOCOL_FEATURES & ~PF.REPLY_ACK.mask
    fe.channel.send_frame(*m.encode(FR.SET_PROTOCOL_FEATURES, m.U64(features)))
    a.recv()
    fe.set_backend_req_fd()
    assert header(a.recv()) == (FR.SET_BACKEND_REQ_FD, 1, 0)
    # A back-end request from txq arrives on the front-end's end of that socket ...
    a.send(m.encode_bytes(BR.CONFIG_CHANGE_MSG, need_reply=True))
    msg = fe.recv_backend_request(TIMEOUT, status=0)
    assert msg.request is BR.CONFIG_CHANGE_MSG and msg.need_reply
    # ... and the front-end's reply comes back through rxq.
    got = a.recv()
    assert header(got) == (BR.CONFIG_CHANGE_MSG, 0x5, 8)
    assert m.U64.unpack(got[12:]).value == 0
    a.send(m.encode_bytes(BR.IOTLB_MSG, m.Iotlb(0x1000, 0x1000, 0, 3, 2)))
    assert fe.recv_backend_request(TIMEOUT).request is BR.IOTLB_MSG
    stats = link.stats
    assert stats["tx_requests"] == 2 and stats["errors"] == 0


def test_messages_wait_for_rx_buffers(rig: Rig) -> None:
    """The device reads the front-end's socket only while rxq has a buffer."""
    link = rig.links[0]
    a = link.appliance
    assert a.rx is not None
    fe = link.up()
    for i in range(QSIZE + 3):
        fe.channel.send_frame(*m.encode(FR.SET_VRING_NUM, m.VringState(0, i)))
    wait_for(lambda: link.stats["rx_messages"] == QSIZE, "rxq to fill")
    time.sleep(0.05)
    assert link.stats["rx_messages"] == QSIZE  # the rest waits in the socket
    got = [m.VringState.unpack(bytes(a.memory.translate(addr, n))[12:]).num
           for addr, n in a.rx.get_used()]
    assert got == list(range(QSIZE))
    a.post_rx(3)
    wait_for(lambda: link.stats["rx_messages"] == QSIZE + 3, "the rest")


# --------------------------------------------------------------------------- EVENT_IDX
# Each rxq/txq notify is a trapped MMIO write: a vCPU exit, a vfio-user message and
# a turn of vvu-devd's loop. With EVENT_IDX the driver writes one only when the
# device waits for it; these tests count them (the device's rxq/txq_notifies).


@pytest.fixture
def ev_rig(tmp_path: Path) -> Iterator[Rig]:
    """One link whose driver double negotiates EVENT_IDX and honours it."""
    before = open_fds()
    with rig_of(tmp_path, count=1) as r:
        r.links[0].appliance.event_idx = True
        yield r
    assert_no_fds_beyond(before)


def test_rxq_refills_do_not_notify_while_the_device_has_buffers(ev_rig: Rig) -> None:
    link = ev_rig.links[0]
    a = link.appliance
    a.bring_up()
    negotiated = link.appliance.thread.call(lambda: link.device.negotiated_features)
    assert negotiated & VirtioFeature.EVENT_IDX
    fe = link.up()
    for i in range(3 * QSIZE):
        fe.channel.send_frame(*m.encode(FR.SET_VRING_NUM, m.VringState(0, i)))
        assert m.VringState.unpack(a.recv()[12:]).num == i  # buffer re-posted each time
    # One notify: the first post. The device never ran out, so never asked again
    # (without EVENT_IDX: one per message, 49).
    assert link.stats["rxq_notifies"] == 1
    assert link.stats["rx_messages"] == 3 * QSIZE and link.stats["errors"] == 0


def test_rxq_asks_for_a_notify_when_it_runs_dry(ev_rig: Rig) -> None:
    """Out of buffers, the device waits for rx_space(): it must have asked for the
    notify of the next re-post, or the front-end's messages stall for good."""
    link = ev_rig.links[0]
    a = link.appliance
    a.bring_up(rx_count=2)
    fe = link.up()
    for i in range(7):
        fe.channel.send_frame(*m.encode(FR.SET_VRING_NUM, m.VringState(0, i)))
    got: list[int] = []
    while len(got) < 7:
        got += [m.VringState.unpack(d[12:]).num for d in a.recv_all()]
    assert got == list(range(7))
    dry = link.stats["rxq_notifies"] - 1
    assert 1 <= dry <= 6  # one per time it ran dry, none for a refill it did not wait for


def test_a_txq_batch_costs_one_notify_while_the_device_is_behind(ev_rig: Rig) -> None:
    """QEMU posts BAR writes: the vCPU goes on while vvu-devd handles the notify. Messages
    added meanwhile need none: the device drains everything when it gets to it."""
    link = ev_rig.links[0]
    a = link.appliance
    a.bring_up()
    fe = link.up()
    for _ in range(5):
        fe.channel.send_frame(*m.encode(FR.GET_FEATURES))
    assert len(_more(a, 5)) == 5
    before = link.stats["txq_notifies"]
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:  # vvu-devd busy with something else
        busy.set()
        release.wait(TIMEOUT)

    link.appliance.thread.loop.call_soon_threadsafe(hold)
    assert busy.wait(TIMEOUT)
    rung = []
    for i in range(5):
        a.add_tx(m.encode_bytes(FR.GET_FEATURES, m.U64(i), reply=True))
        rung.append(a.notify_if_asked(1, posted=True))
    release.set()
    assert rung == [True, False, False, False, False]
    for i in range(5):
        frame = fe.channel.recv_frame(TIMEOUT)
        assert (frame.request, frame.payload) == (FR.GET_FEATURES, m.U64(i).pack())
    assert link.stats["txq_notifies"] - before == 1
    # The next message is not lost whichever way it goes: notified if the device
    # asked (it drained and re-armed), else picked up when its output drains.
    a.add_tx(m.encode_bytes(FR.GET_FEATURES, m.U64(9), reply=True))
    a.notify_if_asked(1)
    assert fe.channel.recv_frame(TIMEOUT).payload == m.U64(9).pack()


def test_without_event_idx_every_refill_notifies(tmp_path: Path) -> None:
    """The counter the tests above rely on: a driver that does not negotiate EVENT_IDX
    (the double's default) notifies each re-post, and the device serves it."""
    with rig_of(tmp_path, count=1) as r:
        link = r.links[0]
        link.appliance.bring_up()
        negotiated = link.appliance.thread.call(lambda: link.device.negotiated_features)
        assert not negotiated & VirtioFeature.EVENT_IDX
        fe = link.up()
        for i in range(5):
            fe.channel.send_frame(*m.encode(FR.SET_VRING_NUM, m.VringState(0, i)))
            link.appliance.recv()
        assert link.stats["rxq_notifies"] == 6


def _more(a: Appliance, count: int) -> list[bytes]:
    """rxq messages until ``count`` more arrived (they may come in several batches)."""
    out: list[bytes] = []
    while len(out) < count:
        out += a.recv_all()
    return out


# --------------------------------------------------------------------------- state machine


def test_connect_disconnect_reconnect(rig: Rig) -> None:
    link = rig.links[0]
    a = link.appliance
    cfg_irq = a.vectors[CONFIG_VECTOR]
    # A front-end that connects before BACKEND_UP waits in the listen backlog.
    early = link.connect()
    time.sleep(0.1)
    assert a.vvu_status == 0 and link.tunnel.conn is None
    assert not fired(cfg_irq, 0.02)
    a.set_backend_up()
    wait_for(lambda: a.vvu_status == 3, "FRONTEND_UP")
    assert fired(cfg_irq)  # the device set FRONTEND_UP: config interrupt
    link.round_trip(early)
    # The front-end disconnects: both bits clear, config interrupt.
    early.close()
    wait_for(lambda: a.vvu_status == 0, "status 0 after the disconnect")
    assert fired(cfg_irq)
    # After a session, a front-end that reconnects before BACKEND_UP is refused at
    # once (the socket does not listen; its file stays) instead of blocking in the
    # backlog: QEMU's reconnect-ms retries.
    with pytest.raises(TransportError, match="Connection refused"):
        link.connect()
    assert link.vhost_path.exists() and a.vvu_status == 0
    assert link.tunnel.state == "refusing until BACKEND_UP"
    a.set_backend_up()
    again = link.connect()
    wait_for(lambda: a.vvu_status == 3, "FRONTEND_UP again")
    assert fired(cfg_irq)
    link.round_trip(again)
    # The driver clears BACKEND_UP: the front-end's socket is closed, no interrupt.
    a.set_backend_up(False)
    assert a.vvu_status == 0
    with pytest.raises(DROPPED):
        again.channel.recv_frame(TIMEOUT)
    assert not fired(cfg_irq, 0.05)
    # A driver reset does the same; the next front-end is accepted after BACKEND_UP.
    third = link.up()
    a.bring_up()
    assert a.vvu_status == 0
    with pytest.raises(DROPPED):
        third.channel.recv_frame(TIMEOUT)
    fourth = link.up()
    link.round_trip(fourth)
    stats = link.stats
    assert stats["connections"] == 4 and stats["errors"] == 0 and stats["link_resets"] == 0


def test_refuse_while_down_refuses_before_the_first_session_too(tmp_path: Path) -> None:
    # A vvu-devd restarted under a running consumer (the launcher passes
    # --refuse-while-down): the consumer's reconnect must be refused until the
    # appliance is back, not parked in the backlog with its handshake blocking.
    thread = LoopThread()
    link = make_link(thread, tmp_path, "fresh", refuse_while_down=True)
    try:
        a = link.appliance
        a.bring_up()
        assert link.tunnel.state == "refusing until BACKEND_UP"
        with pytest.raises(TransportError, match="Connection refused"):
            link.connect()
        assert link.vhost_path.exists() and a.vvu_status == 0
        fe = link.up()  # BACKEND_UP: listening, accepted, FRONTEND_UP
        link.round_trip(fe)
    finally:
        close_link(link)
        thread.stop()


def test_appliance_disconnect_drops_the_front_end_and_the_device_serves_again(
        rig: Rig) -> None:
    link = rig.links[0]
    fe = link.up()
    link.appliance.client.close()  # the appliance's QEMU went away
    with pytest.raises(DROPPED):
        fe.channel.recv_frame(TIMEOUT)
    wait_for(lambda: link.server.session is None, "the vfio-user session to end")
    assert link.device.vvu_status == 0 and link.tunnel.conn is None
    # A new appliance (a restarted QEMU) gets a fresh device.
    ours, theirs = socket.socketpair()
    link.call(lambda: link.server.attach(theirs))
    link.appliance.client = VfioUserClient(ours)
    link.appliance.client.version()
    link.appliance.client.dma_map(0, APPLIANCE_RAM, link.appliance.ram_fd)
    link.appliance.next_free = 0x10000
    link.appliance.bring_up()
    link.round_trip(link.up())


# --------------------------------------------------------------------------- bad input


@dataclass
class Case:
    """A bad input, and which side it comes from."""

    name: str
    side: str  # "consumer" (the link drops, status 0) or "appliance" (NEEDS_RESET)
    do: Callable[[Link, VhostUserFrontend], object]


def _send(fe: VhostUserFrontend, request: int, payload: bytes = b"", fds: list[int] | None = None,
          flags: int = 1) -> None:
    fe.channel.send_frame(request, flags, payload, fds or [])


def _with_fd(make: Callable[[], int], use: Callable[[int], None]) -> None:
    fd = make()
    try:
        use(fd)
    finally:
        os.close(fd)


def _foreign_ram() -> int:
    fd = os.memfd_create("not-the-ram-file", os.MFD_CLOEXEC)
    os.ftruncate(fd, CONSUMER_RAM)
    return fd


def _raw(fe: VhostUserFrontend, data: bytes) -> None:
    channel = fe.channel
    assert isinstance(channel, UnixChannel)
    channel.sock.send(data)


def _pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


TABLE = m.MemoryTable((MemoryRegion(0, MiB, 0x7F0000000000, 0),))

CASES = [
    Case("unknown request code", "consumer", lambda ln, fe: _send(fe, 999)),
    Case("payload of the wrong size", "consumer",
         lambda ln, fe: _send(fe, FR.SET_FEATURES, b"\0" * 4)),
    Case("reply flag on a request", "consumer",
         lambda ln, fe: _send(fe, FR.GET_FEATURES, flags=0x5)),
    Case("header announcing a huge payload", "consumer",
         lambda ln, fe: _raw(fe, m.HEADER.pack(FR.SET_MEM_TABLE, 1, 1 << 20))),
    Case("SET_MEM_TABLE with another file", "consumer",
         lambda ln, fe: _with_fd(_foreign_ram, lambda fd: _send(
             fe, FR.SET_MEM_TABLE, TABLE.pack(), [fd]))),
    Case("SET_MEM_TABLE with the file, region past its end", "consumer",
         lambda ln, fe: _send(fe, FR.SET_MEM_TABLE, m.MemoryTable((MemoryRegion(
             0, 2 * MiB, 0x7F0000000000, CONSUMER_RAM - MiB),)).pack(), [ln.ram.fd])),
    Case("ADD_MEM_REG with another file", "consumer",
         lambda ln, fe: _with_fd(_foreign_ram, lambda fd: _send(
             fe, FR.ADD_MEM_REG, m.SingleRegion(TABLE.regions[0]).pack(), [fd]))),
    Case("SET_VRING_CALL past max_vhost_queues", "consumer",
         lambda ln, fe: _with_fd(eventfd, lambda fd: fe.set_vring_call(N, fd))),
    Case("SET_VRING_KICK with a pipe", "consumer",
         lambda ln, fe: _with_fd(_pipe_fd, lambda fd: fe.set_vring_kick(0, fd))),
    Case("SET_LOG_BASE (masked LOG_SHMFD)", "consumer",
         lambda ln, fe: _send(fe, FR.SET_LOG_BASE, m.LogArea(4096, 0).pack(), [ln.ram.fd])),
    Case("SET_INFLIGHT_FD (masked INFLIGHT_SHMFD)", "consumer",
         lambda ln, fe: _send(fe, FR.SET_INFLIGHT_FD, m.Inflight(4096, 0, 1, 256).pack(),
                              [ln.ram.fd])),
    Case("SET_BACKEND_REQ_FD with an eventfd", "consumer",
         lambda ln, fe: _with_fd(eventfd, lambda fd: _send(fe, FR.SET_BACKEND_REQ_FD,
                                                           b"", [fd]))),
    Case("doorbell index past 2N", "appliance",
         lambda ln, fe: ln.appliance.client.region_write(
             AUX_BAR, DOORBELL_OFFSET + 4 * (2 * N + 1), b"\1\0\0\0")),
    Case("doorbell write straddling two doorbells", "appliance",
         lambda ln, fe: ln.appliance.client.region_write(AUX_BAR, DOORBELL_OFFSET + 2,
                                                         b"\1\0\0\0")),
    Case("kick vector for a notification past N", "appliance",
         lambda ln, fe: ln.appliance.kick_vector(N, 3)),
    Case("undefined status bit", "appliance",
         lambda ln, fe: ln.appliance.write(VirtioPciCapType.DEVICE_CFG, 0, 4, 0x5)),
    Case("driver writes FRONTEND_UP", "appliance",
         lambda ln, fe: ln.appliance.write(VirtioPciCapType.DEVICE_CFG, 0, 4, 0x3)),
    Case("write to read-only max_vhost_queues", "appliance",
         lambda ln, fe: ln.appliance.write(VirtioPciCapType.DEVICE_CFG, 4, 4, 1)),
    Case("write to an undefined BAR4 register", "appliance",
         lambda ln, fe: ln.appliance.client.region_write(AUX_BAR, 0x800, b"\1\0\0\0")),
    Case("write to an undefined BAR0 register", "appliance",
         lambda ln, fe: ln.appliance.client.region_write(0, 0x3800, b"\1\0")),
    Case("queue notify past txq", "appliance",
         lambda ln, fe: ln.appliance.client.region_write(0, 0x3000 + 4 * 2, b"\2\0")),
    Case("txq buffer shorter than its header says", "appliance",
         lambda ln, fe: ln.appliance.send(m.HEADER.pack(FR.GET_FEATURES, 5, 8), wait=False)),
    Case("txq buffer shorter than a header", "appliance",
         lambda ln, fe: ln.appliance.send(b"\1\0\0", wait=False)),
    Case("txq reply of the wrong size", "appliance",
         lambda ln, fe: ln.appliance.send(m.HEADER.pack(FR.GET_FEATURES, 5, 4) + bytes(4),
                                          wait=False)),
    Case("txq message with version 0", "appliance",
         lambda ln, fe: ln.appliance.send(m.HEADER.pack(FR.GET_FEATURES, 4, 8) + bytes(8),
                                          wait=False)),
    Case("txq back-end request SHMEM_MAP (masked)", "appliance",
         lambda ln, fe: ln.appliance.send(m.encode_bytes(
             BR.SHMEM_UNMAP, m.ShmemMap(0, 0, 0, 4096, 0)), wait=False)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_resets_that_link_only(rig: Rig, case: Case) -> None:
    bad, good = rig.links
    fe_bad, fe_good = bad.up(), good.up()
    link_cfg_irq = bad.appliance.vectors[CONFIG_VECTOR]
    case.do(bad, fe_bad)
    # That link is dropped: the front-end sees its socket closed ...
    with pytest.raises(DROPPED):
        while True:
            fe_bad.channel.recv_frame(TIMEOUT)
    wait_for(lambda: bad.tunnel.conn is None and bad.device.vvu_status == 0, "the link drop")
    assert fired(link_cfg_irq)  # status change (or NEEDS_RESET) told the driver
    stats = bad.stats
    assert stats["errors"] == 1 and stats["link_resets"] == (case.side == "consumer")
    needs_reset = bool(bad.appliance.virtio_status & DeviceStatus.DEVICE_NEEDS_RESET)
    assert needs_reset == (case.side == "appliance")
    # ... the other device did not notice ...
    assert good.device.vvu_status == 3 and good.stats["errors"] == 0
    good.round_trip(fe_good)
    # ... and the broken one recovers the way the ABI says: reset (appliance side) or
    # BACKEND_UP again (consumer side), then the front-end reconnects.
    if needs_reset:
        bad.appliance.bring_up()
    bad.round_trip(bad.up())


def test_rx_buffer_too_small_needs_reset(tmp_path: Path) -> None:
    with rig_of(tmp_path, count=1) as r:
        link = r.links[0]
        link.appliance.bring_up(rx_buffer=32)  # SET_MEM_TABLE here is 52 bytes
        fe = link.up()
        _send(fe, FR.SET_MEM_TABLE, TABLE.pack(), [link.ram.fd])
        wait_for(lambda: bool(link.appliance.virtio_status & DeviceStatus.DEVICE_NEEDS_RESET),
                 "NEEDS_RESET")
        with pytest.raises(DROPPED):
            fe.channel.recv_frame(TIMEOUT)
        assert link.stats["errors"] == 1


def test_rx_buffers_in_a_read_only_map_need_reset(tmp_path: Path) -> None:
    with rig_of(tmp_path, count=1) as r:
        link = r.links[0]
        read_only = sealed_memfd("read-only-buffers", MiB)
        try:
            iova = 1 << 32
            link.appliance.client.dma_map(iova, MiB, read_only, flags=DmaMapFlags.READ)
            link.appliance.bring_up(rx_at=iova)
            fe = link.up()
            _send(fe, FR.GET_FEATURES)
            wait_for(lambda: bool(link.appliance.virtio_status
                                  & DeviceStatus.DEVICE_NEEDS_RESET), "NEEDS_RESET")
            with pytest.raises(DROPPED):
                fe.channel.recv_frame(TIMEOUT)
            assert link.stats["errors"] == 1
        finally:
            os.close(read_only)


# --------------------------------------------------------------------------- a session


def _appliance_backend(a: Appliance, stop: threading.Event, seen: list[bytes]) -> None:
    """A toy back-end in the appliance: answers what needs an answer, through txq."""
    answers: dict[int, m.Payload] = {
        FR.GET_FEATURES: m.U64(m.VHOST_USER_F_PROTOCOL_FEATURES | (1 << 32) | (1 << 29)),
        FR.GET_PROTOCOL_FEATURES: m.U64((1 << 21) - 1),
        FR.GET_QUEUE_NUM: m.U64(N),
        FR.GET_MAX_MEM_SLOTS: m.U64(8),
    }
    assert a.rx is not None
    while not stop.is_set():
        if not a.rx.has_used():
            time.sleep(0.001)
            continue
        for data in a.recv_all():
            seen.append(data)
            request, flags, _ = header(data)
            if request in answers:
                a.reply(request, answers[request])
            elif request == FR.GET_VRING_BASE:
                a.reply(request, m.VringState.unpack(data[12:20]))
            elif flags & m.HeaderFlags.NEED_REPLY:
                a.reply(request, m.U64(0))


def test_a_frontend_session_runs_through_the_tunnel(rig: Rig) -> None:
    """The unmodified front-end's QEMU-style sequence, answered from the appliance."""
    from vvu_runtime.vhost_user.frontend import setup_queue

    link = rig.links[0]
    fe = link.up()
    stop = threading.Event()
    seen: list[bytes] = []
    backend = threading.Thread(target=_appliance_backend, args=(link.appliance, stop, seen))
    backend.start()
    try:
        _, offered_pf = fe.negotiate()
        assert offered_pf == TUNNEL_PROTOCOL_FEATURES  # masked by the tunnel
        assert fe.reply_ack  # acks now travel rxq → driver → txq → front-end
        assert fe.get_queue_num() == N
        fe.set_mem_table([(link.ram.region, link.ram.fd)])
        q = setup_queue(fe, link.ram, 0, 64)
        try:
            assert fe.get_vring_base(0) == 0
        finally:
            q.close()
    finally:
        stop.set()
        backend.join(TIMEOUT)
    names = [FR(header(d)[0]).name for d in seen]
    assert names[:5] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                         "SET_OWNER", "SET_FEATURES"]
    assert "SET_MEM_TABLE" in names and "SET_VRING_KICK" in names
    assert link.stats["errors"] == 0


def test_no_fd_leak_over_many_connections(tmp_path: Path) -> None:
    before = open_fds()
    with rig_of(tmp_path, count=1) as r:
        link = r.links[0]
        link.appliance.bring_up()
        settled = None
        for i in range(20):
            fe = link.up()
            fds = [eventfd() for _ in range(3)]
            fe.set_vring_kick(0, fds[0])
            link.appliance.recv()
            fe.set_vring_call(0, fds[1])
            link.appliance.recv()
            _send(fe, FR.SET_MEM_TABLE, TABLE.pack(), [link.ram.fd])
            link.appliance.recv()
            if i % 2:
                _send(fe, 999)  # bad input: the link drops
            fe.close()
            link.frontends.remove(fe)
            for fd in fds:
                os.close(fd)
            wait_for(lambda: link.tunnel.conn is None, "the disconnect")
            if settled is None:
                settled = len(open_fds())
                continue
            # Another thread of this test process may hold an fd for a moment under load;
            # a leak is a count that stays above the first connection's.
            wait_for(lambda limit=settled: len(open_fds()) <= limit,  # type: ignore[misc]
                     f"fds back to {settled} after connection {i} (a leak if they stay above)")
    assert_no_fds_beyond(before)


# --------------------------------------------------------------------------- doorbell bypass


def test_call_eventfd_storms_and_reuse_stay_on_their_link(rig: Rig, tmp_path: Path) -> None:
    """A front-end replacing its call eventfd in a storm, closing each, then giving one
    eventfd for two calls: its link is reset, the doorbell companion's other peer and
    vvu-devd carry on."""
    from tests.support.ivshmem_client import IvshmemStandIn
    from vvu_runtime.device.ivshmem import IvshmemServer
    from vvu_runtime.fds import eventfd_info
    from vvu_runtime.virtio.vvu_abi import NO_DOORBELL_PEER, ivshmem_doorbell

    path = tmp_path / "doorbell.sock"

    def build() -> IvshmemServer:
        server = IvshmemServer(str(path), vectors=N + 1, loop=rig.thread.loop)
        for link in rig.links:
            peer = server.add_peer(link.name)
            link.tunnel.on_calls = peer.set_calls
            link.device.doorbell = peer
        server.start()
        return server

    server = rig.thread.call(build)
    qemu = IvshmemStandIn(path)
    qemu.start()
    stops: list[threading.Event] = []
    threads: list[threading.Thread] = []
    try:
        fes = [link.up() for link in rig.links]
        for link in rig.links:
            stop, seen = threading.Event(), list[bytes]()
            t = threading.Thread(target=_appliance_backend, args=(link.appliance, stop, seen))
            t.start()
            stops.append(stop)
            threads.append(t)
        peer_a, peer_b = server.peers
        call_b = eventfd()
        fes[1].channel.send_frame(*m.encode(FR.SET_VRING_CALL, m.VringFile(0, False)),
                                  fds=[call_b])
        wait_for(lambda: rig.thread.call(lambda: peer_b.applied) >= 1, "link 2's set live")
        assert fired(call_b) == 1  # signalled once, when QEMU had it
        id_b = rig.thread.call(peer_b.current_peer)

        for i in range(300):
            e = eventfd()
            fes[0].channel.send_frame(*m.encode(FR.SET_VRING_CALL, m.VringFile(i % N, False)),
                                      fds=[e])
            os.close(e)
        wait_for(lambda: rig.links[0].stats["rx_messages"] >= 300, "the storm through rxq")
        same = eventfd()
        fes[0].channel.send_frame(*m.encode(FR.SET_VRING_CALL, m.VringFile(0, False)),
                                  fds=[same])
        fes[0].channel.send_frame(*m.encode(FR.SET_VRING_CALL, m.VringFile(1, False)),
                                  fds=[same])
        wait_for(lambda: rig.links[0].stats["errors"] >= 1, "the reused eventfd refused")
        wait_for(lambda: rig.thread.call(peer_a.current_peer) == NO_DOORBELL_PEER,
                 "link 1's peer gone with its front-end")
        os.close(same)
        # Coalesced, never an ID twice, and link 2 never touched.
        assert rig.thread.call(lambda: peer_a.announcements) < 150
        assert qemu.reused == [] and id_b not in qemu.removed
        assert rig.thread.call(lambda: (peer_b.announcements, peer_b.current_peer())) == (1, id_b)
        installed = qemu.installed(id_b)[0]
        assert eventfd_info(installed).ident == eventfd_info(call_b).ident
        assert qemu.ring(ivshmem_doorbell(id_b, 0))  # its doorbell still lands
        assert fired(call_b) == 1
        fes[1].channel.send_frame(*m.encode(FR.GET_FEATURES))  # and the link itself works
        assert fes[1].channel.recv_frame(TIMEOUT).request == FR.GET_FEATURES
        os.close(call_b)
    finally:
        for stop in stops:
            stop.set()
        for t in threads:
            t.join(TIMEOUT)
        qemu.close()
        rig.thread.call(server.close)
