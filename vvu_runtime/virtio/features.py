"""Device-independent virtio feature bits, vhost-user's own feature bits and ring flags.

One place for the numbers of VIRTIO 1.2 §2.7/§2.8/§6 and vhost-user's reuse of
bits 26 and 30 (reference/protocols.md B.3, B.7, B.11). Device-specific bits
(virtio-net, virtio-blk) live with their wire formats.

The ``IntFlag`` classes are for configuration code and messages; the ring hot
paths copy the values they test into plain module ``int`` constants, because
an ``IntFlag`` operation costs a method call.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class VirtioFeature(IntFlag):
    """Device-independent virtio feature bits (as masks, ``1 << bit``)."""

    NOTIFY_ON_EMPTY = 1 << 24  # legacy
    ANY_LAYOUT = 1 << 27  # legacy; implied by VERSION_1
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33  # a.k.a. IOMMU_PLATFORM
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40


class VhostFeature(IntFlag):
    """Bits vhost/vhost-user put in the virtio feature word (never seen by a guest)."""

    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL: front-end wants dirty logging
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES


#: Ring-layout features whose handling lives in this package: a device offers
#: these in addition to its own bits (the vhost-user session adds VhostFeature).
RING_FEATURES = (
    VirtioFeature.INDIRECT_DESC
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.VERSION_1
    | VirtioFeature.RING_PACKED
)


class DescFlag(IntFlag):
    """Descriptor ``flags`` (split and packed share the low three bits)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7  # packed only
    USED = 1 << 15  # packed only


class AvailFlag(IntFlag):
    """Split ring ``avail.flags`` (driver → device)."""

    NO_INTERRUPT = 1


class UsedFlag(IntFlag):
    """Split ring ``used.flags`` (device → driver)."""

    NO_NOTIFY = 1


class PackedEventFlag(IntEnum):
    """Packed ring event suppression ``flags`` (both directions)."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2  # only with EVENT_IDX: notify at the descriptor ``off_wrap`` names


#: Largest queue size either ring format allows.
MAX_QUEUE_SIZE = 32768

#: Dirty log granularity (VHOST_LOG_PAGE).
LOG_PAGE = 0x1000


def has_feature(features: int, flag: int) -> bool:
    """Whether every bit of ``flag`` is set in ``features``."""
    return features & flag == flag


def need_event(event: int, new: int, old: int) -> bool:
    """``vring_need_event``: did moving an index from ``old`` to ``new`` pass ``event``?

    All three are free-running 16-bit indexes; the arithmetic is modulo 2^16 so
    that it stays right across wrap-around. True when ``event`` lies in
    ``[old, new)``.
    """
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
