"""The VVU transport: a vhost-user back-end session over a VVU device instead of a socket.

The session (``vhost_user.backend.BackendSession``) is written against two seams
(``vhost_user.transport``); here they are implemented without file descriptors:

* :class:`VvuChannel` (the ``Channel``): ``recv_frame*`` return the next message the
  device put on rxq, ``send_frame`` puts one on txq, ``fileno()`` is the rxq MSI-X
  eventfd (in poll mode an eventfd a timer writes when rxq has messages);
* :class:`VvuTransport` (the ``Transport``, ``passes_fds = False``): ``map_region``
  maps the region's window of the shared-memory BAR (BAR offset = the region's
  ``mmap_offset``, docs/vvu-abi.md), ``kick_source`` is the MSI-X eventfd of that
  queue's kick notification, ``notifier`` rings the call/err/log doorbell,
  ``backend_channel`` is :class:`VvuBackendChannel` on the same channel.

**NOFD.** The device model consumes every fd a front-end sends and forwards the
payload unchanged (vvu-abi.md, A.9 of the protocol digest), so memory, log and
back-end channel requests reach the transport with ``fd=None``. For
SET_VRING_KICK/CALL/ERR, though, the session must still tell "the front-end gave
an eventfd" from NOFD ("poll the ring", "do not signal"): the channel hands the
session a token fd (a fresh eventfd, closed by the transport) where the front-end
had one, and nothing for NOFD - the socket transport's meaning of ``fd``. A kick
that cannot reach the appliance (no interrupts: the sysfs path; no vector left)
is turned into NOFD by the channel, so that the session polls that ring.

**Back-end requests** (SET_BACKEND_REQ_FD): the device keeps the front-end's
socket; back-end requests travel on txq without the REPLY flag and the
front-end's acks come back on rxq with it. A request that wants an ack waits for
the first REPLY message on rxq; front-end requests found meanwhile are kept, in
order, for the session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import struct
import time

from vvu_runtime.driver.errors import DriverError
from vvu_runtime.driver.vvu import VvuDriver, drain_eventfd
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import (
    ConnectionClosed,
    FramingError,
    TransportError,
)
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.transport import (
    Channel,
    Frame,
    KickSource,
    Notifier,
    NotifierKind,
    Register32,
    Transport,
)
from vvu_runtime.virtio.errors import GuestMemoryError
from vvu_runtime.virtio.memory import DirtyLog, MappedRegion, MemoryRegion
from vvu_runtime.virtio.vvu_abi import DoorbellKind

log = logging.getLogger(__name__)

_REPLY = int(m.HeaderFlags.REPLY)
_VRING_NOFD = m.VRING_NOFD
_VRING_FD = frozenset({FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR})
#: Poll period of rxq when the function has no interrupts.
POLL_INTERVAL = 0.001


def had_eventfd(request: int, payload: bytes) -> bool:
    """Whether the front-end attached an eventfd to ``request`` (SET_VRING_KICK/CALL/ERR
    without NOFD; the device kept it)."""
    if request not in _VRING_FD or len(payload) != 8:
        return False
    return not struct.unpack_from("=Q", payload)[0] & _VRING_NOFD


def _token() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def _close_token(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


# --------------------------------------------------------------------------- channel


class VvuChannel(Channel):
    """The vhost-user message channel of one front-end connection over a VVU device."""

    def __init__(self, vvu: VvuDriver, *, loop: asyncio.AbstractEventLoop | None = None,
                 name: str = "", poll_interval: float = POLL_INTERVAL,
                 keep_replies: bool = False) -> None:
        self.vvu = vvu
        #: Keep REPLY messages for :meth:`recv_reply_nowait` instead of dropping those
        #: nobody waits for (vvu-proxy relays them to its back-end asynchronously).
        self.keep_replies = keep_replies
        self.name = name or vvu.name
        self.loop = loop
        self.poll_interval = poll_interval
        self._pending: collections.deque[Frame] = collections.deque()
        self._replies: collections.deque[Frame] = collections.deque()
        self._closed = False
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        rx = vvu.rx_eventfd
        self._own_fd = rx is None
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if rx is None else rx
        if self._own_fd and loop is not None:
            self._timer = loop.call_later(poll_interval, self._poll)

    # -- poll mode
    def _poll(self) -> None:
        self._timer = None
        if self._closed or self.loop is None:
            return
        if self.vvu.rx_pending():
            self._wake()
        self._timer = self.loop.call_later(self.poll_interval, self._poll)

    def _wake(self) -> None:
        os.eventfd_write(self._fd, 1)

    # -- receiving
    def _fetch(self) -> None:
        """Move every rxq message into the queues (requests, replies)."""
        drain_eventfd(self._fd)
        try:
            raw = self.vvu.receive()
        except DriverError as exc:
            raise TransportError(f"{self.name}: rxq: {exc}") from exc
        for data in raw:
            try:
                request, flags, payload = m.parse_message(data)
            except FramingError as exc:
                raise FramingError(f"{self.name}: rxq: {exc}") from exc
            if flags & _REPLY:
                self._replies.append(Frame(request, flags, payload))
                continue
            if request == FR.SET_VRING_KICK:
                payload = self._kick_or_poll(payload)
            elif request == FR.SET_VRING_CALL:
                # The device announced the new call set under a new companion peer
                # ID before it forwarded this: ring under that one from now on.
                self._refresh_doorbell_peer()
            fds = [_token()] if had_eventfd(request, payload) else []
            self._pending.append(Frame(request, flags, payload, fds))

    def _kick_or_poll(self, payload: bytes) -> bytes:
        """SET_VRING_KICK of a queue whose kicks cannot reach us (no interrupts, no
        vector for it): tell the session NOFD, so that it polls the ring."""
        if len(payload) != 8:
            return payload  # the codec refuses it
        value = struct.unpack("=Q", payload)[0]
        if value & _VRING_NOFD:
            return payload
        try:
            fd = self.vvu.kick_eventfd(value & m.VRING_IDX_MASK)
        except DriverError as exc:
            log.error("%s: kick notification %d cannot be programmed (%s); polling it",
                      self.name, value & m.VRING_IDX_MASK, exc)
            fd = None
        return payload if fd is not None else struct.pack("=Q", value | _VRING_NOFD)

    def _refresh_doorbell_peer(self) -> None:
        try:
            self.vvu.refresh_doorbell_peer()
        except DriverError as exc:
            log.error("%s: cannot read doorbell_peer (%s); calls keep the last one",
                      self.name, exc)

    def _drop_stray_replies(self) -> None:
        while self._replies:
            frame = self._replies.popleft()
            log.warning("%s: dropping a reply (request %d) nobody waits for", self.name,
                        frame.request)

    def recv_frame_nowait(self) -> Frame | None:
        if self._closed:
            raise ConnectionClosed(f"{self.name}: channel is closed")
        if not self._pending:
            self._fetch()
            if not self.keep_replies:
                self._drop_stray_replies()
        return self._pending.popleft() if self._pending else None

    def recv_reply_nowait(self) -> Frame | None:
        """The oldest REPLY message already fetched (``keep_replies``), or None."""
        if self._closed:
            raise ConnectionClosed(f"{self.name}: channel is closed")
        return self._replies.popleft() if self._replies else None

    def _wait(self, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._own_fd:
            time.sleep(min(self.poll_interval, timeout if timeout is not None else 1.0))
            return
        select.select([self._fd], [], [], timeout)

    def recv_frame(self, timeout: float | None = None) -> Frame:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = self.recv_frame_nowait()
            if frame is not None:
                return frame
            if deadline is not None and time.monotonic() >= deadline:
                raise TransportError(f"{self.name}: no message within {timeout} s")
            self._wait(deadline)

    def recv_reply(self, timeout: float) -> Frame:
        """The next REPLY message (a front-end's answer to a back-end request).

        Front-end requests that arrive meanwhile stay queued for the session, which
        is woken up to read them.
        """
        deadline = time.monotonic() + timeout
        self.flush()  # the request must reach the device before we wait for its answer
        while True:
            if self._closed:
                raise ConnectionClosed(f"{self.name}: channel is closed")
            if not self._replies:
                before = len(self._pending)
                self._fetch()
                if len(self._pending) > before:
                    self._wake()  # the session's reader must look again
            if self._replies:
                return self._replies.popleft()
            if time.monotonic() >= deadline:
                raise TransportError(f"{self.name}: no reply from the front-end within "
                                     f"{timeout} s")
            self._wait(deadline)

    # -- sending
    def send_frame(self, request: int, flags: int, payload: bytes,
                   fds: list[int] | tuple[int, ...] = ()) -> None:
        if self._closed:
            raise ConnectionClosed(f"{self.name}: channel is closed")
        if fds:
            raise TransportError(f"{self.name}: request {request}: file descriptors cannot "
                                 "travel over a VVU device")
        batch = self.loop is not None
        try:
            self.vvu.send(m.format_message(request, flags, payload), kick=not batch)
        except DriverError as exc:
            raise TransportError(f"{self.name}: txq: {exc}") from exc
        if batch and not self._flush_pending:
            # One notify for every message sent in this turn of the loop (the replies
            # to a burst of requests), not one each: a notify is a trapped write.
            self._flush_pending = True
            assert self.loop is not None
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Notify txq for the messages sent so far (no-op if the device does not ask)."""
        self._flush_pending = False
        if self._closed:
            return
        try:
            self.vvu.flush()
        except DriverError as exc:
            log.error("%s: txq notify failed: %s", self.name, exc)

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def carries_fds(self) -> bool:
        return False  # the device consumed them; only NOFD tokens (see the module doc)

    def close(self) -> None:
        if self._closed:
            return
        if self._flush_pending:
            self.flush()  # a reply sent just before the end still goes out
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for frame in self._pending:
            frame.close_fds()
        self._pending.clear()
        self._replies.clear()
        if self._own_fd:
            os.close(self._fd)
        self._fd = -1


class VvuBackendChannel(Channel):
    """The back-end request channel of a VVU connection: txq out, REPLY messages in."""

    def __init__(self, channel: VvuChannel) -> None:
        self.channel = channel
        self._closed = False

    def recv_frame(self, timeout: float | None = None) -> Frame:
        return self.channel.recv_reply(5.0 if timeout is None else timeout)

    def recv_frame_nowait(self) -> Frame | None:
        try:
            return self.channel.recv_reply(0.0)
        except ConnectionClosed:
            raise
        except TransportError:
            return None

    def send_frame(self, request: int, flags: int, payload: bytes,
                   fds: list[int] | tuple[int, ...] = ()) -> None:
        if self._closed:
            raise ConnectionClosed("backend channel is closed")
        self.channel.send_frame(request, flags, payload, fds)

    def fileno(self) -> int:
        return self.channel.fileno()

    @property
    def closed(self) -> bool:
        return self._closed or self.channel.closed

    def close(self) -> None:
        self._closed = True


# --------------------------------------------------------------------------- transport


class VectorKick(KickSource):
    """Kicks of one vhost-user queue: the MSI-X eventfd of its notification (not owned)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        drain_eventfd(self.fd)


class DoorbellNotifier(Notifier):
    """A call/err/log notification: one write to the device's doorbell ``index``."""

    __slots__ = ("_failed", "index", "vvu")

    def __init__(self, vvu: VvuDriver, index: int) -> None:
        self.vvu = vvu
        self.index = index
        self._failed = False

    def signal(self) -> None:
        try:
            self.vvu.doorbell(self.index)
        except DriverError as exc:
            if not self._failed:
                self._failed = True
                log.error("%s: doorbell %d failed: %s", self.vvu.name, self.index, exc)


class CompanionNotifier(Notifier):
    """A call rung through the doorbell companion (driver/companion.py): one write
    QEMU turns into the consumer's call eventfd, vvu-devd not involved."""

    __slots__ = ("_failed", "doorbell", "queue", "vvu")

    def __init__(self, vvu: VvuDriver, queue: int, doorbell: int) -> None:
        self.vvu = vvu
        self.queue = queue
        self.doorbell = doorbell
        self._failed = False

    def register(self) -> Register32 | None:
        return self.vvu.call_register(self.queue)

    def signal(self) -> None:
        try:
            self.vvu.ring_call(self.queue, self.doorbell)
        except DriverError as exc:
            if not self._failed:
                self._failed = True
                log.error("%s: call of queue %d failed: %s", self.vvu.name, self.queue, exc)


class VvuTransport(Transport):
    """Memory, kicks and notifications of a VVU connection (see the module docstring)."""

    passes_fds = False

    def __init__(self, channel: VvuChannel) -> None:
        self.channel = channel
        self.vvu = channel.vvu

    def map_region(self, region: MemoryRegion, fd: int | None) -> MappedRegion:
        _close_token(fd)
        region.validate()
        try:
            window = self.vvu.map_shared_memory(region.mmap_offset, region.memory_size)
        except DriverError as exc:
            raise GuestMemoryError(f"memory region {region}: {exc}") from exc
        return MappedRegion(region, window.view, window.mapping)

    def map_log(self, size: int, offset: int, fd: int | None) -> DirtyLog:
        _close_token(fd)
        raise GuestMemoryError("the dirty log is not tunnelled over VVU (LOG_SHMFD is masked)")

    def backend_channel(self, fd: int | None) -> Channel:
        _close_token(fd)
        return VvuBackendChannel(self.channel)

    def kick_source(self, index: int, fd: int | None) -> KickSource | None:
        _close_token(fd)
        if fd is None:
            return None  # NOFD: the front-end wants the ring polled
        try:
            eventfd = self.vvu.kick_eventfd(index)
        except DriverError as exc:
            log.error("%s: kick notification %d cannot be programmed (%s); polling it",
                      self.vvu.name, index, exc)
            return None
        return None if eventfd is None else VectorKick(eventfd)

    def notifier(self, kind: NotifierKind, index: int, fd: int | None) -> Notifier | None:
        _close_token(fd)
        if fd is None and kind != NotifierKind.LOG:
            return None  # NOFD: the front-end does not want this one signalled
        doorbell = self.vvu.doorbell_index(DoorbellKind(kind), index)
        if kind == NotifierKind.CALL and doorbell is not None and self.vvu.bypasses(index):
            return CompanionNotifier(self.vvu, index, doorbell)
        if doorbell is None:
            log.warning("%s: no %s doorbell for queue %d (the device has %d vhost queues)",
                        self.vvu.name, kind, index, self.vvu.identity.max_vhost_queues)
            return None
        return DoorbellNotifier(self.vvu, doorbell)


__all__ = [
    "CompanionNotifier",
    "DoorbellNotifier",
    "VectorKick",
    "VvuBackendChannel",
    "VvuChannel",
    "VvuTransport",
    "had_eventfd",
]
