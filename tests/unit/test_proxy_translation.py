"""vvu-proxy's message and fd translation, in the whole in-process chain.

    front-end (vhost_user.frontend, consumer RAM = a file)
      -> UNIX socket -> VVU device model (device.vvu + device.tunnel)
      -> vfio-user -> VfioUserPciFunction (the only double: vfio-pci's part)
      -> the real driver -> ProxyLink / ProxySession (vvu_runtime.proxy)
      -> a UNIX socket -> ScriptedBackend (tests/support: records what a stock
         back-end gets, fds included, and answers like one)

Each test checks what the back-end receives (payloads rewritten, fds that map the
right memory or carry the right notifications) and what the consumer sees; the
rejection tests make the back-end misbehave and check that only its link resets.
"""

from __future__ import annotations

import mmap
import os
import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.loop_thread import LoopThread
from tests.support.scripted_backend import (
    ALL_PROTOCOL_FEATURES,
    FEATURES,
    Received,
    ScriptedBackend,
)
from tests.support.vhost_user_harness import open_fds
from tests.support.vvu_chain import RAM_SIZE, DeviceModel, FileRam, wait_for
from vvu_runtime.driver.pci import BarFile
from vvu_runtime.fds import FdError, eventfd_info
from vvu_runtime.proxy.link import BackendMode, BackendState, ProxyLink
from vvu_runtime.proxy.relay import PROXY_PROTOCOL_FEATURES, EndCause, ProxySession
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import VhostUserError
from vvu_runtime.vhost_user.frontend import FrontendError, VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.messages import BackendRequest as BR
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.transport import Frame, UnixChannel
from vvu_runtime.virtio.inflight import inflight_region_size
from vvu_runtime.virtio.memory import MemoryRegion
from vvu_runtime.virtio.vvu_abi import VvuStatus

UP = int(VvuStatus.BACKEND_UP)
HALF = RAM_SIZE // 2


class Link:
    """One consumer link through the proxy to a scripted back-end."""

    def __init__(self, tmp: Path, name: str, lt: LoopThread, *, interrupts: bool = True
                 ) -> None:
        self.lt = lt
        self.model = DeviceModel(tmp, name, interrupts=interrupts)
        self.backend = ScriptedBackend(str(tmp / f"{name}-backend.sock"))
        self.proxy = ProxyLink(self.backend.path, pci=self.model.pci, loop=lt.loop,
                               label=name)
        lt.call(self.proxy.start)
        wait_for(lambda: self.model.status() == UP, what=f"{name} armed")
        self.ram = FileRam(self.model.ram_path)

    def consumer(self, protocol: int | None = None) -> VhostUserFrontend:
        fe = VhostUserFrontend.connect(self.model.sock_path, retry_for=5.0, timeout=5.0)
        fe.negotiate(protocol_features=protocol)
        return fe

    def close(self) -> None:
        self.lt.call(self.proxy.close)
        self.ram.close()
        self.model.close()
        self.backend.close()


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop = LoopThread("appliance")
    yield loop
    loop.stop()


@pytest.fixture
def link(tmp_path: Path, lt: LoopThread) -> Iterator[Link]:
    before = open_fds()
    one = Link(tmp_path, "disk0", lt)
    yield one
    one.close()
    lt.sync()
    assert open_fds() <= before, "the proxy chain leaked fds"


def one(backend: ScriptedBackend, request: int, connection: int | None = None) -> Received:
    wait_for(lambda: backend.messages(request, connection), what=f"request {request}")
    return backend.messages(request, connection)[-1]


# --------------------------------------------------------------------------- memory


