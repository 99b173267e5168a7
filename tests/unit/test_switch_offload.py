"""Software offloads: checksum arithmetic, checksum completion, TSO/UFO/USO in software.

Segments are verified the way a receiver would: every checksum recomputed, the
payload reassembled and compared with what was sent.
"""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.net_frames import (
    ether,
    ipv4_header_ok,
    l4_checksum_ok,
    mac,
    tcp4_frame,
    tcp6_frame,
    udp4_frame,
    udp6_frame,
    with_full_csum,
    with_partial_csum,
)
from vvu_runtime.backends.switch.offload import (
    OffloadError,
    checksum_finish,
    checksum_fold,
    checksum_sum,
    complete_checksum,
    parse_layout,
    software_offload,
)
from vvu_runtime.virtio.net import GSO_ECN, GsoType, HdrFlags


def reference_sum(data: bytes) -> int:
    """RFC 1071, word by word."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    ours = checksum_fold(checksum_sum(data))
    ref = reference_sum(data)
    # 0 and 0xFFFF are the same number in ones' complement.
    assert ours == ref or {ours, ref} == {0, 0xFFFF}
    assert checksum_finish(checksum_sum(data)) != 0  # never sent as 0


def test_checksum_known_value() -> None:
    # RFC 1071 example words: 0001 f203 f4f5 f6f7 -> sum ddf2
    assert checksum_fold(checksum_sum(bytes.fromhex("0001f203f4f5f6f7"))) == 0xDDF2


def test_complete_checksum_from_partial() -> None:
    frame = tcp4_frame(mac(2), mac(1), os.urandom(999))
    partial, start, off = with_partial_csum(frame)
    buf = bytearray(partial)
    complete_checksum(buf, start, off)
    assert l4_checksum_ok(buf)
    assert bytes(buf) == with_full_csum(frame)


def test_complete_checksum_out_of_bounds() -> None:
    buf = bytearray(60)
    with pytest.raises(OffloadError):
        complete_checksum(buf, 50, 16)
    with pytest.raises(OffloadError):
        complete_checksum(buf, 0, 16)


def test_csum_only_offload() -> None:
    frame, start, off = with_partial_csum(udp4_frame(mac(2), mac(1), b"hello world"))
    [out] = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, 0, 0, start, off,
                             partial_ok=False)
    assert out.flags == 0 and l4_checksum_ok(out.data)
    [kept] = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, 0, 0, start, off,
                              partial_ok=True)
    assert kept.flags == HdrFlags.NEEDS_CSUM and bytes(kept.data) == frame
    assert (kept.csum_start, kept.csum_offset) == (start, off)


def _tcp_segments_ok(orig: bytes, segs: list[bytearray], mss: int, ipv6: bool) -> None:
    lay = parse_layout(orig)
    thl = (orig[lay.l4 + 12] >> 4) * 4
    payload = orig[lay.l4 + thl:]
    seq0 = struct.unpack_from("!I", orig, lay.l4 + 4)[0]
    ident0 = struct.unpack_from("!H", orig, 18)[0]
    assert len(segs) == max(1, -(-len(payload) // mss))
    got = b""
    for i, seg in enumerate(segs):
        assert l4_checksum_ok(seg), f"segment {i}: bad TCP checksum"
        body = seg[lay.l4 + thl:]
        assert len(body) <= mss
        assert struct.unpack_from("!I", seg, lay.l4 + 4)[0] == (seq0 + len(got)) & 0xFFFFFFFF
        if ipv6:
            assert struct.unpack_from("!H", seg, 18)[0] == len(seg) - 54
        else:
            assert ipv4_header_ok(seg)
            assert struct.unpack_from("!H", seg, 16)[0] == len(seg) - 14
            assert struct.unpack_from("!H", seg, 18)[0] == (ident0 + i) & 0xFFFF
        assert seg[:lay.l3] == orig[:lay.l3]
        got += body
    assert got == payload


@pytest.mark.parametrize("ipv6", [False, True])
@pytest.mark.parametrize("size", [1, 1448, 1449, 10000, 65000])
def test_tso_software_segmentation(ipv6: bool, size: int) -> None:
    payload = os.urandom(size)
    build = tcp6_frame if ipv6 else tcp4_frame
    frame, start, off = with_partial_csum(build(mac(2), mac(1), payload, seq=0xFFFFF000))
    gso = GsoType.TCPV6 if ipv6 else GsoType.TCPV4
    segs = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, gso, 1448, start, off,
                            partial_ok=False)
    assert all(s.flags == 0 for s in segs)
    _tcp_segments_ok(frame, [s.data for s in segs], 1448, ipv6)


def test_tso_partial_checksums_complete_to_valid() -> None:
    frame, start, off = with_partial_csum(tcp4_frame(mac(2), mac(1), os.urandom(5000)))
    segs = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 1000,
                            start, off, partial_ok=True)
    assert len(segs) == 5
    for s in segs:
        assert s.flags == HdrFlags.NEEDS_CSUM and (s.csum_start, s.csum_offset) == (34, 16)
        complete_checksum(s.data, s.csum_start, s.csum_offset)
    _tcp_segments_ok(frame, [s.data for s in segs], 1000, False)


def test_tso_flags_fin_psh_last_cwr_first() -> None:
    flags = 0x80 | 0x08 | 0x01 | 0x10  # CWR PSH FIN ACK
    frame, start, off = with_partial_csum(tcp4_frame(mac(2), mac(1), bytes(3000), flags=flags))
    segs = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.TCPV4 | GSO_ECN,
                            1000, start, off, partial_ok=False)
    got = [s.data[34 + 13] for s in segs]
    assert got == [0x80 | 0x10, 0x10, 0x08 | 0x01 | 0x10]


def test_tso_with_vlan_tag() -> None:
    inner = tcp4_frame(mac(2), mac(1), os.urandom(4000))
    tagged = inner[:12] + b"\x81\x00\x00\x05" + inner[12:]
    frame, start, off = with_partial_csum(tagged)
    assert start == 38
    segs = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 1400,
                            start, off, partial_ok=False)
    assert len(segs) == 3
    for s in segs:
        assert l4_checksum_ok(s.data) and ipv4_header_ok(s.data, 18)
        assert s.data[12:16] == b"\x81\x00\x00\x05"


def test_uso_segments_are_datagrams() -> None:
    payload = os.urandom(3500)
    frame, start, off = with_partial_csum(udp4_frame(mac(2), mac(1), payload))
    segs = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.UDP_L4, 1200,
                            start, off, partial_ok=False)
    assert [len(s.data) - 42 for s in segs] == [1200, 1200, 1100]
    got = b""
    for s in segs:
        assert l4_checksum_ok(s.data) and ipv4_header_ok(s.data)
        assert struct.unpack_from("!H", s.data, 38)[0] == len(s.data) - 34
        got += s.data[42:]
    assert got == payload


def test_uso_ipv6() -> None:
    payload = os.urandom(2500)
    frame, start, off = with_partial_csum(udp6_frame(mac(2), mac(1), payload))
    segs = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.UDP_L4, 1000,
                            start, off, partial_ok=False)
    assert len(segs) == 3 and all(l4_checksum_ok(s.data) for s in segs)
    assert b"".join(s.data[62:] for s in segs) == payload


def test_ufo_ipv4_fragments_reassemble() -> None:
    payload = os.urandom(4000)
    frame, start, off = with_partial_csum(udp4_frame(mac(2), mac(1), payload))
    frags = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.UDP, 1480,
                             start, off, partial_ok=False)
    body = b""
    for i, f in enumerate(frags):
        assert ipv4_header_ok(f.data)
        fo = struct.unpack_from("!H", f.data, 20)[0]
        assert fo & 0x1FFF == len(body) // 8
        assert bool(fo & 0x2000) == (i != len(frags) - 1)
        body += f.data[34:]
    # Reassembled datagram: UDP header + payload with a valid checksum.
    whole = frame[:34] + body
    assert body[8:] == payload and l4_checksum_ok(whole)


def test_ufo_ipv6_fragment_headers() -> None:
    payload = os.urandom(3000)
    frame, start, off = with_partial_csum(udp6_frame(mac(2), mac(1), payload))
    frags = software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, GsoType.UDP, 1232,
                             start, off, partial_ok=False)
    body = b""
    idents = set()
    for f in frags:
        assert f.data[20] == 44  # next header: fragment
        nxt, _, offm, ident = struct.unpack_from("!BBHI", f.data, 54)
        assert nxt == 17 and offm & ~7 == len(body)
        idents.add(ident)
        assert struct.unpack_from("!H", f.data, 18)[0] == len(f.data) - 54
        body += f.data[62:]
    assert len(idents) == 1
    assert l4_checksum_ok(frame[:54] + body)


@pytest.mark.parametrize(("frame", "gso"), [
    (ether(mac(2), mac(1), 0x0806, bytes(28)), GsoType.TCPV4),  # ARP
    (udp4_frame(mac(2), mac(1), bytes(100)), GsoType.TCPV4),  # UDP claimed TCP
    (tcp4_frame(mac(2), mac(1), bytes(100)), GsoType.TCPV6),  # v4 claimed v6
    (tcp4_frame(mac(2), mac(1), bytes(100))[:30], GsoType.TCPV4),  # truncated
    (tcp4_frame(mac(2), mac(1), bytes(100)), 2),  # unknown type
])
def test_bad_gso_frames_are_refused(frame: bytes, gso: int) -> None:
    with pytest.raises(OffloadError):
        software_offload(memoryview(frame), HdrFlags.NEEDS_CSUM, gso, 1000, 34, 16,
                         partial_ok=False)


@pytest.mark.parametrize("gso_size", [0, 1, 63])
def test_tiny_gso_size_refused(gso_size: int) -> None:
    frame = tcp4_frame(mac(2), mac(1), bytes(3000))
    with pytest.raises(OffloadError):
        software_offload(memoryview(frame), 1, GsoType.TCPV4, gso_size, 34, 16, partial_ok=False)


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=200), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 7]),
       st.integers(0, 2000), st.integers(0, 300), st.integers(0, 300), st.booleans(),
       st.integers(0, 3))
def test_hostile_frames_only_raise_offload_error(tail: bytes, gso: int, gso_size: int,
                                                 start: int, off: int, partial: bool,
                                                 kind: int) -> None:
    base = [tcp4_frame, tcp6_frame, udp4_frame, udp6_frame][kind](mac(2), mac(1), b"")
    # Keep a plausible prefix, fuzz the rest (headers included).
    frame = base[:14] + tail
    with contextlib.suppress(OffloadError):
        software_offload(memoryview(frame), 1, gso, gso_size, start, off, partial_ok=partial)
