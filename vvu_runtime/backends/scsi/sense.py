"""SCSI status, sense keys, additional sense codes and fixed-format sense data.

Only fixed-format sense (response code 0x70, SPC-4 §4.5.3) is produced: every
initiator understands it, and the control mode page says D_SENSE=0.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Status(IntEnum):
    """SCSI status byte (SAM-5)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


class Asc(IntEnum):
    """Additional sense code and qualifier, as ``asc << 8 | ascq``."""

    NO_ADDITIONAL = 0x0000
    WRITE_ERROR = 0x0C00
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    LOGICAL_UNIT_NOT_SUPPORTED = 0x2500
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    WRITE_PROTECTED = 0x2700
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    INTERNAL_TARGET_FAILURE = 0x4400

    @property
    def asc(self) -> int:
        return self.value >> 8

    @property
    def ascq(self) -> int:
        return self.value & 0xFF


FIXED_SENSE_LEN = 18
FIXED_RESPONSE_CODE = 0x70


@dataclass(frozen=True, slots=True)
class Sense:
    """One sense condition; ``field`` is the CDB (or parameter list) byte at fault,
    reported in the sense-key specific bytes (SKSV) when given."""

    key: SenseKey
    code: Asc
    field: int | None = None
    in_cdb: bool = True

    def pack(self) -> bytes:
        """Fixed-format sense data, 18 bytes."""
        out = bytearray(FIXED_SENSE_LEN)
        out[0] = FIXED_RESPONSE_CODE
        out[2] = self.key
        out[7] = FIXED_SENSE_LEN - 8
        out[12] = self.code.asc
        out[13] = self.code.ascq
        if self.field is not None and 0 <= self.field <= 0xFFFF:
            out[15] = 0x80 | (0x40 if self.in_cdb else 0)  # SKSV, C/D
            out[16:18] = self.field.to_bytes(2, "big")
        return bytes(out)


NO_SENSE = Sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL)


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with ``sense``; ``reason`` is for the log."""

    def __init__(self, sense: Sense, reason: str) -> None:
        super().__init__(reason)
        self.sense = sense


def illegal(code: Asc, reason: str, field: int | None = None, *,
            in_cdb: bool = True) -> CheckCondition:
    """ILLEGAL REQUEST with ``code`` (and the byte at fault)."""
    return CheckCondition(Sense(SenseKey.ILLEGAL_REQUEST, code, field, in_cdb), reason)


def invalid_field(field: int, reason: str) -> CheckCondition:
    return illegal(Asc.INVALID_FIELD_IN_CDB, reason, field)


def out_of_range(reason: str) -> CheckCondition:
    return illegal(Asc.LBA_OUT_OF_RANGE, reason)


def write_protected(reason: str) -> CheckCondition:
    return CheckCondition(Sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED), reason)