def test_memory_regions_are_files_of_the_bar_that_map_the_consumer_ram(link: Link) -> None:
    fe = link.consumer()
    ram = link.ram
    low = MemoryRegion(0, HALF, ram.UVA_BASE, 0)
    high = MemoryRegion(1 << 32, HALF, ram.UVA_BASE + HALF, HALF)
    ram.view(0, 16)[:] = b"low region bytes"
    ram.view(HALF, 16)[:] = b"high region byte"
    fe.set_mem_table([(low, ram.fd), (high, ram.fd)])
    got = one(link.backend, FR.SET_MEM_TABLE)
    table = got.decoded()
    assert isinstance(table, m.MemoryTable)
    assert len(got.fds) == 2
    # In the in-process chain the BAR's file starts with the BAR: offsets unchanged.
    assert [r.mmap_offset for r in table.regions] == [0, HALF]
    assert [r.guest_phys_addr for r in table.regions] == [0, 1 << 32]
    for region, fd, want in zip(table.regions, got.fds,
                                (b"low region bytes", b"high region byte"), strict=True):
        # As libvhost-user and rust-vmm map it: at mmap_offset, page-aligned.
        assert region.mmap_offset % mmap.PAGESIZE == 0
        with mmap.mmap(fd, region.memory_size, offset=region.mmap_offset) as view:
            assert view[:16] == want
        # As DPDK maps it: from offset 0 over mmap_offset + size.
        with mmap.mmap(fd, region.mmap_offset + region.memory_size) as view:
            assert view[region.mmap_offset:region.mmap_offset + 16] == want
    # The back-end's writes are the consumer's memory (zero copy).
    with mmap.mmap(got.fds[1], HALF, offset=HALF) as view:
        view[100:104] = b"back"
    assert bytes(ram.view(HALF + 100, 4)) == b"back"
    fe.close()


