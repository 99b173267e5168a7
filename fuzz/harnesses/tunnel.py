"""The consumer side of a VVU device (device/tunnel.py): a hostile vhost-user front-end.

One :class:`VvuDevice` with its :class:`VhostUserTunnel` listening on a real
UNIX socket serves every case, as in vvu-devd. A case: the appliance brings
the function up (operations of :mod:`fuzz.appliance_ops` applied to the device,
rxq offering page-sized buffers, BACKEND_UP), a consumer connects to the
tunnel's socket and sends vhost-user messages (mostly a front-end's bring-up,
then anything) with real fds: the provisioned RAM file, a foreign memfd,
eventfds, a socketpair end for back-end requests, sometimes the wrong kind.
Between messages the appliance reposts rx buffers, answers through txq, rings
doorbells, and the consumer kicks. Then the consumer hangs up and the
appliance's client goes: the tunnel must be back to waiting, with every fd of
the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from typing import Any

from fuzz.appliance_ops import COMMON_BAR, NOTIFY_AT, Driver, Write
from fuzz.engine import Finding, Harness, run_loop_once
from fuzz.guest_ram import repost_rx, write_rx_ring, write_tx_ring
from fuzz.harnesses.codec import _payload
from fuzz.harnesses.registers import CONSUMER_RAM, Appliance, apply_op
from fuzz.peer import drain
from fuzz.source import ByteSource
from vvu_runtime.device.errors import DeviceError
from vvu_runtime.device.tunnel import VhostUserTunnel
from vvu_runtime.device.vvu import VvuDevice
from vvu_runtime.fds import rights
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.virtio.memory import MemoryRegion
from vvu_runtime.virtio.vvu_abi import AUX_BAR, DOORBELL_OFFSET

_BRING_UP = (FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.SET_PROTOCOL_FEATURES,
             FR.SET_OWNER, FR.SET_FEATURES, FR.SET_MEM_TABLE, FR.SET_VRING_NUM,
             FR.SET_VRING_BASE, FR.SET_VRING_ADDR, FR.SET_VRING_KICK, FR.SET_VRING_CALL)
_CODES = tuple(sorted(m.FRONTEND_TABLE))
_ANC = socket.CMSG_SPACE(16 * 4)
CONSUMER_UVA = 0x7F10_0000_0000


class TunnelHarness(Harness):
    name = "tunnel"
    doc = "VVU device's vhost-user tunnel fed by a hostile consumer front-end"
    expected = ()

    def open(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="vvu-fuzz-tunnel-")
        self.ram_path = os.path.join(self.tmp, "consumer.ram")
        with open(self.ram_path, "wb") as f:
            f.truncate(CONSUMER_RAM)
        self.sock_path = os.path.join(self.tmp, "vhost-user.sock")
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        asyncio.set_event_loop(self.loop)
        self.device = VvuDevice(name="fuzz", ram_file=self.ram_path, max_queues=4)
        self.device.region_read(2, 0, 4)  # map BAR2 once (see the registers harness)
        self.driver = Driver(self.device)
        self.tunnel = VhostUserTunnel(self.device, self.sock_path, loop=self.loop)
        self.tunnel.start()

    def close(self) -> None:
        self.tunnel.close()
        run_loop_once(self.loop)
        self.device.close()
        asyncio.set_event_loop(None)
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    # ------------------------------------------------------------------ the consumer
    def _fd(self, src: ByteSource, kind: str, keep: list[int]) -> int:
        if src.chance(6):
            kind = src.pick(("ram", "event", "memfd", "socket", "devnull"))
        if kind == "ram":
            return os.open(self.ram_path, os.O_RDWR | os.O_CLOEXEC)
        if kind == "memfd":
            fd = os.memfd_create("vvu-fuzz-foreign", os.MFD_CLOEXEC)
            os.ftruncate(fd, CONSUMER_RAM)
            return fd
        if kind == "event":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            keep.append(os.dup(fd))
            return fd
        if kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            keep.append(b.detach())
            return a.detach()
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def _message(self, src: ByteSource, request: int, keep: list[int]
                 ) -> tuple[bytes, list[int]]:
        spec = m.FRONTEND_TABLE[request]
        fds: list[int] = []
        if request in (FR.SET_MEM_TABLE, FR.ADD_MEM_REG, FR.REM_MEM_REG):
            region = MemoryRegion(0, CONSUMER_RAM, CONSUMER_UVA, 0)
            if src.chance(15):
                region = MemoryRegion(src.edge_int(64, 0), src.edge_int(64, CONSUMER_RAM),
                                      CONSUMER_UVA, src.edge_int(64, 0))
            payload: m.Payload = (m.MemoryTable((region,)) if request is FR.SET_MEM_TABLE
                                  else m.SingleRegion(region))
            data = payload.pack()
            fds = [self._fd(src, "ram", keep)]
        elif request is FR.SET_FEATURES:
            data = m.U64(src.edge_int(64, 1 << 32 | m.VHOST_USER_F_PROTOCOL_FEATURES)).pack()
        elif request is FR.SET_PROTOCOL_FEATURES:
            data = m.U64(src.edge_int(64, 0x3FFFF)).pack()
        elif request is FR.SET_VRING_NUM:
            data = m.VringState(src.below(5), src.edge_int(32, 256)).pack()
        elif request in (FR.SET_VRING_KICK, FR.SET_VRING_CALL, FR.SET_VRING_ERR):
            nofd = src.chance(10)
            data = m.VringFile(src.below(5), nofd).pack()
            fds = [] if nofd else [self._fd(src, "event", keep)]
        else:
            data = _payload(src, spec.payload, src.pick(spec.sizes))
            lo, hi = spec.fds
            kind = "socket" if request is FR.SET_BACKEND_REQ_FD else "event"
            fds = [self._fd(src, kind, keep) for _ in range(lo + src.below(hi - lo + 1))]
        flags = m.VERSION | (int(m.HeaderFlags.NEED_REPLY) if src.chance(30) else 0)
        if src.chance(3):
            flags = src.uint(4)
        wire = m.format_message(request, flags, data)
        if src.chance(3):
            wire = wire[:src.below(len(wire) + 1)]
        return wire, fds

    # ------------------------------------------------------------------ a case
    def run_one(self, data: bytes) -> int:
        src = ByteSource(data)
        app = Appliance()
        keep: list[int] = []
        consumer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        consumer.setblocking(False)
        self.loop_errors.clear()
        steps = 0
        try:
            write_rx_ring(app.view, src)
            self.device.client_connected()
            # The appliance side is the registers harness's business: a clean bring-up.
            for op in self.driver.bring_up(ByteSource(b""), 16):
                with contextlib.suppress(DeviceError):
                    apply_op(self.device, op, app, src)
            run_loop_once(self.loop)
            if self.tunnel.state == "accepting":
                # (connecting while it is not would leave us in the listen backlog,
                # to be accepted in a later case as a connection already closed)
                with contextlib.suppress(OSError):
                    consumer.connect(self.sock_path)
                run_loop_once(self.loop)
            script: list[int] = [] if src.chance(20) else list(_BRING_UP)
            script += [src.pick(_CODES) for _ in range(src.below(10))]
            for request in script:
                self._consumer_sends(src, consumer, request, keep)
                while src.chance(40):
                    self._appliance_acts(src, app, keep)
                run_loop_once(self.loop)
                drain(consumer, _ANC, (OSError,))
                steps += 1
        finally:
            consumer.close()
            run_loop_once(self.loop)
            self.device.client_disconnected()
            run_loop_once(self.loop)
            app.close()
            for fd in keep:
                os.close(fd)
        if self.tunnel.conn is not None:
            raise Finding(f"tunnel still {self.tunnel.state} after both sides left")
        if self.loop_errors:
            raise Finding("event-loop callback failed: " + "; ".join(self.loop_errors))
        return steps

    def _consumer_sends(self, src: ByteSource, consumer: socket.socket, request: int,
                        keep: list[int]) -> None:
        wire, fds = self._message(src, request, keep)
        anc = rights(fds)
        try:
            consumer.sendmsg([wire], anc)
        except OSError:
            pass  # the tunnel dropped us, or the buffer is full
        finally:
            for fd in fds:
                os.close(fd)

    def _appliance_acts(self, src: ByteSource, app: Appliance, keep: list[int]) -> None:
        what = src.below(6)
        if what == 0:  # rx buffers back, and tell the device
            repost_rx(app.view)
            op: Any = Write(COMMON_BAR, NOTIFY_AT, (0).to_bytes(2, "little"))
        elif what == 1:  # replies / back-end requests in txq
            write_tx_ring(app.view, src, 16)
            op = Write(COMMON_BAR, NOTIFY_AT + 4, (1).to_bytes(2, "little"))
        elif what == 2:  # a doorbell: call / err / log of some queue
            op = Write(AUX_BAR, DOORBELL_OFFSET + 4 * src.below(10), (1).to_bytes(4, "little"))
        elif what == 3 and keep:  # the consumer kicks
            with contextlib.suppress(OSError):
                os.eventfd_write(src.pick(keep), 1)
            return
        else:
            op = self.driver.random_op(src)
        with contextlib.suppress(DeviceError):
            apply_op(self.device, op, app, src)
