"""A scripted vhost-user back-end on a UNIX socket: what vvu-proxy's tests put behind it.

It listens like qemu-storage-daemon or virtiofsd do, takes one front-end at a
time, records every message with its fds (kept open until :meth:`close`, so a
test can map the memory it was handed or signal the call fds), and answers as
a plain back-end would. ``misbehave`` lets a test replace the answer to one
request with something a back-end must not send.

Runs in its own thread with blocking I/O, as a separate back-end process would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vvu_runtime.fds import close_fds
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import VhostUserError
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.transport import UnixChannel

#: Every protocol feature bit a back-end could offer (the proxy must mask them).
ALL_PROTOCOL_FEATURES = (1 << 21) - 1
FEATURES = m.VHOST_USER_F_PROTOCOL_FEATURES | (1 << 32)  # VERSION_1


@dataclass
class Received:
    """One message as the back-end got it (fds owned by the ScriptedBackend)."""

    connection: int
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def decoded(self) -> object:
        _, value = m.decode(m.Direction.FRONTEND, self.request, self.flags, self.payload,
                            len(self.fds), check_fds=False)
        return value


#: A misbehaviour: called with (the main channel, the request) instead of the answer.
Misbehave = Callable[[UnixChannel, Received], None]


class ScriptedBackend:
    """Listen on ``path``; answer every front-end like a plain back-end."""

    def __init__(self, path: str, *, protocol_features: int = ALL_PROTOCOL_FEATURES,
                 queue_num: int = 2) -> None:
        self.path = path
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.received: list[Received] = []
        self.misbehave: dict[int, Misbehave] = {}
        self.backend_channel: UnixChannel | None = None
        self.connections = 0
        self.channel: UnixChannel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(path)
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, name="scripted-backend",
                                        daemon=True)
        self._thread.start()

    # -- what the test looks at
    def messages(self, request: int, connection: int | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.request == request
                    and (connection is None or r.connection == connection)]

    def requests(self, connection: int | None = None) -> list[int]:
        with self._lock:
            return [r.request for r in self.received
                    if connection is None or r.connection == connection]

    def hang_up(self) -> None:
        """Close the current connection (a back-end that restarts)."""
        channel = self.channel
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)

    # -- the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            channel = UnixChannel(conn, max_payload=m.MAX_PAYLOAD,
                                  limit_for=m.request_limits(m.Direction.FRONTEND, False),
                                  name=f"scripted back-end #{self.connections}")
            self.channel = channel
            try:
                self._serve(channel, self.connections)
            except VhostUserError:
                pass  # the front-end went away (or the test hung up)
            finally:
                self.channel = None
                channel.close()

    def _serve(self, channel: UnixChannel, connection: int) -> None:
        while not self._stop.is_set():
            try:
                frame = channel.recv_frame(0.05)
            except VhostUserError as exc:
                if "no message within" in str(exc):
                    continue
                raise
            got = Received(connection, frame.request, frame.flags, frame.payload,
                           list(frame.fds))
            with self._lock:
                self.received.append(got)
            if frame.request == FR.SET_BACKEND_REQ_FD and got.fds:
                if self.backend_channel is not None:
                    self.backend_channel.close()
                self.backend_channel = UnixChannel(
                    socket.socket(fileno=os.dup(got.fds[0])),
                    limit_for=m.request_limits(m.Direction.BACKEND, True),
                    name="scripted back-end requests")
            bad = self.misbehave.get(frame.request)
            if bad is not None:
                bad(channel, got)
                continue
            self._answer(channel, got)

    def _answer(self, channel: UnixChannel, got: Received) -> None:
        spec = m.FRONTEND_TABLE.get(got.request)
        reply: m.Payload | None = None
        if got.request == FR.GET_FEATURES:
            reply = m.U64(FEATURES)
        elif got.request == FR.GET_PROTOCOL_FEATURES:
            reply = m.U64(self.protocol_features)
        elif got.request == FR.GET_QUEUE_NUM:
            reply = m.U64(self.queue_num)
        elif got.request == FR.GET_VRING_BASE:
            state = got.decoded()
            assert isinstance(state, m.VringState)
            reply = m.VringState(state.index, 0)
        elif got.request == FR.GET_CONFIG:
            cfg = got.decoded()
            assert isinstance(cfg, m.ConfigSpace)
            reply = m.ConfigSpace(cfg.offset, cfg.flags, bytes(range(cfg.size)))
        elif got.request == FR.GET_MAX_MEM_SLOTS:
            reply = m.U64(32)
        elif got.request == FR.GET_STATUS or (
                spec is not None and spec.reply is not m.Reply.ALWAYS
                and got.flags & m.HeaderFlags.NEED_REPLY):
            reply = m.U64(0)  # the status, or a REPLY_ACK
        if reply is not None:
            code, flags, data = m.encode(got.request, reply, reply=True)
            channel.send_frame(code, flags, data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.backend_channel is not None:
            self.backend_channel.close()
        with self._lock:
            for r in self.received:
                close_fds(r.fds)


__all__ = ["ALL_PROTOCOL_FEATURES", "FEATURES", "Received", "ScriptedBackend"]
