"""The VVU driver in a real appliance VM, serving a real consumer VM's disk.

    consumer VM (busybox, vhost-user-blk-pci, RAM = a file)
      -> vvu-devd on the host (the VVU device model, RAM file = BAR2)
      -> QEMU's vfio-user client in the appliance VM (Debian trixie, storage image)
      -> vvu-blk --vvu ADDR inside the appliance: vfio-pci behind intel-iommu, or the
         sysfs poll-mode path in an appliance without a vIOMMU
      -> /root/disk.raw inside the appliance

QEMU 11.1.3 under whatever accelerator the host has (TCG here). The appliance is
driven over SSH (its serial console is not needed). Needs the storage appliance
image (``vvu-appliance build storage``, done here if missing) and the consumer
assets.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

CONSUMER_MIB = 256
DISK_MIB = 64


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def storage_image(toolchain: Toolchain) -> object:
    from vvu_runtime.launch.appliance import build_appliance

    return build_appliance(toolchain, "storage")


class Devd:
    """vvu-devd in its own process: one VVU device for the consumer's RAM file."""

    def __init__(self, tmp: Path, ram: Path) -> None:
        self.vhost = tmp / "c0.vhost"
        self.vfio = tmp / "c0.vfio"
        self.log_path = tmp / "devd.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vvu_runtime.device.devd",
             "--device", f"c0:{self.vhost}:{self.vfio}:{ram}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        _wait(lambda: "serving 1 VVU device" in self.log() or self.proc.poll() is not None,
              "vvu-devd to listen", 30)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Appliance:
    """Commands in the appliance over SSH; vvu-blk started and stopped there."""

    def __init__(self, vm: object) -> None:
        self.vm = vm

    def sh(self, cmd: str, timeout: float = 300) -> str:
        argv = self.vm.ssh_argv(cmd)  # type: ignore[attr-defined]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode:
            raise AssertionError(f"appliance: {cmd!r} exited {r.returncode}:\n"
                                 f"{r.stdout}{r.stderr}")
        return r.stdout

    def vvu_function(self) -> str:
        out = self.sh("grep -l 0x107f /sys/bus/pci/devices/*/device")
        return Path(out.split()[0]).parent.name

    def start_blk(self, addr: str, access: str, log: str) -> str:
        self.sh(f"setsid -f vvu-blk --vvu {addr} --vvu-access {access} "
                f"--image /root/disk.raw > {log} 2>&1 < /dev/null")
        _wait(lambda: "ready for a front-end" in self.sh(f"cat {log}")
              or "Traceback" in self.sh(f"cat {log}"), f"vvu-blk ({access}) to arm", 300)
        text = self.sh(f"cat {log}")
        assert "ready for a front-end" in text, text
        return text

    def stop_blk(self, log: str) -> str:
        self.sh("pkill -TERM -x vvu-blk; for i in $(seq 30); do pgrep -x vvu-blk || break; "
                "sleep 0.5; done")
        text = self.sh(f"cat {log}")
        assert "stopped" in text and "Traceback" not in text, text
        return text

    def md5_at(self, offset_mib: int, mib: int) -> str:
        return self.sh(f"dd if=/root/disk.raw bs=1M skip={offset_mib} count={mib} "
                       "2>/dev/null | md5sum").split()[0]


@contextmanager
def appliance(toolchain: Toolchain, image: object, vfio: Path, *,
              viommu: bool = True) -> Iterator[Appliance]:
    from vvu_runtime.launch.appliance import ApplianceMachine

    vm = ApplianceMachine(toolchain, image)  # type: ignore[arg-type]
    vm.add_vfio_user_device(vfio)
    if not viommu:
        # The poll-mode fallback is for appliances without a vIOMMU (the launcher
        # always adds one and has no option against it yet: drop it).
        i = vm._fixed_args.index("intel-iommu,caching-mode=on")
        del vm._fixed_args[i - 1:i + 1]
    vm.launch()
    try:
        vm.wait_for_ssh(600)
        a = Appliance(vm)
        a.sh(f"truncate -s {DISK_MIB}M /root/disk.raw")
        yield a
    finally:
        vm.shutdown()


