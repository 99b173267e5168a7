"""Errors of the guest-side driver (PCI access, virtio-pci, the VVU device).

Exception tree::

    DriverError                base
     ├── PciError              the PCI function cannot be reached or set up: not
     │                         present, wrong IDs, cannot be bound to vfio-pci, no IOMMU
     │                         group, a BAR that cannot be mapped, no hugepage for a DMA
     │                         buffer, an ioctl refused. Carries the PCI address in the
     │                         message; fix the appliance's configuration.
     └── DeviceFault           the device does not behave as the ABI says: a missing
          │                    capability, FEATURES_OK refused, a queue that cannot be
          │                    set up, a malformed message on rxq, DEVICE_NEEDS_RESET.
          └── DeviceGone       the device answers all-ones (the device model died);
                               nothing but a new appliance brings it back (DESIGN 3)

Errors wrapping another exception keep it as ``__cause__``.
"""

from __future__ import annotations

from vvu_runtime.errors import VvuError


class DriverError(VvuError):
    """Base of the guest driver's errors."""


class PciError(DriverError):
    """The PCI function cannot be reached or set up."""


class DeviceFault(DriverError):
    """The device does not follow the ABI (or asked to be reset)."""


class DeviceGone(DeviceFault):
    """The device reads as all-ones: its device model is gone."""


__all__ = ["DeviceFault", "DeviceGone", "DriverError", "PciError"]
