"""vvu-scsi under a real QEMU consumer (vhost-user-scsi-pci, Linux's virtio_scsi and
sd drivers as the initiator): LUNs found, a file system made, written and read back,
fstrim reaching UNMAP (holes in the image), VPD pages as Linux read them, and LUNs
added and removed at runtime (SIGHUP with a changed config) without a reboot.

One VM for the whole module (boots are the expensive part); the tests run in file
order against it and each leaves the LUN set as it found it, except the last.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vvu_runtime.launch.initramfs import DEFAULT_MODULES
from vvu_runtime.launch.initramfs import consumer_assets as build_assets
from vvu_runtime.launch.machine import GuestConsole, QemuMachine
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

LUN0_MIB = 64
LUN2_MIB = 16
LUN5_MIB = 8
SERIAL0 = "vvu-it-lun0"
QUEUES = 2
#: The SCSI initiator on top of DEFAULT_MODULES (ext4 is built into the kernel).
SCSI_MODULES = ("virtio_scsi", "sd_mod")


@dataclass
class Rig:
    vm: QemuMachine
    console: GuestConsole
    proc: subprocess.Popen[str]
    config: Path
    images: dict[int, Path]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def set_luns(self, luns: dict[int, tuple[Path, bool, str]]) -> None:
        """Rewrite the config and SIGHUP vvu-scsi."""
        entries = [{"lun": n, "image": str(p), "read_only": ro, "serial": s}
                   for n, (p, ro, s) in sorted(luns.items())]
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps({"luns": entries}))
        tmp.replace(self.config)
        self.proc.send_signal(signal.SIGHUP)

    def disk(self, lun: int) -> str:
        """The guest's block device name of LUN ``lun`` (scan order decides sda/sdb)."""
        return self.console.check(f"ls /sys/class/scsi_disk/0:0:0:{lun}/device/block").strip()

    def wait_guest(self, condition: str, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.console.run(condition)[0] != 0:
            assert time.monotonic() < deadline, f"{what}: not seen in the guest\n" + \
                self.console.check("dmesg | tail -n 30") + self.output()[-3000:]
            time.sleep(0.5)


def sparse(path: Path, mib: int) -> Path:
    with path.open("wb") as f:
        f.truncate(mib << 20)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def rig(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("scsi")
    images = {0: sparse(tmp / "lun0.raw", LUN0_MIB), 2: sparse(tmp / "lun2.raw", LUN2_MIB),
              5: sparse(tmp / "lun5.raw", LUN5_MIB)}
    images[2].write_bytes(b"read-only LUN 2\n".ljust(LUN2_MIB << 20, b"\0"))
    config = tmp / "luns.json"
    config.write_text(json.dumps({"luns": [
        {"lun": 0, "image": str(images[0]), "serial": SERIAL0},
        {"lun": 2, "image": str(images[2]), "read_only": True},
    ]}))
    sock, log = tmp / "scsi.sock", tmp / "vvu-scsi.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vvu_runtime.serve.scsi", "--socket", str(sock),
             "--config", str(config), "--queues", str(QUEUES)],
            stdout=logf, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"vvu-scsi did not listen:\n{log.read_text()}"
            time.sleep(0.05)
        assets = build_assets(toolchain, modules=(*DEFAULT_MODULES, *SCSI_MODULES))
        vm = QemuMachine(
            toolchain, name="scsi-consumer", kernel=assets.kernel, initrd=assets.initrd,
            smp=2, args=["-chardev", f"socket,id=scsi0-chr,path={sock}",
                         "-device", f"vhost-user-scsi-pci,id=scsi0,chardev=scsi0-chr,"
                                    f"num_queues={QUEUES}"])
        with vm:
            yield Rig(vm, vm.console, proc, config, images, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert not sock.exists(), "vvu-scsi left its socket behind"


def test_guest_sees_the_luns_with_their_sizes_and_modes(rig: Rig) -> None:
    c = rig.console
    rig.wait_guest("test -e /sys/class/scsi_disk/0:0:0:2", "LUN 2")
    disks = c.check("ls /sys/class/scsi_disk").split()
    assert disks == ["0:0:0:0", "0:0:0:2"], disks
    listing = c.check("lsscsi")
    assert listing.count("VVU") == 2 and "vvu-scsi disk" in listing, listing
    blocks = {d: c.check(f"cat /sys/class/scsi_disk/{d}/device/block/*/size").strip()
              for d in disks}
    assert blocks == {"0:0:0:0": str((LUN0_MIB << 20) // 512),
                      "0:0:0:2": str((LUN2_MIB << 20) // 512)}
    assert c.check("cat /sys/class/scsi_disk/0:0:0:2/device/block/*/ro").strip() == "1"
    sda = rig.disk(0)
    assert c.check(f"cat /sys/block/{sda}/ro").strip() == "0"
    # Two request queues in use (multiqueue), one blk-mq hardware queue each.
    assert c.check(f"ls /sys/block/{sda}/mq").split() == ["0", "1"]


def test_linux_reads_caching_identity_and_provisioning(rig: Rig) -> None:
    c = rig.console
    sda = rig.disk(0)
    sd = "/sys/class/scsi_disk/0:0:0:0"
    assert c.check(f"cat {sd}/cache_type").strip() == "write back"  # MODE SENSE caching
    assert c.check(f"cat {sd}/FUA").strip() == "1"  # DPOFUA
    assert c.check(f"cat {sd}/provisioning_mode").strip() == "unmap"  # VPD B0/B2
    assert c.check(f"cat {sd}/thin_provisioning").strip() == "1"  # READ CAPACITY (16) LBPME
    assert int(c.check(f"cat /sys/block/{sda}/queue/discard_max_bytes")) > 0
    assert c.check(f"cat /sys/block/{sda}/queue/rotational").strip() == "0"  # VPD B1
    assert c.check(f"cat /sys/block/{sda}/queue/physical_block_size").strip() == "4096"
    serial = c.check(f"cat {sd}/device/vpd_pg80").strip()
    assert serial.endswith(SERIAL0), serial
    ident = c.check(f"od -An -tx1 {sd}/device/vpd_pg83 | tr -d ' \\n'")
    assert "010300083" in ident, ident  # the NAA 3 designator, binary, 8 bytes
    # Linux names the LU by its longest designator: the T10 vendor ID one.
    assert c.check(f"cat {sd}/device/wwid").strip() == f"t10.VVU     {SERIAL0}"
    ro = "/sys/class/scsi_disk/0:0:0:2"
    assert c.check(f"cat {ro}/provisioning_mode").strip() == "full"


def test_raw_writes_reach_the_image_and_read_back(rig: Rig) -> None:
    c = rig.console
    sda, sdb = rig.disk(0), rig.disk(2)
    c.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null")
    want = c.check("md5sum /tmp/pattern").split()[0]
    c.check(f"dd if=/tmp/pattern of=/dev/{sda} bs=4096 seek=1024 conv=fsync 2>/dev/null")
    host = rig.images[0].read_bytes()[1024 * 4096:1280 * 4096]
    assert hashlib.md5(host).hexdigest() == want
    back = c.check(f"dd if=/dev/{sda} bs=4096 skip=1024 count=256 iflag=direct 2>/dev/null"
                   " | md5sum").split()[0]
    assert back == want
    read_only = c.check(f"dd if=/dev/{sdb} bs=16 count=1 2>/dev/null")
    assert "read-only LUN 2" in read_only
    rc, _ = c.run(f"dd if=/tmp/pattern of=/dev/{sdb} bs=4096 count=1 oflag=direct 2>/dev/null")
    assert rc != 0  # write-protected


def test_filesystem_survives_a_remount_and_fstrim_frees_blocks(rig: Rig) -> None:
    c = rig.console
    sda = rig.disk(0)
    c.check(f"mke2fs -q /dev/{sda}", timeout=120)
    c.check(f"mkdir -p /mnt && mount -t ext4 /dev/{sda} /mnt")
    c.check("dd if=/dev/urandom of=/mnt/data bs=1M count=24 2>/dev/null && sync", timeout=120)
    want = c.check("md5sum /mnt/data").split()[0]
    c.check("umount /mnt && echo 3 > /proc/sys/vm/drop_caches")
    c.check(f"mount -t ext4 /dev/{sda} /mnt")
    assert c.check("md5sum /mnt/data", timeout=120).split()[0] == want
    full = allocated(rig.images[0])
    assert full >= 24 << 20, full
    c.check("rm /mnt/data && sync")
    trimmed = c.check("fstrim -v /mnt", timeout=120)
    freed = full - allocated(rig.images[0])
    assert freed >= 20 << 20, (trimmed, full, allocated(rig.images[0]))
    c.check("umount /mnt")


def test_luns_added_and_removed_at_runtime(rig: Rig) -> None:
    c = rig.console
    lun0 = (rig.images[0], False, SERIAL0)
    lun2 = (rig.images[2], True, "")
    rig.set_luns({0: lun0, 2: lun2, 5: (rig.images[5], False, "hot-5")})
    # The scsi_disk node comes before sd attaches its block device: wait for that.
    rig.wait_guest("cat /sys/class/scsi_disk/0:0:0:5/device/block/*/size",
                   "hot-added LUN 5's block device")
    assert c.check("cat /sys/class/scsi_disk/0:0:0:5/device/block/*/size").strip() == \
        str((LUN5_MIB << 20) // 512)
    dev = c.check("ls /sys/class/scsi_disk/0:0:0:5/device/block").strip()
    c.check(f"echo hot > /tmp/hot && dd if=/tmp/hot of=/dev/{dev} conv=fsync 2>/dev/null")
    assert rig.images[5].read_bytes()[:4] == b"hot\n"
    rig.set_luns({0: lun0, 5: (rig.images[5], False, "hot-5")})
    rig.wait_guest("test ! -e /sys/class/scsi_disk/0:0:0:2", "removal of LUN 2")
    assert c.check("ls /sys/class/scsi_disk").split() == ["0:0:0:0", "0:0:0:5"]
    assert "LUNs removed [2], added none" in rig.output()
