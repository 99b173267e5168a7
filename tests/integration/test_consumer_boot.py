"""A consumer guest boots under real QEMU and leaves nothing behind."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import (
    RUNTIME_PREFIX,
    MachineLaunchError,
    QemuMachine,
)
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration


def _our_runtime_files() -> list[str]:
    pid = os.getpid()
    return glob.glob(f"/tmp/{RUNTIME_PREFIX}{pid}-*") + glob.glob(
        f"/dev/shm/{RUNTIME_PREFIX}{pid}-*"
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_consumer_boots_with_virtio_net_and_blk(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(8 << 20)
    vm = QemuMachine(
        toolchain,
        name="consumer",
        kernel=consumer_assets.kernel,
        initrd=consumer_assets.initrd,
        append="vvu.ip=10.0.0.1/24",
        args=[
            # A stock virtio-net on a user-mode backend with no way out.
            "-netdev", "user,id=n0,restrict=on",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-blockdev", f"driver=file,filename={disk},node-name=d0",
            "-device", "virtio-blk-pci,drive=d0",
        ],
    )  # fmt: skip
    with vm:
        assert vm.temp_dir is not None and vm.temp_dir.is_dir()
        mem = vm.memory_path
        assert mem is not None and mem.exists()  # shared guest RAM for vhost-user
        assert vm.qmp("query-status")["status"] == "running"

        rc, out = vm.console.run("uname -r")
        assert rc == 0 and out.strip() == consumer_assets.kernel_version

        lsmod = vm.console.check("lsmod")
        assert "virtio_net" in lsmod and "virtio_blk" in lsmod

        addr = vm.console.check("ip -o -4 addr show dev eth0")
        assert "10.0.0.1/24" in addr
        assert "52:54:00:12:34:56" in vm.console.check("cat /sys/class/net/eth0/address")
        assert vm.console.check("cat /sys/block/vda/size").strip() == str((8 << 20) // 512)

        rc, out = vm.console.run("echo oops >&2; exit_code() { return 3; }; exit_code")
        assert (rc, out) == (3, "oops\n")

        pgid = vm.process_group or -1
        qemu_pid = vm.qemu_pid
        temp_dir = vm.temp_dir

    assert vm.exitcode == 0  # QMP quit: a clean exit
    assert qemu_pid is not None and not os.path.exists(f"/proc/{qemu_pid}")
    assert not _group_alive(pgid)
    assert not temp_dir.exists()
    assert not mem.exists()
    assert _our_runtime_files() == []


def test_launch_failure_reports_command_and_stderr_and_cleans_up(
    toolchain: Toolchain, consumer_assets: ConsumerAssets
) -> None:
    vm = QemuMachine(
        toolchain,
        name="broken",
        kernel=consumer_assets.kernel,
        initrd=consumer_assets.initrd,
        args=["-device", "no-such-device"],
    )
    with pytest.raises(MachineLaunchError) as info, vm:
        pass
    assert "no-such-device" in info.value.stderr
    assert "qemu-system-x86_64" in str(info.value)
    assert vm.temp_dir is not None and not vm.temp_dir.exists()
    assert _our_runtime_files() == []


def test_caller_provided_memory_file_is_used_and_kept(
    toolchain: Toolchain, consumer_assets: ConsumerAssets
) -> None:
    # The launcher owns consumer RAM files (the device model maps the same file).
    ram = Path(f"/dev/shm/vvu-test-ram-{os.getpid()}")
    with ram.open("wb") as f:
        f.truncate(256 << 20)
    try:
        with QemuMachine(
            toolchain,
            name="given-ram",
            kernel=consumer_assets.kernel,
            initrd=consumer_assets.initrd,
            memory_file=ram,
            memory_mib=256,
        ) as vm:
            vm.console.check("echo VVU-SHARED-MARKER-4711 > /dev/null")
            assert vm.memory_path == ram
            # The kernel itself lives in that file: the guest's RAM really is it.
            assert ram.stat().st_blocks > 0
        assert ram.exists()
        assert _our_runtime_files() == []
    finally:
        ram.unlink(missing_ok=True)
