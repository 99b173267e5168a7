"""A PCI function as a userspace driver sees it: the seam between the drivers and the OS.

:class:`PciFunction` is everything ``virtio_pci`` and ``vvu`` need from the
platform, and nothing more:

* config space: :meth:`~PciFunction.config_read` / :meth:`~PciFunction.config_write`
  (plus helpers: IDs, the capability list, Bus Master, the MSI-X table size);
* BARs: :meth:`~PciFunction.registers` gives a :class:`Registers` for trapped
  register access (doorbells, virtio structures); :meth:`~PciFunction.map_bar`
  maps a window of a BAR (the VVU shared-memory BAR) into this process;
* interrupts: :meth:`~PciFunction.enable_msix` returns one eventfd per MSI-X
  vector; ``interrupts`` is False on a platform that has none (then poll);
* DMA: :meth:`~PciFunction.alloc_dma` returns a :class:`DmaBuffer` - memory in
  this process and the bus address (IOVA) the device uses for it. Allocate
  long-lived buffers once: each mapping may cost the device model a message per
  page (DESIGN decision 6).

Implementations: ``vfio.VfioPciFunction`` (vfio-pci behind a vIOMMU),
``sysfs.SysfsPciFunction`` (no IOMMU: sysfs resources, hugetlb + pagemap, poll)
and tests/support ``VfioUserPciFunction`` (the in-process vfio-user client: a test
double of this layer only). :func:`vvu_runtime.driver.access.open_function` picks
the real one.

Register access through an mmap (:class:`MmioRegisters`) uses typed memoryview
casts, so each access is exactly one load or store of its width: MMIO must not
be split into bytes or widened (the ISR is read-to-clear).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vvu_runtime.driver.errors import PciError
from vvu_runtime.virtio.memory import GuestMemory, MappedRegion, MemoryRegion

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE

# --- PCI configuration space (PCI 3.0 §6.1) ------------------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34

COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_CAP_LIST = 1 << 4

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_MASKALL = 1 << 14
MSIX_TABLE_SIZE_MASK = 0x7FF

#: Config space of a conventional function (all a capability walk may visit).
CONFIG_SIZE = 256
#: What a read from a function whose device model is gone returns.
ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


# --- register access ----------------------------------------------------------------


class Registers(ABC):
    """Trapped register access to one BAR: naturally aligned 1-, 2- and 4-byte accesses."""

    @abstractmethod
    def read(self, offset: int, size: int) -> int:
        """One ``size``-byte little-endian read at ``offset``."""

    @abstractmethod
    def write(self, offset: int, size: int, value: int) -> None:
        """One ``size``-byte little-endian write at ``offset``."""

    def read64(self, offset: int) -> int:
        """A 64-bit field as two 32-bit reads, low half first (virtio allows it)."""
        return self.read(offset, 4) | self.read(offset + 4, 4) << 32

    def word32(self, offset: int) -> tuple[memoryview, int] | None:
        """The mapped window and the 32-bit word index of the register at ``offset``,
        for a compiled caller that stores to it itself; None when the registers
        are not memory-mapped (or ``offset`` is not a 32-bit register in them)."""
        return None

    def write64(self, offset: int, value: int) -> None:
        """A 64-bit field as two 32-bit writes, low half first."""
        self.write(offset, 4, value & 0xFFFFFFFF)
        self.write(offset + 4, 4, value >> 32)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what backs the registers."""


def _check_access(offset: int, size: int, length: int) -> None:
    if size not in (1, 2, 4) or offset % size or offset < 0 or offset + size > length:
        raise PciError(f"register access of {size} bytes at {offset:#x} is not naturally "
                       f"aligned inside the {length:#x}-byte BAR")


class MmioRegisters(Registers):
    """Registers reached through an mmap of the BAR: one typed load/store per access."""

    __slots__ = ("_map", "_u8", "_u16", "_u32", "length")

    def __init__(self, mapping: mmap.mmap, length: int, skip: int = 0) -> None:
        if length % 4:
            raise PciError(f"a register window of {length} bytes is not a multiple of 4")
        view = memoryview(mapping)[skip:skip + length]
        self._map = mapping
        self.length = length
        self._u8 = view
        self._u16 = view.cast("H")
        self._u32 = view.cast("I")

    def read(self, offset: int, size: int) -> int:
        if size == 4 and not offset & 3 and 0 <= offset < self.length:
            return int(self._u32[offset >> 2])
        _check_access(offset, size, self.length)
        if size == 2:
            return int(self._u16[offset >> 1])
        return int(self._u8[offset])

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and not offset & 3 and 0 <= offset < self.length:
            self._u32[offset >> 2] = value
            return
        _check_access(offset, size, self.length)
        if size == 2:
            self._u16[offset >> 1] = value
        else:
            self._u8[offset] = value

    def word32(self, offset: int) -> tuple[memoryview, int] | None:
        if offset & 3 or not 0 <= offset < self.length:
            return None
        return self._u8, offset >> 2

    def close(self) -> None:
        for view in (self._u32, self._u16, self._u8):
            view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


