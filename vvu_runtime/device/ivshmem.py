"""vvu-devd as the ivshmem server of its appliance: call doorbells that bypass it.

A VVU doorbell is trapped MMIO that QEMU's vfio-user client turns into a
REGION_WRITE message for ``vvu-devd``, which then writes the consumer's call
eventfd (DESIGN decision 4). QEMU's ``ivshmem-doorbell`` device has what the
vfio-user client lacks: its Doorbell register (BAR0 + 12, a 32-bit write of
``peer << 16 | vector``) is backed by ioeventfds, so a guest write signals an
eventfd from the vCPU (KVM: in the kernel; TCG: QEMU writes it in the vCPU
thread) with no message to anyone. QEMU takes those eventfds from an ivshmem
server (docs/specs/ivshmem-spec.rst) and does not care where they came from, so
``vvu-devd`` serves that protocol on a UNIX socket and announces each VVU link
as one peer whose vector ``i`` is the consumer's call eventfd of vhost-user
queue ``i``. docs/vvu-abi.md "Doorbell bypass" is the contract with the driver.

The protocol, every message one little-endian int64, an fd attached or not:

* on connect: the version (0), the client's own ID (``OWNER_ID``: the driver
  finds the companion function by it, in its IVPosition register), then ``-1``
  with the shared-memory fd (a 4 KiB memfd nobody uses);
* per peer, one message with the peer's ID per vector, fds in vector order
  (QEMU counts them: the N-th is vector N-1);
* the peer's ID without an fd: the peer is gone (QEMU closes all its vectors).

One vector cannot be replaced in place, so a changed call set is re-announced:
removal, then every vector again. Vectors without a call eventfd (a queue the
front-end gave none, or NOFD) get ``sink``, an eventfd of ours nobody reads, so
that the numbering has no holes. The last vector of every announcement is a
fresh *fence* eventfd: QEMU sets O_NONBLOCK on each eventfd it installs
(``process_msg_connect``), and it handles the socket in order, so the fence's
flag going up means the whole announcement is live. Until then a doorbell may
land on the old eventfd or on none; so when the fence goes up (or after
``APPLY_TIMEOUT`` if it never does), every call eventfd of the peer is
signalled once: a spurious interrupt costs the consumer a look at its used
ring, a lost one hangs it.

Hostile front-ends cannot make this costly: announcements of one peer are
coalesced (at most one per ``MIN_INTERVAL``, always with the latest set), the
peer's fds are our own duplicates (the front-end's closing or reusing them
changes nothing here), and a client that stops reading its socket is dropped
once ``MAX_BACKLOG`` messages wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Mapping

from vvu_runtime.device.errors import DeviceModelError
from vvu_runtime.fds import (
    FdError,
    Outbox,
    UnixListener,
    close_fds,
    eventfd_info,
    eventfd_signal,
)
from vvu_runtime.virtio.vvu_abi import DOORBELL_OWNER_ID, IVSHMEM_MAX_PEER

log = logging.getLogger(__name__)

#: One protocol message: a little-endian signed 64-bit number.
MESSAGE = struct.Struct("<q")
PROTOCOL_VERSION = 0
#: The shared-memory message's number.
SHM_MESSAGE = -1
#: Size of the shared memory we hand out (ivshmem needs one; a power of two for its BAR).
SHM_SIZE = 4096
#: Announcements of one peer are at least this far apart (seconds).
MIN_INTERVAL = 0.002
#: How long to wait for QEMU to install an announcement before signalling anyway.
APPLY_TIMEOUT = 2.0
#: First and last pause between looks at the fence's flags (seconds).
APPLY_POLL_FIRST = 0.0005
APPLY_POLL_MAX = 0.05
#: Messages a client may leave unread before it is dropped.
MAX_BACKLOG = 65536


def message(value: int) -> bytes:
    return MESSAGE.pack(value)


def _shared_memory() -> int:
    fd = os.memfd_create("vvu-doorbell-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, SHM_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DoorbellPeer:
    """One VVU link as an ivshmem peer: vector ``i`` = call eventfd of queue ``i``."""

    def __init__(self, server: IvshmemServer, peer_id: int, name: str, vectors: int) -> None:
        self.server = server
        self.peer_id = peer_id
        self.name = name
        #: Vectors the appliance's ivshmem-doorbell device has (``vectors=``): calls
        #: of queues 0 .. vectors-2, and the fence.
        self.vectors = vectors
        #: Our duplicates of the front-end's call eventfds, by queue.
        self.calls: dict[int, int] = {}
        #: Whether the current set was announced to the connected client.
        self.announced = False
        self._pending: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last = -MIN_INTERVAL
        self._fence: int | None = None
        self._poll: asyncio.TimerHandle | None = None
        #: Counters: announcements sent, and how many QEMU was seen to install.
        self.announcements = 0
        self.applied = 0
        self.apply_timeouts = 0

    def set_calls(self, calls: Mapping[int, int]) -> None:
        """The front-end's call eventfds now (queue → fd, borrowed: we dup them)."""
        usable = {q: fd for q, fd in calls.items() if 0 <= q < self.vectors - 1}
        if usable.keys() == self.calls.keys() and all(
                _same_file(fd, self.calls[q]) for q, fd in usable.items()):
            return
        new: dict[int, int] = {}
        try:
            for q, fd in usable.items():
                new[q] = os.dup(fd)
        except OSError as exc:
            close_fds(list(new.values()))
            log.error("%s: cannot duplicate a call eventfd for the doorbell bypass (%s); "
                      "the peer keeps its previous set until the next change", self.name, exc)
            return
        old, self.calls = self.calls, new
        close_fds(list(old.values()))
        self.server.schedule(self)

    def _fence_eventfd(self) -> int:
        """A fresh blocking eventfd: QEMU making it non-blocking is our receipt."""
        if self._fence is not None:
            os.close(self._fence)
        self._fence = os.eventfd(0, os.EFD_CLOEXEC)
        return self._fence

    def messages(self, *, remove_first: bool) -> list[tuple[bytes, list[int]]]:
        """The announcement of the current set (and a new fence)."""
        out: list[tuple[bytes, list[int]]] = []
        if remove_first:
            out.append((message(self.peer_id), []))
        top = max(self.calls, default=-1)
        for q in range(top + 1):
            out.append((message(self.peer_id), [self.calls.get(q, self.server.sink)]))
        out.append((message(self.peer_id), [self._fence_eventfd()]))
        return out

    def watch_fence(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._poll is not None:
            self._poll.cancel()
        deadline = loop.time() + APPLY_TIMEOUT
        fence = self._fence
        self._poll = loop.call_later(APPLY_POLL_FIRST, self._look, loop, fence, deadline,
                                     APPLY_POLL_FIRST)

    def _look(self, loop: asyncio.AbstractEventLoop, fence: int | None, deadline: float,
              pause: float) -> None:
        self._poll = None
        if fence is None or fence != self._fence:
            return  # a newer announcement watches its own fence
        try:
            live = bool(fcntl.fcntl(fence, fcntl.F_GETFL) & os.O_NONBLOCK)
        except OSError:
            live = False
        if live:
            self.applied += 1
            self.signal_calls()
            return
        if loop.time() >= deadline:
            self.apply_timeouts += 1
            log.warning("%s: the appliance's QEMU did not install doorbell peer %d within "
                        "%.1f s; signalling its calls anyway", self.name, self.peer_id,
                        APPLY_TIMEOUT)
            self.signal_calls()
            return
        pause = min(pause * 2, APPLY_POLL_MAX)
        self._poll = loop.call_later(pause, self._look, loop, fence, deadline, pause)

    def signal_calls(self) -> None:
        """Once per call eventfd: covers doorbells rung while the set was changing."""
        for fd in self.calls.values():
            with contextlib.suppress(OSError):
                eventfd_signal(fd)

    def close(self) -> None:
        for handle in (self._pending, self._poll):
            if handle is not None:
                handle.cancel()
        self._pending = self._poll = None
        close_fds(list(self.calls.values()))
        self.calls = {}
        if self._fence is not None:
            os.close(self._fence)
            self._fence = None


def _same_file(a: int, b: int) -> bool:
    """Whether two eventfds are one (fstat cannot tell eventfds apart: fdinfo ids)."""
    try:
        ident = eventfd_info(a).ident
        return ident is not None and ident == eventfd_info(b).ident
    except FdError:
        return False


class IvshmemServer:
    """The ivshmem server of one appliance (one client: its QEMU's ivshmem-doorbell)."""

    def __init__(self, path: str, *, vectors: int,
                 loop: asyncio.AbstractEventLoop | None = None,
                 owner_id: int = DOORBELL_OWNER_ID) -> None:
        if vectors < 2:
            raise DeviceModelError(f"doorbell companion: {vectors} vectors; at least 2 "
                                   "(one call and the fence)")
        self.path = path
        self.vectors = vectors
        self.owner_id = owner_id
        self._loop = loop
        self.peers: dict[int, DoorbellPeer] = {}
        self.sink = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.shm = _shared_memory()
        self._listener: UnixListener | None = None
        self.client: socket.socket | None = None
        self._outbox: Outbox | None = None
        #: Clients served (connections accepted) and refused (one at a time).
        self.clients = 0
        self.refused = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def add_peer(self, name: str) -> DoorbellPeer:
        """A peer for one VVU link; IDs count from 1 (the owner's is ``owner_id``)."""
        peer_id = len(self.peers) + 1
        if peer_id == self.owner_id:
            peer_id += 1
        if peer_id > IVSHMEM_MAX_PEER:
            raise DeviceModelError(f"{name}: no ivshmem peer ID left")
        peer = DoorbellPeer(self, peer_id, name, self.vectors)
        self.peers[peer_id] = peer
        return peer

    # --- listening -----------------------------------------------------------------

    def start(self) -> None:
        if self._listener is not None:
            return
        try:
            self._listener = UnixListener(self.path, 4)
        except FdError as exc:
            raise DeviceModelError(f"doorbell companion socket: {exc}") from exc
        self._listener.watch(self.loop, self._on_accept)
        log.info("doorbell companion: ivshmem server on %s (%d peers, %d vectors each)",
                 self.path, len(self.peers), self.vectors)

    def close(self) -> None:
        self._drop_client("the device model is shutting down")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for peer in self.peers.values():
            peer.close()
        for fd in (self.sink, self.shm):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sink = self.shm = -1

    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock = self._listener.accept()
            except OSError as exc:
                log.warning("doorbell companion: accept failed: %s", exc)
                return
            if sock is None:
                return
            if self.client is not None:
                # One appliance QEMU; another connection is not ours to serve.
                self.refused += 1
                log.warning("doorbell companion: a second client refused (one is connected)")
                sock.close()
                continue
            self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.client = sock
        self.clients += 1
        self._outbox = Outbox(sock, self.loop, on_error=self._send_failed)
        self.loop.add_reader(sock.fileno(), self._on_client_readable)
        # QEMU reads these at realize, blocking: they go out at once, in this order.
        self._send(message(PROTOCOL_VERSION))
        self._send(message(self.owner_id))
        self._send(message(SHM_MESSAGE), [self.shm])
        for peer in self.peers.values():
            peer.announced = False
            self._announce(peer)
        log.info("doorbell companion: client #%d connected; %d peers announced",
                 self.clients, len(self.peers))

    def _send(self, data: bytes, fds: list[int] | None = None) -> bool:
        """Queue one message for the client; False if there is no client (any more)."""
        outbox = self._outbox
        if outbox is None:
            return False
        outbox.send(data, fds or ())
        if outbox.queued_messages > MAX_BACKLOG:
            self._drop_client(f"it left {MAX_BACKLOG} messages unread")
        return self._outbox is outbox

    def _send_failed(self, exc: OSError) -> None:
        self.loop.call_soon(self._drop_client, f"send failed: {exc}")

    def _on_client_readable(self) -> None:
        sock = self.client
        if sock is None:
            return
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop_client(f"receive failed: {exc}")
            return
        if not data:
            self._drop_client("it closed the connection")
        # A client has nothing to say in this protocol: anything else is ignored.

    def _drop_client(self, why: str) -> None:
        sock = self.client
        if sock is None:
            return
        self.client = None
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(sock.fileno())
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        sock.close()
        for peer in self.peers.values():
            peer.announced = False
        log.info("doorbell companion: client disconnected (%s)", why)

    # --- announcements ---------------------------------------------------------------

    def schedule(self, peer: DoorbellPeer) -> None:
        """Announce ``peer``'s current set soon (coalesced, rate-limited)."""
        if peer._pending is not None:
            return  # the pending one sends the latest set
        wait = peer._last + MIN_INTERVAL - self.loop.time()
        if wait > 0:
            peer._pending = self.loop.call_later(wait, self._announce_pending, peer)
        else:
            peer._pending = self.loop.call_soon(self._announce_pending, peer)

    def _announce_pending(self, peer: DoorbellPeer) -> None:
        peer._pending = None
        if self.peers.get(peer.peer_id) is peer:
            self._announce(peer)

    def _announce(self, peer: DoorbellPeer) -> None:
        if self._outbox is None:
            return  # announced in full when a client connects
        peer._last = self.loop.time()
        for data, fds in peer.messages(remove_first=peer.announced):
            if not self._send(data, fds):
                return
        peer.announced = True
        peer.announcements += 1
        peer.watch_fence(self.loop)


__all__ = [
    "APPLY_TIMEOUT",
    "MESSAGE",
    "PROTOCOL_VERSION",
    "SHM_SIZE",
    "DoorbellPeer",
    "IvshmemServer",
    "message",
]
