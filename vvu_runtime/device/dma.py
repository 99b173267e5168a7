"""The device's view of guest memory: an IOVA table filled by DMA_MAP / DMA_UNMAP.

QEMU's vfio-user client tells the device model which I/O virtual addresses it may
reach, each range with the fd that backs it (guest RAM) or without one (ROM, the
device's own BARs, peer devices). What QEMU really sends, seen on these machines:

* the whole of guest RAM in a few large maps at boot, plus remap storms while the
  firmware toggles PAM ranges;
* with a guest vIOMMU, one DMA_MAP **per 4 KiB page** the guest driver maps (512
  messages for 2 MiB), each with the RAM fd and a non-contiguous offset;
* range unmaps covering huge spans (``iova=0xfef00000 size=0xffffffff01100000``,
  i.e. up to 2^64) that mostly match nothing, unmaps that cut through a larger map,
  and ``DMA_UNMAP_FLAG_ALL``.

So the table is page-granular: maps and unmaps must be 4 KiB aligned, an unmap
removes exactly the pages it covers (splitting a larger map if it must, which keeps
the rest usable), and an unmap that matches nothing is fine. A map that overlaps an
existing one is refused with EEXIST, as the vfio-user spec says.

Every translation is bounds-checked and confined to one map: a buffer that spans
two maps (4 KiB pages mapped separately) is only reachable through
:meth:`DmaTable.read` / :meth:`DmaTable.write` / :meth:`DmaTable.translate_sg`.

The device model walks rings in these maps through its own mmap of the fd, and
one process serves every device of an appliance: a client that truncated the file
under that mmap would kill all of them with SIGBUS. So an fd is mapped only if it
is sealed against shrinking (``F_SEAL_SHRINK``, which QEMU's
``memory-backend-memfd`` sets by default); anything else is refused with a reason
naming the fix. Seals cannot be removed, so checking the size after the seals is
race-free. Each distinct file is mapped once, whole, and shared by every map that
uses it (QEMU sends one DMA_MAP per 4 KiB page with the same fd): the cost is one
mapping and one fd per file, not per page, and at most :data:`MAX_DMA_FILES`
files.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vvu_runtime.device.errors import DmaError
from vvu_runtime.virtio.memory import GuestMemory

log = logging.getLogger(__name__)

#: The only page size we advertise in VERSION (``pgsizes``).
PAGE_SIZE = 4096
#: One past the highest IOVA.
IOVA_LIMIT = 1 << 64

#: Distinct files (memory backends) one client may have mapped at once.
MAX_DMA_FILES = 64
#: Address space those mappings may take per client (sparse files cost nothing more,
#: but a client must not exhaust the address space every other device needs too).
MAX_DMA_BYTES = 1 << 40

#: Called after pages [iova, iova+size) stopped being reachable.
UnmapListener = Callable[[int, int], None]

#: (st_dev, st_ino): one mapping per file.
_FileKey = tuple[int, int]


class _Backing:
    """One mmap of a whole file, shared by every map entry that uses the file.

    Mapped read-write whenever the fd allows it, so that read-only and writable
    DMA_MAPs of one file (QEMU maps firmware shadow ranges read-only) share it;
    read-only entries only ever hand out :attr:`ro_view`.
    """

    __slots__ = ("key", "mmap", "refs", "ro_view", "size", "view", "writable")

    def __init__(self, m: mmap.mmap, writable: bool, key: _FileKey, size: int) -> None:
        self.mmap = m
        self.key = key
        self.size = size
        self.writable = writable
        view = memoryview(m)
        self.ro_view = view.toreadonly()
        self.view = view if writable else self.ro_view
        self.refs = 0

    def release(self) -> None:
        self.ro_view.release()
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            # Someone still holds a view from translate(); the pages go away when it
            # does. The device has been told (unmap listeners) to drop such views.
            log.debug("DMA mapping still referenced after unmap; freed when released")


@dataclass(slots=True)
class DmaMapping:
    """One entry of the IOVA table."""

    iova: int
    size: int
    readable: bool
    writable: bool
    #: Offset into the client's fd (for logs; the bytes are in ``_backing``).
    fd_offset: int
    _backing: _Backing | None
    #: Where this entry starts inside ``_backing.view``.
    _skip: int = 0

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def has_fd(self) -> bool:
        return self._backing is not None

    def describe(self) -> str:
        access = ("r" if self.readable else "-") + ("w" if self.writable else "-")
        fd = f"fd+{self.fd_offset:#x}" if self.has_fd else "no fd"
        return f"[{self.iova:#x}, {self.end:#x}) {access} {fd}"

    def view(self, offset: int, length: int) -> memoryview:
        backing = self._backing
        assert backing is not None
        start = self._skip + offset
        view = backing.view if self.writable else backing.ro_view
        return view[start:start + length]


def _check_range(what: str, iova: int, size: int) -> None:
    if iova % PAGE_SIZE or size % PAGE_SIZE:
        raise DmaError(f"{what} [{iova:#x}, +{size:#x}): iova and size must be multiples of "
                       f"{PAGE_SIZE:#x}", errno=errno.EINVAL)
    if iova < 0 or size <= 0 or iova + size > IOVA_LIMIT:
        raise DmaError(f"{what} [{iova:#x}, +{size:#x}): empty or past 2^64",
                       errno=errno.EINVAL)


class DmaTable:
    """The IOVA ranges the client let the device reach, with their host mappings."""

    def __init__(self, max_maps: int = 65535, name: str = "device",
                 max_files: int = MAX_DMA_FILES, max_bytes: int = MAX_DMA_BYTES) -> None:
        self.name = name
        self.max_maps = max_maps
        self.max_files = max_files
        self.max_bytes = max_bytes
        #: Bytes of address space the mappings alive take.
        self.mapped_bytes = 0
        #: The mapping new DMA_MAPs of a file use (older ones live while referenced).
        self._files: dict[_FileKey, _Backing] = {}
        #: Mappings alive (referenced by some entry), the current ones included.
        self._backings = 0
        self._starts: list[int] = []
        self._maps: dict[int, DmaMapping] = {}
        self._last: DmaMapping | None = None
        self._listeners: list[UnmapListener] = []

    # --- table updates (DMA_MAP / DMA_UNMAP) ---------------------------------------

    def map(self, iova: int, size: int, *, readable: bool = True, writable: bool = True,
            fd: int | None = None, fd_offset: int = 0) -> DmaMapping:
        """Add [iova, iova+size) backed by ``fd`` at ``fd_offset`` (or by nothing).

        The caller keeps ownership of ``fd`` (mmap holds its own reference).
        """
        _check_range("DMA_MAP", iova, size)
        if not (readable or writable):
            raise DmaError(f"DMA_MAP [{iova:#x}, +{size:#x}): neither readable nor writable",
                           errno=errno.EINVAL)
        clash = self._first_overlap(iova, iova + size)
        if clash is not None:
            raise DmaError(f"DMA_MAP [{iova:#x}, +{size:#x}) overlaps the existing map "
                           f"{clash.describe()}", errno=errno.EEXIST)
        if len(self._maps) >= self.max_maps:
            raise DmaError(f"DMA_MAP [{iova:#x}, +{size:#x}): the table already holds "
                           f"{self.max_maps} maps", errno=errno.ENOSPC)
        backing = None
        if fd is not None:
            backing = self._backing_for(fd, fd_offset, size, writable, iova)
        entry = DmaMapping(iova, size, readable, writable, fd_offset, backing,
                           _skip=fd_offset)
        if backing is not None:
            backing.refs += 1
        bisect.insort(self._starts, iova)
        self._maps[iova] = entry
        return entry

    def _backing_for(self, fd: int, offset: int, size: int, writable: bool,
                     iova: int) -> _Backing:
        """The shared whole-file mapping of ``fd`` that covers [offset, +size)."""
        what = f"{self.name}: DMA_MAP at {iova:#x}"
        if offset % PAGE_SIZE or offset < 0:
            raise DmaError(f"{what}: fd offset {offset:#x} is not page aligned",
                           errno=errno.EINVAL)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise DmaError(f"{what}: the fd is unusable: {exc}",
                               errno=errno.EBADF) from exc
            seals = 0  # EINVAL: not a file that supports seals
        if not seals & fcntl.F_SEAL_SHRINK:
            raise DmaError(f"{what}: the fd is not sealed against shrinking (F_SEAL_SHRINK); "
                           "the device model maps only such memory, since a file truncated "
                           "under its mapping would crash it: back the VM's RAM with "
                           "memory-backend-memfd (QEMU seals it by default)",
                           errno=errno.EINVAL)
        # Sealed: the size read now can only grow later, never shrink.
        st = os.fstat(fd)
        if offset + size > st.st_size:
            raise DmaError(f"{what}: fd range [{offset:#x}, +{size:#x}) goes past the end of "
                           f"the file ({st.st_size:#x} bytes)", errno=errno.EINVAL)
        key = (st.st_dev, st.st_ino)
        current = self._files.get(key)
        if (current is not None and offset + size <= current.size
                and (current.writable or not writable)):
            return current
        if self._backings >= self.max_files:
            raise DmaError(f"{what}: {self._backings} memory files are mapped already, at "
                           f"most {self.max_files}", errno=errno.ENOSPC)
        if self.mapped_bytes + st.st_size > self.max_bytes:
            raise DmaError(f"{what}: mapping the {st.st_size:#x}-byte file would take more "
                           f"than {self.max_bytes:#x} bytes of address space",
                           errno=errno.ENOSPC)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            try:
                m = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, rw)
                mapped_rw = True
            except PermissionError:
                if writable:
                    raise
                m = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
                mapped_rw = False
        except (OSError, ValueError, OverflowError) as exc:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            raise DmaError(f"{what}: cannot mmap the fd ({st.st_size:#x} bytes): {exc}",
                           errno=err) from exc
        # A file that grew (or a read-only fd, then a writable one) gets a new
        # mapping; entries on the old one keep it.
        backing = _Backing(m, mapped_rw, key, st.st_size)
        self._files[key] = backing
        self._backings += 1
        self.mapped_bytes += st.st_size
        return backing

    def unmap(self, iova: int, size: int) -> int:
        """Make [iova, iova+size) unreachable; returns how many bytes were mapped there.

        Ranges that match nothing are fine (QEMU sends many). A map partly covered
        is split and its other pages stay mapped.
        """
        _check_range("DMA_UNMAP", iova, size)
        end = iova + size
        removed = 0
        for entry in self._overlapping(iova, end):
            self._remove(entry)
            if entry.iova < iova:
                self._insert_piece(entry, entry.iova, iova)
            if entry.end > end:
                self._insert_piece(entry, end, entry.end)
            cut_start, cut_end = max(entry.iova, iova), min(entry.end, end)
            removed += cut_end - cut_start
            self._unref(entry)
            self._notify(cut_start, cut_end - cut_start)
        return removed

    def unmap_all(self) -> int:
        """Drop every map (DMA_UNMAP_FLAG_ALL, disconnect); returns the bytes unmapped."""
        removed = 0
        for entry in list(self._maps.values()):
            self._remove(entry)
            self._unref(entry)
            removed += entry.size
            self._notify(entry.iova, entry.size)
        return removed

    def close(self) -> None:
        self.unmap_all()
        self._listeners.clear()

    def add_unmap_listener(self, listener: UnmapListener) -> None:
        """Call ``listener(iova, size)`` whenever pages stop being reachable.

        Whoever keeps views from :meth:`translate` (rings) must drop them there: the
        protocol wants every reference gone before the unmap is answered.
        """
        self._listeners.append(listener)

    def _notify(self, iova: int, size: int) -> None:
        for listener in list(self._listeners):
            listener(iova, size)

    def _insert_piece(self, entry: DmaMapping, start: int, end: int) -> None:
        skip = entry._skip + (start - entry.iova)
        piece = DmaMapping(start, end - start, entry.readable, entry.writable,
                           entry.fd_offset + (start - entry.iova), entry._backing, skip)
        if piece._backing is not None:
            piece._backing.refs += 1
        bisect.insort(self._starts, start)
        self._maps[start] = piece

    def _remove(self, entry: DmaMapping) -> None:
        del self._maps[entry.iova]
        i = bisect.bisect_left(self._starts, entry.iova)
        del self._starts[i]
        if self._last is entry:
            self._last = None

    def _unref(self, entry: DmaMapping) -> None:
        backing = entry._backing
        if backing is not None:
            backing.refs -= 1
            if backing.refs == 0:
                if self._files.get(backing.key) is backing:
                    del self._files[backing.key]
                self._backings -= 1
                self.mapped_bytes -= backing.size
                backing.release()

    @property
    def mapped_files(self) -> int:
        """Whole-file mappings alive (each holds one fd and one mmap)."""
        return self._backings

    # --- lookups -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[DmaMapping]:
        return (self._maps[s] for s in list(self._starts))

    def _find(self, iova: int) -> DmaMapping | None:
        last = self._last
        if last is not None and last.iova <= iova < last.end:
            return last
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        entry = self._maps[self._starts[i]]
        if iova < entry.end:
            self._last = entry
            return entry
        return None

    def _overlapping(self, start: int, end: int) -> list[DmaMapping]:
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        out = []
        starts = self._starts
        while i < len(starts) and starts[i] < end:
            entry = self._maps[starts[i]]
            if entry.end > start:
                out.append(entry)
            i += 1
        return out

    def _first_overlap(self, start: int, end: int) -> DmaMapping | None:
        found = self._overlapping(start, end)
        return found[0] if found else None

    def lookup(self, iova: int) -> DmaMapping | None:
        """The map containing ``iova``, if any."""
        return self._find(iova)

    def translate(self, iova: int, length: int, *, write: bool = False) -> memoryview:
        """The ``length`` bytes at ``iova`` as a view into the mapping (zero copy).

        The range must lie inside one fd-backed map; ``write`` also requires the map to
        be writable (otherwise the view is read-only).
        """
        entry = self._find(iova)
        if entry is None or length < 0 or iova + length > entry.end:
            raise DmaError(f"{self.name}: IOVA range [{iova:#x}, +{length:#x}) is not inside "
                           f"one DMA mapping")
        if entry._backing is None:
            raise DmaError(f"{self.name}: IOVA range [{iova:#x}, +{length:#x}) was mapped "
                           "without an fd (DMA_READ/DMA_WRITE are not supported)")
        if write and not entry.writable:
            raise DmaError(f"{self.name}: IOVA range [{iova:#x}, +{length:#x}) is mapped "
                           "read-only", errno=errno.EPERM)
        if not write and not entry.readable:
            raise DmaError(f"{self.name}: IOVA range [{iova:#x}, +{length:#x}) is mapped "
                           "write-only", errno=errno.EPERM)
        return entry.view(iova - entry.iova, length)

    def translate_sg(self, iova: int, length: int, *, write: bool = False) -> list[memoryview]:
        """Views covering [iova, iova+length), one per map it crosses (scatter-gather)."""
        out: list[memoryview] = []
        while length > 0:
            entry = self._find(iova)
            if entry is None:
                raise DmaError(f"{self.name}: IOVA {iova:#x} is not mapped")
            take = min(length, entry.end - iova)
            out.append(self.translate(iova, take, write=write))
            iova += take
            length -= take
        return out

    def read(self, iova: int, length: int) -> bytes:
        """Copy ``length`` bytes from ``iova`` (may cross maps)."""
        views = self.translate_sg(iova, length)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to ``iova`` (may cross maps)."""
        src = memoryview(data)
        done = 0
        for view in self.translate_sg(iova, len(src), write=True):
            n = len(view)
            view[:] = src[done:done + n]
            done += n


class DmaMemory(GuestMemory):
    """A :class:`DmaTable` seen through the :class:`GuestMemory` interface, so that the
    virtio ring code (``virtio.split.SplitQueue``) walks rings in DMA-mapped memory.

    On a PCI transport there is one address space, the IOVA: ring addresses
    (``translate_user``) and descriptor buffers (``translate``) both go through the
    table. There is no vhost-user memory table and no dirty log. A queue built on
    this keeps views into the maps: drop it when an unmap listener says its pages
    went away.
    """

    def __init__(self, table: DmaTable) -> None:
        super().__init__()
        self.table = table

    def translate(self, gpa: int, length: int) -> memoryview:
        return self.table.translate(gpa, length)

    def translate_user(self, uva: int, length: int) -> memoryview:
        return self.table.translate(uva, length)

    def user_to_guest(self, uva: int) -> int:
        return uva

    def mark_dirty(self, gpa: int, length: int) -> None:
        """No dirty logging: vfio-user migration is not supported by QEMU's client."""
