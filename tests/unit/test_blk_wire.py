"""virtio-blk wire formats: sizes and offsets as VIRTIO 1.2 §5.2 lays them out."""

from __future__ import annotations

import struct

import pytest

from vvu_runtime.virtio.blk import (
    CONFIG,
    CONFIG_WRITEBACK_OFFSET,
    REQUEST_HEADER,
    BlkConfig,
    BlkRequestHeader,
    BlkSegment,
    Feature,
    RequestType,
)


def test_header_round_trip() -> None:
    hdr = BlkRequestHeader(RequestType.OUT, 0, 0x1234_5678_9A)
    raw = hdr.pack()
    assert len(raw) == REQUEST_HEADER.size == 16
    assert raw == struct.pack("<IIQ", 1, 0, 0x1234_5678_9A)
    assert BlkRequestHeader.unpack(raw) == hdr


def test_header_too_short() -> None:
    with pytest.raises(ValueError, match="needs 16 bytes"):
        BlkRequestHeader.unpack(b"\0" * 15)


def test_segments() -> None:
    raw = BlkSegment(8, 16, 1).pack() + BlkSegment(100, 1).pack()
    segs = BlkSegment.unpack_all(raw)
    assert segs == [BlkSegment(8, 16, 1), BlkSegment(100, 1, 0)]
    assert segs[0].unmap and not segs[1].unmap
    with pytest.raises(ValueError, match="not a multiple"):
        BlkSegment.unpack_all(raw[:-1])


def test_config_offsets() -> None:
    cfg = BlkConfig(capacity=0x1122334455, size_max=1 << 20, seg_max=126, blk_size=4096,
                    physical_block_exp=3, min_io_size=1, opt_io_size=8, writeback=1,
                    num_queues=4, max_discard_sectors=65536, max_discard_seg=32,
                    discard_sector_alignment=8, max_write_zeroes_sectors=65535,
                    max_write_zeroes_seg=2, write_zeroes_may_unmap=1)
    raw = cfg.pack()
    assert len(raw) == CONFIG.size == 72

    def u(fmt: str, off: int) -> int:
        value: int = struct.unpack_from("<" + fmt, raw, off)[0]
        return value

    assert u("Q", 0) == 0x1122334455
    assert u("I", 8) == 1 << 20
    assert u("I", 12) == 126
    assert u("I", 20) == 4096
    assert u("B", 24) == 3
    assert u("H", 26) == 1
    assert u("I", 28) == 8
    assert u("B", CONFIG_WRITEBACK_OFFSET) == 1
    assert u("H", 34) == 4
    assert u("I", 36) == 65536
    assert u("I", 40) == 32
    assert u("I", 44) == 8
    assert u("I", 48) == 65535
    assert u("I", 52) == 2
    assert u("B", 56) == 1
    assert BlkConfig.unpack(raw) == cfg
    # A driver that knows only the first 60 bytes still parses.
    assert BlkConfig.unpack(raw[:60]) == cfg


def test_feature_masks() -> None:
    assert Feature.RO.mask == 1 << 5
    assert Feature.FLUSH.mask == 1 << 9
    assert Feature.MQ.mask == 1 << 12
    assert Feature.DISCARD.mask == 1 << 13
    assert Feature.WRITE_ZEROES.mask == 1 << 14
