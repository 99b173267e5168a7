"""A vhost-user back-end session (vhost_user/backend.py) driving a real virtio-blk device.

Each case is one connection: a fresh :class:`BackendSession` over a real AF_UNIX
socketpair, serving a fresh :class:`BlkDevice` on a sparse image in a temp dir.
The input is a message sequence: usually the bring-up a front-end does
(features, owner, memory table, ring size/base/addresses, call/kick, enable),
with its fields mostly right, then arbitrary requests of any kind, kicks and
driver scribbles on the rings. Fd-carrying messages carry real fds: dups of the
guest-RAM memfd (64 KiB with rings laid out by :mod:`fuzz.guest_ram`), eventfds,
a socketpair end for the back-end channel, a memfd for the dirty log; sometimes
the wrong kind. Messages reach the session either as frames
(``handle_frame``) or as bytes and SCM_RIGHTS through the socket (the
channel's framing). Replies are drained from the front-end's end.

The session must survive everything (refusing with an ack, an empty reply or a
dropped connection); a finding is an exception out of it, an exception it logs
as internal, an error in an event-loop callback, or an fd left open after
``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import shutil
import socket
import tempfile
from typing import Any

from fuzz.engine import Finding, Harness, run_loop_once
from fuzz.guest_ram import (
    AVAIL_AT,
    DESC_AT,
    RAM_SIZE,
    REGION_B,
    REGION_SIZE,
    USED_AT,
    UVA,
    ring_size,
    scribble,
    write_ring,
)
from fuzz.peer import drain
from fuzz.source import ByteSource
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.fds import rights
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.backend import BackendSession, SessionState
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.server import backend_channel
from vvu_runtime.vhost_user.transport import Frame
from vvu_runtime.virtio.memory import MemoryRegion

IMAGE_SIZE = 1 << 20
VIRTIO_F_RING_PACKED = 1 << 34
_BRING_UP = (FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.SET_PROTOCOL_FEATURES,
             FR.SET_OWNER, FR.SET_FEATURES, FR.SET_MEM_TABLE, FR.SET_VRING_NUM, FR.SET_VRING_BASE,
             FR.SET_VRING_ADDR, FR.SET_VRING_CALL, FR.SET_VRING_KICK, FR.SET_VRING_ENABLE)
_ALL = tuple(FR)
_STATES = {SessionState.AWAITING_OWNER: 0, SessionState.NEGOTIATING: 1,
           SessionState.RUNNING: 2, SessionState.CLOSED: 3}
_ANC = socket.CMSG_SPACE(16 * 4)


class _Case:
    """What one connection holds on the harness's side (closed at the end of the case)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.kicks: list[int] = []
        self.socks: list[socket.socket] = []

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for s in self.socks:
            s.close()


