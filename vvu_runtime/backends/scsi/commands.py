"""The SCSI command set of a disk LUN (SPC-4 / SBC-4), transport-free.

:meth:`CommandSet.execute` takes one CDB, the LUN it addresses (None: LUN 0
addressed but not configured) and the data buffers of the request (guest
memory views), and returns an :class:`Outcome`: SCSI status, sense data,
bytes moved and the residual. Anything wrong with the command becomes CHECK
CONDITION with fixed-format sense; no input makes an exception escape
(OSError from the image becomes MEDIUM ERROR / HARDWARE ERROR).

Buffers that do not fit the CDB are the transport's business, decided as
QEMU's virtio-scsi does: a data-in or data-out area smaller than the transfer
the CDB asks for, or data in the wrong direction, answers the virtio-scsi
response OVERRUN and runs nothing (raise :class:`Overrun`). Allocation-length
commands (INQUIRY, MODE SENSE, ...) are the exception: SPC lets them return
less than asked, so they are cut to the buffer and the residual says so.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vvu_runtime.backends.scsi.cdb import (
    SA_READ_CAPACITY_16,
    TRANSFER_OPCODES,
    Opcode,
    be,
    decode_transfer,
)
from vvu_runtime.backends.scsi.lun import BLOCK_SIZE, PHYSICAL_EXPONENT, Lun
from vvu_runtime.backends.scsi.sense import (
    NO_SENSE,
    Asc,
    CheckCondition,
    Sense,
    SenseKey,
    Status,
    illegal,
    invalid_field,
    out_of_range,
    write_protected,
)

log = logging.getLogger(__name__)

VENDOR = b"VVU     "
PRODUCT = b"vvu-scsi disk   "
REVISION = b"0001"

#: Block limits (VPD 0xB0) we advertise and enforce.
MAX_TRANSFER_BLOCKS = 0xFFFF  # QEMU's max_sectors default; Linux caps its requests by it
OPTIMAL_GRANULARITY = 1 << PHYSICAL_EXPONENT
MAX_UNMAP_BLOCKS = 1 << 22  # 2 GiB per descriptor: a hole punch is cheap
MAX_UNMAP_DESCRIPTORS = 64
MAX_WRITE_SAME_BLOCKS = 1 << 22
UNMAP_DESCRIPTOR = struct.Struct(">QI4x")

VPD_PAGES = bytes((0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2))
#: Mode pages: caching (0x08), control (0x0A), "all pages" (0x3F).
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F


class Overrun(Exception):
    """The request's buffers do not fit its CDB: virtio-scsi response OVERRUN."""


@dataclass(slots=True)
class Outcome:
    """How a command ended, for the response header."""

    status: int = Status.GOOD
    sense: bytes = b""
    data_in: int = 0  # bytes written to the data-in buffers
    resid: int = 0


def buffers_len(views: Sequence[memoryview]) -> int:
    total = 0
    for v in views:
        total += len(v)
    return total


def take(views: Sequence[memoryview], length: int) -> list[memoryview]:
    """The first ``length`` bytes of ``views`` (caller checked there are that many)."""
    out: list[memoryview] = []
    for v in views:
        if length <= 0:
            break
        if len(v) <= length:
            out.append(v)
            length -= len(v)
        else:
            out.append(v[:length])
            length = 0
    return out