def consumer(toolchain: Toolchain, assets: ConsumerAssets, ram: Path, vhost: Path
             ) -> QemuMachine:
    return QemuMachine(
        toolchain, name="vvu-consumer", kernel=assets.kernel, initrd=assets.initrd,
        memory_mib=CONSUMER_MIB, memory_file=ram,
        args=["-chardev", f"socket,id=blk0,path={vhost},reconnect-ms=300",
              "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"])


def _ram_file(tmp: Path) -> Path:
    ram = tmp / "consumer.ram"
    with ram.open("wb") as f:
        f.truncate(CONSUMER_MIB << 20)
    return ram


def _disk_round_trip(vm: QemuMachine, a: Appliance, at_mib: int) -> None:
    """1 MiB from the consumer at ``at_mib``: fsync'd, read back direct, and in the
    appliance's image file."""
    c = vm.console
    assert c.check("cat /sys/block/vda/size").strip() == str((DISK_MIB << 20) // 512)
    c.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null")
    want = c.check("md5sum /tmp/pattern").split()[0]
    c.check(f"dd if=/tmp/pattern of=/dev/vda bs=1M seek={at_mib} conv=fsync 2>/dev/null")
    back = c.check(f"dd if=/dev/vda bs=4096 skip={at_mib * 256} count=256 iflag=direct "
                   "2>/dev/null | md5sum").split()[0]
    assert back == want
    assert a.md5_at(at_mib, 1) == want


def test_consumer_disk_served_from_an_appliance_through_vfio(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, storage_image: object,
    tmp_path: Path,
) -> None:
    ram = _ram_file(tmp_path)
    devd = Devd(tmp_path, ram)
    try:
        with appliance(toolchain, storage_image, devd.vfio) as a:
            addr = a.vvu_function()
            assert "iommu_groups" in a.sh(f"readlink /sys/bus/pci/devices/{addr}/iommu_group")
            log = a.start_blk(addr, "auto", "/root/blk.log")
            assert "bound to vfio-pci" in log and "MSI-X vectors" in log
            with consumer(toolchain, consumer_assets, ram, devd.vhost) as vm:
                _disk_round_trip(vm, a, 4)
                irqs = a.sh(f"grep 'vfio-msix.*{addr}' /proc/interrupts")
                # " 35:  0  4  IR-PCI-MSIX-0000:01:00.0  0-edge  vfio-msix[0](0000:01:00.0)"
                counts = {line.split()[-1]: sum(int(x) for x in line.split()[1:-3])
                          for line in irqs.splitlines()}
                assert counts[f"vfio-msix[0]({addr})"] >= 1   # config change (FRONTEND_UP)
                assert counts[f"vfio-msix[1]({addr})"] >= 10  # rxq: the front-end's messages
                assert counts[f"vfio-msix[3]({addr})"] >= 1   # kicks of vhost-user queue 0

                # The backend restarts inside the appliance: the consumer's QEMU
                # reconnects (reconnect-ms) and its disk goes on working.
                a.stop_blk("/root/blk.log")
                a.start_blk(addr, "vfio", "/root/blk2.log")
                _wait(lambda: "queue 0 started" in a.sh("cat /root/blk2.log"),
                      "the consumer to reconnect", 120)
                _disk_round_trip(vm, a, 8)
            a.stop_blk("/root/blk2.log")
    finally:
        devd.stop()
    assert "Traceback" not in devd.log()


def test_sysfs_poll_mode_in_an_appliance_without_a_viommu(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, storage_image: object,
    tmp_path: Path,
) -> None:
    ram = _ram_file(tmp_path)
    devd = Devd(tmp_path, ram)
    try:
        with appliance(toolchain, storage_image, devd.vfio, viommu=False) as a:
            addr = a.vvu_function()
            log = a.start_blk(addr, "auto", "/root/blk.log")
            assert "no IOMMU group" in log and "poll mode" in log and "guest-physical" in log
            with consumer(toolchain, consumer_assets, ram, devd.vhost) as vm:
                _disk_round_trip(vm, a, 4)
            assert "polled" in a.sh("cat /root/blk.log")
            a.stop_blk("/root/blk.log")
    finally:
        devd.stop()
    assert "Traceback" not in devd.log()

