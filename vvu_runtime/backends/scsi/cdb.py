"""CDB layouts: operation codes and the fields we read out of them (SPC-4, SBC-4).

Every field is read from the fixed 32-byte CDB area of the virtio-scsi header,
so a short or garbage CDB can never index out of bounds: its missing bytes are
zeroes, and the command code then judges the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from vvu_runtime.backends.scsi.sense import invalid_field


class Opcode(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA


#: SERVICE ACTION IN (16) service actions we serve.
SA_READ_CAPACITY_16 = 0x10


def be(cdb: bytes, start: int, length: int) -> int:
    """A big-endian field of ``length`` bytes at ``start``."""
    return int.from_bytes(cdb[start:start + length], "big")


@dataclass(frozen=True, slots=True)
class Transfer:
    """What a READ or WRITE CDB asks for."""

    write: bool
    lba: int
    blocks: int
    fua: bool


_READS = {Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16}


def decode_transfer(cdb: bytes) -> Transfer:
    """LBA, length and flags of READ/WRITE (6), (10), (12), (16).

    Protection information is not supported (we do not set PROTECT in INQUIRY),
    so a non-zero RDPROTECT/WRPROTECT is an invalid field, as SBC-4 asks.
    """
    op = cdb[0]
    write = op not in _READS
    if op in (Opcode.READ_6, Opcode.WRITE_6):
        lba = be(cdb, 1, 3) & 0x1FFFFF
        blocks = cdb[4] or 256  # (6): zero means 256 blocks
        return Transfer(write, lba, blocks, False)
    if cdb[1] & 0xE0:
        raise invalid_field(1, f"{'WR' if write else 'RD'}PROTECT {cdb[1] >> 5} without "
                               "protection information")
    fua = bool(cdb[1] & 0x08)
    if op in (Opcode.READ_10, Opcode.WRITE_10):
        return Transfer(write, be(cdb, 2, 4), be(cdb, 7, 2), fua)
    if op in (Opcode.READ_12, Opcode.WRITE_12):
        return Transfer(write, be(cdb, 2, 4), be(cdb, 6, 4), fua)
    return Transfer(write, be(cdb, 2, 8), be(cdb, 10, 4), fua)


TRANSFER_OPCODES = frozenset({
    Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16,
    Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16,
})
