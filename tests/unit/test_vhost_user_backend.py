"""The back-end session driven by a scripted front-end over socketpairs and memfds."""

from __future__ import annotations

import gc
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.support.vhost_user_harness import (
    ECHO_FEATURES,
    EchoDevice,
    LoopThread,
    open_fds,
    session_pair,
)
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.backend import (
    MAX_MEM_SLOTS,
    SESSION_PROTOCOL_FEATURES,
    BackendSession,
    SessionState,
)
from vvu_runtime.vhost_user.errors import FrontendError, TransportError
from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.virtio.errors import DescriptorError
from vvu_runtime.virtio.memory import MemoryRegion
from vvu_runtime.virtio.queue import RingAddresses

RAM = 1 << 20


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


def start(fe: VhostUserFrontend, ram: GuestRam, *, pf: int | None = None,
          features: int | None = None) -> None:
    """QEMU's init + start sequence up to the memory table."""
    fe.negotiate(features=features, protocol_features=pf)
    assert fe.get_queue_num() == 2
    fe.set_mem_table([(ram.region, ram.fd)])


def echo(dq, ram: GuestRam, payload: bytes, out: int = 64) -> bytes:  # type: ignore[no-untyped-def]
    src = ram.alloc(len(payload))
    dst = ram.alloc(out)
    ram.view(src, len(payload))[:] = payload
    dq.ring.add([(src, len(payload))], [(dst, out)], token=dst)
    dq.kick()
    assert dq.wait_call(), "no call notification"
    ((token, written),) = dq.ring.get_used()
    return bytes(ram.view(token, written))


def test_qemu_start_sequence_and_data_path(lt: LoopThread) -> None:
    before = open_fds()
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        assert session.state is SessionState.AWAITING_OWNER
        offered = fe.get_features()
        assert offered & m.VHOST_USER_F_PROTOCOL_FEATURES
        assert offered & m.VHOST_F_LOG_ALL
        assert offered & ECHO_FEATURES == ECHO_FEATURES
        pf = fe.get_protocol_features()
        assert pf & SESSION_PROTOCOL_FEATURES == SESSION_PROTOCOL_FEATURES
        assert pf & PF.CONFIG.mask  # the echo device has a config space
        fe.set_protocol_features(pf)
        assert fe.get_queue_num() == 2
        assert fe.get_max_mem_slots() == MAX_MEM_SLOTS
        fe.set_backend_req_fd()
        fe.set_owner()
        assert session.state is SessionState.NEGOTIATING
        fe.set_features(offered & ~m.VHOST_F_LOG_ALL)
        assert dev.acked == offered & ECHO_FEATURES
        fe.set_mem_table([(ram.region, ram.fd)])
        dq0 = setup_queue(fe, ram, 0, 16)
        dq1 = setup_queue(fe, ram, 1, 16)
        lt.sync()
        assert session.state is SessionState.RUNNING
        assert dev.started == [0, 1]
        assert echo(dq0, ram, b"hello") == b"HELLO"
        assert echo(dq1, ram, b"world") == b"WORLD"
        for _ in range(40):  # wrap the ring a few times
            assert echo(dq0, ram, b"abc") == b"ABC"
        assert fe.get_config(2, 4) == bytes([2, 3, 4, 5])
        fe.set_config(0, b"\xff")
        assert dev.config[0] == 0xFF
        fe.set_status(0xF)
        assert fe.get_status() == 0xF
        base = fe.get_vring_base(0)
        assert base == 41
        assert 0 in dev.stopped
        fe.get_vring_base(1)
        lt.sync()
        assert session.state is SessionState.NEGOTIATING
        dq0.close()
        dq1.close()
        del dq0, dq1
    ram.close()
    lt.sync()
    gc.collect()
    assert dev.resets == 1
    assert open_fds() == before


def test_get_vring_base_stops_and_restart_resumes(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, _):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        assert echo(dq, ram, b"a") == b"A"
        base = fe.get_vring_base(0)
        assert base == 1
        # Stopped: a kick is not served.
        src = ram.alloc(1)
        dq.ring.add([(src, 1)], [(ram.alloc(8), 8)], token=0)
        dq.kick()
        assert not dq.wait_call(0.2)
        assert dev.processed == 1
        # Restart from the base, as QEMU does: the pending chain is served.
        fe.set_vring_base(0, base)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        os.close(dq.kick_fd)
        dq.kick_fd = kick
        fe.set_vring_kick(0, kick)
        assert dq.wait_call()
        assert dev.processed == 2
        assert dev.started == [0, 0]
        dq.close()
    ram.close()


