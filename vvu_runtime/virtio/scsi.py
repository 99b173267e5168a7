"""virtio-scsi wire formats (VIRTIO 1.2 §5.6).

Everything a virtio-scsi device and a test driver exchange, one place per
format: the command request and response headers (request queues), the task
management and asynchronous-notification requests (control queue), the event
(event queue), LUN addressing and the feature bits. Little-endian throughout,
except the CDB and sense bytes, which are SCSI's own (big-endian) business.

Queues: 0 is the control queue, 1 the event queue, 2.. the request queues.

A command is a descriptor chain laid out as (no VIRTIO_SCSI_F_INOUT)::

    readable:  CmdReq (19 + cdb_size bytes) [+ data-out]
    writable:  CmdResp (12 + sense_size bytes) [+ data-in]

``cdb_size`` and ``sense_size`` are the config-space defaults (32, 96): QEMU's
vhost-user-scsi owns the config space and refuses to change them, so a
back-end behind it can rely on those sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

CDB_SIZE = 32
SENSE_SIZE = 96

#: Queues before the first request queue (control, event).
FIXED_QUEUES = 2
CONTROL_QUEUE = 0
EVENT_QUEUE = 1

#: Highest LUN number a LUN field can carry (14 bits, flat space addressing).
MAX_LUN = 0x3FFF


class Feature(IntEnum):
    """virtio-scsi device feature bit numbers (not masks)."""

    INOUT = 0
    HOTPLUG = 1
    CHANGE = 2
    T10_PI = 3

    @property
    def mask(self) -> int:
        return 1 << self.value


class Response(IntEnum):
    """``response`` of a command, TMF or AN reply (the transport's verdict)."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


#: TMF "function complete" is spelt OK in the spec.
FUNCTION_COMPLETE = Response.OK


class ControlType(IntEnum):
    """``type`` of a control-queue request."""

    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(IntEnum):
    """``subtype`` of a task management function."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class EventType(IntEnum):
    """``event`` of an event-queue element (EVENTS_MISSED is a flag ORed in)."""

    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


EVENTS_MISSED = 0x80000000


class ResetReason(IntEnum):
    """``reason`` of a TRANSPORT_RESET event."""

    HARD = 0
    RESCAN = 1  # a LUN appeared (the driver scans it)
    REMOVED = 2  # a LUN went away


def encode_lun(target: int, lun: int) -> bytes:
    """The 8-byte LUN field in the form REPORT LUNS uses: peripheral addressing below
    256, flat space above (as QEMU's events do). Events must use it: Linux's
    virtio_scsi takes an event's LUN as ``lun[2] << 8 | lun[3]`` without masking the
    addressing method, so a flat-space LUN 5 would reach it as LUN 16389."""
    if not 0 <= target <= 0xFF or not 0 <= lun <= MAX_LUN:
        raise ValueError(f"target {target} / LUN {lun} out of range")
    high = (0x40 | (lun >> 8)) if lun >= 256 else 0
    return bytes((1, target, high, lun & 0xFF, 0, 0, 0, 0))


def decode_lun(field: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(target, LUN) of an 8-byte LUN field, or None when it addresses no LUN at all
    (first byte not 1, or an addressing method other than peripheral or flat)."""
    if len(field) < 8 or field[0] != 1:
        return None
    method = field[2] >> 6
    if method not in (0, 1):
        return None
    if method == 0 and field[2] != 0:
        return None  # peripheral addressing with a bus number: not ours
    return field[1], ((field[2] << 8) | field[3]) & MAX_LUN


# --- command request / response ----------------------------------------------------------

CMD_REQ = struct.Struct(f"<8sQBBB{CDB_SIZE}s")
CMD_RESP = struct.Struct(f"<IIHBB{SENSE_SIZE}s")
assert CMD_REQ.size == 51 and CMD_RESP.size == 108


@dataclass(frozen=True, slots=True)
class CmdReq:
    """The device-readable header of a SCSI command."""

    lun: bytes
    tag: int
    task_attr: int
    prio: int
    crn: int
    cdb: bytes

    def pack(self) -> bytes:
        return CMD_REQ.pack(self.lun, self.tag, self.task_attr, self.prio, self.crn,
                            self.cdb)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> CmdReq:
        if len(data) < CMD_REQ.size:
            raise ValueError(f"virtio-scsi command header needs {CMD_REQ.size} bytes, "
                             f"got {len(data)}")
        return cls(*CMD_REQ.unpack_from(data))


@dataclass(frozen=True, slots=True)
class CmdResp:
    """The device-writable header of a command's completion."""

    sense_len: int
    resid: int
    status_qualifier: int
    status: int
    response: int
    sense: bytes = b""

    def pack(self) -> bytes:
        return CMD_RESP.pack(self.sense_len, self.resid, self.status_qualifier, self.status,
                             self.response, self.sense)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> CmdResp:
        if len(data) < CMD_RESP.size:
            raise ValueError(f"virtio-scsi command response needs {CMD_RESP.size} bytes, "
                             f"got {len(data)}")
        sense_len, resid, qual, status, response, sense = CMD_RESP.unpack_from(data)
        return cls(sense_len, resid, qual, status, response, sense[:sense_len])


# --- control queue -----------------------------------------------------------------------

CTRL_TYPE = struct.Struct("<I")
TMF_REQ = struct.Struct("<II8sQ")
TMF_RESP = struct.Struct("<B")
AN_REQ = struct.Struct("<I8sI")
AN_RESP = struct.Struct("<IB")
assert TMF_REQ.size == 24 and AN_REQ.size == 16 and AN_RESP.size == 5


@dataclass(frozen=True, slots=True)
class TmfReq:
    """A task management function request (control queue, type TMF)."""

    subtype: int
    lun: bytes
    tag: int

    def pack(self) -> bytes:
        return TMF_REQ.pack(ControlType.TMF, self.subtype, self.lun, self.tag)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> TmfReq:
        if len(data) < TMF_REQ.size:
            raise ValueError(f"virtio-scsi TMF request needs {TMF_REQ.size} bytes, "
                             f"got {len(data)}")
        _, subtype, lun, tag = TMF_REQ.unpack_from(data)
        return cls(subtype, lun, tag)


@dataclass(frozen=True, slots=True)
class AnReq:
    """An asynchronous notification query or subscription (control queue)."""

    type: int
    lun: bytes
    event_requested: int

    def pack(self) -> bytes:
        return AN_REQ.pack(self.type, self.lun, self.event_requested)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> AnReq:
        if len(data) < AN_REQ.size:
            raise ValueError(f"virtio-scsi AN request needs {AN_REQ.size} bytes, "
                             f"got {len(data)}")
        return cls(*AN_REQ.unpack_from(data))


# --- event queue -------------------------------------------------------------------------

EVENT = struct.Struct("<I8sI")
assert EVENT.size == 16


@dataclass(frozen=True, slots=True)
class Event:
    """One element the device writes into an event-queue buffer."""

    event: int
    lun: bytes
    reason: int

    def pack(self) -> bytes:
        return EVENT.pack(self.event, self.lun, self.reason)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Event:
        if len(data) < EVENT.size:
            raise ValueError(f"virtio-scsi event needs {EVENT.size} bytes, got {len(data)}")
        return cls(*EVENT.unpack_from(data))
