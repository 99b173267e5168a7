"""``SplitQueue`` with its hot methods compiled (``_split_c.c``).

Importing this module fails with ImportError when the extension was not built;
``split.compiled_split_queue()`` then answers None and ``SplitQueue(...)`` stays
pure Python. The class takes pop, pop_many, chain_at, push, push_many and
has_available from the C base and everything else from ``SplitQueue``, which
also serves as the fallback the C code calls for any input it does not handle
itself (so errors are exactly split.py's). The ring position lives in the C
struct under the attribute names split.py uses.
"""

from __future__ import annotations

from typing import Any, cast

from vvu_runtime.virtio import _split_c
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.memory import GuestMemory
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses
from vvu_runtime.virtio.split import SplitQueue

__all__ = ["CompiledSplitQueue", "new_compiled_queue"]

# The reference methods are taken from SplitQueue itself, not from the subclass:
# the C fallbacks must never land back in the C code.
_split_c.configure(DescriptorChain, SplitQueue.chain_at, SplitQueue.push,
                   SplitQueue.push_many, VirtioError)


class CompiledSplitQueue(_split_c.SplitCore, SplitQueue):
    """A split ring whose data path runs in C; behaves exactly as ``SplitQueue``."""

    def __init__(
        self,
        index: int,
        size: int,
        addrs: RingAddresses,
        memory: GuestMemory,
        features: int,
        base: int = 0,
    ) -> None:
        SplitQueue.__init__(self, index, size, addrs, memory, features, base)
        self._bind(self._desc, self._avail16, self._used16, size, self._indirect_ok,
                   self._max_indirect, memory)


def new_compiled_queue() -> CompiledSplitQueue:
    """An uninitialised CompiledSplitQueue, for ``SplitQueue.__new__`` (object.__new__
    refuses a class with a C base; the C base's own __new__ is the one to use)."""
    core: Any = cast(Any, _split_c.SplitCore)
    queue: CompiledSplitQueue = core.__new__(CompiledSplitQueue)
    return queue
