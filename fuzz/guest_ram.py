"""A hostile driver's guest RAM: ring layouts written from a fuzz input.

The RAM is 64 KiB that a front-end describes as two regions: A (guest-physical
0, user address ``UVA``) and B (guest-physical ``REGION_B``, user address
``UVA + REGION_B``), backed by the two halves of one memfd. Rings live in A at
fixed offsets; buffers point mostly into A's data area, sometimes into B, into
the indirect table, or anywhere. Virtio-blk request headers are laid out in the
data area so that a blk device sees plausible requests.
"""

from __future__ import annotations

import struct

from fuzz.source import ByteSource
from vvu_runtime.virtio.features import DescFlag

#: Front-end user address of region A (region B follows at +REGION_B).
UVA = 0x7F00_0000_0000
REGION_SIZE = 0x8000
RAM_SIZE = 2 * REGION_SIZE
REGION_B = 0x10_0000
DESC_AT, AVAIL_AT, USED_AT, INDIRECT_AT, DATA_AT = 0x0, 0x1000, 0x1800, 0x2800, 0x3000
#: Where the virtio-blk request headers sit (one per 256 bytes).
BLK_HEADERS_AT = DATA_AT
BLK_HEADERS = 8
SPLIT_SIZES = (16, 1, 2, 4, 8, 32, 64, 128, 256)
_DESC = struct.Struct("<QIHH")
_BLK_HEADER = struct.Struct("<IIQ")
_FLAG_SETS = (0, int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.NEXT | DescFlag.WRITE),
              int(DescFlag.INDIRECT), int(DescFlag.INDIRECT | DescFlag.NEXT),
              int(DescFlag.INDIRECT | DescFlag.WRITE), 7)
_AVAIL, _USED = int(DescFlag.AVAIL), int(DescFlag.USED)
#: virtio-blk request types: IN, OUT, FLUSH, GET_ID, GET_LIFETIME, DISCARD, WRITE_ZEROES
_BLK_TYPES = (0, 1, 4, 8, 10, 11, 13)
_ZERO = bytes(RAM_SIZE)


def _gpa(src: ByteSource) -> int:
    mode = src.below(16)
    if mode < 6:
        return BLK_HEADERS_AT + 256 * src.below(BLK_HEADERS)
    if mode < 11:
        return DATA_AT + src.below(REGION_SIZE - DATA_AT)
    if mode < 13:
        return REGION_B + src.below(REGION_SIZE)
    if mode < 15:
        return INDIRECT_AT + 16 * src.below(64)
    return src.uint(8)


def _desc(src: ByteSource, size: int, packed: bool, slot: int) -> bytes:
    addr = _gpa(src)
    length = src.pick((16, 1, 64, 512, 4096, 0, src.below(REGION_SIZE), src.uint(4)))
    flags = src.pick(_FLAG_SETS)
    if flags & int(DescFlag.INDIRECT):
        length = 16 * src.pick((1, 2, 4, 8, 0, 3, 128)) if src.usually(85) else length
        addr = INDIRECT_AT if src.usually(80) else addr
    if packed:
        # Mostly "available in the first wrap" (avail wrap counter starts at 1).
        flags |= _AVAIL if src.usually(90) else src.pick((0, _AVAIL, _USED, _AVAIL | _USED))
        return _DESC.pack(addr, length, src.below(size + 1), flags)
    nxt = (slot + 1) % size if src.usually(80) else src.below(size + 1)
    return _DESC.pack(addr, length, flags, nxt)


