"""Listening and connecting vhost-user endpoints of a back-end.

:class:`VhostUserServer` listens on a UNIX socket path (QEMU connects with
``-chardev socket,path=...,reconnect-ms=...``) and serves one
:class:`BackendSession` at a time: a second concurrent connection is refused
with a log line (and closed) while the first goes on. It accepts reconnections
forever; ``close()`` ends the session and removes the socket file.

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

from vvu_runtime.fds import FdError, UnixListener
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.backend import BackendSession
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.errors import TransportError
from vvu_runtime.vhost_user.transport import UnixChannel

log = logging.getLogger(__name__)


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

    def start(self) -> None:
        """Bind and listen; raises TransportError/OSError with the path in the message."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        try:
            self._listener = UnixListener(self.path, self.backlog)
        except FdError as exc:
            raise TransportError(str(exc)) from exc
        self._listener.watch(self.loop, self._on_accept)
        log.debug("%s: listening on %s", self.device.name, self.path)

    def _on_accept(self) -> None:
        assert self._listener is not None and self.loop is not None
        try:
            conn = self._listener.accept()
        except OSError as exc:
            log.error("%s: accept on %s failed: %s", self.device.name, self.path, exc)
            return
        if conn is None:
            return
        if self.session is not None and not self.session.closed:
            log.warning("%s: refusing a second connection on %s (one front-end at a time)",
                        self.device.name, self.path)
            conn.close()
            return
        self.connections += 1
        name = f"{self.path} #{self.connections}"
        self.session = BackendSession(backend_channel(conn, name), self.device,
                                      loop=self.loop, on_close=self._session_closed,
                                      name=f"connection {self.connections}")
        self.session.start()

    def _session_closed(self, session: BackendSession) -> None:
        if self.session is session:
            self.session = None

    def close(self) -> None:
        """End the session, stop listening, remove the socket file (idempotent)."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._listener is not None:
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
