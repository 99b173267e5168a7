"""Device side of a split virtqueue (VIRTIO 1.2 §2.7) living in guest memory.

This is the data-path hot loop of every backend, so it is written for speed:
the three ring parts are translated once, at construction, into memoryviews
(casts to u16/u64 arrays for the index fields, a precompiled ``struct`` for
descriptors), and a one-descriptor chain costs one ``unpack_from``, one
translation and one ``DescriptorChain``. Everything the driver wrote is
checked before use: indexes against the ring size, buffers against the memory
table, chains against loops and the ordering rules.

Concurrency model: the driver (another VM or process) writes the same memory.
We read the avail index before the entries it covers and write a used element
before publishing the used index; CPython performs memoryview accesses in
program order and x86-TSO keeps loads ordered with loads and stores with stores.
The two store→load points of the protocol (publish used idx → read used_event;
write avail_event → re-read avail idx) go through ``memory_barrier``.
The ring views assume a little-endian host (virtio 1.x rings are little-endian).
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from vvu_runtime.virtio import accel
from vvu_runtime.virtio.errors import DescriptorError, GuestMemoryError, RingError, VirtioError
from vvu_runtime.virtio.features import (
    MAX_QUEUE_SIZE,
    AvailFlag,
    DescFlag,
    UsedFlag,
    VhostFeature,
    VirtioFeature,
    need_event,
)
from vvu_runtime.virtio.memory import GuestMemory, memory_barrier
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses, Virtqueue

try:  # the compiled data path (virtio/accel.py); absent when built without a compiler
    from vvu_runtime.virtio import _split_c
except ImportError:
    _IMPORTED = _BUILT = False
else:
    _IMPORTED = True
    _BUILT = accel.current(_split_c, "virtio/_split_c.c", "virtio/_split_core.h")
    _SplitCore = _split_c.SplitCore
    _configure_compiled = _split_c.configure

if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in sight
    raise ImportError("vvu_runtime.virtio.split casts ring memory natively: "
                      "it needs a little-endian host")

__all__ = [
    "DESC_SIZE",
    "MAX_INDIRECT",
    "PureSplitQueue",
    "SplitQueue",
    "SplitRingLayout",
    "check_queue_size",
    "compiled_split_queue",
    "is_compiled",
    "split_ring_layout",
]

#: One descriptor: ``le64 addr, le32 len, le16 flags, le16 next``.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
_unpack_desc = DESC.unpack_from

#: Longest indirect table we walk. The spec bounds direct chains by the queue
#: size; Linux drivers may build indirect tables longer than a small ring, and
#: Linux vhost / QEMU cap a chain at 1024 buffers, so the cap is the larger of both.
MAX_INDIRECT = 1024

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_NEXT_OR_INDIRECT = _NEXT | _INDIRECT
_NO_INTERRUPT = int(AvailFlag.NO_INTERRUPT)
_NO_NOTIFY = int(UsedFlag.NO_NOTIFY)
_EVENT_IDX = int(VirtioFeature.EVENT_IDX)
_INDIRECT_DESC = int(VirtioFeature.INDIRECT_DESC)
_LOG_ALL = int(VhostFeature.LOG_ALL)


@dataclass(frozen=True, slots=True)
class SplitRingLayout:
    """Sizes of the three parts of a split ring, and offsets for a contiguous placement.

    Sizes include the event-index words (``used_event``, ``avail_event``), which a
    driver always allocates. ``used_align`` 4 is the VIRTIO 1.x layout; 4096 gives
    the legacy one.
    """

    size: int
    desc_size: int
    avail_size: int
    used_size: int
    desc_offset: int
    avail_offset: int
    used_offset: int
    total: int

    @property
    def used_event_offset(self) -> int:
        """Offset of ``used_event`` inside the available ring."""
        return 4 + 2 * self.size

    @property
    def avail_event_offset(self) -> int:
        """Offset of ``avail_event`` inside the used ring."""
        return 4 + 8 * self.size


def check_queue_size(size: int, index: int = 0) -> None:
    """A split queue size must be a power of two, 1..32768."""
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise RingError(
            f"queue {index}: size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}",
            queue=index,
        )


def split_ring_layout(size: int, used_align: int = 4) -> SplitRingLayout:
    """Where the parts of a ring of ``size`` entries go when placed back to back."""
    check_queue_size(size)
    desc_size = DESC_SIZE * size
    avail_size = 6 + 2 * size
    used_size = 6 + 8 * size
    avail_offset = desc_size
    used_offset = -(-(avail_offset + avail_size) // used_align) * used_align
    return SplitRingLayout(
        size=size,
        desc_size=desc_size,
        avail_size=avail_size,
        used_size=used_size,
        desc_offset=0,
        avail_offset=avail_offset,
        used_offset=used_offset,
        total=used_offset + used_size,
    )


class SplitQueue(Virtqueue):
    """The device side of one split ring.

    ``addrs`` are front-end user addresses (SET_VRING_ADDR), translated with
    ``memory.translate_user``; descriptor buffers are guest-physical and go
    through ``memory.translate``. ``base`` is SET_VRING_BASE's ``num``: the next
    avail index to process. The used index is read from the ring itself, which
    is where the driver (or the previous back-end) left it.

    A queue is bound to the memory table it was built with: after SET_MEM_TABLE
    or REM_MEM_REG, build a new one from ``get_base()``.
    """

    def __new__(
        cls,
        index: int,
        size: int,
        addrs: RingAddresses,
        memory: GuestMemory,
        features: int,
        base: int = 0,
    ) -> SplitQueue:
        # ``SplitQueue(...)`` gives the compiled ring when it was built (and not
        # switched off), so that every place that builds a ring gets it without
        # knowing; subclasses (PureSplitQueue, the compiled one) are what they say.
        # Only a real GuestMemory qualifies: the compiled path reads its region table.
        if cls is SplitQueue and isinstance(memory, GuestMemory):
            compiled = compiled_split_queue()
            if compiled is not None:
                # object.__new__ refuses a class with a C base: the base's __new__ it is.
                queue: SplitQueue = cast(Any, _SplitCore).__new__(compiled)
                return queue
        return super().__new__(cls)

    def __init__(
        self,
        index: int,
        size: int,
        addrs: RingAddresses,
        memory: GuestMemory,
        features: int,
        base: int = 0,
    ) -> None:
        check_queue_size(size, index)
        self.index = index
        self.size = size
        self.addrs = addrs
        self.memory = memory
        self.features = features
        self._mask = size - 1
        self._event_idx = bool(features & _EVENT_IDX)
        self._indirect_ok = bool(features & _INDIRECT_DESC)
        self._max_indirect = max(size, MAX_INDIRECT)

        for name, addr, align in (("descriptor table", addrs.desc, 16),
                                  ("available ring", addrs.avail, 2),
                                  ("used ring", addrs.used, 4)):
            if addr % align:
                raise RingError(
                    f"queue {index}: {name} address {addr:#x} is not {align}-byte aligned",
                    queue=index,
                )
        # The event words exist only with EVENT_IDX; without it, don't insist the
        # driver mapped them.
        extra = 2 if self._event_idx else 0
        desc = self._ring_view("descriptor table", addrs.desc, DESC_SIZE * size)
        avail = self._ring_view("available ring", addrs.avail, 4 + 2 * size + extra)
        used = self._ring_view("used ring", addrs.used, 4 + 8 * size + extra)
        self._desc = desc
        self._avail16 = avail.cast("H")
        self._used16 = used.cast("H")
        # Used elements {le32 id, le32 len} as one u64 each: one store per element.
        self._used64 = used[4:4 + 8 * size].cast("Q")
        self._used_event_at = 2 + size  # in u16 units of the avail ring
        self._avail_event_at = 2 + 4 * size  # in u16 units of the used ring

        self._last_avail = base & 0xFFFF
        #: Next used ring index to fill (free-running u16), as published in the ring.
        self.used_idx: int = self._used16[1]
        # avail idx as last read: entries up to it are known to be published.
        self._shadow_avail = self._last_avail
        self._signalled_used = self.used_idx
        self._signalled_valid = False
        self._kicks_enabled = True
        self._avail_event = -1  # value last written to avail_event (-1: never)
        self.log_all = bool(features & _LOG_ALL)
        self._log_used = addrs.log

    def _ring_view(self, name: str, uva: int, length: int) -> memoryview:
        try:
            return self.memory.translate_user(uva, length)
        except GuestMemoryError as exc:
            raise GuestMemoryError(
                f"queue {self.index}: {name} at {uva:#x} (+{length:#x}) is not inside guest "
                f"memory: {exc}",
                queue=self.index,
            ) from exc

    def __repr__(self) -> str:
        return (f"SplitQueue(index={self.index}, size={self.size}, "
                f"last_avail_idx={self.last_avail_idx}, used_idx={self.used_idx})")

    # -- configuration changes on a running ring -------------------------------------

    def set_log(self, log_all: bool, addrs: RingAddresses | None = None) -> None:
        """Follow SET_FEATURES toggling LOG_ALL, or SET_VRING_ADDR toggling the log flag.

        Buffers are logged while ``log_all`` and a dirty log is installed; the used
        ring additionally needs ``addrs.log`` (its writes go to ``log_guest_addr``).
        """
        self.log_all = log_all
        if addrs is not None:
            self.addrs = addrs
            self._log_used = addrs.log

    @property
    def last_avail_idx(self) -> int:
        """Next avail ring index to process (free-running u16)."""
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        # Moving our position (inflight resubmission) forgets what we knew of avail idx.
        self._last_avail = self._shadow_avail = value & 0xFFFF

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return (self._last_avail - self.used_idx) & 0xFFFF

    # -- the driver's side of things ----------------------------------------------

    def _refresh_avail(self) -> int:
        """Re-read avail idx; returns how many entries are ready. Re-arms kicks when empty."""
        last = self._last_avail
        avail: int = self._avail16[1]
        if avail == last:
            if not (self._event_idx and self._kicks_enabled) or self._avail_event == avail:
                return 0
            # Ask for a kick on the next buffer, then look again: the driver may
            # have published one after our read but before seeing avail_event.
            self._write_avail_event(avail)
            memory_barrier()
            avail = self._avail16[1]
            if avail == last:
                return 0
        count = (avail - last) & 0xFFFF
        if count > self.size:
            raise RingError(
                f"queue {self.index}: driver moved avail idx to {avail}, {count} entries "
                f"past our position {last} in a ring of {self.size}",
                queue=self.index,
            )
        self._shadow_avail = avail
        return count

    def _write_avail_event(self, value: int) -> None:
        self._used16[self._avail_event_at] = value
        self._avail_event = value
        if self._log_used:
            self._log_ring(4 + 8 * self.size, 2)

    def has_available(self) -> bool:
        return self._avail16[1] != self._last_avail

    def pop(self) -> DescriptorChain | None:
        last = self._last_avail
        if last == self._shadow_avail and not self._refresh_avail():
            return None
        head: int = self._avail16[2 + (last & self._mask)]
        self._last_avail = (last + 1) & 0xFFFF
        # chain_at()'s fast path, inlined: a method call is a tenth of the budget.
        if head < self.size:
            addr, length, flags, _ = _unpack_desc(self._desc, head << 4)
            if length and not flags & _NEXT_OR_INDIRECT:
                try:
                    buf = self.memory.translate(addr, length)
                except GuestMemoryError as exc:
                    raise self._bad_buffer(head, head, addr, length) from exc
                if flags & _WRITE:
                    return DescriptorChain(head, [], [buf], [addr], 1)
                return DescriptorChain(head, [buf], [], [], 1)
        return self.chain_at(head)

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` available chains (fewer if the driver has fewer ready).

        A bad chain raises only when it comes first: the chains before it are
        returned, and the next call raises for it.
        """
        last = self._last_avail
        ready = (self._shadow_avail - last) & 0xFFFF
        if ready < limit:
            ready = self._refresh_avail()
        n = min(ready, limit)
        if n <= 0:
            return []
        avail16 = self._avail16
        mask = self._mask
        size = self.size
        desc = self._desc
        translate = self.memory.translate
        chain_at = self.chain_at
        chains: list[DescriptorChain] = []
        append = chains.append
        i = last
        try:
            for i in range(last, last + n):
                head = avail16[2 + (i & mask)]
                if head < size:  # chain_at()'s fast path, inlined
                    addr, length, flags, _ = _unpack_desc(desc, head << 4)
                    if length and not flags & _NEXT_OR_INDIRECT:
                        try:
                            buf = translate(addr, length)
                        except GuestMemoryError as exc:
                            raise self._bad_buffer(head, head, addr, length) from exc
                        if flags & _WRITE:
                            append(DescriptorChain(head, [], [buf], [addr], 1))
                        else:
                            append(DescriptorChain(head, [buf], [], [], 1))
                        continue
                append(chain_at(head))
        except VirtioError:
            if not chains:
                self._last_avail = (i + 1) & 0xFFFF  # consumed, as pop() does
                raise
            # Hand out the good chains before it; the next call meets the bad one.
            self._last_avail = i & 0xFFFF
            return chains
        self._last_avail = (last + n) & 0xFFFF
        return chains

    def chain_at(self, head: int) -> DescriptorChain:
        """Walk the chain that starts at descriptor ``head`` (also used to resubmit
        inflight requests after a reconnect, without touching the avail ring)."""
        if head >= self.size:
            raise DescriptorError(
                f"queue {self.index}: avail ring names head {head}, ring size is {self.size}",
                queue=self.index, head=head,
            )
        addr, length, flags, nxt = _unpack_desc(self._desc, head << 4)
        if flags & _NEXT_OR_INDIRECT or not length:
            return self._walk(head, addr, length, flags, nxt)
        # Fast path: one direct descriptor.
        try:
            buf = self.memory.translate(addr, length)
        except GuestMemoryError as exc:
            raise self._bad_buffer(head, head, addr, length) from exc
        if flags & _WRITE:
            return DescriptorChain(head, [], [buf], [addr], 1)
        return DescriptorChain(head, [buf], [], [], 1)

    def _bad_buffer(self, head: int, desc: int, addr: int, length: int,
                    where: str = "descriptor") -> GuestMemoryError:
        return GuestMemoryError(
            f"queue {self.index}: {where} {desc} of chain {head} points at "
            f"[{addr:#x}, +{length:#x}), not inside guest memory",
            queue=self.index, head=head,
        )

    def _walk(self, head: int, addr: int, length: int, flags: int, nxt: int) -> DescriptorChain:
        """The general case: chains, zero-length buffers and indirect tables."""
        q = self.index
        translate = self.memory.translate
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpas: list[int] = []
        table = self._desc
        limit = self.size  # descriptors the current table holds
        where = "descriptor"
        i = head
        count = 0  # descriptors walked in the current table
        ring_descs = 0
        indirect = False
        while True:
            count += 1
            if count > limit:
                raise DescriptorError(
                    f"queue {q}: chain {head} has more than {limit} descriptors in its "
                    f"{'indirect table' if indirect else 'ring'} (a loop?)",
                    queue=q, head=head,
                )
            if not indirect:
                ring_descs += 1
            if flags & _INDIRECT:
                if indirect:
                    raise DescriptorError(
                        f"queue {q}: chain {head}: {where} {i} is an indirect descriptor "
                        "inside an indirect table", queue=q, head=head)
                if not self._indirect_ok:
                    raise DescriptorError(
                        f"queue {q}: chain {head}: descriptor {i} is indirect but "
                        "INDIRECT_DESC was not negotiated", queue=q, head=head)
                if flags & _NEXT:
                    raise DescriptorError(
                        f"queue {q}: chain {head}: descriptor {i} sets both INDIRECT and NEXT",
                        queue=q, head=head)
                if not length or length % DESC_SIZE:
                    raise DescriptorError(
                        f"queue {q}: chain {head}: indirect table at descriptor {i} is "
                        f"{length} bytes, not a positive multiple of {DESC_SIZE}",
                        queue=q, head=head)
                if length // DESC_SIZE > self._max_indirect:
                    raise DescriptorError(
                        f"queue {q}: chain {head}: indirect table at descriptor {i} has "
                        f"{length // DESC_SIZE} entries, more than {self._max_indirect}",
                        queue=q, head=head)
                try:
                    table = translate(addr, length)
                except GuestMemoryError as exc:
                    raise self._bad_buffer(head, i, addr, length) from exc
                limit = length // DESC_SIZE
                indirect = True
                where = "indirect descriptor"
                i = 0
                count = 0
                addr, length, flags, nxt = _unpack_desc(table, 0)
                continue
            if length:
                try:
                    buf = translate(addr, length)
                except GuestMemoryError as exc:
                    raise self._bad_buffer(head, i, addr, length, where) from exc
                if flags & _WRITE:
                    writable.append(buf)
                    gpas.append(addr)
                elif writable:
                    raise DescriptorError(
                        f"queue {q}: chain {head}: readable {where} {i} follows a writable one",
                        queue=q, head=head)
                else:
                    readable.append(buf)
            if not flags & _NEXT:
                break
            if nxt >= limit:
                raise DescriptorError(
                    f"queue {q}: chain {head}: {where} {i} links to {nxt}, past the "
                    f"{limit} entries of its table", queue=q, head=head)
            i = nxt
            addr, length, flags, nxt = _unpack_desc(table, i << 4)
        return DescriptorChain(head, readable, writable, gpas, ring_descs)

    # -- giving buffers back --------------------------------------------------------

    def push(self, chain: DescriptorChain, written: int) -> None:
        idx = self.used_idx
        slot = idx & self._mask
        self._used64[slot] = chain.head | written << 32
        idx = (idx + 1) & 0xFFFF
        self._used16[1] = idx  # after the element: the driver reads idx first
        self.used_idx = idx
        if self.log_all and self.memory.dirty_log is not None:
            self._log_push(chain, written, slot, 1)

    def push_many(self, completions: Iterable[tuple[DescriptorChain, int]]) -> None:
        """Push several chains and publish them with a single used idx update."""
        idx = first = self.used_idx
        mask = self._mask
        used64 = self._used64
        done: list[tuple[DescriptorChain, int]] = []
        for chain, written in completions:
            used64[idx & mask] = chain.head | written << 32
            idx += 1
            done.append((chain, written))
        idx &= 0xFFFF
        self._used16[1] = idx
        self.used_idx = idx
        if self.log_all and self.memory.dirty_log is not None:
            for n, (chain, written) in enumerate(done):
                self._log_push(chain, written, (first + n) & mask, 0)
            self._log_ring(2, 2)

    def _log_push(self, chain: DescriptorChain, written: int, slot: int, log_idx: int) -> None:
        mark = self.memory.mark_dirty
        for buf, gpa in zip(chain.writable, chain.writable_gpas, strict=True):
            if written <= 0:
                break
            n = min(len(buf), written)
            mark(gpa, n)
            written -= n
        self._log_ring(4 + 8 * slot, 8)
        if log_idx:
            self._log_ring(2, 2)

    def _log_ring(self, offset: int, length: int) -> None:
        """Log a write to the used ring at ``log_guest_addr + offset`` (if the ring logs)."""
        log = self.memory.dirty_log
        if self._log_used and log is not None:
            log.mark(self.addrs.log_guest_addr + offset, length)

    # -- notifications ----------------------------------------------------------------

    def should_notify(self) -> bool:
        new = self.used_idx
        old = self._signalled_used
        if new == old:
            return False  # nothing pushed since the last decision
        self._signalled_used = new
        # The used idx we published must be visible before we read the driver's
        # wishes, or we may skip an interrupt it is about to ask for.
        memory_barrier()
        if not self._event_idx:
            return not self._avail16[0] & _NO_INTERRUPT
        if not self._signalled_valid:
            # First batch on this queue (e.g. after a reconnect): we don't know what
            # the driver saw last, so interrupt once.
            self._signalled_valid = True
            return True
        return need_event(self._avail16[self._used_event_at], new, old)

    def set_kick_suppression(self, suppress: bool) -> bool:
        self._kicks_enabled = not suppress
        if self._event_idx:
            # With EVENT_IDX, suppressing means leaving avail_event behind; enabling
            # means asking for a kick at the avail idx the driver has reached.
            if not suppress:
                self._write_avail_event(self._avail16[1])
        else:
            self._used16[0] = _NO_NOTIFY if suppress else 0
            if self._log_used:
                self._log_ring(0, 2)
        memory_barrier()
        return self.has_available()

    def get_base(self) -> int:
        return self._last_avail

    def completed_past_base(self) -> list[int]:
        """Heads in the used ring between our base and the used idx.

        Normally there are none: a front-end that loses its back-end without
        GET_VRING_BASE (QEMU on a disconnect) sets the base of the next session to
        the used idx it read at that moment. But a back-end in an appliance VM can
        outlive the connection for a moment and complete a request it had popped
        after that read: the used idx then runs ahead of the base by those chains.
        Running them again would hand the driver the same head twice, which Linux
        takes as a broken ring (I/O errors from then on). ``[]`` unless the used idx
        is 1..size entries ahead of the base (anything else is left to the usual
        checks).
        """
        ahead = (self.used_idx - self._last_avail) & 0xFFFF
        if not 0 < ahead <= self.size:
            return []
        mask = self._mask
        return [self._used64[(self._last_avail + i) & mask] & 0xFFFFFFFF
                for i in range(ahead)]

    def completions_may_be_unseen(self) -> bool:
        # With EVENT_IDX the driver says where it stopped reading (used_event): a
        # used idx past it means completions it has not been interrupted for.
        # Without, only an empty ring is known to owe nothing.
        if self._event_idx:
            return bool(self._avail16[self._used_event_at] != self.used_idx)
        return self.used_idx != 0


