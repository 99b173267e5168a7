"""Guest memory as the front-end described it (SET_MEM_TABLE, ADD/REM_MEM_REG).

A region is known by three addresses: the guest-physical address (descriptor
buffers use it), the front-end's user address (vring addresses use it, unless
ACCESS_PLATFORM), and an offset into the fd that backs it. Every translation is
bounds-checked: a buffer must lie entirely inside one region, or it is refused.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

from vvu_runtime.virtio.errors import GuestMemoryError

PAGE_SIZE = mmap.PAGESIZE


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
            try:
                self._mmap.close()
            except BufferError:
                # A consumer still holds a slice; the mapping goes when it does.
                pass


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


class GuestMemory:
    """The set of mapped regions of one front-end, with bounds-checked translation."""

    def __init__(self) -> None:
        self._regions: list[MappedRegion] = []
        self._last: MappedRegion | None = None
        self.dirty_log: DirtyLog | None = None

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
                self._last = None
                old.close()
                return
        raise GuestMemoryError(f"memory region {region} is not in the memory table")

    def clear(self) -> None:
        for old in self._regions:
            old.close()
        self._regions.clear()
        self._last = None

    def translate(self, gpa: int, length: int) -> memoryview:
        """The ``length`` bytes at guest-physical ``gpa``; they must sit in one region."""
        last = self._last
        if last is not None and last.gpa <= gpa and gpa + length <= last.gpa_end:
            off = gpa - last.gpa
            return last.view[off:off + length]
        for m in self._regions:
            if m.gpa <= gpa < m.gpa_end:
                if length < 0 or gpa + length > m.gpa_end:
                    break
                self._last = m
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
