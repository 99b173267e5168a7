"""One virtqueue of a vhost-user session, as the device sees it.

The session (``backend.BackendSession``) fills a :class:`Vring` from the
SET_VRING_* messages and starts it; the device (``VhostUserDevice``) only calls

* :meth:`Vring.pop` - the next available :class:`DescriptorChain` or ``None``;
* :meth:`Vring.push` - return a chain with the number of bytes written into it;
* :meth:`Vring.notify` - after a batch of pushes: signal the front-end if the
  driver wants it (EVENT_IDX / NO_INTERRUPT honoured by the queue);
* :meth:`Vring.has_available`, :meth:`Vring.kick_suppression` (polling devices);
* :meth:`Vring.fail` - the ring is broken (a VirtioError from a hostile chain):
  log, stop serving this ring, signal the err notifier, set NEEDS_RESET;

and reads ``index``, ``size``, ``enabled``, ``started``, ``features``, ``name``.

Rules for devices:

* Call these from the session's event-loop thread only (use
  ``loop.call_soon_threadsafe`` from worker threads). They are not locked.
* ``process(vring)`` may be called on a started but **disabled** ring
  (``vring.enabled`` is False): consume without side effects (net: drop TX,
  do not fill RX), as the vhost-user spec requires.
* Dirty logging (live migration) and inflight tracking (INFLIGHT_SHMFD) happen
  inside pop/push: devices never see them. ``push`` marks the written bytes of the
  chain's writable buffers dirty (the ring does it); do not write beyond ``written``.
* ``pop_many``/``push_many`` batch a burst (one avail read, one used-index
  publish); prefer them on hot paths, then call ``notify`` once.
* After ``queue_stopped`` the Vring object may be started again later (new queue
  object inside, same Vring); do not keep chains popped before a stop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from vvu_runtime.virtio.errors import RingError, VirtioError
from vvu_runtime.virtio.memory import GuestMemory
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses, Virtqueue

if TYPE_CHECKING:
    from vvu_runtime.vhost_user.transport import KickSource, Notifier

log = logging.getLogger(__name__)

VIRTIO_F_RING_PACKED = 1 << 34

#: Builds the ring implementation when a Vring starts:
#: (index, size, addresses, memory, features, base) -> Virtqueue.
QueueFactory = Callable[[int, int, RingAddresses, GuestMemory, int, int], Virtqueue]


def default_queue_factory(index: int, size: int, addresses: RingAddresses,
                          memory: GuestMemory, features: int, base: int) -> Virtqueue:
    """Split or packed ring, by the negotiated RING_PACKED bit."""
    if features & VIRTIO_F_RING_PACKED:
        try:
            from vvu_runtime.virtio.packed import PackedQueue  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - until packed.py lands
            raise RingError("packed rings are not implemented yet") from exc
        queue: Virtqueue = PackedQueue(index, size, addresses, memory, features, base)
        return queue
    try:
        from vvu_runtime.virtio.split import SplitQueue  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:  # pragma: no cover - until split.py lands
        raise RingError("split rings are not implemented yet") from exc
    queue = SplitQueue(index, size, addresses, memory, features, base)
    return queue


class InflightTracker(Protocol):
    """Inflight bookkeeping of one queue in the INFLIGHT_SHMFD area (see backend.py)."""

    def fetched(self, chain: DescriptorChain) -> None:
        """``chain`` was popped: mark it inflight (with its submission order)."""

    def completing(self, chain: DescriptorChain) -> None:
        """``chain`` is about to be pushed (before the used ring is written)."""

    def completed(self, chain: DescriptorChain) -> None:
        """``chain`` was pushed (after the used ring was written)."""

    def resubmit(self, queue: Virtqueue) -> list[DescriptorChain]:
        """Bind to ``queue`` (just started); chains recorded as inflight by a previous
        connection, in submission order."""

    def bind(self, queue: Virtqueue) -> Virtqueue:
        """Rebind after the ring was rebuilt over a new memory table (no resubmitting)."""


class _StoppedQueue(Virtqueue):
    """Stands in for the ring while the Vring is stopped: nothing available."""

    index = -1
    size = 0

    def pop(self) -> DescriptorChain | None:
        return None

    def push(self, chain: DescriptorChain, written: int) -> None:
        raise RingError("push on a stopped ring")

    def should_notify(self) -> bool:
        return False

    def set_kick_suppression(self, suppress: bool) -> bool:
        return False

    def get_base(self) -> int:
        return 0

    def has_available(self) -> bool:
        return False


_STOPPED = _StoppedQueue()


class Vring:
    """Per-queue state of one vhost-user session, and the device's handle on a ring.

    Session-owned attributes (set from messages): ``size`` (SET_VRING_NUM),
    ``addresses`` (SET_VRING_ADDR), ``base`` (SET_VRING_BASE), ``kick``/``call``/``err``
    (SET_VRING_KICK/CALL/ERR; ``None`` = NOFD), ``kick_nofd`` (polling requested),
    ``enabled`` (SET_VRING_ENABLE), ``features`` (SET_FEATURES), ``inflight``.
    """

    __slots__ = (
        "_done_early", "_held_error", "_memory", "_on_fail", "_queue", "_resubmit", "_tracking",
        "addresses",
        "base",
        "call", "device_name", "enabled", "err", "failed", "features", "index", "inflight",
        "kick", "kick_nofd", "missed_call", "name", "queue_factory", "size", "started",
    )

    def __init__(self, index: int, device_name: str = "device",
                 on_fail: Callable[[Vring, BaseException], None] | None = None,
                 queue_factory: QueueFactory = default_queue_factory) -> None:
        self.index = index
        self.device_name = device_name
        self.name = f"{device_name} queue {index}"
        self.size = 0
        self.addresses: RingAddresses | None = None
        self.base = 0
        self.kick: KickSource | None = None
        self.kick_nofd = False
        self.call: Notifier | None = None
        self.err: Notifier | None = None
        self.enabled = False
        self.started = False
        self.failed = False
        self.missed_call = False
        self.features = 0
        self.inflight: InflightTracker | None = None
        self.queue_factory = queue_factory
        self._on_fail = on_fail
        self._queue: Virtqueue = _STOPPED
        self._memory: GuestMemory | None = None
        self._tracking = False
        self._resubmit: list[DescriptorChain] = []
        #: Heads a previous back-end completed past our base: popped once more from
        #: the avail ring, they are skipped instead of run (SplitQueue.completed_past_base).
        self._done_early: dict[int, int] = {}
        #: A bad chain pop_many met after good ones (tracking): raised by the next pop.
        self._held_error: VirtioError | None = None

    def __repr__(self) -> str:
        state = "started" if self.started else "stopped"
        return f"<Vring {self.name} size={self.size} {state} enabled={self.enabled}>"

    # ------------------------------------------------------------ device API (hot path)
    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises DescriptorError/GuestMemoryError."""
        if not self._tracking:
            return self._queue.pop()
        if self._held_error is not None:
            exc, self._held_error = self._held_error, None
            self._retrack()
            raise exc
        if self._resubmit:
            return self._resubmit.pop(0)
        chain = self._queue.pop()
        while chain is not None and self._done_early:
            left = self._done_early.pop(chain.head, 0)
            if not left:
                break
            if left > 1:
                self._done_early[chain.head] = left - 1
            log.info("%s: chain %d was completed by the previous back-end: not run again",
                     self.name, chain.head)
            if not self._done_early:
                self._retrack()
            chain = self._queue.pop()
        if chain is not None and self.inflight is not None:
            self.inflight.fetched(chain)
        return chain

    def _retrack(self) -> None:
        """pop/push take the tracking path while there are inflight records to keep or
        late completions to skip (a held error turns it on by itself)."""
        self._tracking = self.inflight is not None or bool(self._done_early)

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Give ``chain`` back to the driver with ``written`` bytes filled in."""
        if not self._tracking:
            self._queue.push(chain, written)
            return
        inflight = self.inflight
        if inflight is not None:
            inflight.completing(chain)
            self._queue.push(chain, written)
            inflight.completed(chain)
        else:
            self._queue.push(chain, written)

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` chains at once (one avail-index read for the batch)."""
        if not self._tracking:
            return self._queue.pop_many(limit)
        inflight = self.inflight
        if (inflight is not None and self._held_error is None and not self._resubmit
                and not self._done_early):
            # The ring's own pop_many (one avail read; a bad chain after good ones is
            # left for the next call), then the records of what it took.
            taken = self._queue.pop_many(limit)
            for one in taken:
                inflight.fetched(one)
            return taken
        chains: list[DescriptorChain] = []
        while len(chains) < limit:
            try:
                chain = self.pop()
            except VirtioError as exc:
                if not chains:
                    raise
                # As the rings' own pop_many: the good chains before a bad one are
                # handed out (and get completed); the next call raises for it (the
                # tracking path stays on until then, whatever ended meanwhile).
                self._held_error = exc
                self._tracking = True
                break
            if chain is None:
                break
            chains.append(chain)
        return chains

    def push_many(self, completions: Iterable[tuple[DescriptorChain, int]]) -> None:
        """Push ``(chain, written)`` pairs, published with one used-index update."""
        if not self._tracking:
            self._queue.push_many(completions)
            return
        for chain, written in completions:
            self.push(chain, written)

    def notify(self) -> None:
        """After pushes: raise the call notification if the driver wants one."""
        if self._queue.should_notify():
            call = self.call
            if call is not None:
                call.signal()
            else:
                self.missed_call = True

    def has_available(self) -> bool:
        """Whether pop() would return a chain."""
        return (bool(self._resubmit) or self._held_error is not None
                or self._queue.has_available())

    def kick_suppression(self, suppress: bool) -> bool:
        """Ask the driver not to kick (polling) or to kick again.

        Returns True when buffers are already available (poll once more).
        """
        return self._queue.set_kick_suppression(suppress)

    def fail(self, exc: BaseException) -> None:
        """The ring is broken: stop serving it, signal err, let the session set NEEDS_RESET."""
        if self.failed:
            return
        self.failed = True
        log.error("%s: ring failed, no longer served: %s", self.name, exc)
        with contextlib.suppress(VirtioError):
            self.base = self._queue.get_base()
        self._queue = _STOPPED
        self._resubmit.clear()
        if self.err is not None:
            self.err.signal()
        if self._on_fail is not None:
            self._on_fail(self, exc)

    @property
    def direct_queue(self) -> Virtqueue | None:
        """The ring implementation while pop/push go straight to it (started, no
        inflight tracking, nothing to resubmit or skip): a compiled fast path may
        then drive it itself (backends/switch/_forward_c.c). None otherwise."""
        if self._tracking or self._queue is _STOPPED:
            return None
        return self._queue

    @property
    def tracked_queue(self) -> tuple[Virtqueue, InflightTracker | None] | None:
        """The ring implementation and the inflight tracker pop/push keep up to date
        (None: no tracking) while nothing is waiting to be resubmitted or skipped: a
        compiled fast path may then pop and push itself, keeping the tracker's
        records as pop and push would (backends/blk/_serve_c.c). None otherwise."""
        if (self._queue is _STOPPED or self._resubmit or self._done_early
                or self._held_error is not None):
            return None
        return self._queue, (self.inflight if self._tracking else None)

    # ---------------------------------------------------------------- session API
    @property
    def queue(self) -> Virtqueue | None:
        """The ring implementation while started."""
        return None if self._queue is _STOPPED else self._queue

    @property
    def ready(self) -> bool:
        """Configured enough to start: size, addresses and a kick (fd or NOFD)."""
        return self.size > 0 and self.addresses is not None and (
            self.kick is not None or self.kick_nofd)

    def start(self, memory: GuestMemory) -> None:
        """Build the ring over ``memory`` from size/addresses/base/features.

        Raises VirtioError (RingError, GuestMemoryError) when the configuration does
        not describe a ring inside memory.
        """
        if self.addresses is None or self.size == 0:
            raise RingError(f"{self.name}: cannot start without size and addresses")
        queue = self.queue_factory(self.index, self.size, self.addresses, memory,
                                   self.features, self.base)
        self._memory = memory
        self._queue = queue
        self.failed = False
        self.started = True
        self._resubmit = []
        self._held_error = None
        if self.inflight is not None:
            self._resubmit = self.inflight.resubmit(queue)
            if self._resubmit:
                log.info("%s: resubmitting %d inflight requests", self.name,
                         len(self._resubmit))
        self._done_early = {}
        if not self._resubmit:
            for head in queue.completed_past_base():
                self._done_early[head] = self._done_early.get(head, 0) + 1
            if self._done_early:
                log.warning("%s: the used ring is %d entries past base %d: chains the "
                            "previous back-end completed after the front-end saved the "
                            "base; they will not run twice", self.name,
                            sum(self._done_early.values()), self.base)
        self._retrack()
        # A previous back-end may have completed requests whose call went to a
        # connection that is gone (vvu-devd killed between the used-ring update and
        # the doorbell). Interrupt the driver once when the ring says it may be
        # waiting: a spurious interrupt costs a look at the used ring, a lost one
        # hangs the request for good.
        if self._done_early or queue.completions_may_be_unseen():
            if self.call is not None:
                self.call.signal()
            else:
                self.missed_call = True

    def set_log(self, log_all: bool) -> None:
        """Follow LOG_ALL or the ring's log flag changing while the ring runs."""
        if self.started:
            self._queue.set_log(log_all, self.addresses)

    def restart(self, memory: GuestMemory) -> None:
        """Rebuild the ring after a memory table change, keeping the ring position."""
        if not self.started or self.failed or self.addresses is None:
            return
        base = self._queue.get_base()
        queue = self.queue_factory(self.index, self.size, self.addresses, memory,
                                   self.features, base)
        self._memory = memory
        self._queue = queue
        if self.inflight is not None:
            # The tracker reads the used index from the queue it was bound to.
            self.inflight.bind(queue)

    def stop(self) -> int:
        """Stop serving the ring; the vring base to report (GET_VRING_BASE)."""
        if self._queue is not _STOPPED:
            self.base = self._queue.get_base()
        self._queue = _STOPPED
        self._memory = None
        self._resubmit = []
        self._done_early = {}
        self._held_error = None
        self._tracking = False
        self.started = False
        return self.base

    def close_notifiers(self) -> None:
        """Close kick/call/err (disconnect)."""
        for res in (self.kick, self.call, self.err):
            if res is not None:
                res.close()
        self.kick = self.call = self.err = None
        self.kick_nofd = False
        self.missed_call = False

    def reset(self) -> None:
        """Back to the state after construction (disconnect, RESET_DEVICE)."""
        self.stop()
        self.close_notifiers()
        self.size = 0
        self.addresses = None
        self.base = 0
        self.enabled = False
        self.failed = False
        self.features = 0
        self.inflight = None


__all__ = ["InflightTracker", "QueueFactory", "VirtioError", "Vring", "default_queue_factory"]
