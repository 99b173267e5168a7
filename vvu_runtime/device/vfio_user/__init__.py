"""vfio-user: the wire format (:mod:`.protocol`), the server engine (:mod:`.server`),
the device contract it serves (:mod:`.device`) and a minimal client (:mod:`.client`)
that behaves like QEMU's, for tests and probes."""

from vvu_runtime.device.vfio_user.device import IrqDescription, RegionDescription, VfioUserDevice
from vvu_runtime.device.vfio_user.server import (
    ServerState,
    ServerThread,
    Session,
    SessionState,
    VfioUserServer,
)

__all__ = [
    "IrqDescription",
    "RegionDescription",
    "ServerState",
    "ServerThread",
    "Session",
    "SessionState",
    "VfioUserDevice",
    "VfioUserServer",
]
