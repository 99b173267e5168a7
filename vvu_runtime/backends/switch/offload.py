"""Software offloads: checksum completion and segmentation (TSO, UFO, USO).

A frame that arrives with NEEDS_CSUM or a GSO type may only be passed on as it
is to a receiver that negotiated the matching GUEST_* feature. Every other
receiver gets what a NIC would have put on the wire: the checksum completed,
and a large TCP segment cut into MSS-sized segments (UDP: IP fragments for UFO,
separate datagrams for USO), each with correct IP and L4 headers and checksums.

The rules follow Linux (``skb_checksum_help``, ``tcp_gso_segment``,
``inet_gso_segment``, ``udp4_ufo_fragment``), so that a receiver sees the
same frames it would from a real NIC: IPv4 IDs count up per segment, FIN and
PSH stay on the last segment only, CWR on the first only, a computed checksum
of 0 is sent as 0xFFFF.

Frames come from guests and are hostile until parsed: every length and offset
is checked, and anything that does not parse raises :class:`OffloadError`
(the caller drops the frame and counts it). This is a slow path, written for
clarity; the switch only takes it for receivers that lack an offload.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from vvu_runtime.virtio.net import ETH_HLEN, GSO_ECN, GsoType, HdrFlags

ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_FRAGMENT = 44
# IPv6 extension headers we walk over to find the transport header.
_IPV6_EXT_HEADERS = frozenset({0, 43, 60})

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

IPV4_MF = 0x2000

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

#: Largest frame we build or accept for software offload (64 KiB GSO + headers).
MAX_FRAME = 65535 + 256
#: Smallest segment size we cut to. A guest could ask for gso_size 1 and make one
#: 64 KiB frame cost the switch 65 000 segments; real stacks never go below TCP's
#: minimum MSS (88 in Linux), and 64 bounds the work at ~1000 segments a frame.
MIN_GSO_SIZE = 64

# IPv6 fragment identifications for UFO (virtio headers carry none; Linux picks
# its own the same way).
_ipv6_frag_ids = itertools.count(0x5656_0001)


class OffloadError(ValueError):
    """A frame whose headers do not allow the requested offload."""


def checksum_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Ones'-complement sum of ``data`` as big-endian 16-bit words, plus ``initial``.

    Not folded to 16 bits: the result is only meaningful modulo 0xFFFF, which
    :func:`checksum_finish` takes. Works on a big int because 2**16 ≡ 1 (mod
    0xFFFF), so the integer value of the bytes is congruent to the sum of its
    words; little-endian is faster to build and the sum is simply byte-swapped.
    """
    n = int.from_bytes(data, "little") % 0xFFFF
    return ((n & 0xFF) << 8 | n >> 8) + initial


def checksum_finish(total: int) -> int:
    """The checksum field for a sum from :func:`checksum_sum`: complemented, folded.

    Never 0: as Linux does (CSUM_MANGLED_0), a result of 0 is sent as 0xFFFF,
    which means the same for TCP and keeps UDP from reading it as "no checksum".
    """
    return ~(total % 0xFFFF) & 0xFFFF


def checksum_fold(total: int) -> int:
    """A partial sum folded to 16 bits, not complemented (the seed for NEEDS_CSUM)."""
    folded = total % 0xFFFF
    return folded if folded or not total else 0xFFFF


