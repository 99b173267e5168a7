"""CPU time of another process, for the isolation tests' "devd stays calm under
attack" checks (a resource bound, not a speed figure)."""

from __future__ import annotations

import os
import time

_HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _HZ


def cpu_share(pid: int, seconds: float = 1.0) -> float:
    """Share of one core ``pid`` used over the next ``seconds`` of wall time."""
    used, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - used) / (time.monotonic() - start)
