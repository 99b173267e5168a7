"""The vfio-user server (device/vfio_user/server.py, protocol.py) with a VvuDevice behind it.

One server and one :class:`VvuDevice` serve every case, as in vvu-devd; a case
is one client connection over a real AF_UNIX socketpair (``server.attach``):
usually VERSION first, then the operations of :mod:`fuzz.appliance_ops`
encoded as vfio-user messages (region reads and writes, posted writes,
REGION_WRITE_MULTI, DMA_MAP with a memfd passed by SCM_RIGHTS, DMA_UNMAP,
SET_IRQS with eventfds, info queries, DEVICE_RESET), mixed with malformed ones
(bad sizes, unknown commands, reply/error flags, hostile VERSION JSON, too many
fds, truncated messages). The event loop runs between messages and the
replies are drained. Then the client hangs up: the server must be back to IDLE
with every fd of the connection closed.

A finding is an exception out of the loop's callbacks, an "internal error" the
server logged with a traceback (it answers EIO and goes on, but the input
reached code outside the device's error tree), a server not back to IDLE, or a
leaked fd.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import tempfile
from typing import Any

from fuzz.appliance_ops import DmaMapOp, DmaUnmapOp, Driver, Op, Other, Read, SetIrqs, Write
from fuzz.engine import Finding, Harness, run_loop_once
from fuzz.guest_ram import write_ring, write_tx_ring
from fuzz.harnesses.registers import CONSUMER_RAM, Appliance, plan
from fuzz.peer import drain
from fuzz.source import ByteSource
from vvu_runtime.device.vfio_user.protocol import (
    Command,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    Header,
    IrqInfo,
    IrqSet,
    MsgFlags,
    RegionAccess,
    RegionInfo,
    Version,
    WriteMultiEntry,
)
from vvu_runtime.device.vfio_user.server import ServerState, VfioUserServer
from vvu_runtime.device.vvu import VvuDevice
from vvu_runtime.fds import rights

_ANC = socket.CMSG_SPACE(32 * 4)
_U64 = struct.Struct("<Q")


def _version_payload(src: ByteSource) -> bytes:
    mode = src.below(16)
    if mode < 10:
        return Version(0, 0, {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}).pack()
    if mode == 10:
        return Version(src.below(3), src.below(3)).pack()
    if mode == 11:  # deeply nested JSON
        depth = src.pick((10, 1000, 100_000))
        return struct.pack("<HH", 0, 0) + b"[" * depth + b"]" * depth + b"\0"
    if mode == 12:  # a huge number
        digits = src.pick((10, 5000, 100_000))
        return struct.pack("<HH", 0, 0) + b'{"capabilities":{"x":' + b"9" * digits + b"}}\0"
    if mode == 13:
        return struct.pack("<HH", 0, 0) + src.take(src.below(64))
    if mode == 14:
        return struct.pack("<HH", 0, 0) + b'{"capabilities":' + src.pick(
            (b"[]", b"1", b'"x"', b"null", b"{}")) + b"}\0"
    return src.take(src.below(8))


class VfioUserHarness(Harness):
    name = "vfio-user"
    doc = "vfio-user server + VvuDevice fed message streams over a socketpair"
    expected = ()

    def open(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="vvu-fuzz-vfio-user-")
        path = os.path.join(self.tmp, "consumer.ram")
        with open(path, "wb") as f:
            f.truncate(CONSUMER_RAM)
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        asyncio.set_event_loop(self.loop)
        self.device = VvuDevice(name="fuzz", ram_file=path, max_queues=4)
        self.device.region_read(2, 0, 4)  # map BAR2 once (see the registers harness)
        self.driver = Driver(self.device)
        self.server = VfioUserServer(self.device, loop=self.loop)
        self.msg_id = 0

    def close(self) -> None:
        self.server.close()
        run_loop_once(self.loop)
        self.device.close()
        asyncio.set_event_loop(None)
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    # ------------------------------------------------------------------ encoding
    def _frame(self, src: ByteSource, command: int, payload: bytes,
               flags: int = MsgFlags.COMMAND) -> bytes:
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        size = 16 + len(payload)
        if src.chance(4):
            flags = src.pick((int(MsgFlags.REPLY), int(MsgFlags.ERROR), src.uint(4)))
        if src.chance(3):
            size = src.edge_int(32, size)
        return Header(self.msg_id, command, size, flags, 0).pack() + payload

    def _encode(self, src: ByteSource, op: Op, app: Appliance) -> tuple[bytes, list[int]]:
        """One message (and the fds it carries) for ``op``."""
        if isinstance(op, Read):
            return self._frame(src, Command.REGION_READ,
                               RegionAccess(op.offset, op.region, op.count).pack()), []
        if isinstance(op, Write):
            access = RegionAccess(op.offset, op.region, len(op.data)).pack() + op.data
            if len(op.data) <= WriteMultiEntry.MAX_DATA and src.chance(20):
                entry = WriteMultiEntry(op.offset, op.region, len(op.data),
                                        op.data.ljust(8, b"\0")).pack()
                n = src.pick((1, 2, 0))
                return self._frame(src, Command.REGION_WRITE_MULTI,
                                   _U64.pack(n) + entry * n), []
            flags = int(MsgFlags.NO_REPLY) if src.chance(30) else int(MsgFlags.COMMAND)
            return self._frame(src, Command.REGION_WRITE, access, flags), []
        if isinstance(op, DmaMapOp):
            fd = app.fd(op.fd_kind)
            payload = DmaMap(DmaMap.STRUCT.size, op.flags, op.fd_offset, op.iova,
                             op.size).pack()
            return self._frame(src, Command.DMA_MAP, payload), [fd] if fd is not None else []
        if isinstance(op, DmaUnmapOp):
            payload = DmaUnmap(DmaUnmap.STRUCT.size, op.flags, op.iova, op.size).pack()
            return self._frame(src, Command.DMA_UNMAP, payload), []
        if isinstance(op, SetIrqs):
            payload = IrqSet(src.edge_int(32, IrqSet.STRUCT.size + len(op.data)), op.flags,
                             op.index, op.start, op.count).pack() + op.data
            return self._frame(src, Command.DEVICE_SET_IRQS, payload), app.irq_fds(op.nfds)
        assert isinstance(op, Other)
        if op.what == "reset":
            return self._frame(src, Command.DEVICE_RESET, b""), []
        if op.what == "region_info":
            argsz = src.pick((32, 64, 256, 0, 31))
            return self._frame(src, Command.DEVICE_GET_REGION_INFO,
                               RegionInfo(argsz, 0, op.index, 0, 0, 0).pack()), []
        if op.what == "irq_info":
            return self._frame(src, Command.DEVICE_GET_IRQ_INFO,
                               IrqInfo(16, 0, op.index, 0).pack()), []
        if op.what == "info":
            return self._frame(src, Command.DEVICE_GET_INFO,
                               DeviceInfo(src.pick((16, 0, 100)), 0, 0, 0).pack()), []
        # a raw message: any command, any payload
        command = src.below(20) if src.usually(80) else src.uint(2)
        return self._frame(src, command, src.take(src.below(64))), []

    # ------------------------------------------------------------------ a case
    def run_one(self, data: bytes) -> int:
        src = ByteSource(data)
        app = Appliance()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self.loop_errors.clear()
        sent = 0
        messages: list[tuple[bytes, list[int]]] = []
        try:
            write_ring(app.view, src, 16, False)
            write_tx_ring(app.view, src, 16)
            self.server.attach(theirs)
            if not src.chance(10):
                messages.append((self._frame(src, Command.VERSION, _version_payload(src)), []))
            messages += [self._encode(src, op, app) for op in plan(src, self.driver, 40, 12)]
            for i, (wire, fds) in enumerate(messages):
                messages[i] = (b"", [])  # sent or not, its fds are closed below
                if src.chance(3):
                    wire = wire[:src.below(len(wire) + 1)]  # the rest never comes
                if src.chance(2):
                    fds = fds + app.irq_fds(src.pick((1, 17, 40)))
                try:
                    anc = rights(fds)
                    ours.sendmsg([wire], anc)
                    sent += 1
                except OSError:
                    pass  # the server hung up, or too many fds for one message
                finally:
                    for fd in fds:
                        os.close(fd)
                run_loop_once(self.loop)
                drain(ours, _ANC)
                if self.server.state is not ServerState.CONNECTED:
                    break
        finally:
            ours.close()
            run_loop_once(self.loop)
            app.close()
            for _, fds in messages:
                for fd in fds:
                    os.close(fd)
        if self.server.state is not ServerState.IDLE:
            session = self.server.session
            if session is not None:
                session.close("fuzz: forced after the client left")
            raise Finding(f"server still {self.server.state.value} after the client hung up")
        if self.loop_errors:
            raise Finding("event-loop callback failed: " + "; ".join(self.loop_errors))
        return min(sent, 60)
