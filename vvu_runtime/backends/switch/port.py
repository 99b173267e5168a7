"""A switch port: the vhost-user-net device behind one vhost-user connection.

:class:`SwitchPort` is what the vhost-user session drives. It knows nothing of
sockets or transports: TX rings (odd indexes) are drained into the switch, RX
rings (even indexes) are where the switch delivers. The same object serves
every connection on its socket (``reset()`` between them), so a consumer that
reconnects finds its port again.

Receive-side details that matter:

* **MRG_RXBUF**: a frame larger than one buffer spans several RX chains, and
  ``num_buffers`` in the first header says how many. Without it, a frame must
  fit one chain or it is dropped (``rx_buffer_small``).
* **Ring full**: chains popped for a frame that then does not fit (the ring ran
  dry in the middle of a merged frame) are kept in a per-queue reserve and used
  first for the next frame, rather than returned empty (which a Linux guest
  counts as a length error). They are given up when the ring stops.
* **Multiqueue**: receiveq_k = 2k, transmitq_k = 2k+1. The RX queue is chosen by
  a flow hash (addresses and ports), so one flow stays in order on one queue;
  only enabled queues are used (the guest enables as many pairs as it wants).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING

from vvu_runtime.backends.switch.offload import SoftFrame
from vvu_runtime.backends.switch.switch import (
    Drop,
    ForwardedFrame,
    ForwardingPort,
    RingLike,
    Switch,
)
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.virtio.errors import DescriptorError, VirtioError
from vvu_runtime.virtio.features import RING_FEATURES, VirtioFeature
from vvu_runtime.virtio.net import (
    NetConfig,
    NetFeature,
    NetStatus,
    feature_mask,
    header_size,
)

if TYPE_CHECKING:
    from vvu_runtime.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

#: Offloads offered on every port: checksums, TSO, ECN, UFO and USO both ways.
OFFLOAD_FEATURES = feature_mask(
    NetFeature.CSUM, NetFeature.GUEST_CSUM,
    NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
    NetFeature.HOST_ECN, NetFeature.GUEST_ECN, NetFeature.HOST_UFO, NetFeature.GUEST_UFO,
    NetFeature.HOST_USO, NetFeature.GUEST_USO4, NetFeature.GUEST_USO6,
)

#: Everything offered by default: offloads, mergeable RX buffers, and the ring
#: layouts the virtio package implements (VERSION_1, INDIRECT_DESC, EVENT_IDX,
#: RING_PACKED); the session adds the vhost-user bits.
BASE_FEATURES = OFFLOAD_FEATURES | NetFeature.MRG_RXBUF.mask | int(RING_FEATURES)

_NUM_BUFFERS = struct.Struct("<H")

#: Bursts of a TX ring served per kick before the other ports get the event loop
#: (16 x 64 frames, about 2 ms of work at 64 B): a sender faster than the switch
#: must not starve the other ports, nor the control messages of any session.
TX_BUDGET = 16
_CSUM_FIELDS = struct.Struct("<HH")


class RxQueue:
    """One started receive ring of a port.

    ``pending`` collects the chains filled during a burst; :meth:`flush` (called
    by the switch at the end of the burst) publishes them with one used-index
    update and notifies once. ``reserve`` holds chains popped for a merged frame
    that then did not fit; they are used first for the next frame.
    """

    __slots__ = ("broken", "pending", "port", "reserve", "touched", "vring")

    def __init__(self, vring: RingLike, port: SwitchPort) -> None:
        self.vring = vring
        self.port = port
        self.reserve: list[DescriptorChain] = []
        self.pending: list[tuple[DescriptorChain, int]] = []
        self.touched = False
        #: The ring was failed (until the session stops it and the queue goes away).
        self.broken = False

    def flush(self) -> None:
        if self.broken:
            return
        pending = self.pending
        try:
            if pending:
                self.vring.push_many(pending)
                self.pending = []
            self.vring.notify()
        except VirtioError as exc:
            # Frames still pending were never published: _ring_error counts them.
            self.port._ring_error(self, exc, 0)


class SwitchPort(ForwardingPort, VhostUserDevice):
    """One vhost-user-net port of the switch."""

    def __init__(self, switch: Switch, port_name: str, *, queue_pairs: int = 1,
                 mac: bytes | None = None, offloads: bool = True,
                 packed: bool = True, queue_size: int = 1024,
                 busy_poll: float = 0.0) -> None:
        if queue_pairs < 1 or queue_pairs > 0x8000:
            raise ValueError(f"queue pairs must be 1..32768, got {queue_pairs}")
        ForwardingPort.__init__(self, port_name)
        self.queue_pairs = queue_pairs
        self.config = NetConfig(mac=mac or bytes(6), status=NetStatus.LINK_UP,
                                max_virtqueue_pairs=queue_pairs)
        offered = BASE_FEATURES if offloads else BASE_FEATURES & ~OFFLOAD_FEATURES
        if queue_pairs > 1:
            offered |= NetFeature.MQ.mask
        if not packed:
            offered &= ~int(VirtioFeature.RING_PACKED)
        if mac is not None:
            offered |= NetFeature.MAC.mask
        self._offered = offered
        self._queue_size = queue_size
        #: Seconds to keep polling a TX ring after it ran dry (0: rely on kicks).
        self.busy_poll = busy_poll
        self.negotiated = 0
        self.mergeable = False
        #: Started RX queues in index order; the switch delivers to these.
        self.rx_queues: list[RxQueue] = []
        self._rx: dict[int, RxQueue] = {}
        self._tx: dict[int, RingLike] = {}
        self._resume_pending: set[int] = set()
        switch.add_port(self)

    # ---------------------------------------------------------- VhostUserDevice
    def num_queues(self) -> int:
        return 2 * self.queue_pairs

    def max_queue_size(self) -> int:
        return self._queue_size

    def features(self) -> int:
        return self._offered

    def protocol_features(self) -> int:
        return 1 << 9  # CONFIG: serve GET_CONFIG from our config space

    def set_features(self, features: int) -> None:
        self.negotiated = features
        self.hdr_size = header_size(features)
        self.mergeable = bool(features >> NetFeature.MRG_RXBUF & 1)
        self.set_offloads(features)
        self._update_batching()
        log.info("%s: features %#x negotiated (header %d bytes, mergeable rx %s, "
                 "offloads %s)", self.name, features, self.hdr_size,
                 "on" if self.mergeable else "off", self.describe_offloads())

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def queue_started(self, vring: RingLike) -> None:  # a Vring
        index = vring.index
        if index >= self.num_queues():
            log.warning("%s: queue %d is beyond the %d queues offered; ignored",
                        self.name, index, self.num_queues())
            return
        if index & 1:
            self._tx[index] = vring
            log.debug("%s: transmit queue %d started", self.name, index)
            return
        was_up = self.up
        self._rx[index] = RxQueue(vring, self)
        self.rx_queues = [self._rx[i] for i in sorted(self._rx)]
        self._update_batching()
        log.debug("%s: receive queue %d started", self.name, index)
        if not was_up:
            log.info("%s: link up", self.name)

    def queue_stopped(self, vring: RingLike) -> None:
        index = vring.index
        if index & 1:
            self._tx.pop(index, None)
            return
        q = self._rx.pop(index, None)
        if q is None:
            return
        # Chains in the reserve die with the ring (the vring contract forbids
        # pushing them after a stop); the driver gets them back when it resets.
        q.reserve.clear()
        self.rx_queues = [self._rx[i] for i in sorted(self._rx)]
        self._update_batching()
        if not self.rx_queues:
            log.info("%s: link down", self.name)
            if self.switch is not None:
                self.switch.port_down(self)

    def process(self, vring: RingLike) -> None:
        switch = self.switch
        if not vring.index & 1 or switch is None:
            # An RX kick only means fresh buffers: frames are never queued inside
            # the switch (a full ring drops), so there is nothing to resume.
            return
        if switch.forward_chains(self, vring, self.hdr_size, TX_BUDGET):
            self._come_back(vring)
        elif self.busy_poll > 0:
            self._busy_poll(switch, vring)

    def _come_back(self, vring: RingLike) -> None:
        """The TX ring still has frames after a budget's worth: serve it again once
        the event loop has run everything else that is ready (fairness between
        ports, and control messages are not held up by a fast sender)."""
        if vring.index in self._resume_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No event loop (tests driving the port directly): just finish the job.
            while self.switch is not None and self.switch.forward_chains(
                    self, vring, self.hdr_size, TX_BUDGET):
                pass
            return
        self._resume_pending.add(vring.index)
        loop.call_soon(self._resume, vring)

    def _resume(self, vring: RingLike) -> None:
        self._resume_pending.discard(vring.index)
        # Only if the ring is still the one started (not stopped, failed or replaced
        # since); the session's own guards do not apply to this call.
        if self._tx.get(vring.index) is not vring or getattr(vring, "failed", False):
            return
        try:
            self.process(vring)
        except Exception:
            log.exception("%s: error serving transmit queue %d", self.name, vring.index)

    def _busy_poll(self, switch: Switch, vring: RingLike) -> None:
        """Keep polling the TX ring for ``busy_poll`` seconds after it ran dry, with
        the driver's kicks off: a sender that refills quickly is served without a
        kick, an eventfd and an event-loop round trip per refill. Costs CPU while
        it spins and holds up other ports by at most that long; off by default."""
        clock = time.perf_counter
        deadline = clock() + self.busy_poll
        vring.kick_suppression(True)
        more = False
        try:
            while clock() < deadline:
                if vring.has_available():
                    more = switch.forward_chains(self, vring, self.hdr_size, TX_BUDGET)
                    if more:
                        break
        finally:
            # Kicks back on; anything that came meanwhile is served, not lost.
            if vring.kick_suppression(False) or more:
                self._come_back(vring)

    def reset(self) -> None:
        if self.rx_queues or self._tx:
            log.info("%s: reset", self.name)
        self._rx.clear()
        self._tx.clear()
        self.rx_queues = []
        self.negotiated = 0
        self.mergeable = False
        self.hdr_size = 12
        self.set_offloads(0)
        self._update_batching()
        if self.switch is not None:
            self.switch.port_down(self)

    # ---------------------------------------------------------------- ForwardingPort
    @property
    def up(self) -> bool:
        return bool(self.rx_queues)

    def status_line(self) -> str:
        if not self.rx_queues:
            return "down"
        enabled = sum(1 for q in self.rx_queues if q.vring.enabled)
        return f"up {enabled}/{self.queue_pairs}q"

    def describe_offloads(self) -> str:
        names = [f.name.lower() for f in NetFeature
                 if OFFLOAD_FEATURES >> f.value & 1 and self.negotiated >> f.value & 1]
        return ",".join(names) or "none"

    def _pick_queue(self, frame: ForwardedFrame) -> RxQueue | None:
        """The RX queue for ``frame``: by flow hash among the enabled ones."""
        qs = [q for q in self.rx_queues if q.vring.enabled and not q.broken]
        if not qs:
            return None
        return qs[0] if len(qs) == 1 else qs[frame.flow_hash() % len(qs)]

    def deliver(self, frame: ForwardedFrame) -> None:
        if not self.accepts(frame):
            q = self._pick_queue(frame)
            if q is None:
                self.counters.drop(Drop.PORT_DOWN)
                return
            switch = self.switch
            soft = switch.software_frames(self, frame) if switch is not None else None
            if soft is not None:
                for sf in soft:
                    if not self._deliver_soft(q, sf):
                        break
            return
        self.deliver_plain(frame)

    def deliver_plain(self, frame: ForwardedFrame) -> None:
        """The hot path: copy the frame (header included) into one RX buffer."""
        qs = self.rx_queues
        q: RxQueue | None = qs[0] if len(qs) == 1 and qs[0].vring.enabled \
            else self._pick_queue(frame)
        if q is None:
            self.counters.drop(Drop.PORT_DOWN)
            return
        views = frame.views
        hs = frame.hdr_size
        n = frame.length
        try:
            chain = q.reserve.pop() if q.reserve else q.vring.pop()
        except VirtioError as exc:
            self._ring_error(q, exc)
            return
        if chain is None:
            self.counters.drop(Drop.RX_RING_FULL)
            return
        if len(views) == 1 and hs == self.hdr_size:
            w = chain.writable
            if w and len(w[0]) >= n:
                w0 = w[0]
                w0[:n] = views[0]
                if hs == 12:
                    w0[10] = 1  # num_buffers = 1 (little-endian u16); two item stores
                    w0[11] = 0  # are cheaper than a slice or a struct call
                if frame.rewrite_flags:
                    w0[0] = frame.flags
                q.pending.append((chain, n))
                c = self.counters
                c.out_packets += 1
                c.out_bytes += n - hs
                if not q.touched:
                    self.switch.touch(q)  # type: ignore[union-attr]
                return
        hdr = bytearray(self.hdr_size)
        hdr[0:10] = frame.header()[0:10]
        if frame.rewrite_flags:
            hdr[0] = frame.flags
        self._write(q, chain, hdr, frame.payload_views(), n - hs)

    def deliver_batch(self, bufs: list[memoryview]) -> None:
        """Frames collected in a TX burst for this port: one ``pop_many`` for as
        many RX chains as frames, then one slice copy each (see forward_chains)."""
        qs = self.rx_queues
        k = len(bufs)
        if len(qs) != 1 or not qs[0].vring.enabled or qs[0].broken:
            self.counters.drop(Drop.PORT_DOWN, k)
            return
        q = qs[0]
        reserve = q.reserve
        try:
            if reserve:
                chains = reserve[-k:][::-1]
                del reserve[-k:]
                if len(chains) < k:
                    chains += q.vring.pop_many(k - len(chains))
            else:
                chains = q.vring.pop_many(k)
        except VirtioError as exc:
            self._ring_error(q, exc, k)
            return
        hs = self.hdr_size
        pending = q.pending
        append = pending.append
        c = self.counters
        out = nbytes = 0
        copied = 0  # frames copied before the last merge-path frame
        slow = 0  # frames that took the merge path (their own counting)
        for buf, chain in zip(bufs, chains):  # noqa: B905 - fewer chains: the rest drop
            n = len(buf)
            w = chain.writable
            if w and len(w[0]) >= n:
                w0 = w[0]
                w0[:n] = buf
                if hs == 12:
                    w0[10] = 1  # num_buffers = 1
                    w0[11] = 0
                append((chain, n))
                out += 1
                nbytes += n
                continue
            # Smaller buffers than the frame: merge over several chains (counted
            # there, delivered or dropped). Our own counts first, so that a ring
            # failing in there finds every pending frame counted.
            slow += 1
            c.out_packets += out
            c.out_bytes += nbytes - out * hs
            copied += out
            out = nbytes = 0
            hdr = bytearray(hs)
            hdr[0:10] = buf[0:10]
            self._write(q, chain, hdr, [buf[hs:]], n - hs)
            if q.broken:
                # The ring failed under us: the frames left are lost with it.
                c.drop(Drop.RX_RING_ERROR, k - copied - slow)
                return
        # zip stopped at the shorter: frames without a chain found the ring empty.
        if len(chains) < k:
            c.drop(Drop.RX_RING_FULL, k - len(chains))
        c.out_packets += out
        c.out_bytes += nbytes - out * hs
        if not q.touched and self.switch is not None:
            self.switch.touch(q)

    def fast_rx(self, hdr_size: int) -> tuple[object, bool, RxQueue, list[bool], bool] | None:
        """The compiled burst may write into the single RX ring itself when
        deliver_batch would (same header size, queue up) and nothing is queued on
        the Python side (no reserve, nothing pending: the C code publishes at once).
        It passes offloads as deliver_batch does (``accept_csum``, ``accept_gso``) and
        merges a frame over several chains as ``_write`` does when ``mergeable``."""
        qs = self.rx_queues
        if len(qs) != 1 or self.batch_hdr_size != hdr_size:
            return None
        q = qs[0]
        if q.broken or q.reserve or q.pending or not q.vring.enabled:
            return None
        ring = getattr(q.vring, "direct_queue", None)
        return None if ring is None else (ring, self.accept_csum, q, self.accept_gso,
                                          self.mergeable)

    def _update_batching(self) -> None:
        """Batch delivery needs a single RX queue (no per-frame queue choice)."""
        self.batch_hdr_size = self.hdr_size if len(self.rx_queues) == 1 else -1

    def _deliver_soft(self, q: RxQueue, sf: SoftFrame) -> bool:
        hdr = bytearray(self.hdr_size)
        hdr[0] = sf.flags
        if sf.flags:
            _CSUM_FIELDS.pack_into(hdr, 6, sf.csum_start, sf.csum_offset)
        return self._write(q, None, hdr, [memoryview(sf.data)], len(sf.data))

    def _write(self, q: RxQueue, chain: DescriptorChain | None, hdr: bytearray,
               payload: list[memoryview], payload_len: int) -> bool:
        """Scatter header + payload over as many RX chains as it takes (MRG_RXBUF).

        ``chain`` is one already popped for this frame, or None. Returns False when
        the frame was dropped.
        """
        ring = q.vring
        total = len(hdr) + payload_len
        chains: list[DescriptorChain] = []
        cap = 0
        while True:
            if chain is None:
                try:
                    chain = q.reserve.pop() if q.reserve else ring.pop()
                except VirtioError as exc:
                    self._ring_error(q, exc)
                    return False
                if chain is None:
                    q.reserve.extend(reversed(chains))
                    self.counters.drop(Drop.RX_RING_FULL)
                    return False
            size = sum(map(len, chain.writable))
            if size == 0:
                self._ring_error(q, DescriptorError(
                    f"receive chain {chain.head} has no device-writable buffer"))
                return False
            chains.append(chain)
            cap += size
            if cap >= total:
                break
            if not self.mergeable:
                q.reserve.append(chain)
                self.counters.drop(Drop.RX_BUFFER_SMALL)
                return False
            chain = None
        if len(hdr) >= 12:
            _NUM_BUFFERS.pack_into(hdr, 10, len(chains))
        srcs = [memoryview(hdr), *payload]
        nsrc = len(srcs)
        si = 0
        so = 0
        pending = q.pending
        for c in chains:
            written = 0
            for w in c.writable:
                wl = len(w)
                wo = 0
                while wo < wl and si < nsrc:
                    s = srcs[si]
                    take = min(wl - wo, len(s) - so)
                    w[wo:wo + take] = s[so:so + take]
                    wo += take
                    so += take
                    if so == len(s):
                        si += 1
                        so = 0
                written += wo
                if si == nsrc:
                    break
            pending.append((c, written))
        counters = self.counters
        counters.out_packets += 1
        counters.out_bytes += payload_len
        if self.switch is not None:
            self.switch.touch(q)
        return True

    def _ring_error(self, q: RxQueue, exc: VirtioError, frames: int = 1) -> None:
        """The destination's RX ring broke: its fault, counted and failed here.

        ``frames`` were being delivered; frames already written in this burst but
        not yet published are lost too: they move from ``out`` to the drops."""
        c = self.counters
        lost = q.pending
        if lost:
            hs = self.hdr_size
            c.out_packets -= len(lost)
            c.out_bytes -= sum(n for _, n in lost) - len(lost) * hs
        c.drop(Drop.RX_RING_ERROR, frames + len(lost))
        log.warning("%s: receive queue %d is broken, failing it: %s",
                    self.name, q.vring.index, exc)
        q.reserve.clear()
        q.pending.clear()
        q.broken = True
        q.vring.fail(exc)
