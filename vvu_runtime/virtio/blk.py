"""virtio-blk wire formats (VIRTIO 1.2 §5.2; reference/protocols.md B.13).

Everything a virtio-blk device and a test driver exchange, one place per
format: the request header, the status byte, the discard / write-zeroes
segment, the configuration space and the feature bits. All fields are
little-endian (VERSION_1 only; we never speak the legacy interface).

A request is a descriptor chain laid out as::

    readable:  BlkRequestHeader (16 bytes) [+ data for OUT / DISCARD / WRITE_ZEROES]
    writable:  [data for IN / GET_ID] + status (1 byte, the very last writable byte)

Sectors are always 512 bytes, whatever ``blk_size`` says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

#: GET_ID answers with at most this many bytes (NUL-padded, not NUL-terminated when full).
ID_BYTES = 20


class RequestType(IntEnum):
    """``type`` of a request header."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    """The status byte the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class Feature(IntEnum):
    """virtio-blk device feature bit numbers (not masks)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16

    @property
    def mask(self) -> int:
        return 1 << self.value


#: Flag in a write-zeroes segment: the device may deallocate instead of writing zeroes.
SEGMENT_F_UNMAP = 1


# --- request header --------------------------------------------------------------------

REQUEST_HEADER = struct.Struct("<IIQ")
assert REQUEST_HEADER.size == 16


@dataclass(frozen=True, slots=True)
class BlkRequestHeader:
    """The 16-byte device-readable header that starts every request."""

    type: int
    reserved: int  # formerly ioprio; drivers send 0, devices ignore it
    sector: int

    def pack(self) -> bytes:
        return REQUEST_HEADER.pack(self.type, self.reserved, self.sector)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> BlkRequestHeader:
        if len(data) < REQUEST_HEADER.size:
            raise ValueError(
                f"virtio-blk request header needs {REQUEST_HEADER.size} bytes, got {len(data)}"
            )
        return cls(*REQUEST_HEADER.unpack_from(data))


# --- discard / write-zeroes / secure-erase segment ---------------------------------------

SEGMENT = struct.Struct("<QII")
assert SEGMENT.size == 16


@dataclass(frozen=True, slots=True)
class BlkSegment:
    """One range of a DISCARD, WRITE_ZEROES or SECURE_ERASE request."""

    sector: int
    num_sectors: int
    flags: int = 0

    @property
    def unmap(self) -> bool:
        return bool(self.flags & SEGMENT_F_UNMAP)

    def pack(self) -> bytes:
        return SEGMENT.pack(self.sector, self.num_sectors, self.flags)

    @classmethod
    def unpack_all(cls, data: bytes | bytearray | memoryview) -> list[BlkSegment]:
        """Every segment in ``data``; its length must be a whole number of segments."""
        if len(data) % SEGMENT.size:
            raise ValueError(
                f"virtio-blk segment array of {len(data)} bytes is not a multiple of "
                f"{SEGMENT.size}"
            )
        return [cls(*fields) for fields in SEGMENT.iter_unpack(data)]


# --- lifetime (GET_LIFETIME answer; we answer UNSUPP, kept for drivers and tests) --------

LIFETIME = struct.Struct("<HHH")


# --- configuration space -----------------------------------------------------------------

# capacity, size_max, seg_max, geometry(cylinders, heads, sectors), blk_size,
# topology(physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback,
# unused0, num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3],
# max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
assert CONFIG.size == 72

#: Offset and size of the one field a driver may write (with CONFIG_WCE).
CONFIG_WRITEBACK_OFFSET = 32


@dataclass(slots=True)
class BlkConfig:
    """The virtio-blk configuration space (72 bytes with the secure-erase fields).

    Fields only mean something when their feature is offered; the rest stay 0.
    ``min_io_size`` and ``opt_io_size`` are in ``blk_size`` units.
    """

    capacity: int
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.capacity, self.size_max, self.seg_max,
            self.cylinders, self.heads, self.sectors,
            self.blk_size,
            self.physical_block_exp, self.alignment_offset, self.min_io_size, self.opt_io_size,
            self.writeback, 0, self.num_queues,
            self.max_discard_sectors, self.max_discard_seg, self.discard_sector_alignment,
            self.max_write_zeroes_sectors, self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
            self.max_secure_erase_sectors, self.max_secure_erase_seg,
            self.secure_erase_sector_alignment,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> BlkConfig:
        """Parse a config space; a shorter one (older drivers read 60 bytes) is zero-extended."""
        raw = bytes(data[:CONFIG.size]).ljust(CONFIG.size, b"\0")
        (capacity, size_max, seg_max, cylinders, heads, sectors, blk_size,
         physical_block_exp, alignment_offset, min_io_size, opt_io_size,
         writeback, _unused0, num_queues,
         max_discard_sectors, max_discard_seg, discard_sector_alignment,
         max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap,
         max_secure_erase_sectors, max_secure_erase_seg,
         secure_erase_sector_alignment) = CONFIG.unpack(raw)
        return cls(
            capacity=capacity, size_max=size_max, seg_max=seg_max,
            cylinders=cylinders, heads=heads, sectors=sectors, blk_size=blk_size,
            physical_block_exp=physical_block_exp, alignment_offset=alignment_offset,
            min_io_size=min_io_size, opt_io_size=opt_io_size, writeback=writeback,
            num_queues=num_queues, max_discard_sectors=max_discard_sectors,
            max_discard_seg=max_discard_seg, discard_sector_alignment=discard_sector_alignment,
            max_write_zeroes_sectors=max_write_zeroes_sectors,
            max_write_zeroes_seg=max_write_zeroes_seg,
            write_zeroes_may_unmap=write_zeroes_may_unmap,
            max_secure_erase_sectors=max_secure_erase_sectors,
            max_secure_erase_seg=max_secure_erase_seg,
            secure_erase_sector_alignment=secure_erase_sector_alignment,
        )
