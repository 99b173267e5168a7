"""The INFLIGHT_SHMFD area as a vhost-user session holds it: allocation
(GET_INFLIGHT_FD), mapping (SET_INFLIGHT_FD) and one tracker per queue.

The records themselves (layout, begin/complete/commit, resubmission after a
reconnect, split and packed) are ``vvu_runtime.virtio.inflight``'s
:class:`SplitInflight` and :class:`PackedInflight`, which implement the
``InflightTracker`` protocol ``vring.Vring`` calls. The front-end (QEMU) only
keeps the fd across back-end restarts; the content is ours.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from vvu_runtime.vhost_user.peer_fds import seal_unshrinkable
from vvu_runtime.virtio.errors import RingError
from vvu_runtime.virtio.inflight import (
    PackedInflight,
    SplitInflight,
    inflight_queue_region_size,
    inflight_region_size,
)


def queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's inflight region."""
    return inflight_queue_region_size(queue_size, packed)


class InflightArea:
    """A mapped inflight area covering ``num_queues`` queues of ``queue_size``."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int, packed: bool = False) -> None:
        need = inflight_region_size(num_queues, queue_size, packed)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.region_size = queue_region_size(queue_size, packed)
        if mmap_size < need:
            raise RingError(f"inflight area of {mmap_size} bytes is too small for "
                            f"{num_queues} queues of {queue_size} ({need} needed)")
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
        size = inflight_region_size(num_queues, queue_size, packed)
        fd = os.memfd_create("vvu-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            seal_unshrinkable(fd)  # the front-end gets this fd: it must not shrink it
            area = cls(fd, size, 0, num_queues, queue_size, packed)
        except BaseException:
            os.close(fd)
            raise
        return area, fd

    def tracker(self, index: int) -> SplitInflight | PackedInflight:
        """The tracker of queue ``index`` (bound to its ring by ``resubmit``)."""
        if not 0 <= index < self.num_queues:
            raise RingError(f"queue {index} is outside the inflight area "
                            f"({self.num_queues} queues)")
        off = index * self.region_size
        view = self.view[off:off + self.region_size]
        if self.packed:
            return PackedInflight(view, self.queue_size)
        return SplitInflight(view, self.queue_size)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a tracker still holds a slice
            self._mmap.close()