class FileRegisters(Registers):
    """Registers reached with pread/pwrite on a file at ``base`` (a vfio region, sysfs)."""

    __slots__ = ("base", "fd", "length", "what")

    def __init__(self, fd: int, base: int, length: int, what: str) -> None:
        self.fd = fd
        self.base = base
        self.length = length
        self.what = what

    def read(self, offset: int, size: int) -> int:
        _check_access(offset, size, self.length)
        try:
            data = os.pread(self.fd, size, self.base + offset)
        except OSError as exc:
            raise PciError(f"{self.what}: read of {size} bytes at {offset:#x} failed: "
                           f"{exc}") from exc
        if len(data) != size:
            raise PciError(f"{self.what}: short read at {offset:#x}")
        return int.from_bytes(data, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        _check_access(offset, size, self.length)
        try:
            done = os.pwrite(self.fd, value.to_bytes(size, "little"), self.base + offset)
        except OSError as exc:
            raise PciError(f"{self.what}: write of {size} bytes at {offset:#x} failed: "
                           f"{exc}") from exc
        if done != size:
            raise PciError(f"{self.what}: short write at {offset:#x}")


# --- mapped windows and DMA buffers ----------------------------------------------------


@dataclass(slots=True)
class BarWindow:
    """``length`` bytes of a BAR mapped into this process, from BAR offset ``offset``.

    ``view`` starts exactly at ``offset``; ``mapping`` is the page-aligned mmap
    behind it (hand both to a :class:`MappedRegion`, which closes the mapping).
    """

    offset: int
    view: memoryview
    mapping: mmap.mmap

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self.mapping.close()


def map_window(fd: int, file_offset: int, bar_size: int, offset: int, length: int,
               what: str) -> BarWindow:
    """mmap ``[offset, offset+length)`` of a BAR that sits at ``file_offset`` in ``fd``."""
    if length <= 0 or offset < 0 or offset + length > bar_size:
        raise PciError(f"{what}: window [{offset:#x}, +{length:#x}) is outside the "
                       f"{bar_size:#x}-byte BAR")
    start = offset - offset % PAGE_SIZE
    skip = offset - start
    span = -(-(skip + length) // PAGE_SIZE) * PAGE_SIZE
    try:
        mapping = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                            offset=file_offset + start)
    except (OSError, ValueError, OverflowError) as exc:
        raise PciError(f"{what}: cannot map [{offset:#x}, +{length:#x}): {exc}") from exc
    return BarWindow(offset, memoryview(mapping)[skip:skip + length], mapping)


@dataclass(frozen=True, slots=True)
class BarFile:
    """A file that maps a BAR, to hand to another process (vvu-proxy's backends).

    ``fd`` (owned by the caller) maps BAR offset ``x`` at file offset
    ``offset + x``. ``offset == 0`` means the file starts with the BAR, which is
    what DPDK needs (it maps each memory region from file offset 0);
    libvhost-user and rust-vmm map at the region's offset and take either.
    """

    fd: int
    offset: int
    size: int
    what: str

    def close(self) -> None:
        os.close(self.fd)


class DmaBuffer:
    """Memory the device reaches by DMA: ``view`` here, ``iova`` on the bus.

    Mapped once, for its whole life (every (un)map may cost a message per page).
    ``memory()`` gives a :class:`GuestMemory` that translates the buffer's IOVAs,
    which is what the driver side of a ring (``SplitDriverRing``) wants.
    """

    __slots__ = ("_release", "iova", "size", "view")

    def __init__(self, view: memoryview, iova: int,
                 release: Callable[[], None] | None = None) -> None:
        self.view = view
        self.iova = iova
        self.size = len(view)
        self._release = release

    def memory(self) -> GuestMemory:
        """A GuestMemory whose one region is this buffer at its IOVA."""
        mem = GuestMemory()
        mem.add(MappedRegion(MemoryRegion(self.iova, self.size, self.iova, 0),
                             memoryview(self.view), None))
        return mem

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class DmaArena:
    """Bump allocation of aligned pieces from one :class:`DmaBuffer` (never freed singly)."""

    def __init__(self, buffer: DmaBuffer) -> None:
        self.buffer = buffer
        self.memory = buffer.memory()
        self._next = 0

    def alloc(self, size: int, align: int = 16) -> int:
        """The IOVA of ``size`` fresh bytes (zeroed)."""
        start = -(-self._next // align) * align
        if start + size > self.buffer.size:
            raise PciError(f"DMA arena of {self.buffer.size:#x} bytes is full "
                           f"({size:#x} more wanted)")
        self._next = start + size
        self.buffer.view[start:start + size] = bytes(size)
        return self.buffer.iova + start

    def view(self, iova: int, size: int) -> memoryview:
        return self.memory.translate(iova, size)

    @property
    def used(self) -> int:
        return self._next

    def reset(self) -> None:
        """Forget every allocation (the device must no longer use any of them)."""
        self._next = 0

    def close(self) -> None:
        self.memory.clear()
        self.buffer.close()


# --- the function -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capability:
    """One entry of the config-space capability list."""

    cap_id: int
    offset: int


class PciFunction(ABC):
    """One PCI function driven from userspace (see the module docstring)."""

    #: ``DDDD:BB:DD.F`` (or a test double's name).
    address: str

    # -- platform operations
    @property
    @abstractmethod
    def interrupts(self) -> bool:
        """Whether MSI-X eventfds are available (False: the driver must poll)."""

    @abstractmethod
    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4) bytes of config space."""

    @abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` (1, 2, 4) bytes of config space."""

    @abstractmethod
    def bar_size(self, index: int) -> int:
        """Size of BAR ``index`` in bytes (0: not implemented)."""

    @abstractmethod
    def registers(self, index: int) -> Registers:
        """Register access to BAR ``index`` (cached: the same object every call)."""

    @abstractmethod
    def map_bar(self, index: int, offset: int, length: int) -> BarWindow:
        """Map a window of BAR ``index`` into this process (PciError if it cannot be)."""

    def bar_file(self, index: int) -> BarFile:
        """A new fd that maps BAR ``index`` for another process (PciError if none)."""
        raise PciError(f"{self.address}: BAR{index} cannot be handed to another process "
                       f"through {type(self).__name__}")

    @abstractmethod
    def enable_msix(self, count: int) -> list[int]:
        """Enable MSI-X with ``count`` vectors; one eventfd per vector (owned here)."""

    @abstractmethod
    def disable_msix(self) -> None:
        """Disable MSI-X and close its eventfds (idempotent)."""

    @abstractmethod
    def alloc_dma(self, size: int) -> DmaBuffer:
        """A DMA buffer of at least ``size`` bytes, mapped for the device until closed."""

    @abstractmethod
    def close(self) -> None:
        """Release everything (DMA mappings, interrupts, BAR maps, descriptors)."""

    def __enter__(self) -> PciFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers over config space
    @property
    def vendor_id(self) -> int:
        return self.config_read(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.config_read(DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self.config_read(REVISION_ID, 4) >> 8

    @property
    def revision(self) -> int:
        return self.config_read(REVISION_ID, 1)

    #: The capability list, walked once (it never changes; each read is a trapped access).
    _cap_cache: tuple[Capability, ...] | None = None

    def capabilities(self) -> Iterator[Capability]:
        """The capability list (bounded: a looping list ends the walk)."""
        if self._cap_cache is None:
            caps: list[Capability] = []
            if self.config_read(STATUS, 2) & STATUS_CAP_LIST:
                pos = self.config_read(CAPABILITY_LIST, 1) & ~3
                seen: set[int] = set()
                while pos and pos not in seen and 0x40 <= pos <= CONFIG_SIZE - 4:
                    seen.add(pos)
                    header = self.config_read(pos, 2)
                    caps.append(Capability(header & 0xFF, pos))
                    pos = (header >> 8) & ~3
            self._cap_cache = tuple(caps)
        return iter(self._cap_cache)

    def find_capability(self, cap_id: int) -> Capability | None:
        return next((c for c in self.capabilities() if c.cap_id == cap_id), None)

    def enable_bus_master(self) -> None:
        """Command |= memory + Bus Master: vfio-pci leaves it off and MSI-X is then
        dropped silently (reference/qemu-vfio-user-client.md)."""
        cmd = self.config_read(COMMAND, 2)
        want = cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER
        if want != cmd:
            self.config_write(COMMAND, 2, want)
        if self.config_read(COMMAND, 2) & (COMMAND_MEMORY | COMMAND_BUS_MASTER) != \
                COMMAND_MEMORY | COMMAND_BUS_MASTER:
            raise PciError(f"{self.address}: memory decoding / Bus Master did not stick "
                           "in the command register")

    def msix_table_size(self) -> int:
        """Vectors in the MSI-X table (0 without an MSI-X capability)."""
        cap = self.find_capability(CAP_ID_MSIX)
        if cap is None:
            return 0
        return (self.config_read(cap.offset + 2, 2) & MSIX_TABLE_SIZE_MASK) + 1


def sysfs_device_dir(address: str) -> str:
    return os.path.join("/sys/bus/pci/devices", address)


def normalize_address(address: str) -> str:
    """``00:05.0`` → ``0000:00:05.0``; refuse anything that is not a PCI address."""
    text = address.strip().lower()
    if text.count(":") == 1:
        text = "0000:" + text
    parts = text.replace(".", ":").split(":")
    try:
        ok = (len(parts) == 4 and len(parts[0]) == 4 and len(parts[1]) == 2
              and len(parts[2]) == 2 and len(parts[3]) == 1
              and all(int(p, 16) >= 0 for p in parts) and int(parts[3]) < 8)
    except ValueError:
        ok = False
    if not ok:
        raise PciError(f"{address!r} is not a PCI address (DDDD:BB:DD.F)")
    return text


__all__ = [
    "ALL_ONES",
    "CAP_ID_MSIX",
    "CAP_ID_VENDOR",
    "BarFile",
    "BarWindow",
    "Capability",
    "DmaArena",
    "DmaBuffer",
    "FileRegisters",
    "MmioRegisters",
    "PciFunction",
    "Registers",
    "map_window",
    "normalize_address",
]
