"""One VVU function re-exported as a vhost-user socket for a stock back-end.

:class:`ProxyLink` is the VVU link machine (``driver.endpoint.VvuLinkEndpoint``)
with a back-end connection in front of it. It arms the function (BACKEND_UP)
only while it holds an idle connection to the back-end, so a consumer never
meets a link with nobody behind it::

    WAITING   (no back-end connection: connecting, listening, or the supervised
               back-end is (re)starting)  --connected-->  READY
    READY     (link armed, connection idle)  --FRONTEND_UP-->  RELAYING: a
               ProxySession over the channel and the connection
    READY     --the idle connection hangs up-->  WAITING (BACKEND_UP cleared)
    RELAYING  --the session ends (consumer gone, back-end gone or faulty)-->
               WAITING: the connection is closed, so the back-end starts afresh
               (virtiofsd exits then: supervise it); the link is re-armed once
               a new connection is up
    any       --close()-->  CLOSED

The back-end listens on ``socket_path`` (:attr:`BackendMode.CONNECT`, the proxy
connects, retrying every ``retry`` seconds: qemu-storage-daemon, virtiofsd) or
connects to the proxy listening there (:attr:`BackendMode.LISTEN`: DPDK with
``client=1``). With ``command`` the proxy starts the back-end itself and restarts
it whenever it exits (:class:`BackendProcess`).

The link's :class:`~vvu_runtime.proxy.relay.InflightStore` outlives sessions:
when a session ended because of the back-end, the next back-end gets the same
inflight area and resumes what the consumer still has in flight; when the
consumer went away, the area is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

from vvu_runtime.driver.access import PciAccess
from vvu_runtime.driver.endpoint import STATUS_POLL, VvuLinkEndpoint
from vvu_runtime.driver.pci import PciFunction
from vvu_runtime.driver.transport import VvuChannel
from vvu_runtime.fds import UnixListener
from vvu_runtime.proxy.relay import POLL_INTERVAL, EndCause, InflightStore, ProxySession
from vvu_runtime.virtio.vvu_link import LinkState

log = logging.getLogger(__name__)

#: Delay between attempts to connect to a back-end that does not listen (yet).
CONNECT_RETRY = 0.2
#: First delay before restarting a supervised back-end that exited; doubles per
#: quick exit up to :data:`RESTART_MAX`, back to the first after a long run.
RESTART_DELAY = 0.2
RESTART_MAX = 10.0
#: A back-end that ran this long before exiting is restarted without delay growth.
STABLE_RUN = 10.0
#: How long a supervised back-end gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0


class BackendMode(enum.StrEnum):
    """Who listens on the back-end's socket."""

    CONNECT = "connect"   # the back-end listens, the proxy connects
    LISTEN = "listen"     # the proxy listens, the back-end connects


class BackendState(enum.Enum):
    WAITING = "waiting for the back-end"
    READY = "ready (armed)"
    RELAYING = "relaying"
    CLOSED = "closed"


