"""The back-end side of one vhost-user connection: a message engine driving a device.

:class:`BackendSession` reads front-end requests from a :class:`Channel`, keeps the
connection state (features, memory table, vrings, log, inflight area, backend
channel) and calls the :class:`VhostUserDevice`. It runs on an asyncio event loop:
``loop.add_reader`` on the channel and on every kick source.

States (:class:`SessionState`)::

    AWAITING_OWNER --SET_OWNER--> NEGOTIATING --first ring started--> RUNNING
          ^                           ^   |                               |
          |                           |   +-- RESET_OWNER/RESET_DEVICE ---+
          +------- (a new connection) |                                   |
                                      +------ all rings stopped ----------+
    any state --disconnect / fatal protocol error--> CLOSED

Before SET_OWNER only the discovery requests are accepted (features, protocol
features, queue num, max mem slots, backend channel, config, status); anything
that changes memory or rings is refused. A refused or malformed message is
logged with the device name and the connection; with REPLY_ACK and NEED_REPLY it
is answered with a non-zero ack and the session goes on, a GET_CONFIG gets an
empty reply, otherwise the connection is dropped. Either way other sessions of
the process live on.

On close every ring is stopped (``device.queue_stopped``), ``device.reset()`` is
called, memory, log and inflight area are unmapped and every fd is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vvu_runtime.fds import close_fds
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.errors import (
    FramingError,
    ProtocolError,
    RequestError,
    TransportError,
    VhostUserError,
)
from vvu_runtime.vhost_user.inflight import InflightArea
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.peer_fds import Role, check_eventfd, protect_from_shrinking
from vvu_runtime.vhost_user.transport import (
    Channel,
    Frame,
    NotifierKind,
    SocketTransport,
    Transport,
)
from vvu_runtime.vhost_user.vring import VIRTIO_F_RING_PACKED, QueueFactory, Vring
from vvu_runtime.vhost_user.vring import default_queue_factory as _default_queue_factory
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.memory import DirtyLog, GuestMemory, MappedRegion, MemoryRegion
from vvu_runtime.virtio.queue import RingAddresses

log = logging.getLogger(__name__)

#: Protocol features the session implements for every device.
SESSION_PROTOCOL_FEATURES = m.protocol_mask(
    PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.INFLIGHT_SHMFD, PF.RESET_DEVICE,
    PF.CONFIGURE_MEM_SLOTS, PF.STATUS,
)
#: Protocol features a device may add (the session passes their messages to it).
DEVICE_PROTOCOL_FEATURES = m.protocol_mask(PF.CONFIG, PF.RARP, PF.NET_MTU)

#: Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU and libvhost-user use 509).
MAX_MEM_SLOTS = 509
#: Default poll interval of rings whose kick is NOFD.
POLL_INTERVAL = 0.001
#: How long a back-end request waits for the front-end's ack.
BACKEND_REPLY_TIMEOUT = 1.0
#: Back-end requests whose ack may be outstanding at once (then the front-end is stuck).
MAX_UNANSWERED = 16
#: How long a kick source that stays signalled after a drain is left alone (a
#: semaphore eventfd with a huge count would otherwise wake the loop for ever).
KICK_BACKOFF = 0.002

VIRTIO_STATUS_NEEDS_RESET = 0x40


@dataclass(frozen=True, slots=True)
class WithFds:
    """A handler's reply that carries fds (closed by the session once sent)."""

    payload: m.Payload
    fds: tuple[int, ...]


Reply = m.Payload | WithFds | None


class SessionState(Enum):
    AWAITING_OWNER = "awaiting owner"
    NEGOTIATING = "negotiating"
    RUNNING = "running"
    CLOSED = "closed"


#: Requests accepted before SET_OWNER.
_BEFORE_OWNER = frozenset({
    FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.SET_PROTOCOL_FEATURES, FR.GET_QUEUE_NUM,
    FR.GET_MAX_MEM_SLOTS, FR.SET_BACKEND_REQ_FD, FR.SET_OWNER, FR.GET_CONFIG, FR.GET_STATUS,
    FR.SET_STATUS, FR.RESET_OWNER, FR.RESET_DEVICE,
})


def _device_overrides_config(device: VhostUserDevice) -> bool:
    return type(device).get_config is not VhostUserDevice.get_config


