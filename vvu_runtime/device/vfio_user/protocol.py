"""vfio-user wire format: constants, one dataclass + ``struct.Struct`` per structure.

Everything is little-endian (the host's order; vfio-user says "host-endian" and we
only run on x86-64/aarch64 LE). Sources: QEMU ``docs/interop/vfio-user.rst``,
``hw/vfio-user/*`` and what QEMU 11.1.3 was seen sending on these machines
(``shared/reference/qemu-vfio-user-client.md``).

Each wire struct has ``STRUCT`` (its fixed part), ``pack()`` and
``unpack(buf)``; ``unpack`` checks the length it needs and raises
:class:`~vvu_runtime.device.errors.MessageError` (never ``struct.error``), so a
decoder can be fed any bytes a peer sends.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

from vvu_runtime.device.errors import MessageError

#: Anything a decoder accepts.
Buffer = bytes | bytearray | memoryview

# --- limits we advertise in VERSION (and enforce) -----------------------------------

#: Most fds one message may carry. QEMU's maximum is 16; it chunks SET_IRQS by it.
MAX_MSG_FDS = 16
#: Largest data transfer of one REGION_READ/WRITE (QEMU's default, 1 MiB).
MAX_DATA_XFER_SIZE = 1 << 20
#: Page sizes we accept in DMA_MAP (4 KiB only).
PGSIZES = 4096
#: DMA table entries we accept (QEMU's default and maximum).
MAX_DMA_MAPS = 65535
#: Largest message we buffer: a REGION_WRITE of MAX_DATA_XFER_SIZE plus headers. A
#: larger one is drained without buffering and refused with E2BIG.
MAX_MESSAGE_SIZE = 16 + 16 + MAX_DATA_XFER_SIZE

SERVER_CAPABILITIES: dict[str, object] = {
    "max_msg_fds": MAX_MSG_FDS,
    "max_data_xfer_size": MAX_DATA_XFER_SIZE,
    "pgsizes": PGSIZES,
    "max_dma_maps": MAX_DMA_MAPS,
    "write_multiple": True,
}


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"command {value}"


class MsgFlags(enum.IntFlag):
    """Header flags. Bits 0-3 are the message type (0 command, 1 reply)."""

    COMMAND = 0x0
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


MSG_TYPE_MASK = 0xF


class DeviceFlags(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
IRQ_SET_ACTION_MASK = (
    IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER
)


class DmaMapFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class PciRegion(enum.IntEnum):
    """vfio region indexes of a PCI device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_PCI_REGIONS = 9


class PciIrq(enum.IntEnum):
    """vfio interrupt indexes of a PCI device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_PCI_IRQS = 5

#: VFIO_REGION_INFO_CAP_SPARSE_MMAP in linux/vfio.h.
CAP_SPARSE_MMAP = 1


def _need(buf: Buffer, size: int, what: str) -> None:
    if len(buf) < size:
        raise MessageError(f"{what}: payload is {len(buf)} bytes, needs at least {size}")


# --- header ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header in front of every message."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHIII")

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "header")
        return cls(*cls.STRUCT.unpack_from(buf))

    @property
    def is_reply(self) -> bool:
        return self.flags & MSG_TYPE_MASK == MsgFlags.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & MsgFlags.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & MsgFlags.ERROR)

    def describe(self) -> str:
        return f"{Command.name_of(self.command)} (id {self.msg_id}, {self.size} bytes)"


HEADER_SIZE = Header.STRUCT.size


@dataclass(slots=True)
class Message:
    """A complete message as received: header, payload and the fds that came with it.

    The receiver owns ``fds`` and must close every one it does not keep.
    """

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: The peer sent more fds than we accept; the kernel discarded the rest.
    fds_truncated: bool = False
    #: The message was larger than MAX_MESSAGE_SIZE: its payload was read and
    #: dropped (``payload`` is empty) so that framing survives.
    oversized: bool = False


def encode(header: Header, payload: bytes = b"") -> bytes:
    """Header + payload, with ``size`` set from the payload."""
    h = Header(header.msg_id, header.command, HEADER_SIZE + len(payload), header.flags,
               header.error)
    return h.pack() + payload


def reply_header(request: Header, payload_len: int = 0) -> Header:
    return Header(request.msg_id, request.command, HEADER_SIZE + payload_len, MsgFlags.REPLY)


def error_reply(request: Header, err: int) -> bytes:
    """A header-only error reply to ``request`` carrying ``err`` (an errno)."""
    return Header(request.msg_id, request.command, HEADER_SIZE,
                  MsgFlags.REPLY | MsgFlags.ERROR, err).pack()


# --- VERSION -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Version:
    """``u16 major; u16 minor; char json[]`` (NUL-terminated, may be absent)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HH")

    major: int
    minor: int
    capabilities: dict[str, object] = field(default_factory=dict)

    def pack(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        # QEMU checks that the reply's last byte is NUL ("corrupt version reply").
        return self.STRUCT.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "VERSION")
        major, minor = cls.STRUCT.unpack_from(buf)
        raw = bytes(buf[cls.STRUCT.size:])
        caps: dict[str, object] = {}
        if raw:
            if not raw.endswith(b"\0"):
                raise MessageError("VERSION: capability JSON is not NUL-terminated")
            text = raw[:-1]
            try:
                doc = json.loads(text) if text else {}
            except (ValueError, RecursionError) as exc:
                # ValueError covers bad UTF-8, bad JSON and integers past Python's
                # digit limit; RecursionError deeply nested arrays or objects.
                raise MessageError(f"VERSION: capability JSON does not parse: "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from exc
            if not isinstance(doc, dict):
                raise MessageError("VERSION: capability JSON is not an object")
            got = doc.get("capabilities", {})
            if not isinstance(got, dict):
                raise MessageError("VERSION: 'capabilities' is not an object")
            caps = got
        return cls(major, minor, caps)


# --- DMA ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaMap:
    """DMA_MAP: ``u32 argsz; u32 flags; u64 offset (into the fd); u64 iova; u64 size``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    argsz: int
    flags: int
    offset: int
    iova: int
    size: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.offset, self.iova, self.size)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "DMA_MAP")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """DMA_UNMAP request and reply: ``u32 argsz; u32 flags; u64 iova; u64 size``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    argsz: int
    flags: int
    iova: int
    size: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.iova, self.size)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "DMA_UNMAP")
        return cls(*cls.STRUCT.unpack_from(buf))