class SessionHarness(Harness):
    name = "session"
    doc = "vhost-user back-end session + virtio-blk device fed message sequences"

    def open(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="vvu-fuzz-session-")
        path = os.path.join(self.tmp, "disk.img")
        with open(path, "wb") as f:
            f.truncate(IMAGE_SIZE)
        self.image = RawImage(path)
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        self.ram_fd = os.memfd_create("vvu-fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, RAM_SIZE)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)
        self.view = memoryview(self.ram)
        self.packed = False
        self.size = 16
        self.log_fd = os.memfd_create("vvu-fuzz-log", os.MFD_CLOEXEC)
        os.ftruncate(self.log_fd, 4096)

    def close(self) -> None:
        self.view.release()
        self.ram.close()
        os.close(self.ram_fd)
        os.close(self.log_fd)
        self.image.close()
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.loop_errors.append(f"{context.get('message')}: {exc!r}")

    # ------------------------------------------------------------------ fds to send
    def _fd(self, src: ByteSource, case: _Case, kind: str) -> int:
        """An fd of ``kind`` (sometimes another kind: the front-end lies)."""
        if src.chance(6):
            kind = src.pick(("ram", "event", "log", "pipe", "socket", "devnull"))
        if kind == "ram":
            return os.dup(self.ram_fd)
        if kind == "log":
            return os.dup(self.log_fd)
        if kind == "event":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            case.kicks.append(os.dup(fd))
            case.fds.append(case.kicks[-1])
            return fd
        if kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            keep, give = (r, w) if src.chance(50) else (w, r)
            case.fds.append(keep)
            return give
        if kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            b.setblocking(False)
            case.socks.append(b)
            return a.detach()
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    # ------------------------------------------------------------------ messages
    def _region(self, src: ByteSource, which: int) -> MemoryRegion:
        if which == 0:
            region = MemoryRegion(0, REGION_SIZE, UVA, 0)
        else:
            region = MemoryRegion(REGION_B, REGION_SIZE, UVA + REGION_B, REGION_SIZE)
        if src.chance(10):
            region = MemoryRegion(src.edge_int(64, region.guest_phys_addr),
                                  src.edge_int(64, region.memory_size),
                                  src.edge_int(64, region.userspace_addr),
                                  src.edge_int(64, region.mmap_offset))
        return region

    def _message(self, src: ByteSource, request: FR, session: BackendSession,
                 case: _Case) -> tuple[int, bytes, list[int]]:
        """(flags, payload, fds) of ``request``, fields mostly right."""
        nq = len(session.vrings)
        index = src.below(nq) if src.usually(90) else src.edge_int(32, nq)
        fds: list[int] = []
        payload: m.Payload | bytes
        if request is FR.SET_FEATURES:
            offered = session.offered_features
            value = offered if self.packed else offered & ~VIRTIO_F_RING_PACKED
            if src.chance(30):
                value = offered & src.uint(8)
            payload = m.U64(src.edge_int(64, value))
        elif request is FR.SET_PROTOCOL_FEATURES:
            payload = m.U64(src.edge_int(64, session.offered_protocol_features))
        elif request is FR.SET_MEM_TABLE:
            n = src.pick((1, 2, 0, 3))
            regions = tuple(self._region(src, i % 2) for i in range(n))
            payload = m.MemoryTable(regions)
            fds = [self._fd(src, case, "ram") for _ in range(n)]
        elif request in (FR.ADD_MEM_REG, FR.REM_MEM_REG):
            payload = m.SingleRegion(self._region(src, src.below(2)))
            fds = [self._fd(src, case, "ram")]
        elif request is FR.SET_LOG_BASE:
            payload = m.LogArea(src.edge_int(64, 64), src.edge_int(64, 0))
            fds = [self._fd(src, case, "log")]
        elif request is FR.SET_LOG_FD:
            fds = [self._fd(src, case, "event")]
            payload = m.EMPTY
        elif request in (FR.SET_VRING_NUM, FR.SET_VRING_BASE, FR.GET_VRING_BASE,
                         FR.SET_VRING_ENABLE, FR.VRING_KICK, FR.SET_VRING_ENDIAN):
            usual = {FR.SET_VRING_NUM: self.size,
                     FR.SET_VRING_ENABLE: 1}.get(request, 0)
            payload = m.VringState(index, src.edge_int(32, usual))
        elif request is FR.SET_VRING_ADDR:
            payload = m.VringAddr(index, src.edge_int(32, 0), UVA + src.edge_int(16, DESC_AT),
                                  UVA + src.edge_int(16, USED_AT),
                                  UVA + src.edge_int(16, AVAIL_AT), src.edge_int(64, USED_AT))
        elif request in (FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR):
            nofd = src.chance(10)
            payload = m.VringFile(index, nofd)
            if not nofd:
                fds = [self._fd(src, case, "event")]
        elif request is FR.SET_BACKEND_REQ_FD:
            fds = [self._fd(src, case, "socket")]
            payload = m.EMPTY
        elif request in (FR.GET_CONFIG, FR.SET_CONFIG):
            size = src.pick((4, 8, 1, 60, 0, 255))
            payload = m.ConfigSpace(src.below(72), src.below(2), src.take(size))
        elif request in (FR.GET_INFLIGHT_FD, FR.SET_INFLIGHT_FD):
            payload = m.Inflight(src.edge_int(64, 4096), src.edge_int(64, 0),
                                 src.edge_int(16, 1), src.edge_int(16, 16))
            if request is FR.SET_INFLIGHT_FD:
                fds = [self._fd(src, case, "log")]
        elif request is FR.SET_STATUS:
            payload = m.U64(src.edge_int(64, src.pick((0, 1, 3, 11, 15, 0x40, 0x80))))
        else:
            spec = m.FRONTEND_TABLE[request]
            payload = src.take(src.pick(spec.sizes))
            lo, hi = spec.fds
            fds = [self._fd(src, case, "event") for _ in range(lo + src.below(hi - lo + 1))]
        data = payload if isinstance(payload, bytes) else payload.pack()
        flags = m.VERSION | (int(m.HeaderFlags.NEED_REPLY) if src.chance(30) else 0)
        if src.chance(3):
            flags = src.uint(4)
        if src.chance(3):
            data = src.take(src.below(300))
        if src.chance(3):  # one fd too few or too many
            if fds and src.chance(50):
                os.close(fds.pop())
            else:
                fds.append(self._fd(src, case, "event"))
        return flags, data, fds

    # ------------------------------------------------------------------ a case
    def run_one(self, data: bytes) -> int:
        src = ByteSource(data)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.setblocking(False)
        case = _Case()
        case.socks.append(b)
        device = BlkDevice(self.image, queues=1 + src.below(2))
        self.packed = src.chance(20)
        self.size = max(1, min(ring_size(src, self.packed), 256))
        write_ring(self.view, src, self.size, self.packed)
        self.loop_errors.clear()
        try:
            session = BackendSession(backend_channel(a, "fuzz"), device, loop=self.loop,
                                     name="fuzz")
        except BaseException:
            a.close()
            case.close()
            raise
        steps = 0
        try:
            session.start()
            script: list[FR] = [] if src.chance(25) else list(_BRING_UP)
            for _ in range(src.below(12)):
                script.append(src.pick(_ALL) if src.usually(70) else src.pick(_BRING_UP))
            for request in script:
                if session.closed:
                    break
                self._step(src, request, session, case, b)
                steps += 1
                self._between(src, session, case)
            depth = steps * 4 + _STATES[session.state]
        finally:
            session.close()
            run_loop_once(self.loop)
            drain(b, _ANC)
            case.close()
        if self.loop_errors:
            raise Finding("event-loop callback failed: " + "; ".join(self.loop_errors))
        return depth

    def _step(self, src: ByteSource, request: FR, session: BackendSession, case: _Case,
              peer: socket.socket) -> None:
        code = int(request) if src.usually(97) else src.uint(4)
        flags, payload, fds = self._message(src, request, session, case)
        if src.chance(10):
            # Through the socket: the channel's framing and SCM_RIGHTS.
            wire = m.format_message(code, flags, payload)
            if src.chance(5):
                wire = wire[:src.below(len(wire) + 1)]
            anc = rights(fds)
            try:
                peer.sendmsg([wire], anc)
            except BlockingIOError:
                pass
            finally:
                for fd in fds:
                    os.close(fd)
            session._on_readable()
        else:
            session.handle_frame(Frame(code, flags, payload, fds))
        drain(peer, _ANC)

    def _between(self, src: ByteSource, session: BackendSession, case: _Case) -> None:
        """Kicks, driver scribbles and a turn of the event loop."""
        while src.chance(30):
            if case.kicks and src.chance(60):
                with contextlib.suppress(OSError):
                    os.eventfd_write(src.pick(case.kicks), 1)
            else:
                scribble(self.view, src)
        run_loop_once(self.loop)

    def seeds(self) -> list[bytes]:
        return [b"", bytes(256), bytes([0xFF]) * 256]
