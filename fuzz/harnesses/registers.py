"""The VVU register file (device/vvu.py, device/virtio_pci.py, device/pci.py) called directly.

One :class:`VvuDevice` serves every case (as vvu-devd keeps one per link for the
appliance's life); a case is one "client connection": the operations of
:mod:`fuzz.appliance_ops` applied to the device object, then
``client_disconnected()``, which must bring it back to power-on state. Bad
accesses must be refused with a DeviceError (what the server answers with an
errno); anything else escaping, or logged with a traceback, is a finding, as is
an fd the device keeps after the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import shutil
import tempfile

from fuzz.appliance_ops import (
    DmaMapOp,
    DmaUnmapOp,
    Driver,
    Op,
    Other,
    Read,
    SetIrqs,
    Write,
)
from fuzz.engine import Finding, Harness, run_loop_once
from fuzz.guest_ram import RAM_SIZE, ring_size, scribble, write_ring, write_tx_ring
from fuzz.source import ByteSource
from vvu_runtime.device.errors import DeviceError
from vvu_runtime.device.vvu import VvuDevice

CONSUMER_RAM = 1 << 20


class Appliance:
    """What a case owns on the appliance's side: its RAM and its eventfds."""

    def __init__(self) -> None:
        self.ram_fd = os.memfd_create("vvu-fuzz-appliance-ram",
                                      os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.ram_fd, RAM_SIZE)
        # Sealed against shrinking, as the launcher's appliance RAM is: a device model
        # may refuse to DMA-map a file that could shrink under it.
        fcntl.fcntl(self.ram_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)
        self.view = memoryview(self.ram)
        self.eventfds: list[int] = []

    def fd(self, kind: str) -> int | None:
        """A new fd of ``kind`` (the caller closes it) or None."""
        if kind == "ram":
            return os.dup(self.ram_fd)
        if kind == "event":
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        return None

    def irq_fds(self, n: int) -> list[int]:
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(n)]
        self.eventfds += [os.dup(fd) for fd in fds]
        return fds

    def close(self) -> None:
        self.view.release()
        self.ram.close()
        os.close(self.ram_fd)
        for fd in self.eventfds:
            os.close(fd)


def plan(src: ByteSource, driver: Driver, bring_up: int = 80, extra: int = 24) -> list[Op]:
    """Usually (``bring_up`` %) the bring-up, then up to ``extra`` arbitrary operations."""
    ops: list[Op] = []
    if src.usually(bring_up):
        ops = driver.bring_up(src, max(1, min(ring_size(src, False), 256)))
    ops += [driver.random_op(src) for _ in range(src.below(extra))]
    return ops


class RegistersHarness(Harness):
    name = "registers"
    doc = "VVU register file: config space, BAR reads/writes, queues, status, MSI-X, DMA"
    expected = ()  # per-operation DeviceErrors are caught in the case

    def open(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="vvu-fuzz-registers-")
        path = os.path.join(self.tmp, "consumer.ram")
        with open(path, "wb") as f:
            f.truncate(CONSUMER_RAM)
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(
            lambda loop, ctx: self.loop_errors.append(f"{ctx.get('message')}: "
                                                      f"{ctx.get('exception')!r}"))
        asyncio.set_event_loop(self.loop)
        self.device = VvuDevice(name="fuzz", ram_file=path, max_queues=4)
        self.driver = Driver(self.device)
        # The first trapped access to the shared-memory BAR maps it once (mmap keeps
        # a dup of the fd): do it now, so the fd is part of the leak check's baseline.
        self.device.region_read(2, 0, 4)

    def close(self) -> None:
        self.device.close()
        asyncio.set_event_loop(None)
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_one(self, data: bytes) -> int:
        src = ByteSource(data)
        app = Appliance()
        self.loop_errors.clear()
        done = 0
        try:
            write_ring(app.view, src, 16, False)
            write_tx_ring(app.view, src, 16)
            self.device.client_connected()
            for op in plan(src, self.driver):
                try:
                    self.apply(op, app, src)
                    done += 1
                except DeviceError:
                    pass
                run_loop_once(self.loop)
        finally:
            self.device.client_disconnected()
            run_loop_once(self.loop)
            app.close()
        if self.loop_errors:
            raise Finding("event-loop callback failed: " + "; ".join(self.loop_errors))
        return min(done, 60)

    def apply(self, op: Op, app: Appliance, src: ByteSource) -> None:
        apply_op(self.device, op, app, src)


def apply_op(dev: VvuDevice, op: Op, app: Appliance, src: ByteSource) -> None:
    """Do ``op`` to ``dev`` as the vfio-user server would (DeviceErrors pass through)."""
    if isinstance(op, Read):
        data = dev.region_read(op.region, op.offset, op.count)
        if len(data) != op.count:
            raise Finding(f"region {op.region} read of {op.count} bytes at {op.offset:#x} "
                          f"returned {len(data)}")
    elif isinstance(op, Write):
        dev.region_write(op.region, op.offset, op.data)
    elif isinstance(op, DmaMapOp):
        fd = app.fd(op.fd_kind)
        try:
            dev.dma.map(op.iova, op.size, readable=bool(op.flags & 1),
                        writable=bool(op.flags & 2), fd=fd, fd_offset=op.fd_offset)
        finally:
            if fd is not None:
                os.close(fd)
    elif isinstance(op, DmaUnmapOp):
        if op.flags & 2:
            dev.dma.unmap_all()
        else:
            dev.dma.unmap(op.iova, op.size)
    elif isinstance(op, SetIrqs):
        fds = app.irq_fds(op.nfds)
        try:
            dev.set_irqs(op.flags, op.index, op.start, op.count, fds, op.data)
        finally:
            for fd in fds:
                os.close(fd)
    elif isinstance(op, Other):
        _other(dev, op, app, src)


def _other(dev: VvuDevice, op: Other, app: Appliance, src: ByteSource) -> None:
    if op.what == "scribble":
        scribble(app.view, src)
    elif op.what == "poke":
        for fd in app.eventfds:
            with contextlib.suppress(OSError):
                os.read(fd, 8)  # the driver taking its interrupts
    elif op.what == "reset":
        dev.reset()
    elif op.what == "region_info":
        dev.region_info(op.index)
    elif op.what == "irq_info":
        dev.irq_info(op.index)