def complete_checksum(frame: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a NEEDS_CSUM frame in place: sum from ``csum_start`` to the end, store at
    ``csum_start + csum_offset``. The field already holds the pseudo-header seed."""
    where = csum_start + csum_offset
    if csum_start < ETH_HLEN or where + 2 > len(frame):
        raise OffloadError(
            f"checksum at {csum_start}+{csum_offset} is outside the {len(frame)}-byte frame"
        )
    _U16.pack_into(frame, where, checksum_finish(checksum_sum(frame[csum_start:])))


@dataclass(frozen=True, slots=True)
class L4Layout:
    """Where the network and transport headers of a frame sit."""

    l3: int  # offset of the IP header
    ipv6: bool
    l4: int  # offset of the TCP/UDP header
    proto: int  # IPPROTO_TCP or IPPROTO_UDP

    @property
    def l3_len(self) -> int:
        return self.l4 - self.l3


def parse_layout(frame: bytes | bytearray | memoryview) -> L4Layout:
    """Find the IP and TCP/UDP headers (up to two VLAN tags, IPv6 extension headers)."""
    size = len(frame)
    if size < ETH_HLEN:
        raise OffloadError(f"{size}-byte frame is shorter than an Ethernet header")
    off = 12
    ethertype = _U16.unpack_from(frame, off)[0]
    for _ in range(2):
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        off += 4
        if off + 2 > size:
            raise OffloadError("frame ends inside a VLAN tag")
        ethertype = _U16.unpack_from(frame, off)[0]
    l3 = off + 2
    if ethertype == ETH_P_IPV4:
        if l3 + 20 > size:
            raise OffloadError("frame ends inside the IPv4 header")
        ver_ihl = frame[l3]
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < 20 or l3 + ihl > size:
            raise OffloadError(f"bad IPv4 header (version/IHL byte {ver_ihl:#x})")
        if _U16.unpack_from(frame, l3 + 6)[0] & 0x3FFF:
            raise OffloadError("IPv4 fragment cannot be segmented")
        return L4Layout(l3, False, l3 + ihl, frame[l3 + 9])
    if ethertype == ETH_P_IPV6:
        if l3 + 40 > size:
            raise OffloadError("frame ends inside the IPv6 header")
        if frame[l3] >> 4 != 6:
            raise OffloadError("bad IPv6 version")
        nexthdr = frame[l3 + 6]
        off = l3 + 40
        while nexthdr in _IPV6_EXT_HEADERS:
            if off + 8 > size:
                raise OffloadError("frame ends inside an IPv6 extension header")
            nexthdr, extlen = frame[off], (frame[off + 1] + 1) * 8
            off += extlen
        if off > size:
            raise OffloadError("frame ends inside an IPv6 extension header")
        return L4Layout(l3, True, off, nexthdr)
    raise OffloadError(f"ethertype {ethertype:#06x} is neither IPv4 nor IPv6")


def _pseudo_sum(frame: bytes | bytearray | memoryview, lay: L4Layout, l4_len: int) -> int:
    """Sum of the TCP/UDP pseudo header (addresses, protocol, length)."""
    addrs = frame[lay.l3 + 8:lay.l3 + 40] if lay.ipv6 else frame[lay.l3 + 12:lay.l3 + 20]
    return checksum_sum(addrs, lay.proto + l4_len)


def _fix_ipv4(seg: bytearray, l3: int, ihl: int, total: int, ident: int,
              frag_off: int | None = None) -> None:
    _U16.pack_into(seg, l3 + 2, total)
    _U16.pack_into(seg, l3 + 4, ident & 0xFFFF)
    if frag_off is not None:
        _U16.pack_into(seg, l3 + 6, frag_off)
    _U16.pack_into(seg, l3 + 10, 0)
    _U16.pack_into(seg, l3 + 10, checksum_finish(checksum_sum(seg[l3:l3 + ihl])))


def _fix_ipv6(seg: bytearray, l3: int) -> None:
    _U16.pack_into(seg, l3 + 4, len(seg) - l3 - 40)


def _finish_l4(seg: bytearray, lay: L4Layout, csum_at: int, partial: bool) -> SoftFrame:
    """Store the L4 checksum: complete, or the pseudo-header seed for NEEDS_CSUM."""
    l4_len = len(seg) - lay.l4
    _U16.pack_into(seg, lay.l4 + csum_at, 0)
    pseudo = _pseudo_sum(seg, lay, l4_len)
    if partial:
        _U16.pack_into(seg, lay.l4 + csum_at, checksum_fold(pseudo))
        return SoftFrame(seg, HdrFlags.NEEDS_CSUM, lay.l4, csum_at)
    _U16.pack_into(seg, lay.l4 + csum_at, checksum_finish(checksum_sum(seg[lay.l4:], pseudo)))
    return SoftFrame(seg, 0, 0, 0)


@dataclass(slots=True)
class SoftFrame:
    """One frame built in software, with the header fields the receiver needs."""

    data: bytearray
    flags: int = 0
    csum_start: int = 0
    csum_offset: int = 0


def _segment_tcp(frame: memoryview, lay: L4Layout, mss: int, partial: bool) -> list[SoftFrame]:
    thl = (frame[lay.l4 + 12] >> 4) * 4
    if thl < 20 or lay.l4 + thl > len(frame):
        raise OffloadError(f"bad TCP header length {thl}")
    hlen = lay.l4 + thl
    payload = len(frame) - hlen
    headers = bytes(frame[:hlen])
    seq = _U32.unpack_from(frame, lay.l4 + 4)[0]
    tcp_flags = frame[lay.l4 + 13]
    ihl = lay.l3_len
    ident = 0 if lay.ipv6 else _U16.unpack_from(frame, lay.l3 + 4)[0]
    out: list[SoftFrame] = []
    nseg = max(1, -(-payload // mss))
    for i in range(nseg):
        start = hlen + i * mss
        end = min(start + mss, len(frame))
        seg = bytearray(headers)
        seg += frame[start:end]
        flags = tcp_flags
        if i:
            flags &= ~TCP_CWR
        if i != nseg - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        seg[lay.l4 + 13] = flags
        _U32.pack_into(seg, lay.l4 + 4, (seq + i * mss) & 0xFFFFFFFF)
        if lay.ipv6:
            _fix_ipv6(seg, lay.l3)
        else:
            _fix_ipv4(seg, lay.l3, ihl, len(seg) - lay.l3, ident + i)
        out.append(_finish_l4(seg, lay, TCP_CSUM_OFFSET, partial))
    return out


def _segment_uso(frame: memoryview, lay: L4Layout, mss: int, partial: bool) -> list[SoftFrame]:
    """USO: one UDP payload becomes several datagrams of ``mss`` payload bytes."""
    hlen = lay.l4 + 8
    if hlen > len(frame):
        raise OffloadError("frame ends inside the UDP header")
    headers = bytes(frame[:hlen])
    payload = len(frame) - hlen
    ident = 0 if lay.ipv6 else _U16.unpack_from(frame, lay.l3 + 4)[0]
    out: list[SoftFrame] = []
    nseg = max(1, -(-payload // mss))
    for i in range(nseg):
        start = hlen + i * mss
        seg = bytearray(headers)
        seg += frame[start:min(start + mss, len(frame))]
        _U16.pack_into(seg, lay.l4 + 4, len(seg) - lay.l4)
        if lay.ipv6:
            _fix_ipv6(seg, lay.l3)
        else:
            _fix_ipv4(seg, lay.l3, lay.l3_len, len(seg) - lay.l3, ident + i)
        out.append(_finish_l4(seg, lay, UDP_CSUM_OFFSET, partial))
    return out


def _fragment_ufo(frame: memoryview, lay: L4Layout, mss: int, needs_csum: bool,
                  csum_start: int, csum_offset: int) -> list[SoftFrame]:
    """UFO: one UDP datagram becomes IP fragments of ``mss`` (rounded to 8) bytes."""
    if lay.l4 + 8 > len(frame):
        raise OffloadError("frame ends inside the UDP header")
    whole = bytearray(frame)
    _U16.pack_into(whole, lay.l4 + 4, len(whole) - lay.l4)
    if needs_csum:
        complete_checksum(whole, csum_start, csum_offset)
    step = mss & ~7
    if step < 8:
        raise OffloadError(f"UFO fragment size {mss} is smaller than 8")
    body = memoryview(whole)[lay.l4:]
    nfrag = max(1, -(-len(body) // step))
    out: list[SoftFrame] = []
    if lay.ipv6:
        if lay.l4 != lay.l3 + 40:
            raise OffloadError("UFO over IPv6 with extension headers is not supported")
        head = bytearray(whole[:lay.l3 + 40])
        head[lay.l3 + 6] = IPPROTO_FRAGMENT
        ident = next(_ipv6_frag_ids) & 0xFFFFFFFF
        for i in range(nfrag):
            more = 1 if i != nfrag - 1 else 0
            seg = bytearray(head)
            seg += struct.pack("!BBHI", IPPROTO_UDP, 0, (i * step) | more, ident)
            seg += body[i * step:(i + 1) * step]
            _fix_ipv6(seg, lay.l3)
            out.append(SoftFrame(seg))
        return out
    head4 = bytes(whole[:lay.l4])
    ident = _U16.unpack_from(whole, lay.l3 + 4)[0]
    for i in range(nfrag):
        frag_off = (i * step) >> 3
        if i != nfrag - 1:
            frag_off |= IPV4_MF
        seg = bytearray(head4)
        seg += body[i * step:(i + 1) * step]
        _fix_ipv4(seg, lay.l3, lay.l3_len, len(seg) - lay.l3, ident, frag_off)
        out.append(SoftFrame(seg))
    return out


def software_offload(frame: memoryview, flags: int, gso_type: int, gso_size: int,
                     csum_start: int, csum_offset: int, *, partial_ok: bool) -> list[SoftFrame]:
    """What a NIC would send for this frame: the checksum completed, GSO done.

    ``frame`` starts at the Ethernet header (no virtio-net header). With
    ``partial_ok`` (the receiver negotiated GUEST_CSUM) segments keep a partial
    checksum and NEEDS_CSUM, which saves summing every payload byte here.
    """
    gso = gso_type & ~GSO_ECN
    needs_csum = bool(flags & HdrFlags.NEEDS_CSUM)
    if len(frame) > MAX_FRAME:
        raise OffloadError(f"{len(frame)}-byte frame is larger than any GSO frame")
    if gso == GsoType.NONE:
        data = bytearray(frame)
        if needs_csum:
            if partial_ok:
                return [SoftFrame(data, HdrFlags.NEEDS_CSUM, csum_start, csum_offset)]
            complete_checksum(data, csum_start, csum_offset)
        return [SoftFrame(data)]
    if gso_size < MIN_GSO_SIZE:
        raise OffloadError(f"GSO type {gso_type:#x} with gso_size {gso_size} "
                           f"(smallest accepted: {MIN_GSO_SIZE})")
    lay = parse_layout(frame)
    if gso in (GsoType.TCPV4, GsoType.TCPV6):
        if lay.proto != IPPROTO_TCP or lay.ipv6 != (gso == GsoType.TCPV6):
            raise OffloadError(f"GSO type {gso_type:#x} on a frame that is not TCP over "
                               f"{'IPv6' if gso == GsoType.TCPV6 else 'IPv4'}")
        return _segment_tcp(frame, lay, gso_size, partial_ok)
    if lay.proto != IPPROTO_UDP:
        raise OffloadError(f"GSO type {gso_type:#x} on a frame that is not UDP")
    if gso == GsoType.UDP_L4:
        return _segment_uso(frame, lay, gso_size, partial_ok)
    if gso == GsoType.UDP:
        return _fragment_ufo(frame, lay, gso_size, needs_csum, csum_start, csum_offset)
    raise OffloadError(f"unknown GSO type {gso_type:#x}")
