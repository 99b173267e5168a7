"""A minimal virtio-blk driver for tests: builds requests in a front-end's guest RAM.

Shared by the tests that drive vvu-blk through a vhost-user session on a socket
(test_blk_session) and through the whole VVU chain (test_driver_vvu).
"""

from __future__ import annotations

from typing import Any

from vvu_runtime.vhost_user.frontend import DriverQueue, GuestRam
from vvu_runtime.virtio.blk import BlkRequestHeader


class BlkDriver:
    """Requests on one DriverQueue, their buffers allocated in ``ram``."""

    def __init__(self, dq: DriverQueue, ram: GuestRam) -> None:
        self.dq = dq
        self.ram = ram

    def submit(self, rtype: int, sector: int = 0, out: bytes = b"", into: int = 0,
               token: Any = None) -> tuple[int, int]:
        """Queue a request; returns (data gpa, status gpa)."""
        ram = self.ram
        hdr = ram.alloc(16)
        ram.view(hdr, 16)[:] = BlkRequestHeader(rtype, 0, sector).pack()
        readable = [(hdr, 16)]
        if out:
            src = ram.alloc(len(out))
            ram.view(src, len(out))[:] = out
            readable.append((src, len(out)))
        data = ram.alloc(into) if into else 0
        status = ram.alloc(1)
        ram.view(status, 1)[0] = 0xFF
        writable = ([(data, into)] if into else []) + [(status, 1)]
        self.dq.ring.add(readable, writable, token=(data, status) if token is None else token)
        return data, status

    def complete(self, expected: int) -> list[tuple[Any, int]]:
        """Kick, then collect ``expected`` completions as (token, written)."""
        self.dq.kick()
        done: list[tuple[Any, int]] = []
        while len(done) < expected:
            assert self.dq.wait_call(), f"only {len(done)} of {expected} requests completed"
            done += self.dq.ring.get_used()
        return done

    def status(self, status_gpa: int) -> int:
        return self.ram.view(status_gpa, 1)[0]

    def run(self, rtype: int, sector: int = 0, out: bytes = b"", into: int = 0
            ) -> tuple[int, bytes]:
        """One request to completion: (status, bytes read)."""
        data, st = self.submit(rtype, sector, out, into)
        ((token, written),) = self.complete(1)
        assert token == (data, st) and written == into + 1
        return self.status(st), bytes(self.ram.view(data, into)) if into else b""
