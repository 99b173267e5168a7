"""The device model served to real QEMU (11.1.3, vfio-user-pci) and a stock guest kernel.

The server runs as its own process (``python -m tests.support.entropy``), as
the device daemon will, so that its file descriptors and mappings can be checked
from outside after the guest is killed. With virtio device ID 4 the guest's own
``virtio_rng`` driver drives the whole transport: feature negotiation, a queue in
DMA-mapped guest RAM, MSI-X completions.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from tests.support.entropy import HOLE_BYTE, SHM_MARKER
from tests.support.vfio_user_client import VfioUserClient
from vvu_runtime.launch.initramfs import ConsumerAssets, CpioEntry, KernelModules, write_cpio
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

#: The toy device runs from the checkout (``python -m tests.support.entropy``).
ROOT = Path(__file__).resolve().parents[2]
SLOT = "0000:00:05.0"
SHM_SIZE = 2 << 20
SYSFS = f"/sys/bus/pci/devices/{SLOT}"


@pytest.fixture(scope="module")
def rng_guest_assets(toolchain: Toolchain, consumer_assets: ConsumerAssets,
                     tmp_path_factory: pytest.TempPathFactory) -> ConsumerAssets:
    """The consumer initramfs plus virtio_rng, the driver our toy device speaks to.

    The module rides in a second cpio appended to the stock initrd (the kernel
    unpacks concatenated archives) instead of a rebuilt initramfs variant: the
    builder keeps one variant per kernel in its shared cache and would delete the
    one other tests hold. Loaded with ``insmod /vvu-extra/virtio-rng.ko``.
    """
    modules = KernelModules(toolchain.path("modules"))
    entries = [CpioEntry.directory("vvu-extra")]
    for rel in modules.resolve(["virtio_rng"]):
        name = PurePosixPath(rel).name.split(".ko", 1)[0] + ".ko"
        entries.append(CpioEntry.file(f"vvu-extra/{name}", modules.read_uncompressed(rel)))
    initrd = tmp_path_factory.mktemp("rng-guest") / "initrd.cpio.gz"
    initrd.write_bytes(consumer_assets.initrd.read_bytes() + gzip.compress(write_cpio(entries)))
    return ConsumerAssets(consumer_assets.kernel, initrd, consumer_assets.kernel_version)


class DeviceProcess:
    """The toy device model in its own process."""

    def __init__(self, socket_path: Path, log_path: Path, device_id: int,
                 shared_memory: int = 0) -> None:
        self.socket_path = socket_path
        self.shared_memory = shared_memory
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.entropy", "--socket", str(socket_path),
             "--device-id", str(device_id), "--name", "rng-test",
             "--shared-memory", str(shared_memory)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"device model did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fds(self) -> dict[int, str]:
        out = {}
        for name in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                out[int(name)] = os.readlink(f"/proc/{self.proc.pid}/fd/{name}")
        return out

    def maps(self) -> str:
        return Path(f"/proc/{self.proc.pid}/maps").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(params=[SHM_SIZE, 0], ids=["with-mmapped-bar", "trapped-only"])
def device_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeviceProcess]:
    """With an mmappable BAR QEMU sends non-posted writes; without one it posts them
    (NO_REPLY) and may batch them into REGION_WRITE_MULTI: both paths must work."""
    dev = DeviceProcess(tmp_path / "rng.sock", tmp_path / "device.log", device_id=4,
                        shared_memory=request.param)
    dev.shared_memory = request.param
    try:
        yield dev
    finally:
        dev.stop()


def _wait(predicate: object, what: str, timeout: float = 15.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def check_shared_memory_bar(vm: QemuMachine, dev: DeviceProcess, bar2_start: int) -> None:
    """BAR2: QEMU mmapped both sparse areas (zero copy), the hole stays trapped."""
    con = vm.console
    mtree = vm.qmp("human-monitor-command", **{"command-line": "info mtree -f"})
    assert "BAR 2 mmaps[0]" in mtree and "BAR 2 mmaps[1]" in mtree, mtree
    marker = int.from_bytes(SHM_MARKER[:4], "little")
    assert int(con.check(f"devmem {bar2_start:#x} 32").strip(), 16) == marker
    hole = SHM_SIZE // 2
    assert int(con.check(f"devmem {bar2_start + hole:#x} 32").strip(), 16) == \
        int.from_bytes(bytes([HOLE_BYTE]) * 4, "little")
    con.check(f"devmem {bar2_start + hole + 0x1100:#x} 32 0xc0ffee42")
    memfd = next(fd for fd, target in dev.fds().items() if "bar2" in target)
    with open(f"/proc/{dev.proc.pid}/fd/{memfd}", "rb") as shm:
        assert os.pread(shm.fileno(), 4, hole + 0x1100) == bytes.fromhex("42eeffc0")


def test_guest_drives_the_device_and_killing_it_leaks_nothing(
        toolchain: Toolchain, rng_guest_assets: ConsumerAssets,
        device_process: DeviceProcess) -> None:
    dev = device_process
    baseline = dev.fds()
    device_json = json.dumps({"driver": "vfio-user-pci", "id": "vvu0", "addr": "0x5",
                              "socket": {"type": "unix", "path": str(dev.socket_path)}})
    vm = QemuMachine(toolchain, name="vfio-user-guest", kernel=rng_guest_assets.kernel,
                     initrd=rng_guest_assets.initrd, memfd=True, args=["-device", device_json])
    with vm:
        con = vm.console
        # Enumeration: identity and BARs as the guest kernel sees them.
        assert con.check(f"cat {SYSFS}/vendor").strip() == "0x1af4"
        assert con.check(f"cat {SYSFS}/device").strip() == "0x1044"
        assert con.check(f"cat {SYSFS}/class").strip() == "0xff0000"
        resources = con.check(f"cat {SYSFS}/resource").split("\n")
        bar0_start, bar0_end, _ = (int(x, 16) for x in resources[0].split())
        bar1_start, _, _ = (int(x, 16) for x in resources[1].split())
        bar2_start, bar2_end, bar2_flags = (int(x, 16) for x in resources[2].split())
        assert bar0_start and bar0_end - bar0_start + 1 == 0x4000
        assert bar1_start
        if dev.shared_memory:
            assert bar2_start and bar2_end - bar2_start + 1 == SHM_SIZE
            assert bar2_flags & 0x2000 and bar2_flags & 0x100000  # 64-bit, prefetchable
        else:
            assert bar2_start == bar2_end == 0
        # The guest's virtio-pci and virtio_rng drove the transport to DRIVER_OK ...
        con.check("insmod /vvu-extra/virtio-rng.ko")
        status = con.check(f"cat {SYSFS}/virtio*/status").strip()
        assert int(status, 16) & 0xF == 0xF, status
        assert "virtio_rng" in con.check("cat /sys/class/misc/hw_random/rng_available")
        # ... and entropy flows: queue in guest RAM, MSI-X completions.
        got = con.check("dd if=/dev/hwrng bs=64 count=16 2>/dev/null | wc -c").strip()
        assert got == "1024"
        interrupts = con.check("cat /proc/interrupts")
        assert re.search(r"\b[1-9]\d*\s.*virtio\d+-(input|requests)", interrupts), interrupts

        # A trapped register round-trips through the device model: release the
        # function, then poke device_feature_select / device_feature with devmem.
        con.check(f"echo {SLOT} > /sys/bus/pci/drivers/virtio-pci/unbind")
        con.check(f"devmem {bar0_start:#x} 32 1")
        assert int(con.check(f"devmem {bar0_start:#x} 32").strip(), 16) == 1
        high = int(con.check(f"devmem {bar0_start + 4:#x} 32").strip(), 16)
        assert high == 0x3  # VERSION_1 | ACCESS_PLATFORM (bits 32, 33)
        con.check(f"devmem {bar0_start + 0x16:#x} 16 0")  # queue_select = 0
        assert int(con.check(f"devmem {bar0_start + 0x18:#x} 16").strip(), 16) == 256

        if dev.shared_memory:
            check_shared_memory_bar(vm, dev, bar2_start)

        assert "client negotiated vfio-user" in dev.log()
        assert len(dev.fds()) > len(baseline)  # the client, eventfds ...
        # Guest RAM (a sealed memfd) mapped through DMA_MAP fds, once for the file.
        ram = "/memfd:memory-backend-memfd"
        assert dev.maps().count(ram) == 1, dev.maps()

        # Kill the guest hard: the server must notice and drop everything of it.
        assert vm.qemu_pid is not None
        os.kill(vm.qemu_pid, signal.SIGKILL)
        _wait(lambda: "client disconnected" in dev.log(), "the server to see the hang-up")

    _wait(lambda: dev.fds() == baseline, "the server's fds to return to the baseline")
    # QEMU posts writes (NO_REPLY) only while no region is mmappable.
    posted = int(re.findall(r"(\d+) posted", dev.log())[0])
    assert (posted > 0) == (not dev.shared_memory), dev.log()
    assert ram not in dev.maps()
    assert dev.proc.poll() is None, dev.log()
    # Still serving: a new client (a restarted appliance) is accepted.
    with VfioUserClient.connect(str(dev.socket_path)) as client:
        assert client.version().major == 0
        assert client.get_info().num_regions == 9
    assert dev.stop() == 0
    assert not dev.socket_path.exists()
    assert "Traceback" not in dev.log()
