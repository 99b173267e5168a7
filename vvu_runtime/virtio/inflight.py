"""Inflight I/O tracking in the INFLIGHT_SHMFD area (vhost-user.rst "Inflight I/O tracking").

The back-end allocates the area (GET_INFLIGHT_FD), the front-end keeps the fd and
hands it back to a restarted back-end (SET_INFLIGHT_FD), which then resubmits the
requests that were taken from the ring but never completed. The front-end never
reads the content: the layout only has to agree with ourselves, but it follows
libvhost-user and DPDK byte for byte (sizes included) so that an area survives a
switch between back-end implementations.

Per queue, split ring (all fields native-endian)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    DescStateSplit desc[desc_num] = {u8 inflight; u8 pad[5]; u16 next; u64 counter}

Packed rings use ``DescStatePacked`` (32 bytes, a copy of each descriptor and a
free list, header padded to 32 bytes); :class:`PackedInflight` tracks them.

:class:`SplitInflight` offers the steps of the spec (``begin`` on fetch;
``complete`` per used element, then ``commit`` once the used idx is published;
``pending`` on reconnect) and, on top, the ``InflightTracker`` protocol the
vhost-user ``Vring`` calls (``fetched``/``completing``/``completed``/``resubmit``).
"""

from __future__ import annotations

import struct

from vvu_runtime.virtio.errors import RingError
from vvu_runtime.virtio.features import DescFlag
from vvu_runtime.virtio.packed import PackedQueue
from vvu_runtime.virtio.queue import DescriptorChain, Virtqueue
from vvu_runtime.virtio.split import SplitQueue

__all__ = [
    "INFLIGHT_ALIGNMENT",
    "INFLIGHT_VERSION",
    "PackedInflight",
    "SplitInflight",
    "inflight_queue_region_size",
    "inflight_region_size",
]

INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1

SPLIT_HEADER = struct.Struct("=QHHHH")  # features, version, desc_num, last_batch_head, used_idx
SPLIT_DESC = struct.Struct("=B5xHQ")  # inflight, next, counter
PACKED_HEADER = struct.Struct("=QHHHHHHBB7x")  # ... used_wrap_counter, old_used_wrap_counter
PACKED_DESC = struct.Struct("=BxHHHQHHIQ")  # inflight, next, last, num, counter, id, flags,
#                                              len, addr


