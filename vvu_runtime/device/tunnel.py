"""The vhost-user side of a VVU device: the consumer QEMU's connection, tunnelled.

:class:`VhostUserTunnel` listens on the device's vhost-user socket (the consumer
QEMU connects with ``-chardev socket,path=...,reconnect-ms=...``) and is the
:class:`~vvu_runtime.device.vvu.VvuLink` of one :class:`~vvu_runtime.device.vvu.VvuDevice`.
It runs on the event loop the device's vfio-user server runs on.

Connection life cycle: the link machine of ``virtio.vvu_link`` (A.7), shared
with the guest driver's endpoint::

    DOWN (listening, not accepting)  --driver sets BACKEND_UP-->  ARMED (accepting)
    ARMED  --front-end connects-->  CONNECTED: FRONTEND_UP + config interrupt
    CONNECTED  --front-end hangs up / sends bad input-->  DOWN: status 0 + config irq
    any  --driver clears BACKEND_UP, resets, NEEDS_RESET-->  DOWN: no irq
    DOWN (not listening)  --driver sets BACKEND_UP again-->  ARMED (QEMU reconnects)

The socket is bound at start, so a front-end that connects before the first
session (a consumer QEMU starting, its vCPUs not yet running) waits in the
listen backlog until the driver is ready. After a session, DOWN stops listening
(the file stays): a reconnecting front-end's connect() fails with ECONNREFUSED
and QEMU's ``reconnect-ms`` retries, instead of its handshake blocking QEMU's
main loop, and so the consumer's vCPUs, while the appliance's back-end is down.
With ``refuse_while_down`` that holds before the first session too: a vvu-devd
restarted under running consumers cannot know they had sessions, and a launcher
starts consumers only once the appliance is ready. One front-end at a time.

Isolation (a front-end shares the open files of every fd it passes and may
change their flags at any time): kick eventfds are read with
:func:`~vvu_runtime.fds.eventfd_take`, call/err/log eventfds written with
:func:`~vvu_runtime.fds.eventfd_signal`, both sockets read and written with
per-call non-blocking I/O, so no front-end can block the loop every device of
the process shares. One eventfd holds one role in the whole process
(:class:`HeldEventfds`), and a kick eventfd in semaphore mode is refused (a read
takes 1 and leaves it readable: a spin).

Front-end → rxq: one message is read from the socket only while an rxq buffer is
available (back-pressure). Every message is checked against the vhost-user
message table; fds are consumed and never forwarded:

* SET_MEM_TABLE / ADD_MEM_REG (/ REM_MEM_REG, if it carries one): every fd must be
  the provisioned RAM file (same st_dev/st_ino) and each region's
  ``[mmap_offset, +memory_size)`` must lie inside the file and BAR2;
* SET_VRING_KICK: the eventfd is watched; a kick is driver aux notification i;
* SET_VRING_CALL / SET_VRING_ERR / SET_LOG_FD: eventfds for doorbells i, N+i, 2N;
* SET_BACKEND_REQ_FD: the socket back-end requests from txq go to; the front-end's
  replies on it come back into rxq;
* SET_PROTOCOL_FEATURES is masked to :data:`TUNNEL_PROTOCOL_FEATURES`;
* requests that need a masked feature or carry fds the tunnel cannot represent
  are refused.

txq → front-end: a message with the REPLY flag goes to the front-end's socket
(a GET_PROTOCOL_FEATURES reply masked), one without it is a back-end request and
goes to the back-end request socket (dropped with a log line if there is none).
txq is popped only while nothing waits to be sent.

Bad input from the front-end (a malformed message, a refused request, a foreign
memory fd, a vring index past ``max_vhost_queues``) is logged, counted, answered
with a failure ack if it asked for one, and the connection is dropped (status 0,
config interrupt); the driver sets BACKEND_UP to take the reconnect. Nothing
raises out of the loop callbacks: other devices of the process are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vvu_runtime.device.vvu import VvuDevice
from vvu_runtime.fds import (
    FdError,
    Outbox,
    UnixListener,
    eventfd_info,
    eventfd_signal,
    eventfd_take,
    is_eventfd,
    unix_stream_socket,
)
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
from vvu_runtime.vhost_user.transport import Frame, UnixChannel
from vvu_runtime.virtio.memory import MemoryRegion
from vvu_runtime.virtio.vvu_abi import DoorbellKind
from vvu_runtime.virtio.vvu_link import LinkEvent, LinkMachine, LinkState

log = logging.getLogger(__name__)

#: Protocol features the tunnel can carry (docs/vvu-abi.md).
TUNNEL_PROTOCOL_FEATURES = m.protocol_mask(
    PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS, PF.NET_MTU, PF.RARP,
)

#: Front-end requests the tunnel refuses, and why.
REFUSED_FRONTEND: dict[FR, str] = {
    FR.SET_LOG_BASE: "needs LOG_SHMFD, which the tunnel masks",
    FR.GET_INFLIGHT_FD: "needs INFLIGHT_SHMFD, which the tunnel masks",
    FR.SET_INFLIGHT_FD: "needs INFLIGHT_SHMFD, which the tunnel masks",
    FR.GPU_SET_SOCKET: "carries a socket the tunnel cannot pass on",
    FR.POSTCOPY_ADVISE: "needs PAGEFAULT, which the tunnel masks",
    FR.POSTCOPY_LISTEN: "needs PAGEFAULT, which the tunnel masks",
    FR.POSTCOPY_END: "needs PAGEFAULT, which the tunnel masks",
    FR.VRING_KICK: "needs INBAND_NOTIFICATIONS, which the tunnel masks",
    FR.SET_VRING_ENDIAN: "needs CROSS_ENDIAN, which the tunnel masks",
    FR.CREATE_CRYPTO_SESSION: "needs CRYPTO_SESSION, which the tunnel masks",
    FR.CLOSE_CRYPTO_SESSION: "needs CRYPTO_SESSION, which the tunnel masks",
    FR.GET_SHARED_OBJECT: "needs SHARED_OBJECT, which the tunnel masks",
    FR.SET_DEVICE_STATE_FD: "needs DEVICE_STATE, which the tunnel masks",
    FR.CHECK_DEVICE_STATE: "needs DEVICE_STATE, which the tunnel masks",
    FR.GET_SHMEM_CONFIG: "needs SHMEM, which the tunnel masks",
}

#: Back-end requests (from txq) the tunnel refuses, and why.
REFUSED_BACKEND: dict[BR, str] = {
    BR.VRING_HOST_NOTIFIER_MSG: "needs HOST_NOTIFIER, which the tunnel masks",
    BR.VRING_CALL: "needs INBAND_NOTIFICATIONS, which the tunnel masks",
    BR.VRING_ERR: "needs INBAND_NOTIFICATIONS, which the tunnel masks",
    BR.SHARED_OBJECT_ADD: "needs SHARED_OBJECT, which the tunnel masks",
    BR.SHARED_OBJECT_REMOVE: "needs SHARED_OBJECT, which the tunnel masks",
    BR.SHARED_OBJECT_LOOKUP: "needs SHARED_OBJECT, which the tunnel masks",
    BR.SHMEM_MAP: "needs SHMEM, which the tunnel masks",
    BR.SHMEM_UNMAP: "needs SHMEM, which the tunnel masks",
    BR.MEM_READ: "needs SHMEM, which the tunnel masks",
}

#: Messages read per readable event before yielding to other fds.
BATCH = 32
#: Reads of exactly 1 in a row after which a kick eventfd that is still readable
#: counts as EFD_SEMAPHORE, on kernels whose fdinfo does not say (the field dates from 2023). An
#: ordinary eventfd is reset by a read: it would take a writer hitting the gap
#: between our read and our poll this many times in a row.
SEMAPHORE_STREAK = 16


class ConsumerError(VhostUserError):
    """Bad input from the front-end: the connection is dropped."""


class HeldEventfds:
    """Every eventfd the tunnels of this process hold, by kernel id, with its role.

    One eventfd serves one role: the same eventfd as the kick of two vrings, or
    as a kick and a call, would let a front-end make one event look like another
    (and, shared with a blocking reader, stall it); across devices it would join
    two tenants' links. fstat cannot tell eventfds apart (one anon inode for all),
    so the key is fdinfo's ``eventfd-id``; kernels that do not show it go
    unchecked.
    """

    def __init__(self) -> None:
        self._roles: dict[int, tuple[str, str]] = {}

    def claim(self, ident: int, device: str, role: str) -> tuple[str, str] | None:
        """Take ``ident`` for ``role`` of ``device``; the (device, role) holding it
        already, or None when it was free (and is now ours)."""
        holder = self._roles.get(ident)
        if holder is None:
            self._roles[ident] = (device, role)
        return holder

    def release(self, ident: int) -> None:
        self._roles.pop(ident, None)


#: The process's one table: vvu-devd serves every device on one loop.
HELD_EVENTFDS = HeldEventfds()


def _role(request: FR, index: int) -> str:
    if request is FR.SET_VRING_KICK:
        return f"kick of vring {index}"
    if request is FR.SET_VRING_CALL:
        return f"call of vring {index}"
    if request is FR.SET_VRING_ERR:
        return f"err of vring {index}"
    return "log eventfd (SET_LOG_FD)"


def _still_readable(fd: int) -> bool:
    ready = select.poll()
    ready.register(fd, select.POLLIN)
    return bool(ready.poll(0))


@dataclass
class Connection:
    """One front-end connection and every fd it gave us (all owned, closed together)."""

    number: int
    channel: UnixChannel
    outbox: Outbox
    kicks: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    errs: dict[int, int] = field(default_factory=dict)
    log_fd: int | None = None
    #: Kernel eventfd id of each eventfd fd above that has one (HELD_EVENTFDS).
    idents: dict[int, int] = field(default_factory=dict)
    #: Kick vrings whose eventfd's semaphore mode the kernel does not show, with
    #: how many reads of exactly 1 left it readable in a row.
    kick_streaks: dict[int, int] = field(default_factory=dict)
    backend: UnixChannel | None = None
    backend_outbox: Outbox | None = None
    protocol_features: int = 0
    reading: bool = False

    def fds(self) -> list[int]:
        out = [*self.kicks.values(), *self.calls.values(), *self.errs.values()]
        return out + ([self.log_fd] if self.log_fd is not None else [])


class VhostUserTunnel:
    """Listen on ``path`` for the consumer's front-end and tunnel it through ``device``."""

    def __init__(self, device: VvuDevice, path: str | os.PathLike[str], *,
                 loop: asyncio.AbstractEventLoop | None = None, backlog: int = 4,
                 refuse_while_down: bool = False) -> None:
        self.device = device
        self.path = os.fspath(path)
        self.backlog = backlog
        self._loop = loop
        self._listener: UnixListener | None = None
        self._accepting = False
        #: While BACKEND_UP is clear the socket does not listen (a connecting
        #: front-end is refused at once): from the first session on, or always.
        self._refuse_while_down = refuse_while_down
        self.link = LinkMachine(device.name)
        self.conn: Connection | None = None
        self.connections = 0
        #: Told the front-end's call eventfds (queue → fd, borrowed) whenever they
        #: change: the doorbell companion's peer (device/ivshmem.py) follows them.
        self.on_calls: Callable[[Mapping[int, int]], None] | None = None

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def state(self) -> str:
        """The link as a status line says it."""
        if self._listener is None:
            return "closed"
        if self.conn is not None:
            return f"connected (#{self.conn.number})"
        if self.link.state is LinkState.ARMED:
            return "accepting"
        if not self._listener.listening:
            return "refusing until BACKEND_UP"
        return "waiting for BACKEND_UP"

    # --- listening ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen (not accepting until BACKEND_UP); attach to the device."""
        if self._listener is not None:
            return
        try:
            self._listener = UnixListener(self.path, self.backlog)
        except FdError as exc:
            raise TransportError(f"{self.name}: {exc}") from exc
        self.device.link = self
        log.info("%s: vhost-user socket %s bound (front-ends wait until BACKEND_UP)",
                 self.name, self.path)
        if self.device.backend_up:
            self.link.fire(LinkEvent.BACKEND_UP)
        self._update_accepting()

    def close(self) -> None:
        """Drop the front-end, stop listening, remove the socket file (idempotent)."""
        self._drop("the device model is shutting down", notify=False)
        self.link.fire(LinkEvent.BACKEND_DOWN)
        if self._listener is None:
            return
        self._set_accepting(False)
        self._listener.close()
        self._listener = None
        if self.device.link is self:
            self.device.link = None

    def _update_accepting(self) -> None:
        listener = self._listener
        if listener is None:
            return
        if self._refuse_while_down and self.link.state is LinkState.DOWN:
            # Not the backlog: a front-end's handshake would block there (QEMU's main
            # loop, and so the consumer's vCPUs) for as long as the appliance's
            # back-end is down. Refused, QEMU's reconnect-ms retries later instead.
            self._set_accepting(False)
            if listener.listening:
                listener.suspend()
                log.info("%s: vhost-user socket %s not listening until BACKEND_UP (front-ends "
                         "are refused and retry)", self.name, self.path)
            return
        if not listener.listening:
            try:
                listener.resume()
            except FdError as exc:
                log.error("%s: cannot listen again: %s", self.name, exc)
                return
            log.info("%s: vhost-user socket %s listening again", self.name, self.path)
        self._set_accepting(self.link.state is LinkState.ARMED)

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting or self._listener is None:
            return
        if on:
            self._listener.watch(self.loop, self._on_accept)
        else:
            self._listener.unwatch()
        self._accepting = on

    def _on_accept(self) -> None:
        assert self._listener is not None
        try:
            sock = self._listener.accept()
        except OSError as exc:
            log.error("%s: accept on %s failed: %s", self.name, self.path, exc)
            return
        if sock is None:
            return
        if not self.link.can(LinkEvent.FRONTEND_UP):  # pragma: no cover - not accepting then
            sock.close()
            return
        self.connections += 1
        self._refuse_while_down = True
        channel = UnixChannel(sock, max_payload=m.MAX_PAYLOAD,
                              limit_for=m.request_limits(m.Direction.FRONTEND, False),
                              name=f"{self.name} front-end #{self.connections}")
        conn = Connection(self.connections, channel, Outbox(
            sock, self.loop, on_drained=self._tx_drained,
            on_error=lambda exc: self._frontend_gone(f"cannot send to the front-end: {exc}")))
        self.conn = conn
        self.link.fire(LinkEvent.FRONTEND_UP)
        self._set_accepting(False)
        log.info("%s: front-end #%d connected", self.name, conn.number)
        self.device.frontend_connected()
        self._resume_reading()

    # --- VvuLink (called by the device) -----------------------------------------------

    def backend_up(self) -> None:
        if self.link.can(LinkEvent.BACKEND_UP):  # else: set again while armed or connected
            self.link.fire(LinkEvent.BACKEND_UP)
        self._update_accepting()

    def backend_down(self) -> None:
        self._drop("the driver took BACKEND_UP away (or reset the device)", notify=False)
        self.link.fire(LinkEvent.BACKEND_DOWN)
        self._update_accepting()

    def rx_space(self) -> None:
        self._resume_reading()

    def tx_ready(self) -> bool:
        conn = self.conn
        if conn is None:
            return True
        return conn.outbox.empty and (conn.backend_outbox is None or conn.backend_outbox.empty)

    def tx_message(self, data: bytes) -> None:
        request, flags, _ = m.HEADER.unpack_from(data)
        payload = data[m.HEADER_SIZE:]
        if flags & m.HeaderFlags.REPLY:
            self._tx_reply(request, flags, payload)
        else:
            self._tx_backend_request(request, flags, payload, data)

    def doorbell(self, kind: DoorbellKind, queue: int) -> bool:
        conn = self.conn
        if conn is None:
            return False
        if kind is DoorbellKind.CALL:
            fd = conn.calls.get(queue)
        elif kind is DoorbellKind.ERR:
            fd = conn.errs.get(queue)
        else:
            fd = conn.log_fd
        if fd is None:
            return False
        try:
            if not eventfd_signal(fd):
                # Saturated: the front-end has a wake-up pending already.
                self.device.stats.doorbells_coalesced += 1
        except OSError as exc:
            log.warning("%s: signalling the %s eventfd of queue %d failed: %s", self.name,
                        kind.value, queue, exc)
            return False
        return True

    # --- txq → front-end --------------------------------------------------------------

    def _tx_reply(self, request: int, flags: int, payload: bytes) -> None:
        stats = self.device.stats
        try:
            code, value = m.decode(m.Direction.FRONTEND, request, flags, payload, reply=True)
        except ProtocolError as exc:
            self.device.appliance_error(f"txq reply: {exc}")
            return
        if code is FR.GET_PROTOCOL_FEATURES and isinstance(value, m.U64):
            masked = value.value & TUNNEL_PROTOCOL_FEATURES
            if masked != value.value:
                log.info("%s: GET_PROTOCOL_FEATURES reply %#x masked to %#x (not tunnelled: "
                         "%s)", self.name, value.value, masked,
                         ", ".join(_feature_names(value.value & ~masked)))
            payload = m.U64(masked).pack()
        conn = self.conn
        if conn is None:
            stats.tx_dropped += 1
            log.info("%s: txq reply %s dropped: no front-end connected", self.name, code.name)
            return
        stats.tx_replies += 1
        log.debug("%s: txq → front-end: %s reply (%d bytes)", self.name, code.name, len(payload))
        conn.outbox.send(m.format_message(request, flags, payload))

    def _tx_backend_request(self, request: int, flags: int, payload: bytes, data: bytes) -> None:
        stats = self.device.stats
        try:
            code, _ = m.decode(m.Direction.BACKEND, request, flags, payload)
        except ProtocolError as exc:
            self.device.appliance_error(f"txq back-end request: {exc}")
            return
        why = REFUSED_BACKEND.get(BR(code))
        if why is not None:
            self.device.appliance_error(f"txq back-end request {code.name}: {why}")
            return
        conn = self.conn
        if conn is None or conn.backend_outbox is None or \
                not conn.protocol_features & PF.BACKEND_REQ.mask:
            stats.tx_dropped += 1
            reason = ("no front-end connected" if conn is None else
                      "BACKEND_REQ was not negotiated" if not
                      conn.protocol_features & PF.BACKEND_REQ.mask else
                      "the front-end gave no back-end request socket")
            log.info("%s: back-end request %s from txq dropped: %s", self.name, code.name,
                     reason)
            return
        stats.tx_requests += 1
        log.debug("%s: txq → back-end request socket: %s", self.name, code.name)
        conn.backend_outbox.send(data)

    def _tx_drained(self) -> None:
        if self.conn is not None and self.tx_ready():
            self.device.tx_resume()

    # --- front-end → rxq --------------------------------------------------------------

    def _resume_reading(self) -> None:
        conn = self.conn
        if conn is None or conn.reading:
            return
        conn.reading = True
        self.loop.add_reader(conn.channel.fileno(), self._on_frontend_readable)
        if conn.backend is not None:
            self.loop.add_reader(conn.backend.fileno(), self._on_backend_readable)

    def _pause_reading(self, conn: Connection) -> None:
        if not conn.reading:
            return
        conn.reading = False
        self.loop.remove_reader(conn.channel.fileno())
        if conn.backend is not None:
            self.loop.remove_reader(conn.backend.fileno())

    def _on_frontend_readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        frame: Frame | None = None
        try:
            for _ in range(BATCH):
                if not self.device.rx_ready():
                    if self.conn is conn:
                        self._pause_reading(conn)
                    break
                frame = conn.channel.recv_frame_nowait()
                if frame is None:
                    break
                data = self._from_frontend(conn, frame)
                frame = None
                if not self.device.rx_put(data) or self.conn is not conn:
                    break
        except ConnectionClosed:
            self._frontend_gone("the front-end closed the connection")
            return
        except (ConsumerError, ProtocolError, TransportError) as exc:
            self._consumer_error(str(exc), frame)
            return
        except Exception as exc:  # never let a loop callback die
            log.exception("%s: internal error on a front-end message", self.name)
            self._consumer_error(f"internal error: {exc!r}", frame)
            return
        finally:
            if frame is not None:
                frame.close_fds()
        self.device.rx_flush()

    def _on_backend_readable(self) -> None:
        conn = self.conn
        if conn is None or conn.backend is None:
            return
        backend = conn.backend
        try:
            for _ in range(BATCH):
                if not self.device.rx_ready():
                    if self.conn is conn:
                        self._pause_reading(conn)
                    break
                frame = backend.recv_frame_nowait()
                if frame is None:
                    break
                nfds = len(frame.fds)
                frame.close_fds()
                try:
                    code, _ = m.decode(m.Direction.BACKEND, frame.request, frame.flags,
                                       frame.payload, nfds, reply=True)
                except ProtocolError as exc:
                    raise ConsumerError(f"back-end request socket: {exc}") from exc
                if nfds:
                    raise ConsumerError(f"back-end request socket: the {code.name} reply "
                                        f"carries {nfds} fds; none can be tunnelled")
                log.debug("%s: front-end → rxq: %s reply to a back-end request", self.name,
                          code.name)
                data = m.format_message(frame.request, frame.flags, frame.payload)
                if not self.device.rx_put(data) or self.conn is not conn:
                    break
        except ConnectionClosed:
            log.info("%s: the front-end closed the back-end request socket", self.name)
            self._close_backend(conn)
        except (ConsumerError, ProtocolError, TransportError) as exc:
            self._consumer_error(str(exc), None)
            return
        except Exception as exc:
            log.exception("%s: internal error on the back-end request socket", self.name)
            self._consumer_error(f"internal error: {exc!r}", None)
            return
        self.device.rx_flush()

    def _from_frontend(self, conn: Connection, frame: Frame) -> bytes:
        """Check one front-end message, consume its fds; the bytes to put in rxq."""
        try:
            code, value = m.decode(m.Direction.FRONTEND, frame.request, frame.flags,
                                   frame.payload, len(frame.fds))
        except ProtocolError as exc:
            raise ConsumerError(str(exc)) from exc
        request = FR(code)
        why = REFUSED_FRONTEND.get(request)
        if why is not None:
            raise ConsumerError(f"{request.name} is not tunnelled: {why}")
        payload = frame.payload
        if request in (FR.SET_MEM_TABLE, FR.ADD_MEM_REG, FR.REM_MEM_REG):
            regions = (value.regions if isinstance(value, m.MemoryTable)
                       else (value.region,) if isinstance(value, m.SingleRegion) else ())
            for i, fd in enumerate(frame.fds):
                self._check_memory(request, regions[i], fd)
            frame.close_fds()
        elif request in (FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR):
            assert isinstance(value, m.VringFile)
            self._take_vring_fd(conn, request, value, frame)
        elif request is FR.SET_LOG_FD:
            self._take_log_fd(conn, frame)
        elif request is FR.SET_BACKEND_REQ_FD:
            self._take_backend_socket(conn, frame)
        elif request is FR.SET_PROTOCOL_FEATURES:
            assert isinstance(value, m.U64)
            masked = value.value & TUNNEL_PROTOCOL_FEATURES
            if masked != value.value:
                log.warning("%s: SET_PROTOCOL_FEATURES %#x masked to %#x (not tunnelled: %s)",
                            self.name, value.value, masked,
                            ", ".join(_feature_names(value.value & ~masked)))
            conn.protocol_features = masked
            payload = m.U64(masked).pack()
        if frame.fds:  # pragma: no cover - decode bounds fds to the requests above
            raise ConsumerError(f"{request.name}: {len(frame.fds)} unexpected fds")
        log.debug("%s: front-end → rxq: %s (%d bytes)", self.name, request.name, len(payload))
        return m.format_message(frame.request, frame.flags, payload)

    def _check_memory(self, request: FR, region: MemoryRegion, fd: int) -> None:
        ram = self.device.ram
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ConsumerError(f"{request.name}: cannot stat a memory fd: {exc}") from exc
        if (st.st_dev, st.st_ino) != ram.identity or not stat.S_ISREG(st.st_mode):
            raise ConsumerError(
                f"{request.name}: region at guest {region.guest_phys_addr:#x} is backed by a "
                f"file other than the provisioned RAM file {ram.describe()} (got dev "
                f"{st.st_dev:#x} inode {st.st_ino}); start the consumer with "
                f"memory-backend-file,mem-path={ram.path},share=on")
        end = region.mmap_offset + region.memory_size
        limit = min(st.st_size, self.device.shm_size)
        if region.memory_size == 0 or end > limit:
            raise ConsumerError(
                f"{request.name}: region at guest {region.guest_phys_addr:#x} covers file "
                f"bytes [{region.mmap_offset:#x}, {end:#x}), outside the {limit:#x} bytes of "
                f"{ram.path} the appliance sees")

    def _check_index(self, request: FR, index: int) -> None:
        if index >= self.device.max_queues:
            raise ConsumerError(f"{request.name}: vring {index} is past max_vhost_queues "
                                f"({self.device.max_queues})")

    def _take_vring_fd(self, conn: Connection, request: FR, value: m.VringFile,
                       frame: Frame) -> None:
        self._check_index(request, value.index)
        index = value.index
        fd = frame.fds.pop(0) if frame.fds else None
        what = f"{request.name}: vring {index}"
        if fd is not None and not is_eventfd(fd):
            os.close(fd)
            raise ConsumerError(f"{what}: the fd is not an eventfd")
        if request is FR.SET_VRING_KICK:
            old = conn.kicks.pop(index, None)
            if old is not None:
                self.loop.remove_reader(old)
                self._close_eventfd(conn, old)
            conn.kick_streaks.pop(index, None)
            if fd is not None:
                semaphore = self._claim_eventfd(conn, fd, what, _role(request, index))
                conn.kicks[index] = fd
                if semaphore is None:
                    conn.kick_streaks[index] = 0
                self.loop.add_reader(fd, self._on_kick, conn, index, fd)
            return
        table = conn.calls if request is FR.SET_VRING_CALL else conn.errs
        old = table.pop(index, None)
        if old is not None:
            self._close_eventfd(conn, old)
        if fd is not None:
            self._claim_eventfd(conn, fd, what, _role(request, index))
            table[index] = fd
        if request is FR.SET_VRING_CALL and self.on_calls is not None:
            self.on_calls(conn.calls)

    def _take_log_fd(self, conn: Connection, frame: Frame) -> None:
        fd = frame.fds.pop(0) if frame.fds else None
        if fd is not None and not is_eventfd(fd):
            os.close(fd)
            raise ConsumerError("SET_LOG_FD: the fd is not an eventfd")
        if conn.log_fd is not None:
            self._close_eventfd(conn, conn.log_fd)
            conn.log_fd = None
        if fd is not None:
            self._claim_eventfd(conn, fd, "SET_LOG_FD", _role(FR.SET_LOG_FD, 0))
            conn.log_fd = fd

    def _claim_eventfd(self, conn: Connection, fd: int, what: str, role: str) -> bool | None:
        """Check eventfd ``fd`` (owned: closed if refused) for ``role``; whether it is
        in semaphore mode (None: the kernel does not say). ConsumerError if it is
        a semaphore-mode kick or already serves another role."""
        try:
            info = eventfd_info(fd)
        except FdError as exc:
            os.close(fd)
            raise ConsumerError(f"{what}: {exc}") from exc
        if info.semaphore and role.startswith("kick"):
            os.close(fd)
            raise ConsumerError(f"{what}: the kick eventfd was made with EFD_SEMAPHORE (each "
                                "read takes 1 and it stays readable: a kick storm); give an "
                                "ordinary eventfd")
        if info.ident is not None:
            holder = HELD_EVENTFDS.claim(info.ident, self.name, role)
            if holder is not None:
                os.close(fd)
                device, other = holder
                where = "of this link" if device == self.name else f"of device {device}"
                raise ConsumerError(f"{what}: the eventfd given as the {role} is already the "
                                    f"{other} {where}; each role needs its own eventfd")
            conn.idents[fd] = info.ident
        return info.semaphore

    def _close_eventfd(self, conn: Connection, fd: int) -> None:
        ident = conn.idents.pop(fd, None)
        if ident is not None:
            HELD_EVENTFDS.release(ident)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _take_backend_socket(self, conn: Connection, frame: Frame) -> None:
        try:
            sock = unix_stream_socket(frame.fds.pop(0), "SET_BACKEND_REQ_FD")
        except FdError as exc:
            raise ConsumerError(str(exc)) from exc
        self._close_backend(conn)
        conn.backend = UnixChannel(sock, max_payload=m.MAX_PAYLOAD,
                                   limit_for=m.request_limits(m.Direction.BACKEND, True),
                                   name=f"{self.name} back-end request socket")
        conn.backend_outbox = Outbox(sock, self.loop, on_drained=self._tx_drained,
                                     on_error=lambda exc: self._backend_send_failed(conn, exc))
        if conn.reading:
            self.loop.add_reader(conn.backend.fileno(), self._on_backend_readable)

    def _backend_send_failed(self, conn: Connection, exc: OSError) -> None:
        log.warning("%s: cannot send to the back-end request socket: %s", self.name, exc)
        self._close_backend(conn)
        self._tx_drained()

    def _close_backend(self, conn: Connection) -> None:
        if conn.backend is None:
            return
        if conn.reading:
            self.loop.remove_reader(conn.backend.fileno())
        if conn.backend_outbox is not None:
            conn.backend_outbox.close()
        conn.backend.close()
        conn.backend = None
        conn.backend_outbox = None

    def _on_kick(self, conn: Connection, index: int, fd: int) -> None:
        # One read per readable event takes every kick written since the last one
        # (never blocking, whatever the front-end did to the file's flags), so each
        # vring costs at most one notification per loop turn however hard it is
        # kicked, and the loop's turns go round every ready fd of every link.
        try:
            count = eventfd_take(fd)
        except OSError as exc:  # pragma: no cover - an eventfd checked when taken
            log.warning("%s: reading the kick eventfd of queue %d: %s", self.name, index, exc)
            return
        if count == 0:
            return
        if count > 1:
            self.device.stats.kicks_coalesced += 1
        streak = conn.kick_streaks.get(index)
        if streak is not None:
            streak = streak + 1 if count == 1 and _still_readable(fd) else 0
            conn.kick_streaks[index] = streak
            if streak >= SEMAPHORE_STREAK:
                self._consumer_error(f"the kick eventfd of vring {index} stays readable after "
                                     f"{streak} reads of 1 in a row: an EFD_SEMAPHORE eventfd "
                                     "(a kick storm); give an ordinary eventfd", None)
                return
        try:
            self.device.notify_kick(index)
        except Exception:  # never let a loop callback die
            log.exception("%s: internal error delivering a kick of queue %d", self.name, index)

    # --- dropping the link ------------------------------------------------------------

    def _consumer_error(self, why: str, frame: Frame | None) -> None:
        self.device.stats.errors += 1
        conn = self.conn
        log.error("%s: front-end error: %s; dropping the connection", self.name, why)
        if conn is not None and frame is not None and frame.flags & m.HeaderFlags.NEED_REPLY:
            # Best effort: a failure ack, so the front-end logs why before it sees EOF.
            ack = m.encode_bytes(frame.request, m.U64(1), reply=True)
            with contextlib.suppress(OSError):
                conn.channel.sock.send(ack, socket.MSG_DONTWAIT)
        if conn is not None:
            self.device.stats.link_resets += 1
        self._frontend_gone(why)

    def _frontend_gone(self, why: str) -> None:
        """The front-end's side ended the link: status 0 and a config interrupt."""
        if self.link.can(LinkEvent.FRONTEND_GONE):
            self.link.fire(LinkEvent.FRONTEND_GONE)
        self._drop(why, notify=True)
        self._update_accepting()

    def _drop(self, why: str, *, notify: bool) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        self._pause_reading(conn)
        conn.outbox.close()
        self._close_backend(conn)
        for fd in conn.kicks.values():
            self.loop.remove_reader(fd)
        for fd in conn.fds():
            self._close_eventfd(conn, fd)
        conn.kicks.clear()
        conn.calls.clear()
        conn.errs.clear()
        conn.log_fd = None
        if self.on_calls is not None:
            self.on_calls({})
        conn.channel.close()
        log.info("%s: front-end #%d disconnected (%s)", self.name, conn.number, why)
        self.device.frontend_disconnected(notify=notify)


def _feature_names(bits: int) -> list[str]:
    return m.features_by_name(bits, {f.value: f.name for f in PF})


__all__ = ["REFUSED_BACKEND", "REFUSED_FRONTEND", "TUNNEL_PROTOCOL_FEATURES", "ConsumerError",
           "VhostUserTunnel"]
