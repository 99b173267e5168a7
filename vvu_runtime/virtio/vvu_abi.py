"""The virtio-vhost-user (VVU) device ABI, as docs/vvu-abi.md writes it down.

One definition for both sides: the device model (``vvu_runtime.device.vvu``)
presents it, the guest driver (``vvu_runtime.driver.vvu``) drives it. Identity,
virtqueues, device config layout and status bits, the BAR layout, shmids and the
doorbell numbering rule live here and nowhere else.
"""

from __future__ import annotations

import enum
import struct

#: Default virtio device ID (unassigned in the registry; every proposed ID is taken).
VIRTIO_ID_VVU = 63
#: vhost-user vring indexes are 8 bits (SET_VRING_KICK/CALL/ERR payload).
MAX_VHOST_QUEUES = 256

#: Virtqueue indexes: rxq carries front-end messages to the driver, txq the other way.
RXQ = 0
TXQ = 1
#: What every rxq buffer holds, so the largest tunnelled message fits; the largest
#: txq message accepted is the same.
MESSAGE_BUFFER_SIZE = 4096

#: Device config: ``le32 status, le32 max_vhost_queues, u8 uuid[16]``.
DEVICE_CONFIG = struct.Struct("<II16s")
CONFIG_STATUS = 0
CONFIG_STATUS_SIZE = 4
CONFIG_MAX_VHOST_QUEUES = 4
CONFIG_UUID = 8
#: Doorbell bypass (docs/vvu-abi.md "Doorbell bypass"), after the base config:
#: ``le16 doorbell_peer, le16 doorbell_owner``. A driver that reads only the
#: first 24 bytes never sees them and keeps the trapped doorbells.
DOORBELL_CONFIG = struct.Struct("<HH")
CONFIG_DOORBELL_PEER = DEVICE_CONFIG.size
CONFIG_DOORBELL_OWNER = DEVICE_CONFIG.size + 2
DEVICE_CONFIG_SIZE = DEVICE_CONFIG.size + DOORBELL_CONFIG.size
#: ``doorbell_peer`` when the device has no companion (use the trapped doorbells).
NO_DOORBELL_PEER = 0xFFFF
#: The companion: QEMU's ivshmem-doorbell (PCI 1af4:1110), BAR0 registers.
IVSHMEM_VENDOR_ID = 0x1AF4
IVSHMEM_DEVICE_ID = 0x1110
IVSHMEM_IVPOSITION = 8
IVSHMEM_DOORBELL = 12
IVSHMEM_BAR0_SIZE = 256
#: Highest peer ID the ivshmem protocol allows (QEMU's IVSHMEM_MAX_PEERS).
IVSHMEM_MAX_PEER = 0xFFFF
#: Own ID vvu-devd gives the appliance's ivshmem-doorbell (its IVPosition): not 0,
#: so the companion is told apart from any other ivshmem function.
DOORBELL_OWNER_ID = 0x7676


class VvuStatus(enum.IntFlag):
    """Bits of the device config ``status`` field."""

    BACKEND_UP = 1 << 0
    FRONTEND_UP = 1 << 1


STATUS_DEFINED = int(VvuStatus.BACKEND_UP | VvuStatus.FRONTEND_UP)

#: BAR indexes and offsets ("BAR layout").
SHM_BAR = 2
AUX_BAR = 4
AUX_BAR_SIZE = 0x4000
#: Driver aux notification structure (kick -> MSI-X vector, cap 7) at BAR4 + 0:
#: ``le16 select @0, le16 msix_vector @2``.
KICK_CFG_OFFSET = 0x0000
KICK_CFG_SIZE = 4
KICK_SELECT = 0
KICK_VECTOR = 2
#: Device aux notifications (doorbells, cap 6) at BAR4 + 0x1000, one per 4 bytes.
DOORBELL_OFFSET = 0x1000
DOORBELL_MULTIPLIER = 4

#: shmid of the vhost-user memory region (virtio-vhost-user v3).
SHMID_MEMORY = 1

#: ISR bit of a driver auxiliary notification without MSI-X (v3 proposal: bit 2).
ISR_DRIVER_AUX = 0x4


class DoorbellKind(enum.StrEnum):
    """What a device auxiliary notification (doorbell) fires."""

    CALL = "call"
    ERR = "err"
    LOG = "log"


def doorbell_count(max_vhost_queues: int) -> int:
    """Doorbells of a device with ``max_vhost_queues`` queues: call, err each, one log."""
    return 2 * max_vhost_queues + 1


def doorbell_index(kind: DoorbellKind, queue: int, max_vhost_queues: int) -> int | None:
    """The doorbell of ``kind`` for ``queue`` (None: no such doorbell).

    With ``N = max_vhost_queues``: call ``i`` is ``i``, err ``i`` is ``N + i``,
    log is ``2N`` (``queue`` ignored).
    """
    n = max_vhost_queues
    if kind is DoorbellKind.LOG:
        return 2 * n
    if not 0 <= queue < n:
        return None
    return queue if kind is DoorbellKind.CALL else n + queue


def doorbell_target(index: int, max_vhost_queues: int) -> tuple[DoorbellKind, int] | None:
    """(kind, queue) that doorbell ``index`` fires (None: past ``2N``)."""
    n = max_vhost_queues
    if 0 <= index < n:
        return DoorbellKind.CALL, index
    if n <= index < 2 * n:
        return DoorbellKind.ERR, index - n
    if index == 2 * n:
        return DoorbellKind.LOG, 0
    return None


def ivshmem_doorbell(peer: int, queue: int) -> int:
    """The Doorbell register value that fires the call of vhost-user queue ``queue``
    through the companion: peer ``peer``'s vector ``queue``."""
    return (peer << 16) | queue
