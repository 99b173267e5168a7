"""Doubles for driving vvu-scsi without a session: CDB builders, chains of plain
bytearrays, and a fake vring (what ScsiDevice uses of vhost_user.vring.Vring).

Shared by test_scsi_commands, test_scsi_device and test_scsi_hostile.
"""

from __future__ import annotations

import struct

from vvu_runtime.virtio.queue import DescriptorChain
from vvu_runtime.virtio.scsi import CDB_SIZE, CMD_RESP, CmdReq, CmdResp, encode_lun

# --- CDBs ------------------------------------------------------------------------------------

def cdb(*fields: int | bytes) -> bytes:
    """A CDB from bytes and ints (each int one byte), zero-padded to 32 bytes."""
    out = b"".join(f if isinstance(f, bytes) else bytes((f,)) for f in fields)
    return out.ljust(CDB_SIZE, b"\0")


def be(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb(0x28, flags, be(lba, 4), 0, be(blocks, 2), 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb(0x2A, flags, be(lba, 4), 0, be(blocks, 2), 0)


def read16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb(0x88, flags, be(lba, 8), be(blocks, 4), 0, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb(0x8A, flags, be(lba, 8), be(blocks, 4), 0, 0)


def read6(lba: int, blocks: int) -> bytes:
    return cdb(0x08, be(lba, 3), blocks, 0)


def write6(lba: int, blocks: int) -> bytes:
    return cdb(0x0A, be(lba, 3), blocks, 0)


def inquiry(alloc: int = 96, evpd: int = 0, page: int = 0) -> bytes:
    return cdb(0x12, evpd, page, be(alloc, 2), 0)


def mode_sense6(page: int, alloc: int = 255, *, dbd: bool = False, pc: int = 0,
                subpage: int = 0) -> bytes:
    return cdb(0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0)


def mode_sense10(page: int, alloc: int = 512, *, dbd: bool = False, llbaa: bool = False,
                 pc: int = 0, subpage: int = 0) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return cdb(0x5A, flags, (pc << 6) | page, subpage, 0, 0, 0, be(alloc, 2), 0)


def read_capacity10() -> bytes:
    return cdb(0x25)


def read_capacity16(alloc: int = 32) -> bytes:
    return cdb(0x9E, 0x10, be(0, 8), be(alloc, 4), 0, 0)


def sync_cache10(lba: int = 0, blocks: int = 0) -> bytes:
    return cdb(0x35, 0, be(lba, 4), 0, be(blocks, 2), 0)


def sync_cache16(lba: int = 0, blocks: int = 0) -> bytes:
    return cdb(0x91, 0, be(lba, 8), be(blocks, 4), 0, 0)


def unmap(length: int, anchor: bool = False) -> bytes:
    return cdb(0x42, 1 if anchor else 0, 0, 0, 0, 0, 0, be(length, 2), 0)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def write_same16(lba: int, blocks: int, *, unmap: bool = False, ndob: bool = False,
                 flags: int = 0) -> bytes:
    flags |= (0x08 if unmap else 0) | (0x01 if ndob else 0)
    return cdb(0x93, flags, be(lba, 8), be(blocks, 4), 0, 0)


def report_luns(alloc: int = 4096, select: int = 0) -> bytes:
    return cdb(0xA0, 0, select, 0, 0, 0, be(alloc, 4), 0, 0)


def request_sense(alloc: int = 252, desc: bool = False) -> bytes:
    return cdb(0x03, 1 if desc else 0, 0, 0, alloc, 0)


def sense_of(data: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed-format sense data."""
    assert data[0] == 0x70, f"not fixed-format sense: {data.hex()}"
    return data[2] & 0x0F, data[12], data[13]


# --- chains ----------------------------------------------------------------------------------

def command_chain(lun: int | bytes, cdb_bytes: bytes, *, out: bytes = b"", into: int = 0,
                  head: int = 0, target: int = 0) -> DescriptorChain:
    """A command in the layout Linux uses: header | data-out, response | data-in."""
    field = lun if isinstance(lun, bytes) else encode_lun(target, lun)
    req = CmdReq(field, 7, 0, 0, 0, cdb_bytes).pack()
    readable = [memoryview(bytearray(req))]
    if out:
        readable.append(memoryview(bytearray(out)))
    writable = [memoryview(bytearray(CMD_RESP.size))]
    if into:
        writable.append(memoryview(bytearray(into)))
    return DescriptorChain(head=head, readable=readable, writable=writable)


def response_of(chain: DescriptorChain) -> CmdResp:
    return CmdResp.unpack(b"".join(bytes(w) for w in chain.writable)[:CMD_RESP.size])


def data_in_of(chain: DescriptorChain) -> bytes:
    return b"".join(bytes(w) for w in chain.writable)[CMD_RESP.size:]


class FakeVring:
    """Just what ScsiDevice uses of vhost_user.vring.Vring."""

    def __init__(self, chains: list[DescriptorChain] | None = None, index: int = 2) -> None:
        self.index = index
        self.enabled = True
        self.started = True
        self.available = list(chains or [])
        self.pushed: list[tuple[DescriptorChain, int]] = []
        self.notified = 0
        self.failed = False
        self.failures: list[BaseException] = []

    def pop(self) -> DescriptorChain | None:
        return self.available.pop(0) if self.available else None

    def push(self, chain: DescriptorChain, written: int) -> None:
        self.pushed.append((chain, written))

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        chains: list[DescriptorChain] = []
        while len(chains) < limit and (chain := self.pop()) is not None:
            chains.append(chain)
        return chains

    def push_many(self, completions: list[tuple[DescriptorChain, int]]) -> None:
        for chain, written in completions:
            self.push(chain, written)

    def notify(self) -> None:
        self.notified += 1

    def has_available(self) -> bool:
        return bool(self.available)

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        self.failures.append(exc)
        self.available.clear()
