"""File descriptors on UNIX sockets, shared by both protocols (vhost-user, vfio-user).

* :func:`close_fds`, :func:`is_eventfd`: owning lists of fds, checking what a
  peer handed us;
* :func:`fds_from_ancdata`, :func:`rights`: SCM_RIGHTS in and out;
* :func:`unix_stream_socket`: an fd a peer says is a UNIX stream socket, checked;
* :func:`remove_stale_socket`: a listening path left by a dead process is
  replaced, anything else refused; :class:`UnixListener` listens there and
  removes the file on close only while it is still ours;
* :class:`Outbox`: bytes (and fds) waiting for a non-blocking stream socket, so
  an event loop never blocks on a peer that does not read;
* :func:`eventfd_take`, :func:`eventfd_signal`: read and write an eventfd a
  peer shares without ever blocking, whatever the peer does to its flags;
  :func:`eventfd_info`: which eventfd an fd is (two fds of one eventfd cannot
  be told apart by fstat: every eventfd shares one anon inode) and whether it
  counts in semaphore mode.

An fd received from a peer shares its open file description with that peer,
which can clear O_NONBLOCK at any time: ``os.set_blocking`` once is no
protection. Reads therefore use per-call non-blocking I/O (``RWF_NOWAIT``,
``MSG_DONTWAIT``); eventfd writes, for which Linux has no per-call flag
(pwritev2 RWF_NOWAIT gives EOPNOTSUPP, reopening /proc/self/fd/N gives ENXIO),
check writability first and set O_NONBLOCK right before the write.

This is a base module: it imports nothing else of vvu_runtime. Errors are
:class:`FdError`; each layer wraps them into its own tree.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import stat
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vvu_runtime.errors import VvuError

_FD_SIZE = array.array("i").itemsize


class FdError(VvuError):
    """An fd or socket path that cannot be used as asked (the message says why)."""


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (errors ignored) and empty the list."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (a peer's claim checked before we signal it)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


_EVENTFD_ONE = (1).to_bytes(8, "little")


def eventfd_take(fd: int) -> int:
    """Read (and so reset) an eventfd's counter without blocking; 0 when it is zero.

    ``preadv2(RWF_NOWAIT)`` is non-blocking for this call only, so a peer that
    made the shared file blocking cannot stall us (eventfd supports it since
    Linux 5.12). An fd that is closed or not readable gives 0: the caller's
    link checks what kind of fd it holds when it takes it.
    """
    buf = bytearray(8)
    try:
        if os.preadv(fd, [buf], -1, os.RWF_NOWAIT) != 8:
            return 0
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP):
            return 0
        raise
    return int.from_bytes(buf, "little")


def eventfd_signal(fd: int) -> bool:
    """Add 1 to an eventfd a peer shares, never blocking; False if not written.

    A write blocks only when the counter is about to overflow, which means a
    wake-up is already pending: skipping it loses nothing. A peer would have
    to refill the counter and clear O_NONBLOCK between these three system
    calls to block us; :meth:`poll` first makes the ordinary attack (a full
    counter, a blocking file) a no-op.
    """
    try:
        ready = select.poll()
        ready.register(fd, select.POLLOUT)
        if not ready.poll(0):
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
        os.write(fd, _EVENTFD_ONE)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return False
        raise
    return True


@dataclass(frozen=True, slots=True)
class EventfdInfo:
    """What the kernel shows of an eventfd in /proc/self/fdinfo."""

    #: The eventfd's id ("eventfd-id"; older kernels lack it), the same for every fd of one
    #: eventfd and unique among live ones; None on kernels that do not show it.
    ident: int | None
    #: Made with EFD_SEMAPHORE ("eventfd-semaphore", added in 2023): each read takes 1
    #: and it stays readable; None on kernels that do not show it.
    semaphore: bool | None


def eventfd_info(fd: int) -> EventfdInfo:
    """:class:`EventfdInfo` of eventfd ``fd`` (FdError if fdinfo cannot be read)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError as exc:
        raise FdError(f"fd {fd}: cannot read its fdinfo: {exc.strerror or exc}") from exc
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    ident = fields.get("eventfd-id")
    sem = fields.get("eventfd-semaphore")
    return EventfdInfo(int(ident) if ident and ident.isdigit() else None,
                       None if sem is None else sem != "0")