def _blk_chains(view: memoryview, src: ByteSource, size: int, packed: bool) -> int:
    """Well-formed virtio-blk chains (header, data, status); returns avail entries."""
    _NEXT, _WRITE = int(DescFlag.NEXT), int(DescFlag.WRITE)
    chains = min(size // 3, 1 + src.below(5))
    for k in range(chains):
        kind = view[BLK_HEADERS_AT + 256 * k]
        data_flags = _WRITE if kind in (0, 8, 10) else 0
        parts = ((BLK_HEADERS_AT + 256 * k, 16, _NEXT),
                 (DATA_AT + 0x1000 + 0x400 * k, src.pick((512, 1024, 20, 16, 1)),
                  _NEXT | data_flags),
                 (BLK_HEADERS_AT + 256 * k + 16 + src.below(8), 1, _WRITE))
        for j, (addr, length, flags) in enumerate(parts):
            slot = 3 * k + j
            if packed:
                flags |= _AVAIL
                _DESC.pack_into(view, DESC_AT + 16 * slot, addr, length, k, flags)
            else:
                _DESC.pack_into(view, DESC_AT + 16 * slot, addr, length, flags, slot + 1)
        if not packed:
            struct.pack_into("<H", view, AVAIL_AT + 4 + 2 * k, 3 * k)
    if not packed:
        struct.pack_into("<HH", view, AVAIL_AT, 0, chains)
    return chains


def write_ring(view: memoryview, src: ByteSource, size: int, packed: bool) -> None:
    """Zero the RAM, then lay out one ring of ``size`` (<= 256) as the input says."""
    view[:] = _ZERO
    for i in range(BLK_HEADERS):
        _BLK_HEADER.pack_into(view, BLK_HEADERS_AT + 256 * i, src.pick(_BLK_TYPES),
                              0, src.pick((0, 1, 7, 2047, src.uint(8))))
    if size >= 3 and src.usually(50):
        _blk_chains(view, src, size, packed)
        return
    n = min(size, 1 + src.below(16))
    for i in range(n):
        slot = src.below(size) if src.chance(30) else i
        view[DESC_AT + 16 * slot:DESC_AT + 16 * slot + 16] = _desc(src, size, packed, slot)
    for i in range(src.below(9)):  # an indirect table
        view[INDIRECT_AT + 16 * i:INDIRECT_AT + 16 * i + 16] = _desc(src, 8, False, i)
    if packed:  # event suppression: off_wrap (wrap bit 15), flags ENABLE/DISABLE/DESC
        struct.pack_into("<HH", view, AVAIL_AT, src.below(size) | src.below(2) << 15,
                         src.below(4))
        struct.pack_into("<HH", view, USED_AT, src.uint(2), src.below(4))
        return
    avail_idx = src.edge_int(16, n)
    struct.pack_into("<HH", view, AVAIL_AT, src.below(2), avail_idx)
    for i in range(min(size, n + 2)):
        struct.pack_into("<H", view, AVAIL_AT + 4 + 2 * i,
                         i if src.usually(70) else src.edge_int(16, src.below(size)))
    struct.pack_into("<H", view, AVAIL_AT + 4 + 2 * size, src.uint(2))  # used_event
    struct.pack_into("<HH", view, USED_AT, src.below(2), src.edge_int(16, 0))


#: The VVU rxq's buffers: one page each, device-writable.
RX_BUFFERS = 5


def write_rx_ring(view: memoryview, src: ByteSource, size: int = 16) -> None:
    """Zero the RAM, then lay out a split ring in region A offering ``RX_BUFFERS``
    page-sized writable buffers (a VVU rxq waiting for messages)."""
    view[:] = _ZERO
    for k in range(RX_BUFFERS):
        length = 4096 if src.usually(95) else src.pick((0, 12, 100))
        _DESC.pack_into(view, DESC_AT + 16 * k, DATA_AT + 0x1000 * k, length,
                        int(DescFlag.WRITE), 0)
    repost_rx(view, size)


def repost_rx(view: memoryview, size: int = 16) -> None:
    """Make every rx buffer available again (after the device used them)."""
    (idx,) = struct.unpack_from("<H", view, AVAIL_AT + 2)
    for k in range(RX_BUFFERS):
        struct.pack_into("<H", view, AVAIL_AT + 4 + 2 * ((idx + k) % size), k)
    struct.pack_into("<H", view, AVAIL_AT + 2, (idx + RX_BUFFERS) & 0xFFFF)


#: Where the VVU txq's buffers (vhost-user messages from the appliance) sit.
TX_MESSAGES_AT = REGION_SIZE + 0x4000


def write_tx_ring(view: memoryview, src: ByteSource, size: int) -> None:
    """Add up to 4 buffers holding vhost-user messages (mostly well framed) to the
    split ring at ``REGION_SIZE`` (a VVU txq: the appliance's replies and back-end
    requests), after those already there."""
    base = REGION_SIZE
    (idx,) = struct.unpack_from("<H", view, base + AVAIL_AT + 2)
    count = min(size, src.below(5))
    for k in range(count):
        slot = (idx + k) % size
        at = TX_MESSAGES_AT + 0x100 * (slot % 16)
        payload = src.take(src.pick((8, 0, 12, 16, 40, 200)))
        request = src.pick((1, 15, 17, 24, 40, 11, 2, 4)) if src.usually(90) else src.uint(4)
        flags = 0x5 if src.usually(80) else src.uint(4)  # version 1 | REPLY
        size_field = len(payload) if src.usually(90) else src.uint(4)
        message = struct.pack("<III", request, flags, size_field) + payload
        view[at:at + len(message)] = message
        length = len(message) if src.usually(90) else src.pick((0, 4, 12, 0x1000))
        _DESC.pack_into(view, base + DESC_AT + 16 * slot, at, length,
                        0 if src.usually(90) else src.pick(_FLAG_SETS), 0)
        struct.pack_into("<H", view, base + AVAIL_AT + 4 + 2 * slot, slot)
    struct.pack_into("<H", view, base + AVAIL_AT + 2, (idx + count) & 0xFFFF)


def scribble(view: memoryview, src: ByteSource) -> None:
    """The driver rewriting ring memory while the device walks it."""
    at = src.pick((DESC_AT, AVAIL_AT, USED_AT, INDIRECT_AT, BLK_HEADERS_AT)) + src.below(0x800)
    chunk = src.take(src.pick((2, 4, 8, 16)))
    view[at:at + len(chunk)] = chunk


def ring_size(src: ByteSource, packed: bool) -> int:
    size = src.pick(SPLIT_SIZES) if not packed or src.chance(50) else 1 + src.below(256)
    return src.edge_int(16, size)
