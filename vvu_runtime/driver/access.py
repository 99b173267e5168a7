"""How the driver reaches a PCI function: vfio-pci behind a vIOMMU, or sysfs in
poll mode, and :func:`open_function`, which picks one (DESIGN decision 6).

Kept apart from :mod:`.pci` so the base layer does not import its own
implementations (pci <- vfio, sysfs <- access).
"""

from __future__ import annotations

import enum
import logging
import os

from vvu_runtime.driver.errors import PciError
from vvu_runtime.driver.pci import PciFunction, normalize_address, sysfs_device_dir
from vvu_runtime.driver.sysfs import SysfsPciFunction
from vvu_runtime.driver.vfio import VfioPciFunction

log = logging.getLogger(__name__)


class PciAccess(enum.StrEnum):
    """The ``--vvu-access`` choices."""

    AUTO = "auto"    # vfio when the function has an IOMMU group, else sysfs
    VFIO = "vfio"    # vfio-pci type1 behind a vIOMMU: MSI-X, DMA at chosen IOVAs
    SYSFS = "sysfs"  # sysfs resources, hugetlb + pagemap, poll mode


def open_function(address: str, access: PciAccess | str = PciAccess.AUTO) -> PciFunction:
    """Open the function at ``address`` the ``access`` way.

    ``AUTO`` takes vfio-pci when the function has an IOMMU group (the appliance has
    a vIOMMU), else the sysfs poll-mode path.
    """
    address = normalize_address(address)
    try:
        access = PciAccess(access)
    except ValueError:
        raise PciError(f"unknown PCI access method {access!r} (auto, vfio or sysfs)") from None
    if not os.path.isdir(sysfs_device_dir(address)):
        raise PciError(f"{address}: no such PCI function in /sys/bus/pci/devices")
    if access is PciAccess.AUTO:
        has_group = os.path.exists(os.path.join(sysfs_device_dir(address), "iommu_group"))
        access = PciAccess.VFIO if has_group else PciAccess.SYSFS
        log.info("%s: %s", address, "IOMMU group found: vfio-pci" if has_group
                 else "no IOMMU group: sysfs resources, poll mode")
    if access is PciAccess.VFIO:
        return VfioPciFunction(address)
    return SysfsPciFunction(address)
