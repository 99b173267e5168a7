"""Turning a fuzz input (bytes) into the choices a harness makes.

A harness never draws from a random generator: every decision comes from the
input, so the saved bytes of a finding replay it exactly. Reading past the end
yields zeros, which every harness treats as "the plain, valid choice", so short
inputs still do something meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class ByteSource:
    """A cursor over one fuzz input."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def u8(self) -> int:
        pos = self.pos
        self.pos = pos + 1
        return self.data[pos] if pos < len(self.data) else 0

    def uint(self, nbytes: int) -> int:
        """A little-endian unsigned integer of ``nbytes`` bytes."""
        pos = self.pos
        self.pos = pos + nbytes
        return int.from_bytes(self.data[pos:pos + nbytes], "little")

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (``n`` >= 1)."""
        if n <= 256:
            return self.u8() % n
        if n <= 1 << 16:
            return self.uint(2) % n
        return self.uint(8) % n

    def chance(self, percent: int) -> bool:
        """True for about ``percent`` % of byte values (never for a zero byte)."""
        return self.u8() * 100 >= (100 - percent) * 256

    def usually(self, percent: int) -> bool:
        """True for about ``percent`` % of byte values, always for a zero byte."""
        return self.u8() * 100 < percent * 256

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def take(self, n: int) -> bytes:
        """``n`` bytes, zero-padded when the input runs out."""
        pos = self.pos
        self.pos = pos + n
        chunk = self.data[pos:pos + n]
        return chunk if len(chunk) == n else chunk + bytes(n - len(chunk))

    def edge_int(self, bits: int, usual: int) -> int:
        """Mostly ``usual``; sometimes a boundary or an arbitrary ``bits``-bit value."""
        mode = self.u8()
        if mode < 160:
            return usual
        top = (1 << bits) - 1
        if mode < 200:
            return self.pick((0, 1, top, top - 1, 1 << (bits - 1), usual + 1,
                              max(usual - 1, 0), usual * 2)) & top
        return self.uint((bits + 7) // 8) & top
