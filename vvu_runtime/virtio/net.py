"""virtio-net wire formats: feature bits, the per-packet header, the config space.

Everything here follows VIRTIO 1.2 §5.1 (digested in the shared protocol
reference, B.12). The header is little-endian; with VERSION_1 or MRG_RXBUF it is
12 bytes (``num_buffers`` present), a legacy device without MRG_RXBUF uses 10.
HASH_REPORT would make it 20 bytes; nothing in vvu offers that feature, so
:func:`header_size` refuses it rather than mis-parse frames.

The packet path reads and writes headers in place in guest memory with the
``*_OFFSET`` constants (a dataclass per packet would cost an allocation per
frame); :class:`VirtioNetHdr` is for the slow paths, tests and tools.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag


class NetFeature(IntEnum):
    """virtio-net device feature bit *numbers* (``1 << bit`` is the mask)."""

    CSUM = 0  # device takes partially checksummed packets from the driver (TX)
    GUEST_CSUM = 1  # driver takes partially checksummed packets (RX)
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GSO = 6  # legacy "any GSO"
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    GUEST_RSC4 = 41
    GUEST_RSC6 = 42
    NOTF_COAL = 53
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56
    HASH_REPORT = 57
    GUEST_HDRLEN = 59
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63

    @property
    def mask(self) -> int:
        return 1 << self.value


# Device-independent bits the header size depends on (VIRTIO 1.2 §6).
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ANY_LAYOUT = 27


def feature_mask(*bits: int) -> int:
    """OR of ``1 << bit`` for each bit number."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def has_feature(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


class HdrFlags(IntFlag):
    """``virtio_net_hdr.flags``."""

    NONE = 0
    NEEDS_CSUM = 1  # checksum from csum_start to the end is to be completed
    DATA_VALID = 2  # RX only: the device checked the checksum
    RSC_INFO = 4  # RX only, with RSC_EXT


class GsoType(IntEnum):
    """``virtio_net_hdr.gso_type`` without the ECN bit."""

    NONE = 0
    TCPV4 = 1
    UDP = 3  # UFO: one UDP datagram to be cut into IP fragments
    TCPV6 = 4
    UDP_L4 = 5  # USO: one UDP payload to be cut into separate datagrams


GSO_ECN = 0x80  # OR-ed into gso_type: the TCP segment carries CWR (ECN)

# Byte offsets inside the header, for in-place access on the packet path.
FLAGS_OFFSET = 0
GSO_TYPE_OFFSET = 1
HDR_LEN_OFFSET = 2
GSO_SIZE_OFFSET = 4
CSUM_START_OFFSET = 6
CSUM_OFFSET_OFFSET = 8
NUM_BUFFERS_OFFSET = 10

HDR_SIZE = 12  # VERSION_1 or MRG_RXBUF
LEGACY_HDR_SIZE = 10  # legacy without MRG_RXBUF: no num_buffers

#: Smallest Ethernet header we forward (dst, src, ethertype).
ETH_HLEN = 14


def header_size(features: int) -> int:
    """Size of the per-packet header for negotiated ``features``."""
    if has_feature(features, NetFeature.HASH_REPORT):
        raise ValueError("HASH_REPORT (20-byte header) is not supported")
    if has_feature(features, VIRTIO_F_VERSION_1) or has_feature(features, NetFeature.MRG_RXBUF):
        return HDR_SIZE
    return LEGACY_HDR_SIZE


@dataclass(slots=True)
class VirtioNetHdr:
    """``struct virtio_net_hdr`` (with ``num_buffers``; packed to 10 bytes without it)."""

    flags: int = 0
    gso_type: int = GsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    STRUCT = struct.Struct("<BBHHHHH")
    LEGACY_STRUCT = struct.Struct("<BBHHHH")

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, size: int = HDR_SIZE) -> VirtioNetHdr:
        """Parse the first ``size`` (12 or 10) bytes of ``data``."""
        if size == HDR_SIZE:
            return cls(*cls.STRUCT.unpack_from(data))
        if size == LEGACY_HDR_SIZE:
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = \
                cls.LEGACY_STRUCT.unpack_from(data)
            return cls(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
        raise ValueError(f"virtio-net header size {size} is neither 12 nor 10")

    def pack(self, size: int = HDR_SIZE) -> bytes:
        if size == HDR_SIZE:
            return self.STRUCT.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                                    self.csum_start, self.csum_offset, self.num_buffers)
        if size == LEGACY_HDR_SIZE:
            return self.LEGACY_STRUCT.pack(self.flags, self.gso_type, self.hdr_len,
                                           self.gso_size, self.csum_start, self.csum_offset)
        raise ValueError(f"virtio-net header size {size} is neither 12 nor 10")

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0,
                  size: int = HDR_SIZE) -> None:
        buf[offset:offset + size] = self.pack(size)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~GSO_ECN

    @property
    def ecn(self) -> bool:
        return bool(self.gso_type & GSO_ECN)

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & HdrFlags.NEEDS_CSUM)


class NetStatus(IntFlag):
    """``virtio_net_config.status``."""

    LINK_UP = 1
    ANNOUNCE = 2


@dataclass(frozen=True, slots=True)
class NetConfig:
    """``struct virtio_net_config`` up to ``supported_hash_types`` (24 bytes)."""

    mac: bytes = bytes(6)
    status: int = NetStatus.LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = 0xFFFFFFFF  # unknown
    duplex: int = 0xFF  # unknown
    rss_max_key_size: int = 0
    rss_max_indirection_table_length: int = 0
    supported_hash_types: int = 0

    STRUCT = struct.Struct("<6sHHHIBBHI")

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(self.mac)}")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mac, self.status, self.max_virtqueue_pairs, self.mtu,
                                self.speed, self.duplex, self.rss_max_key_size,
                                self.rss_max_indirection_table_length,
                                self.supported_hash_types)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> NetConfig:
        return cls(*cls.STRUCT.unpack_from(data))

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (GET_CONFIG), zero-filled past the end."""
        raw = self.pack()
        chunk = raw[offset:offset + size] if offset >= 0 else b""
        return chunk + bytes(size - len(chunk))


def rx_queue(pair: int) -> int:
    """Virtqueue index of receiveq ``pair`` (device → driver)."""
    return 2 * pair


def tx_queue(pair: int) -> int:
    """Virtqueue index of transmitq ``pair`` (driver → device)."""
    return 2 * pair + 1


def is_tx_queue(index: int) -> bool:
    return index & 1 == 1


def format_mac(mac: bytes | bytearray | memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(mac))


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"MAC address {text!r}: expected six colon-separated bytes")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError as exc:
        raise ValueError(f"MAC address {text!r}: {exc}") from exc
    return raw
