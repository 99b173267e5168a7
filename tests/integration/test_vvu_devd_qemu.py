"""vvu-devd under real QEMU (11.1.3): a busybox appliance with the VVU function on a
vIOMMU, and a stock consumer QEMU whose vhost-user connection goes through it.

No guest driver exists in busybox, so the appliance side is done by hand with
``devmem``, the way the ABI says a driver does it: negotiate, put rxq in a
reserved page of the appliance's RAM (``memmap=1M$128M``; ``iommu=pt`` gives the
function an identity IOVA space), post two buffers, set BACKEND_UP. The consumer
QEMU (``-netdev vhost-user``, RAM = the file vvu-devd serves as BAR2) connects at
start-up and blocks in vhost-user init waiting for its first reply; the test
shows its connection waits for BACKEND_UP, that its first message (GET_FEATURES)
lands in the appliance's rxq buffer, and the reconnect after BACKEND_UP is taken
away and given back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.devd import DevdProcess
from vvu_runtime.launch.accel import choose_accelerator
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import GuestConsole, QemuMachine
from vvu_runtime.launch.render import NetDevice, VvuFunctionDevice, render_devices
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

RAM_MIB = 256
#: Reserved by the appliance kernel (memmap=1M$128M): the rings live here.
RING = 0x0800_0000
DESC, AVAIL, USED = RING, RING + 0x100, RING + 0x200
BUFFERS = (RING + 0x1000, RING + 0x2000)
QSIZE = 16
MARKER = b"VVU-CONSUMER-RAM"
MARKER_AT = 0x10_0000


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Devd(DevdProcess):
    """vvu-devd in its own process, one device."""

    def __init__(self, tmp: Path, ram: Path) -> None:
        self.vhost = tmp / "c0.vhost"
        self.vfio = tmp / "c0.vfio"
        super().__init__([("c0", self.vhost, self.vfio, ram)], tmp / "devd.log", timeout=30)


class Consumer:
    """A stock consumer QEMU, started raw: it blocks in vhost-user init (no QMP yet)."""

    def __init__(self, toolchain: Toolchain, ram: Path, vhost: Path, log: Path) -> None:
        accel = choose_accelerator(toolchain).accel
        argv = ["qemu-system-x86_64", "-name", "vvu-consumer", "-nodefaults",
                "-no-user-config", "-display", "none", "-run-with", "exit-with-parent=on",
                *accel.qemu_args(),
                "-object", f"memory-backend-file,id=mem,size={RAM_MIB}M,mem-path={ram},share=on",
                "-machine", "q35,memory-backend=mem", "-m", f"{RAM_MIB}M",
                *render_devices(NetDevice("net0", vhost, reconnect_ms=500))]
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(toolchain.command(argv), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Guest:
    """devmem on the appliance's console."""

    def __init__(self, console: GuestConsole) -> None:
        self.con = console

    def rd(self, addr: int, width: int = 32) -> int:
        return int(self.con.check(f"devmem {addr:#x} {width}").strip(), 16)

    def wr(self, addr: int, value: int, width: int = 32) -> None:
        self.con.check(f"devmem {addr:#x} {width} {value:#x}")

    def wr_many(self, writes: list[tuple[int, int, int]]) -> None:
        """Several devmem writes in one console line (each console round trip costs)."""
        self.con.check(" && ".join(f"devmem {a:#x} {w} {v:#x}" for a, v, w in writes))


@pytest.fixture
def ram_file() -> Iterator[Path]:
    path = Path(f"/dev/shm/vvu-it-devd-{os.getpid()}.ram")
    with path.open("wb") as f:
        f.truncate(RAM_MIB << 20)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, MARKER, MARKER_AT)
    finally:
        os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _find_function(con: GuestConsole) -> str:
    out = con.check("for d in /sys/bus/pci/devices/*; do "
                    "echo $(basename $d) $(cat $d/vendor $d/device $d/class); done")
    found = [line.split()[0] for line in out.splitlines()
             if line.split()[1:] == ["0x1af4", "0x107f", "0xff0000"]]
    assert len(found) == 1, out
    return found[0]


