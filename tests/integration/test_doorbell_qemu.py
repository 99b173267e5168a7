"""The doorbell bypass against real QEMU: vvu-devd's ivshmem server (in-process here,
on its own loop thread) and the tools tree's ``ivshmem-doorbell``, poked through
qtest instead of a guest (no firmware, no kernel: a few seconds even under TCG).

What it shows: QEMU takes the server's setup at realize; it installs a peer's
announcement and marks each eventfd non-blocking (the fence receipt the server
waits for); a 32-bit write of ``peer << 16 | vector`` to BAR0 + 12 signals that
vector's eventfd - the consumer's call - while vvu-devd's loop is blocked, so
nothing of vvu-devd is on that path; a re-announcement moves the vector to the
new eventfd, and a peer without calls has no vectors left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.launch_lab import processes_mentioning
from tests.support.loop_thread import LoopThread
from vvu_runtime.device.ivshmem import DoorbellPeer, IvshmemServer
from vvu_runtime.launch.toolchain import Toolchain
from vvu_runtime.virtio.vvu_abi import (
    DOORBELL_OWNER_ID,
    IVSHMEM_DEVICE_ID,
    IVSHMEM_DOORBELL,
    IVSHMEM_IVPOSITION,
    IVSHMEM_VENDOR_ID,
    ivshmem_doorbell,
)

pytestmark = pytest.mark.integration

SLOT = 5
BAR0 = 0xFE000000
VECTORS = 3
TIMEOUT = 30.0


class Qtest:
    """QEMU's qtest protocol on a socket QEMU connected to: one line out, one line back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise AssertionError(f"QEMU closed qtest during {line!r}")
                self.buf += chunk
            reply, self.buf = self.buf.split(b"\n", 1)
            text = reply.decode()
            if text.startswith("IRQ"):
                continue  # asynchronous, not an answer
            if not text.startswith("OK"):
                raise AssertionError(f"qtest {line!r}: {text}")
            return text[2:].strip()

    def config_read(self, reg: int) -> int:
        self.cmd(f"outl 0xcf8 {0x80000000 | SLOT << 11 | reg:#x}")
        return int(self.cmd("inl 0xcfc"), 16)

    def config_write(self, reg: int, value: int) -> None:
        self.cmd(f"outl 0xcf8 {0x80000000 | SLOT << 11 | reg:#x}")
        self.cmd(f"outl 0xcfc {value:#x}")