def _align(n: int) -> int:
    return -(-n // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


def inflight_queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's region (libvhost-user's / DPDK's sizes, 64-byte aligned)."""
    if packed:
        # DPDK: 32 * n + sizeof the header fields (29, padded to 32 in the struct).
        return _align(PACKED_DESC.size * queue_size + 29)
    # libvhost-user: 16 * n + 2, which rounds up past the 16-byte header.
    return _align(SPLIT_DESC.size * queue_size + 2)


def inflight_region_size(num_queues: int, queue_size: int, packed: bool = False) -> int:
    """Bytes of the whole area: ``num_queues`` regions back to back."""
    if num_queues <= 0 or not 0 < queue_size <= 32768:
        raise RingError(f"inflight area for {num_queues} queues of {queue_size} entries: "
                        "both must be positive, queues at most 32768 entries")
    return inflight_queue_region_size(queue_size, packed) * num_queues


class SplitInflight:
    """Inflight records of one split queue, over ``view`` (its region of the area).

    Fast paths (``begin``/``complete``/``commit``) write through integer casts of the
    region; nothing is allocated per request.
    """

    __slots__ = ("_batch", "_counter", "_queue", "_u8", "_u16", "_u64", "queue_size", "view")

    # u16 / u64 positions of the header fields and of desc[i]'s fields.
    _VERSION, _DESC_NUM, _LAST_BATCH_HEAD, _USED_IDX = 4, 5, 6, 7

    def __init__(self, view: memoryview, queue_size: int) -> None:
        need = SPLIT_HEADER.size + SPLIT_DESC.size * queue_size
        if not 0 < queue_size <= 32768 or len(view) < need:
            raise RingError(f"inflight region of {len(view)} bytes cannot track a queue of "
                            f"{queue_size} entries ({need} bytes needed)")
        view = view[:need]
        self.view = view
        self.queue_size = queue_size
        self._u8 = view
        self._u16 = view.cast("H")
        self._u64 = view.cast("Q")
        self._batch: list[int] = []
        self._queue: SplitQueue | None = None
        # Counters must keep increasing across back-end lifetimes.
        self._counter = 1 + max((self._u64[3 + 2 * i] for i in range(queue_size)
                                 if self._u8[16 + 16 * i]), default=0)

    @classmethod
    def for_queues(cls, area: memoryview, num_queues: int, queue_size: int) -> list[SplitInflight]:
        """One tracker per queue of an area made by :func:`inflight_region_size`."""
        stride = inflight_queue_region_size(queue_size)
        if len(area) < stride * num_queues:
            raise RingError(f"inflight area of {len(area)} bytes is too small for "
                            f"{num_queues} queues of {queue_size} ({stride * num_queues} needed)")
        return [cls(area[q * stride:(q + 1) * stride], queue_size) for q in range(num_queues)]

    # -- header ----------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """False for a fresh area (or one the front-end zeroed on a VM reset)."""
        return self._u16[self._VERSION] != 0

    @property
    def used_idx(self) -> int:
        return int(self._u16[self._USED_IDX])

    def init(self, used_idx: int = 0) -> None:
        """Start a fresh region: nothing inflight."""
        self.view[:] = bytes(len(self.view))
        self._u16[self._DESC_NUM] = self.queue_size
        self._u16[self._USED_IDX] = used_idx & 0xFFFF
        self._u16[self._VERSION] = INFLIGHT_VERSION
        self._batch.clear()
        self._counter = 1

    # -- the spec's steps ------------------------------------------------------------------

    def begin(self, head: int) -> None:
        """``head`` was taken from the avail ring: record it with the next counter."""
        self._u64[3 + 2 * head] = self._counter
        self._counter += 1
        self._u8[16 + 16 * head] = 1

    def complete(self, head: int) -> None:
        """``head`` goes into the used ring in the batch being built (before the used
        idx is published): link it into the last-batch list."""
        u16 = self._u16
        u16[11 + 8 * head] = u16[self._LAST_BATCH_HEAD]
        u16[self._LAST_BATCH_HEAD] = head
        self._batch.append(head)

    def commit(self, used_idx: int) -> None:
        """The used idx ``used_idx`` covering the batch is published: the batch is done."""
        u8 = self._u8
        for head in self._batch:
            u8[16 + 16 * head] = 0
        self._batch.clear()
        self._u16[self._USED_IDX] = used_idx & 0xFFFF

    def pending(self, ring_used_idx: int) -> list[int]:
        """After a reconnect: heads still inflight, oldest first.

        ``ring_used_idx`` is ``used->idx`` as the ring holds it now. If it differs
        from our ``used_idx``, the previous back-end published a batch but died
        before clearing it: the ``ring_used_idx - used_idx`` entries of the
        last-batch list are done. A fresh region is initialised instead.
        """
        ring_used_idx &= 0xFFFF
        if not self.initialized:
            self.init(ring_used_idx)
            return []
        u8, u16, u64 = self._u8, self._u16, self._u64
        size = self.queue_size
        if u16[self._DESC_NUM] != size:
            raise RingError(f"inflight region was made for a queue of {u16[self._DESC_NUM]} "
                            f"entries, this queue has {size}")
        batch = (ring_used_idx - u16[self._USED_IDX]) & 0xFFFF
        if batch:
            head = u16[self._LAST_BATCH_HEAD]
            for _ in range(min(batch, size)):
                if head >= size:
                    break  # a list we never wrote: stop rather than trust it
                u8[16 + 16 * head] = 0
                head = u16[11 + 8 * head]
            u16[self._USED_IDX] = ring_used_idx
        self._batch.clear()
        order = sorted((u64[3 + 2 * i], i) for i in range(size) if u8[16 + 16 * i])
        self._counter = 1 + (order[-1][0] if order else 0)
        return [head for _, head in order]

    # -- vhost_user.vring.InflightTracker ---------------------------------------------------

    def fetched(self, chain: DescriptorChain) -> None:
        self.begin(chain.head)

    def completing(self, chain: DescriptorChain) -> None:
        self.complete(chain.head)

    def completed(self, chain: DescriptorChain) -> None:
        queue = self._queue
        if queue is None:
            raise RingError("inflight tracker used before resubmit() bound it to a queue")
        self.commit(queue.used_idx)

    def bind(self, queue: Virtqueue) -> SplitQueue:
        """Track ``queue`` from now on (also after the ring was rebuilt over a new
        memory table); the queue, as the ring type this region tracks."""
        if not isinstance(queue, SplitQueue):
            raise RingError(f"a {type(queue).__name__} is not a split ring: a split inflight "
                            "region cannot track it")
        if queue.size > self.queue_size:  # heads index the records
            raise RingError(f"queue {queue.index}: the inflight region tracks "
                            f"{self.queue_size} entries, the ring has {queue.size}",
                            queue=queue.index)
        self._queue = queue
        return queue

    def resubmit(self, queue: Virtqueue) -> list[DescriptorChain]:
        """Bind to the (split) ``queue`` that just started; the chains to process again.

        Also moves the queue's ``last_avail_idx`` past the inflight entries, as
        libvhost-user does: after a back-end crash the front-end sends the used idx
        as the base (it could not ask GET_VRING_BASE), and the entries between used
        and used + inflight are exactly the ones being resubmitted here.
        """
        queue = self.bind(queue)
        heads = self.pending(queue.used_idx)
        queue.last_avail_idx = queue.used_idx + len(heads)
        return [queue.chain_at(head) for head in heads]


class PackedInflight:
    """Inflight records of one packed queue, over ``view`` (its region of the area).

    Packed rings reuse descriptor slots as soon as the device has written a used
    descriptor over them, so the record keeps a copy of every descriptor of every
    chain in flight, in entries taken from a free list (vhost-user.rst). The
    ``old_*`` header fields are the last committed state: a crash between starting
    and finishing a completion is rolled back or forward on reconnect, by looking at
    whether the used descriptor reached the ring.

    Use it through the ``InflightTracker`` protocol (``fetched`` right after each
    ``pop``, ``completing``/``completed`` around each ``push``, ``resubmit`` when the
    ring starts); the packed queue must be a ``PackedQueue``.
    """

    __slots__ = ("_batch", "_counter", "_entry_of", "_queue", "_u8", "_u16", "_u64",
                 "queue_size", "view")

    _VERSION, _DESC_NUM, _FREE_HEAD, _OLD_FREE_HEAD, _USED_IDX, _OLD_USED_IDX = 4, 5, 6, 7, 8, 9
    _USED_WRAP, _OLD_USED_WRAP = 20, 21  # byte offsets
    _STORE = struct.Struct("=HHIQ")  # id, flags, len, addr at byte 16 of an entry

    def __init__(self, view: memoryview, queue_size: int) -> None:
        need = 32 + PACKED_DESC.size * queue_size
        if not 0 < queue_size <= 32768 or len(view) < need:
            raise RingError(f"inflight region of {len(view)} bytes cannot track a packed queue "
                            f"of {queue_size} entries ({need} bytes needed)")
        view = view[:need]
        self.view = view
        self.queue_size = queue_size
        self._u8 = view
        self._u16 = view.cast("H")
        self._u64 = view.cast("Q")
        self._queue: PackedQueue | None = None
        self._batch: list[int] = []
        self._entry_of: dict[int, int] = {}  # buffer id -> entry of its record
        self._counter = 1 + max((self._u64[5 + 4 * e] for e in range(queue_size)
                                 if self._u8[32 + 32 * e]), default=0)

    @classmethod
    def for_queues(cls, area: memoryview, num_queues: int,
                   queue_size: int) -> list[PackedInflight]:
        stride = inflight_queue_region_size(queue_size, packed=True)
        if len(area) < stride * num_queues:
            raise RingError(f"inflight area of {len(area)} bytes is too small for "
                            f"{num_queues} packed queues of {queue_size}")
        return [cls(area[q * stride:(q + 1) * stride], queue_size) for q in range(num_queues)]

    @property
    def initialized(self) -> bool:
        return self._u16[self._VERSION] != 0

    def init(self, used_idx: int = 0, used_wrap: int = 1) -> None:
        """A fresh region: every entry free (linked in order), nothing inflight."""
        self.view[:] = bytes(len(self.view))
        u16 = self._u16
        for e in range(self.queue_size):
            u16[17 + 16 * e] = e + 1  # next; queue_size ends the list
        u16[self._DESC_NUM] = self.queue_size
        u16[self._USED_IDX] = u16[self._OLD_USED_IDX] = used_idx
        self._u8[self._USED_WRAP] = self._u8[self._OLD_USED_WRAP] = used_wrap & 1
        u16[self._VERSION] = INFLIGHT_VERSION
        self._batch.clear()
        self._entry_of.clear()
        self._counter = 1

    def _next(self, e: int) -> int:
        nxt: int = self._u16[17 + 16 * e]
        if nxt > self.queue_size:
            raise RingError(f"packed inflight region: entry {e} links to {nxt}, past "
                            f"{self.queue_size} entries")
        return nxt

    # -- vhost_user.vring.InflightTracker -----------------------------------------------

    def fetched(self, chain: DescriptorChain) -> None:
        queue = self._bound()
        n = chain.ndescs
        if chain.head in self._entry_of:
            raise RingError(f"queue {queue.index}: the driver made buffer id {chain.head} "
                            "available again while it is still in flight", queue=queue.index)
        size = self.queue_size
        descs = queue.raw_descriptors((queue.last_avail_idx - n) % size, n)
        u8, u16 = self._u8, self._u16
        e = u16[self._OLD_FREE_HEAD]
        if e >= size:
            raise RingError(f"queue {queue.index}: packed inflight region has no free entry")
        u16[19 + 16 * e] = 0  # num
        self._u64[5 + 4 * e] = self._counter
        self._counter += 1
        u8[32 + 32 * e] = 1
        free = u16[self._FREE_HEAD]
        for k, (addr, length, buf_id, flags) in enumerate(descs):
            if free >= size:
                raise RingError(f"queue {queue.index}: packed inflight region ran out of "
                                "free entries")
            if k == n - 1:
                u16[18 + 16 * e] = free  # last
            u16[19 + 16 * e] += 1
            self._STORE.pack_into(self.view, 48 + 32 * free, buf_id, flags, length, addr)
            free = self._next(free)
        u16[self._FREE_HEAD] = free
        u16[self._OLD_FREE_HEAD] = free
        self._entry_of[chain.head] = e

    def completing(self, chain: DescriptorChain) -> None:
        queue = self._bound()
        e = self._entry_of.pop(chain.head, None)
        if e is None:
            raise RingError(f"queue {queue.index}: buffer id {chain.head} completed but not "
                            "recorded in flight", queue=queue.index)
        u8, u16 = self._u8, self._u16
        u16[17 + 16 * u16[18 + 16 * e]] = u16[self._FREE_HEAD]  # desc[e.last].next
        u16[self._FREE_HEAD] = e
        used = u16[self._USED_IDX] + u16[19 + 16 * e]
        if used >= self.queue_size:
            used -= self.queue_size
            u8[self._USED_WRAP] ^= 1
        u16[self._USED_IDX] = used
        self._batch.append(e)

    def completed(self, chain: DescriptorChain) -> None:
        u8, u16 = self._u8, self._u16
        for e in self._batch:
            u8[32 + 32 * e] = 0
        self._batch.clear()
        u16[self._OLD_FREE_HEAD] = u16[self._FREE_HEAD]
        u16[self._OLD_USED_IDX] = u16[self._USED_IDX]
        u8[self._OLD_USED_WRAP] = u8[self._USED_WRAP]

    def _bound(self) -> PackedQueue:
        if self._queue is None:
            raise RingError("inflight tracker used before resubmit() bound it to a queue")
        return self._queue

    def bind(self, queue: Virtqueue) -> PackedQueue:
        """Track ``queue`` from now on (also after the ring was rebuilt over a new
        memory table); the queue, as the ring type this region tracks."""
        if not isinstance(queue, PackedQueue):
            raise RingError(f"a {type(queue).__name__} is not a packed ring: a packed inflight "
                            "region cannot track it")
        if queue.size != self.queue_size:  # the records hold ring positions
            raise RingError(f"queue {queue.index}: the packed inflight region tracks a ring "
                            f"of {self.queue_size} entries, this one has {queue.size}",
                            queue=queue.index)
        self._queue = queue
        return queue

    def resubmit(self, queue: Virtqueue) -> list[DescriptorChain]:
        """Bind to the packed ``queue`` that just started; the chains to process again.

        Also puts the queue's positions where the previous back-end left them: used at
        the committed used index, avail past every slot still in flight (after a
        crash the front-end cannot tell us: QEMU does not restore packed positions).
        """
        queue = self.bind(queue)
        self._batch.clear()
        self._entry_of.clear()
        if not self.initialized:
            self.init(queue.used_idx, queue.used_wrap)
            return []
        u8, u16, size = self._u8, self._u16, self.queue_size
        if u16[self._DESC_NUM] != size:
            raise RingError(f"inflight region was made for a queue of {u16[self._DESC_NUM]} "
                            f"entries, this queue has {size}")
        old_used, old_wrap = u16[self._OLD_USED_IDX], u8[self._OLD_USED_WRAP]
        if old_used >= size or u16[self._USED_IDX] >= size:
            raise RingError(f"packed inflight region: used index past a ring of {size}")
        if (u16[self._USED_IDX], u8[self._USED_WRAP]) != (old_used, old_wrap):
            # A completion was in progress. Did its used descriptor reach the ring?
            flags = queue.raw_descriptors(old_used, 1)[0][3]
            still_available = int(DescFlag.AVAIL) if old_wrap else int(DescFlag.USED)
            if flags & (DescFlag.AVAIL | DescFlag.USED) != still_available:
                # Yes: the driver may have seen it, so commit.
                u16[self._OLD_FREE_HEAD] = u16[self._FREE_HEAD]
                u16[self._OLD_USED_IDX] = old_used = u16[self._USED_IDX]
                u8[self._OLD_USED_WRAP] = old_wrap = u8[self._USED_WRAP]
        # Roll back whatever was in progress (a fetch or a completion).
        u16[self._FREE_HEAD] = u16[self._OLD_FREE_HEAD]
        u16[self._USED_IDX] = old_used
        u8[self._USED_WRAP] = old_wrap
        e = u16[self._FREE_HEAD]
        for _ in range(size):
            if e >= size:
                break
            u8[32 + 32 * e] = 0
            e = self._next(e)
        pending = sorted((self._u64[5 + 4 * e], e) for e in range(size) if u8[32 + 32 * e])
        self._counter = 1 + (pending[-1][0] if pending else 0)
        slots = sum(u16[19 + 16 * e] for _, e in pending)
        if slots > size:
            raise RingError(f"packed inflight region records {slots} descriptors in flight in "
                            f"a ring of {size}")
        avail, avail_wrap = old_used + slots, old_wrap
        if avail >= size:
            avail, avail_wrap = avail - size, avail_wrap ^ 1
        queue.set_position(avail, avail_wrap, old_used, old_wrap)
        chains = []
        for _, e in pending:
            descs = []
            d = e
            for _ in range(u16[19 + 16 * e]):
                if d >= size:
                    raise RingError(f"packed inflight region: record {e} is cut short")
                buf_id, flags, length, addr = self._STORE.unpack_from(self.view, 48 + 32 * d)
                descs.append((addr, length, buf_id, flags))
                d = self._next(d)
            chain = queue.chain_from_descriptors(descs)
            self._entry_of[chain.head] = e
            chains.append(chain)
        return chains
