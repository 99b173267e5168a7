"""What the benchmarks read back from a guest's shell: dd's report, the guest's own
timing of a command, a block device's request counters.

Every parser raises :class:`GuestOutputError` quoting what it got, rather than
returning a number that would pass for a measurement (a dd that copied
nothing is not a rate of zero).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DdReport",
    "GuestOutputError",
    "block_requests",
    "parse_dd",
    "parse_times",
    "timed",
]

_RECORDS_OUT = re.compile(r"^(\d+)\+(\d+) records out$", re.M)
#: coreutils: "8388608 bytes (8.4 MB, 8.0 MiB) copied, 1.2345 s, 6.8 MB/s";
#: busybox (when built with its third status line): "... copied, 1.2345 seconds, 6.6MB/s".
_COPIED = re.compile(r"^(\d+) bytes .*copied, ([0-9.]+(?:e[-+]?\d+)?) s", re.M)
_TIMES = re.compile(r"TIMES ([0-9.]+) ([0-9.]+)")


class GuestOutputError(RuntimeError):
    """The guest printed something other than what was expected."""


@dataclass(frozen=True)
class DdReport:
    """One dd's summary: whole and partial records written, and (when dd printed
    its third line) the bytes copied and its own elapsed time."""

    full: int
    partial: int
    nbytes: int | None = None
    seconds: float | None = None


def parse_dd(text: str) -> list[DdReport]:
    """Every dd summary in ``text`` (several dd side by side print one each, in the
    order they finish)."""
    outs = _RECORDS_OUT.findall(text)
    if not outs:
        raise GuestOutputError(f"no dd summary ('N+M records out') in {text[-300:]!r}")
    copied = _COPIED.findall(text)
    reports = []
    for i, (full, partial) in enumerate(outs):
        nbytes: int | None = None
        seconds: float | None = None
        if len(copied) == len(outs):
            nbytes, seconds = int(copied[i][0]), float(copied[i][1])
        reports.append(DdReport(int(full), int(partial), nbytes, seconds))
    return reports


def timed(command: str) -> str:
    """``command`` between two readings of the guest's /proc/uptime (:func:`parse_times`):
    the guest's clock, not the host's, which also counts the console round trips."""
    return (f"t0=$(cut -d' ' -f1 /proc/uptime); {command}; "
            "echo TIMES $t0 $(cut -d' ' -f1 /proc/uptime)")


def parse_times(text: str) -> float:
    """Seconds between the two readings :func:`timed` printed."""
    m = _TIMES.search(text)
    if not m:
        raise GuestOutputError(f"no 'TIMES start end' line in {text[-300:]!r}")
    seconds = float(m.group(2)) - float(m.group(1))
    if seconds < 0:
        raise GuestOutputError(f"the guest's clock went backwards: {m.group(0)!r}")
    return seconds


def block_requests(stat: str) -> int:
    """Requests a block device completed, from its ``/sys/block/DEV/stat``: reads
    (field 1) + writes (field 5) + flushes (field 15, kernels since 5.5)."""
    try:
        f = [int(x) for x in stat.split()]
    except ValueError:
        raise GuestOutputError(f"not a /sys/block/DEV/stat line: {stat[:200]!r}") from None
    if len(f) < 11:
        raise GuestOutputError(f"a /sys/block/DEV/stat line has at least 11 fields, "
                               f"got {len(f)}: {stat[:200]!r}")
    return f[0] + f[4] + (f[14] if len(f) > 14 else 0)
