"""A PCI function as the vfio-user server presents it: config space, BARs, interrupts.

What QEMU's client does with each part (observed with QEMU 11.1.3):

* **Config space** (region 7, 256 bytes = conventional PCI) is read whole at realize.
  QEMU emulates the BAR registers, the MSI-X capability and some command bits
  itself but forwards every config write here too, so we keep correct masks: BAR
  sizing works, read-only fields stay read-only, status error bits are
  write-1-to-clear, and the command register tells us about Bus Master Enable
  (without it QEMU drops our MSI-X silently) and INTx disable.
* **BARs** are either trapped (every access is a REGION_READ/WRITE, dispatched to
  :class:`MmioRange` handlers) or backed by an fd QEMU mmaps into the guest, with
  optional sparse areas leaving trapped holes (:class:`MappedBar`). QEMU reads
  region info once, so a BAR's fd cannot change while a client is connected.
* **MSI-X**: QEMU emulates the table and masking itself and forwards PBA reads to
  us; the table lives in a trapped BAR and is kept here as plain memory for clients
  that do not emulate it. Raising vector N writes the eventfd QEMU gave in
  SET_IRQS for N; a vector raised before it has an eventfd is remembered as
  pending (in the PBA) and delivered when one arrives.
* **INTx** is level-triggered and automasked: raising it writes the eventfd and
  masks the line until QEMU unmasks it (after the guest's EOI); if still asserted
  then, it fires again. Status bit 3 follows the level. Without KVM, QEMU disables
  all BAR mmaps while an INTx is outstanding: prefer MSI-X.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vvu_runtime.device.dma import PAGE_SIZE, DmaTable
from vvu_runtime.device.errors import DeviceModelError, IrqError, RegionAccessError
from vvu_runtime.device.vfio_user.device import (
    IrqDescription,
    RegionDescription,
    VfioUserDevice,
)
from vvu_runtime.device.vfio_user.protocol import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    MAX_DATA_XFER_SIZE,
    NUM_PCI_IRQS,
    NUM_PCI_REGIONS,
    DeviceFlags,
    IrqInfoFlags,
    IrqSetFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
    SparseArea,
)
from vvu_runtime.fds import eventfd_signal, is_eventfd

log = logging.getLogger(__name__)

ReadHandler = Callable[[int, int], bytes]
WriteHandler = Callable[[int, bytes], None]

CONFIG_SIZE = 256

# --- config space header offsets and bits (PCI local bus spec 3.0, type 0 header) ---
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0_REG = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40


class Command(enum.IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


#: Command bits a guest may change; the rest read as zero.
COMMAND_WRITABLE = (Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.PARITY
                    | Command.SERR | Command.INTX_DISABLE)


class Status(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    MASTER_DATA_PARITY = 1 << 8
    SIG_TARGET_ABORT = 1 << 11
    RCV_TARGET_ABORT = 1 << 12
    RCV_MASTER_ABORT = 1 << 13
    SIG_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY = 1 << 15


#: Status error bits, write-1-to-clear.
STATUS_W1C = (Status.MASTER_DATA_PARITY | Status.SIG_TARGET_ABORT | Status.RCV_TARGET_ABORT
              | Status.RCV_MASTER_ABORT | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY)


class CapabilityId(enum.IntEnum):
    MSI = 0x05
    VENDOR = 0x09
    MSIX = 0x11


MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_MASKALL = 1 << 14
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 1
MSIX_MAX_VECTORS = 2048


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# --- BARs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MmioRange:
    """A named piece of a BAR whose accesses go to handlers (offsets relative to it)."""

    name: str
    offset: int
    length: int
    read: ReadHandler
    write: WriteHandler

    @property
    def end(self) -> int:
        return self.offset + self.length


class Bar:
    """One memory BAR. Trapped by default: accesses go to the registered ranges.

    Reads of bytes no range claims return zeros and writes to them are dropped
    (logged at debug), as on hardware with reserved registers.
    """

    def __init__(self, index: int, size: int, *, name: str, is_64bit: bool = False,
                 prefetchable: bool = False) -> None:
        if not 0 <= index <= 5 or (is_64bit and index > 4):
            raise DeviceModelError(f"BAR {name}: index {index} is not a usable BAR slot")
        if not _is_pow2(size) or size < 16:
            raise DeviceModelError(f"BAR{index} {name}: size {size:#x} must be a power of two "
                                   ">= 16")
        if size > 0xFFFFFFFF and not is_64bit:
            raise DeviceModelError(f"BAR{index} {name}: {size:#x} bytes needs a 64-bit BAR")
        self.index = index
        self.size = size
        self.name = name
        self.is_64bit = is_64bit
        self.prefetchable = prefetchable
        self._ranges: list[MmioRange] = []

    @property
    def ranges(self) -> tuple[MmioRange, ...]:
        return tuple(self._ranges)

    def add_range(self, name: str, offset: int, length: int, read: ReadHandler,
                  write: WriteHandler) -> MmioRange:
        """Route accesses to [offset, offset+length) to ``read``/``write``."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise DeviceModelError(f"BAR{self.index} range {name} [{offset:#x}, +{length:#x}) "
                                   f"does not fit the {self.size:#x}-byte BAR")
        for r in self._ranges:
            if offset < r.end and r.offset < offset + length:
                raise DeviceModelError(f"BAR{self.index} range {name} [{offset:#x}, "
                                       f"+{length:#x}) overlaps {r.name}")
        new = MmioRange(name, offset, length, read, write)
        self._ranges.append(new)
        self._ranges.sort(key=lambda r: r.offset)
        return new

    def register_bits(self) -> int:
        """Low bits of the BAR register (memory space, type, prefetchable)."""
        return (0b100 if self.is_64bit else 0) | (0b1000 if self.prefetchable else 0)

    def description(self) -> RegionDescription:
        return RegionDescription(self.size, RegionFlags.READ | RegionFlags.WRITE)

    def check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise RegionAccessError(f"BAR{self.index} ({self.name}): access [{offset:#x}, "
                                    f"+{count:#x}) is past the end ({self.size:#x} bytes)")

    def read(self, offset: int, count: int) -> bytes:
        out = bytearray(count)
        end = offset + count
        pos = offset
        for r in self._ranges:
            if r.end <= pos:
                continue
            if r.offset >= end:
                break
            lo = max(pos, r.offset)
            hi = min(end, r.end)
            # A handler returning the wrong length must not resize the reply.
            got = r.read(lo - r.offset, hi - lo)[:hi - lo].ljust(hi - lo, b"\0")
            out[lo - offset:hi - offset] = got
            pos = hi
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        claimed = 0
        for r in self._ranges:
            if r.end <= offset:
                continue
            if r.offset >= end:
                break
            lo = max(offset, r.offset)
            hi = min(end, r.end)
            r.write(lo - r.offset, data[lo - offset:hi - offset])
            claimed += hi - lo
        if claimed < len(data):
            log.debug("BAR%d (%s): write of %d bytes at %#x hits no register", self.index,
                      self.name, len(data), offset)

    def close(self) -> None:
        """Release what the BAR holds (nothing for a trapped BAR)."""


class MappedBar(Bar):
    """A BAR backed by an fd the client mmaps into the guest (zero copy).

    ``areas`` are the mmappable windows (page aligned, relative to the BAR); the
    rest of the BAR is trapped and served by the ranges added with
    :meth:`add_range`. ``areas=None`` makes the whole BAR mappable. The BAR owns
    ``fd`` and closes it in :meth:`close`.

    Trapped accesses that land in an area (QEMU traps everything while an INTx is
    outstanding without KVM) are served with ``pread``/``pwrite`` on the fd, never
    through a mapping of our own: whoever else holds the file (the consumer VM for
    BAR2) may truncate it, and touching a mapped page past the end of a file is a
    SIGBUS that would kill the process. Only the first ``file_size`` bytes (default:
    the whole BAR) are the file's: past them reads are zero and writes are dropped,
    so a trapped write never grows the file beyond what was provisioned.
    """

    def __init__(self, index: int, size: int, fd: int, *, name: str, fd_offset: int = 0,
                 areas: Sequence[SparseArea] | None = None, is_64bit: bool = True,
                 prefetchable: bool = True, file_size: int | None = None) -> None:
        super().__init__(index, size, name=name, is_64bit=is_64bit, prefetchable=prefetchable)
        if size < PAGE_SIZE or fd_offset % PAGE_SIZE:
            raise DeviceModelError(f"BAR{index} {name}: a mapped BAR needs >= 4 KiB and a "
                                   "page-aligned fd offset")
        self.fd = fd
        self.fd_offset = fd_offset
        self.file_size = size if file_size is None else min(file_size, size)
        if areas is None:
            areas = [SparseArea(0, size)]
        prev_end = 0
        for a in sorted(areas, key=lambda a: a.offset):
            if a.offset % PAGE_SIZE or a.size % PAGE_SIZE or a.size <= 0:
                raise DeviceModelError(f"BAR{index} {name}: sparse area {a} is not page aligned")
            if a.offset < prev_end or a.offset + a.size > size:
                raise DeviceModelError(f"BAR{index} {name}: sparse area {a} overlaps another "
                                       "or runs past the BAR")
            prev_end = a.offset + a.size
        self.areas = tuple(sorted(areas, key=lambda a: a.offset))

    def add_range(self, name: str, offset: int, length: int, read: ReadHandler,
                  write: WriteHandler) -> MmioRange:
        for a in self.areas:
            if offset < a.offset + a.size and a.offset < offset + length:
                raise DeviceModelError(f"BAR{self.index} range {name} lies in the mmapped area "
                                       f"{a}: the guest would never trap there")
        return super().add_range(name, offset, length, read, write)

    def description(self) -> RegionDescription:
        whole = self.areas == (SparseArea(0, self.size),)
        flags = RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP
        if not whole:
            flags |= RegionFlags.CAPS
        return RegionDescription(self.size, flags, self.fd, self.fd_offset,
                                 () if whole else self.areas)

    def _area_of(self, offset: int, count: int) -> SparseArea | None:
        for a in self.areas:
            if a.offset <= offset < a.offset + a.size:
                if offset + count > a.offset + a.size:
                    raise RegionAccessError(f"BAR{self.index} ({self.name}): access "
                                            f"[{offset:#x}, +{count:#x}) straddles the end "
                                            "of an mmapped area")
                return a
        return None

    def _io_error(self, what: str, offset: int, count: int, exc: OSError) -> RegionAccessError:
        return RegionAccessError(f"BAR{self.index} ({self.name}): {what} of {count:#x} bytes "
                                 f"at {offset:#x} failed: {exc.strerror or exc}",
                                 errno=errno.EIO)

    def read(self, offset: int, count: int) -> bytes:
        if self._area_of(offset, count) is None:
            return super().read(offset, count)
        inside = max(0, min(count, self.file_size - offset))
        try:
            data = os.pread(self.fd, inside, self.fd_offset + offset) if inside else b""
        except OSError as exc:
            raise self._io_error("read", offset, count, exc) from exc
        # Short when the file shrank under us: the missing bytes read as zero.
        return data.ljust(count, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if self._area_of(offset, len(data)) is None:
            super().write(offset, data)
            return
        view = memoryview(data)[:max(0, self.file_size - offset)]
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], self.fd_offset + offset + done)
        except OSError as exc:
            raise self._io_error("write", offset, len(data), exc) from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- config space ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigWindow:
    """Config bytes computed on access instead of stored (e.g. virtio's pci_cfg_data)."""

    offset: int
    length: int
    read: ReadHandler
    write: WriteHandler


