"""One consumer session relayed to a stock back-end: messages and fds translated.

:class:`ProxySession` sits between a :class:`~vvu_runtime.driver.transport.VvuChannel`
(the consumer's messages, tunnelled without fds) and a UNIX socket to the
back-end (a normal vhost-user connection with SCM_RIGHTS). Front-end requests
go to the back-end with the fds the back-end expects, rebuilt from what the
VVU function offers:

========================  ====================================================
request                   what the back-end gets
========================  ====================================================
SET_MEM_TABLE,            per region, a file mapping the shared-memory BAR
ADD_MEM_REG               (``VvuDriver.shared_memory_file``), ``mmap_offset``
                          rewritten to the region's place in that file (the
                          BAR offset is the region's ``mmap_offset``,
                          docs/vvu-abi.md); REM_MEM_REG rewritten the same way
SET_VRING_KICK            the MSI-X eventfd of the queue's kick notification
                          itself (no relay); without one (poll mode) an
                          eventfd the proxy signals every ``poll_interval``
SET_VRING_CALL/ERR,       an eventfd of the proxy, relayed to the call/err/log
SET_LOG_FD                doorbell (or the doorbell companion) when signalled
SET_BACKEND_REQ_FD        one end of a socketpair; back-end requests on it go
                          to txq, the consumer's replies (rxq) come back on it
SET_PROTOCOL_FEATURES     masked to :data:`PROXY_PROTOCOL_FEATURES`, plus
                          INFLIGHT_SHMFD when the back-end offers it
========================  ====================================================

Before the first ring of a session starts (its SET_VRING_KICK), the proxy
sends SET_INFLIGHT_FD itself, from the :class:`InflightStore` of the link: a
memfd it keeps across back-end restarts, so that a restarted back-end resumes
the requests the consumer's rings still have in flight (the consumer cannot
do it: the tunnel masks INFLIGHT_SHMFD).

Back-end replies go to txq in request order; a GET_PROTOCOL_FEATURES reply is
masked. fds never cross the tunnel: a reply or back-end request that carries
one, a reply nobody asked for, a back-end request that needs a masked
feature, and anything the message table refuses are a :class:`BackendFault`:
the session ends (the link resets, the consumer reconnects), other links go
on. States: :class:`RelayState`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fcntl
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vvu_runtime.driver.errors import DriverError
from vvu_runtime.driver.pci import BarFile
from vvu_runtime.driver.transport import VvuChannel, VvuTransport
from vvu_runtime.fds import close_fds, eventfd_signal, eventfd_take
from vvu_runtime.proxy.errors import BackendFault, TunnelFault
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import (
    ConnectionClosed,
    ProtocolError,
    TransportError,
    VhostUserError,
)
from vvu_runtime.vhost_user.messages import BackendRequest as BR
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.transport import Frame, Notifier, NotifierKind, UnixChannel
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.inflight import inflight_region_size
from vvu_runtime.virtio.memory import MemoryRegion

log = logging.getLogger(__name__)

#: Protocol features relayed between consumer and back-end: what the tunnel
#: carries (docs/vvu-abi.md) and the proxy translates.
PROXY_PROTOCOL_FEATURES = m.protocol_mask(
    PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS, PF.NET_MTU, PF.RARP,
)
#: Front-end requests the proxy does not relay (the tunnel refuses them first;
#: INFLIGHT is the proxy's own business).
REFUSED_FRONTEND = frozenset({
    FR.SET_LOG_BASE, FR.GET_INFLIGHT_FD, FR.SET_INFLIGHT_FD, FR.GPU_SET_SOCKET,
    FR.POSTCOPY_ADVISE, FR.POSTCOPY_LISTEN, FR.POSTCOPY_END, FR.VRING_KICK,
    FR.SET_VRING_ENDIAN, FR.CREATE_CRYPTO_SESSION, FR.CLOSE_CRYPTO_SESSION,
    FR.GET_SHARED_OBJECT, FR.SET_DEVICE_STATE_FD, FR.CHECK_DEVICE_STATE, FR.GET_SHMEM_CONFIG,
})
#: Back-end requests that need a feature the proxy masks.
REFUSED_BACKEND: dict[BR, str] = {
    BR.VRING_HOST_NOTIFIER_MSG: "HOST_NOTIFIER",
    BR.VRING_CALL: "INBAND_NOTIFICATIONS",
    BR.VRING_ERR: "INBAND_NOTIFICATIONS",
    BR.SHARED_OBJECT_ADD: "SHARED_OBJECT",
    BR.SHARED_OBJECT_REMOVE: "SHARED_OBJECT",
    BR.SHARED_OBJECT_LOOKUP: "SHARED_OBJECT",
    BR.SHMEM_MAP: "SHMEM",
    BR.SHMEM_UNMAP: "SHMEM",
    BR.MEM_READ: "SHMEM",
}
#: How often a back-end's kick eventfd is signalled when the queue has no MSI-X
#: vector (poll mode): stock back-ends wait for kicks, they do not poll.
POLL_INTERVAL = 0.001

_REPLY = int(m.HeaderFlags.REPLY)
_NEED_REPLY = int(m.HeaderFlags.NEED_REPLY)
_VRING_FILE = struct.Struct("=Q")
_NOTIFIER_KIND = {FR.SET_VRING_CALL: NotifierKind.CALL, FR.SET_VRING_ERR: NotifierKind.ERR}


class _BackendGone(Exception):
    """The back-end's socket is closed (raised inside the relay only)."""


