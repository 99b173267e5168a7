"""Looking at processes by pid: alive or not, and whose they are.

Used wherever vvu finds its own processes again from recorded pids (the lab
supervisor, ``vvu-launch down``, QEMU machines): a pid may have been reused by
then, so a pid only counts as ours if its command line names our path.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["pid_alive", "pid_mentions"]


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, not reaped yet, does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def pid_mentions(pid: int, path: str | Path) -> bool:
    """Whether process ``pid``'s command line names ``path`` or something under it.

    An argument must be the path itself or contain it followed by ``/`` (so lab
    ``a`` never matches lab ``a2``).
    """
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = str(path).rstrip("/").encode()
    return any(a == want or want + b"/" in a for a in args)
