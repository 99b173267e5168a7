"""What a vhost-user session needs from the medium it runs over.

Two transports carry the same protocol:

* the **socket transport** (this module): an AF_UNIX SOCK_STREAM connection, file
  descriptors passed as SCM_RIGHTS; memory regions arrive as fds to mmap, kicks as
  eventfds to wait on, calls and errors as eventfds to write;
* the **VVU transport** (``vvu_runtime.driver``, later): messages arrive through the
  VVU device's rx/tx virtqueues with no fds; memory is a window of a PCI BAR,
  kicks are MSI-X interrupts (a vfio eventfd, or a poll), calls are doorbell
  writes.

The session is written against this seam only:

* :class:`Channel` - receive one whole message (header, payload, fds), send one,
  ``fileno()`` for the event loop, ``close()``;
* :class:`Transport` - the per-connection resources a message refers to:
  ``map_region(region, fd)`` gives a :class:`MappedRegion`, ``kick_source`` turns the
  fd of SET_VRING_KICK into a :class:`KickSource`, ``notifier`` turns the fd of
  SET_VRING_CALL/ERR into a :class:`Notifier`. On the VVU transport the fd argument
  is ``None`` and the transport looks the resource up by queue index instead.

:class:`UnixChannel` is the socket channel. It reads the 12-byte header with its
ancillary fds, then exactly ``size`` bytes of payload; fds of a message that is
rejected are closed before the error propagates, so a hostile peer cannot make the
process leak descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import select
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NoReturn

from vvu_runtime.fds import (
    FdError,
    Outbox,
    close_fds,
    eventfd_signal,
    eventfd_take,
    fds_from_ancdata,
    rights,
    unix_stream_socket,
)
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import (
    ConnectionClosed,
    FramingError,
    TransportError,
)
from vvu_runtime.virtio.errors import GuestMemoryError
from vvu_runtime.virtio.memory import DirtyLog, MappedRegion, MemoryRegion, map_fd

# --------------------------------------------------------------------------- notifiers

#: A memory-mapped 32-bit register and what to store in it: (its window, writable;
#: the register's index in that window counted in 32-bit words; the value).
Register32 = tuple[memoryview, int, int]


class NotifierKind(enum.StrEnum):
    """What a notifier signals: a vring's call or err, or the dirty log (SET_LOG_FD)."""

    CALL = "call"
    ERR = "err"
    LOG = "log"



class Notifier(ABC):
    """Where the back-end signals the front-end (call, err, log)."""

    @abstractmethod
    def signal(self) -> None:
        """Raise the notification. Must not block and must not raise on a full counter."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the resource behind the notifier."""

    def register(self) -> Register32 | None:
        """The 32-bit store that raises this notification now, for a compiled loop
        that rings it itself (backends/blk/_serve_c.c); None: call :meth:`signal`.
        Valid until the session next changes the notifier."""
        return None


class KickSource(ABC):
    """Where the front-end's kicks arrive: something the event loop can wait on."""

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that becomes readable on a kick."""

    @abstractmethod
    def drain(self) -> bool | None:
        """Consume the pending kicks (after the descriptor became readable).

        True means the source was signalled again at once (a kick storm, e.g. a
        semaphore eventfd with a huge count): the session then waits a little
        before it listens again instead of spinning."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the resource behind the kick source."""


class EventFdNotifier(Notifier):
    """An eventfd the front-end gave us (SET_VRING_CALL/ERR, SET_LOG_FD). Owns the fd.

    The front-end shares the file and may have made it blocking or filled its
    counter: :func:`eventfd_signal` never blocks either way."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def signal(self) -> None:
        with contextlib.suppress(OSError):  # a broken call fd is the front-end's loss
            eventfd_signal(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EventFdKick(KickSource):
    """An eventfd the front-end kicks (SET_VRING_KICK). Owns the fd.

    Read with :func:`eventfd_take`, non-blocking per call: the front-end shares
    the file and can clear O_NONBLOCK whenever it likes."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> bool:
        # A semaphore eventfd gives exactly 1 per read and stays readable; a plain
        # one gives its whole count and is empty after, unless a kick raced in
        # between two reads. Three reads of 1 in a row: a storm, not a race.
        return all(eventfd_take(self.fd) == 1 for _ in range(3))  # stops at the first not 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Transport(ABC):
    """Resources of one connection that messages refer to (memory, kicks, calls).

    On the socket transport every resource arrives as an fd of the message; on a
    transport without fd passing (``passes_fds`` False, the VVU transport) the
    ``fd`` arguments are ``None`` and the transport finds the resource by what the
    message names (region, queue index). Methods raise ``VirtioError``
    (GuestMemoryError) or ``VhostUserError`` (RequestError, TransportError).
    """

    #: Whether messages carry fds. Without, the session skips fd-count checks and
    #: does not offer protocol features whose replies carry fds (INFLIGHT_SHMFD).
    passes_fds: bool = True

    @abstractmethod
    def map_region(self, region: MemoryRegion, fd: int | None) -> MappedRegion:
        """Map one memory-table entry (takes ownership of ``fd``)."""

    @abstractmethod
    def map_log(self, size: int, offset: int, fd: int | None) -> DirtyLog:
        """Map the dirty log of SET_LOG_BASE (takes ownership of ``fd``)."""

    @abstractmethod
    def kick_source(self, index: int, fd: int | None) -> KickSource | None:
        """The kick source of queue ``index`` (None: poll the ring)."""

    @abstractmethod
    def notifier(self, kind: NotifierKind, index: int, fd: int | None) -> Notifier | None:
        """The ``kind`` notifier of queue ``index`` (None: none)."""

    @abstractmethod
    def backend_channel(self, fd: int | None) -> Channel:
        """The back-end → front-end channel of SET_BACKEND_REQ_FD."""