class RelayState(enum.Enum):
    RELAYING = "relaying"
    CLOSED = "closed"


class EndCause(enum.Enum):
    """Why a session ended: the link decides from it whether the inflight area stays."""

    FRONTEND = "the consumer went away"          # or the endpoint ended the session
    BACKEND_GONE = "the back-end hung up"
    BACKEND_FAULT = "bad input from the back-end"
    TUNNEL_FAULT = "a message the proxy cannot translate"


def _request_name(code: int) -> str:
    request = m.Direction.FRONTEND.code(code)
    return request.name if isinstance(request, enum.IntEnum) else f"request {code}"


# --------------------------------------------------------------------------- inflight


@dataclass(frozen=True, slots=True)
class InflightArea:
    """A sealed memfd laid out for ``num_queues`` queues of ``queue_size``."""

    fd: int
    size: int
    num_queues: int
    queue_size: int
    packed: bool


class InflightStore:
    """The inflight area of one link, kept across back-end restarts.

    The layout is libvhost-user's (``virtio.inflight``), so the proxy makes the
    area itself instead of asking the back-end (GET_INFLIGHT_FD): a fresh, zeroed
    area is what every back-end initialises on SET_INFLIGHT_FD.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.area: InflightArea | None = None
        #: Areas made so far (a restart that kept one does not count).
        self.made = 0

    def get(self, num_queues: int, queue_size: int, packed: bool) -> InflightArea:
        area = self.area
        if area is not None and (area.num_queues, area.queue_size, area.packed) == (
                num_queues, queue_size, packed):
            return area
        self.discard()
        size = inflight_region_size(num_queues, queue_size, packed)
        fd = os.memfd_create(f"vvu-proxy-inflight-{self.name}",
                             os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The back-end maps it: it must never shrink under that mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        self.area = InflightArea(fd, size, num_queues, queue_size, packed)
        self.made += 1
        log.info("%s: inflight area for %d queue(s) of %d entries (%d bytes)", self.name,
                 num_queues, queue_size, size)
        return self.area

    def discard(self) -> None:
        area, self.area = self.area, None
        if area is not None:
            os.close(area.fd)


# --------------------------------------------------------------------------- fd helpers


class CallRelay:
    """An eventfd the back-end signals (call, err, log); each signal rings ``notifier``.

    Read on the loop as soon as it is readable: one wake-up per burst of calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: Notifier) -> None:
        self.loop = loop
        self.notifier = notifier
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.relayed = 0
        loop.add_reader(self.fd, self._fire)

    def _fire(self) -> None:
        if eventfd_take(self.fd):
            self.relayed += 1
            self.notifier.signal()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        self.notifier.close()


