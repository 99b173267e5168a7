"""The VVU driver in a real appliance VM, serving a real consumer VM's disk.

    consumer VM (busybox, vhost-user-blk-pci, RAM = a file)
      -> vvu-devd on the host (the VVU device model, RAM file = BAR2)
      -> QEMU's vfio-user client in the appliance VM (Debian trixie, storage image)
      -> vvu-blk --vvu ADDR inside the appliance: vfio-pci behind intel-iommu, or the
         sysfs poll-mode path in an appliance without a vIOMMU
      -> /root/disk.raw inside the appliance

QEMU 11.1.3 under whatever accelerator the host has (TCG here). The appliance is
driven through its root console (vvu_rig). Needs the storage appliance image
(``vvu-appliance build storage``, done here if missing) and the consumer assets.
The rig (vvu-devd, appliance, consumers) is shared with test_vvu_end_to_end.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.vvu_rig import appliance, blk_consumer, links, shell, vvu_functions
from vvu_runtime.launch.appliance import ApplianceImage, ApplianceMachine, build_appliance
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.process import ApplianceProcess, DeviceModelProcess
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

CONSUMER_MIB = 256
DISK_MIB = 64
IMAGE = "/root/disk.raw"


@pytest.fixture(scope="module")
def storage_image(toolchain: Toolchain) -> ApplianceImage:
    return build_appliance(toolchain, "storage")


@contextmanager
def rig(toolchain: Toolchain, image: ApplianceImage, tmp: Path, *,
        viommu: bool = True) -> Iterator[tuple[DeviceModelProcess, ApplianceMachine]]:
    """vvu-devd with one device (``c0``) and the storage appliance on it."""
    with DeviceModelProcess(links(tmp, "c0"), tmp / "devd.log", ram_mib=CONSUMER_MIB) as devd, \
            appliance(toolchain, image, [devd.links[0].vfio_socket], viommu=viommu) as vm:
        vm.console.check(f"truncate -s {DISK_MIB}M {IMAGE}")
        yield devd, vm
    assert "Traceback" not in devd.output()


def vvu_blk(vm: ApplianceMachine, addr: str, access: str) -> ApplianceProcess:
    return ApplianceProcess(shell(vm), ["vvu-blk", "--vvu", addr, "--vvu-access", access,
                                        "--image", IMAGE], f"/root/vvu-blk-{access}",
                            ready="ready for a front-end")


def stop_blk(blk: ApplianceProcess) -> str:
    blk.stop()
    text = blk.output()
    assert "stopped" in text and "Traceback" not in text, text
    return text


def md5_at(vm: ApplianceMachine, offset_mib: int, mib: int) -> str:
    return vm.console.check(f"dd if={IMAGE} bs=1M skip={offset_mib} count={mib} "
                            "2>/dev/null | md5sum").split()[0]


def _disk_round_trip(vm: QemuMachine, appliance_vm: ApplianceMachine, at_mib: int) -> None:
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
    assert md5_at(appliance_vm, at_mib, 1) == want


def test_consumer_disk_served_from_an_appliance_through_vfio(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, storage_image: ApplianceImage,
    tmp_path: Path,
) -> None:
    with rig(toolchain, storage_image, tmp_path) as (devd, a):
        addr = vvu_functions(a)[0]
        assert "iommu_groups" in a.console.check(
            f"readlink /sys/bus/pci/devices/{addr}/iommu_group")
        blk = vvu_blk(a, addr, "auto").start()
        log = blk.output()
        assert "bound to vfio-pci" in log and "MSI-X vectors" in log
        with blk_consumer(toolchain, consumer_assets, devd.links[0],
                          memory_mib=CONSUMER_MIB) as vm:
            _disk_round_trip(vm, a, 4)
            irqs = a.console.check(f"grep 'vfio-msix.*{addr}' /proc/interrupts")
            # " 35:  0  4  IR-PCI-MSIX-0000:01:00.0  0-edge  vfio-msix[0](0000:01:00.0)"
            counts = {line.split()[-1]: sum(int(x) for x in line.split()[1:-3])
                      for line in irqs.splitlines()}
            assert counts[f"vfio-msix[0]({addr})"] >= 1   # config change (FRONTEND_UP)
            assert counts[f"vfio-msix[1]({addr})"] >= 10  # rxq: the front-end's messages
            assert counts[f"vfio-msix[3]({addr})"] >= 1   # kicks of vhost-user queue 0

            # The backend restarts inside the appliance: the consumer's QEMU
            # reconnects (reconnect-ms) and its disk goes on working.
            stop_blk(blk)
            blk = vvu_blk(a, addr, "vfio").start()
            blk.wait_for("queue 0 started", 120)
            _disk_round_trip(vm, a, 8)
        stop_blk(blk)


def test_sysfs_poll_mode_in_an_appliance_without_a_viommu(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, storage_image: ApplianceImage,
    tmp_path: Path,
) -> None:
    with rig(toolchain, storage_image, tmp_path, viommu=False) as (devd, a):
        addr = vvu_functions(a)[0]
        blk = vvu_blk(a, addr, "auto").start()
        log = blk.output()
        assert "no IOMMU group" in log and "poll mode" in log and "guest-physical" in log
        with blk_consumer(toolchain, consumer_assets, devd.links[0],
                          memory_mib=CONSUMER_MIB) as vm:
            _disk_round_trip(vm, a, 4)
        assert "polled" in blk.output()
        stop_blk(blk)