class SocketTransport(Transport):
    """The socket transport: everything comes as an fd. Takes ownership of the fds."""

    passes_fds = True

    def map_region(self, region: MemoryRegion, fd: int | None) -> MappedRegion:
        if fd is None:
            raise GuestMemoryError(f"memory region {region}: no fd to map")
        try:
            return map_fd(region, fd)
        finally:
            os.close(fd)  # the mapping keeps the file alive

    def map_log(self, size: int, offset: int, fd: int | None) -> DirtyLog:
        if fd is None:
            raise GuestMemoryError("dirty log without a shared-memory fd (LOG_SHMFD)")
        try:
            return DirtyLog(fd, size, offset)
        finally:
            os.close(fd)

    def kick_source(self, index: int, fd: int | None) -> KickSource | None:
        return None if fd is None else EventFdKick(fd)

    def notifier(self, kind: NotifierKind, index: int, fd: int | None) -> Notifier | None:
        return None if fd is None else EventFdNotifier(fd)

    def backend_channel(self, fd: int | None) -> Channel:
        if fd is None:
            raise TransportError("SET_BACKEND_REQ_FD without a socket fd")
        try:
            sock = unix_stream_socket(fd, "SET_BACKEND_REQ_FD")
        except FdError as exc:
            raise TransportError(str(exc)) from exc
        return UnixChannel(sock, limit_for=m.request_limits(m.Direction.BACKEND, True),
                           name="backend channel")


# --------------------------------------------------------------------------- channels

#: How long a blocking sender waits for a peer that does not read.
SEND_TIMEOUT = 5.0
#: Bytes an event-loop sender lets wait for a peer before calling it stuck.
MAX_BACKLOG = 4 << 20
#: Most fds one message may carry (QEMU sends at most 8; a few spare to detect excess).
#: Also the most a partial message may collect over several reads, and the most
#: a channel queues for a peer that does not read: one peer cannot hoard fds.
MAX_FDS = 16


@dataclass(slots=True)
class Frame:
    """One message as it came off the wire: header fields, payload, fds (owned)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        close_fds(self.fds)


class Channel(ABC):
    """A bidirectional message channel of the vhost-user protocol."""

    @abstractmethod
    def recv_frame(self, timeout: float | None = None) -> Frame:
        """Block until one whole message has arrived (ConnectionClosed on EOF)."""

    @abstractmethod
    def recv_frame_nowait(self) -> Frame | None:
        """Read what is available; a whole message, or None if it is not complete yet."""

    @abstractmethod
    def send_frame(self, request: int, flags: int, payload: bytes,
                   fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message (fds are not closed: the caller keeps them)."""

    @abstractmethod
    def fileno(self) -> int:
        """Descriptor to wait on for incoming messages."""

    @abstractmethod
    def close(self) -> None:
        """Close the channel (idempotent)."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Whether close() was called."""

    @property
    def carries_fds(self) -> bool:
        """Whether fds travel with messages (False: the VVU transport strips them)."""
        return True

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:  # noqa: B027 - optional
        """Called by an event-loop user: sending must then never block ``loop``."""