class BackendChannel:
    """The back-end → front-end channel of SET_BACKEND_REQ_FD.

    On its own socket (the socket transport) nothing here ever waits: requests
    go out through the channel's loop-driven sender, and acks are read when the
    socket becomes readable. An ack that does not come within
    :data:`BACKEND_REPLY_TIMEOUT`, or a malformed one, closes this channel
    (only it: the session goes on). A channel that shares the session's
    descriptor (the VVU transport, whose replies are sorted out of the same
    rx queue, not a peer's fd) waits for the ack, bounded by that timeout.
    """

    def __init__(self, channel: Channel, name: str, loop: asyncio.AbstractEventLoop, *,
                 own_fd: bool) -> None:
        self.channel = channel
        self.name = name
        self.loop = loop
        self.own_fd = own_fd
        self._awaiting: deque[tuple[m.BackendRequest, asyncio.TimerHandle]] = deque()
        self._reading = False
        if own_fd:
            channel.use_loop(loop)

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def request(self, request: m.BackendRequest, payload: m.Payload | None = None, *,
                need_reply: bool = False) -> int:
        """Send a request. With ``need_reply`` on an own socket the ack is checked
        later (0 is returned now); on a shared one it is waited for and returned."""
        if self.channel.closed:
            raise TransportError(f"{self.name}: backend channel is closed")
        if need_reply and self.own_fd and len(self._awaiting) >= MAX_UNANSWERED:
            raise TransportError(f"{self.name}: the front-end has not answered "
                                 f"{len(self._awaiting)} back-end requests")
        code, flags, data = m.encode(request, payload, need_reply=need_reply)
        self.channel.send_frame(code, flags, data)
        if not need_reply:
            return 0
        if not self.own_fd:
            return self._decode_ack(request, self.channel.recv_frame(BACKEND_REPLY_TIMEOUT))
        timer = self.loop.call_later(BACKEND_REPLY_TIMEOUT, self._timed_out, request)
        self._awaiting.append((request, timer))
        if not self._reading:
            self.loop.add_reader(self.channel.fileno(), self._on_readable)
            self._reading = True
        return 0

    @staticmethod
    def _decode_ack(request: m.BackendRequest, frame: Frame) -> int:
        try:
            msg = m.decode_message(m.Direction.BACKEND, frame.request, frame.flags,
                                   frame.payload, frame.fds, reply=True)
        except ProtocolError:
            frame.close_fds()
            raise
        msg.close_fds()
        if msg.request != request:
            raise ProtocolError(f"{request.name}: front-end answered {msg.name}")
        return msg.get(m.U64).value

    def _on_readable(self) -> None:
        while not self.channel.closed:
            try:
                frame = self.channel.recv_frame_nowait()
                if frame is None:
                    return
                if not self._awaiting:
                    frame.close_fds()
                    raise ProtocolError(f"message {frame.request} that answers nothing")
                request, timer = self._awaiting.popleft()
                timer.cancel()
                status = self._decode_ack(request, frame)
            except VhostUserError as exc:
                log.error("%s: backend channel closed: %s", self.name, exc)
                self.close()
                return
            if status:
                log.warning("%s: front-end answered %s with failure %d", self.name,
                            request.name, status)

    def _timed_out(self, request: m.BackendRequest) -> None:
        log.error("%s: front-end did not answer %s within %.1f s; backend channel closed",
                  self.name, request.name, BACKEND_REPLY_TIMEOUT)
        self.close()

    def close(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.channel.fileno())
            self._reading = False
        for _, timer in self._awaiting:
            timer.cancel()
        self._awaiting.clear()
        self.channel.close()


