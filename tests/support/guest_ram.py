"""Guest RAM as QEMU's ``memory-backend-memfd`` makes it: a memfd sealed against
shrinking and growing, the only memory the device model accepts in DMA_MAP."""

from __future__ import annotations

import fcntl
import os


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes with F_SEAL_SHRINK | F_SEAL_GROW (caller owns it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(fd)
        raise
    return fd
