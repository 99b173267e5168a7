"""Errors of the host-side device model (vfio-user server, PCI, virtio-pci, DMA).

Exception tree::

    DeviceError                   base; ``errno`` is what a vfio-user error reply carries
     ├── DeviceModelError         the device itself is declared wrongly (overlapping BAR
     │                            ranges, a capability chain past 256 bytes, a BAR size
     │                            that is not a power of two). Raised at construction,
     │                            never while serving: fix the device definition.
     ├── StateError               a call made in the wrong state of an engine (starting a
     │                            server twice, serving on a closed one)
     ├── ProtocolError            a vfio-user message we cannot honour
     │    ├── MessageError        malformed or unsupported, but the byte stream is still
     │    │    │                  intact: answered with an error reply, serving goes on
     │    │    └── UnsupportedCommand   a command we do not implement (ENOSYS)
     │    ├── FramingError        the stream can no longer be split into messages (a
     │    │                       header claiming fewer than 16 bytes): the connection
     │    │                       is closed
     │    ├── PeerHungUp    the peer hung up, possibly in the middle of a message
     │    └── RemoteError         the peer answered one of our requests with an error
     │                            reply (raised by the client side)
     ├── RegionAccessError        a region index, offset or length outside the device
     ├── IrqError                 a SET_IRQS the device cannot honour
     └── DmaError                 an IOVA range that is not mapped (or mapped without an
                                  fd), an overlapping DMA_MAP (EEXIST), too many maps;
                                  also a :class:`~vvu_runtime.virtio.errors.GuestMemoryError`
                                  so ring code written against guest memory catches it

Every error raised while handling a message (all of the above except
``DeviceModelError``/``StateError``) turns into an error reply to that message
only: the device model must never die on bad input, because a dead server is a
dead device in the appliance for the rest of its life (DESIGN decision 3).
Errors wrapping another exception keep it as ``__cause__``.
"""

from __future__ import annotations

import errno as _errno

from vvu_runtime.errors import VvuError
from vvu_runtime.virtio.errors import GuestMemoryError


class DeviceError(VvuError):
    """Base of the device model's errors."""

    #: errno sent back in the vfio-user error reply.
    errno: int = _errno.EINVAL

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class DeviceModelError(DeviceError):
    """The device definition is inconsistent (a programming or configuration error)."""


class StateError(DeviceError):
    """An engine was asked to do something its current state does not allow."""


class ProtocolError(DeviceError):
    """A vfio-user message that cannot be honoured."""


class MessageError(ProtocolError):
    """A malformed or unacceptable message; framing is intact, so serving continues."""


class UnsupportedCommand(MessageError):
    """A command this server does not implement."""

    errno = _errno.ENOSYS


class FramingError(ProtocolError):
    """The byte stream cannot be split into messages any more; the connection must close."""


class PeerHungUp(ProtocolError):
    """The peer closed the connection."""

    errno = _errno.ECONNRESET


class RemoteError(ProtocolError):
    """The peer answered a request with an error reply (``errno`` is the peer's)."""


class RegionAccessError(DeviceError):
    """A region access outside what the device declares."""


class IrqError(DeviceError):
    """An interrupt configuration the device cannot honour."""


class DmaError(DeviceError, GuestMemoryError):
    """An IOVA range the device cannot reach, or a DMA table update it must refuse."""

    errno = _errno.EFAULT
