"""The appliance's VVU PCI functions, found in sysfs, and the link each belongs to.

A VVU function is a PCI function ``1af4:107f`` (docs/vvu-abi.md). The device
model puts a uuid in its device config (``le32 status, le32 max_vhost_queues,
u8 uuid[16]``): ``uuid5(NAMESPACE_URL, "vvu:" + NAME)`` for the device ``NAME``
given to ``vvu-devd --device NAME:...`` (:func:`link_uuid`). The appliance
config names links, so functions are matched to links by that uuid, whatever
their PCI order.

The uuid is read through sysfs: the virtio vendor capability of type
DEVICE_CFG in the config space says which BAR and offset, and the PCI_CFG
capability's window reads it through config space. Reading does not bind,
unbind or reset the function, whichever driver holds it.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VVU_PCI_ID", "VvuFunction", "find_functions", "link_uuid", "read_uuid"]

VVU_PCI_ID = (0x1AF4, 0x107F)
SYSFS_PCI = Path("/sys/bus/pci/devices")
#: PCI config space: status register, capabilities pointer.
_STATUS, _CAP_PTR = 0x06, 0x34
_STATUS_CAP_LIST = 0x10
_CAP_VENDOR = 0x09
#: virtio_pci_cap.cfg_type of the device-specific configuration and of the
#: config-space window into the BARs.
_VIRTIO_PCI_CAP_DEVICE_CFG = 4
_VIRTIO_PCI_CAP_PCI_CFG = 5
#: Offset of the uuid in the VVU device config.
_CONFIG_UUID = 8


def link_uuid(name: str) -> uuidlib.UUID:
    """The uuid vvu-devd gives the VVU device of link ``name`` (device/vvu.py default_uuid)."""
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"vvu:{name}")


@dataclass(frozen=True)
class VvuFunction:
    address: str  # "0000:01:00.0"
    uuid: uuidlib.UUID | None  # None: could not be read (the error says why)
    error: str = ""

    @property
    def driver(self) -> str | None:
        """The kernel driver bound to the function (``vfio-pci``, ``virtio-pci``) or None."""
        link = SYSFS_PCI / self.address / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def _virtio_caps(config: bytes) -> dict[int, int]:
    """cfg_type -> config-space offset of the first virtio vendor capability of that type."""
    caps: dict[int, int] = {}
    if len(config) < 64 or not struct.unpack_from("<H", config, _STATUS)[0] & _STATUS_CAP_LIST:
        return caps
    ptr = config[_CAP_PTR] & ~3
    seen = set()
    while ptr and ptr not in seen and ptr + 16 <= len(config):
        seen.add(ptr)
        cap_id, nxt, _length, cfg_type = struct.unpack_from("<BBBB", config, ptr)
        if cap_id == _CAP_VENDOR:
            caps.setdefault(cfg_type, ptr)
        ptr = nxt & ~3
    return caps


def read_uuid(address: str, sysfs: Path = SYSFS_PCI) -> uuidlib.UUID:
    """The uuid in the VVU function's device config; OSError/ValueError if unreadable.

    Read through the VIRTIO_PCI_CAP_PCI_CFG window in config space (write bar,
    offset and length into the capability, read its data field): the BARs
    themselves cannot be mmapped from sysfs while a driver (virtio-pci, vfio-pci)
    holds the function's regions, and this needs no unbinding.
    """
    fd = os.open(sysfs / address / "config", os.O_RDWR | os.O_CLOEXEC)
    try:
        config = os.pread(fd, 256, 0)
        caps = _virtio_caps(config)
        if _VIRTIO_PCI_CAP_DEVICE_CFG not in caps or _VIRTIO_PCI_CAP_PCI_CFG not in caps:
            raise ValueError(f"{address}: no virtio device-config or pci-config capability")
        dev = caps[_VIRTIO_PCI_CAP_DEVICE_CFG]
        bar = config[dev + 4]
        offset, length = struct.unpack_from("<II", config, dev + 8)
        if length < _CONFIG_UUID + 16:
            raise ValueError(f"{address}: device config of {length} bytes has no uuid")
        window = caps[_VIRTIO_PCI_CAP_PCI_CFG]
        raw = b""
        for i in range(4):
            os.pwrite(fd, bytes([bar]), window + 4)
            os.pwrite(fd, struct.pack("<II", offset + _CONFIG_UUID + 4 * i, 4), window + 8)
            raw += os.pread(fd, 4, window + 16)
    finally:
        os.close(fd)
    if raw in (b"\xff" * 16, bytes(16)):
        raise ValueError(f"{address}: the device config reads {raw[:1].hex() * 16} "
                         "(device gone, or no pci-config window)")
    return uuidlib.UUID(bytes=raw)


def find_functions(sysfs: Path = SYSFS_PCI,
                   ids: tuple[int, int] = VVU_PCI_ID) -> list[VvuFunction]:
    """Every VVU function on the PCI bus with its uuid, in address order."""
    found = []
    for dev in sorted(sysfs.glob("*")):
        try:
            vendor = int((dev / "vendor").read_text(), 16)
            device = int((dev / "device").read_text(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) != ids:
            continue
        try:
            found.append(VvuFunction(dev.name, read_uuid(dev.name, sysfs)))
        except (OSError, ValueError) as e:
            found.append(VvuFunction(dev.name, None, str(e)))
    return found