def test_reply_ack_success_and_failure(lt: LoopThread) -> None:
    dev = EchoDevice()
    with session_pair(dev, lt) as (fe, session):
        fe.negotiate()
        assert fe.reply_ack
        fe.set_vring_num(0, 8)           # acked with 0
        with pytest.raises(FrontendError, match="ack"):
            fe.set_vring_num(0, 7)       # not a power of two: non-zero ack
        with pytest.raises(FrontendError, match="ack"):
            fe.set_vring_num(5, 8)       # queue index out of range
        lt.sync()
        assert not session.closed        # the session goes on
        assert fe.get_queue_num() == 2


def test_without_reply_ack_a_bad_request_drops_only_that_connection(lt: LoopThread) -> None:
    dev = EchoDevice()
    with session_pair(dev, lt) as (fe, session), session_pair(dev, lt) as (fe2, session2):
        fe.negotiate(protocol_features=0)
        fe2.negotiate(protocol_features=0)
        fe.set_vring_num(9, 8)           # no ack: the back-end drops the connection
        lt.sync()
        assert session.closed
        with pytest.raises(TransportError):
            fe.get_features()
        assert not session2.closed
        assert fe2.get_queue_num() == 2


def test_requests_before_set_owner_are_refused(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        fe.set_protocol_features(PF.REPLY_ACK.mask)
        with pytest.raises(FrontendError):
            fe.set_mem_table([(ram.region, ram.fd)])
        assert len(session.memory) == 0
        fe.set_owner()
        fe.set_mem_table([(ram.region, ram.fd)])
        lt.sync()
        assert len(session.memory) == 1
    ram.close()


def test_features_not_offered_are_refused(lt: LoopThread) -> None:
    with session_pair(EchoDevice(), lt) as (fe, _):
        fe.negotiate(features=0)
        with pytest.raises(FrontendError):
            fe.set_features(1 << 63)


def test_protocol_features_are_masked_to_what_both_support(lt: LoopThread) -> None:
    with session_pair(EchoDevice(), lt) as (fe, session):
        fe.set_protocol_features(PF.REPLY_ACK.mask | PF.PAGEFAULT.mask | PF.MQ.mask)
        lt.sync()
        assert session.protocol_features == PF.REPLY_ACK.mask | PF.MQ.mask


def test_overlapping_and_unmappable_regions_are_refused(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        fe.negotiate()
        overlap = MemoryRegion(ram.region.guest_phys_addr + 4096, 4096, 0x1000, 0)
        with pytest.raises(FrontendError):
            fe.set_mem_table([(ram.region, ram.fd), (overlap, ram.fd)])
        too_big = MemoryRegion(0, RAM * 4, 0x10_0000_0000, 0)
        with pytest.raises(FrontendError):
            fe.set_mem_table([(too_big, ram.fd)])
        assert len(session.memory) == 0
        fe.set_mem_table([(ram.region, ram.fd)])
        assert len(session.memory) == 1
        with pytest.raises(FrontendError):
            fe.add_mem_reg(overlap, ram.fd)
        extra = GuestRam(8192, gpa=RAM * 2)
        fe.add_mem_reg(extra.region, extra.fd)
        assert len(session.memory) == 2
        fe.rem_mem_reg(extra.region)
        assert len(session.memory) == 1
        with pytest.raises(FrontendError):
            fe.rem_mem_reg(extra.region)
        extra.close()
    ram.close()


def test_ring_addresses_outside_memory_are_refused(lt: LoopThread) -> None:
    ram = GuestRam(RAM)
    with session_pair(EchoDevice(), lt) as (fe, session):
        start(fe, ram)
        fe.set_vring_num(0, 8)
        fe.set_vring_addr(0, RingAddresses(0x1000, 0x2000, 0x3000))  # not user addresses
        kick = os.eventfd(0)
        try:
            with pytest.raises(FrontendError):
                fe.set_vring_kick(0, kick)
        finally:
            os.close(kick)
        assert not session.vrings[0].started
    ram.close()


def test_bad_ring_fails_only_that_ring(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        start(fe, ram)
        fe.set_status(0xF)
        dq0 = setup_queue(fe, ram, 0, 8)
        dq1 = setup_queue(fe, ram, 1, 8)
        # A descriptor pointing outside guest memory.
        dq0.ring.add([(RAM * 8, 16)], [], token=None)
        dq0.kick()
        for _ in range(50):
            lt.sync()
            if dq0.err_signalled():
                break
        assert dq0.err_signalled()
        assert session.vrings[0].failed
        assert fe.get_status() & 0x40  # NEEDS_RESET
        assert 0 in dev.stopped
        assert echo(dq1, ram, b"ok") == b"OK"
        dq0.close()
        dq1.close()
    ram.close()


def test_device_virtio_error_fails_ring(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        dev.raise_in_process = DescriptorError("hostile")
        dq.kick()
        lt.sync()
        assert session.vrings[0].failed
        assert not session.closed
        dq.close()
    ram.close()


def test_malformed_messages_do_not_kill_the_session_with_reply_ack(lt: LoopThread) -> None:
    with session_pair(EchoDevice(), lt) as (fe, session):
        fe.negotiate()
        ch = fe.channel
        need = int(m.HeaderFlags.NEED_REPLY | m.VERSION)
        # Wrong size for SET_VRING_NUM.
        ch.send_frame(FR.SET_VRING_NUM, need, b"\0" * 5)
        assert struct.unpack("=Q", ch.recv_frame(2).payload)[0] != 0
        # Unknown request code.
        ch.send_frame(200, need, b"")
        assert struct.unpack("=Q", ch.recv_frame(2).payload)[0] != 0
        # An fd where none belongs: closed by the back-end.
        r, w = os.pipe()
        ch.send_frame(FR.SET_OWNER, need, b"", [r])
        os.close(r)
        assert struct.unpack("=Q", ch.recv_frame(2).payload)[0] != 0
        os.close(w)
        assert fe.get_queue_num() == 2
        assert not session.closed


def test_framing_errors_drop_the_connection(lt: LoopThread) -> None:
    for header in (struct.pack("=III", 1, 0x2, 0),          # version 2
                   struct.pack("=III", 1, 0x1, 1 << 20)):    # 1 MiB payload
        with session_pair(EchoDevice(), lt) as (fe, session):
            sock = fe.channel.sock  # type: ignore[attr-defined]
            sock.setblocking(True)
            sock.sendall(header)
            for _ in range(20):
                lt.sync()
                if session.closed:
                    break
            assert session.closed


def test_disconnect_mid_session_cleans_up(lt: LoopThread) -> None:
    before = open_fds()
    dev = EchoDevice()
    ram = GuestRam(RAM)
    a, b = socket.socketpair()
    from vvu_runtime.vhost_user.server import backend_channel

    def make() -> BackendSession:
        s = BackendSession(backend_channel(a, "t"), dev, loop=lt.loop)
        s.start()
        return s

    session = lt.call(make)
    fe = VhostUserFrontend.from_socket(b)
    start(fe, ram)
    dq = setup_queue(fe, ram, 0, 8)
    setup_queue(fe, ram, 1, 8).close()
    fe.close()
    for _ in range(20):
        lt.sync()
        if session.closed:
            break
    assert session.closed
    assert sorted(dev.stopped) == [0, 1]
    assert dev.resets == 1
    dq.close()
    del dq  # its ring views keep the local mapping (and mmap's fd) alive
    ram.close()
    gc.collect()
    assert open_fds() == before


def test_inflight_fd_round_trip_and_resubmission(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, _session):
        start(fe, ram)
        info, fd = fe.get_inflight_fd(2, 8)
        assert info.mmap_size > 0 and info.num_queues == 2 and info.queue_size == 8
        fe.set_inflight_fd(info, fd)
        dq = setup_queue(fe, ram, 0, 8)
        dev.hold = True
        for i in range(3):
            dq.ring.add([(ram.alloc(4), 4)], [(ram.alloc(8), 8)], token=i)
        dq.kick()
        for _ in range(20):
            lt.sync()
            if dev.processed == 3:
                break
        assert dev.processed == 3
    # The back-end "crashed" with 3 requests in flight. A new connection gets the
    # same inflight fd back and must see them again, in order.
    dev2 = EchoDevice()
    with session_pair(dev2, lt) as (fe2, _session2):
        start(fe2, ram)
        fe2.set_inflight_fd(info, fd)
        base = 3  # QEMU restores last_avail_idx from its own used idx + inflight
        fe2.set_vring_num(0, 8)
        fe2.set_vring_base(0, base)
        fe2.set_vring_addr(0, RingAddresses(ram.uva(dq.ring.desc_addr),
                                            ram.uva(dq.ring.avail_addr),
                                            ram.uva(dq.ring.used_addr)))
        fe2.set_vring_call(0, dq.call_fd)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        fe2.set_vring_kick(0, kick)
        assert dq.wait_call()
        done = dq.ring.get_used()
        assert [t for t, _ in done] == [0, 1, 2]
        assert dev2.processed == 3
        os.close(kick)
    os.close(fd)
    dq.close()
    ram.close()


def test_dirty_log_records_device_writes(lt: LoopThread) -> None:
    ram = GuestRam(RAM)
    log_size = RAM // 4096 // 8
    log_fd = os.memfd_create("log")
    os.ftruncate(log_fd, log_size)
    with session_pair(EchoDevice(), lt) as (fe, _):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        fe.set_log_base(log_size, 0, log_fd)
        fe.set_features(fe.features | m.VHOST_F_LOG_ALL)
        dst_page = 0x80
        src = ram.alloc(4)
        ram.view(src, 4)[:] = b"dirt"
        dst = dst_page * 4096
        dq.ring.add([(src, 4)], [(dst, 16)], token=dst)
        dq.kick()
        assert dq.wait_call()
        dq.ring.get_used()
        bitmap = os.pread(log_fd, log_size, 0)
        assert bitmap[dst_page // 8] & (1 << (dst_page % 8))
        dq.close()
    os.close(log_fd)
    ram.close()


def test_config_change_goes_over_the_backend_channel(lt: LoopThread) -> None:
    with session_pair(EchoDevice(), lt) as (fe, session):
        fe.negotiate()
        fe.set_backend_req_fd()
        results: list[bool] = []
        t = threading.Thread(target=lambda: results.append(lt.call(session.config_changed)))
        t.start()
        msg = fe.recv_backend_request(timeout=5)
        assert msg.request is m.BackendRequest.CONFIG_CHANGE_MSG
        assert msg.need_reply  # REPLY_ACK negotiated
        t.join(5)
        assert results == [True]


def test_polling_ring_without_kick_fd(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, _):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        fe.set_vring_kick(0, None)   # NOFD: poll
        src = ram.alloc(2)
        ram.view(src, 2)[:] = b"po"
        dst = ram.alloc(8)
        dq.ring.add([(src, 2)], [(dst, 8)], token=dst)
        assert dq.wait_call()
        assert dq.ring.get_used() == [(dst, 2)]
        dq.close()
    ram.close()


def test_reset_device_stops_rings_and_resets(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        fe.reset_device()
        lt.sync()
        assert dev.resets == 1
        assert dev.stopped == [0]
        assert session.state is SessionState.NEGOTIATING
        dq.close()
    ram.close()


def test_iotlb_is_refused_with_failure(lt: LoopThread) -> None:
    with session_pair(EchoDevice(), lt) as (fe, session):
        fe.negotiate()
        msg = fe.request(FR.IOTLB_MSG, m.Iotlb(0, 4096, 0, 3, m.IotlbType.UPDATE))
        assert msg is not None and msg.get(m.U64).value != 0
        assert not session.closed


def test_get_config_failure_is_an_empty_reply(lt: LoopThread) -> None:
    class NoConfig(EchoDevice):
        def get_config(self, offset: int, size: int) -> bytes:
            raise m.PayloadValueError("nope")

    with session_pair(NoConfig(), lt) as (fe, session):
        fe.negotiate()
        with pytest.raises(FrontendError, match="empty"):
            fe.get_config(0, 4)
        assert not session.closed


def test_kick_fd_replaced_while_running(lt: LoopThread) -> None:
    ram = GuestRam(RAM)
    with session_pair(EchoDevice(), lt) as (fe, _):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        new = os.eventfd(0, os.EFD_NONBLOCK)
        fe.set_vring_kick(0, new)
        os.close(dq.kick_fd)
        dq.kick_fd = new
        assert echo(dq, ram, b"x") == b"X"
        dq.close()
    ram.close()


def test_call_notifications_follow_event_idx(lt: LoopThread) -> None:
    ram = GuestRam(RAM)
    with session_pair(EchoDevice(), lt) as (fe, _):
        start(fe, ram)
        dq = setup_queue(fe, ram, 0, 8)
        assert dq.ring.event_idx
        assert echo(dq, ram, b"1") == b"1"
        dq.ring.disable_interrupts()
        src = ram.alloc(1)
        dq.ring.add([(src, 1)], [(ram.alloc(4), 4)], token=0)
        dq.kick()
        assert not dq.wait_call(0.3)
        assert select.select([dq.call_fd], [], [], 0)[0] == []
        dq.close()
    ram.close()


def test_transport_without_fd_passing(lt: LoopThread) -> None:
    """The seam the VVU transport uses: no fds in messages, resources by name."""
    from vvu_runtime.vhost_user.server import backend_channel
    from vvu_runtime.vhost_user.transport import SocketTransport, UnixChannel
    from vvu_runtime.virtio.memory import MappedRegion, map_fd

    ram = GuestRam(RAM)

    class Fdless(SocketTransport):
        passes_fds = False

        def map_region(self, region: MemoryRegion, fd: int | None) -> MappedRegion:
            assert fd is None
            return map_fd(region, ram.fd)  # "the BAR"

    class FdlessChannel(UnixChannel):
        @property
        def carries_fds(self) -> bool:
            return False

    a, b = socket.socketpair()
    dev = EchoDevice()

    def make() -> BackendSession:
        ch = backend_channel(a, "vvu")
        s = BackendSession(FdlessChannel(ch.sock, limit_for=ch.limit_for), dev,
                           loop=lt.loop, transport=Fdless())
        s.start()
        return s

    session = lt.call(make)
    fe = VhostUserFrontend.from_socket(b)
    fe.negotiate()
    assert not fe.protocol_features & PF.INFLIGHT_SHMFD.mask
    fe.request(FR.SET_MEM_TABLE, m.MemoryTable((ram.region,)))   # no fds
    lt.sync()
    assert len(session.memory) == 1
    fe.set_vring_num(0, 8)
    fe.set_vring_kick(0, None)
    lt.sync()
    fe.close()
    lt.call(session.close)
    ram.close()


def test_memory_table_replaced_while_running_keeps_rings_going(lt: LoopThread) -> None:
    dev = EchoDevice()
    ram = GuestRam(RAM)
    with session_pair(dev, lt) as (fe, session):
        start(fe, ram)
        info, fd = fe.get_inflight_fd(2, 8)
        fe.set_inflight_fd(info, fd)
        os.close(fd)
        dq = setup_queue(fe, ram, 0, 8)
        assert echo(dq, ram, b"one") == b"ONE"
        fe.set_mem_table([(ram.region, ram.fd)])        # same RAM, new mapping
        assert echo(dq, ram, b"two") == b"TWO"
        extra = GuestRam(8192, gpa=RAM * 2)
        fe.add_mem_reg(extra.region, extra.fd)          # hot-added region
        assert echo(dq, ram, b"three") == b"THREE"
        assert fe.get_vring_base(0) == 3
        assert not session.vrings[0].failed
        dq.close()
        extra.close()
    ram.close()


def test_requests_need_their_protocol_feature(lt: LoopThread) -> None:
    """RESET_DEVICE, ADD_MEM_REG, GET_CONFIG are refused unless their feature was
    negotiated (RESET_DEVICE, CONFIGURE_MEM_SLOTS, CONFIG), and work once it is."""
    ram = GuestRam(RAM)
    dev = EchoDevice()
    with session_pair(dev, lt) as (fe, session):
        fe.negotiate(protocol_features=PF.REPLY_ACK.mask)
        with pytest.raises(FrontendError, match="ack"):
            fe.reset_device()
        with pytest.raises(FrontendError, match="ack"):
            fe.request(FR.ADD_MEM_REG, m.SingleRegion(ram.region), [ram.fd])
        with pytest.raises(FrontendError):
            fe.get_config(0, 4)
        lt.sync()
        assert dev.resets == 0 and len(session.memory) == 0
    with session_pair(dev, lt) as (fe, session):
        fe.negotiate(protocol_features=PF.REPLY_ACK.mask | PF.RESET_DEVICE.mask
                     | PF.CONFIGURE_MEM_SLOTS.mask | PF.CONFIG.mask)
        fe.reset_device()
        fe.request(FR.ADD_MEM_REG, m.SingleRegion(ram.region), [ram.fd])
        assert fe.get_config(0, 4) == bytes(range(4))
        lt.sync()
        assert dev.resets >= 1 and len(session.memory) == 1
    ram.close()
