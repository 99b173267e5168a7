"""Device side of a packed virtqueue (VIRTIO 1.2 §2.8) living in guest memory.

One descriptor ring shared by both directions: the driver marks descriptors
available by setting AVAIL to its wrap counter and USED to the inverse; the
device returns a buffer by writing a used descriptor (buffer id, length, AVAIL
and USED both equal to its own wrap counter) at its next used position, then
skips as many slots as the chain took. Each side flips its wrap counter when
its index passes the end of the ring.

``RingAddresses`` for a packed ring: ``desc`` is the descriptor ring, ``avail``
the driver event suppression area (the driver's wishes about interrupts),
``used`` the device event suppression area (our wishes about kicks).

Same concurrency rules as ``split``: a descriptor's ``flags`` is read before the
rest of it and written after the rest of it; ``memory_barrier`` at the two
store→load points. Little-endian host assumed.
"""

from __future__ import annotations

import struct
import sys

from vvu_runtime.virtio.errors import DescriptorError, GuestMemoryError, RingError
from vvu_runtime.virtio.features import (
    MAX_QUEUE_SIZE,
    DescFlag,
    PackedEventFlag,
    VhostFeature,
    VirtioFeature,
    need_event,
)
from vvu_runtime.virtio.memory import GuestMemory, memory_barrier
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses, Virtqueue
from vvu_runtime.virtio.split import MAX_INDIRECT

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("vvu_runtime.virtio.packed casts ring memory natively: "
                      "it needs a little-endian host")

__all__ = [
    "PACKED_DESC",
    "PACKED_INITIAL_BASE",
    "PackedQueue",
    "check_packed_queue_size",
    "decode_packed_base",
    "encode_packed_base",
]

#: One packed descriptor: ``le64 addr, le32 len, le16 id, le16 flags``.
PACKED_DESC = struct.Struct("<QIHH")
_unpack_desc = PACKED_DESC.unpack_from

#: The vring base of a fresh packed ring: both indexes 0, both wrap counters 1.
PACKED_INITIAL_BASE = 1 << 15 | 1 << 31

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_NEXT_OR_INDIRECT = _NEXT | _INDIRECT
_AVAIL = int(DescFlag.AVAIL)
_USED = int(DescFlag.USED)
_AVAIL_USED = _AVAIL | _USED
_ENABLE = int(PackedEventFlag.ENABLE)
_DISABLE = int(PackedEventFlag.DISABLE)
_DESC = int(PackedEventFlag.DESC)
_EVENT_IDX = int(VirtioFeature.EVENT_IDX)
_INDIRECT_DESC = int(VirtioFeature.INDIRECT_DESC)
_LOG_ALL = int(VhostFeature.LOG_ALL)


def check_packed_queue_size(size: int, index: int = 0) -> None:
    """A packed queue holds 1..32768 descriptors (no power-of-two rule)."""
    if not 0 < size <= MAX_QUEUE_SIZE:
        raise RingError(f"queue {index}: packed ring size {size} is not in 1..{MAX_QUEUE_SIZE}",
                        queue=index)


def encode_packed_base(avail_idx: int, avail_wrap: int, used_idx: int, used_wrap: int) -> int:
    """vhost-user vring base of a packed ring: bits 0-14 next avail idx, 15 avail wrap
    counter, 16-30 used idx, 31 used wrap counter."""
    return (avail_idx & 0x7FFF | (avail_wrap & 1) << 15
            | (used_idx & 0x7FFF | (used_wrap & 1) << 15) << 16)


def decode_packed_base(base: int) -> tuple[int, int, int, int]:
    """``(avail_idx, avail_wrap, used_idx, used_wrap)`` of a vring base.

    A front-end that sends only the low 16 bits (the used half all zero) gets the
    used position equal to the avail one, as DPDK does: a ring stopped with
    GET_VRING_BASE has nothing in flight.
    """
    avail_idx, avail_wrap = base & 0x7FFF, base >> 15 & 1
    if base >> 16 == 0:
        return avail_idx, avail_wrap, avail_idx, avail_wrap
    return avail_idx, avail_wrap, base >> 16 & 0x7FFF, base >> 31 & 1