class ConfigSpace:
    """256 bytes of type-0 config space with per-bit write masks.

    Build-time setters (``init_*``, :meth:`add_capability`) define the power-on
    contents that :meth:`reset` restores; :meth:`write` is what the guest does and
    obeys the masks: ``wmask`` bits are writable, ``w1cmask`` bits clear on a 1.
    """

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self._defaults = bytearray(CONFIG_SIZE)
        self._windows: list[ConfigWindow] = []
        self._write_hooks: list[tuple[int, int, Callable[[], None]]] = []
        self._last_cap = 0
        self._next_free = FIRST_CAPABILITY

    # build time

    def init_bytes(self, offset: int, value: bytes, wmask: bytes | None = None,
                   w1cmask: bytes | None = None) -> None:
        end = offset + len(value)
        if offset < 0 or end > CONFIG_SIZE:
            raise DeviceModelError(f"config bytes [{offset:#x}, {end:#x}) past 256")
        self.data[offset:end] = value
        self._defaults[offset:end] = value
        if wmask is not None:
            self.wmask[offset:end] = wmask
        if w1cmask is not None:
            self.w1cmask[offset:end] = w1cmask

    def init_u8(self, offset: int, value: int, wmask: int = 0) -> None:
        self.init_bytes(offset, bytes([value]), bytes([wmask]))

    def init_u16(self, offset: int, value: int, wmask: int = 0, w1cmask: int = 0) -> None:
        self.init_bytes(offset, value.to_bytes(2, "little"), wmask.to_bytes(2, "little"),
                        w1cmask.to_bytes(2, "little"))

    def init_u32(self, offset: int, value: int, wmask: int = 0) -> None:
        self.init_bytes(offset, value.to_bytes(4, "little"), wmask.to_bytes(4, "little"))

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``body`` follows the id/next bytes); returns its offset."""
        offset = self._next_free
        end = offset + 2 + len(body)
        if end > CONFIG_SIZE:
            raise DeviceModelError(f"capability {cap_id:#x} of {2 + len(body)} bytes does not "
                                   f"fit: config space is full from {offset:#x}")
        mask = bytes(2) + (wmask if wmask is not None else bytes(len(body)))
        self.init_bytes(offset, bytes([cap_id, 0]) + body, mask)
        if self._last_cap:
            self.init_u8(self._last_cap + 1, offset)
        else:
            self.init_u8(CAPABILITY_LIST, offset)
            status = self.u16(STATUS) | Status.CAP_LIST
            self.init_u16(STATUS, status, 0, STATUS_W1C)
        self._last_cap = offset
        self._next_free = (end + 3) & ~3
        return offset

    def add_window(self, offset: int, length: int, read: ReadHandler,
                   write: WriteHandler) -> None:
        """Serve [offset, offset+length) with handlers instead of stored bytes."""
        self._windows.append(ConfigWindow(offset, length, read, write))

    def on_write(self, offset: int, length: int, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after any guest write touching [offset, offset+length)."""
        self._write_hooks.append((offset, length, hook))

    def capabilities(self) -> Iterable[tuple[int, int]]:
        """(offset, id) of each capability, walking the chain like a driver would."""
        seen = set()
        pos = self.data[CAPABILITY_LIST] if self.u16(STATUS) & Status.CAP_LIST else 0
        while pos and pos not in seen:
            seen.add(pos)
            yield pos, self.data[pos]
            pos = self.data[pos + 1]

    # runtime

    def u8(self, offset: int) -> int:
        return self.data[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset:offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset:offset + 4], "little")

    def set_bits16(self, offset: int, bits: int, on: bool) -> None:
        """Device-side change of a 16-bit register (e.g. status INTx), not a default."""
        value = self.u16(offset)
        value = value | bits if on else value & ~int(bits)
        self.data[offset:offset + 2] = value.to_bytes(2, "little")

    def check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > CONFIG_SIZE:
            raise RegionAccessError(f"config space access [{offset:#x}, +{count:#x}) is past "
                                    f"the {CONFIG_SIZE} bytes of conventional PCI config space")

    def read(self, offset: int, count: int) -> bytes:
        out = bytearray(self.data[offset:offset + count])
        for w in self._windows:
            lo, hi = max(offset, w.offset), min(offset + count, w.offset + w.length)
            if lo < hi:
                got = w.read(lo - w.offset, hi - lo)[:hi - lo].ljust(hi - lo, b"\0")
                out[lo - offset:hi - offset] = got
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        for w in self._windows:
            lo, hi = max(offset, w.offset), min(end, w.offset + w.length)
            if lo < hi:
                w.write(lo - w.offset, data[lo - offset:hi - offset])
        for i, byte in enumerate(data):
            pos = offset + i
            wm = self.wmask[pos]
            w1c = self.w1cmask[pos]
            old = self.data[pos]
            new = (old & ~wm) | (byte & wm)
            new &= ~(byte & w1c)
            self.data[pos] = new & 0xFF
        for start, length, hook in self._write_hooks:
            if offset < start + length and start < end:
                hook()

    def reset(self) -> None:
        self.data[:] = self._defaults


