"""Errors of the vhost-user layer.

Exception tree::

    VhostUserError                 base of everything raised by vvu_runtime.vhost_user
     ├── ProtocolError             a message that breaks the vhost-user protocol; the
     │    │                        stream is still in step, so the session may answer it
     │    │                        (error ack with REPLY_ACK) and read the next message
     │    ├── UnknownRequestError  a request code that is not in the message table
     │    ├── PayloadSizeError     a payload whose size is wrong for that request
     │    ├── FdCountError         the wrong number of file descriptors for that request
     │    ├── FlagsError           bad header flags (REPLY on a request, reserved bits)
     │    ├── PayloadValueError    a well-sized payload with impossible contents
     │    │                        (nregions > 8, config size > 256, NOFD bit and an fd)
     │    └── FramingError         the header itself is unusable (wrong version bits, a
     │                             size no request allows, truncated fds): the stream can
     │                             not be trusted any more and the connection is dropped
     ├── RequestError              a well-formed request the back-end refuses in its
     │                             current state or with its current resources: queue
     │                             index out of range, overlapping or unmappable memory
     │                             regions, ring addresses outside memory, features not
     │                             offered, a request before SET_OWNER ...
     ├── TransportError            the channel failed: a socket error, a peer that hung
     │    │                        up in the middle of a message, a timeout
     │    └── ConnectionClosed     the peer closed the connection between messages
     └── FrontendError             (frontend side) the back-end answered with a failure
                                   ack, a malformed reply, or a reply to something else

Every error that wraps another keeps it as ``__cause__`` (``raise ... from exc``);
virtio-layer problems (``vvu_runtime.virtio.errors.VirtioError``) met while serving a
request are wrapped in :class:`RequestError` with the VirtioError as cause.

Each ``ProtocolError`` names the request it concerns (``request`` attribute, an
``int`` or an enum member, or ``None`` when the header could not be read) so that
logs say what went wrong, e.g. ``SET_VRING_ADDR: payload is 12 bytes, expected 40``.
"""

from __future__ import annotations

from vvu_runtime.errors import VvuError


class VhostUserError(VvuError):
    """Base of the vhost-user layer's errors."""


class ProtocolError(VhostUserError):
    """A message that breaks the protocol; the stream is still in step."""

    def __init__(self, message: str, request: int | None = None) -> None:
        super().__init__(message)
        self.request = request


class UnknownRequestError(ProtocolError):
    """A request code not in the message table of that direction."""


class PayloadSizeError(ProtocolError):
    """A payload of the wrong size for its request."""


class FdCountError(ProtocolError):
    """The wrong number of file descriptors for a request."""


class FlagsError(ProtocolError):
    """Header flags that are not allowed (REPLY on a request, reserved bits)."""


class PayloadValueError(ProtocolError):
    """A payload of the right size whose contents are impossible."""


class FramingError(ProtocolError):
    """The header is unusable: the connection cannot continue."""


class RequestError(VhostUserError):
    """A well-formed request that the back-end refuses."""


class TransportError(VhostUserError):
    """The channel under the protocol failed."""


class ConnectionClosed(TransportError):
    """The peer closed the connection between two messages."""


class FrontendError(VhostUserError):
    """The back-end failed a request of the frontend session, or answered wrongly."""