# --- device, region and irq info ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """DEVICE_GET_INFO: ``u32 argsz; u32 flags; u32 num_regions; u32 num_irqs``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "DEVICE_GET_INFO")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO request and reply (fixed 32-byte part).

    ``argsz`` in a request is the room the client has for the reply payload; in a
    reply it is the size the full answer needs (fixed part + capability chain).
    ``offset`` is the mmap offset into the region's fd.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.cap_offset,
                                self.size, self.offset)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "DEVICE_GET_REGION_INFO")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class CapHeader:
    """``vfio_info_cap_header``: ``u16 id; u16 version; u32 next`` (offsets from the
    start of the region-info struct; 0 ends the chain)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHI")

    id: int
    version: int
    next: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.id, self.version, self.next)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "region info capability header")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class SparseArea:
    """One mmappable window of a region (offset relative to the region's ``offset``)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")

    offset: int
    size: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.size)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "sparse mmap area")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP (id 1, version 1): ``u32 nr_areas; u32
    reserved; {u64 offset; u64 size}[nr_areas]``, after a :class:`CapHeader`."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")

    areas: tuple[SparseArea, ...]

    def pack(self, next_offset: int = 0) -> bytes:
        return (CapHeader(CAP_SPARSE_MMAP, 1, next_offset).pack()
                + self.STRUCT.pack(len(self.areas), 0)
                + b"".join(a.pack() for a in self.areas))

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        """Parse from the capability header on."""
        head = CapHeader.unpack(buf)
        if head.id != CAP_SPARSE_MMAP:
            raise MessageError(f"region info capability {head.id} is not SPARSE_MMAP")
        body = buf[CapHeader.STRUCT.size:]
        _need(body, cls.STRUCT.size, "sparse mmap capability")
        (nr, _reserved) = cls.STRUCT.unpack_from(body)
        areas_buf = body[cls.STRUCT.size:]
        _need(areas_buf, nr * SparseArea.STRUCT.size, "sparse mmap areas")
        return cls(tuple(SparseArea.unpack(areas_buf[i * 16:]) for i in range(nr)))

    @property
    def packed_size(self) -> int:
        return (CapHeader.STRUCT.size + self.STRUCT.size
                + SparseArea.STRUCT.size * len(self.areas))


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO: ``u32 argsz; u32 flags; u32 index; u32 count``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int
    flags: int
    index: int
    count: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "DEVICE_GET_IRQ_INFO")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class IrqSet:
    """DEVICE_SET_IRQS fixed part: ``u32 argsz; u32 flags; u32 index; u32 start;
    u32 count``; DATA_BOOL adds ``u8[count]``, DATA_EVENTFD sends fds instead."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIII")

    argsz: int
    flags: int
    index: int
    start: int
    count: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.argsz, self.flags, self.index, self.start, self.count)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "DEVICE_SET_IRQS")
        return cls(*cls.STRUCT.unpack_from(buf))


# --- region access -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """REGION_READ/REGION_WRITE fixed part: ``u64 offset; u32 region; u32 count``.

    A read reply and a write request append ``data[count]``.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")

    offset: int
    region: int
    count: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "REGION_READ/REGION_WRITE")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class WriteMultiEntry:
    """One write of REGION_WRITE_MULTI: ``u64 offset; u32 region; u32 count; u8 data[8]``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII8s")
    #: Entries carry at most this many data bytes.
    MAX_DATA = 8

    offset: int
    region: int
    count: int
    data: bytes

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.region, self.count, self.data)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "REGION_WRITE_MULTI entry")
        return cls(*cls.STRUCT.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class WriteMulti:
    """REGION_WRITE_MULTI: ``u64 wr_cnt`` then the entries; the reply is ``u64 wr_cnt``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    #: QEMU sends at most 200 writes per message; refuse absurd counts early.
    MAX_ENTRIES = 4096

    entries: tuple[WriteMultiEntry, ...]

    def pack(self) -> bytes:
        return self.STRUCT.pack(len(self.entries)) + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        _need(buf, cls.STRUCT.size, "REGION_WRITE_MULTI")
        (count,) = cls.STRUCT.unpack_from(buf)
        if count > cls.MAX_ENTRIES:
            raise MessageError(f"REGION_WRITE_MULTI: {count} writes, at most "
                               f"{cls.MAX_ENTRIES} accepted")
        need = cls.STRUCT.size + count * WriteMultiEntry.STRUCT.size
        if len(buf) != need:
            raise MessageError(f"REGION_WRITE_MULTI: {count} writes need {need} payload "
                               f"bytes, got {len(buf)}")
        step = WriteMultiEntry.STRUCT.size
        base = cls.STRUCT.size
        return cls(tuple(WriteMultiEntry.unpack(buf[base + i * step:]) for i in range(count)))