class PureSplitQueue(SplitQueue):
    """Always the pure-Python ring, whatever was built: the reference the compiled
    one is tested against (tests/unit/test_split_compiled.py)."""


if _BUILT:
    # The reference methods handed to C are SplitQueue's own, not the subclass's:
    # a C fallback must never land back in the C code.
    _configure_compiled(DescriptorChain, SplitQueue.chain_at, SplitQueue.push,
                        SplitQueue.push_many, VirtioError)

    class CompiledSplitQueue(_SplitCore, SplitQueue):
        """A split ring whose data path runs in C (``_split_c.c``); behaves exactly as
        ``SplitQueue``.

        pop, pop_many, chain_at, push, push_many and has_available come from the C
        base, which serves the inputs it can serve exactly as the methods above do and
        calls them for everything else (so every error is raised by this module's
        code); the rest is SplitQueue's. The ring position (``_last_avail``,
        ``_shadow_avail``, ``used_idx``) and ``log_all`` live in the C struct under
        these names, so both halves share them.
        """

        def __init__(
            self,
            index: int,
            size: int,
            addrs: RingAddresses,
            memory: GuestMemory,
            features: int,
            base: int = 0,
        ) -> None:
            SplitQueue.__init__(self, index, size, addrs, memory, features, base)
            self._bind(self._desc, self._avail16, self._used16, size, self._indirect_ok,
                       self._max_indirect, memory)


def split_built() -> bool:
    """Whether the compiled split ring could be imported (used or not)."""
    return _IMPORTED


@functools.cache
def compiled_split_queue() -> type[SplitQueue] | None:
    """The compiled SplitQueue, or None when its extension was not built, is older
    than its sources, or ``VVU_PURE_PYTHON`` is set. Decided once per process."""
    if not _BUILT or accel.pure_python_forced():
        return None
    return CompiledSplitQueue


def is_compiled(queue: object) -> TypeGuard[SplitQueue]:
    """Whether ``queue`` is a compiled split ring (one the compiled fast paths of the
    back-ends may walk themselves), whichever way this process chose for new rings."""
    return _BUILT and isinstance(queue, CompiledSplitQueue)