def _capabilities(config: bytes) -> dict[int, tuple[int, int, int, int, bytes]]:
    """Vendor capabilities by cfg_type: (bar, offset, length, id, extra)."""
    caps = {}
    pos = config[0x34]
    while pos:
        if config[pos] == 0x09:
            cap_len, cfg_type, bar, cap_id, off, length = struct.unpack_from(
                "<BBBBxxII", config, pos + 2)
            caps[cfg_type] = (bar, off, length, cap_id, config[pos + 16:pos + cap_len])
        pos = config[pos + 1]
    return caps


def test_appliance_sees_the_function_and_the_consumer_waits_for_backend_up(
        toolchain: Toolchain, consumer_assets: ConsumerAssets, ram_file: Path,
        tmp_path: Path) -> None:
    devd = Devd(tmp_path, ram_file)
    consumer: Consumer | None = None
    appliance = QemuMachine(
        toolchain, name="vvu-appliance", kernel=consumer_assets.kernel,
        initrd=consumer_assets.initrd, append="intel_iommu=on iommu=pt memmap=1M$128M",
        memfd=True,
        args=["-device", "intel-iommu,caching-mode=on",
              *render_devices(VvuFunctionDevice(0, devd.vfio))])
    try:
        with appliance as vm:
            con = vm.console
            g = Guest(con)
            slot = _find_function(con)
            sysfs = f"/sys/bus/pci/devices/{slot}"
            assert "IOMMU enabled" in con.check("dmesg | grep DMAR: | head -3")
            assert con.check(f"cat {sysfs}/iommu_group/type").strip() == "identity"
            # The stock virtio-pci binds every 1af4:10xx function; the appliance's driver
            # would move it with driver_override. Here: just release it.
            if "virtio-pci" in con.check(f"ls -l {sysfs}/driver 2>/dev/null || true"):
                con.check(f"echo {slot} > {sysfs}/driver/unbind")
            config = bytes.fromhex(con.check(
                f"od -An -v -tx1 {sysfs}/config").replace(" ", "").replace("\n", ""))
            caps = _capabilities(config)
            assert set(caps) >= {1, 2, 3, 4, 6, 7, 8}
            assert caps[6][:3] == (4, 0x1000, (2 * 64 + 1) * 4)
            assert caps[7][:3] == (4, 0, 4) and caps[8][0] == 2 and caps[8][3] == 1
            resources = con.check(f"cat {sysfs}/resource").splitlines()
            bar = [tuple(int(x, 16) for x in line.split()) for line in resources]
            bar0, bar2, bar4 = bar[0][0], bar[2][0], bar[4][0]
            assert bar0 and bar4 and bar2
            assert bar[2][1] - bar2 + 1 == RAM_MIB << 20 and bar[2][2] & 0x2000  # 64-bit
            # Device config: status 0, max_vhost_queues 64, a uuid.
            assert g.rd(bar0 + 0x2000) == 0
            assert g.rd(bar0 + 0x2004) == 64
            assert any(g.rd(bar0 + 0x2008 + 4 * i) for i in range(4))
            # BAR2 is the consumer's RAM file, both ways.
            assert g.rd(bar2 + MARKER_AT) == int.from_bytes(MARKER[:4], "little")
            g.wr(bar2 + MARKER_AT + 0x1000, 0xC0FFEE42)
            with ram_file.open("rb") as f:
                f.seek(MARKER_AT + 0x1000)
                assert f.read(4) == bytes.fromhex("42eeffc0")

            # The driver's part, by hand: negotiate, rxq in reserved RAM, 2 buffers.
            g.wr(bar0 + 0x14, 0, 8)                       # reset
            g.wr_many([(bar0 + 0x14, 3, 8),               # ACKNOWLEDGE | DRIVER
                       (bar0 + 0x08, 1, 32),              # driver_feature_select = 1
                       (bar0 + 0x0C, 3, 32),              # VERSION_1 | ACCESS_PLATFORM
                       (bar0 + 0x14, 0xB, 8)])            # FEATURES_OK
            assert g.rd(bar0 + 0x14, 8) == 0xB
            writes = [(USED, 0, 32)]                      # used flags/idx = 0
            for i, buf in enumerate(BUFFERS):
                d = DESC + 16 * i
                writes += [(d, buf, 32), (d + 4, 0, 32), (d + 8, 4096, 32),
                           (d + 12, 2, 32)]               # flags WRITE, next 0
                writes += [(AVAIL + 4 + 2 * i, i, 16)]
            writes += [(AVAIL, len(BUFFERS) << 16, 32)]   # avail flags 0, idx 2
            writes += [(bar0 + 0x16, 0, 16), (bar0 + 0x18, QSIZE, 16),
                       (bar0 + 0x20, DESC, 32), (bar0 + 0x24, 0, 32),
                       (bar0 + 0x28, AVAIL, 32), (bar0 + 0x2C, 0, 32),
                       (bar0 + 0x30, USED, 32), (bar0 + 0x34, 0, 32),
                       (bar0 + 0x1C, 1, 16),              # queue_enable
                       (bar0 + 0x14, 0xF, 8),             # DRIVER_OK
                       (bar0 + 0x3000, 0, 16)]            # notify rxq
            g.wr_many(writes)
            assert g.rd(bar0 + 0x14, 8) == 0xF

            # The consumer starts and connects; vvu-devd leaves it in the backlog.
            consumer = Consumer(toolchain, ram_file, devd.vhost, tmp_path / "consumer.log")
            time.sleep(3)
            assert consumer.proc.poll() is None, consumer.log()
            assert "front-end #1 connected" not in devd.log()
            assert g.rd(bar0 + 0x2000) == 0
            assert devd.table()["conns"] == "0"

            # BACKEND_UP: accepted, FRONTEND_UP, and QEMU's first message is in rxq.
            g.wr(bar0 + 0x2000, 1)
            _wait(lambda: g.rd(bar0 + 0x2000) == 3, "FRONTEND_UP")
            _wait(lambda: g.rd(USED, 32) >> 16 == 1, "a used rxq buffer")
            assert (g.rd(USED + 4), g.rd(USED + 8)) == (0, 12)   # buffer 0, 12 bytes
            assert [g.rd(BUFFERS[0] + 4 * i) for i in range(3)] == [1, 1, 0]  # GET_FEATURES
            table = devd.table()
            assert (table["conns"], table["rx msgs"], table["errors"]) == ("1", "1", "0")

            # The driver takes BACKEND_UP away: the consumer's socket is closed ...
            g.wr(bar0 + 0x2000, 0)
            assert g.rd(bar0 + 0x2000) == 0
            _wait(lambda: "front-end #1 disconnected" in devd.log(), "the disconnect")
            # ... it reconnects (reconnect-ms) and waits again until BACKEND_UP.
            time.sleep(2)
            assert "front-end #2 connected" not in devd.log()
            if consumer.proc.poll() is None:
                g.wr(bar0 + 0x2000, 1)
                _wait(lambda: g.rd(bar0 + 0x2000) == 3, "FRONTEND_UP again")
                _wait(lambda: g.rd(USED, 32) >> 16 == 2, "the second used rxq buffer")
                assert [g.rd(BUFFERS[1] + 4 * i) for i in range(3)] == [1, 1, 0]
            else:  # pragma: no cover - depends on the consumer QEMU's reconnect logic
                pytest.fail(f"the consumer QEMU gave up:\n{consumer.log()}")
            assert devd.proc.poll() is None
    finally:
        if consumer is not None:
            consumer.kill()
        appliance.shutdown()
        code = devd.stop()
    log = devd.log()
    assert code == 0, log
    assert "Traceback" not in log
    assert "c0: client disconnected" in log  # the appliance QEMU went away cleanly
    assert not devd.vhost.exists() and not devd.vfio.exists()