def drained(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait(cond: object, what: str, timeout: float = TIMEOUT) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def qemu_companion(toolchain: Toolchain, tmp_path: Path
                   ) -> Iterator[tuple[LoopThread, IvshmemServer, DoorbellPeer, Qtest]]:
    lt = LoopThread()
    path = str(tmp_path / "doorbell.sock")

    def build() -> tuple[IvshmemServer, DoorbellPeer]:
        server = IvshmemServer(path, vectors=VECTORS, loop=lt.loop)
        peer = server.add_peer("disk")
        server.start()
        return server, peer

    server, peer = lt.call(build)
    qtest_path = str(tmp_path / "qtest.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(qtest_path)
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    log = (tmp_path / "qemu.log").open("wb")
    argv = toolchain.command([
        "qemu-system-x86_64", "-M", "q35", "-accel", "qtest", "-display", "none",
        "-nodefaults", "-qtest", f"unix:{qtest_path}",
        "-chardev", f"socket,id=doorbell,path={path}",
        "-device", f"ivshmem-doorbell,chardev=doorbell,vectors={VECTORS},addr={SLOT:#x}"])
    # Its own process group: killing only `mkosi sandbox` would leave QEMU running.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    try:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            kill()
            raise AssertionError("QEMU did not connect to qtest:\n"
                                 + (tmp_path / "qemu.log").read_text()) from None
        conn.settimeout(TIMEOUT)
        yield lt, server, peer, Qtest(conn)
        conn.close()
    finally:
        kill()
        log.close()
        listener.close()
        lt.call(server.close)
        lt.stop()
        left = processes_mentioning(str(tmp_path))
        assert left == [], f"left running: {left}"


def test_a_doorbell_write_signals_the_call_eventfd_without_vvu_devd(
        qemu_companion: tuple[LoopThread, IvshmemServer, DoorbellPeer, Qtest]) -> None:
    lt, server, peer, qt = qemu_companion
    assert lt.call(lambda: server.clients) == 1  # QEMU took the setup at realize
    # The function: ivshmem-doorbell, our own ID in IVPosition; BAR0 where we put it.
    assert qt.config_read(0) == IVSHMEM_DEVICE_ID << 16 | IVSHMEM_VENDOR_ID
    qt.config_write(0x10, BAR0)
    qt.config_write(0x04, 0x2)  # memory space
    assert int(qt.cmd(f"readl {BAR0 + IVSHMEM_IVPOSITION:#x}"), 16) == DOORBELL_OWNER_ID

    call0, call1 = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
    try:
        lt.call(peer.set_calls, {0: call0, 1: call1})
        first = lt.call(peer.current_peer)
        # QEMU installs it (the fence turned non-blocking): each call signalled once.
        wait(lambda: lt.call(lambda: peer.applied) == 1, "QEMU to install the peer")
        assert drained(call0) == 1 and drained(call1) == 1

        # vvu-devd's loop is blocked: a doorbell still reaches the consumer's eventfd.
        busy, release = threading.Event(), threading.Event()

        def hold() -> None:
            busy.set()
            release.wait(TIMEOUT)

        lt.loop.call_soon_threadsafe(hold)
        assert busy.wait(TIMEOUT)
        try:
            for _ in range(3):
                ring(qt, first, 1)
            assert drained(call1) == 3 and drained(call0) == 0
        finally:
            release.set()

        # The front-end replaces queue 0's call: a new peer ID carries the new set; the
        # old ID keeps the old set until the driver has read the new one.
        new0 = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            lt.call(peer.set_calls, {0: new0, 1: call1})
            second = lt.call(peer.current_peer)
            assert second != first
            wait(lambda: lt.call(lambda: peer.applied) == 2, "the new set")
            drained(new0), drained(call1), drained(call0)
            ring(qt, second, 0)
            assert drained(new0) == 1 and drained(call0) == 0
            ring(qt, first, 0)
            assert drained(call0) == 1
            lt.call(peer.driver_saw, second)  # the driver read it: the old ID goes
            settle(qt)
            ring(qt, first, 0)
            ring(qt, first, 1)
            assert drained(call0) == 0 and drained(call1) == 0

            # The front-end is gone: its peer too; a doorbell goes nowhere.
            lt.call(peer.set_calls, {})
            settle(qt)
            for vector in (0, 1):
                ring(qt, second, vector)
            assert drained(new0) == 0 and drained(call1) == 0
            # And back: a third ID (QEMU corrupts its heap if an ID comes back).
            lt.call(peer.set_calls, {0: new0})
            third = lt.call(peer.current_peer)
            assert third not in (first, second)
            wait(lambda: lt.call(lambda: peer.applied) == 3, "the third set")
            drained(new0)
            ring(qt, third, 0)
            assert drained(new0) == 1
            assert lt.call(lambda: peer.apply_timeouts) == 0
            assert int(qt.cmd(f"readl {BAR0 + IVSHMEM_IVPOSITION:#x}"), 16) == DOORBELL_OWNER_ID
        finally:
            os.close(new0)
    finally:
        os.close(call0)
        os.close(call1)


def ring(qt: Qtest, peer: int, vector: int) -> None:
    qt.cmd(f"writel {BAR0 + IVSHMEM_DOORBELL:#x} {ivshmem_doorbell(peer, vector):#x}")


def settle(qt: Qtest) -> None:
    """Let QEMU's main loop read the server's socket (it serves qtest too)."""
    for _ in range(20):
        qt.cmd("clock_step 1000")
        time.sleep(0.01)
