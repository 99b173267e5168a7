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
"""


class VirtioError(Exception):
    """Base of the virtio layer's errors."""


class GuestMemoryError(VirtioError):
    """An access outside the guest memory the front-end gave us."""


class RingError(VirtioError):
    """A virtqueue whose configuration or driver-side state is impossible."""


class DescriptorError(VirtioError):
    """A descriptor chain that breaks the rules of the ring format."""