class KickTicker:
    """The kick eventfd of a queue without an MSI-X vector: signalled every
    ``interval`` so that a back-end that waits for kicks looks at the ring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._timer: asyncio.TimerHandle | None = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        eventfd_signal(self.fd)
        self._timer = self.loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Outgoing:
    """A translated request: payload and the fds to pass (closed after sending)."""

    payload: bytes
    fds: list[int]


# --------------------------------------------------------------------------- session


class ProxySession:
    """One consumer connection (``channel``) relayed to one back-end connection.

    ``on_end(session, cause)`` is called once, whoever ends the session.
    ``shared_memory`` gives a new fd of the shared-memory BAR per call.
    """

    def __init__(self, channel: VvuChannel, backend: socket.socket, *,
                 inflight: InflightStore, loop: asyncio.AbstractEventLoop,
                 on_end: Callable[[ProxySession, EndCause], None], name: str,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.channel = channel
        channel.keep_replies = True
        self.transport = VvuTransport(channel)
        self.vvu = channel.vvu
        self.backend = UnixChannel(backend, max_payload=m.MAX_PAYLOAD,
                                   limit_for=m.request_limits(m.Direction.FRONTEND, True),
                                   name=f"{name}: back-end")
        self.inflight = inflight
        self.loop = loop
        self.on_end = on_end
        self.name = name
        self.poll_interval = poll_interval
        self.state = RelayState.RELAYING
        self.cause: EndCause | None = None
        #: Consumer requests whose back-end reply is owed, in order.
        self._awaiting: collections.deque[FR] = collections.deque()
        #: Back-end requests whose consumer reply is owed, in order.
        self._backend_awaiting: collections.deque[BR] = collections.deque()
        self._backend_req: UnixChannel | None = None
        self._relays: dict[tuple[NotifierKind, int], CallRelay] = {}
        self._tickers: dict[int, KickTicker] = {}
        self._reading: list[int] = []
        #: Protocol features as sent to the back-end; the back-end's own offer.
        self.protocol = 0
        self.backend_offer = 0
        self.features = 0
        self._queue_num: int | None = None
        self._sizes: dict[int, int] = {}
        self._inflight_sent = False
        self._misaligned_logged = False
        #: Counters (for logs and tests).
        self.to_backend = 0
        self.to_frontend = 0

    # -- life cycle ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.state is RelayState.CLOSED

    def start(self) -> None:
        self.channel.use_loop(self.loop)
        self.backend.use_loop(self.loop)
        self._read(self.channel.fileno(), self._on_frontend)
        self._read(self.backend.fileno(), self._on_backend)
        log.info("%s: consumer connected; relaying to the back-end", self.name)
        self.loop.call_soon(self._on_frontend)  # what came before the reader was set

    def _read(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, callback)
        self._reading.append(fd)

    def close(self) -> None:
        """End the session from outside (the endpoint: the consumer went away)."""
        self._end(EndCause.FRONTEND, None)

    def _end(self, cause: EndCause, reason: str | None) -> None:
        if self.closed:
            return
        self.state = RelayState.CLOSED
        self.cause = cause
        if reason is not None:
            level = logging.INFO if cause is EndCause.BACKEND_GONE else logging.ERROR
            log.log(level, "%s: %s: %s; resetting this link", self.name, cause.value, reason)
        for fd in self._reading:
            self.loop.remove_reader(fd)
        self._reading.clear()
        for relay in self._relays.values():
            relay.close()
        self._relays.clear()
        for ticker in self._tickers.values():
            ticker.close()
        self._tickers.clear()
        if self._backend_req is not None:
            self._backend_req.close()
            self._backend_req = None
        self.backend.close()
        self.channel.close()
        log.info("%s: session ended (%d messages to the back-end, %d back)", self.name,
                 self.to_backend, self.to_frontend)
        self.on_end(self, cause)

    def has_protocol(self, feature: PF) -> bool:
        return bool(self.protocol & feature.mask)

    # -- consumer -> back-end ----------------------------------------------------------------
    def _on_frontend(self) -> None:
        """rxq: front-end requests to the back-end, consumer replies to its channel."""
        while not self.closed:
            try:
                frame = self.channel.recv_frame_nowait()
                self._relay_consumer_replies()
                if frame is None:
                    return
                self._from_frontend(frame)
            except ConnectionClosed:
                return  # the endpoint closed the channel: it ends the session too
            except _BackendGone as exc:
                self._end(EndCause.BACKEND_GONE, str(exc))
            except (ProtocolError, TransportError, TunnelFault) as exc:
                # A message the device model let through but we cannot take.
                self._end(EndCause.TUNNEL_FAULT, str(exc))
            except BackendFault as exc:
                self._end(EndCause.BACKEND_FAULT, str(exc))
            except Exception:
                log.exception("%s: internal error relaying to the back-end", self.name)
                self._end(EndCause.TUNNEL_FAULT, "internal error")

    def _to_backend(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        try:
            self.backend.send_frame(request, flags, payload, fds)
        except ConnectionClosed as exc:
            raise _BackendGone(str(exc)) from exc
        except TransportError as exc:
            # It does not read what we send (a backlog past the bound).
            raise BackendFault(str(exc)) from exc

    def _from_frontend(self, frame: Frame) -> None:
        try:
            msg = m.decode_message(m.Direction.FRONTEND, frame.request, frame.flags,
                                   frame.payload, frame.fds, check_fds=False)
        except ProtocolError as exc:
            frame.close_fds()
            raise TunnelFault(f"front-end message: {exc}") from exc
        request = FR(msg.request)
        token = msg.take_fd()  # "the consumer gave an eventfd" (driver.transport)
        msg.close_fds()
        try:
            if request in REFUSED_FRONTEND:
                raise TunnelFault(f"{request.name} is not relayed (it needs a protocol "
                                  "feature the proxy masks)")
            out = self._translate(request, msg, frame.payload, token is not None)
        finally:
            if token is not None:
                os.close(token)
        try:
            if request is FR.SET_VRING_KICK:
                self._send_inflight()
            if m.FRONTEND_TABLE[request].reply is m.Reply.ALWAYS or (
                    msg.flags & _NEED_REPLY and self.has_protocol(PF.REPLY_ACK)):
                self._awaiting.append(request)
            self._to_backend(request, msg.flags, out.payload, out.fds)
            self.to_backend += 1
        finally:
            close_fds(out.fds)

    def _translate(self, request: FR, msg: m.Message, raw: bytes, had_fd: bool) -> Outgoing:
        """The payload and fds the back-end gets for ``msg`` (see the module table)."""
        plain = Outgoing(raw, [])
        if request is FR.SET_PROTOCOL_FEATURES:
            value = msg.get(m.U64).value & PROXY_PROTOCOL_FEATURES
            if self.backend_offer & PF.INFLIGHT_SHMFD.mask:
                value |= PF.INFLIGHT_SHMFD.mask  # the proxy's own (module docstring)
            self.protocol = value
            return Outgoing(m.U64(value).pack(), [])
        if request is FR.SET_FEATURES:
            self.features = msg.get(m.U64).value
        elif request is FR.SET_VRING_NUM:
            state = msg.get(m.VringState)
            self._sizes[state.index] = state.num
        elif request in (FR.RESET_DEVICE, FR.RESET_OWNER):
            # The consumer starts over: nothing of the old rings is in flight.
            self.inflight.discard()
            self._inflight_sent = False
        elif request is FR.SET_MEM_TABLE:
            regions = msg.get(m.MemoryTable).regions
            fds: list[int] = []
            try:
                moved = tuple(self._place(r, fds) for r in regions)
            except BaseException:
                close_fds(fds)
                raise
            return Outgoing(m.MemoryTable(moved).pack(), fds)
        elif request in (FR.ADD_MEM_REG, FR.REM_MEM_REG):
            region = msg.get(m.SingleRegion).region
            fds = []
            try:
                moved_one = self._place(region, fds)
            except BaseException:
                close_fds(fds)
                raise
            if request is FR.REM_MEM_REG:
                close_fds(fds)  # REM_MEM_REG carries no fd
            return Outgoing(m.SingleRegion(moved_one).pack(), fds)
        elif request is FR.SET_VRING_KICK:
            return self._kick(msg.get(m.VringFile))
        elif request in _NOTIFIER_KIND:
            return self._call(_NOTIFIER_KIND[request], msg.get(m.VringFile), had_fd)
        elif request is FR.SET_LOG_FD:
            return self._relay(NotifierKind.LOG, 0, plain.payload)
        elif request is FR.SET_BACKEND_REQ_FD:
            return self._backend_channel()
        return plain

    def _place(self, region: MemoryRegion, fds: list[int]) -> MemoryRegion:
        """``region`` as the back-end maps it: a file of the BAR, its offset there."""
        try:
            region.validate()
        except VirtioError as exc:
            raise TunnelFault(f"memory region {region}: {exc}") from exc
        try:
            shm: BarFile = self.vvu.shared_memory_file()
        except DriverError as exc:
            raise TunnelFault(f"memory region {region}: no file of the shared memory to "
                              f"hand over: {exc}") from exc
        fds.append(shm.fd)
        if region.mmap_offset + region.memory_size > shm.size:
            raise TunnelFault(f"memory region {region} ends past the {shm.size:#x}-byte "
                              "shared memory")
        offset = shm.offset + region.mmap_offset
        if offset % mmap.PAGESIZE and not self._misaligned_logged:
            self._misaligned_logged = True
            log.warning("%s: memory region at file offset %#x is not page-aligned: "
                        "back-ends that map at mmap_offset (libvhost-user, rust-vmm) "
                        "refuse it", self.name, offset)
        return MemoryRegion(region.guest_phys_addr, region.memory_size,
                            region.userspace_addr, offset)

    def _kick(self, vf: m.VringFile) -> Outgoing:
        index = vf.index
        old = self._tickers.pop(index, None)
        if old is not None:
            old.close()
        fd: int | None = None
        if not vf.nofd:
            try:
                fd = self.vvu.kick_eventfd(index)
            except DriverError as exc:
                log.error("%s: kick notification %d: %s", self.name, index, exc)
        if fd is None:
            # No vector (poll mode), or the consumer asked for polling: a stock
            # back-end waits for kicks, so it gets a ticking eventfd.
            ticker = self._tickers[index] = KickTicker(self.loop, self.poll_interval)
            fd = ticker.fd
        return Outgoing(_VRING_FILE.pack(index), [os.dup(fd)])

    def _call(self, kind: NotifierKind, vf: m.VringFile, had_fd: bool) -> Outgoing:
        if vf.nofd or not had_fd:
            old = self._relays.pop((kind, vf.index), None)
            if old is not None:
                old.close()
            return Outgoing(_VRING_FILE.pack(vf.index | m.VRING_NOFD), [])
        return self._relay(kind, vf.index, _VRING_FILE.pack(vf.index))

    def _relay(self, kind: NotifierKind, index: int, payload: bytes) -> Outgoing:
        old = self._relays.pop((kind, index), None)
        if old is not None:
            old.close()
        # The token only says "there was an eventfd"; the transport looks the
        # doorbell up by queue (and takes the companion path for calls).
        notifier = self.transport.notifier(kind, index, os.eventfd(0, os.EFD_CLOEXEC))
        if notifier is None:
            # No doorbell for this queue: the back-end's signals go nowhere.
            return Outgoing(_VRING_FILE.pack(index | m.VRING_NOFD), []) \
                if kind is not NotifierKind.LOG else Outgoing(payload, [])
        relay = self._relays[kind, index] = CallRelay(self.loop, notifier)
        return Outgoing(payload, [os.dup(relay.fd)])

    def _send_inflight(self) -> None:
        """SET_INFLIGHT_FD before the session's first ring starts (module docstring)."""
        if self._inflight_sent or not self.has_protocol(PF.INFLIGHT_SHMFD):
            return
        if not self._sizes:
            return  # SET_VRING_KICK before SET_VRING_NUM: the back-end refuses it anyway
        queues = self._queue_num or max(self._sizes) + 1
        size = max(self._sizes.values())
        packed = bool(self.features & VirtioFeature.RING_PACKED)
        area = self.inflight.get(queues, size, packed)
        payload = m.Inflight(area.size, 0, area.num_queues, area.queue_size).pack()
        self._to_backend(FR.SET_INFLIGHT_FD, m.VERSION, payload, [area.fd])
        self._inflight_sent = True

    def _backend_channel(self) -> Outgoing:
        if self._backend_req is not None:
            self.loop.remove_reader(self._backend_req.fileno())
            self._reading.remove(self._backend_req.fileno())
            self._backend_req.close()
            self._backend_awaiting.clear()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = UnixChannel(ours, max_payload=m.MAX_PAYLOAD,
                              limit_for=m.request_limits(m.Direction.BACKEND, False),
                              name=f"{self.name}: back-end requests")
        channel.use_loop(self.loop)
        self._backend_req = channel
        self._read(channel.fileno(), self._on_backend_request)
        return Outgoing(b"", [theirs.detach()])

    # -- back-end -> consumer ----------------------------------------------------------------
    def _on_backend(self) -> None:
        """The back-end's main socket: replies, in request order."""
        while not self.closed:
            try:
                frame = self.backend.recv_frame_nowait()
                if frame is None:
                    return
                self._reply_from_backend(frame)
            except (ConnectionClosed, _BackendGone) as exc:
                self._end(EndCause.BACKEND_GONE, str(exc))
            except (ProtocolError, TransportError, BackendFault) as exc:
                self._end(EndCause.BACKEND_FAULT, str(exc))
            except TunnelFault as exc:
                self._end(EndCause.TUNNEL_FAULT, str(exc))
            except Exception:
                log.exception("%s: internal error relaying a back-end reply", self.name)
                self._end(EndCause.BACKEND_FAULT, "internal error")

    def _reply_from_backend(self, frame: Frame) -> None:
        try:
            if frame.fds:
                raise BackendFault(f"{_request_name(frame.request)} reply carries "
                                   f"{len(frame.fds)} fd(s); none can cross the tunnel")
            if not frame.flags & _REPLY:
                raise BackendFault(f"{_request_name(frame.request)} without the REPLY flag on "
                                   "the main socket (back-end requests go on the "
                                   "SET_BACKEND_REQ_FD channel)")
            if not self._awaiting:
                raise BackendFault(f"a reply to {_request_name(frame.request)} that nobody "
                                   "asked for")
            request = self._awaiting.popleft()
            if frame.request != request:
                raise BackendFault(f"a reply to {_request_name(frame.request)} where "
                                   f"{request.name} was owed")
            try:
                _, value = m.decode(m.Direction.FRONTEND, frame.request, frame.flags,
                                    frame.payload, 0, reply=True)
            except ProtocolError as exc:
                raise BackendFault(f"reply: {exc}") from exc
        finally:
            frame.close_fds()
        payload = frame.payload
        if request is FR.GET_PROTOCOL_FEATURES and isinstance(value, m.U64):
            self.backend_offer = value.value
            payload = m.U64(value.value & PROXY_PROTOCOL_FEATURES).pack()
            log.info("%s: the back-end offers protocol features %#x; relayed %#x%s",
                     self.name, value.value, value.value & PROXY_PROTOCOL_FEATURES,
                     "; the proxy keeps its inflight area" if value.value
                     & PF.INFLIGHT_SHMFD.mask else "; no inflight tracking (not offered)")
        elif request is FR.GET_QUEUE_NUM and isinstance(value, m.U64):
            self._queue_num = value.value or None
        try:
            self.channel.send_frame(frame.request, frame.flags, payload)
        except (ConnectionClosed, TransportError) as exc:
            raise TunnelFault(f"txq: {exc}") from exc
        self.to_frontend += 1

    def _on_backend_request(self) -> None:
        """The back-end's request channel (SET_BACKEND_REQ_FD): requests to txq."""
        channel = self._backend_req
        while channel is not None and not self.closed and channel is self._backend_req:
            try:
                frame = channel.recv_frame_nowait()
                if frame is None:
                    return
                self._request_from_backend(frame)
            except ConnectionClosed:
                # The back-end closed its request channel: allowed, nothing more to relay.
                self.loop.remove_reader(channel.fileno())
                self._reading.remove(channel.fileno())
                channel.close()
                self._backend_req = None
                return
            except (ProtocolError, TransportError, BackendFault) as exc:
                self._end(EndCause.BACKEND_FAULT, f"back-end request channel: {exc}")
            except TunnelFault as exc:
                self._end(EndCause.TUNNEL_FAULT, str(exc))
            except Exception:
                log.exception("%s: internal error relaying a back-end request", self.name)
                self._end(EndCause.BACKEND_FAULT, "internal error")

    def _request_from_backend(self, frame: Frame) -> None:
        try:
            if frame.fds:
                raise BackendFault(f"request {frame.request} carries {len(frame.fds)} fd(s); "
                                   "none can cross the tunnel")
            try:
                code, _ = m.decode(m.Direction.BACKEND, frame.request, frame.flags,
                                   frame.payload, 0)
            except ProtocolError as exc:
                raise BackendFault(str(exc)) from exc
        finally:
            frame.close_fds()
        request = BR(code)
        if request in REFUSED_BACKEND:
            raise BackendFault(f"{request.name} needs {REFUSED_BACKEND[request]}, which the "
                               "proxy masks")
        if not self.has_protocol(PF.BACKEND_REQ):
            raise BackendFault(f"{request.name} without BACKEND_REQ negotiated")
        if m.BACKEND_TABLE[request].reply is m.Reply.ALWAYS or (
                frame.flags & _NEED_REPLY and self.has_protocol(PF.REPLY_ACK)):
            self._backend_awaiting.append(request)
        try:
            self.channel.send_frame(frame.request, frame.flags, frame.payload)
        except VhostUserError as exc:
            raise TunnelFault(f"txq: {exc}") from exc

    def _relay_consumer_replies(self) -> None:
        """The consumer's answers to back-end requests (REPLY messages on rxq)."""
        while True:
            frame = self.channel.recv_reply_nowait()
            if frame is None:
                return
            frame.close_fds()
            channel = self._backend_req
            if channel is None or not self._backend_awaiting:
                log.warning("%s: dropping a consumer reply (request %d) no back-end request "
                            "waits for", self.name, frame.request)
                continue
            request = self._backend_awaiting.popleft()
            if frame.request != request:
                log.warning("%s: the consumer answered %d where %s was owed; dropped",
                            self.name, frame.request, request.name)
                continue
            try:
                channel.send_frame(frame.request, frame.flags, frame.payload)
            except VhostUserError as exc:
                raise BackendFault(f"back-end request channel: {exc}") from exc


__all__ = [
    "PROXY_PROTOCOL_FEATURES",
    "CallRelay",
    "EndCause",
    "InflightArea",
    "InflightStore",
    "KickTicker",
    "ProxySession",
    "RelayState",
]