class BackendProcess:
    """A back-end the proxy supervises: started, restarted on exit, stopped on close.

    Runs in its own session (process group), so stopping it stops its children;
    its exit is seen through a pidfd on the loop (no thread, no SIGCHLD handler).
    """

    def __init__(self, argv: Sequence[str], loop: asyncio.AbstractEventLoop, *,
                 name: str) -> None:
        if not argv:
            raise ValueError("empty back-end command")
        self.argv = list(argv)
        self.loop = loop
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._delay = RESTART_DELAY
        self._started_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: Starts so far (the first included), exits seen.
        self.starts = 0
        self.exits = 0

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        self._timer = None
        if self._closed or self.proc is not None:
            return
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            log.error("%s: cannot start the back-end %s: %s; retrying in %.1f s", self.name,
                      self.argv[0], exc, self._delay)
            self._schedule()
            return
        self.proc = proc
        self.starts += 1
        self._started_at = time.monotonic()
        self._pidfd = os.pidfd_open(proc.pid)
        self.loop.add_reader(self._pidfd, self._exited)
        log.info("%s: back-end started (pid %d): %s", self.name, proc.pid,
                 " ".join(self.argv))

    def _schedule(self) -> None:
        self._timer = self.loop.call_later(self._delay, self.start)
        self._delay = min(self._delay * 2, RESTART_MAX)

    def _reap(self) -> int | None:
        proc, self.proc = self.proc, None
        if self._pidfd >= 0:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        return None if proc is None else proc.wait()

    def _exited(self) -> None:
        code = self._reap()
        self.exits += 1
        if time.monotonic() - self._started_at >= STABLE_RUN:
            self._delay = RESTART_DELAY
        log.warning("%s: back-end exited with status %s; restarting it in %.1f s", self.name,
                    code, self._delay)
        if not self._closed:
            self._schedule()

    def close(self) -> None:
        """Stop the back-end (SIGTERM to its group, SIGKILL after STOP_TIMEOUT)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s: back-end ignored SIGTERM; killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._reap()


class ProxyLink(VvuLinkEndpoint):
    """Re-export the VVU function ``address`` (or ``pci``) to a back-end on
    ``socket_path`` (module docstring)."""

    def __init__(self, socket_path: str | os.PathLike[str], address: str | None = None, *,
                 mode: BackendMode = BackendMode.CONNECT, command: Sequence[str] = (),
                 pci: PciFunction | None = None, access: PciAccess = PciAccess.AUTO,
                 virtio_id: int | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 status_poll: float = STATUS_POLL, retry: float = CONNECT_RETRY,
                 poll_interval: float = POLL_INTERVAL, label: str = "") -> None:
        self.socket_path = os.fspath(socket_path)
        super().__init__(label or f"proxy {self.socket_path}", address, pci=pci,
                         access=access, virtio_id=virtio_id, loop=loop,
                         status_poll=status_poll)
        self.mode = mode
        self.command = list(command)
        self.retry = retry
        self.poll_interval = poll_interval
        self.state = BackendState.WAITING
        self.inflight = InflightStore(self.name)
        self.process: BackendProcess | None = None
        self._idle: socket.socket | None = None
        self._listener: UnixListener | None = None
        self._connect_timer: asyncio.Handle | None = None
        #: Back-end connections made, and how the sessions ended (for logs and tests).
        self.backend_connections = 0
        self.ends: list[EndCause] = []
        #: Set the first time the link is armed (BACKEND_UP): what READY=1 waits for.
        self.armed = asyncio.Event()

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the function (not armed yet: may_arm() waits for the back-end), then
        the back-end side; on failure everything started is closed again."""
        super().start()
        assert self.loop is not None
        try:
            if self.mode is BackendMode.LISTEN:
                self._listener = UnixListener(self.socket_path, 1)
                self._listener.watch(self.loop, self._on_accept)
            if self.command:
                self.process = BackendProcess(self.command, self.loop, name=self.name)
                self.process.start()
            if self.mode is BackendMode.CONNECT:
                self._want_backend()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.state = BackendState.CLOSED
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        super().close()  # ends the session first: its on_end sees CLOSED
        self._drop_idle()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.process is not None:
            self.process.close()
        self.inflight.discard()

    # -- the back-end connection ------------------------------------------------------------
    def may_arm(self) -> bool:
        return self._idle is not None

    def _arm(self) -> None:
        super()._arm()
        if self.link.state is LinkState.ARMED:
            self.armed.set()

    def _want_backend(self, delay: float = 0.0) -> None:
        """No connection: get one (connect mode) or wait for one (listen mode)."""
        if self.state is BackendState.CLOSED:
            return
        # The line vvu-backend turns into the link's state (appliance/backend.py).
        log.info("%s: waiting for the back-end at %s", self.name, self.socket_path)
        self.state = BackendState.WAITING
        if self.mode is BackendMode.CONNECT and self._connect_timer is None:
            assert self.loop is not None
            self._connect_timer = self.loop.call_later(delay, self._connect)

    def _connect(self) -> None:
        self._connect_timer = None
        if self.state is not BackendState.WAITING or self._idle is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                log.warning("%s: cannot connect to the back-end at %s: %s", self.name,
                            self.socket_path, exc)
            assert self.loop is not None
            self._connect_timer = self.loop.call_later(self.retry, self._connect)
            return
        self._take(sock)

    def _on_accept(self) -> None:
        assert self._listener is not None
        sock = self._listener.accept()
        if sock is None:
            return
        if self.state is not BackendState.WAITING or self._idle is not None:
            log.warning("%s: a second back-end connection while one is in use; closed",
                        self.name)
            sock.close()
            return
        self._take(sock)

    def _take(self, sock: socket.socket) -> None:
        assert self.loop is not None
        self.backend_connections += 1
        self._idle = sock
        # A back-end that hangs up (or talks) before the consumer comes: drop it.
        self.loop.add_reader(sock.fileno(), self._idle_readable)
        log.info("%s: back-end connected at %s", self.name, self.socket_path)
        self.state = BackendState.READY
        self.arm()

    def _idle_readable(self) -> None:
        log.warning("%s: the back-end hung up (or spoke first) before a consumer came; "
                    "reconnecting", self.name)
        self._drop_idle()
        self.drop()  # clear BACKEND_UP: no consumer may come without a back-end
        # Not at once: a back-end that serves one front-end at a time may not have
        # seen the previous connection end yet (that is how it refused this one).
        self._want_backend(self.retry)

    def _drop_idle(self) -> None:
        sock, self._idle = self._idle, None
        if sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(sock.fileno())
            sock.close()

    # -- sessions ------------------------------------------------------------------------------
    def new_session(self, channel: VvuChannel) -> ProxySession:
        sock, self._idle = self._idle, None
        if sock is None:
            # FRONTEND_UP without a connection cannot happen (not armed without one);
            # a session over a dead socket ends at once and the link re-arms.
            sock, other = socket.socketpair()
            other.close()
        elif self.loop is not None:
            self.loop.remove_reader(sock.fileno())
        assert self.loop is not None
        self.state = BackendState.RELAYING
        return ProxySession(channel, sock, inflight=self.inflight, loop=self.loop,
                            on_end=self._session_ended,
                            name=f"{self.name} #{self.connections}",
                            poll_interval=self.poll_interval)

    def _session_ended(self, session: ProxySession, cause: EndCause) -> None:
        self.ends.append(cause)
        if cause is EndCause.FRONTEND:
            self.inflight.discard()  # the consumer is gone: nothing is in flight for it
        self.session_closed(session)  # clears BACKEND_UP unless the endpoint ended it
        self._want_backend()


__all__ = ["BackendMode", "BackendProcess", "BackendState", "ProxyLink"]