class BackendSession:
    """One vhost-user connection driving ``device``.

    ``on_close`` is called once when the session ends (the server then accepts
    the next connection). ``transport`` supplies memory maps and notifiers
    (default: fds of the socket transport).
    """

    def __init__(self, channel: Channel, device: VhostUserDevice, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 transport: Transport | None = None,
                 on_close: Callable[[BackendSession], None] | None = None,
                 name: str = "", queue_factory: QueueFactory | None = None,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.channel = channel
        self.device = device
        self.loop = loop or asyncio.get_event_loop()
        self.transport = transport or SocketTransport()
        self.on_close = on_close
        self.name = f"{device.name} ({name})" if name else device.name
        self.poll_interval = poll_interval
        self.state = SessionState.AWAITING_OWNER
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.needs_reset = False
        self.memory = GuestMemory()
        self.dirty_log: DirtyLog | None = None
        self.log_notifier: Any = None
        self.inflight: InflightArea | None = None
        self.backend: BackendChannel | None = None
        factory = queue_factory or _default_queue_factory
        self.vrings = [Vring(i, device.name, on_fail=self._ring_failed, queue_factory=factory)
                       for i in range(device.num_queues())]
        self._pollers: dict[int, asyncio.TimerHandle] = {}
        #: Queues whose kick storm was logged (once per session).
        self._stormy: set[int] = set()
        self._watched: dict[int, int] = {}
        self._reading = False
        self._check_fds = channel.carries_fds and self.transport.passes_fds
        self._handlers: dict[FR, Callable[[m.Message], Reply]] = {
            FR.GET_FEATURES: self._get_features,
            FR.SET_FEATURES: self._set_features,
            FR.SET_OWNER: self._set_owner,
            FR.RESET_OWNER: self._reset_owner,
            FR.SET_MEM_TABLE: self._set_mem_table,
            FR.SET_LOG_BASE: self._set_log_base,
            FR.SET_LOG_FD: self._set_log_fd,
            FR.SET_VRING_NUM: self._set_vring_num,
            FR.SET_VRING_ADDR: self._set_vring_addr,
            FR.SET_VRING_BASE: self._set_vring_base,
            FR.GET_VRING_BASE: self._get_vring_base,
            FR.SET_VRING_KICK: self._set_vring_kick,
            FR.SET_VRING_CALL: self._set_vring_call,
            FR.SET_VRING_ERR: self._set_vring_err,
            FR.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FR.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FR.GET_QUEUE_NUM: self._get_queue_num,
            FR.SET_VRING_ENABLE: self._set_vring_enable,
            FR.SEND_RARP: self._send_rarp,
            FR.NET_SET_MTU: self._net_set_mtu,
            FR.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FR.IOTLB_MSG: self._iotlb_msg,
            FR.GET_CONFIG: self._get_config,
            FR.SET_CONFIG: self._set_config,
            FR.GET_INFLIGHT_FD: self._get_inflight_fd,
            FR.SET_INFLIGHT_FD: self._set_inflight_fd,
            FR.RESET_DEVICE: self._reset_device,
            FR.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FR.ADD_MEM_REG: self._add_mem_reg,
            FR.REM_MEM_REG: self._rem_mem_reg,
            FR.SET_STATUS: self._set_status,
            FR.GET_STATUS: self._get_status,
        }

    # ------------------------------------------------------------------ properties
    @property
    def offered_features(self) -> int:
        return self.device.features() | m.VHOST_USER_F_PROTOCOL_FEATURES | m.VHOST_F_LOG_ALL

    @property
    def offered_protocol_features(self) -> int:
        dev = self.device.protocol_features() & DEVICE_PROTOCOL_FEATURES
        if _device_overrides_config(self.device):
            dev |= PF.CONFIG.mask
        offered = SESSION_PROTOCOL_FEATURES | dev
        if not self.transport.passes_fds:
            offered &= ~PF.INFLIGHT_SHMFD.mask  # its reply carries an fd
        return offered

    def has_protocol(self, feature: PF) -> bool:
        return bool(self.protocol_features >> feature.value & 1)

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    # ------------------------------------------------------------------ engine
    def start(self) -> None:
        """Start reading messages on the event loop."""
        self.channel.use_loop(self.loop)
        self.loop.add_reader(self.channel.fileno(), self._on_readable)
        self._reading = True
        log.info("%s: front-end connected", self.name)
        try:
            self.device.attach(self)
        except Exception:
            log.exception("%s: device attach failed", self.name)

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                frame = self.channel.recv_frame_nowait()
            except FramingError as exc:
                log.error("%s: dropping the connection: %s", self.name, exc)
                self.close()
                return
            except TransportError as exc:
                log.info("%s: front-end disconnected (%s)", self.name, exc)
                self.close()
                return
            if frame is None:
                return
            self.handle_frame(frame)

    def handle_frame(self, frame: Frame) -> None:
        """Decode, dispatch and answer one frame (fds owned from here)."""
        need_ack = bool(frame.flags & m.HeaderFlags.NEED_REPLY) and self.has_protocol(
            PF.REPLY_ACK)
        try:
            msg = m.decode_message(m.Direction.FRONTEND, frame.request, frame.flags,
                                   frame.payload, frame.fds, check_fds=self._check_fds)
        except ProtocolError as exc:
            frame.close_fds()
            self._refuse(frame.request, None, exc, need_ack, fatal=isinstance(exc, FramingError))
            return
        request = FR(msg.request)
        try:
            reply = self._dispatch(request, msg)
        except (ProtocolError, RequestError) as exc:
            msg.close_fds()
            self._refuse(frame.request, request, exc, need_ack)
            return
        except VirtioError as exc:
            msg.close_fds()
            err = RequestError(f"{request.name}: {exc}")
            err.__cause__ = exc
            self._refuse(frame.request, request, err, need_ack)
            return
        except Exception:
            msg.close_fds()
            log.exception("%s: internal error handling %s; dropping the connection",
                          self.name, request.name)
            self.close()
            return
        msg.close_fds()  # fds the handler did not take
        if self.closed:
            return
        try:
            spec = m.FRONTEND_TABLE[request]
            if isinstance(reply, WithFds):
                try:
                    self._send_reply(request, reply.payload, reply.fds)
                finally:
                    close_fds(list(reply.fds))
            elif reply is not None:
                self._send_reply(request, reply)
            elif spec.reply is m.Reply.ALWAYS:
                raise RequestError(f"{request.name}: handler produced no reply")
            elif need_ack:
                self._send_reply(request, m.U64(0))
        except VhostUserError as exc:
            log.error("%s: cannot answer %s: %s", self.name, request.name, exc)
            self.close()

    def _dispatch(self, request: FR, msg: m.Message) -> Reply:
        if self.state is SessionState.AWAITING_OWNER and request not in _BEFORE_OWNER:
            raise RequestError(f"{request.name} before SET_OWNER")
        handler = self._handlers.get(request)
        if handler is None:
            raise RequestError(f"{request.name} is not supported by this back-end")
        needs = m.FRONTEND_TABLE[request].needs
        if needs is not None and not self.has_protocol(needs):
            raise RequestError(f"{request.name} without protocol feature {needs.name} "
                               "negotiated")
        log.debug("%s: %s %s", self.name, request.name, msg.payload)
        return handler(msg)

    def _refuse(self, code: int, request: FR | None, exc: Exception, need_ack: bool,
                fatal: bool = False) -> None:
        """Log a refused message; answer it with an error if the protocol allows."""
        name = request.name if request is not None else f"request {code}"
        if fatal:
            log.error("%s: %s; dropping the connection", self.name, exc)
            self.close()
            return
        try:
            if request is FR.GET_CONFIG:
                log.error("%s: %s (answered with an empty config)", self.name, exc)
                self._send_reply(request, m.EMPTY)
                return
            if request is FR.IOTLB_MSG:
                log.error("%s: %s (answered with failure)", self.name, exc)
                self._send_reply(request, m.U64(1))
                return
            spec = m.FRONTEND_TABLE.get(code)
            owes_reply = spec is not None and spec.reply is m.Reply.ALWAYS
            if need_ack and not owes_reply:
                log.error("%s: %s (answered with failure)", self.name, exc)
                self._send_reply(code, m.U64(1))
                return
        except VhostUserError as send_exc:
            log.error("%s: cannot answer %s: %s", self.name, name, send_exc)
        log.error("%s: %s; dropping the connection", self.name, exc)
        self.close()

    def _send_reply(self, request: int, payload: m.Payload, fds: tuple[int, ...] = ()) -> None:
        code, flags, data = m.encode(request, payload, reply=True)
        self.channel.send_frame(code, flags, data, fds)

    # ------------------------------------------------------------------ helpers
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestError(f"queue index {index} out of range ({len(self.vrings)} queues)")
        return self.vrings[index]

    def _update_state(self) -> None:
        if self.state in (SessionState.CLOSED, SessionState.AWAITING_OWNER):
            return
        running = any(v.started for v in self.vrings)
        self.state = SessionState.RUNNING if running else SessionState.NEGOTIATING

    def _watch(self, vring: Vring) -> None:
        self._unwatch(vring)
        if vring.kick is not None:
            fd = vring.kick.fileno()
            try:
                self.loop.add_reader(fd, self._on_kick, vring)
                self._watched[vring.index] = fd
                return
            except OSError as exc:  # e.g. a regular file: epoll refuses it
                log.warning("%s: queue %d: cannot wait on the kick fd (%s); polling the "
                            "ring instead", self.name, vring.index, exc)
        self._pollers[vring.index] = self.loop.call_later(
            self.poll_interval, self._on_poll, vring)

    def _unwatch(self, vring: Vring) -> None:
        fd = self._watched.pop(vring.index, None)
        if fd is not None:
            self.loop.remove_reader(fd)
        timer = self._pollers.pop(vring.index, None)
        if timer is not None:
            timer.cancel()

    def _on_kick(self, vring: Vring) -> None:
        kick = vring.kick
        if kick is not None and kick.drain():
            self._back_off(vring)
        self._process(vring)

    def _back_off(self, vring: Vring) -> None:
        """The kick source stayed signalled after a drain: stop listening for
        :data:`KICK_BACKOFF`, so one ring costs at most a wake-up per back-off
        instead of the whole loop."""
        if vring.index not in self._stormy:
            self._stormy.add(vring.index)
            log.warning("%s: queue %d: the kick stays signalled after each read (a "
                        "semaphore eventfd?); serving it at most every %g ms", self.name,
                        vring.index, KICK_BACKOFF * 1e3)
        self._unwatch(vring)
        self._pollers[vring.index] = self.loop.call_later(KICK_BACKOFF, self._kicks_again,
                                                          vring)

    def _kicks_again(self, vring: Vring) -> None:
        self._pollers.pop(vring.index, None)
        if not vring.started or vring.failed or self.closed:
            return
        self._watch(vring)
        self._process(vring)  # what the driver queued while we did not listen

    def _on_poll(self, vring: Vring) -> None:
        self._pollers.pop(vring.index, None)
        if not vring.started or vring.failed or self.closed:
            return
        if vring.has_available():
            self._process(vring)
        if vring.started and not vring.failed and not self.closed:
            self._pollers[vring.index] = self.loop.call_later(
                self.poll_interval, self._on_poll, vring)

    def _process(self, vring: Vring) -> None:
        if not vring.started or vring.failed or self.closed:
            return
        try:
            self.device.process(vring)
        except VirtioError as exc:
            vring.fail(exc)
        except Exception:
            log.exception("%s: device error on queue %d; dropping the connection",
                          self.name, vring.index)
            self.close()

    def _ring_failed(self, vring: Vring, exc: BaseException) -> None:
        self.needs_reset = True
        self._unwatch(vring)
        self.loop.call_soon(self._stop_failed, vring)

    def _stop_failed(self, vring: Vring) -> None:
        if vring.started and vring.failed and not self.closed:
            self._stop_ring(vring)

    def _stop_ring(self, vring: Vring) -> int:
        self._unwatch(vring)
        was_started = vring.started
        base = vring.stop()
        if was_started:
            try:
                self.device.queue_stopped(vring)
            except Exception:
                log.exception("%s: device failed to stop queue %d", self.name, vring.index)
        self._update_state()
        return base

    def _try_start(self, vring: Vring) -> None:
        """Start ``vring`` if it is configured and memory exists."""
        if vring.started or not vring.ready:
            return
        if len(self.memory) == 0:
            raise RequestError(f"queue {vring.index}: cannot start before SET_MEM_TABLE")
        vring.features = self.features
        vring.inflight = None
        try:
            if self.inflight is not None and vring.index < self.inflight.num_queues:
                if self.inflight.packed != bool(self.features & VIRTIO_F_RING_PACKED):
                    raise RequestError(f"queue {vring.index}: the inflight area was made "
                                       "for the other ring layout")
                vring.inflight = self.inflight.tracker(vring.index)
            vring.start(self.memory)
        except VirtioError as exc:
            vring.stop()
            raise RequestError(f"queue {vring.index}: {exc}") from exc
        log.info("%s: queue %d started (size %d, base %d%s)", self.name, vring.index,
                 vring.size, vring.base, ", polled" if vring.kick is None else "")
        self.device.queue_started(vring)
        self._update_state()
        self._watch(vring)
        self.loop.call_soon(self._process, vring)

    def _retranslate(self) -> None:
        """Memory changed: rebuild every started ring over the new table."""
        for vring in self.vrings:
            if vring.started and not vring.failed:
                try:
                    vring.restart(self.memory)
                except VirtioError as exc:
                    vring.fail(exc)

    # ------------------------------------------------------------------ handlers
    def _get_features(self, msg: m.Message) -> m.Payload:
        return m.U64(self.offered_features)

    def _set_features(self, msg: m.Message) -> None:
        value = msg.get(m.U64).value
        extra = value & ~self.offered_features
        if extra:
            raise RequestError(f"SET_FEATURES acks bits {extra:#x} that were not offered")
        if any(v.started for v in self.vrings) and (value ^ self.features) & ~m.VHOST_F_LOG_ALL:
            raise RequestError("SET_FEATURES changes ring features while rings run")
        self.features = value
        for v in self.vrings:
            v.features = value
            v.set_log(bool(value & m.VHOST_F_LOG_ALL))
        if not value & m.VHOST_USER_F_PROTOCOL_FEATURES:
            for v in self.vrings:
                v.enabled = True
        self.memory.dirty_log = self.dirty_log if value & m.VHOST_F_LOG_ALL else None
        self.device.set_features(value & ~(m.VHOST_USER_F_PROTOCOL_FEATURES | m.VHOST_F_LOG_ALL))
        return None

    def _set_owner(self, msg: m.Message) -> None:
        if self.state is not SessionState.AWAITING_OWNER:
            log.warning("%s: SET_OWNER again (ignored)", self.name)
            return None
        self.state = SessionState.NEGOTIATING
        return None

    def _reset_rings_and_device(self) -> None:
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.reset()
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: device reset failed", self.name)
        self.features = 0
        self.status = 0
        self.needs_reset = False
        self._update_state()

    def _reset_owner(self, msg: m.Message) -> None:
        log.info("%s: RESET_OWNER: rings stopped, device reset", self.name)
        self._reset_rings_and_device()
        return None

    def _reset_device(self, msg: m.Message) -> None:
        log.info("%s: RESET_DEVICE: rings stopped, device reset", self.name)
        self._reset_rings_and_device()
        return None

    def _map_regions(self, regions: tuple[MemoryRegion, ...], fds: list[int]
                     ) -> list[MappedRegion]:
        """Map each region through the transport; all or nothing. Consumes ``fds``."""
        mapped: list[MappedRegion] = []
        pending: list[int | None] = list(fds) + [None] * (len(regions) - len(fds))
        fds.clear()
        try:
            for i, region in enumerate(regions):
                fd, pending[i] = pending[i], None
                try:
                    region.validate()
                    if fd is not None:
                        self._protect(fd, f"memory region {i}")
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    raise
                mapped.append(self.transport.map_region(region, fd))
        except BaseException:
            for mr in mapped:
                mr.close()
            close_fds([fd for fd in pending if fd is not None])
            raise
        return mapped

    def _set_mem_table(self, msg: m.Message) -> None:
        table = msg.get(m.MemoryTable)
        fds = list(msg.fds)
        msg.fds.clear()
        try:
            mapped = self._map_regions(table.regions, fds)
        except VirtioError as exc:
            raise RequestError(f"SET_MEM_TABLE: {exc}") from exc
        new = GuestMemory()
        try:
            for mr in mapped:
                new.add(mr)
        except VirtioError as exc:
            for mr in mapped:
                mr.close()
            raise RequestError(f"SET_MEM_TABLE: {exc}") from exc
        # Swap in place: rings and devices keep the same GuestMemory object.
        self.memory.clear()
        for mr in new:
            self.memory.add(mr)
        log.info("%s: memory table of %d regions, %d MiB", self.name, len(mapped),
                 sum(mr.region.memory_size for mr in mapped) >> 20)
        self._retranslate()
        return None

    def _get_max_mem_slots(self, msg: m.Message) -> m.Payload:
        return m.U64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: m.Message) -> None:
        region = msg.get(m.SingleRegion).region
        fd = msg.take_fd()
        if len(self.memory) >= MAX_MEM_SLOTS:
            if fd is not None:
                os.close(fd)
            raise RequestError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots are used")
        try:
            (mapped,) = self._map_regions((region,), [fd] if fd is not None else [])
        except VirtioError as exc:
            raise RequestError(f"ADD_MEM_REG: {exc}") from exc
        try:
            self.memory.add(mapped)
        except VirtioError as exc:
            mapped.close()
            raise RequestError(f"ADD_MEM_REG: {exc}") from exc
        self._retranslate()
        return None

    def _rem_mem_reg(self, msg: m.Message) -> None:
        region = msg.get(m.SingleRegion).region
        msg.close_fds()
        try:
            self.memory.remove(region)
        except VirtioError as exc:
            raise RequestError(f"REM_MEM_REG: {exc}") from exc
        self._retranslate()
        return None

    def _set_log_base(self, msg: m.Message) -> m.Payload:
        area = msg.get(m.LogArea)
        fd = msg.take_fd()
        if fd is not None:
            try:
                self._protect(fd, "SET_LOG_BASE")
            except RequestError:
                os.close(fd)
                raise
        try:
            new = self.transport.map_log(area.mmap_size, area.mmap_offset, fd)
        except VirtioError as exc:
            raise RequestError(f"SET_LOG_BASE: {exc}") from exc
        if self.dirty_log is not None:
            self.dirty_log.close()
        self.dirty_log = new
        if self.features & m.VHOST_F_LOG_ALL:
            self.memory.dirty_log = new
        return m.U64(0)

    def _set_log_fd(self, msg: m.Message) -> None:
        fd = self._checked_fd(msg, Role.LOG, 0)
        if self.log_notifier is not None:
            self.log_notifier.close()
        self.log_notifier = self.transport.notifier(NotifierKind.LOG, 0, fd)
        return None

    def _set_vring_num(self, msg: m.Message) -> None:
        state = msg.get(m.VringState)
        vring = self._vring(state.index)
        if vring.started:
            raise RequestError(f"SET_VRING_NUM: queue {state.index} is running")
        size = state.num
        limit = self.device.max_queue_size()
        if not 0 < size <= limit:
            raise RequestError(f"SET_VRING_NUM: queue {state.index} size {size} not in "
                               f"1..{limit}")
        if not self.features & VIRTIO_F_RING_PACKED and size & (size - 1):
            raise RequestError(f"SET_VRING_NUM: split queue size {size} is not a power of 2")
        vring.size = size
        return None

    def _set_vring_addr(self, msg: m.Message) -> None:
        addr = msg.get(m.VringAddr)
        vring = self._vring(addr.index)
        if addr.flags & ~m.VRING_F_LOG:
            raise RequestError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        new = RingAddresses(addr.desc, addr.avail, addr.used, addr.log,
                            bool(addr.flags & m.VRING_F_LOG))
        if vring.started:
            old = vring.addresses
            if old is not None and (old.desc, old.avail, old.used) != (new.desc, new.avail,
                                                                       new.used):
                raise RequestError(f"SET_VRING_ADDR: queue {addr.index} is running; only "
                                   "the log flag may change")
            vring.addresses = new
            vring.set_log(bool(self.features & m.VHOST_F_LOG_ALL))
            return None
        vring.addresses = new
        return None

    def _set_vring_base(self, msg: m.Message) -> None:
        state = msg.get(m.VringState)
        vring = self._vring(state.index)
        if vring.started:
            raise RequestError(f"SET_VRING_BASE: queue {state.index} is running")
        vring.base = state.num
        return None

    def _get_vring_base(self, msg: m.Message) -> m.Payload:
        state = msg.get(m.VringState)
        vring = self._vring(state.index)
        base = self._stop_ring(vring)
        if vring.kick is not None:
            vring.kick.close()
            vring.kick = None
        vring.kick_nofd = False
        log.info("%s: queue %d stopped at base %#x", self.name, vring.index, base)
        return m.VringState(state.index, base)

    def _checked_fd(self, msg: m.Message, role: Role, index: int) -> int | None:
        """The message's eventfd, refused (and closed) if it is no plain eventfd or
        one this session already uses in a role that conflicts with ``role``."""
        fd = msg.take_fd()
        if fd is None or not self._check_fds:
            return fd
        try:
            check_eventfd(role, index, fd, f"{msg.name} queue {index}" if role is not Role.LOG
                          else msg.name, self._held_eventfds())
        except RequestError:
            os.close(fd)
            raise
        return fd

    def _held_eventfds(self) -> list[tuple[Role, int, int]]:
        held: list[tuple[Role, int, int]] = []
        for v in self.vrings:
            for role, res in ((Role.KICK, v.kick), (Role.CALL, v.call), (Role.ERR, v.err)):
                fd = getattr(res, "fd", -1)
                if fd >= 0:
                    held.append((role, v.index, fd))
        fd = getattr(self.log_notifier, "fd", -1)
        if fd >= 0:
            held.append((Role.LOG, 0, fd))
        return held

    def _protect(self, fd: int, what: str) -> None:
        """Seal a memory fd against shrinking where possible (see peer_fds); on
        failure the caller closes ``fd``."""
        if not self._check_fds:
            return
        warning = protect_from_shrinking(fd, what)
        if warning is not None:
            log.warning("%s: %s", self.name, warning)

    def _set_vring_kick(self, msg: m.Message) -> None:
        vf = msg.get(m.VringFile)
        vring = self._vring(vf.index)
        fd = self._checked_fd(msg, Role.KICK, vf.index)
        self._unwatch(vring)
        if vring.kick is not None:
            vring.kick.close()
        vring.kick = self.transport.kick_source(vf.index, fd)
        vring.kick_nofd = vf.nofd
        if vring.started:
            self._watch(vring)
        else:
            self._try_start(vring)
        return None

    def _set_vring_call(self, msg: m.Message) -> None:
        vf = msg.get(m.VringFile)
        vring = self._vring(vf.index)
        fd = self._checked_fd(msg, Role.CALL, vf.index)
        if vring.call is not None:
            vring.call.close()
        vring.call = self.transport.notifier(NotifierKind.CALL, vf.index, fd)
        if vring.missed_call and vring.call is not None:
            # The driver wanted an interrupt while there was no call fd to signal.
            vring.missed_call = False
            vring.call.signal()
        return None

    def _set_vring_err(self, msg: m.Message) -> None:
        vf = msg.get(m.VringFile)
        vring = self._vring(vf.index)
        fd = self._checked_fd(msg, Role.ERR, vf.index)
        if vring.err is not None:
            vring.err.close()
        vring.err = self.transport.notifier(NotifierKind.ERR, vf.index, fd)
        return None

    def _get_protocol_features(self, msg: m.Message) -> m.Payload:
        return m.U64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: m.Message) -> None:
        value = msg.get(m.U64).value
        offered = self.offered_protocol_features
        if value & ~offered:
            log.warning("%s: front-end acked protocol features %#x that were not offered "
                        "(ignored)", self.name, value & ~offered)
        self.protocol_features = value & offered
        return None

    def _get_queue_num(self, msg: m.Message) -> m.Payload:
        return m.U64(len(self.vrings))

    def _set_vring_enable(self, msg: m.Message) -> None:
        state = msg.get(m.VringState)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise RequestError(f"SET_VRING_ENABLE: queue {state.index} value {state.num}")
        vring.enabled = bool(state.num)
        if vring.enabled and vring.started:
            self.loop.call_soon(self._process, vring)
        return None

    def _send_rarp(self, msg: m.Message) -> None:
        mac = msg.get(m.U64).value.to_bytes(8, "little")[:6]
        self.device.send_rarp(mac)
        return None

    def _net_set_mtu(self, msg: m.Message) -> None:
        mtu = msg.get(m.U64).value
        self.device.set_mtu(mtu)
        return None

    def _set_backend_req_fd(self, msg: m.Message) -> None:
        try:
            channel = self.transport.backend_channel(msg.take_fd())
        except TransportError as exc:
            raise RequestError(str(exc)) from exc
        if self.backend is not None:
            self.backend.close()
        self.backend = BackendChannel(channel, self.name, self.loop,
                                      own_fd=channel.fileno() != self.channel.fileno())
        return None

    def _iotlb_msg(self, msg: m.Message) -> m.Payload:
        raise RequestError("IOTLB_MSG: ACCESS_PLATFORM is not offered")

    def _get_config(self, msg: m.Message) -> m.Payload:
        cfg = msg.get(m.ConfigSpace)
        data = bytes(self.device.get_config(cfg.offset, cfg.size))
        data = data[:cfg.size].ljust(cfg.size, b"\0")
        return m.ConfigSpace(cfg.offset, cfg.flags, data)

    def _set_config(self, msg: m.Message) -> None:
        cfg = msg.get(m.ConfigSpace)
        try:
            self.device.set_config(cfg.offset, cfg.data)
        except (ValueError, VirtioError) as exc:
            raise RequestError(f"SET_CONFIG: {exc}") from exc
        return None

    def _get_inflight_fd(self, msg: m.Message) -> Reply:
        req = msg.get(m.Inflight)
        if req.num_queues == 0 or req.num_queues > len(self.vrings) or req.queue_size == 0:
            raise RequestError(f"GET_INFLIGHT_FD: {req.num_queues} queues of "
                               f"{req.queue_size} (device has {len(self.vrings)} queues)")
        packed = bool(self.features & VIRTIO_F_RING_PACKED)
        try:
            area, fd = InflightArea.allocate(req.num_queues, req.queue_size, packed)
        except (OSError, VirtioError) as exc:
            raise RequestError(f"GET_INFLIGHT_FD: {exc}") from exc
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area
        return WithFds(m.Inflight(area.mmap_size, 0, req.num_queues, req.queue_size), (fd,))

    def _set_inflight_fd(self, msg: m.Message) -> None:
        req = msg.get(m.Inflight)
        fd = msg.take_fd()
        if fd is None:  # the message table asks for one fd; refuse rather than trust it
            raise RequestError("SET_INFLIGHT_FD without a memory fd")
        packed = bool(self.features & VIRTIO_F_RING_PACKED)
        try:
            self._protect(fd, "SET_INFLIGHT_FD")
            area = InflightArea(fd, req.mmap_size, req.mmap_offset, req.num_queues,
                                req.queue_size, packed)
        except VirtioError as exc:
            raise RequestError(f"SET_INFLIGHT_FD: {exc}") from exc
        finally:
            os.close(fd)
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area
        return None

    def _set_status(self, msg: m.Message) -> None:
        value = msg.get(m.U64).value
        if value > 0xFF:
            raise RequestError(f"SET_STATUS: status {value:#x} is more than a byte")
        self.status = value
        if value == 0:
            self.needs_reset = False
        return None

    def _get_status(self, msg: m.Message) -> m.Payload:
        status = self.status
        if self.needs_reset:
            status |= VIRTIO_STATUS_NEEDS_RESET
        return m.U64(status)

    # ------------------------------------------------------------------ back-end requests
    def config_changed(self) -> bool:
        """Tell the front-end the config space changed (BACKEND_CONFIG_CHANGE_MSG).

        Returns False when there is no backend channel or it failed.
        """
        if self.backend is None or self.backend.closed or not self.has_protocol(
                PF.BACKEND_REQ):
            return False
        try:
            self.backend.request(m.BackendRequest.CONFIG_CHANGE_MSG, m.EMPTY,
                                 need_reply=self.has_protocol(PF.REPLY_ACK))
        except VhostUserError as exc:
            log.error("%s: config change notification failed: %s", self.name, exc)
            return False
        return True

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """End the session: stop rings, reset the device, unmap, close every fd."""
        if self.closed:
            return
        if self._reading:
            self.loop.remove_reader(self.channel.fileno())
            self._reading = False
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.reset()
        self.state = SessionState.CLOSED
        try:
            self.device.reset()
            self.device.attach(None)
        except Exception:
            log.exception("%s: device reset failed", self.name)
        self.memory.dirty_log = None
        self.memory.clear()
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        if self.log_notifier is not None:
            self.log_notifier.close()
            self.log_notifier = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.channel.close()
        log.info("%s: session closed", self.name)
        if self.on_close is not None:
            self.on_close(self)