def test_mmap_offset_is_rewritten_to_the_place_in_the_bar_file(
        tmp_path: Path, lt: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """vfio's device fd maps BAR2 at its region offset, not 0: the proxy adds it."""
    model = DeviceModel(tmp_path, "vfio-like")
    region_offset = 2 << 40  # VFIO_PCI_INDEX_TO_OFFSET(2)
    real = model.pci.bar_file

    def vfio_like(index: int) -> BarFile:
        bar = real(index)
        return BarFile(bar.fd, bar.offset + region_offset, bar.size, "vfio-like BAR2")

    monkeypatch.setattr(model.pci, "bar_file", vfio_like)
    backend = ScriptedBackend(str(tmp_path / "vfio-like-backend.sock"))
    proxy = ProxyLink(backend.path, pci=model.pci, loop=lt.loop)
    try:
        lt.call(proxy.start)
        ram = FileRam(model.ram_path)
        fe = VhostUserFrontend.connect(model.sock_path, retry_for=5.0)
        fe.negotiate()
        fe.set_mem_table([(MemoryRegion(0, HALF, ram.UVA_BASE, 0), ram.fd),
                          (MemoryRegion(1 << 32, HALF, ram.UVA_BASE + HALF, HALF), ram.fd)])
        fe.add_mem_reg(MemoryRegion(2 << 32, 4096, ram.UVA_BASE + RAM_SIZE - 4096,
                                    RAM_SIZE - 4096), ram.fd)
        fe.rem_mem_reg(MemoryRegion(2 << 32, 4096, ram.UVA_BASE + RAM_SIZE - 4096,
                                    RAM_SIZE - 4096))
        table = one(backend, FR.SET_MEM_TABLE).decoded()
        assert isinstance(table, m.MemoryTable)
        assert [r.mmap_offset for r in table.regions] == [region_offset, region_offset + HALF]
        added = one(backend, FR.ADD_MEM_REG)
        removed = one(backend, FR.REM_MEM_REG)
        for got, nfds in ((added, 1), (removed, 0)):
            single = got.decoded()
            assert isinstance(single, m.SingleRegion)
            assert single.region.mmap_offset == region_offset + RAM_SIZE - 4096
            assert len(got.fds) == nfds  # REM_MEM_REG carries no fd
        fe.close()
        ram.close()
    finally:
        lt.call(proxy.close)
        model.close()
        backend.close()


# --------------------------------------------------------------------------- notifications


def test_kick_is_the_msix_eventfd_and_calls_reach_the_consumer(link: Link) -> None:
    fe = link.consumer()
    fe.set_mem_table([(link.ram.region, link.ram.fd)])
    dq = setup_queue(fe, link.ram, 1, 64)
    kick = one(link.backend, FR.SET_VRING_KICK)
    assert m.VringFile.unpack(kick.payload) == m.VringFile(1, False)
    (kick_fd,) = kick.fds
    vector_fd = link.lt.call(lambda: link.proxy.vvu.kick_eventfd(1) if link.proxy.vvu
                             else None)
    assert vector_fd is not None
    ident = eventfd_info(kick_fd).ident
    if ident is not None:  # the same eventfd, no relay in between
        assert ident == eventfd_info(vector_fd).ident
    dq.kick()  # consumer kick -> device model -> MSI-X vector -> the back-end's fd
    assert select.select([kick_fd], [], [], 5)[0], "the kick did not reach the back-end"
    os.eventfd_read(kick_fd)

    (call_fd,) = one(link.backend, FR.SET_VRING_CALL).fds
    (err_fd,) = one(link.backend, FR.SET_VRING_ERR).fds
    os.eventfd_write(call_fd, 1)  # the back-end signals -> doorbell -> consumer's call
    assert dq.wait_call(5), "the back-end's call did not reach the consumer"
    os.eventfd_write(err_fd, 1)
    wait_for(dq.err_signalled, what="the err notification")
    dq.close()
    fe.close()


def test_nofd_call_stays_nofd(link: Link) -> None:
    fe = link.consumer()
    fe.set_vring_call(0, None)
    got = one(link.backend, FR.SET_VRING_CALL)
    assert m.VringFile.unpack(got.payload) == m.VringFile(0, True) and not got.fds
    fe.close()


def test_poll_mode_gives_the_backend_a_ticking_kick(tmp_path: Path, lt: LoopThread) -> None:
    """No MSI-X (the sysfs path): a stock back-end waits for kicks, so it gets an
    eventfd the proxy signals every poll interval."""
    one_link = Link(tmp_path, "polled", lt, interrupts=False)
    try:
        fe = one_link.consumer()
        fe.set_mem_table([(one_link.ram.region, one_link.ram.fd)])
        dq = setup_queue(fe, one_link.ram, 0, 64)
        kick = one(one_link.backend, FR.SET_VRING_KICK)
        assert m.VringFile.unpack(kick.payload) == m.VringFile(0, False)
        for _ in range(3):
            assert select.select([kick.fds[0]], [], [], 2)[0]
            os.eventfd_read(kick.fds[0])
        dq.close()
        fe.close()
    finally:
        one_link.close()


# --------------------------------------------------------------------------- features


def test_protocol_features_are_masked_both_ways(link: Link) -> None:
    fe = VhostUserFrontend.connect(link.model.sock_path, retry_for=5.0)
    assert fe.get_features() == FEATURES
    offered = fe.get_protocol_features()
    # The back-end offers every bit; the consumer sees what tunnel and proxy carry.
    assert offered == ALL_PROTOCOL_FEATURES & PROXY_PROTOCOL_FEATURES
    fe.set_protocol_features(offered)
    sent = one(link.backend, FR.SET_PROTOCOL_FEATURES).decoded()
    assert isinstance(sent, m.U64)
    # What the back-end gets: the consumer's choice, plus the proxy's own inflight.
    assert sent.value == offered | PF.INFLIGHT_SHMFD.mask
    fe.close()


def test_backend_without_inflight_gets_no_inflight(tmp_path: Path, lt: LoopThread) -> None:
    one_link = Link(tmp_path, "noinflight", lt)
    one_link.backend.protocol_features = ALL_PROTOCOL_FEATURES & ~PF.INFLIGHT_SHMFD.mask
    try:
        fe = one_link.consumer()
        sent = one(one_link.backend, FR.SET_PROTOCOL_FEATURES).decoded()
        assert isinstance(sent, m.U64) and not sent.value & PF.INFLIGHT_SHMFD.mask
        fe.set_mem_table([(one_link.ram.region, one_link.ram.fd)])
        dq = setup_queue(fe, one_link.ram, 0, 64)
        assert FR.SET_VRING_KICK in one_link.backend.requests()
        assert FR.SET_INFLIGHT_FD not in one_link.backend.requests()
        dq.close()
        fe.close()
    finally:
        one_link.close()


# --------------------------------------------------------------------------- back-end requests


def test_backend_requests_cross_the_tunnel_and_replies_come_back(link: Link) -> None:
    fe = link.consumer()
    fe.set_backend_req_fd()
    got = one(link.backend, FR.SET_BACKEND_REQ_FD)
    assert len(got.fds) == 1  # a socket of the proxy, not the consumer's
    channel = link.backend.backend_channel
    assert channel is not None
    code, flags, data = m.encode(BR.CONFIG_CHANGE_MSG, m.EMPTY, need_reply=True)
    channel.send_frame(code, flags, data)
    msg = fe.recv_backend_request(5, status=0)  # answers the ack
    assert msg.request == BR.CONFIG_CHANGE_MSG and msg.need_reply and not msg.fds
    reply = channel.recv_frame(5)
    assert (reply.request, m.U64.unpack(reply.payload).value) == (BR.CONFIG_CHANGE_MSG, 0)
    assert reply.flags & m.HeaderFlags.REPLY and not reply.fds
    fe.close()


# --------------------------------------------------------------------------- inflight


def _start_ring(link: Link, fe: VhostUserFrontend) -> None:
    fe.get_queue_num()
    fe.set_mem_table([(link.ram.region, link.ram.fd)])
    setup_queue(fe, link.ram, 0, 64).close()


def test_inflight_area_survives_a_backend_restart_not_a_consumer_restart(link: Link) -> None:
    fe = link.consumer()
    _start_ring(link, fe)
    first = one(link.backend, FR.SET_INFLIGHT_FD, connection=1)
    order = link.backend.requests(connection=1)
    # The proxy's own SET_INFLIGHT_FD comes before the ring starts.
    assert order.index(FR.SET_INFLIGHT_FD) < order.index(FR.SET_VRING_KICK)
    info = first.decoded()
    assert isinstance(info, m.Inflight)
    assert (info.num_queues, info.queue_size) == (2, 64)  # GET_QUEUE_NUM's 2
    assert info.mmap_size == inflight_region_size(2, 64) == os.fstat(first.fds[0]).st_size
    inode = os.fstat(first.fds[0]).st_ino

    # The back-end restarts: the link resets, the consumer reconnects, and the new
    # back-end gets the same area (what was in flight resumes).
    link.backend.hang_up()
    wait_for(lambda: EndCause.BACKEND_GONE in link.proxy.ends, what="the session to end")
    with pytest.raises((VhostUserError, OSError)):
        fe.get_queue_num()  # the device dropped the consumer
    fe.close()
    wait_for(lambda: link.model.status() == UP, what="re-armed")
    fe = link.consumer()
    _start_ring(link, fe)
    second = one(link.backend, FR.SET_INFLIGHT_FD, connection=2)
    assert os.fstat(second.fds[0]).st_ino == inode
    assert link.lt.call(lambda: link.proxy.inflight.made) == 1

    # The consumer goes away: its in-flight state goes with it.
    fe.close()
    wait_for(lambda: EndCause.FRONTEND in link.proxy.ends, what="the consumer to leave")
    wait_for(lambda: link.model.status() == UP, what="re-armed")
    fe = link.consumer()
    _start_ring(link, fe)
    third = one(link.backend, FR.SET_INFLIGHT_FD, connection=3)
    assert os.fstat(third.fds[0]).st_ino != inode
    fe.close()


# --------------------------------------------------------------------------- rejections


def _reply(channel: UnixChannel, request: int, payload: bytes, fds: list[int] | None = None,
           flags: int = m.VERSION | m.HeaderFlags.REPLY) -> None:
    channel.send_frame(request, flags, payload, fds or [])


def _unsolicited(channel: UnixChannel, got: Received) -> None:
    _reply(channel, FR.SET_VRING_NUM, m.U64(0).pack())


def _with_fd(channel: UnixChannel, got: Received) -> None:
    fd = os.eventfd(0)
    try:
        _reply(channel, got.request, m.U64(2).pack(), [fd])
    finally:
        os.close(fd)


def _wrong_code(channel: UnixChannel, got: Received) -> None:
    _reply(channel, FR.GET_FEATURES, m.U64(2).pack())


def _short(channel: UnixChannel, got: Received) -> None:
    _reply(channel, got.request, b"\x02\0\0\0")


def _request_not_reply(channel: UnixChannel, got: Received) -> None:
    _reply(channel, got.request, m.U64(2).pack(), flags=m.VERSION)


def _bad_version(channel: UnixChannel, got: Received) -> None:
    _reply(channel, got.request, m.U64(2).pack(), flags=2 | m.HeaderFlags.REPLY)


def _huge(channel: UnixChannel, got: Received) -> None:
    channel.sock.sendall(m.HEADER.pack(got.request, m.VERSION | m.HeaderFlags.REPLY, 1 << 30))


#: case -> (the request whose answer is replaced, the misbehaviour, what the log says)
BAD_REPLIES = {
    # The consumer sends on at once: the stray reply may meet an owed one.
    "a reply nobody asked for": (FR.SET_OWNER, _unsolicited,
                                 "a reply to SET_VRING_NUM (that nobody asked for|where)"),
    "a reply carrying an fd": (FR.GET_QUEUE_NUM, _with_fd,
                               "GET_QUEUE_NUM reply carries 1 fd.*none can cross the tunnel"),
    "a reply to another request": (FR.GET_QUEUE_NUM, _wrong_code,
                                   "a reply to GET_FEATURES where GET_QUEUE_NUM was owed"),
    "a reply of the wrong size": (FR.GET_QUEUE_NUM, _short, "payload is 4 bytes"),
    "a request on the main socket": (FR.GET_QUEUE_NUM, _request_not_reply,
                                     "GET_QUEUE_NUM without the REPLY flag on the main socket"),
    "a header of another version": (FR.GET_QUEUE_NUM, _bad_version, "header version 2"),
    "a payload size past any bound": (FR.GET_QUEUE_NUM, _huge, "1073741824-byte payload"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_backend_replies_reset_that_link_only(tmp_path: Path, lt: LoopThread,
                                                  caplog: pytest.LogCaptureFixture,
                                                  case: str) -> None:
    trigger, bad, says = BAD_REPLIES[case]
    before = open_fds()
    victim = Link(tmp_path, "victim", lt)
    other = Link(tmp_path, "other", lt)
    try:
        fe_other = other.consumer()
        victim.backend.misbehave[trigger] = bad
        fe = VhostUserFrontend.connect(victim.model.sock_path, retry_for=5.0, timeout=5.0)
        with pytest.raises((VhostUserError, FrontendError, OSError)):
            # Without REPLY_ACK, so that SET_OWNER owes no answer.
            fe.negotiate(protocol_features=PROXY_PROTOCOL_FEATURES & ~PF.REPLY_ACK.mask)
            fe.get_queue_num()  # never answered: the link was reset under it
            fe.get_queue_num()
        wait_for(lambda: EndCause.BACKEND_FAULT in victim.proxy.ends,
                 what="the back-end fault")
        faults = [r.getMessage() for r in caplog.records if "bad input from the back-end"
                  in r.getMessage()]
        assert len(faults) == 1 and re.search(says, faults[0]) and "victim" in faults[0], \
            faults
        fe.close()
        # The victim's link comes back, to a fresh back-end connection ...
        del victim.backend.misbehave[trigger]
        wait_for(lambda: victim.model.status() == UP, what="the victim re-armed")
        assert lt.call(lambda: victim.proxy.state) is BackendState.READY
        fe = victim.consumer()
        assert fe.get_queue_num() == 2
        fe.close()
        # ... and the other link never noticed.
        assert fe_other.get_queue_num() == 2
        assert lt.call(lambda: other.proxy.ends) == []
        fe_other.close()
    finally:
        victim.close()
        other.close()
    lt.sync()
    assert open_fds() <= before


def _send_backend_request(link: Link, request: int, payload: bytes, *, fds: list[int] | None
                          = None, flags: int = m.VERSION) -> None:
    channel = link.backend.backend_channel
    assert channel is not None
    channel.send_frame(request, flags, payload, fds or [])


BAD_REQUESTS = {
    "a back-end request carrying an fd":
        (BR.CONFIG_CHANGE_MSG, b"", True, m.VERSION, "none can cross the tunnel"),
    "in-band VRING_CALL (INBAND_NOTIFICATIONS is masked)":
        (BR.VRING_CALL, m.VringState(0, 0).pack(), False, m.VERSION,
         "VRING_CALL needs INBAND_NOTIFICATIONS"),
    "SHARED_OBJECT_ADD (SHARED_OBJECT is masked)":
        (BR.SHARED_OBJECT_ADD, bytes(16), False, m.VERSION,
         "SHARED_OBJECT_ADD needs SHARED_OBJECT"),
    "a reply on the request channel":
        (BR.CONFIG_CHANGE_MSG, b"", False, m.VERSION | m.HeaderFlags.REPLY,
         "a request with the REPLY flag"),
    "an unknown request code": (99, b"", False, m.VERSION, "unknown back-end request code 99"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_backend_requests_reset_the_link(link: Link, caplog: pytest.LogCaptureFixture,
                                             case: str) -> None:
    request, payload, with_fd, flags, says = BAD_REQUESTS[case]
    fe = link.consumer()
    fe.set_backend_req_fd()
    one(link.backend, FR.SET_BACKEND_REQ_FD)
    fd = os.eventfd(0) if with_fd else None
    try:
        _send_backend_request(link, request, payload, fds=[fd] if fd is not None else None,
                              flags=flags)
    finally:
        if fd is not None:
            os.close(fd)
    wait_for(lambda: EndCause.BACKEND_FAULT in link.proxy.ends, what="the back-end fault")
    assert any(says in r.getMessage() and "back-end request channel" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    with pytest.raises((VhostUserError, FrontendError, OSError)):
        fe.get_queue_num()
    # Nothing of it reached the consumer's back-end request socket.
    assert fe.backend_channel is not None
    with pytest.raises(VhostUserError):
        fe.recv_backend_request(0.2)
    fe.close()
    wait_for(lambda: link.model.status() == UP, what="re-armed")


def test_backend_that_hangs_up_before_a_consumer_comes_is_reconnected(link: Link) -> None:
    wait_for(lambda: link.backend.channel is not None, what="the proxy's connection")
    link.backend.hang_up()
    wait_for(lambda: link.backend.connections == 2, what="the proxy to reconnect")
    wait_for(lambda: link.model.status() == UP, what="re-armed")
    fe = link.consumer()
    assert fe.get_queue_num() == 2
    fe.close()


def test_no_consumer_is_taken_while_the_backend_is_down(tmp_path: Path, lt: LoopThread) -> None:
    model = DeviceModel(tmp_path, "nobackend")
    path = str(tmp_path / "absent.sock")
    proxy = ProxyLink(path, pci=model.pci, loop=lt.loop, retry=0.05)
    try:
        lt.call(proxy.start)
        lt.sync()
        assert model.status() == 0 and lt.call(lambda: proxy.state) is BackendState.WAITING
        backend = ScriptedBackend(path)
        try:
            wait_for(lambda: model.status() == UP, what="armed once the back-end listens")
        finally:
            lt.call(proxy.close)
            backend.close()
    finally:
        model.close()
    assert not Path(path).exists()


@pytest.mark.parametrize("request_, payload", [
    (FR.SET_INFLIGHT_FD, m.Inflight(4096, 0, 1, 64).pack()),
    (FR.GET_INFLIGHT_FD, m.Inflight(0, 0, 1, 64).pack()),
    (FR.SET_LOG_BASE, m.LogArea(4096, 0).pack()),
    (FR.VRING_KICK, m.VringState(0, 0).pack()),
])
def test_rxq_message_the_proxy_does_not_relay_ends_the_session(
        link: Link, caplog: pytest.LogCaptureFixture, request_: FR, payload: bytes) -> None:
    """What the tunnel already refuses, the proxy refuses too (defence in depth): fed
    to the live session as if it had come off rxq."""
    fe = link.consumer()
    wait_for(lambda: link.lt.call(lambda: link.proxy.session is not None), what="a session")

    def feed() -> None:
        session = link.proxy.session
        assert isinstance(session, ProxySession)
        session.channel._pending.append(Frame(request_, m.VERSION, payload))
        session._on_frontend()

    link.lt.call(feed)
    wait_for(lambda: EndCause.TUNNEL_FAULT in link.proxy.ends, what="the session to end")
    assert any(f"{request_.name} is not relayed" in r.getMessage() for r in caplog.records)
    assert request_ not in link.backend.requests()
    fe.close()


def test_socketpair_end_given_to_backend_is_a_socket(link: Link) -> None:
    fe = link.consumer()
    fe.set_backend_req_fd()
    got = one(link.backend, FR.SET_BACKEND_REQ_FD)
    sock = socket.socket(fileno=os.dup(got.fds[0]))
    try:
        assert sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
    finally:
        sock.close()
    fe.close()


def test_unusable_backend_socket_fails_start_and_releases_the_function(
        tmp_path: Path, lt: LoopThread) -> None:
    model = DeviceModel(tmp_path, "badpath")
    path = tmp_path / "no-such-dir" / "backend.sock"
    proxy = ProxyLink(str(path), pci=model.pci, loop=lt.loop, mode=BackendMode.LISTEN)
    try:
        with pytest.raises(FdError, match=f"cannot listen on {path}"):
            lt.call(proxy.start)
        assert lt.call(lambda: proxy.vvu) is None  # the driver let the function go
        assert model.status() == 0
    finally:
        model.close()
