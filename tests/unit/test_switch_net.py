"""virtio-net wire formats: header codec, header size, config space, feature bits."""

from __future__ import annotations

import pytest

from vvu_runtime.virtio.net import (
    GSO_ECN,
    HDR_SIZE,
    LEGACY_HDR_SIZE,
    VIRTIO_F_VERSION_1,
    GsoType,
    HdrFlags,
    NetConfig,
    NetFeature,
    VirtioNetHdr,
    feature_mask,
    format_mac,
    header_size,
    is_tx_queue,
    parse_mac,
    rx_queue,
    tx_queue,
)


def test_header_round_trip_12() -> None:
    hdr = VirtioNetHdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4 | GSO_ECN, 54, 1448, 34, 16, 3)
    raw = hdr.pack()
    assert len(raw) == 12
    assert raw == bytes([1, 0x81, 54, 0, 0xA8, 0x05, 34, 0, 16, 0, 3, 0])
    back = VirtioNetHdr.unpack(raw)
    assert back == hdr
    assert back.gso == GsoType.TCPV4 and back.ecn and back.needs_csum


def test_header_round_trip_legacy() -> None:
    hdr = VirtioNetHdr(0, GsoType.UDP, 42, 1400, 0, 0, 0)
    raw = hdr.pack(LEGACY_HDR_SIZE)
    assert len(raw) == 10
    assert VirtioNetHdr.unpack(raw + b"junk", LEGACY_HDR_SIZE) == hdr


def test_header_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError):
        VirtioNetHdr.unpack(bytes(20), 20)
    with pytest.raises(ValueError):
        VirtioNetHdr().pack(11)


def test_header_pack_into() -> None:
    buf = bytearray(20)
    VirtioNetHdr(num_buffers=7).pack_into(buf, 4)
    assert buf[14] == 7


def test_header_size_by_features() -> None:
    assert header_size(0) == LEGACY_HDR_SIZE
    assert header_size(1 << VIRTIO_F_VERSION_1) == HDR_SIZE
    assert header_size(NetFeature.MRG_RXBUF.mask) == HDR_SIZE
    with pytest.raises(ValueError, match="HASH_REPORT"):
        header_size(NetFeature.HASH_REPORT.mask | 1 << VIRTIO_F_VERSION_1)


def test_feature_bits_match_the_spec() -> None:
    assert int(NetFeature.MRG_RXBUF) == 15
    assert int(NetFeature.MQ) == 22
    assert int(NetFeature.GUEST_USO4) == 54
    assert feature_mask(NetFeature.CSUM, NetFeature.GUEST_CSUM) == 3
    assert NetFeature.HOST_TSO4.mask == 1 << 11


def test_config_layout() -> None:
    cfg = NetConfig(mac=bytes.fromhex("525400123456"), max_virtqueue_pairs=4, mtu=9000)
    raw = cfg.pack()
    assert len(raw) == 24
    assert raw[:6] == bytes.fromhex("525400123456")
    assert raw[6:8] == b"\x01\x00"  # LINK_UP
    assert raw[8:10] == b"\x04\x00"
    assert raw[10:12] == (9000).to_bytes(2, "little")
    assert NetConfig.unpack(raw) == cfg
    assert cfg.read(6, 4) == raw[6:10]
    assert cfg.read(20, 10) == raw[20:24] + bytes(6)
    assert cfg.read(100, 4) == bytes(4)
    with pytest.raises(ValueError):
        NetConfig(mac=b"\x01")


def test_queue_numbering() -> None:
    assert [rx_queue(k) for k in range(3)] == [0, 2, 4]
    assert [tx_queue(k) for k in range(3)] == [1, 3, 5]
    assert is_tx_queue(3) and not is_tx_queue(4)


def test_mac_text() -> None:
    assert parse_mac("52:54:00:aB:cd:0e") == bytes.fromhex("525400abcd0e")
    assert format_mac(bytes.fromhex("525400abcd0e")) == "52:54:00:ab:cd:0e"
    for bad in ("52:54:00", "zz:00:00:00:00:00", "100:0:0:0:0:0"):
        with pytest.raises(ValueError):
            parse_mac(bad)
