"""The forwarding database: which port a MAC address was last seen on.

Keys are the 6 raw address bytes (``bytes``: hashable, and cheap to cut out of
a frame with one ``struct`` call). Entries age: an address not seen for
``ageing_time`` seconds is forgotten, so a VM that moved or went away stops
attracting traffic and its frames are flooded until it speaks again.

The table is bounded twice, globally and per port, because source
addresses are chosen by guests: one hostile guest sending random source
addresses must neither exhaust the switch's memory nor evict everybody else's
entries. Addresses beyond a limit are simply not learned (their traffic is
flooded), and the refusal is counted.

Time is passed in by the caller (one clock read per batch of frames, not one
per frame).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")

DEFAULT_AGEING_TIME = 300.0  # seconds, as IEEE 802.1D and the Linux bridge
DEFAULT_MAX_ENTRIES = 16384
DEFAULT_MAX_PER_PORT = 4096


class FdbEntry(Generic[P]):
    """Where one address lives, and when it was last heard from."""

    __slots__ = ("port", "seen")

    def __init__(self, port: P, seen: float) -> None:
        self.port = port
        self.seen = seen

    def __repr__(self) -> str:
        return f"FdbEntry(port={self.port!r}, seen={self.seen:.3f})"


@dataclass(slots=True)
class FdbCounters:
    learned: int = 0
    moved: int = 0
    aged: int = 0
    refused_full: int = 0


class Fdb(Generic[P]):
    """MAC address → port, with ageing and size limits."""

    def __init__(self, ageing_time: float = DEFAULT_AGEING_TIME,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_per_port: int = DEFAULT_MAX_PER_PORT) -> None:
        if ageing_time <= 0:
            raise ValueError(f"ageing time must be positive, got {ageing_time}")
        if max_entries <= 0 or max_per_port <= 0:
            raise ValueError("FDB limits must be positive")
        self.ageing_time = ageing_time
        self.max_entries = max_entries
        self.max_per_port = max_per_port
        self.counters = FdbCounters()
        self._table: dict[bytes, FdbEntry[P]] = {}
        self._per_port: dict[P, int] = {}

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, mac: bytes) -> bool:
        return mac in self._table

    def __iter__(self) -> Iterator[tuple[bytes, FdbEntry[P]]]:
        return iter(list(self._table.items()))

    def learn(self, mac: bytes, port: P, now: float) -> bool:
        """Record that ``mac`` sent from ``port``. Returns False when the table
        refused a new address (full); the frame is still forwarded.

        Callers only pass unicast source addresses (a group-bit source is an
        invalid frame and dropped before it gets here).
        """
        entry = self._table.get(mac)
        if entry is not None:
            entry.seen = now
            if entry.port is not port:
                self._per_port[entry.port] -= 1
                self._per_port[port] = self._per_port.get(port, 0) + 1
                entry.port = port
                self.counters.moved += 1
            return True
        count = self._per_port.get(port, 0)
        if len(self._table) >= self.max_entries or count >= self.max_per_port:
            self.counters.refused_full += 1
            return False
        self._table[mac] = FdbEntry(port, now)
        self._per_port[port] = count + 1
        self.counters.learned += 1
        return True

    def lookup(self, mac: bytes, now: float) -> P | None:
        """The port ``mac`` lives on, or None (unknown or aged out: flood)."""
        entry = self._table.get(mac)
        if entry is None:
            return None
        if now - entry.seen > self.ageing_time:
            self._remove(mac, entry)
            self.counters.aged += 1
            return None
        return entry.port

    def age(self, now: float) -> int:
        """Forget every address older than the ageing time; returns how many."""
        limit = now - self.ageing_time
        stale = [(mac, e) for mac, e in self._table.items() if e.seen < limit]
        for mac, entry in stale:
            self._remove(mac, entry)
        self.counters.aged += len(stale)
        return len(stale)

    def flush_port(self, port: P) -> int:
        """Forget every address on ``port`` (it went down); returns how many."""
        gone = [(mac, e) for mac, e in self._table.items() if e.port is port]
        for mac, entry in gone:
            self._remove(mac, entry)
        return len(gone)

    def entries_on(self, port: P) -> int:
        return self._per_port.get(port, 0)

    def _remove(self, mac: bytes, entry: FdbEntry[P]) -> None:
        del self._table[mac]
        left = self._per_port[entry.port] - 1
        if left:
            self._per_port[entry.port] = left
        else:
            del self._per_port[entry.port]
