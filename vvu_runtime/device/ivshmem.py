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

A peer's vectors cannot be replaced in place, and **a peer ID must never be
used again** once removed: QEMU (``close_peer_eventfds``) frees the removed
peer's vector array and never allocates it again, so a later vector for that
ID writes freed memory (seen here: QEMU 11 aborts with "malloc(): unaligned
tcache chunk detected"). So a changed call set is announced under a **new peer
ID** (the VVU config's ``doorbell_peer`` shows it at once), and the old ID is
removed only when the driver has read the new one (the device tells us,
:meth:`DoorbellPeer.driver_saw`): until then a call rung under the old ID still
lands on the old set. IDs are 1..65535 per QEMU connection, shared fairly
between the links; a link that used its share (a front-end replacing its call
eventfds for minutes on end) falls back to the trapped doorbells
(``doorbell_peer`` = 0xffff) until the appliance's QEMU connects again.

Vectors without a call eventfd (a queue the front-end gave none, or NOFD) get
``sink``, an eventfd of ours nobody reads, so that the numbering has no holes.
The last vector of every announcement is a fresh *fence* eventfd: QEMU sets
O_NONBLOCK on each eventfd it installs (``process_msg_connect``) and handles
the socket in order, so the fence's flag going up means the whole announcement
is live. Until then a doorbell under the new ID goes nowhere; so when the fence
goes up (or after ``APPLY_TIMEOUT`` if it never does), every call eventfd of
the peer is signalled once: a spurious interrupt costs the consumer a look at
its used ring, a lost one hangs it.

Hostile front-ends cannot make this costly: announcements of one peer are
coalesced (at most one per ``MIN_INTERVAL``, always with the latest set, under
one new ID), at most ``MAX_RETIRED`` old IDs wait per link (older ones are
removed at once), the peer's fds are our own duplicates (the front-end's
closing or reusing them changes nothing here), and a client that stops reading
its socket is dropped once ``MAX_BACKLOG`` messages wait for it.
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
from vvu_runtime.virtio.vvu_abi import DOORBELL_OWNER_ID, IVSHMEM_MAX_PEER, NO_DOORBELL_PEER

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
#: Old peer IDs one link keeps announced while its driver has not read the new one.
MAX_RETIRED = 4


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

    def __init__(self, server: IvshmemServer, name: str, vectors: int) -> None:
        self.server = server
        self.name = name
        #: Vectors the appliance's ivshmem-doorbell device has (``vectors=``): calls
        #: of queues 0 .. vectors-2, and the fence.
        self.vectors = vectors
        #: Our duplicates of the front-end's call eventfds, by queue.
        self.calls: dict[int, int] = {}
        #: The ID the current set is (or is about to be) announced under; None: no
        #: client, no calls, or this link's IDs are used up.
        self.peer_id: int | None = None
        #: Whether ``peer_id`` was announced (then the next change needs a new ID).
        self.announced = False
        #: Announced IDs of earlier sets, removed once the driver read ``peer_id``.
        self.retired: list[int] = []
        #: IDs this link took from the current client (its share is bounded).
        self.ids_used = 0
        self.exhausted = False
        self._pending: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last = -MIN_INTERVAL
        self._fence: int | None = None
        self._poll: asyncio.TimerHandle | None = None
        #: Counters: announcements sent, and how many QEMU was seen to install.
        self.announcements = 0
        self.applied = 0
        self.apply_timeouts = 0

    # --- what the VVU device shows and sees -------------------------------------------

    @property
    def owner_id(self) -> int:
        return self.server.owner_id

    def current_peer(self) -> int:
        """``doorbell_peer`` of the VVU config: the ID to ring now."""
        return NO_DOORBELL_PEER if self.peer_id is None else self.peer_id

    def driver_saw(self, peer: int) -> None:
        """The driver read ``doorbell_peer``: once it has the current ID, it rings no
        retired one any more, so those can go."""
        if peer == self.current_peer() and self.retired:
            self.server.remove(self, self.retired)
            self.retired = []

    # --- the front-end's side ---------------------------------------------------------

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
        self.server.changed(self)

    def _fence_eventfd(self) -> int:
        """A fresh blocking eventfd: QEMU making it non-blocking is our receipt."""
        if self._fence is not None:
            os.close(self._fence)
        self._fence = os.eventfd(0, os.EFD_CLOEXEC)
        return self._fence

    def messages(self) -> list[tuple[bytes, list[int]]]:
        """The announcement of the current set under ``peer_id`` (and a new fence)."""
        assert self.peer_id is not None
        out: list[tuple[bytes, list[int]]] = []
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
            log.warning("%s: the appliance's QEMU did not install doorbell peer %s within "
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

    def forget_client(self) -> None:
        """The client is gone (or new): its IDs mean nothing any more."""
        self.peer_id = None
        self.announced = False
        self.retired = []
        self.ids_used = 0
        self.exhausted = False
        for handle in (self._pending, self._poll):
            if handle is not None:
                handle.cancel()
        self._pending = self._poll = None

    def close(self) -> None:
        self.forget_client()
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
        self.peers: list[DoorbellPeer] = []
        self.sink = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.shm = _shared_memory()
        self._listener: UnixListener | None = None
        self.client: socket.socket | None = None
        self._outbox: Outbox | None = None
        #: Next peer ID for the current client (IDs are single-use per client).
        self._next_id = 1
        #: Clients served (connections accepted) and refused (one at a time).
        self.clients = 0
        self.refused = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def add_peer(self, name: str) -> DoorbellPeer:
        """The peer of one VVU link (its IDs come and go with its call sets)."""
        peer = DoorbellPeer(self, name, self.vectors)
        self.peers.append(peer)
        return peer

    @property
    def share(self) -> int:
        """Peer IDs each link may take from one client."""
        return (IVSHMEM_MAX_PEER - 1) // max(1, len(self.peers))

    def _allocate(self, peer: DoorbellPeer) -> int | None:
        if peer.ids_used >= self.share:
            return None
        if self._next_id == self.owner_id:
            self._next_id += 1
        if self._next_id > IVSHMEM_MAX_PEER:
            return None
        peer.ids_used += 1
        self._next_id += 1
        return self._next_id - 1

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
        for peer in self.peers:
            peer.close()
        for fd in (self.sink, self.shm):
            if fd >= 0:
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
        self._next_id = 1
        self._outbox = Outbox(sock, self.loop, on_error=self._send_failed)
        self.loop.add_reader(sock.fileno(), self._on_client_readable)
        # QEMU reads these at realize, blocking: they go out at once, in this order.
        self._send(message(PROTOCOL_VERSION))
        self._send(message(self.owner_id))
        self._send(message(SHM_MESSAGE), [self.shm])
        for peer in self.peers:
            peer.forget_client()
            if peer.calls:
                self.changed(peer)
        log.info("doorbell companion: client #%d connected", self.clients)

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
        for peer in self.peers:
            peer.forget_client()
        log.info("doorbell companion: client disconnected (%s)", why)

    # --- announcements ---------------------------------------------------------------

    def changed(self, peer: DoorbellPeer) -> None:
        """``peer``'s call set changed: a new ID now (shown to the driver at once), the
        announcement soon (coalesced, rate-limited)."""
        if self._outbox is None:
            return  # announced in full when a client connects
        if not peer.calls:
            # The front-end is gone (or gave no call): nothing to ring any more.
            self.remove(peer, [*peer.retired, *([peer.peer_id] if peer.announced and
                                                peer.peer_id is not None else [])])
            peer.retired, peer.peer_id, peer.announced = [], None, False
            return
        if peer.peer_id is not None and not peer.announced:
            pass  # the pending announcement will carry the latest set under its ID
        elif peer.exhausted:
            return
        else:
            new = self._allocate(peer)
            if new is None:
                peer.exhausted = True
                log.warning("%s: no doorbell peer ID left for this link (%d used); its "
                            "calls use the trapped doorbells until the appliance's QEMU "
                            "connects again", peer.name, peer.ids_used)
                self.remove(peer, [*peer.retired, *([peer.peer_id] if peer.announced and
                                                    peer.peer_id is not None else [])])
                peer.retired, peer.peer_id, peer.announced = [], None, False
                return
            if peer.peer_id is not None and peer.announced:
                peer.retired.append(peer.peer_id)
                if len(peer.retired) > MAX_RETIRED:
                    # A driver that does not read doorbell_peer: do not keep them all.
                    self.remove(peer, peer.retired[:-MAX_RETIRED])
                    del peer.retired[:-MAX_RETIRED]
            peer.peer_id, peer.announced = new, False
        self._schedule(peer)

    def remove(self, peer: DoorbellPeer, ids: list[int]) -> None:
        """Tell the client that peers ``ids`` are gone (IDs never used again)."""
        for pid in ids:
            if not self._send(message(pid)):
                return

    def _schedule(self, peer: DoorbellPeer) -> None:
        if peer._pending is not None:
            return  # the pending one sends the latest set
        wait = peer._last + MIN_INTERVAL - self.loop.time()
        if wait > 0:
            peer._pending = self.loop.call_later(wait, self._announce, peer)
        else:
            peer._pending = self.loop.call_soon(self._announce, peer)

    def _announce(self, peer: DoorbellPeer) -> None:
        peer._pending = None
        if self._outbox is None or peer.peer_id is None or peer.announced:
            return
        peer._last = self.loop.time()
        for data, fds in peer.messages():
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
