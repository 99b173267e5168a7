"""The device side of a virtqueue, independent of the ring layout.

``split.SplitQueue`` and ``packed.PackedQueue`` implement :class:`Virtqueue`.
A device pops :class:`DescriptorChain` objects, reads the readable buffers,
writes the writable ones, pushes the chain back with the number of bytes it
wrote, and after a batch asks :meth:`Virtqueue.should_notify` whether the
driver wants an interrupt (EVENT_IDX / NO_INTERRUPT suppression).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

from vvu_runtime.virtio.memory import GuestMemory


@dataclass(frozen=True, slots=True)
class RingAddresses:
    """Where the three parts of a ring live, as front-end user addresses.

    For a packed ring ``desc`` is the descriptor ring, ``avail`` the driver
    event suppression area and ``used`` the device event suppression area.
    """

    desc: int
    avail: int
    used: int
    log_guest_addr: int = 0
    log: bool = False


@dataclass(slots=True)
class DescriptorChain:
    """One buffer the driver made available: its readable and writable parts.

    ``head`` is what goes back into the used ring (split: head index; packed:
    buffer id). ``ndescs`` counts descriptor slots the chain took in the ring
    (packed rings advance by it). ``writable_gpas`` pairs with ``writable`` for
    dirty logging.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    writable_gpas: list[int] = field(default_factory=list)
    ndescs: int = 1

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read(self) -> bytes:
        """All readable bytes, concatenated."""
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers from ``offset``; returns bytes written."""
        bufs = self.writable
        if offset == 0 and len(bufs) == 1 and len(data) <= len(bufs[0]):
            # The common case (one buffer that fits): one slice assignment.
            n = len(data)
            bufs[0][:n] = data
            return n
        src = memoryview(data)
        done = 0
        for buf in self.writable:
            n = len(buf)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(src) - done)
            buf[offset:offset + take] = src[done:done + take]
            done += take
            offset = 0
            if done == len(src):
                break
        return done


class Virtqueue(ABC):
    """Device-side view of one virtqueue in guest memory."""

    index: int
    size: int
    memory: GuestMemory

    @abstractmethod
    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises DescriptorError/GuestMemoryError."""

    @abstractmethod
    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver, ``written`` bytes of its writable part filled."""

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` chains; ring formats override this with a batched read."""
        chains: list[DescriptorChain] = []
        while len(chains) < limit:
            chain = self.pop()
            if chain is None:
                break
            chains.append(chain)
        return chains

    def push_many(self, completions: Iterable[tuple[DescriptorChain, int]]) -> None:
        """Push ``(chain, written)`` pairs; ring formats publish them in one go."""
        for chain, written in completions:
            self.push(chain, written)

    @abstractmethod
    def should_notify(self) -> bool:
        """After pushes: does the driver want an interrupt now? Resets the batch."""

    @abstractmethod
    def set_kick_suppression(self, suppress: bool) -> bool:
        """Ask the driver not to kick (polling) or to kick again.

        Returns True when buffers are already available, so that a caller who
        re-enables kicks polls once more instead of missing a kick (the usual race).
        """

    def set_log(self, log_all: bool, addrs: RingAddresses | None = None) -> None:  # noqa: B027
        """Follow LOG_ALL / the ring's log flag (rings that log dirty pages override)."""

    @abstractmethod
    def get_base(self) -> int:
        """The vhost-user vring base (SET/GET_VRING_BASE ``num``) describing our position."""

    def completed_past_base(self) -> list[int]:
        """Heads the ring shows as used although they lie past our base (see SplitQueue).

        Rings without such a notion (packed: the base carries its wrap counters and
        QEMU restores it from the used ring itself) have none.
        """
        return []

    def completions_may_be_unseen(self) -> bool:
        """Whether the used ring may hold completions the driver was never told of
        (their call went to a back-end connection that is gone). Rings that cannot
        tell say False (packed: not covered)."""
        return False

    @abstractmethod
    def has_available(self) -> bool:
        """Whether pop() would return a chain (without consuming it)."""