class UnixChannel(Channel):
    """A vhost-user connection over an AF_UNIX stream socket with SCM_RIGHTS.

    ``max_payload`` bounds the payload size accepted before it is read (a header
    announcing more is a :class:`FramingError`). ``limit_for`` may give a tighter
    bound per request code (from the message table). The socket is made
    non-blocking; :meth:`recv_frame` waits with ``select``.
    """

    def __init__(self, sock: socket.socket, *, max_payload: int = 4096,
                 limit_for: dict[int, int] | None = None, name: str = "") -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.max_payload = max_payload
        self.limit_for = limit_for or {}
        self.name = name or f"fd {sock.fileno()}"
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None
        self._closed = False
        self._anc_size = socket.CMSG_SPACE(MAX_FDS * 4)
        self._outbox: Outbox | None = None
        self._send_error: OSError | None = None

    # -- receiving
    def _recv_some(self, want: int) -> bool:
        """One recvmsg of at most ``want`` bytes; False when nothing was available."""
        try:
            # MSG_DONTWAIT: the socket may be shared with the peer (a back-end
            # request socket), which can make the file blocking at any time.
            data, anc, msg_flags, _ = self.sock.recvmsg(
                want, self._anc_size, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._drop_partial()
            raise TransportError(f"{self.name}: receive failed: {exc}") from exc
        self._fds.extend(fds_from_ancdata(anc))
        if len(self._fds) > MAX_FDS:
            self._drop_partial()
            raise FramingError(f"{self.name}: more than {MAX_FDS} fds sent for one message")
        if msg_flags & socket.MSG_CTRUNC:
            self._drop_partial()
            raise FramingError(f"{self.name}: more than {MAX_FDS} fds on one message "
                               "(ancillary data truncated)")
        if not data:
            partial = bool(self._buf) or self._header is not None
            self._drop_partial()
            if partial:
                raise TransportError(f"{self.name}: peer hung up in the middle of a message")
            raise ConnectionClosed(f"{self.name}: peer closed the connection")
        self._buf += data
        return True

    def _drop_partial(self) -> None:
        close_fds(self._fds)
        self._buf.clear()
        self._header = None

    def recv_frame_nowait(self) -> Frame | None:
        if self._closed:
            raise ConnectionClosed(f"{self.name}: channel is closed")
        while True:
            if self._header is None:
                need = m.HEADER_SIZE - len(self._buf)
                if need > 0:
                    if not self._recv_some(need):
                        return None
                    continue
                request, flags, size = m.HEADER.unpack(self._buf)
                self._buf.clear()
                limit = self.limit_for.get(request, self.max_payload)
                if size > limit:
                    self._drop_partial()
                    raise FramingError(
                        f"{self.name}: request {request} announces a {size}-byte payload, "
                        f"more than the {limit} bytes allowed", request)
                self._header = (request, flags, size)
            request, flags, size = self._header
            need = size - len(self._buf)
            if need > 0:
                if not self._recv_some(need):
                    return None
                continue
            frame = Frame(request, flags, bytes(self._buf), self._fds)
            self._buf.clear()
            self._fds = []
            self._header = None
            return frame

    def recv_frame(self, timeout: float | None = None) -> Frame:
        while True:
            frame = self.recv_frame_nowait()
            if frame is not None:
                return frame
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TransportError(f"{self.name}: no message within {timeout} s")

    # -- sending
    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send without ever blocking ``loop``: what the socket does not take now is
        written when it is writable (a backlog past :data:`MAX_BACKLOG` is an error)."""
        if self._outbox is None:
            self._outbox = Outbox(self.sock, loop, on_error=self._send_failed)

    def _send_failed(self, exc: OSError) -> None:
        self._send_error = exc

    def _raise_send_error(self, exc: OSError) -> NoReturn:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            raise ConnectionClosed(f"{self.name}: peer closed the connection") from exc
        raise TransportError(f"{self.name}: send failed: {exc}") from exc

    def send_frame(self, request: int, flags: int, payload: bytes,
                   fds: list[int] | tuple[int, ...] = ()) -> None:
        if self._closed:
            raise ConnectionClosed(f"{self.name}: channel is closed")
        if self._send_error is not None:
            self._raise_send_error(self._send_error)
        data = memoryview(m.format_message(request, flags, payload))
        if self._outbox is not None:
            if self._outbox.pending > MAX_BACKLOG:
                raise TransportError(f"{self.name}: peer does not read ({self._outbox.pending} "
                                     "bytes waiting)")
            if fds and not self._outbox.empty:
                # Queued fds are our duplicates: a peer that asks for fd-carrying
                # replies and never reads them would fill our fd table.
                raise TransportError(f"{self.name}: peer does not read; not queueing "
                                     f"{len(fds)} more fds for it")
            self._outbox.send(data, fds)
            if self._send_error is not None:
                self._raise_send_error(self._send_error)
            return
        # A blocking caller (a front-end, a probe) waits for the peer, bounded.
        anc = rights(fds)
        while data:
            try:
                sent = self.sock.sendmsg([data], anc, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                _, ready, _ = select.select([], [self.sock], [], SEND_TIMEOUT)
                if not ready:
                    raise TransportError(f"{self.name}: peer does not read (send timed out)")\
                        from None
                continue
            except OSError as exc:
                self._raise_send_error(exc)
            data = data[sent:]
            anc = []

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_partial()
        if self._outbox is not None:
            self._outbox.close()
        self.sock.close()
