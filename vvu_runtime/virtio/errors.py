"""Errors of the virtio layer.

Exception tree::

    VirtioError
     ├── GuestMemoryError      an address or length outside the mapped guest memory,
     │                         or a memory table that cannot be mapped
     ├── RingError             a virtqueue configured with impossible parameters, or a
     │                         driver-side index that jumped further than the ring size
     └── DescriptorError       a hostile or broken descriptor chain: a loop, a chain
                               longer than the ring, a readable buffer after a writable
                               one, a nested indirect table, a buffer out of bounds

Every one of these means "this device instance got input it must not trust": the
owner sets NEEDS_RESET (or drops the connection) and keeps serving everything else.

Errors raised while walking a chain carry ``queue`` (the queue index) and ``head``
(the chain's head index, split, or buffer id, packed). The ring has already
consumed that chain when the error is raised, so a device that prefers to
carry on can hand it back (``push`` with 0 bytes) instead of leaking it.
A buffer outside guest memory inside a chain is a GuestMemoryError, not a
DescriptorError: callers that care about "hostile chain" catch VirtioError.
"""

from __future__ import annotations

from vvu_runtime.errors import VvuError


class VirtioError(VvuError):
    """Base of the virtio layer's errors."""

    def __init__(self, message: str, *, queue: int | None = None, head: int | None = None):
        super().__init__(message)
        self.queue = queue
        self.head = head


class GuestMemoryError(VirtioError):
    """An access outside the guest memory the front-end gave us."""


class RingError(VirtioError):
    """A virtqueue whose configuration or driver-side state is impossible."""


class DescriptorError(VirtioError):
    """A descriptor chain that breaks the rules of the ring format."""
