"""The doorbell companion: the appliance's ivshmem-doorbell function (docs/vvu-abi.md
"Doorbell bypass").

A VVU doorbell is a trapped write that QEMU's vfio-user client sends to
``vvu-devd`` as a message. When ``vvu-devd`` also serves the appliance's
``ivshmem-doorbell`` device, each VVU function names its peer there
(``doorbell_peer``) and the companion's own ID (``doorbell_owner``, what its
IVPosition register reads). A call of vhost-user queue ``i`` is then one 32-bit
write of ``peer << 16 | i`` to the companion's Doorbell register (BAR0 + 12),
which QEMU has wired to the consumer's call eventfd: no message, no
``vvu-devd``. Err and log stay on the trapped doorbells (rare).

The companion is reached through sysfs (config file, ``resource0`` mmapped):
no kernel driver binds 1af4:1110, and its BAR0 is only registers.
"""

from __future__ import annotations

import logging
import os

from vvu_runtime.driver.errors import PciError
from vvu_runtime.driver.pci import PciFunction, Registers
from vvu_runtime.driver.sysfs import SysfsPciFunction
from vvu_runtime.vhost_user.transport import Register32
from vvu_runtime.virtio.vvu_abi import (
    IVSHMEM_DEVICE_ID,
    IVSHMEM_DOORBELL,
    IVSHMEM_IVPOSITION,
    IVSHMEM_VENDOR_ID,
)

log = logging.getLogger(__name__)

PCI_DEVICES = "/sys/bus/pci/devices"
#: PCI command register and its memory-space bit.
COMMAND = 0x04
COMMAND_MEMORY = 0x2


class DoorbellCompanion:
    """An ivshmem-doorbell function whose IVPosition is the owner ID devd gave it."""

    def __init__(self, pci: PciFunction, address: str) -> None:
        self.pci = pci
        self.address = address
        # QEMU's ``vectors=``: each peer has that many; devd's fence takes the last.
        self.vectors = pci.msix_table_size()
        self._regs: Registers = pci.registers(0)
        self.rung = 0

    @property
    def position(self) -> int:
        return self._regs.read(IVSHMEM_IVPOSITION, 4)

    def call_vectors(self) -> int:
        """How many queues' calls can go through the companion (the rest stay trapped)."""
        return max(0, self.vectors - 1)

    def ring(self, value: int) -> None:
        """One 32-bit write of ``peer << 16 | vector`` to the Doorbell register."""
        self.rung += 1
        self._regs.write(IVSHMEM_DOORBELL, 4, value)

    def register(self, value: int) -> Register32 | None:
        """:meth:`ring` as a store a compiled loop makes itself (not counted in
        ``rung``); None when the BAR is not memory-mapped."""
        word = self._regs.word32(IVSHMEM_DOORBELL)
        return None if word is None else (word[0], word[1], value)

    def close(self) -> None:
        self.pci.close()


def find_companion(owner: int, *, devices: str = PCI_DEVICES) -> DoorbellCompanion | None:
    """The ivshmem-doorbell function whose IVPosition reads ``owner`` (None: there is
    none; the caller keeps the trapped doorbells)."""
    try:
        addresses = sorted(os.listdir(devices))
    except OSError:
        return None
    for address in addresses:
        try:
            with open(os.path.join(devices, address, "vendor"), encoding="ascii") as f:
                vendor = int(f.read(), 16)
            with open(os.path.join(devices, address, "device"), encoding="ascii") as f:
                device = int(f.read(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) != (IVSHMEM_VENDOR_ID, IVSHMEM_DEVICE_ID):
            continue
        companion = _open(address)
        if companion is None:
            continue
        if companion.position == owner and companion.call_vectors():
            log.info("doorbell companion: ivshmem-doorbell %s (IVPosition %#x, %d vectors)",
                     address, owner, companion.vectors)
            return companion
        companion.close()
    return None


def _open(address: str) -> DoorbellCompanion | None:
    try:
        pci = SysfsPciFunction(address, unbind=False)
    except PciError as exc:
        log.debug("%s: %s", address, exc)
        return None
    try:
        if not pci.bar_size(0) or not pci.msix_table_size():
            pci.close()  # ivshmem-plain: no registers a peer can ring
            return None
        cmd = pci.config_read(COMMAND, 2)
        if not cmd & COMMAND_MEMORY:
            pci.config_write(COMMAND, 2, cmd | COMMAND_MEMORY)
        return DoorbellCompanion(pci, address)
    except PciError as exc:
        log.warning("%s: ivshmem function unusable as the doorbell companion: %s", address,
                    exc)
        pci.close()
        return None


__all__ = ["DoorbellCompanion", "find_companion"]
