"""The DRIVER side of a split ring: what a guest's virtio driver does.

Used by our vhost-user frontend test tool, the benchmarks (to feed a device)
and, later, the VVU guest driver for its own rx/tx queues. The driver owns the
descriptor table: it keeps a free list, builds chains (direct or through an
indirect table it is given room for), publishes heads in the avail ring,
decides whether the device wants a kick, and collects used buffers.

Addresses are whatever the device will see in descriptors: guest-physical
addresses of a :class:`GuestMemory`, or plain offsets when the ring lives in a
bare memoryview (then buffer addresses are offsets into that view too).
The device is not trusted either: a used element naming a descriptor that is
not in flight, or a used idx that jumps, raises RingError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from vvu_runtime.virtio.errors import GuestMemoryError, RingError
from vvu_runtime.virtio.features import AvailFlag, DescFlag, PackedEventFlag, UsedFlag, need_event
from vvu_runtime.virtio.memory import GuestMemory, memory_barrier
from vvu_runtime.virtio.packed import check_packed_queue_size
from vvu_runtime.virtio.split import (
    DESC,
    DESC_SIZE,
    SplitRingLayout,
    check_queue_size,
    split_ring_layout,
)

__all__ = ["Buffer", "PackedDriverRing", "SplitDriverRing", "SplitRingLayout", "split_ring_layout"]

T = TypeVar("T")

#: ``(address, length)`` of one buffer as the device will see it.
Buffer = tuple[int, int]

_pack_desc = DESC.pack_into
_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_P_AVAIL = int(DescFlag.AVAIL)
_P_USED = int(DescFlag.USED)


class SplitDriverRing(Generic[T]):
    """Driver side of one split ring. ``T`` is the caller's per-request token."""

    def __init__(
        self,
        memory: GuestMemory | memoryview,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        event_idx: bool = False,
        reset: bool = True,
    ) -> None:
        check_queue_size(size)
        self.size = size
        self.memory = memory
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.event_idx = event_idx
        self._mask = size - 1
        self._desc = self._view(desc, DESC_SIZE * size)
        avail_view = self._view(avail, 6 + 2 * size)
        used_view = self._view(used, 6 + 8 * size)
        if reset:
            for view in (self._desc, avail_view, used_view):
                view[:] = bytes(len(view))
        self._avail16 = avail_view.cast("H")
        self._used16 = used_view.cast("H")
        self._used64 = used_view[4:4 + 8 * size].cast("Q")
        self._used_event_at = 2 + size
        self._avail_event_at = 2 + 4 * size
        self.avail_idx: int = self._avail16[1]
        self.last_used_idx: int = self._used16[1]
        self._kicked_at = self.avail_idx
        self._interrupts = True
        # Stack of free descriptor indexes; popping from the end hands out 0, 1, 2...
        self._free = list(range(size - 1, -1, -1))
        # head -> (token, descriptor indexes of the chain)
        self._inflight: dict[int, tuple[T, list[int]]] = {}

    @classmethod
    def contiguous(cls, memory: GuestMemory | memoryview, size: int, base: int, *,
                   event_idx: bool = False, used_align: int = 4) -> SplitDriverRing[T]:
        """A ring whose three parts sit back to back from ``base`` (16-byte aligned)."""
        lay = split_ring_layout(size, used_align)
        return cls(memory, size, base + lay.desc_offset, base + lay.avail_offset,
                   base + lay.used_offset, event_idx=event_idx)

    def _view(self, addr: int, length: int) -> memoryview:
        return _view(self.memory, addr, length)

    # -- state -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Descriptors not in any chain the device holds."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains made available and not yet returned."""
        return len(self._inflight)

    # -- making buffers available ---------------------------------------------------------

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T) -> int:
        """Chain the buffers (readable first), publish the chain; returns its head."""
        n = len(readable) + len(writable)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if n > len(self._free):
            raise RingError(f"ring full: {n} descriptors needed, {len(self._free)} free")
        free = self._free
        descs = [free.pop() for _ in range(n)]
        table = self._desc
        k = 0
        for bufs, flag in ((readable, 0), (writable, _WRITE)):
            for addr, length in bufs:
                i = descs[k]
                k += 1
                if k < n:
                    _pack_desc(table, i * DESC_SIZE, addr, length, flag | _NEXT, descs[k])
                else:
                    _pack_desc(table, i * DESC_SIZE, addr, length, flag, 0)
        return self._publish(descs[0], token, descs)

    def add_indirect(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T,
                     table_addr: int) -> int:
        """Like :meth:`add`, through an indirect table written at ``table_addr``
        (16 bytes per buffer, 16-aligned; the caller owns that memory until the
        chain comes back). Takes one ring descriptor."""
        n = len(readable) + len(writable)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if not self._free:
            raise RingError("ring full: no free descriptor for the indirect table")
        table = self._view(table_addr, n * DESC_SIZE)
        k = 0
        for bufs, flag in ((readable, 0), (writable, _WRITE)):
            for addr, length in bufs:
                k += 1
                if k < n:
                    _pack_desc(table, (k - 1) * DESC_SIZE, addr, length, flag | _NEXT, k)
                else:
                    _pack_desc(table, (k - 1) * DESC_SIZE, addr, length, flag, 0)
        head = self._free.pop()
        _pack_desc(self._desc, head * DESC_SIZE, table_addr, n * DESC_SIZE, _INDIRECT, 0)
        return self._publish(head, token, [head])

    def _publish(self, head: int, token: T, descs: list[int]) -> int:
        self._inflight[head] = (token, descs)
        idx = self.avail_idx
        self._avail16[2 + (idx & self._mask)] = head
        idx = (idx + 1) & 0xFFFF
        self._avail16[1] = idx  # after the entry: the device reads idx first
        self.avail_idx = idx
        return head

    def kick_needed(self) -> bool:
        """After adds: does the device want a kick? (EVENT_IDX aware; resets the batch.)"""
        new = self.avail_idx
        old = self._kicked_at
        if new == old:
            return False
        self._kicked_at = new
        memory_barrier()  # our avail idx before the device's avail_event / flags
        if self.event_idx:
            return need_event(self._used16[self._avail_event_at], new, old)
        return not self._used16[0] & UsedFlag.NO_NOTIFY

    # -- taking buffers back -------------------------------------------------------------

    def has_used(self) -> bool:
        return self._used16[1] != self.last_used_idx

    def get_used(self) -> list[tuple[T, int]]:
        """Every chain the device returned since the last call: ``(token, bytes written)``."""
        used_idx = self._used16[1]
        last = self.last_used_idx
        count = (used_idx - last) & 0xFFFF
        if count > len(self._inflight):
            raise RingError(f"device moved used idx from {last} to {used_idx}: "
                            f"{count} entries but only {len(self._inflight)} chains in flight")
        done: list[tuple[T, int]] = []
        used64 = self._used64
        inflight = self._inflight
        free = self._free
        for i in range(last, last + count):
            elem = used64[i & self._mask]
            head = elem & 0xFFFFFFFF
            entry = inflight.pop(head, None)
            if entry is None:
                raise RingError(f"device returned descriptor {head} in used slot {i & 0xFFFF}, "
                                "which is not the head of a chain in flight")
            token, descs = entry
            free.extend(reversed(descs))
            done.append((token, elem >> 32))
        self.last_used_idx = used_idx
        if self._interrupts and self.event_idx and count:
            self._avail16[self._used_event_at] = used_idx
        return done

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (a hint; the device may still)."""
        self._interrupts = False
        if self.event_idx:
            # The farthest point: the device would interrupt only after 65536 more.
            self._avail16[self._used_event_at] = (self.last_used_idx - 1) & 0xFFFF
        else:
            self._avail16[0] = AvailFlag.NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used buffer. Returns True if some are already
        there (the caller should poll once more rather than wait)."""
        self._interrupts = True
        if self.event_idx:
            self._avail16[self._used_event_at] = self.last_used_idx
        else:
            self._avail16[0] = 0
        memory_barrier()
        return self.has_used()


