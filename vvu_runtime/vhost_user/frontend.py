"""A vhost-user front-end: drives any vhost-user back-end over a socket.

Used by tests, ``vvu-probe`` and benchmarks. Synchronous: each request waits for
its reply (or, with REPLY_ACK negotiated, for its ack) before returning.

:class:`VhostUserFrontend` speaks the protocol message by message.
:class:`GuestRam` is a memfd-backed "guest memory" the front-end shares with the
back-end (guest-physical addresses from ``gpa``, front-end user addresses from
``uva``). :class:`DriverQueue` is one ring set up the way QEMU does it (SET_VRING_NUM,
BASE, ADDR, KICK, CALL), driven from the driver side with
:class:`vvu_runtime.virtio.driver_ring.SplitDriverRing`.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import (
    FrontendError,
    ProtocolError,
    TransportError,
)
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.transport import Channel, UnixChannel
from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd
from vvu_runtime.virtio.queue import RingAddresses

DEFAULT_TIMEOUT = 5.0
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_RING_PACKED = 1 << 34


def frontend_channel(sock: socket.socket, name: str = "") -> UnixChannel:
    """A channel on which a front-end reads back-end replies."""
    return UnixChannel(sock, max_payload=m.MAX_PAYLOAD,
                       limit_for=m.request_limits(m.Direction.FRONTEND, True),
                       name=name or "back-end")


class VhostUserFrontend:
    """The front-end end of one vhost-user connection."""

    def __init__(self, channel: Channel, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.channel = channel
        self.timeout = timeout
        self.protocol_features = 0
        self.features = 0
        self.backend_channel: UnixChannel | None = None

    # ------------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT,
                retry_for: float = 0.0) -> VhostUserFrontend:
        """Connect to a back-end listening on ``path`` (retrying for ``retry_for`` s)."""
        deadline = time.monotonic() + retry_for
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise TransportError(f"cannot connect to {os.fspath(path)}: "
                                         f"{exc.strerror or exc}") from exc
                time.sleep(0.05)
        return cls(frontend_channel(sock, os.fspath(path)), timeout=timeout)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT
                    ) -> VhostUserFrontend:
        return cls(frontend_channel(sock), timeout=timeout)

    def close(self) -> None:
        self.channel.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ engine
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features >> PF.REPLY_ACK & 1)

    def request(self, request: FR, payload: m.Payload | None = None,
                fds: Sequence[int] = (), *, ack: bool | None = None) -> m.Message | None:
        """Send ``request``; return its reply (requests that have one), else None.

        With ``ack`` (default: when REPLY_ACK is negotiated) a request without a
        reply of its own is sent with NEED_REPLY and a non-zero ack raises
        :class:`FrontendError`.
        """
        spec = m.FRONTEND_TABLE[request]
        has_reply = spec.reply is m.Reply.ALWAYS or (
            request is FR.SET_LOG_BASE and self.protocol_features >> PF.LOG_SHMFD & 1)
        if ack is None:
            ack = self.reply_ack
        need_reply = ack and not has_reply
        code, flags, data = m.encode(request, payload, need_reply=need_reply)
        self.channel.send_frame(code, flags, data, list(fds))
        if not (has_reply or need_reply):
            return None
        frame = self.channel.recv_frame(self.timeout)
        try:
            msg = m.decode_message(m.Direction.FRONTEND, frame.request, frame.flags,
                                   frame.payload, frame.fds, reply=True)
        except ProtocolError as exc:
            frame.close_fds()
            raise FrontendError(f"{request.name}: malformed reply: {exc}") from exc
        if msg.request != request:
            msg.close_fds()
            raise FrontendError(f"{request.name}: the back-end answered {msg.name}")
        if need_reply:
            msg.close_fds()
            status = msg.get(m.U64).value
            if status:
                raise FrontendError(f"{request.name}: the back-end failed it (ack {status})")
            return None
        return msg

    def _u64(self, request: FR) -> int:
        msg = self.request(request)
        assert msg is not None
        return msg.get(m.U64).value

    # ------------------------------------------------------------------ requests
    def get_features(self) -> int:
        return self._u64(FR.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(FR.SET_FEATURES, m.U64(features))
        self.features = features

    def get_protocol_features(self) -> int:
        return self._u64(FR.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(FR.SET_PROTOCOL_FEATURES, m.U64(features), ack=False)
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(FR.SET_OWNER)

    def reset_owner(self) -> None:
        self.request(FR.RESET_OWNER)

    def reset_device(self) -> None:
        self.request(FR.RESET_DEVICE)

    def get_queue_num(self) -> int:
        return self._u64(FR.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(FR.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, regions: Sequence[tuple[MemoryRegion, int]]) -> None:
        self.request(FR.SET_MEM_TABLE, m.MemoryTable(tuple(r for r, _ in regions)),
                     [fd for _, fd in regions])

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        self.request(FR.ADD_MEM_REG, m.SingleRegion(region), [fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        self.request(FR.REM_MEM_REG, m.SingleRegion(region))

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(FR.SET_VRING_NUM, m.VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(FR.SET_VRING_BASE, m.VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        msg = self.request(FR.GET_VRING_BASE, m.VringState(index, 0))
        assert msg is not None
        return msg.get(m.VringState).num

    def set_vring_addr(self, index: int, addrs: RingAddresses) -> None:
        self.request(FR.SET_VRING_ADDR, m.VringAddr(
            index, m.VRING_F_LOG if addrs.log else 0, addrs.desc, addrs.used, addrs.avail,
            addrs.log_guest_addr))

    def _vring_fd(self, request: FR, index: int, fd: int | None) -> None:
        self.request(request, m.VringFile(index, fd is None), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(FR.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(FR.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(FR.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(FR.SET_VRING_ENABLE, m.VringState(index, int(enable)))

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        msg = self.request(FR.GET_CONFIG, m.ConfigSpace(offset, flags, bytes(size)))
        assert msg is not None
        if isinstance(msg.payload, m.Empty):
            raise FrontendError("GET_CONFIG: the back-end failed it (empty reply)")
        return msg.get(m.ConfigSpace).data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(FR.SET_CONFIG, m.ConfigSpace(offset, flags, bytes(data)))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[m.Inflight, int]:
        """The back-end's inflight area description and its fd (the caller owns it)."""
        msg = self.request(FR.GET_INFLIGHT_FD, m.Inflight(0, 0, num_queues, queue_size))
        assert msg is not None
        info = msg.get(m.Inflight)
        fd = msg.take_fd()
        msg.close_fds()
        if fd is None:
            raise FrontendError("GET_INFLIGHT_FD: no fd in the reply")
        return info, fd

    def set_inflight_fd(self, info: m.Inflight, fd: int) -> None:
        self.request(FR.SET_INFLIGHT_FD, info, [fd])

    def set_log_base(self, size: int, offset: int, fd: int) -> None:
        self.request(FR.SET_LOG_BASE, m.LogArea(size, offset), [fd])

    def set_log_fd(self, fd: int | None) -> None:
        self.request(FR.SET_LOG_FD, m.EMPTY, [] if fd is None else [fd])

    def set_status(self, status: int) -> None:
        self.request(FR.SET_STATUS, m.U64(status))

    def get_status(self) -> int:
        return self._u64(FR.GET_STATUS)

    def set_backend_req_fd(self) -> UnixChannel:
        """Give the back-end a channel for its requests; returns our end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(FR.SET_BACKEND_REQ_FD, m.EMPTY, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = UnixChannel(
            ours, limit_for=m.request_limits(m.Direction.BACKEND, False),
            name="backend channel")
        return self.backend_channel

    def recv_backend_request(self, timeout: float | None = None, status: int = 0
                             ) -> m.Message:
        """Read one back-end request from the channel of :meth:`set_backend_req_fd`;
        answers ``status`` if it asked for a reply. The caller owns the message's fds."""
        ch = self.backend_channel
        if ch is None:
            raise FrontendError("no backend channel (call set_backend_req_fd first)")
        frame = ch.recv_frame(timeout if timeout is not None else self.timeout)
        try:
            msg = m.decode_message(m.Direction.BACKEND, frame.request, frame.flags,
                                   frame.payload, frame.fds)
        except ProtocolError as exc:
            frame.close_fds()
            raise FrontendError(f"malformed back-end request: {exc}") from exc
        if msg.need_reply:
            code, flags, data = m.encode(msg.request, m.U64(status), reply=True)
            ch.send_frame(code, flags, data)
        return msg

    # ------------------------------------------------------------------ negotiation
    def negotiate(self, features: int | None = None, protocol_features: int | None = None
                  ) -> tuple[int, int]:
        """QEMU's init sequence: features, protocol features, SET_OWNER.

        Acks ``features`` (default: everything offered) and ``protocol_features``
        (default: everything offered); returns (offered features, offered protocol).
        """
        offered = self.get_features()
        offered_pf = 0
        if offered & m.VHOST_USER_F_PROTOCOL_FEATURES:
            offered_pf = self.get_protocol_features()
            want = offered_pf if protocol_features is None else protocol_features
            self.set_protocol_features(want & offered_pf)
        self.set_owner()
        want_f = offered if features is None else features
        self.set_features(want_f & offered)
        return offered, offered_pf


