"""The appliance images: built by mkosi, booted under TCG, checked over SSH.

Builds both appliances (incremental: seconds when nothing changed, ~1-2.5 min
with an empty mkosi cache), boots the vswitch appliance once for the module
with two VVU functions (served by ``vvu-devd`` on the host), checks it with
pytest-testinfra's paramiko backend - the backend unit found the functions,
moved them to vfio-pci and armed the devices - has two stock consumer VMs ping
each other through it, then checks that shutting it down leaves nothing behind.
Last, the storage appliance serves a disk (given as a systemd credential) to a
stock vhost-user-blk consumer.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.appliance import (
    ApplianceImage,
    ApplianceMachine,
    appliance_names,
    build_appliance,
    build_appliances,
)
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import RUNTIME_PREFIX, QemuMachine
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

#: Guest-side packages: they must import with the appliance's bare python3.
GUEST_PACKAGES = ("virtio", "vhost_user", "backends", "driver")


@pytest.fixture(scope="module")
def images(toolchain: Toolchain) -> dict[str, ApplianceImage]:
    return {image.name: image for image in build_appliances(toolchain)}


class DeviceModel:
    """``vvu-devd`` serving VVU devices ``c0``, ``c1``… (consumer RAM: sparse /dev/shm files)."""

    RAM_MIB = 128

    def __init__(self, workdir: Path, count: int) -> None:
        prefix = f"/dev/shm/vvu-test-appliance-{os.getpid()}-{workdir.name}"
        self.rams = [Path(f"{prefix}-c{i}.ram") for i in range(count)]
        self.vfio_sockets = [workdir / f"vfio{i}.sock" for i in range(count)]
        self.vhost_sockets = [workdir / f"vhost{i}.sock" for i in range(count)]
        self.log_path = workdir / "devd.log"
        argv = [sys.executable, "-m", "vvu_runtime.device.devd"]
        for i, ram in enumerate(self.rams):
            with ram.open("wb") as f:
                f.truncate(self.RAM_MIB << 20)
            argv += ["--device", f"c{i}:{self.vhost_sockets[i]}:{self.vfio_sockets[i]}:{ram}"]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 30
        while "serving" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"vvu-devd did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for ram in self.rams:
            ram.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def devd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceModel]:
    model = DeviceModel(tmp_path_factory.mktemp("devd"), count=2)
    try:
        yield model
    finally:
        model.stop()


@pytest.fixture(scope="module")
def vswitch(
    toolchain: Toolchain, images: dict[str, ApplianceImage], devd: DeviceModel
) -> Iterator[ApplianceMachine]:
    vm = ApplianceMachine(toolchain, images["vswitch"], accel=Accelerator.TCG)
    for socket_path in devd.vfio_sockets:
        vm.add_vfio_user_device(socket_path)
    with vm:
        yield vm


@pytest.fixture(scope="module")
def host(vswitch: ApplianceMachine) -> Any:
    return vswitch.testinfra_host()


def test_both_appliances_build_with_boot_files(
    toolchain: Toolchain, images: dict[str, ApplianceImage]
) -> None:
    assert set(appliance_names(toolchain)) == {"vswitch", "storage"} == set(images)
    for image in images.values():
        assert image.disk.stat().st_size >= 1 << 30
        assert image.kernel.stat().st_size > 1 << 20
        assert 0 < image.initrd.stat().st_size < 8 << 20  # busybox + virtio_blk only
        assert image.disk.parent == toolchain.repo / "images"
        words = image.cmdline.split()
        for arg in ("console=ttyS0", "intel_iommu=on", "iommu=pt", "rw"):
            assert arg in words
        assert any(w.startswith("root=") for w in words)


def test_unchanged_rebuild_is_a_no_op(toolchain: Toolchain) -> None:
    # The first call catches up with any source edited since the fixture built.
    first = build_appliance(toolchain, "storage")
    start = time.monotonic()
    again = build_appliance(toolchain, "storage")
    assert time.monotonic() - start < 10
    assert not again.rebuilt
    assert again.inputs == first.inputs
    assert again.disk.stat().st_mtime_ns == first.disk.stat().st_mtime_ns


def test_console_is_a_root_shell(vswitch: ApplianceMachine) -> None:
    assert vswitch.console.check("id -u").strip() == "0"
    assert vswitch.console.check("hostname").strip() == "vvu-vswitch"


def test_guest_runtime_imports_with_the_stdlib_only(host: Any) -> None:
    assert host.run_test("python3 -c 'import vvu_runtime.driver, vvu_runtime.backends'").rc == 0
    # Every module of the guest-side packages, on a python3 with nothing but the stdlib.
    script = (
        "import importlib, pkgutil, vvu_runtime\n"
        f"for pkg in {GUEST_PACKAGES!r}:\n"
        "    p = importlib.import_module('vvu_runtime.' + pkg)\n"
        "    for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    result = host.run("python3 -c %s", script)
    assert result.rc == 0 and result.stdout.strip() == "ok", result.stderr
    assert host.run("python3 -c 'import vvu_runtime.launch'").rc != 0  # host-only, not shipped


def test_image_holds_the_current_sources(
    toolchain: Toolchain, host: Any, vswitch: ApplianceMachine
) -> None:
    info = json.loads(host.file("/usr/lib/vvu/build-info.json").content_string)
    assert info["appliance"] == "vswitch"
    local = toolchain.repo / "vvu_runtime/driver/__init__.py"
    remote = host.file("/usr/lib/python3/dist-packages/vvu_runtime/driver/__init__.py")
    assert remote.content_string == local.read_text()
    for script in ("vvu-switch", "vvu-blk"):
        assert host.file(f"/usr/bin/{script}").mode == 0o755
        assert host.run_test(f"{script} --help").rc == 0


def test_vfio_pci_is_loaded_at_boot(host: Any) -> None:
    assert host.file("/sys/module/vfio_pci").is_directory
    assert host.file("/sys/bus/pci/drivers/vfio-pci").is_directory


def test_intel_iommu_is_enabled(host: Any) -> None:
    cmdline = host.file("/proc/cmdline").content_string.split()
    assert "intel_iommu=on" in cmdline and "iommu=pt" in cmdline
    assert any(name.startswith("dmar") for name in host.file("/sys/class/iommu").listdir())
    assert "DMAR: IOMMU enabled" in host.run("dmesg").stdout


def test_backend_units(host: Any) -> None:
    blk = host.service("vvu-blk")
    assert blk.exists and not blk.is_enabled  # the storage appliance's unit
    # Without a VVU function (here: one with another ID) a unit is skipped, not failed.
    check = host.run("VVU_PCI_IDS=1af4:10ff /usr/lib/vvu/vvu-backend switch --check")
    assert check.rc == 1 and "no VVU function (1af4:10ff)" in check.stderr
    check = host.run("/usr/lib/vvu/vvu-backend blk --check")
    assert check.rc == 1 and "VVU_BLK_IMAGES" in check.stderr
    assert host.run("systemctl --failed --no-legend --plain").stdout.strip() == ""


def _wait_for(predicate: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def test_switch_unit_serves_the_vvu_functions(host: Any, devd: DeviceModel) -> None:
    lspci = host.run("lspci -n -D -d 1af4:107f").stdout.splitlines()
    functions = [line.split()[0] for line in lspci]
    assert functions == ["0000:01:00.0", "0000:02:00.0"], lspci
    switch = host.service("vvu-switch")
    assert switch.exists and switch.is_enabled
    _wait_for(
        lambda: devd.log().count("driver set BACKEND_UP") >= 2, "the backend to arm both devices"
    )
    assert switch.is_running
    pid = host.run("systemctl show -p MainPID --value vvu-switch").stdout.strip()
    argv = host.file(f"/proc/{pid}/cmdline").content_string.split("\0")
    assert argv[1:] == [
        "/usr/bin/vvu-switch", "--vvu", "vvu0=0000:01:00.0", "--vvu", "vvu1=0000:02:00.0", "",
    ], argv  # fmt: skip
    for fn in ("0000:01:00.0", "0000:02:00.0"):
        assert host.file(f"/sys/bus/pci/devices/{fn}/driver").linked_to.endswith("/vfio-pci")


def test_two_consumers_ping_through_the_appliance(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, devd: DeviceModel,
    vswitch: ApplianceMachine,
) -> None:  # fmt: skip
    with contextlib.ExitStack() as stack:
        consumers = []
        for i, (ram, sock) in enumerate(zip(devd.rams, devd.vhost_sockets, strict=True)):
            vm = QemuMachine(
                toolchain, name=f"consumer{i}", kernel=consumer_assets.kernel,
                initrd=consumer_assets.initrd, append=f"vvu.ip=10.0.0.{i + 1}/24",
                memory_mib=DeviceModel.RAM_MIB, memory_file=ram,
                args=["-chardev", f"socket,id=net0,path={sock},reconnect-ms=1000",
                      "-netdev", "vhost-user,id=n0,chardev=net0",
                      "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0{i + 1}"],
            )  # fmt: skip
            consumers.append(stack.enter_context(vm))
        deadline = time.monotonic() + 90
        while True:  # the links come up while the switch learns
            rc, out = consumers[0].console.run("ping -c 1 -W 2 10.0.0.2")
            if rc == 0:
                break
            assert time.monotonic() < deadline, f"10.0.0.2 unreachable:\n{out}"
        out = consumers[1].console.check("ping -c 3 -W 5 10.0.0.1")
        assert "3 packets received" in out, out
    log = vswitch.console.check("journalctl -u vvu-switch --no-pager -o cat")
    assert "port vvu0: link up" in log and "port vvu1: link up" in log


def test_ssh_is_key_only_for_root(host: Any) -> None:
    assert host.user().name == "root"
    config = host.run("sshd -T").stdout
    assert "passwordauthentication no" in config
    assert "permitrootlogin without-password" in config or "prohibit-password" in config


def _runtime_files(pid: int) -> list[str]:
    return glob.glob(f"/tmp/{RUNTIME_PREFIX}{pid}-*") + glob.glob(
        f"/dev/shm/{RUNTIME_PREFIX}{pid}-*"
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_shutdown_leaves_nothing_behind(
    vswitch: ApplianceMachine, images: dict[str, ApplianceImage]
) -> None:
    # Shuts the module's machine down (the fixture's exit is then a no-op): keep it
    # after every test that uses the vswitch fixture.
    image = images["vswitch"]
    before = image.disk.stat()
    vswitch.console.check("echo scribble > /root/scribble && sync")
    assert vswitch.qemu_pid is not None and vswitch.ssh_port is not None
    assert vswitch._proc is not None and vswitch.temp_dir is not None
    qemu_pid, port, pgid = vswitch.qemu_pid, vswitch.ssh_port, vswitch._proc.pid
    temp_dir = vswitch.temp_dir
    start = time.monotonic()
    vswitch.shutdown()
    assert time.monotonic() - start < 30
    assert not vswitch.is_running()
    assert not temp_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(qemu_pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not _port_open(port)
    assert _runtime_files(os.getpid()) == []
    # The guest wrote to a throwaway overlay: the image is untouched.
    after = image.disk.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_blocks) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_blocks,
    )


def test_storage_appliance_serves_a_disk(
    toolchain: Toolchain, images: dict[str, ApplianceImage], consumer_assets: ConsumerAssets,
    tmp_path: Path,
) -> None:  # fmt: skip
    disk = tmp_path / "served.raw"
    with disk.open("wb") as f:
        f.truncate(32 << 20)
    devd = DeviceModel(tmp_path, count=1)
    try:
        vm = ApplianceMachine(
            toolchain, images["storage"], accel=Accelerator.TCG,
            # The disk the appliance serves, named by its serial; told as a credential.
            args=["-drive", f"file={disk},format=raw,if=none,id=served,cache=none,aio=threads",
                  "-device", "virtio-blk-pci,drive=served,serial=vvu-served"],
            credentials={"vvu.blk-images": "/dev/disk/by-id/virtio-vvu-served"},
        )  # fmt: skip
        vm.add_vfio_user_device(devd.vfio_sockets[0])
        with vm:
            _wait_for(lambda: "driver set BACKEND_UP" in devd.log(), "vvu-blk to arm the device")
            consumer = QemuMachine(
                toolchain, name="blk-consumer", kernel=consumer_assets.kernel,
                initrd=consumer_assets.initrd, memory_mib=DeviceModel.RAM_MIB,
                memory_file=devd.rams[0],
                args=["-chardev", f"socket,id=blk0,path={devd.vhost_sockets[0]},reconnect-ms=1000",
                      "-device", "vhost-user-blk-pci,chardev=blk0"],
            )  # fmt: skip
            with consumer:
                con = consumer.console
                assert con.check("cat /sys/block/vda/size").strip() == str((32 << 20) // 512)
                con.check(
                    "echo VVU-STORAGE-APPLIANCE | dd of=/dev/vda bs=512 seek=100 conv=fsync",
                    timeout=120,
                )
            unit = vm.console.check("systemctl show -p MainPID --value vvu-blk").strip()
            argv = vm.console.check(f"tr '\\0' ' ' < /proc/{unit}/cmdline").split()
            assert argv[1:] == [
                "/usr/bin/vvu-blk", "--vvu", "0000:01:00.0",
                "--image", "/dev/disk/by-id/virtio-vvu-served",
            ], argv  # fmt: skip
        with disk.open("rb") as f:
            f.seek(100 * 512)
            assert f.read(21) == b"VVU-STORAGE-APPLIANCE"
    finally:
        devd.stop()
