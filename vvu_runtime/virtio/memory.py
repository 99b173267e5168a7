"""Guest memory as the front-end described it (SET_MEM_TABLE, ADD/REM_MEM_REG).

A region is known by three addresses: the guest-physical address (descriptor
buffers use it), the front-end's user address (vring addresses use it, unless
ACCESS_PLATFORM), and an offset into the fd that backs it. Every translation is
bounds-checked: a buffer must lie entirely inside one region, or it is refused.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from vvu_runtime.virtio.errors import GuestMemoryError

PAGE_SIZE = mmap.PAGESIZE

_fence = threading.Lock()
_fence_acquire = _fence.acquire
_fence_release = _fence.release


def memory_barrier() -> None:
    """A full memory barrier (store→load ordering) between our accesses to shared memory.

    Python has no fence instruction. Taking and dropping a lock executes a locked
    read-modify-write (``lock cmpxchg`` on x86), which orders every earlier store
    before every later load. Only the store-then-load points of the ring protocols
    need it (publish an index, then read the other side's event index); plain
    memoryview accesses are otherwise in program order, which x86-TSO preserves.
    About 75 ns: call it once per batch, not per descriptor.
    """
    _fence_acquire()
    _fence_release()


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One entry of a vhost-user memory table."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def guest_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    @property
    def user_end(self) -> int:
        return self.userspace_addr + self.memory_size

    def validate(self) -> None:
        if self.memory_size <= 0:
            raise GuestMemoryError(f"memory region {self}: size must be positive")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            value = getattr(self, name)
            if value < 0 or value + self.memory_size > 1 << 64:
                raise GuestMemoryError(f"memory region {self}: {name} wraps past 2^64")


class MappedRegion:
    """A region together with the host mapping of its bytes."""

    __slots__ = ("_mmap", "gpa", "gpa_end", "region", "uva", "uva_end", "view")

    def __init__(self, region: MemoryRegion, view: memoryview, owned: mmap.mmap | None) -> None:
        if len(view) != region.memory_size:
            raise GuestMemoryError(
                f"memory region {region}: mapping is {len(view)} bytes, expected "
                f"{region.memory_size}"
            )
        self.region = region
        self.view = view
        self.gpa = region.guest_phys_addr
        self.gpa_end = region.guest_end
        self.uva = region.userspace_addr
        self.uva_end = region.user_end
        self._mmap = owned

    def close(self) -> None:
        self.view.release()
        if self._mmap is not None:
            # A consumer may still hold a slice; the mapping then goes when it does.
            with contextlib.suppress(BufferError):
                self._mmap.close()


def map_fd(region: MemoryRegion, fd: int) -> MappedRegion:
    """mmap the part of ``fd`` that backs ``region`` (shared, read-write)."""
    region.validate()
    start = region.mmap_offset - region.mmap_offset % mmap.ALLOCATIONGRANULARITY
    skip = region.mmap_offset - start
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise GuestMemoryError(f"memory region {region}: fd {fd} is unusable: {exc}") from exc
    if size and region.mmap_offset + region.memory_size > size:
        raise GuestMemoryError(
            f"memory region {region}: needs {region.mmap_offset + region.memory_size} bytes "
            f"but the fd holds only {size}"
        )
    try:
        m = mmap.mmap(fd, skip + region.memory_size, mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(f"memory region {region}: cannot map fd {fd}: {exc}") from exc
    view = memoryview(m)[skip:]
    return MappedRegion(region, view, m)


def memfd_region(size: int, *, guest_phys_addr: int, userspace_addr: int,
                 name: str = "vvu-guest-ram") -> tuple[MappedRegion, int]:
    """Fresh shared memory (a memfd) mapped as one region, as a front-end would make it.

    Returns the mapping and the fd; the caller owns the fd (send it to a back-end
    with SET_MEM_TABLE, or close it: the mapping stays valid).
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mapped = map_fd(MemoryRegion(guest_phys_addr, size, userspace_addr, 0), fd)
    except BaseException:
        os.close(fd)
        raise
    return mapped, fd


class GuestMemory:
    """The set of mapped regions of one front-end, with bounds-checked translation."""

    def __init__(self) -> None:
        self._regions: list[MappedRegion] = []
        self.dirty_log: DirtyLog | None = None
        self._forget_hit()

    def _forget_hit(self) -> None:
        # The region of the last translation, as plain attributes: translate() is on
        # every descriptor's path, and three attribute loads beat a MappedRegion hop.
        self._hit_gpa = 0
        self._hit_size = -1  # matches nothing
        self._hit_view = memoryview(b"")

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, mapped: MappedRegion) -> None:
        """Add a region; overlapping an existing one (in either address space) is refused."""
        new = mapped.region
        for old in self._regions:
            r = old.region
            if new.guest_phys_addr < r.guest_end and r.guest_phys_addr < new.guest_end:
                raise GuestMemoryError(f"memory region {new} overlaps {r} in guest-physical space")
            if new.userspace_addr < r.user_end and r.userspace_addr < new.user_end:
                raise GuestMemoryError(f"memory region {new} overlaps {r} in user address space")
        self._regions.append(mapped)

    def remove(self, region: MemoryRegion) -> None:
        """Remove the region with the same guest address, size and user address."""
        for i, old in enumerate(self._regions):
            r = old.region
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (
                region.guest_phys_addr, region.memory_size, region.userspace_addr
            ):
                del self._regions[i]
                self._forget_hit()
                old.close()
                return
        raise GuestMemoryError(f"memory region {region} is not in the memory table")

    def clear(self) -> None:
        for old in self._regions:
            old.close()
        self._regions.clear()
        self._forget_hit()

    def translate(self, gpa: int, length: int) -> memoryview:
        """The ``length`` bytes at guest-physical ``gpa``; they must sit in one region."""
        off = gpa - self._hit_gpa
        if off >= 0 and off + length <= self._hit_size and length >= 0:
            return self._hit_view[off:off + length]
        for m in self._regions:
            if m.gpa <= gpa < m.gpa_end:
                if length < 0 or gpa + length > m.gpa_end:
                    break
                self._hit_gpa = m.gpa
                self._hit_size = m.region.memory_size
                self._hit_view = m.view
                off = gpa - m.gpa
                return m.view[off:off + length]
        raise GuestMemoryError(
            f"guest address range [{gpa:#x}, +{length:#x}) is not inside one mapped region"
        )

    def translate_user(self, uva: int, length: int) -> memoryview:
        """The bytes at front-end user address ``uva`` (vring addresses use these)."""
        for m in self._regions:
            if m.uva <= uva and uva + length <= m.uva_end and length >= 0:
                off = uva - m.uva
                return m.view[off:off + length]
        raise GuestMemoryError(
            f"front-end address range [{uva:#x}, +{length:#x}) is not inside one mapped region"
        )

    def user_to_guest(self, uva: int) -> int:
        """Guest-physical address of a front-end user address (for dirty logging of rings)."""
        for m in self._regions:
            if m.uva <= uva < m.uva_end:
                return m.gpa + (uva - m.uva)
        raise GuestMemoryError(f"front-end address {uva:#x} is not inside a mapped region")

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record a device write for live migration, if the front-end asked for logging."""
        log = self.dirty_log
        if log is not None and length > 0:
            log.mark(gpa, length)


class DirtyLog:
    """The dirty-page bitmap of VHOST_USER_SET_LOG_BASE: one bit per 4 KiB guest page."""

    PAGE = 0x1000

    __slots__ = ("_mmap", "view")

    def __init__(self, fd: int, size: int, offset: int) -> None:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        skip = offset - start
        try:
            self._mmap = mmap.mmap(fd, skip + size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"dirty log of {size} bytes at offset {offset}: {exc}") from exc
        self.view = memoryview(self._mmap)[skip:]

    def mark(self, gpa: int, length: int) -> None:
        view = self.view
        first = gpa // self.PAGE
        last = (gpa + length - 1) // self.PAGE
        if last // 8 >= len(view):
            raise GuestMemoryError(
                f"dirty log of {len(view)} bytes cannot cover guest address {gpa + length - 1:#x}"
            )
        # Not atomic against the front-end clearing bytes it has collected, but we only
        # ever add bits: the worst race re-marks a page already sent, never loses one.
        for page in range(first, last + 1):
            view[page >> 3] |= 1 << (page & 7)

    def close(self) -> None:
        self.view.release()
        self._mmap.close()