def fds_from_ancdata(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS message in ``ancdata`` (recvmsg)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


def rights(fds: Iterable[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing ``fds`` (sendmsg); empty for no fds."""
    arr = array.array("i", fds)
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, arr.tobytes())] if arr else []


def unix_stream_socket(fd: int, what: str) -> socket.socket:
    """Wrap ``fd`` (owned: closed on failure) as a UNIX stream socket, or FdError."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise FdError(f"{what}: the fd is not a socket: {exc}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise FdError(f"{what}: the fd is not a UNIX stream socket")
    return sock


def remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; FdError for anything else
    (a file that is not a socket, a live listener, a socket we cannot probe)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FdError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: left by a dead process
            return
        raise FdError(f"{path}: cannot probe the existing socket: {exc}") from exc
    finally:
        probe.close()
    raise FdError(f"{path}: another process is listening there")


class UnixListener:
    """A non-blocking listening UNIX stream socket at ``path``, owned: a stale socket
    there is replaced (anything else refused), and :meth:`close` removes the file
    only if it is still the one we bound (same inode), not a successor's.

    :meth:`suspend` stops listening but leaves the file, so a connect() fails at
    once with ECONNREFUSED (a client that retries, such as QEMU's
    ``reconnect-ms``, retries instead of waiting in a backlog); :meth:`resume`
    binds the path again.
    """

    def __init__(self, path: str, backlog: int) -> None:
        self.path = path
        self.backlog = backlog
        self.sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._bind()

    def _bind(self) -> None:
        remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(self.backlog)
            st = os.stat(self.path)
        except OSError as exc:
            sock.close()
            raise FdError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        self.sock = sock
        self._inode = (st.st_dev, st.st_ino)

    @property
    def listening(self) -> bool:
        return self.sock is not None

    def fileno(self) -> int:
        assert self.sock is not None, "not listening"
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        """The next connection, or None when none is waiting (OSError on failure)."""
        assert self.sock is not None, "not listening"
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return conn

    def suspend(self) -> None:
        """Stop listening, keep the file: connects fail with ECONNREFUSED (idempotent);
        connections waiting in the backlog are reset."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def resume(self) -> None:
        """Listen again at the path after :meth:`suspend` (FdError if it was taken)."""
        if self.sock is None and self._inode is not None:
            self._bind()

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours (idempotent)."""
        self.suspend()
        inode, self._inode = self._inode, None
        if inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == inode:
                os.unlink(self.path)


class Outbox:
    """Bytes waiting for a non-blocking stream socket; the loop is never blocked.

    :meth:`send` writes what the socket takes now and queues the rest, which the
    loop writes when the socket is writable. fds travel with the first byte of
    their message; queued ones are duplicates the outbox owns (the caller keeps
    its own). A send error stops the outbox, drops what is queued and calls
    ``on_error``; ``on_drained`` runs when a backlog has been written out.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, *,
                 on_error: Callable[[OSError], None],
                 on_drained: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.loop = loop
        self.on_error = on_error
        self.on_drained = on_drained
        self._queue: deque[tuple[memoryview, list[int]]] = deque()
        #: Bytes queued, not yet taken by the socket.
        self.pending = 0
        self.writing = False

    @property
    def empty(self) -> bool:
        return not self._queue

    def send(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> None:
        fds = list(fds)
        if not self._queue:
            try:
                sent = self.sock.sendmsg([data], rights(fds), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            if sent:
                data, fds = memoryview(data)[sent:], []  # fds went with the first byte
        self._queue.append((memoryview(data), [os.dup(fd) for fd in fds]))
        self.pending += len(data)
        if not self.writing:
            self.loop.add_writer(self.sock.fileno(), self._flush)
            self.writing = True

    def _flush(self) -> None:
        while self._queue:
            view, fds = self._queue[0]
            try:
                sent = self.sock.sendmsg([view], rights(fds), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc)
                return
            close_fds(fds)
            self.pending -= sent
            if sent < len(view):
                self._queue[0] = (view[sent:], fds)
                return
            self._queue.popleft()
        self.stop()
        if self.on_drained is not None:
            self.on_drained()

    def _fail(self, exc: OSError) -> None:
        self.close()
        self.on_error(exc)

    def stop(self) -> None:
        """Stop waiting for the socket (what is queued stays)."""
        if self.writing:
            self.loop.remove_writer(self.sock.fileno())
            self.writing = False

    def close(self) -> None:
        """Stop and drop what is queued (closing the queued fds)."""
        self.stop()
        for _, fds in self._queue:
            close_fds(fds)
        self._queue.clear()
        self.pending = 0


__all__ = [
    "EventfdInfo",
    "FdError",
    "Outbox",
    "UnixListener",
    "close_fds",
    "eventfd_info",
    "eventfd_signal",
    "eventfd_take",
    "fds_from_ancdata",
    "is_eventfd",
    "remove_stale_socket",
    "rights",
    "unix_stream_socket",
]