# --- interrupts ------------------------------------------------------------------------


@dataclass(slots=True)
class _IrqIndex:
    flags: IrqInfoFlags
    count: int
    fds: list[int | None]
    masked: list[bool]
    pending: list[bool]


class IrqLines:
    """The eventfds QEMU gave for each interrupt index, and how to raise them.

    ``count`` per index is fixed (NORESIZE): QEMU re-sends the whole set when it
    wants more vectors, which is what it does anyway.
    """

    def __init__(self, name: str, *, intx: bool, msix_vectors: int) -> None:
        self.name = name
        automask = IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        fixed = IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE
        layout = {
            PciIrq.INTX: (automask, 1 if intx else 0),
            # A count of 1 without an MSI capability is what the experiment showed
            # working; QEMU only uses MSI when the capability exists.
            PciIrq.MSI: (fixed, 1),
            PciIrq.MSIX: (fixed | IrqInfoFlags.MASKABLE, msix_vectors),
            PciIrq.ERR: (IrqInfoFlags.EVENTFD, 0),
            PciIrq.REQ: (IrqInfoFlags.EVENTFD, 0),
        }
        self._irqs = {
            idx: _IrqIndex(flags, count, [None] * count, [False] * count, [False] * count)
            for idx, (flags, count) in layout.items()
        }
        #: Command register INTx-disable bit, kept up to date by the PCI device.
        self.intx_disabled = False
        self.intx_level = False

    def info(self, index: int) -> IrqDescription:
        irq = self._get(index)
        return IrqDescription(irq.flags, irq.count)

    def _get(self, index: int) -> _IrqIndex:
        try:
            return self._irqs[PciIrq(index)]
        except ValueError:
            raise IrqError(f"{self.name}: interrupt index {index} does not exist (0..4: "
                           "INTx, MSI, MSI-X, ERR, REQ)") from None

    def pending(self, index: int, vector: int) -> bool:
        irq = self._get(index)
        return 0 <= vector < irq.count and irq.pending[vector]

    def pending_bits(self, index: int) -> int:
        irq = self._get(index)
        return sum(1 << i for i, p in enumerate(irq.pending) if p)

    # --- raising --------------------------------------------------------------------

    def fire(self, index: int, vector: int) -> bool:
        """Raise one edge on ``vector``; True if an eventfd was written.

        Masked or not yet wired vectors become pending and fire when unmasked/wired.
        """
        irq = self._get(index)
        if not 0 <= vector < irq.count:
            raise IrqError(f"{self.name}: {PciIrq(index).name} vector {vector} does not exist "
                           f"({irq.count} vectors)")
        fd = irq.fds[vector]
        if irq.masked[vector] or fd is None:
            irq.pending[vector] = True
            return False
        irq.pending[vector] = False
        # The client shares this eventfd's file and may have made it blocking with a
        # full counter: eventfd_signal never blocks (a full counter is a wake-up
        # already pending, so nothing is lost by skipping).
        try:
            if not eventfd_signal(fd):
                return False
        except OSError as exc:
            log.warning("%s: writing the eventfd of %s vector %d failed: %s", self.name,
                        PciIrq(index).name, vector, exc)
            return False
        if irq.flags & IrqInfoFlags.AUTOMASKED:
            irq.masked[vector] = True
        return True

    def set_intx(self, asserted: bool) -> None:
        """Drive the (level-triggered) INTx line."""
        rising = asserted and not self.intx_level
        self.intx_level = asserted
        if not asserted:
            self._irqs[PciIrq.INTX].pending[0] = False
        elif rising and not self.intx_disabled and self._irqs[PciIrq.INTX].count:
            self.fire(PciIrq.INTX, 0)

    # --- SET_IRQS -------------------------------------------------------------------

    def set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int],
                 data: bytes) -> None:
        irq = self._get(index)
        what = f"{self.name}: SET_IRQS {PciIrq(index).name} flags {flags:#x} [{start}, +{count})"
        data_type = flags & IRQ_SET_DATA_MASK
        action = flags & IRQ_SET_ACTION_MASK
        if flags & ~int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
            raise IrqError(f"{what}: unknown flag bits")
        if bin(data_type).count("1") != 1 or bin(action).count("1") != 1:
            raise IrqError(f"{what}: exactly one data type and one action must be set")
        if fds and data_type != IrqSetFlags.DATA_EVENTFD:
            raise IrqError(f"{what}: fds sent without DATA_EVENTFD")
        if count == 0:
            if data_type == IrqSetFlags.DATA_NONE and action == IrqSetFlags.ACTION_TRIGGER:
                self._disable(index, irq)
            return
        if start + count > irq.count:
            raise IrqError(f"{what}: the index has {irq.count} vectors")
        if data_type == IrqSetFlags.DATA_BOOL:
            if len(data) != count:
                raise IrqError(f"{what}: DATA_BOOL needs {count} bytes, got {len(data)}")
            selected = [start + i for i in range(count) if data[i]]
        else:
            selected = list(range(start, start + count))

        if data_type == IrqSetFlags.DATA_EVENTFD:
            if action == IrqSetFlags.ACTION_UNMASK:
                # The INTx resample fd KVM uses; without KVM in the loop we re-fire on
                # UNMASK ourselves, so the fd is not needed.
                if fds and len(fds) != count:
                    raise IrqError(f"{what}: {len(fds)} fds for {count} vectors")
                self._unmask(index, irq, selected)
                return
            if action != IrqSetFlags.ACTION_TRIGGER:
                raise IrqError(f"{what}: DATA_EVENTFD only goes with TRIGGER or UNMASK")
            if fds and len(fds) != count:
                raise IrqError(f"{what}: {len(fds)} fds for {count} vectors")
            for fd in fds:
                if not is_eventfd(fd):
                    raise IrqError(f"{what}: fd {fd} is not an eventfd")
            for i, vector in enumerate(selected):
                self._assign(irq, vector, os.dup(fds[i]) if fds else None)
                if fds and irq.pending[vector] and not irq.masked[vector]:
                    self.fire(index, vector)
            return
        if action == IrqSetFlags.ACTION_MASK:
            if not irq.flags & IrqInfoFlags.MASKABLE:
                raise IrqError(f"{what}: this index is not maskable")
            for vector in selected:
                irq.masked[vector] = True
        elif action == IrqSetFlags.ACTION_UNMASK:
            self._unmask(index, irq, selected)
        else:
            for vector in selected:
                self.fire(index, vector)

    def _unmask(self, index: int, irq: _IrqIndex, vectors: list[int]) -> None:
        for vector in vectors:
            irq.masked[vector] = False
            level_still_high = index == PciIrq.INTX and self.intx_level and not self.intx_disabled
            if irq.pending[vector] or level_still_high:
                self.fire(index, vector)

    @staticmethod
    def _assign(irq: _IrqIndex, vector: int, fd: int | None) -> None:
        old = irq.fds[vector]
        irq.fds[vector] = fd
        if old is not None:
            os.close(old)

    def _disable(self, index: int, irq: _IrqIndex) -> None:
        for vector in range(irq.count):
            self._assign(irq, vector, None)
            irq.masked[vector] = False

    def close(self) -> None:
        """Close every eventfd and forget pending state (client gone)."""
        for index, irq in self._irqs.items():
            self._disable(index, irq)
            irq.pending = [False] * irq.count
        self.intx_level = False

    def open_fds(self) -> list[int]:
        """The eventfds currently held (for leak checks)."""
        return [fd for irq in self._irqs.values() for fd in irq.fds if fd is not None]


