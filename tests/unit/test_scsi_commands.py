"""The SCSI command set (backends/scsi/commands.py) against a LUN on a temporary image:
every command's data, and its sense data for bad input."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import scsi_target as t
from vvu_runtime.backends.scsi.commands import (
    MAX_TRANSFER_BLOCKS,
    MAX_UNMAP_DESCRIPTORS,
    CommandSet,
    Outcome,
    Overrun,
)
from vvu_runtime.backends.scsi.lun import Lun, LunSpec
from vvu_runtime.backends.scsi.sense import Status

BLOCKS = 2048  # 1 MiB image
ILLEGAL, DATA_PROTECT, NO_SENSE = 0x5, 0x7, 0x0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "lun0.raw"
    path.write_bytes(bytes(range(256)) * (BLOCKS * 2))
    return path


@pytest.fixture
def lun(image: Path) -> Iterator[Lun]:
    lun = Lun(LunSpec(0, str(image), serial="SERIAL-0"))
    yield lun
    lun.close()


@pytest.fixture
def ro_lun(image: Path) -> Iterator[Lun]:
    lun = Lun(LunSpec(3, str(image), read_only=True))
    yield lun
    lun.close()


def run(lun: Lun | None, cdb: bytes, *, out: bytes = b"", into: int = 0,
        luns: tuple[int, ...] = (0,)) -> tuple[Outcome, bytes]:
    data_out = [memoryview(bytearray(out))] if out else []
    buf = bytearray(into)
    data_in = [memoryview(buf)] if into else []
    outcome = CommandSet().execute(lun, cdb, data_out, data_in, luns)
    return outcome, bytes(buf[:outcome.data_in])


def check(lun: Lun | None, cdb: bytes, key: int, asc: int, ascq: int = 0, *,
          out: bytes = b"", into: int = 0) -> bytes:
    """Run a command that must end in CHECK CONDITION with this sense; returns the sense."""
    outcome, data = run(lun, cdb, out=out, into=into)
    assert outcome.status == Status.CHECK_CONDITION, f"{cdb[:16].hex()} ended GOOD"
    assert t.sense_of(outcome.sense) == (key, asc, ascq), outcome.sense.hex()
    assert len(outcome.sense) == 18 and data == b""
    return outcome.sense


def good(lun: Lun | None, cdb: bytes, *, out: bytes = b"", into: int = 0) -> bytes:
    outcome, data = run(lun, cdb, out=out, into=into)
    assert outcome.status == Status.GOOD, t.sense_of(outcome.sense)
    assert outcome.sense == b""
    return data


# --- no data ---------------------------------------------------------------------------

def test_test_unit_ready(lun: Lun) -> None:
    assert good(lun, t.cdb(0x00)) == b""
    check(None, t.cdb(0x00), ILLEGAL, 0x25)  # LUN 0 not configured


def test_unknown_opcodes_are_invalid_command_operation_code(lun: Lun) -> None:
    for op in (0x01, 0x04, 0x15, 0x55, 0x7F, 0xA3, 0xFF, 0x2F, 0x8F):
        sense = check(lun, t.cdb(op), ILLEGAL, 0x20)
        assert sense[15] == 0xC0 and sense[16:18] == b"\0\0"  # SKSV, C/D, byte 0


def test_synchronize_cache_makes_writes_durable(lun: Lun, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    good(lun, t.sync_cache10())
    good(lun, t.sync_cache16(10, 100))
    assert synced == [lun.fd, lun.fd]
    check(lun, t.sync_cache10(BLOCKS, 1), ILLEGAL, 0x21)
    check(lun, t.sync_cache16(2**64 - 1, 2), ILLEGAL, 0x21)
    assert len(synced) == 2  # failed commands sync nothing


# --- INQUIRY ----------------------------------------------------------------------------

def test_standard_inquiry(lun: Lun) -> None:
    data = good(lun, t.inquiry(96), into=96)
    assert len(data) == 36 and data[0] == 0x00 and data[2] == 0x06 and data[3] & 0x0F == 2
    assert data[4] == 31 and data[7] & 0x02  # additional length, CMDQUE
    assert data[8:16] == b"VVU     " and data[16:32].startswith(b"vvu-scsi")
    # Allocation length cuts the data; the residual reports it.
    outcome, short = run(lun, t.inquiry(5), into=96)
    assert short == data[:5] and outcome.resid == 91


def test_inquiry_of_missing_lun0_says_no_unit_here() -> None:
    data = good(None, t.inquiry(36), into=36)
    assert data[0] == 0x7F  # qualifier 3, type 0x1F
    check(None, t.inquiry(255, evpd=1, page=0x80), ILLEGAL, 0x25, into=255)


def test_vpd_pages(lun: Lun, ro_lun: Lun) -> None:
    pages = good(lun, t.inquiry(255, 1, 0x00), into=255)
    assert pages[1] == 0x00 and list(pages[4:4 + pages[3]]) == [0, 0x80, 0x83, 0xB0, 0xB1,
                                                                0xB2]
    serial = good(lun, t.inquiry(255, 1, 0x80), into=255)
    assert serial[1] == 0x80 and serial[4:4 + serial[3]] == b"SERIAL-0"
    ident = good(lun, t.inquiry(255, 1, 0x83), into=255)
    body = ident[4:4 + struct.unpack(">H", ident[2:4])[0]]
    designators = []
    while body:
        designators.append((body[0] & 0x0F, body[1] & 0x0F, body[4:4 + body[3]]))
        body = body[4 + body[3]:]
    assert designators[0][:2] == (1, 3) and designators[0][2] == lun.naa
    assert designators[0][2][0] >> 4 == 3  # NAA 3, locally assigned
    assert designators[1] == (2, 1, b"VVU     SERIAL-0")
    limits = good(lun, t.inquiry(255, 1, 0xB0), into=255)
    assert struct.unpack(">H", limits[2:4])[0] == 0x3C and limits[4] & 1  # WSNZ
    assert struct.unpack(">I", limits[8:12])[0] == MAX_TRANSFER_BLOCKS
    assert struct.unpack(">I", limits[20:24])[0] > 0  # max unmap LBA count
    assert struct.unpack(">I", limits[24:28])[0] == MAX_UNMAP_DESCRIPTORS
    assert struct.unpack(">Q", limits[36:44])[0] > 0  # max write same length
    ro_limits = good(ro_lun, t.inquiry(255, 1, 0xB0), into=255)
    assert ro_limits[20:28] == bytes(8)  # no UNMAP on a read-only LUN
    chars = good(lun, t.inquiry(255, 1, 0xB1), into=255)
    assert struct.unpack(">H", chars[4:6])[0] == 1  # non-rotating
    prov = good(lun, t.inquiry(255, 1, 0xB2), into=255)
    assert prov[5] & 0x80 and prov[5] & 0x40 and prov[6] & 0x07 == 2  # LBPU, LBPWS, thin
    assert good(ro_lun, t.inquiry(255, 1, 0xB2), into=255)[5] == 0


def test_identity_is_stable_and_distinct(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(4096))
    a, b, c = (Lun(LunSpec(0, str(image))), Lun(LunSpec(1, str(image))),
               Lun(LunSpec(2, str(other))))
    try:
        assert a.serial == b.serial and a.naa == b.naa  # same image, same identity
        assert a.serial != c.serial and a.naa != c.naa
    finally:
        for x in (a, b, c):
            x.close()


def test_inquiry_bad_fields(lun: Lun) -> None:
    sense = check(lun, t.inquiry(255, 1, 0x89), ILLEGAL, 0x24, into=255)
    assert sense[15] == 0xC0 and sense[16:18] == b"\0\x02"  # field pointer: byte 2
    check(lun, t.inquiry(255, 0, 0x80), ILLEGAL, 0x24, into=255)  # page without EVPD
    check(lun, t.inquiry(255, 2, 0), ILLEGAL, 0x24, into=255)  # CMDDT


# --- capacity and modes -------------------------------------------------------------------

def test_read_capacity(lun: Lun, ro_lun: Lun) -> None:
    assert good(lun, t.read_capacity10(), into=8) == struct.pack(">II", BLOCKS - 1, 512)
    data = good(lun, t.read_capacity16(), into=32)
    assert struct.unpack(">QI", data[:12]) == (BLOCKS - 1, 512)
    assert data[13] == 3 and data[14] & 0xC0 == 0xC0  # 4 KiB physical, LBPME, LBPRZ
    assert good(ro_lun, t.read_capacity16(), into=32)[14] == 0
    check(lun, t.cdb(0x25, 0, t.be(5, 4), 0, 0, 0), ILLEGAL, 0x24, into=8)  # LBA, PMI=0
    check(lun, t.cdb(0x9E, 0x11), ILLEGAL, 0x24, into=32)  # another service action


def test_mode_sense_pages(lun: Lun, ro_lun: Lun) -> None:
    data = good(lun, t.mode_sense6(0x3F), into=255)
    assert data[0] == len(data) - 1 and data[2] == 0x10 and data[3] == 8  # DPOFUA, 1 desc
    assert int.from_bytes(data[5:8], "big") == BLOCKS and data[9:12] == b"\0\x02\0"
    pages = data[12:]
    assert pages[0] == 0x08 and pages[1] == 18 and pages[2] & 0x04  # caching, WCE
    assert pages[20] == 0x0A and pages[21] == 10 and not pages[22] & 0x04  # control, D_SENSE=0
    caching = good(lun, t.mode_sense6(0x08, dbd=True), into=255)
    assert caching[3] == 0 and caching[4:] == pages[:20]
    control = good(lun, t.mode_sense10(0x0A, dbd=True), into=255)
    assert struct.unpack(">H", control[:2])[0] == len(control) - 2 and control[8:] == pages[20:]
    long_desc = good(lun, t.mode_sense10(0x08, llbaa=True), into=255)
    assert long_desc[4] & 1 and struct.unpack(">H", long_desc[6:8])[0] == 16
    assert struct.unpack(">Q", long_desc[8:16])[0] == BLOCKS
    assert good(ro_lun, t.mode_sense6(0x3F), into=255)[2] & 0x80  # write protected
    changeable = good(lun, t.mode_sense6(0x08, dbd=True, pc=1), into=255)
    assert changeable[4:6] == b"\x08\x12" and not any(changeable[6:])
    outcome, cut = run(lun, t.mode_sense6(0x3F, alloc=4), into=255)
    assert len(cut) == 4 and cut[0] == len(data) - 1 and outcome.resid == 251


def test_mode_sense_bad_fields(lun: Lun) -> None:
    check(lun, t.mode_sense6(0x19), ILLEGAL, 0x24, into=255)  # unknown page
    check(lun, t.mode_sense10(0x08, subpage=1), ILLEGAL, 0x24, into=255)
    check(lun, t.mode_sense6(0x08, subpage=0xFF), ILLEGAL, 0x24, into=255)
    check(lun, t.mode_sense6(0x08, pc=3), ILLEGAL, 0x39, into=255)  # saved values
    assert good(lun, t.mode_sense6(0x3F, subpage=0xFF), into=255)


# --- REPORT LUNS / REQUEST SENSE ---------------------------------------------------------------

def test_report_luns(lun: Lun) -> None:
    _, data = run(lun, t.report_luns(), into=4096, luns=(7, 0, 300))
    assert struct.unpack(">I", data[:4])[0] == 24 and len(data) == 32
    assert data[8:16] == bytes(8) and data[16:18] == b"\0\x07"
    assert data[24:26] == bytes((0x41, 300 & 0xFF))  # flat space addressing
    _, none = run(None, t.report_luns(select=1), into=64, luns=(0, 1))
    assert none == bytes(8)  # well-known LUNs only: none
    check(lun, t.report_luns(alloc=8), ILLEGAL, 0x24, into=8)
    check(lun, t.report_luns(select=3), ILLEGAL, 0x24, into=64)


def test_request_sense(lun: Lun) -> None:
    data = good(lun, t.request_sense(), into=252)
    assert t.sense_of(data) == (NO_SENSE, 0, 0) and len(data) == 18
    assert t.sense_of(good(None, t.request_sense(), into=252)) == (ILLEGAL, 0x25, 0)
    check(lun, t.request_sense(desc=True), ILLEGAL, 0x24, into=252)


# --- READ / WRITE -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [6, 10, 16])
def test_write_then_read(lun: Lun, image: Path, size: int) -> None:
    writer = {6: t.write6, 10: t.write10, 16: t.write16}[size]
    reader = {6: t.read6, 10: t.read10, 16: t.read16}[size]
    payload = os.urandom(3 * 512)
    outcome, _ = run(lun, writer(100, 3), out=payload)
    assert outcome.status == Status.GOOD and outcome.resid == 0
    assert image.read_bytes()[100 * 512:103 * 512] == payload
    assert good(lun, reader(100, 3), into=3 * 512) == payload
    # A larger buffer than the transfer: the rest is residual.
    outcome, data = run(lun, reader(100, 1), into=2048)
    assert data == payload[:512] and outcome.data_in == 512 and outcome.resid == 1536


def test_read12_write12_and_fua(lun: Lun, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = lun.image.writev
    def writev(buffers: list[memoryview], offset: int, *, dsync: bool = False) -> None:
        calls.append(dsync)
        real(buffers, offset)

    monkeypatch.setattr(lun.image, "writev", writev)
    good(lun, t.cdb(0xAA, 0x08, t.be(5, 4), t.be(1, 4), 0, 0), out=b"\x5a" * 512)
    assert calls == [True]  # FUA: durable before completion
    assert good(lun, t.cdb(0xA8, 0, t.be(5, 4), t.be(1, 4), 0, 0), into=512) == b"\x5a" * 512


def test_six_byte_zero_length_means_256_blocks(lun: Lun) -> None:
    data = good(lun, t.read6(0, 0), into=256 * 512)
    assert len(data) == 256 * 512
    with pytest.raises(Overrun):
        run(lun, t.read6(0, 0), into=255 * 512)


def test_zero_length_transfer_is_good(lun: Lun) -> None:
    assert good(lun, t.read10(5, 0)) == b""
    assert good(lun, t.write16(5, 0)) == b""


def test_lba_out_of_range(lun: Lun) -> None:
    check(lun, t.read10(BLOCKS, 1), ILLEGAL, 0x21, into=512)
    check(lun, t.read16(BLOCKS - 1, 2), ILLEGAL, 0x21, into=1024)
    check(lun, t.write10(BLOCKS - 1, 2), ILLEGAL, 0x21, out=bytes(1024))
    check(lun, t.read16(2**64 - 1, 1), ILLEGAL, 0x21, into=512)  # wraps if added naively
    check(lun, t.write6(0x1FFFFF, 1), ILLEGAL, 0x21, out=bytes(512))


def test_protect_fields_are_invalid(lun: Lun) -> None:
    check(lun, t.read10(0, 1, flags=0x20), ILLEGAL, 0x24, into=512)
    check(lun, t.write16(0, 1, flags=0xE0), ILLEGAL, 0x24, out=bytes(512))


def test_writes_to_read_only_lun(ro_lun: Lun) -> None:
    check(ro_lun, t.write10(0, 1), DATA_PROTECT, 0x27, out=bytes(512))
    check(ro_lun, t.unmap(24), DATA_PROTECT, 0x27, out=t.unmap_params((0, 8)))
    check(ro_lun, t.write_same16(0, 8, unmap=True, ndob=True), DATA_PROTECT, 0x27)
    assert len(good(ro_lun, t.read10(0, 1), into=512)) == 512


def test_buffers_that_do_not_fit_are_overrun(lun: Lun) -> None:
    for cdb, out, into in [
        (t.read10(0, 2), b"", 512),  # data-in smaller than the transfer
        (t.write10(0, 2), bytes(512), 0),  # data-out smaller
        (t.read10(0, 1), bytes(512), 512),  # data-out on a read
        (t.write10(0, 1), bytes(512), 512),  # data-in on a write
        (t.inquiry(36), bytes(16), 36),  # data-out on a data-in command
        (t.unmap(24), b"", 0),  # UNMAP without its parameter list
    ]:
        with pytest.raises(Overrun):
            run(lun, cdb, out=out, into=into)


def test_media_errors_become_sense(lun: Lun, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object, **__: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(lun.image, "readv", fail)
    monkeypatch.setattr(lun.image, "writev", fail)
    check(lun, t.read10(0, 1), 0x3, 0x11, into=512)
    check(lun, t.write10(0, 1), 0x3, 0x0C, out=bytes(512))


# --- UNMAP / WRITE SAME -------------------------------------------------------------------

def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_unmap_punches_holes(lun: Lun, image: Path) -> None:
    before = allocated(image)
    good(lun, t.unmap(24), out=t.unmap_params((0, 1024)))
    assert allocated(image) <= before - 1024 * 512 + 4096
    assert good(lun, t.read10(0, 8), into=4096) == bytes(4096)
    assert image.stat().st_size == BLOCKS * 512  # KEEP_SIZE
    good(lun, t.unmap(0))  # an empty parameter list: nothing to do


def test_unmap_bad_input(lun: Lun, image: Path) -> None:
    before = image.read_bytes()
    check(lun, t.unmap(40), ILLEGAL, 0x21, out=t.unmap_params((8, 1), (BLOCKS - 1, 2)))
    assert image.read_bytes() == before  # checked before anything was unmapped
    check(lun, t.unmap(24, anchor=True), ILLEGAL, 0x24, out=t.unmap_params((0, 1)))
    check(lun, t.unmap(6), ILLEGAL, 0x1A, out=bytes(6))
    many = t.unmap_params(*[(i, 1) for i in range(MAX_UNMAP_DESCRIPTORS + 1)])
    check(lun, t.unmap(len(many)), ILLEGAL, 0x26, out=many)
    bad_len = bytearray(t.unmap_params((0, 1)))
    bad_len[2:4] = (15).to_bytes(2, "big")  # not a whole descriptor
    sense = check(lun, t.unmap(24), ILLEGAL, 0x26, out=bytes(bad_len))
    assert sense[15] == 0x80  # SKSV, C/D=0: the parameter list is at fault


def test_write_same16(lun: Lun, image: Path) -> None:
    pattern = bytes(range(256)) * 2
    good(lun, t.write_same16(10, 4), out=bytes(reversed(pattern)))
    assert image.read_bytes()[10 * 512:14 * 512] == bytes(reversed(pattern)) * 4
    before = allocated(image)
    good(lun, t.write_same16(512, 512, unmap=True), out=bytes(512))
    assert allocated(image) <= before - 512 * 512 + 4096
    good(lun, t.write_same16(0, 8, ndob=True))
    good(lun, t.write_same16(20, 8), out=bytes(512))  # zeroes without UNMAP
    assert image.read_bytes()[:8 * 512] == bytes(4096)
    assert image.read_bytes()[20 * 512:28 * 512] == bytes(4096)
    check(lun, t.write_same16(0, 0, ndob=True), ILLEGAL, 0x24)  # WSNZ
    check(lun, t.write_same16(BLOCKS - 1, 2, ndob=True), ILLEGAL, 0x21)
    check(lun, t.write_same16(0, 1, flags=0x10, ndob=True), ILLEGAL, 0x24)  # ANCHOR
    with pytest.raises(Overrun):
        run(lun, t.write_same16(0, 1), out=bytes(100))
