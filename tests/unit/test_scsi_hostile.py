"""Hostile commands (hypothesis): whatever CDB, LUN field and buffers a driver sends,
ScsiDevice.serve answers with a well-formed response (or, for a chain with no room
for the headers, raises BadChain, which fails the ring); nothing else escapes, and
CHECK CONDITION always carries fixed-format sense with a sense key we use."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import scsi_target as t
from vvu_runtime.backends.scsi.cdb import Opcode
from vvu_runtime.backends.scsi.device import BadChain, ScsiDevice
from vvu_runtime.backends.scsi.lun import Lun, LunSpec
from vvu_runtime.backends.scsi.sense import SenseKey, Status
from vvu_runtime.virtio.queue import DescriptorChain
from vvu_runtime.virtio.scsi import CMD_REQ, CMD_RESP, CmdReq, Response, encode_lun

BLOCKS = 64
KNOWN_OPCODES = [int(op) for op in Opcode] + [0x9E, 0xA3, 0x41, 0x89]
SENSE_KEYS = {int(k) for k in SenseKey}


@pytest.fixture(scope="module")
def device() -> Iterator[ScsiDevice]:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "lun.raw"
        image.write_bytes(bytes(BLOCKS * 512))
        ro = Path(tmp) / "ro.raw"
        ro.write_bytes(bytes(BLOCKS * 512))
        dev = ScsiDevice([Lun(LunSpec(0, str(image))),
                          Lun(LunSpec(1, str(ro), read_only=True))])
        dev.set_features(dev.features())
        yield dev
        dev.close()


def small_int(nbytes: int) -> st.SearchStrategy[bytes]:
    """Big-endian fields biased to the edges: 0, small, around BLOCKS, all ones."""
    top = (1 << (8 * nbytes)) - 1
    return st.sampled_from([0, 1, 2, BLOCKS - 1, BLOCKS, BLOCKS + 1, 255, 256, top,
                            top - 1]).map(lambda v: (v & top).to_bytes(nbytes, "big"))


cdbs = st.one_of(
    st.binary(min_size=0, max_size=32),  # pure garbage
    st.tuples(st.sampled_from(KNOWN_OPCODES), st.integers(0, 255), small_int(8),
              small_int(4), st.binary(max_size=18)).map(
        lambda p: bytes((p[0], p[1])) + p[2] + p[3] + p[4]),
    st.tuples(st.sampled_from(KNOWN_OPCODES), st.integers(0, 255), small_int(4),
              st.integers(0, 255), small_int(2), st.binary(max_size=20)).map(
        lambda p: bytes((p[0], p[1])) + p[2] + bytes((p[3],)) + p[4] + p[5]),
)
lun_fields = st.one_of(
    st.sampled_from([encode_lun(0, 0), encode_lun(0, 1), encode_lun(0, 2), encode_lun(1, 0)]),
    st.binary(min_size=8, max_size=8),
)


def split(data: bytes, cuts: list[int]) -> list[memoryview]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [memoryview(bytearray(data[a:b])) for a, b in itertools.pairwise(points)
            if b > a]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cdb=cdbs, lun=lun_fields, out=st.binary(max_size=1100),
       into=st.sampled_from([0, 1, 7, 18, 36, 512, 1024, 4096, 33000]),
       rcuts=st.lists(st.integers(0, 2000), max_size=3),
       wcuts=st.lists(st.integers(0, 40000), max_size=3),
       short=st.sampled_from([0, 0, 0, 1, 60]))
def test_hostile_commands_get_a_well_formed_answer(
    device: ScsiDevice, cdb: bytes, lun: bytes, out: bytes, into: int, rcuts: list[int],
    wcuts: list[int], short: int,
) -> None:
    header = CmdReq(lun, 1, 0, 0, 0, cdb.ljust(32, b"\0")).pack()
    readable = split(header + out, rcuts)
    wlen = CMD_RESP.size + into
    if short:  # a chain without room for one of the headers
        readable = split((header + out)[:CMD_REQ.size - 1], rcuts) if short == 1 else readable
        wlen = wlen if short == 1 else CMD_RESP.size - 1
    writable = split(b"\xee" * wlen, wcuts)
    chain = DescriptorChain(head=0, readable=readable, writable=writable)
    if short:
        with pytest.raises(BadChain):
            device.serve(chain)
        return
    written = device.serve(chain)
    assert CMD_RESP.size <= written <= wlen
    resp = t.response_of(chain)
    assert resp.response in (Response.OK, Response.BAD_TARGET, Response.OVERRUN)
    assert resp.status in (Status.GOOD, Status.CHECK_CONDITION)
    if resp.response != Response.OK:
        assert resp.status == Status.GOOD and resp.sense_len == 0
        assert written == CMD_RESP.size
    elif resp.status == Status.CHECK_CONDITION:
        assert resp.sense_len == 18 and resp.sense[0] == 0x70
        assert resp.sense[2] in SENSE_KEYS and written == CMD_RESP.size
    else:
        assert resp.sense_len == 0
        data_in = written - CMD_RESP.size
        if out:  # data-out consumed (or ignored): the residual is what was not
            assert data_in == 0 and resp.resid <= len(out)
        else:
            assert data_in + resp.resid == into
