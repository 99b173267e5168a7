"""What QEMU's ivshmem-doorbell does with vvu-devd's ivshmem server, in a thread.

It reads the setup (version, own ID, shared memory), then per message installs
an eventfd as the next vector of that peer (making it non-blocking, as QEMU's
``process_msg_connect`` does: the server's fence receipt) or, for an ID without
an fd, removes the peer. :meth:`ring` is a Doorbell write (``peer << 16 |
vector``). ``reused`` lists IDs that got vectors after their removal: real QEMU
writes freed memory then (its vector array is freed and never reallocated), so
tests demand it stays empty. tests/integration/test_doorbell_qemu.py checks the
same against real QEMU.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from pathlib import Path

MESSAGE = struct.Struct("<q")


class IvshmemStandIn(threading.Thread):
    def __init__(self, path: Path | str) -> None:
        super().__init__(daemon=True, name="ivshmem-stand-in")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.lock = threading.Lock()
        self.setup: list[int] = []
        self.shm: int | None = None
        self.vectors: dict[int, list[int]] = {}
        self.removed: list[int] = []
        self.reused: list[int] = []
        self.rung = 0
        self.missed = 0

    def run(self) -> None:
        while True:
            fds = array.array("i")
            try:
                data, anc, _, _ = self.sock.recvmsg(MESSAGE.size,
                                                    socket.CMSG_SPACE(4 * fds.itemsize))
            except OSError:
                return
            if len(data) < MESSAGE.size:
                return
            for _, _, blob in anc:
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
            value = MESSAGE.unpack(data)[0]
            with self.lock:
                self._handle(value, fds[0] if fds else None)

    def _handle(self, value: int, fd: int | None) -> None:
        if len(self.setup) < 2:
            self.setup.append(value)
            return
        if value == -1:
            self.shm = fd
            return
        if fd is None:
            self.removed.append(value)
            for old in self.vectors.pop(value, []):
                os.close(old)
            return
        if value in self.removed:
            self.reused.append(value)
        os.set_blocking(fd, False)  # what QEMU does: the server's receipt
        self.vectors.setdefault(value, []).append(fd)

    def ring(self, value: int) -> bool:
        """A Doorbell write: signal vector ``value & 0xffff`` of peer ``value >> 16``."""
        with self.lock:
            self.rung += 1
            fds = self.vectors.get(value >> 16, [])
            vector = value & 0xFFFF
            if vector >= len(fds):
                self.missed += 1
                return False
            os.eventfd_write(fds[vector], 1)
            return True

    def installed(self, peer: int) -> list[int]:
        with self.lock:
            return list(self.vectors.get(peer, []))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.join(5.0)
        self.sock.close()
        with self.lock:
            for fds in self.vectors.values():
                for fd in fds:
                    os.close(fd)
            self.vectors.clear()
            if self.shm is not None:
                os.close(self.shm)
                self.shm = None