def scatter(data: bytes, views: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``views`` as far as they reach; returns bytes copied."""
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos:pos + n]
        pos += n
    return pos


def gather(views: Sequence[memoryview], length: int) -> bytes:
    return b"".join(bytes(v) for v in take(views, length))


@dataclass(slots=True)
class Command:
    """One command being executed."""

    lun: Lun | None
    cdb: bytes
    data_out: Sequence[memoryview]
    data_in: Sequence[memoryview]
    out_len: int
    in_len: int
    luns: Sequence[int]

    def reply(self, data: bytes, alloc: int) -> int:
        """Data-in of an allocation-length command: cut to ``alloc`` and the buffer."""
        if self.out_len:
            raise Overrun(f"{self.opname} has data-out but returns data-in")
        return scatter(data[:alloc], self.data_in)

    @property
    def opname(self) -> str:
        try:
            return Opcode(self.cdb[0]).name
        except ValueError:
            return f"opcode {self.cdb[0]:#04x}"

    def need_lun(self) -> Lun:
        if self.lun is None:
            raise illegal(Asc.LOGICAL_UNIT_NOT_SUPPORTED, "LUN 0 is not configured")
        return self.lun


Handler = Callable[["CommandSet", Command], int]


class CommandSet:
    """Executes CDBs against LUNs (stateless apart from counters)."""

    def __init__(self) -> None:
        self._handlers: dict[int, Handler] = {
            Opcode.TEST_UNIT_READY: CommandSet._test_unit_ready,
            Opcode.REQUEST_SENSE: CommandSet._request_sense,
            Opcode.INQUIRY: CommandSet._inquiry,
            Opcode.MODE_SENSE_6: CommandSet._mode_sense,
            Opcode.MODE_SENSE_10: CommandSet._mode_sense,
            Opcode.READ_CAPACITY_10: CommandSet._read_capacity_10,
            Opcode.SERVICE_ACTION_IN_16: CommandSet._service_action_in,
            Opcode.SYNCHRONIZE_CACHE_10: CommandSet._synchronize_cache,
            Opcode.SYNCHRONIZE_CACHE_16: CommandSet._synchronize_cache,
            Opcode.UNMAP: CommandSet._unmap,
            Opcode.WRITE_SAME_16: CommandSet._write_same_16,
            Opcode.REPORT_LUNS: CommandSet._report_luns,
        }
        for op in TRANSFER_OPCODES:
            self._handlers[op] = CommandSet._transfer

    def execute(self, lun: Lun | None, cdb: bytes, data_out: Sequence[memoryview],
                data_in: Sequence[memoryview], luns: Sequence[int] = ()) -> Outcome:
        """Run one command. Raises only :class:`Overrun` (a transport verdict)."""
        cmd = Command(lun, cdb, data_out, data_in, buffers_len(data_out),
                      buffers_len(data_in), luns)
        handler = self._handlers.get(cdb[0])
        try:
            if lun is None and cdb[0] not in (Opcode.INQUIRY, Opcode.REPORT_LUNS,
                                              Opcode.REQUEST_SENSE):
                raise illegal(Asc.LOGICAL_UNIT_NOT_SUPPORTED, "LUN 0 is not configured")
            if handler is None:
                raise illegal(Asc.INVALID_COMMAND_OPERATION_CODE,
                              f"operation code {cdb[0]:#04x} is not supported", 0)
            moved = handler(self, cmd)
        except CheckCondition as exc:
            log.debug("%s: CHECK CONDITION: %s", cmd.opname, exc)
            return Outcome(Status.CHECK_CONDITION, exc.sense.pack(), 0,
                           cmd.in_len or cmd.out_len)
        except OSError as exc:
            what = lun.name if lun is not None else "LUN"
            log.warning("%s: %s failed: %s", what, cmd.opname, exc.strerror or exc)
            write = cdb[0] in (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12,
                               Opcode.WRITE_16, Opcode.WRITE_SAME_16, Opcode.UNMAP)
            sense = Sense(SenseKey.MEDIUM_ERROR,
                          Asc.WRITE_ERROR if write else Asc.UNRECOVERED_READ_ERROR)
            return Outcome(Status.CHECK_CONDITION, sense.pack(), 0,
                           cmd.in_len or cmd.out_len)
        if cmd.out_len:
            return Outcome(Status.GOOD, b"", 0, max(0, cmd.out_len - moved))
        return Outcome(Status.GOOD, b"", moved, max(0, cmd.in_len - moved))

    # --- no data --------------------------------------------------------------------------

    def _test_unit_ready(self, cmd: Command) -> int:
        return 0

    def _synchronize_cache(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        cdb = cmd.cdb
        if cdb[0] == Opcode.SYNCHRONIZE_CACHE_10:
            lba, blocks = be(cdb, 2, 4), be(cdb, 7, 2)
        else:
            lba, blocks = be(cdb, 2, 8), be(cdb, 10, 4)
        if lba > lun.blocks or lba + blocks > lun.blocks:
            raise out_of_range(f"SYNCHRONIZE CACHE of [{lba}, +{blocks}) beyond "
                               f"{lun.blocks} blocks")
        # Durable when it completes, IMMED or not: the data path has no queue to wait on.
        if not lun.read_only:
            lun.sync()
        return 0

    # --- data in --------------------------------------------------------------------------

    def _request_sense(self, cmd: Command) -> int:
        if cmd.cdb[1] & 0x01:
            raise invalid_field(1, "REQUEST SENSE for descriptor-format sense (DESC=1)")
        # Autosense reports every condition with its command: nothing is left pending.
        sense = NO_SENSE if cmd.lun is not None else Sense(
            SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
        return cmd.reply(sense.pack(), cmd.cdb[4])

    def _inquiry(self, cmd: Command) -> int:
        cdb = cmd.cdb
        alloc = be(cdb, 3, 2)
        if cdb[1] & 0x02:
            raise invalid_field(1, "INQUIRY with CMDDT (obsolete)")
        evpd = cdb[1] & 0x01
        page = cdb[2]
        lun = cmd.lun
        if not evpd:
            if page:
                raise invalid_field(2, f"INQUIRY page code {page:#04x} without EVPD")
            return cmd.reply(self._standard_inquiry(lun), alloc)
        if lun is None:
            raise illegal(Asc.LOGICAL_UNIT_NOT_SUPPORTED, "VPD of an unconfigured LUN 0")
        body = self._vpd(lun, page)
        if body is None:
            raise invalid_field(2, f"VPD page {page:#04x} is not supported")
        head = bytes((0x00, page)) + len(body).to_bytes(2, "big")
        return cmd.reply(head + body, alloc)

    @staticmethod
    def _standard_inquiry(lun: Lun | None) -> bytes:
        data = bytearray(36)
        # Peripheral qualifier 3 / type 0x1F: "no LU here" (LUN 0 not configured).
        data[0] = 0x00 if lun is not None else 0x7F
        data[2] = 0x06  # SPC-4
        data[3] = 0x12  # HISUP, response data format 2
        data[4] = len(data) - 5
        data[7] = 0x02  # CMDQUE
        data[8:16] = VENDOR
        data[16:32] = PRODUCT
        data[32:36] = REVISION
        return bytes(data)

    @staticmethod
    def _vpd(lun: Lun, page: int) -> bytes | None:
        if page == 0x00:
            return VPD_PAGES
        if page == 0x80:
            return lun.serial.encode()
        if page == 0x83:
            # NAA (binary) and T10 vendor ID (ASCII), both for the logical unit.
            naa = bytes((0x01, 0x03, 0x00, len(lun.naa))) + lun.naa
            t10 = VENDOR + lun.serial.encode()
            vendor = bytes((0x02, 0x01, 0x00, len(t10))) + t10
            return naa + vendor
        if page == 0xB0:
            body = bytearray(0x3C)
            body[0] = 0x01  # WSNZ: WRITE SAME of zero blocks is not "to the end"
            body[2:4] = OPTIMAL_GRANULARITY.to_bytes(2, "big")
            body[4:8] = MAX_TRANSFER_BLOCKS.to_bytes(4, "big")
            if not lun.read_only:
                body[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
                body[20:24] = MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
                body[24:28] = OPTIMAL_GRANULARITY.to_bytes(4, "big")
                body[32:40] = MAX_WRITE_SAME_BLOCKS.to_bytes(8, "big")
            return bytes(body)
        if page == 0xB1:
            body = bytearray(0x3C)
            body[0:2] = (1).to_bytes(2, "big")  # non-rotating medium
            return bytes(body)
        if page == 0xB2:
            if lun.read_only:
                return bytes(4)  # fully provisioned, no unmap
            # LBPU, LBPWS (UNMAP, WRITE SAME (16) with UNMAP), LBPRZ=1 (holes read
            # zero); provisioning type 2: thin.
            return bytes((0x00, 0x80 | 0x40 | (1 << 2), 0x02, 0x00))
        return None

    def _mode_sense(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        cdb = cmd.cdb
        six = cdb[0] == Opcode.MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        llbaa = not six and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = cdb[4] if six else be(cdb, 7, 2)
        if pc == 3:
            raise illegal(Asc.SAVING_PARAMETERS_NOT_SUPPORTED, "MODE SENSE of saved values",
                          2)
        if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != PAGE_ALL):
            raise invalid_field(3, f"MODE SENSE subpage {subpage:#04x}")
        pages = self._mode_pages(page, changeable=pc == 1)
        if pages is None:
            raise invalid_field(2, f"mode page {page:#04x} is not supported")
        blocks = lun.blocks
        if dbd:
            desc = b""
        elif llbaa:
            desc = blocks.to_bytes(8, "big") + bytes(4) + BLOCK_SIZE.to_bytes(4, "big")
        else:
            desc = (bytes(1) + min(blocks, 0xFFFFFF).to_bytes(3, "big") + bytes(1)
                    + BLOCK_SIZE.to_bytes(3, "big"))
        # Device-specific parameter: WP for read-only LUNs, DPOFUA (we honour FUA).
        devspec = (0x80 if lun.read_only else 0x00) | 0x10
        if six:
            head = bytes((len(pages) + len(desc) + 3, 0, devspec, len(desc)))
            data = head + desc + pages
            data = bytes((min(len(data) - 1, 0xFF),)) + data[1:]
        else:
            total = len(pages) + len(desc) + 6
            head = (min(total, 0xFFFF).to_bytes(2, "big")
                    + bytes((0, devspec, 0x01 if llbaa and desc else 0x00, 0))
                    + len(desc).to_bytes(2, "big"))
            data = head + desc + pages
        return cmd.reply(data, alloc)

    @staticmethod
    def _mode_pages(page: int, *, changeable: bool) -> bytes | None:
        # Caching: WCE=1 (writes land in the host page cache; SYNCHRONIZE CACHE makes
        # them durable). Nothing is changeable: we do not take MODE SELECT.
        caching = bytearray(20)
        caching[0:2] = (PAGE_CACHING, 18)
        # Control: D_SENSE=0 (fixed-format sense), QUEUE ALGORITHM MODIFIER 1
        # (unrestricted reordering), busy timeout unlimited.
        control = bytearray(12)
        control[0:2] = (PAGE_CONTROL, 10)
        if not changeable:
            caching[2] = 0x04
            control[3] = 0x10
            control[8:10] = b"\xff\xff"
        if page == PAGE_CACHING:
            return bytes(caching)
        if page == PAGE_CONTROL:
            return bytes(control)
        if page == PAGE_ALL:
            return bytes(caching + control)
        return None

    def _read_capacity_10(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        cdb = cmd.cdb
        if not cdb[8] & 0x01 and be(cdb, 2, 4):
            raise invalid_field(2, "READ CAPACITY (10) with an LBA but PMI=0")
        last = min(lun.blocks - 1, 0xFFFFFFFF)  # 0xFFFFFFFF: "use READ CAPACITY (16)"
        return cmd.reply(last.to_bytes(4, "big") + BLOCK_SIZE.to_bytes(4, "big"), 8)

    def _service_action_in(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        cdb = cmd.cdb
        if cdb[1] & 0x1F != SA_READ_CAPACITY_16:
            raise invalid_field(1, f"SERVICE ACTION IN service action {cdb[1] & 0x1F:#04x}")
        data = bytearray(32)
        data[0:8] = (lun.blocks - 1).to_bytes(8, "big")
        data[8:12] = BLOCK_SIZE.to_bytes(4, "big")
        data[13] = PHYSICAL_EXPONENT
        if not lun.read_only:
            data[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return cmd.reply(bytes(data), be(cdb, 10, 4))

    def _report_luns(self, cmd: Command) -> int:
        cdb = cmd.cdb
        select = cdb[2]
        if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
            raise invalid_field(2, f"REPORT LUNS select report {select:#04x}")
        alloc = be(cdb, 6, 4)
        if alloc < 16:
            raise invalid_field(6, f"REPORT LUNS allocation length {alloc} is below 16")
        # Well-known LUNs only (0x01) or those administering them: we have none.
        numbers = [] if select in (0x01, 0x10, 0x12) else sorted(cmd.luns)
        body = b"".join(_sam_lun(n) for n in numbers)
        return cmd.reply(len(body).to_bytes(4, "big") + bytes(4) + body, alloc)

    # --- data transfer --------------------------------------------------------------------

    def _transfer(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        xfer = decode_transfer(cmd.cdb)
        if xfer.lba > lun.blocks or xfer.blocks > lun.blocks - xfer.lba:
            raise out_of_range(f"{cmd.opname} of [{xfer.lba}, +{xfer.blocks}) beyond "
                               f"{lun.blocks} blocks")
        if xfer.blocks > MAX_TRANSFER_BLOCKS:
            raise invalid_field(7, f"{cmd.opname} of {xfer.blocks} blocks, at most "
                                   f"{MAX_TRANSFER_BLOCKS}")
        length = xfer.blocks * BLOCK_SIZE
        if xfer.write:
            if cmd.in_len:
                raise Overrun(f"{cmd.opname} with data-in buffers")
            if cmd.out_len < length:
                raise Overrun(f"{cmd.opname} of {length} bytes with {cmd.out_len} bytes "
                              "of data-out")
            if lun.read_only:
                raise write_protected(f"{cmd.opname} to read-only {lun.name}")
            if length:
                lun.write(take(cmd.data_out, length), xfer.lba, fua=xfer.fua)
            return length
        if cmd.out_len:
            raise Overrun(f"{cmd.opname} with data-out buffers")
        if cmd.in_len < length:
            raise Overrun(f"{cmd.opname} of {length} bytes into {cmd.in_len} bytes of "
                          "data-in")
        if length:
            lun.read(take(cmd.data_in, length), xfer.lba)
        return length

    def _data_out(self, cmd: Command, length: int) -> bytes:
        if cmd.in_len:
            raise Overrun(f"{cmd.opname} with data-in buffers")
        if cmd.out_len < length:
            raise Overrun(f"{cmd.opname} of {length} bytes with {cmd.out_len} bytes of "
                          "data-out")
        return gather(cmd.data_out, length)

    def _unmap(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        cdb = cmd.cdb
        if cdb[1] & 0x01:
            raise invalid_field(1, "UNMAP with ANCHOR (anchored LBAs are not supported)")
        length = be(cdb, 7, 2)
        if lun.read_only:
            raise write_protected(f"UNMAP on read-only {lun.name}")
        if length == 0:
            return 0
        if length < 8:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR,
                          f"UNMAP parameter list of {length} bytes (header is 8)")
        params = self._data_out(cmd, length)
        desc_len = be(params, 2, 2)
        if desc_len % 16 or 8 + desc_len > length:
            raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                          f"UNMAP block descriptor data length {desc_len} in a "
                          f"{length}-byte list", 2, in_cdb=False)
        count = desc_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                          f"UNMAP with {count} descriptors, at most "
                          f"{MAX_UNMAP_DESCRIPTORS}", 2, in_cdb=False)
        ranges = [UNMAP_DESCRIPTOR.unpack_from(params, 8 + 16 * i) for i in range(count)]
        # All descriptors are checked before any is applied: an error changes nothing.
        for i, (lba, blocks) in enumerate(ranges):
            if lba > lun.blocks or blocks > lun.blocks - lba:
                raise out_of_range(f"UNMAP of [{lba}, +{blocks}) beyond {lun.blocks} blocks")
            if blocks > MAX_UNMAP_BLOCKS:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                              f"UNMAP of {blocks} blocks, at most {MAX_UNMAP_BLOCKS}",
                              8 + 16 * i + 8, in_cdb=False)
        for lba, blocks in ranges:
            if blocks:
                lun.unmap(lba, blocks)
        return length

    def _write_same_16(self, cmd: Command) -> int:
        lun = cmd.need_lun()
        cdb = cmd.cdb
        flags = cdb[1]
        if flags & 0xE0:
            raise invalid_field(1, "WRITE SAME (16) with WRPROTECT")
        if flags & 0x10:
            raise invalid_field(1, "WRITE SAME (16) with ANCHOR")
        unmap, ndob = bool(flags & 0x08), bool(flags & 0x01)
        lba, blocks = be(cdb, 2, 8), be(cdb, 10, 4)
        if blocks == 0:
            raise invalid_field(10, "WRITE SAME (16) of zero blocks (WSNZ=1)")
        if blocks > MAX_WRITE_SAME_BLOCKS:
            raise invalid_field(10, f"WRITE SAME (16) of {blocks} blocks, at most "
                                    f"{MAX_WRITE_SAME_BLOCKS}")
        if lba > lun.blocks or blocks > lun.blocks - lba:
            raise out_of_range(f"WRITE SAME (16) of [{lba}, +{blocks}) beyond "
                               f"{lun.blocks} blocks")
        block = bytes(BLOCK_SIZE) if ndob else self._data_out(cmd, BLOCK_SIZE)
        if lun.read_only:
            raise write_protected(f"WRITE SAME (16) to read-only {lun.name}")
        if not any(block):
            if unmap:
                lun.unmap(lba, blocks)
            else:
                lun.write_zeroes(lba, blocks)
        else:
            lun.write_pattern(block, lba, blocks)
        return 0 if ndob else BLOCK_SIZE


def _sam_lun(number: int) -> bytes:
    """A LUN as REPORT LUNS lists it: peripheral addressing below 256, flat above."""
    if number < 256:
        return bytes((0, number)) + bytes(6)
    return bytes((0x40 | (number >> 8), number & 0xFF)) + bytes(6)
