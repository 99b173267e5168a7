"""The appliance images: built by mkosi, booted under TCG, checked over SSH.

Builds both appliances (incremental: seconds when nothing changed, ~2.5 min
cold with an empty mkosi cache), boots the vswitch appliance once for the
module and checks it with pytest-testinfra's paramiko backend, then checks
that shutting it down leaves nothing behind.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
from collections.abc import Iterator
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
from vvu_runtime.launch.machine import RUNTIME_PREFIX
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

#: Guest-side packages: they must import with the appliance's bare python3.
GUEST_PACKAGES = ("virtio", "vhost_user", "backends", "driver")


@pytest.fixture(scope="module")
def images(toolchain: Toolchain) -> dict[str, ApplianceImage]:
    return {image.name: image for image in build_appliances(toolchain)}


@pytest.fixture(scope="module")
def vswitch(toolchain: Toolchain, images: dict[str, ApplianceImage]) -> Iterator[ApplianceMachine]:
    with ApplianceMachine(toolchain, images["vswitch"], accel=Accelerator.TCG) as vm:
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


def test_unchanged_rebuild_is_a_no_op(
    toolchain: Toolchain, images: dict[str, ApplianceImage]
) -> None:
    start = time.monotonic()
    again = build_appliance(toolchain, "storage")
    assert time.monotonic() - start < 10
    assert not again.rebuilt
    assert again.inputs == images["storage"].inputs
    assert again.disk.stat().st_mtime_ns == images["storage"].disk.stat().st_mtime_ns


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
    switch = host.service("vvu-switch")
    assert switch.exists and switch.is_enabled
    blk = host.service("vvu-blk")
    assert blk.exists and not blk.is_enabled  # the storage appliance's unit
    # No VVU function on this machine: the unit is skipped by its condition, not failed.
    assert not switch.is_running
    assert host.run("systemctl is-failed vvu-switch").stdout.strip() != "failed"
    check = host.run("/usr/lib/vvu/vvu-backend switch --check")
    assert check.rc == 1 and "no VVU function (1af4:107f)" in check.stderr
    assert host.run("systemctl --failed --no-legend --plain").stdout.strip() == ""


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
    # Runs last: it shuts the module's machine down (the fixture's exit is then a no-op).
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