# --- the device -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PciIdentity:
    """What enumeration shows of a function."""

    vendor_id: int
    device_id: int
    class_code: int
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0


@dataclass(frozen=True, slots=True)
class MsixLayout:
    """Where the MSI-X table and PBA live (both in trapped BARs)."""

    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8


class PciDevice(VfioUserDevice):
    """A conventional PCI function with memory BARs, MSI-X and INTx.

    Subclasses add capabilities and BAR ranges in ``__init__`` (after calling this
    one), and override :meth:`device_reset` / :meth:`client_connected` /
    :meth:`client_disconnected` hooks as needed.
    """

    def __init__(self, identity: PciIdentity, bars: Sequence[Bar], *,
                 msix: MsixLayout | None = None, intx: bool = True, name: str = "pci") -> None:
        self.name = name
        self.identity = identity
        self.dma = DmaTable(name=name)
        self.bars: dict[int, Bar] = {}
        for bar in bars:
            for slot in (bar.index, bar.index + 1) if bar.is_64bit else (bar.index,):
                if slot in self.bars or slot in self._upper_halves():
                    raise DeviceModelError(f"{name}: BAR slot {slot} declared twice "
                                           "(a 64-bit BAR also takes the next slot)")
            self.bars[bar.index] = bar
        self.msix = msix
        self.irqs = IrqLines(name, intx=intx, msix_vectors=msix.vectors if msix else 0)
        self.config = ConfigSpace()
        self._warned_bus_master = False
        self._build_header(intx)
        if msix is not None:
            self._build_msix(msix)

    def _upper_halves(self) -> set[int]:
        return {b.index + 1 for b in self.bars.values() if b.is_64bit}

    def _build_header(self, intx: bool) -> None:
        c = self.config
        ident = self.identity
        c.init_u16(VENDOR_ID, ident.vendor_id)
        c.init_u16(DEVICE_ID, ident.device_id)
        c.init_u16(COMMAND, 0, COMMAND_WRITABLE)
        c.init_u16(STATUS, 0, 0, STATUS_W1C)
        c.init_u8(REVISION_ID, ident.revision)
        c.init_bytes(CLASS_PROG, ident.class_code.to_bytes(3, "little"))
        c.init_u8(CACHE_LINE_SIZE, 0, 0xFF)
        c.init_u8(LATENCY_TIMER, 0, 0xFF)
        c.init_u16(SUBSYSTEM_VENDOR_ID, ident.subsystem_vendor_id)
        c.init_u16(SUBSYSTEM_ID, ident.subsystem_id)
        c.init_u8(INTERRUPT_LINE, 0, 0xFF)
        c.init_u8(INTERRUPT_PIN, 1 if intx else 0)
        for bar in self.bars.values():
            reg = BAR0_REG + 4 * bar.index
            size_mask = ~(bar.size - 1)
            c.init_u32(reg, bar.register_bits(), size_mask & 0xFFFFFFF0 & 0xFFFFFFFF)
            if bar.is_64bit:
                c.init_u32(reg + 4, 0, (size_mask >> 32) & 0xFFFFFFFF)
        c.on_write(COMMAND, 2, self._command_written)

    def _build_msix(self, m: MsixLayout) -> None:
        if not 1 <= m.vectors <= MSIX_MAX_VECTORS:
            raise DeviceModelError(f"{self.name}: MSI-X needs 1..2048 vectors, got {m.vectors}")
        for what, bar_index, offset in (("table", m.table_bar, m.table_offset),
                                        ("PBA", m.pba_bar, m.pba_offset)):
            if bar_index not in self.bars or offset % 8:
                raise DeviceModelError(f"{self.name}: MSI-X {what} must sit 8-byte aligned in "
                                       f"a declared BAR (BAR{bar_index} at {offset:#x})")
        self._msix_table = bytearray(m.table_size)
        for v in range(m.vectors):
            # Vectors come out of reset masked (PCI 3.0 6.8.2.9).
            self._msix_table[v * 16 + 12] = MSIX_VECTOR_MASKED
        self.bars[m.table_bar].add_range("msix-table", m.table_offset, m.table_size,
                                         self._msix_table_read, self._msix_table_write)
        self.bars[m.pba_bar].add_range("msix-pba", m.pba_offset, m.pba_size,
                                       self._msix_pba_read, self._msix_pba_write)
        body = struct.pack("<HII", m.vectors - 1, m.table_offset | m.table_bar,
                           m.pba_offset | m.pba_bar)
        wmask = struct.pack("<HII", MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL, 0, 0)
        self.msix_cap_offset = self.config.add_capability(CapabilityId.MSIX, body, wmask)

    # --- MSI-X table and PBA (trapped) --------------------------------------------------

    def _msix_table_read(self, offset: int, size: int) -> bytes:
        return bytes(self._msix_table[offset:offset + size])

    def _msix_table_write(self, offset: int, data: bytes) -> None:
        self._msix_table[offset:offset + len(data)] = data

    def _msix_pba_read(self, offset: int, size: int) -> bytes:
        bits = self.irqs.pending_bits(PciIrq.MSIX)
        assert self.msix is not None
        return bits.to_bytes(self.msix.pba_size, "little")[offset:offset + size]

    def _msix_pba_write(self, offset: int, data: bytes) -> None:
        log.debug("%s: guest wrote the read-only MSI-X PBA; ignored", self.name)

    # --- state the device and transport look at ------------------------------------------

    @property
    def command(self) -> int:
        return self.config.u16(COMMAND)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & Command.BUS_MASTER)

    @property
    def msix_enabled(self) -> bool:
        if self.msix is None:
            return False
        control = self.config.u16(self.msix_cap_offset + 2)
        return bool(control & MSIX_CONTROL_ENABLE)

    def _command_written(self) -> None:
        self.irqs.intx_disabled = bool(self.command & Command.INTX_DISABLE)

    # --- raising interrupts -------------------------------------------------------------

    def trigger_msix(self, vector: int) -> bool:
        """Raise MSI-X ``vector``; True if an eventfd was written."""
        if not self.bus_master and not self._warned_bus_master:
            self._warned_bus_master = True
            log.warning("%s: MSI-X vector %d raised while Bus Master Enable is off; QEMU "
                        "drops it. The guest driver must set PCI command |= 0x6.",
                        self.name, vector)
        return self.irqs.fire(PciIrq.MSIX, vector)

    def set_intx(self, asserted: bool) -> None:
        """Drive INTx (level); status bit 3 follows it."""
        self.config.set_bits16(STATUS, Status.INTERRUPT, asserted)
        self.irqs.set_intx(asserted)

    # --- VfioUserDevice --------------------------------------------------------------------

    @property
    def device_flags(self) -> int:
        return DeviceFlags.RESET | DeviceFlags.PCI

    @property
    def num_regions(self) -> int:
        return NUM_PCI_REGIONS

    @property
    def num_irqs(self) -> int:
        return NUM_PCI_IRQS

    def _region_name(self, index: int) -> str:
        try:
            return PciRegion(index).name
        except ValueError:
            return f"region {index}"

    def region_info(self, index: int) -> RegionDescription:
        if not 0 <= index < NUM_PCI_REGIONS:
            raise RegionAccessError(f"{self.name}: region index {index} does not exist "
                                    f"(0..{NUM_PCI_REGIONS - 1})")
        if index == PciRegion.CONFIG:
            return RegionDescription(CONFIG_SIZE, RegionFlags.READ | RegionFlags.WRITE)
        bar = self.bars.get(index)
        if bar is None:
            # Unused BAR slots, upper halves of 64-bit BARs, ROM, VGA.
            return RegionDescription(0, RegionFlags(0))
        return bar.description()

    def irq_info(self, index: int) -> IrqDescription:
        return self.irqs.info(index)

    def _target(self, index: int, offset: int, count: int) -> Bar | ConfigSpace:
        if count > MAX_DATA_XFER_SIZE:
            raise RegionAccessError(f"{self.name}: access of {count} bytes exceeds "
                                    f"max_data_xfer_size", errno=errno.E2BIG)
        if index == PciRegion.CONFIG:
            self.config.check(offset, count)
            return self.config
        bar = self.bars.get(index)
        if bar is None:
            raise RegionAccessError(f"{self.name}: {self._region_name(index)} has no "
                                    f"registers (access at {offset:#x})")
        bar.check(offset, count)
        return bar

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return self._target(index, offset, count).read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._target(index, offset, len(data)).write(offset, data)

    def set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int],
                 data: bytes) -> None:
        self.irqs.set_irqs(flags, index, start, count, fds, data)

    def reset(self) -> None:
        """Function-level reset: config space and device state to power-on values.

        DMA maps belong to the client's container and eventfds to its interrupt
        setup, so both survive, as with vfio-pci.
        """
        self.config.reset()
        self.irqs.intx_disabled = False
        self.set_intx(False)
        if self.msix is not None:
            for v in range(self.msix.vectors):
                self._msix_table[v * 16:v * 16 + 16] = bytes(12) + bytes([1, 0, 0, 0])
        self.device_reset()

    def device_reset(self) -> None:
        """Subclass hook: put device-specific state back to power-on."""

    def client_connected(self) -> None:
        """A client connected (state was already reset when the last one left)."""

    def client_disconnected(self) -> None:
        self.reset()
        self.irqs.close()
        self.dma.unmap_all()
        self._warned_bus_master = False

    def close(self) -> None:
        """Release everything: eventfds, DMA maps, BAR fds."""
        self.irqs.close()
        self.dma.close()
        for bar in self.bars.values():
            bar.close()