class PackedQueue(Virtqueue):
    """The device side of one packed ring (same contract as ``SplitQueue``).

    ``base`` is SET_VRING_BASE's ``num`` in the packed encoding. ``head`` of a
    popped chain is its buffer id; ``ndescs`` the ring slots it took.
    """

    def __init__(
        self,
        index: int,
        size: int,
        addrs: RingAddresses,
        memory: GuestMemory,
        features: int,
        base: int = PACKED_INITIAL_BASE,
    ) -> None:
        check_packed_queue_size(size, index)
        self.index = index
        self.size = size
        self.addrs = addrs
        self.memory = memory
        self.features = features
        self._event_idx = bool(features & _EVENT_IDX)
        self._indirect_ok = bool(features & _INDIRECT_DESC)
        self._max_indirect = max(size, MAX_INDIRECT)
        for name, addr, align in (("descriptor ring", addrs.desc, 16),
                                  ("driver event area", addrs.avail, 4),
                                  ("device event area", addrs.used, 4)):
            if addr % align:
                raise RingError(
                    f"queue {index}: {name} address {addr:#x} is not {align}-byte aligned",
                    queue=index)
        desc = self._ring_view("descriptor ring", addrs.desc, 16 * size)
        self._desc = desc
        self._desc16 = desc.cast("H")  # desc i: id at 8i+6, flags at 8i+7
        self._desc32 = desc.cast("I")  # desc i: len at 4i+2
        self._driver16 = self._ring_view("driver event area", addrs.avail, 4).cast("H")
        self._device16 = self._ring_view("device event area", addrs.used, 4).cast("H")
        # Dirty logging of used descriptors: they live in the descriptor ring, so log
        # its guest-physical pages (log_guest_addr names the device area for packed
        # rings in QEMU, which is not where we write).
        self._desc_gpa = memory.user_to_guest(addrs.desc)

        avail_idx, avail_wrap, used_idx, used_wrap = decode_packed_base(base)
        if avail_idx >= size or used_idx >= size:
            raise RingError(f"queue {index}: vring base {base:#x} names index "
                            f"{max(avail_idx, used_idx)} in a ring of {size}", queue=index)
        self._last_avail = avail_idx
        self._avail_wrap = avail_wrap
        self._avail_pattern = _AVAIL if avail_wrap else _USED
        self.used_idx = used_idx
        self.used_wrap = used_wrap
        self._used_flags = _AVAIL_USED if used_wrap else 0
        self._since_signal = 0  # ring slots used since the last notification decision
        self._signalled_valid = False
        self._kicks_enabled = True
        self._off_wrap = -1  # value last written to the device area's off_wrap
        self.log_all = bool(features & _LOG_ALL)

    def _ring_view(self, name: str, uva: int, length: int) -> memoryview:
        try:
            return self.memory.translate_user(uva, length)
        except GuestMemoryError as exc:
            raise GuestMemoryError(
                f"queue {self.index}: {name} at {uva:#x} (+{length:#x}) is not inside guest "
                f"memory: {exc}", queue=self.index) from exc

    def __repr__(self) -> str:
        return (f"PackedQueue(index={self.index}, size={self.size}, "
                f"avail={self._last_avail}/{self._avail_wrap}, "
                f"used={self.used_idx}/{self.used_wrap})")

    @property
    def last_avail_idx(self) -> int:
        """Next descriptor slot to look at for an available buffer."""
        return self._last_avail

    @property
    def avail_wrap(self) -> int:
        """The wrap counter the next available descriptor will carry."""
        return self._avail_wrap

    def set_position(self, avail_idx: int, avail_wrap: int, used_idx: int, used_wrap: int) -> None:
        """Move both ring positions (inflight recovery after a back-end crash)."""
        if not (0 <= avail_idx < self.size and 0 <= used_idx < self.size):
            raise RingError(f"queue {self.index}: position {avail_idx}/{used_idx} outside a "
                            f"ring of {self.size}", queue=self.index)
        self._last_avail, self._avail_wrap = avail_idx, avail_wrap & 1
        self._avail_pattern = _AVAIL if self._avail_wrap else _USED
        self.used_idx, self.used_wrap = used_idx, used_wrap & 1
        self._used_flags = _AVAIL_USED if self.used_wrap else 0

    def raw_descriptors(self, slot: int, count: int) -> list[tuple[int, int, int, int]]:
        """``(addr, len, id, flags)`` of ``count`` ring slots from ``slot`` (wrapping):
        what inflight tracking copies of a chain it just saw popped."""
        size = self.size
        return [_unpack_desc(self._desc, ((slot + k) % size) << 4) for k in range(count)]

    def chain_from_descriptors(self, descs: list[tuple[int, int, int, int]]) -> DescriptorChain:
        """Rebuild a chain from copies of its ring descriptors (inflight resubmission:
        the ring slots may hold new descriptors by now, indirect tables may not)."""
        q = self.index
        if not descs or len(descs) > self.size:
            raise RingError(f"queue {q}: an inflight record of {len(descs)} descriptors",
                            queue=q)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpas: list[int] = []
        buf_id = descs[-1][2]
        for k, (addr, length, _, flags) in enumerate(descs):
            if flags & _INDIRECT:
                if k != len(descs) - 1:
                    raise DescriptorError(f"queue {q}: inflight record of buffer {buf_id} has an "
                                          "indirect descriptor before its end", queue=q,
                                          head=buf_id)
                self._indirect(k, k, addr, length, buf_id, flags, readable, writable, gpas)
                break
            if not length:
                continue
            try:
                buf = self.memory.translate(addr, length)
            except GuestMemoryError as exc:
                raise self._bad_buffer(buf_id, k, addr, length, "inflight descriptor") from exc
            if flags & _WRITE:
                writable.append(buf)
                gpas.append(addr)
            elif writable:
                raise DescriptorError(f"queue {q}: inflight record of buffer {buf_id}: readable "
                                      f"descriptor {k} follows a writable one", queue=q,
                                      head=buf_id)
            else:
                readable.append(buf)
        return DescriptorChain(buf_id, readable, writable, gpas, len(descs))

    def set_log(self, log_all: bool, addrs: RingAddresses | None = None) -> None:
        """Follow SET_FEATURES toggling LOG_ALL (used descriptors are logged with the buffers)."""
        self.log_all = log_all
        if addrs is not None:
            self.addrs = addrs

    # -- the driver's side of things -------------------------------------------------------

    def has_available(self) -> bool:
        return (self._desc16[8 * self._last_avail + 7] & _AVAIL_USED) == self._avail_pattern

    def pop(self) -> DescriptorChain | None:
        i = self._last_avail
        if (self._desc16[8 * i + 7] & _AVAIL_USED) != self._avail_pattern and not (
                self._event_idx and self._kicks_enabled and self._rearm()):
            return None
        # flags were read (above) before the rest of the descriptor (here).
        addr, length, buf_id, flags = _unpack_desc(self._desc, i << 4)
        if flags & _NEXT_OR_INDIRECT or not length:
            chain = self._walk(i, addr, length, buf_id, flags)
        else:
            try:
                buf = self.memory.translate(addr, length)
            except GuestMemoryError as exc:
                raise self._bad_buffer(buf_id, i, addr, length) from exc
            if flags & _WRITE:
                chain = DescriptorChain(buf_id, [], [buf], [addr], 1)
            else:
                chain = DescriptorChain(buf_id, [buf], [], [], 1)
        i += chain.ndescs
        if i >= self.size:
            i -= self.size
            self._avail_wrap ^= 1
            self._avail_pattern ^= _AVAIL_USED
        self._last_avail = i
        return chain

    def _rearm(self) -> bool:
        """The ring looked empty with kicks wanted: ask for a kick at our position, then
        look again (the driver may have published after our read)."""
        off_wrap = self._last_avail | self._avail_wrap << 15
        if self._off_wrap == off_wrap:
            return False
        self._device16[0] = off_wrap
        self._device16[1] = _DESC
        self._off_wrap = off_wrap
        memory_barrier()
        return (self._desc16[8 * self._last_avail + 7] & _AVAIL_USED) == self._avail_pattern

    def _bad_buffer(self, buf_id: int, slot: int, addr: int, length: int,
                    where: str = "descriptor") -> GuestMemoryError:
        return GuestMemoryError(
            f"queue {self.index}: {where} {slot} of buffer {buf_id} points at "
            f"[{addr:#x}, +{length:#x}), not inside guest memory",
            queue=self.index, head=buf_id)

    def _walk(self, first: int, addr: int, length: int, buf_id: int,
              flags: int) -> DescriptorChain:
        q = self.index
        size = self.size
        translate = self.memory.translate
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpas: list[int] = []
        i = first
        n = 0
        while True:
            n += 1
            if n > size:
                raise DescriptorError(
                    f"queue {q}: the chain starting at slot {first} has more than {size} "
                    "descriptors (NEXT all around the ring)", queue=q, head=buf_id)
            if flags & _INDIRECT:
                self._indirect(first, i, addr, length, buf_id, flags, readable, writable, gpas)
                break
            if length:
                try:
                    buf = translate(addr, length)
                except GuestMemoryError as exc:
                    raise self._bad_buffer(buf_id, i, addr, length) from exc
                if flags & _WRITE:
                    writable.append(buf)
                    gpas.append(addr)
                elif writable:
                    raise DescriptorError(
                        f"queue {q}: chain at slot {first}: readable descriptor {i} follows "
                        "a writable one", queue=q, head=buf_id)
                else:
                    readable.append(buf)
            if not flags & _NEXT:
                break  # the buffer id is the one of the last descriptor
            i += 1
            if i == size:
                i = 0
            addr, length, buf_id, flags = _unpack_desc(self._desc, i << 4)
        return DescriptorChain(buf_id, readable, writable, gpas, n)

    def _indirect(self, first: int, slot: int, addr: int, length: int, buf_id: int, flags: int,
                  readable: list[memoryview], writable: list[memoryview], gpas: list[int]) -> None:
        """Append the buffers of the indirect table at ``slot`` (which ends the chain)."""
        q = self.index
        if not self._indirect_ok:
            raise DescriptorError(f"queue {q}: descriptor {slot} is indirect but INDIRECT_DESC "
                                  "was not negotiated", queue=q, head=buf_id)
        if flags & _NEXT:
            raise DescriptorError(f"queue {q}: descriptor {slot} sets both INDIRECT and NEXT",
                                  queue=q, head=buf_id)
        if not length or length % 16:
            raise DescriptorError(f"queue {q}: indirect table at descriptor {slot} is {length} "
                                  "bytes, not a positive multiple of 16", queue=q, head=buf_id)
        count = length // 16
        if count > self._max_indirect:
            raise DescriptorError(f"queue {q}: indirect table at descriptor {slot} has {count} "
                                  f"entries, more than {self._max_indirect}", queue=q,
                                  head=buf_id)
        translate = self.memory.translate
        try:
            table = translate(addr, length)
        except GuestMemoryError as exc:
            raise self._bad_buffer(buf_id, slot, addr, length) from exc
        # A packed indirect table is a plain sequence: only WRITE means anything in it
        # (NEXT, INDIRECT and the ids are reserved and ignored, VIRTIO 1.2 2.8.19).
        for k in range(count):
            a, ln, _, f = _unpack_desc(table, k << 4)
            if not ln:
                continue
            try:
                buf = translate(a, ln)
            except GuestMemoryError as exc:
                raise self._bad_buffer(buf_id, k, a, ln, "indirect descriptor") from exc
            if f & _WRITE:
                writable.append(buf)
                gpas.append(a)
            elif writable:
                raise DescriptorError(
                    f"queue {q}: chain at slot {first}: readable indirect descriptor {k} "
                    "follows a writable one", queue=q, head=buf_id)
            else:
                readable.append(buf)

    # -- giving buffers back ------------------------------------------------------------------

    def push(self, chain: DescriptorChain, written: int) -> None:
        i = self.used_idx
        self._desc32[4 * i + 2] = written
        self._desc16[8 * i + 6] = chain.head
        # flags last: they hand the slot to the driver.
        self._desc16[8 * i + 7] = self._used_flags | _WRITE if written else self._used_flags
        if self.log_all and self.memory.dirty_log is not None:
            self._log_push(chain, written, i)
        i += chain.ndescs
        if i >= self.size:
            i -= self.size
            self.used_wrap ^= 1
            self._used_flags ^= _AVAIL_USED
        self.used_idx = i
        self._since_signal += chain.ndescs

    def _log_push(self, chain: DescriptorChain, written: int, slot: int) -> None:
        mark = self.memory.mark_dirty
        for buf, gpa in zip(chain.writable, chain.writable_gpas, strict=True):
            if written <= 0:
                break
            n = min(len(buf), written)
            mark(gpa, n)
            written -= n
        mark(self._desc_gpa + 16 * slot, 16)

    # -- notifications -----------------------------------------------------------------------

    def should_notify(self) -> bool:
        count = self._since_signal
        if not count:
            return False
        self._since_signal = 0
        memory_barrier()  # our used descriptors before the driver's wishes
        valid = self._signalled_valid
        self._signalled_valid = True
        flags = self._driver16[1]
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self._event_idx:
            return True
        if not valid:
            return True  # first decision (e.g. after a reconnect): interrupt once
        off_wrap = self._driver16[0]
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.used_wrap:
            event -= self.size  # the event is in the previous lap
        new = self.used_idx
        # Positions as one line: ``old`` may be negative when the batch wrapped.
        return need_event(event & 0xFFFF, new, (new - count) & 0xFFFF)

    def set_kick_suppression(self, suppress: bool) -> bool:
        self._kicks_enabled = not suppress
        dev = self._device16
        if suppress:
            dev[1] = _DISABLE
        elif self._event_idx:
            off_wrap = self._last_avail | self._avail_wrap << 15
            dev[0] = off_wrap  # before flags: the driver reads flags first
            dev[1] = _DESC
            self._off_wrap = off_wrap
        else:
            dev[1] = _ENABLE
        memory_barrier()
        return self.has_available()

    def get_base(self) -> int:
        return encode_packed_base(self._last_avail, self._avail_wrap, self.used_idx,
                                  self.used_wrap)
