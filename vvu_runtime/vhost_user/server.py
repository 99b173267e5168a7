"""Listening and connecting vhost-user endpoints of a back-end.

:class:`VhostUserServer` listens on a UNIX socket path (QEMU connects with
``-chardev socket,path=...,reconnect-ms=...``) and serves one
:class:`BackendSession` at a time: a second concurrent connection is refused
with a log line (and closed) while the first goes on. It accepts reconnections
forever; ``close()`` ends the session and removes the socket file. When accept()
fails for lack of fds or memory the listener rests for :data:`ACCEPT_RETRY`
instead of spinning on a connection it cannot take; such log lines, and those
of refused connections, are rate-limited (:class:`LogThrottle`).

:class:`VhostUserClient` connects to a front-end that listens
(``-chardev socket,path=...,server=on``), retrying every ``retry_interval``
seconds until it succeeds, and again after each disconnect.

Both run on the current asyncio event loop (``start()`` must be called from a
running loop or with ``loop=`` given).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from vvu_runtime.fds import FdError, UnixListener
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.backend import BackendSession
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.errors import TransportError
from vvu_runtime.vhost_user.transport import UnixChannel

log = logging.getLogger(__name__)

#: accept() errors that mean "no fd or memory for the connection now".
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long the listener rests after such an error before it tries again.
ACCEPT_RETRY = 0.5
#: Repeated log lines of one kind are written at most once per this many seconds.
LOG_INTERVAL = 10.0


class LogThrottle:
    """Log a recurring line at most once per :data:`LOG_INTERVAL`, saying how many
    were left out: a peer that makes us fail in a loop must not flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._skipped = 0

    def _log(self, level: int, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            fmt += f" ({self._skipped} more like this in the last {self.interval:g} s)"
            self._skipped = 0
        self._next = now + self.interval
        self.logger.log(level, fmt, *args)

    def error(self, fmt: str, *args: object) -> None:
        self._log(logging.ERROR, fmt, *args)

    def warning(self, fmt: str, *args: object) -> None:
        self._log(logging.WARNING, fmt, *args)


def backend_channel(sock: socket.socket, name: str) -> UnixChannel:
    """A channel on which a back-end reads front-end requests."""
    return UnixChannel(sock, max_payload=m.MAX_PAYLOAD,
                       limit_for=m.request_limits(m.Direction.FRONTEND, False), name=name)


class VhostUserServer:
    """Listen on ``path`` and serve ``device``, one connection at a time."""

    def __init__(self, path: str | os.PathLike[str], device: VhostUserDevice, *,
                 loop: asyncio.AbstractEventLoop | None = None, backlog: int = 4) -> None:
        self.path = os.fspath(path)
        self.device = device
        self.loop = loop
        self.backlog = backlog
        self.session: BackendSession | None = None
        self.connections = 0
        self._listener: UnixListener | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._accept_log = LogThrottle(log)
        self._refuse_log = LogThrottle(log)

    def start(self) -> None:
        """Bind and listen; raises TransportError/OSError with the path in the message."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        try:
            self._listener = UnixListener(self.path, self.backlog)
        except FdError as exc:
            raise TransportError(str(exc)) from exc
        self.loop.add_reader(self._listener.fileno(), self._on_accept)
        log.debug("%s: listening on %s", self.device.name, self.path)

    def _on_accept(self) -> None:
        assert self._listener is not None and self.loop is not None
        try:
            conn = self._listener.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                # The connection stays in the backlog and the socket readable:
                # listening on would spin. Look again a little later.
                self._pause_accepting()
                self._accept_log.error("%s: cannot accept on %s (%s); retrying every %g s",
                                       self.device.name, self.path, exc, ACCEPT_RETRY)
            else:
                log.debug("%s: accept on %s failed: %s", self.device.name, self.path, exc)
            return
        if conn is None:
            return
        if self.session is not None and not self.session.closed:
            self._refuse_log.warning("%s: refusing a second connection on %s (one front-end "
                                     "at a time)", self.device.name, self.path)
            conn.close()
            return
        self.connections += 1
        name = f"{self.path} #{self.connections}"
        self.session = BackendSession(backend_channel(conn, name), self.device,
                                      loop=self.loop, on_close=self._session_closed,
                                      name=f"connection {self.connections}")
        self.session.start()

    def _pause_accepting(self) -> None:
        assert self._listener is not None and self.loop is not None
        if self._retry is not None:
            return
        self.loop.remove_reader(self._listener.fileno())
        self._retry = self.loop.call_later(ACCEPT_RETRY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._retry = None
        if self._listener is not None and self.loop is not None:
            self.loop.add_reader(self._listener.fileno(), self._on_accept)

    def _session_closed(self, session: BackendSession) -> None:
        if self.session is session:
            self.session = None

    def close(self) -> None:
        """End the session, stop listening, remove the socket file (idempotent)."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._listener is not None:
            if self.loop is not None:
                self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None


class VhostUserClient:
    """Connect to a front-end listening on ``path``, retrying, and serve ``device``."""

    def __init__(self, path: str | os.PathLike[str], device: VhostUserDevice, *,
                 retry_interval: float = 1.0,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.path = os.fspath(path)
        self.device = device
        self.retry_interval = retry_interval
        self.loop = loop
        self.session: BackendSession | None = None
        self.connections = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._warned = False

    def start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._try_connect()

    def _try_connect(self) -> None:
        assert self.loop is not None
        self._timer = None
        if self._closed:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if not self._warned:
                log.info("%s: cannot connect to %s (%s); retrying every %.1f s",
                         self.device.name, self.path,
                         errno.errorcode.get(exc.errno or 0, exc), self.retry_interval)
                self._warned = True
            self._timer = self.loop.call_later(self.retry_interval, self._try_connect)
            return
        self._warned = False
        self.connections += 1
        self.session = BackendSession(
            backend_channel(sock, f"{self.path} #{self.connections}"), self.device,
            loop=self.loop, on_close=self._session_closed,
            name=f"connection {self.connections}")
        self.session.start()

    def _session_closed(self, session: BackendSession) -> None:
        if self.session is session:
            self.session = None
        if not self._closed and self.loop is not None:
            self._timer = self.loop.call_later(self.retry_interval, self._try_connect)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self.session.close()
            self.session = None
