"""The virtio-pci modern transport's numbers (VIRTIO 1.2 §4.1), shared by both sides.

The device model (``vvu_runtime.device.virtio_pci``) serves these structures; the
guest driver (``vvu_runtime.driver.virtio_pci``) programs them. One place for the
vendor capability layout, the common configuration offsets, the status and ISR
bits, and the virtio-vhost-user additions (capability types 6-8).
"""

from __future__ import annotations

import enum
import struct

VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: Modern (non-transitional) devices: PCI device ID = 0x1040 + virtio device ID.
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040
#: Last PCI device ID of the modern range (virtio device ID 63).
VIRTIO_PCI_MODERN_DEVICE_LAST = 0x107F
#: Subsystem device ID QEMU gives modern virtio devices (must be >= 0x40).
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100
#: "No MSI-X vector" in config_msix_vector / queue_msix_vector.
NO_VECTOR = 0xFFFF


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class IsrBit(enum.IntFlag):
    QUEUE = 1
    CONFIG = 2


class VirtioPciCapType(enum.IntEnum):
    """``cfg_type`` of a virtio vendor capability."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5
    #: virtio-vhost-user v3 (2022): device auxiliary notifications (doorbells).
    DEVICE_AUX_NOTIFY_CFG = 6
    #: virtio-vhost-user v3 (2022): driver auxiliary notifications (kick vectors).
    DRIVER_AUX_NOTIFY_CFG = 7
    SHARED_MEMORY_CFG = 8
    VENDOR_CFG = 9

    @property
    def cap_len(self) -> int:
        """Bytes of the capability including cap_vndr/cap_next."""
        if self in (VirtioPciCapType.NOTIFY_CFG, VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG,
                    VirtioPciCapType.PCI_CFG):
            return 20  # + le32 multiplier / u8 pci_cfg_data[4]
        if self is VirtioPciCapType.SHARED_MEMORY_CFG:
            return 24  # virtio_pci_cap64: + le32 offset_hi, le32 length_hi
        return 16

    @property
    def has_multiplier(self) -> bool:
        return self in (VirtioPciCapType.NOTIFY_CFG, VirtioPciCapType.DEVICE_AUX_NOTIFY_CFG)


#: struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id,
#: padding[2], le32 offset, le32 length.
VIRTIO_PCI_CAP = struct.Struct("<BBBBxxII")

# --- common configuration structure (VIRTIO 1.2 §4.1.4.3) ---------------------------

COMMON_CFG = struct.Struct("<IIIIHHBBHHHHHQQQHH")
COMMON_CFG_SIZE = COMMON_CFG.size  # 0x3c, with queue_notif_config_data and queue_reset


class Common(enum.IntEnum):
    """Offsets in the common configuration structure."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIF_CONFIG_DATA = 0x38
    QUEUE_RESET = 0x3A


__all__ = [
    "COMMON_CFG",
    "COMMON_CFG_SIZE",
    "NO_VECTOR",
    "VIRTIO_PCI_CAP",
    "VIRTIO_PCI_MODERN_DEVICE_BASE",
    "VIRTIO_PCI_MODERN_DEVICE_LAST",
    "VIRTIO_PCI_SUBSYSTEM_ID",
    "VIRTIO_PCI_VENDOR_ID",
    "Common",
    "DeviceStatus",
    "IsrBit",
    "VirtioPciCapType",
]
