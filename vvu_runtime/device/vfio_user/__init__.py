"""vfio-user: the wire format (:mod:`.protocol`), the server engine (:mod:`.server`)
and the device contract it serves (:mod:`.device`). A client that behaves like
QEMU's lives with the tests (tests/support/vfio_user_client.py)."""

from vvu_runtime.device.vfio_user.device import IrqDescription, RegionDescription, VfioUserDevice
from vvu_runtime.device.vfio_user.server import (
    ServerState,
    Session,
    SessionState,
    VfioUserServer,
)

__all__ = [
    "IrqDescription",
    "RegionDescription",
    "ServerState",
    "Session",
    "SessionState",
    "VfioUserDevice",
    "VfioUserServer",
]
