"""CPU time of processes from ``/proc/PID/stat``: what the benchmarks charge per I/O.

A benchmark snapshots every process on the data path before and after a
phase (:class:`CpuMeter`) and divides the difference by the requests the
phase made. The same parser reads a stat line fetched from inside a guest
(an appliance's process, on its emulated CPU), with that guest's clock tick.

Programs run in the tools tree are started through ``mkosi sandbox``: the
process we start is mkosi's, and the daemon whose CPU counts is among its
descendants (:func:`find_descendant`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "TICK",
    "CpuMeter",
    "StatError",
    "cpu_ticks",
    "descendants",
    "find_descendant",
    "proc_cpu",
    "tree_cpu",
]

#: The host's clock tick (utime and stime in /proc/PID/stat count these).
TICK = os.sysconf("SC_CLK_TCK")
#: The kernel cuts a process's comm to this many characters.
COMM_LEN = 15


class StatError(ValueError):
    """A /proc/PID/stat line that is not one."""


def cpu_ticks(stat: str) -> int:
    """utime + stime (fields 14 and 15) of one ``/proc/PID/stat`` line, in clock ticks.

    The command name (field 2) is in parentheses and may hold spaces and
    parentheses itself, so the fields are counted from the *last* ``)``.
    """
    head, sep, tail = stat.rpartition(")")
    fields = tail.split()
    if not sep or "(" not in head or len(fields) < 13:
        raise StatError(f"not a /proc/PID/stat line: {stat[:80]!r}")
    try:
        # tail starts at field 3 (state): utime is field 14, stime field 15.
        return int(fields[11]) + int(fields[12])
    except ValueError:
        raise StatError(f"utime/stime are not numbers in {stat[:80]!r}") from None


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of a host process so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            return cpu_ticks(f.read()) / TICK
    except (OSError, StatError):
        return 0.0


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of ``pid`` and every live process below it: a daemon started
    through a wrapper, or one that forks its workers (virtiofsd's namespace
    sandbox serves from a child while the parent waits)."""
    if pid is None:
        return 0.0
    return sum(proc_cpu(p) for p in descendants(pid))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def descendants(pid: int) -> Iterator[int]:
    """``pid`` and every process below it."""
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        todo += _children(p)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def find_descendant(pid: int, program: str) -> int | None:
    """The first process at or below ``pid`` running ``program`` (matched by comm,
    which the kernel cuts to 15 characters), or None."""
    want = os.path.basename(program)[:COMM_LEN]
    return next((p for p in descendants(pid) if _comm(p) == want), None)


@dataclass
class CpuMeter:
    """CPU seconds of named host processes between :meth:`start` and :meth:`stop`."""

    processes: Mapping[str, int | None]
    _start: dict[str, float] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        return {name: proc_cpu(pid) for name, pid in self.processes.items()}

    def start(self) -> None:
        self._start = self.snapshot()

    def stop(self) -> dict[str, float]:
        """Seconds each process ran since :meth:`start`."""
        end = self.snapshot()
        return {name: end[name] - self._start.get(name, 0.0) for name in end}
