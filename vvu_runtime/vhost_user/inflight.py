"""The INFLIGHT_SHMFD area: shared memory where the back-end records which
requests it has taken and not yet completed, so that a back-end restarted after a
crash (or reconnected) can resubmit them (vhost-user.rst "Inflight I/O tracking").

Layout per queue, split rings (libvhost-user compatible)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    DescStateSplit desc[desc_num]   = {u8 inflight; u8 pad[5]; u16 next; u64 counter}

Each queue's region is ``align_up(16 * queue_size + 2, 64)`` bytes (the size
libvhost-user and QEMU's vhost-user-blk agree on), queues back to back.
Packed rings use a larger per-descriptor record; the area is sized for them but
tracking is implemented for split rings (the ring most front-ends use).

The front-end (QEMU) only keeps the fd across back-end restarts; the area's
content is ours.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable

from vvu_runtime.virtio.errors import RingError
from vvu_runtime.virtio.queue import DescriptorChain, Virtqueue

INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1

SPLIT_HEADER = struct.Struct("=QHHHH")      # features, version, desc_num, last_batch_head,
                                            # used_idx (16 bytes)
SPLIT_DESC = struct.Struct("=B5xHQ")        # inflight, next, counter (16 bytes)
PACKED_HEADER_SIZE = 32
PACKED_DESC_SIZE = 32


def _align(n: int) -> int:
    return (n + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's inflight region."""
    if packed:
        return _align(PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size)
    return _align(SPLIT_DESC.size * queue_size + 2)


class InflightArea:
    """A mapped inflight area covering ``num_queues`` queues of ``queue_size``."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int, packed: bool = False) -> None:
        if num_queues <= 0 or queue_size <= 0:
            raise RingError(f"inflight area for {num_queues} queues of {queue_size}: "
                            "both must be positive")
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.region_size = queue_region_size(queue_size, packed)
        if mmap_size < self.region_size * num_queues:
            raise RingError(f"inflight area of {mmap_size} bytes is too small for "
                            f"{num_queues} queues of {queue_size} "
                            f"({self.region_size * num_queues} needed)")
        start = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        skip = mmap_offset - start
        try:
            self._mmap = mmap.mmap(fd, skip + mmap_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as exc:
            raise RingError(f"cannot map the inflight area ({mmap_size} bytes at "
                            f"{mmap_offset}): {exc}") from exc
        self.view = memoryview(self._mmap)[skip:skip + mmap_size]
        self.mmap_size = mmap_size

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int,
                 packed: bool = False) -> tuple[InflightArea, int]:
        """A new zeroed area in a memfd: (area, fd). The caller owns the fd."""
        size = queue_region_size(queue_size, packed) * num_queues
        fd = os.memfd_create("vvu-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            area = cls(fd, size, 0, num_queues, queue_size, packed)
        except BaseException:
            os.close(fd)
            raise
        return area, fd

    def tracker(self, index: int, used_idx: Callable[[], int] | None = None) -> SplitInflight:
        """The tracker of queue ``index``."""
        if not 0 <= index < self.num_queues:
            raise RingError(f"queue {index} is outside the inflight area "
                            f"({self.num_queues} queues)")
        if self.packed:
            raise RingError("inflight tracking of packed rings is not implemented")
        off = index * self.region_size
        return SplitInflight(self.view[off:off + self.region_size], self.queue_size, used_idx)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a tracker still holds a slice
            self._mmap.close()


class SplitInflight:
    """Inflight records of one split queue (implements vring.InflightTracker).

    ``used_idx`` reads the ring's current used index (free-running u16), to
    repair a batch that was half-completed when the previous back-end died.
    """

    __slots__ = ("_counter", "_used_idx", "size", "view")

    def __init__(self, view: memoryview, size: int,
                 used_idx: Callable[[], int] | None = None) -> None:
        self.view = view
        self.size = size
        self._used_idx = used_idx
        self._counter = 0

    def _desc_off(self, head: int) -> int:
        if not 0 <= head < self.size:
            raise RingError(f"inflight head {head} outside a ring of {self.size}")
        return SPLIT_HEADER.size + head * SPLIT_DESC.size

    def fetched(self, chain: DescriptorChain) -> None:
        off = self._desc_off(chain.head)
        self._counter += 1
        SPLIT_DESC.pack_into(self.view, off, 1, 0, self._counter)

    def completing(self, chain: DescriptorChain) -> None:
        # last_batch_head = head (offset 12 in the header)
        struct.pack_into("=H", self.view, 12, chain.head)

    def completed(self, chain: DescriptorChain) -> None:
        off = self._desc_off(chain.head)
        self.view[off] = 0
        if self._used_idx is not None:
            struct.pack_into("=H", self.view, 14, self._used_idx() & 0xFFFF)

    def pending_heads(self) -> list[int]:
        """Heads recorded inflight, oldest first; repairs a half-completed batch.

        Initialises a fresh (version 0) region instead: nothing is pending there.
        """
        _, version, desc_num, last_batch_head, used_idx = SPLIT_HEADER.unpack_from(self.view, 0)
        if version == 0:
            SPLIT_HEADER.pack_into(self.view, 0, 0, INFLIGHT_VERSION, self.size, 0,
                                   self._used_idx() & 0xFFFF if self._used_idx else 0)
            return []
        if desc_num != self.size:
            raise RingError(f"inflight region was for {desc_num} descriptors, "
                            f"the ring has {self.size}")
        if self._used_idx is not None:
            ring_used = self._used_idx() & 0xFFFF
            if ring_used != used_idx and last_batch_head < self.size:
                # The used ring already has the last completion: it is not inflight.
                self.view[self._desc_off(last_batch_head)] = 0
                struct.pack_into("=H", self.view, 14, ring_used)
        pending: list[tuple[int, int]] = []
        for head in range(self.size):
            inflight, _, counter = SPLIT_DESC.unpack_from(self.view, self._desc_off(head))
            if inflight:
                pending.append((counter, head))
        pending.sort()
        if pending:
            self._counter = max(self._counter, pending[-1][0])
        return [head for _, head in pending]

    def resubmit(self, queue: Virtqueue) -> list[DescriptorChain]:
        """Chains of the pending heads, rebuilt by the queue (``chain_at(head)``)."""
        heads = self.pending_heads()
        if not heads:
            return []
        chain_at: Callable[[int], DescriptorChain] | None = getattr(queue, "chain_at", None)
        if chain_at is None:
            raise RingError("this ring implementation cannot rebuild inflight chains "
                            "(no chain_at)")
        return [chain_at(head) for head in heads]
