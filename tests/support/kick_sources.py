"""A transport whose kick sources the event loop cannot wait on (a regular file, as a
hostile or buggy transport could hand out), for tests/unit/test_fuzz_findings.py."""

from __future__ import annotations

import os

from vvu_runtime.vhost_user.transport import KickSource, SocketTransport


class RegularFileKick(KickSource):
    """A kick source backed by a memfd: epoll refuses regular files (EPERM)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("kick-that-cannot-be-polled", os.MFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        """Nothing to drain in a file."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RegularFileKickTransport(SocketTransport):
    """The socket transport, except that every kick source is a :class:`RegularFileKick`."""

    def kick_source(self, index: int, fd: int | None) -> KickSource | None:
        if fd is not None:
            os.close(fd)
        return RegularFileKick()
