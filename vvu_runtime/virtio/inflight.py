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
free list); :func:`inflight_region_size` sizes them, :class:`PackedInflight`
tracks them.

:class:`SplitInflight` offers the steps of the spec (``begin`` on fetch;
``complete`` per used element, then ``commit`` once the used idx is published;
``pending`` on reconnect) and, on top, the ``InflightTracker`` protocol the
vhost-user ``Vring`` calls (``fetched``/``completing``/``completed``/``resubmit``).
"""

from __future__ import annotations

import struct

from vvu_runtime.virtio.errors import RingError
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

    def resubmit(self, queue: Virtqueue) -> list[DescriptorChain]:
        """Bind to the (split) ``queue`` that just started; the chains to process again.

        Also moves the queue's ``last_avail_idx`` past the inflight entries, as
        libvhost-user does: after a back-end crash the front-end sends the used idx
        as the base (it could not ask GET_VRING_BASE), and the entries between used
        and used + inflight are exactly the ones being resubmitted here.
        """
        if not isinstance(queue, SplitQueue):
            raise RingError(f"a {type(queue).__name__} is not a split ring: a split inflight "
                            "region cannot track it")
        self._queue = queue
        heads = self.pending(queue.used_idx)
        queue.last_avail_idx = queue.used_idx + len(heads)
        return [queue.chain_at(head) for head in heads]


class PackedInflight:
    """Inflight records of one packed queue (placeholder until implemented)."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        raise RingError("inflight tracking of packed rings is not implemented")