class GuestRam:
    """A memfd the front-end shares as guest memory: one memory-table region.

    Sealed against shrinking and growing unless ``sealed`` is False (to check
    that a back-end refuses such memory)."""

    UVA_BASE = 0x7F00_0000_0000

    def __init__(self, size: int, gpa: int = 0, uva: int | None = None,
                 name: str = "vvu-guest-ram", *, sealed: bool = True) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if sealed:
            # As QEMU's memory-backend-memfd does: back-ends refuse RAM that can shrink.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.region = MemoryRegion(gpa, size, self.UVA_BASE + gpa if uva is None else uva, 0)
        self.memory = GuestMemory()
        self.memory.add(map_fd(self.region, self.fd))
        self._next = gpa

    def uva(self, gpa: int) -> int:
        return self.region.userspace_addr + (gpa - self.region.guest_phys_addr)

    def alloc(self, size: int, align: int = 16) -> int:
        """A guest-physical range of ``size`` bytes (bump allocator, never freed)."""
        addr = -(-self._next // align) * align
        if addr + size > self.region.guest_end:
            raise MemoryError(f"guest RAM of {self.region.memory_size} bytes is full")
        self._next = addr + size
        return addr

    def view(self, gpa: int, size: int) -> memoryview:
        return self.memory.translate(gpa, size)

    def close(self) -> None:
        self.memory.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class DriverQueue:
    """One ring set up on the back-end, driven from the driver side."""

    index: int
    ring: Any   # SplitDriverRing[Any]
    kick_fd: int
    call_fd: int
    err_fd: int

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def wait_call(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Wait for the back-end's call notification; True if it came."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if not ready:
            return False
        os.eventfd_read(self.call_fd)
        return True

    def err_signalled(self) -> bool:
        ready, _, _ = select.select([self.err_fd], [], [], 0)
        return bool(ready)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = self.err_fd = -1


def setup_queue(frontend: VhostUserFrontend, ram: GuestRam, index: int, size: int, *,
                base: int = 0, event_idx: bool | None = None, enable: bool = True
                ) -> DriverQueue:
    """Lay out a ring in ``ram`` and configure it on the back-end (QEMU order).

    The ring is packed when RING_PACKED was negotiated (SET_FEATURES), split
    otherwise; ``event_idx`` defaults to whether EVENT_IDX was negotiated.
    ``base`` is SET_VRING_BASE's value; 0 means a fresh ring (for a packed ring it
    is then sent as index 0 with both wrap counters 1, as QEMU does; see
    ``virtio.packed.encode_packed_base``).
    """
    from vvu_runtime.virtio.driver_ring import (
        PackedDriverRing,
        SplitDriverRing,
        split_ring_layout,
    )

    if event_idx is None:
        event_idx = bool(frontend.features & VIRTIO_F_EVENT_IDX)
    ring: Any
    if frontend.features & VIRTIO_F_RING_PACKED:
        start = ram.alloc(16 * size + 8, 4096)
        ring = PackedDriverRing(ram.memory, size, start, start + 16 * size,
                                start + 16 * size + 4, event_idx=event_idx)
        if base == 0:
            from vvu_runtime.virtio.packed import encode_packed_base

            base = encode_packed_base(0, 1, 0, 1)
        addrs = RingAddresses(ram.uva(ring.desc_addr), ram.uva(ring.driver_area),
                              ram.uva(ring.device_area))
    else:
        lay = split_ring_layout(size)
        start = ram.alloc(lay.total + 4, 4096)
        ring = SplitDriverRing(ram.memory, size, start + lay.desc_offset,
                               start + lay.avail_offset, start + lay.used_offset,
                               event_idx=event_idx)
        addrs = RingAddresses(ram.uva(ring.desc_addr), ram.uva(ring.avail_addr),
                              ram.uva(ring.used_addr))
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    dq = DriverQueue(index, ring, kick, call, err)
    frontend.set_vring_num(index, size)
    frontend.set_vring_base(index, base)
    frontend.set_vring_addr(index, addrs)
    frontend.set_vring_kick(index, kick)
    frontend.set_vring_call(index, call)
    frontend.set_vring_err(index, err)
    if enable and frontend.features & m.VHOST_USER_F_PROTOCOL_FEATURES:
        frontend.set_vring_enable(index, True)
    return dq