class PackedDriverRing(Generic[T]):
    """Driver side of one packed ring (VIRTIO 1.2 §2.8): buffer ids, wrap counters,
    chains written tail first and published by the head's flags.

    ``desc`` is the descriptor ring, ``driver_area``/``device_area`` the event
    suppression structures (what a vhost-user front-end sends as avail/used).
    """

    def __init__(self, memory: GuestMemory | memoryview, size: int, desc: int,
                 driver_area: int, device_area: int, *, event_idx: bool = False,
                 reset: bool = True) -> None:
        check_packed_queue_size(size)
        self.size = size
        self.memory = memory
        self.desc_addr, self.driver_area, self.device_area = desc, driver_area, device_area
        self.event_idx = event_idx
        self._desc = _view(memory, desc, 16 * size)
        self._drv16 = _view(memory, driver_area, 4).cast("H")
        self._dev16 = _view(memory, device_area, 4).cast("H")
        if reset:
            self._desc[:] = bytes(16 * size)
            self._drv16[0] = self._drv16[1] = 0
            self._dev16[0] = self._dev16[1] = 0
        self._desc16 = self._desc.cast("H")
        self._desc32 = self._desc.cast("I")
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used = 0
        self.used_wrap = 1
        self._free_slots = size
        self._ids = list(range(size - 1, -1, -1))  # free buffer ids
        self._state: dict[int, tuple[T, int]] = {}  # id -> (token, ring slots)
        self._added_since_kick = 0
        self._interrupts_desc = False  # EVENT_IDX: used_event follows last_used

    @classmethod
    def contiguous(cls, memory: GuestMemory | memoryview, size: int, base: int, *,
                   event_idx: bool = False) -> PackedDriverRing[T]:
        """Descriptor ring at ``base``, then the driver and device areas."""
        areas = base + 16 * size
        return cls(memory, size, base, areas, areas + 4, event_idx=event_idx)

    @property
    def num_free(self) -> int:
        return self._free_slots

    @property
    def in_flight(self) -> int:
        return len(self._state)

    def _write_chain(self, descs: list[tuple[int, int, int]], token: T) -> int:
        n = len(descs)
        if n > self._free_slots or not self._ids:
            raise RingError(f"ring full: {n} descriptors needed, {self._free_slots} free")
        buf_id = self._ids.pop()
        start, wrap = self.next_avail, self.avail_wrap
        head_flags = 0
        i, w = start, wrap
        for k, (addr, length, flags) in enumerate(descs):
            if k < n - 1:
                flags |= _NEXT
            flags |= _P_AVAIL if w else _P_USED
            _pack_desc(self._desc, 16 * i, addr, length, buf_id, 0)
            if k == 0:
                head_flags = flags
            else:
                self._desc16[8 * i + 7] = flags
            i += 1
            if i == self.size:
                i, w = 0, w ^ 1
        # The head's flags last: they make the whole chain available at once.
        self._desc16[8 * start + 7] = head_flags
        self.next_avail, self.avail_wrap = i, w
        self._free_slots -= n
        self._state[buf_id] = (token, n)
        self._added_since_kick += n
        return buf_id

    def add(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T) -> int:
        """Chain the buffers (readable first) and make them available; returns the buffer id."""
        descs = [(a, n, 0) for a, n in readable] + [(a, n, _WRITE) for a, n in writable]
        if not descs:
            raise ValueError("a chain needs at least one buffer")
        return self._write_chain(descs, token)

    def add_indirect(self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T,
                     table_addr: int) -> int:
        """Like :meth:`add`, through an indirect table at ``table_addr`` (one ring slot)."""
        entries = [(a, n, 0) for a, n in readable] + [(a, n, _WRITE) for a, n in writable]
        if not entries:
            raise ValueError("a chain needs at least one buffer")
        table = _view(self.memory, table_addr, 16 * len(entries))
        for k, (addr, length, flags) in enumerate(entries):
            _pack_desc(table, 16 * k, addr, length, 0, flags)
        return self._write_chain([(table_addr, 16 * len(entries), _INDIRECT)], token)

    def kick_needed(self) -> bool:
        """After adds: does the device want a kick? (Linux's virtqueue_kick_prepare_packed.)"""
        added = self._added_since_kick
        if not added:
            return False
        self._added_since_kick = 0
        memory_barrier()
        off_wrap, flags = self._dev16[0], self._dev16[1]
        if flags != PackedEventFlag.DESC or not self.event_idx:
            return flags != PackedEventFlag.DISABLE
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.avail_wrap:
            event -= self.size
        new = self.next_avail
        return need_event(event & 0xFFFF, new, (new - added) & 0xFFFF)

    def has_used(self) -> bool:
        flags = self._desc16[8 * self.last_used + 7]
        want = _P_AVAIL | _P_USED if self.used_wrap else 0
        return flags & (_P_AVAIL | _P_USED) == want

    def get_used(self) -> list[tuple[T, int]]:
        """Every buffer the device returned since the last call: ``(token, bytes written)``."""
        done: list[tuple[T, int]] = []
        while self.has_used():
            i = self.last_used
            buf_id = self._desc16[8 * i + 6]
            length = self._desc32[4 * i + 2]
            entry = self._state.pop(buf_id, None)
            if entry is None:
                raise RingError(f"device returned buffer id {buf_id} in slot {i}, which is not "
                                "in flight")
            token, n = entry
            self._ids.append(buf_id)
            self._free_slots += n
            i += n
            if i >= self.size:
                i -= self.size
                self.used_wrap ^= 1
            self.last_used = i
            done.append((token, length))
        if done and self._interrupts_desc:
            self._drv16[0] = self.last_used | self.used_wrap << 15
        return done

    def disable_interrupts(self) -> None:
        self._interrupts_desc = False
        self._drv16[1] = PackedEventFlag.DISABLE

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used buffer; True if one is already there."""
        if self.event_idx:
            self._interrupts_desc = True
            self._drv16[0] = self.last_used | self.used_wrap << 15
            self._drv16[1] = PackedEventFlag.DESC
        else:
            self._drv16[1] = PackedEventFlag.ENABLE
        memory_barrier()
        return self.has_used()


def _view(memory: GuestMemory | memoryview, addr: int, length: int) -> memoryview:
    if isinstance(memory, GuestMemory):
        return memory.translate(addr, length)
    if addr < 0 or addr + length > len(memory):
        raise GuestMemoryError(
            f"range [{addr:#x}, +{length:#x}) is outside the {len(memory):#x}-byte ring memory")
    return memory[addr:addr + length]
