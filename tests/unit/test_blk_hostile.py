"""Hostile requests (hypothesis): whatever a driver puts in a chain, serve() either
completes it with a status byte or rejects the chain as bad; it never raises
anything else, never writes outside the writable buffers, never touches the
image beyond its end, and never reports more bytes than the chain can hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvu_runtime.backends.blk.device import BadChain, BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.virtio.blk import BlkRequestHeader, BlkSegment, RequestType, Status
from vvu_runtime.virtio.queue import DescriptorChain

SECTORS = 32
CANARY = 0xA5

types = st.sampled_from([t.value for t in RequestType] + [2, 3, 5, 0xFFFFFFFF, 0x80000000])
sectors = st.one_of(st.integers(0, SECTORS + 2), st.integers(0, (1 << 64) - 1))
sizes = st.lists(st.integers(0, 1200), max_size=5)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in pieces at the given cut points (pieces may be empty)."""
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


@st.composite
def chains(draw: st.DrawFn) -> tuple[DescriptorChain, list[bytearray]]:
    rtype = draw(types)
    header = BlkRequestHeader(rtype, draw(st.integers(0, 3)), draw(sectors)).pack()
    if draw(st.booleans()):
        header = header[:draw(st.integers(0, 16))]  # truncated header
    if rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES) and draw(st.booleans()):
        segs = draw(st.lists(st.tuples(sectors, st.integers(0, 1 << 32 - 1),
                                       st.integers(0, 3)), max_size=4))
        payload = b"".join(BlkSegment(s, n & 0xFFFFFFFF, f).pack() for s, n, f in segs)
    else:
        payload = bytes(draw(st.sampled_from([0, 7, 16, 512, 1024, 4096])))
    readable = split(header + payload, draw(st.lists(st.integers(0, 5000), max_size=3)))
    if draw(st.booleans()):
        readable = [r for r in readable if r]
    writable = [bytearray([CANARY]) * n for n in draw(sizes)]
    chain = DescriptorChain(head=0, readable=[memoryview(bytearray(r)) for r in readable],
                            writable=[memoryview(w) for w in writable])
    return chain, writable


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlkDevice]:
    path: Path = tmp_path_factory.mktemp("hostile") / "disk.raw"
    path.write_bytes(bytes(SECTORS * 512))
    with RawImage(str(path)) as image:
        dev = BlkDevice(image, serial="hostile")
        dev.set_features(dev.features())
        yield dev


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=chains())
def test_hostile_requests(device: BlkDevice, case: tuple[DescriptorChain, list[bytearray]]
                          ) -> None:
    chain, writable = case
    total = sum(len(w) for w in writable)
    try:
        written = device.serve(chain)
    except BadChain:
        assert total == 0 or sum(len(r) for r in chain.readable) < 16
        return
    assert 0 < written <= total
    status = writable_last_byte(writable)
    assert status in (Status.OK, Status.IOERR, Status.UNSUPP)
    assert device.image.size == SECTORS * 512  # nothing written past the end


def writable_last_byte(writable: list[bytearray]) -> int:
    return [w for w in writable if w][-1][-1]
