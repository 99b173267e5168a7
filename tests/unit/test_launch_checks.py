"""The ``disk`` check finds the right device in the guest: a blk disk by its place
among the vhost-user virtio-blk disks, a scsi disk by its unit serial (VPD 0x80) in
sysfs. The check's shell commands run for real, against a fake /sys/block."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from vvu_runtime.launch.checks import CheckFailed, LabAccess, _disk_device, _scsi_device
from vvu_runtime.launch.cli import _checks_json
from vvu_runtime.launch.shell import CommandResult
from vvu_runtime.launch.topology import load_topology

REPO = Path(__file__).resolve().parents[2]


class FakeSysLab(LabAccess):
    """A lab whose one consumer's /sys/block is a directory here; commands run in sh."""

    def __init__(self, sys_block: Path) -> None:
        super().__init__({"name": "t", "nodes": [
            {"name": "c1", "ssh_port": 1, "console_shell": False}]}, Path("/nonexistent"))
        self.sys_block = sys_block

    def run(self, node: str, command: str, timeout: float = 60.0) -> CommandResult:
        command = command.replace("/sys/block", str(self.sys_block))
        r = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                           timeout=timeout, check=False)
        return CommandResult(r.returncode, r.stdout, r.stderr)


def _vpd80(serial: str) -> bytes:
    return bytes((0x00, 0x80, 0x00, len(serial))) + serial.encode()


@pytest.fixture
def sys_block(tmp_path: Path) -> Path:
    root = tmp_path / "block"
    for d in ("vda", "vdb", "vdc"):
        (root / d).mkdir(parents=True)
    for d, serial in (("sda", "c1-disk1"), ("sdb", "c1-disk10")):
        (root / d / "device").mkdir(parents=True)
        (root / d / "device" / "vpd_pg80").write_bytes(_vpd80(serial))
    return root


def test_the_default_topology_checks_say_how_to_find_each_disk() -> None:
    checks = _checks_json(load_topology(REPO / "examples" / "default.yaml"))
    disks: list[Mapping[str, Any]] = [c["params"] for c in checks if c["kind"] == "disk"]
    got = [(p["disk"], p["protocol"], p["position"], p["serial"]) for p in disks]
    assert got == [("st1/disk-a", "blk", 0, "c1-disk0"), ("st1/disk-s", "scsi", 0, "c1-disk1"),
                   ("st1/disk-b", "blk", 0, "c2-disk0")]


def test_a_scsi_disk_is_found_by_its_unit_serial_exactly(sys_block: Path) -> None:
    lab = FakeSysLab(sys_block)
    assert _scsi_device(lab, "c1", "c1-disk1") == "/dev/sda"  # not sdb's c1-disk10
    assert _scsi_device(lab, "c1", "c1-disk10") == "/dev/sdb"


def test_a_missing_scsi_disk_fails_naming_what_the_guest_has(
        sys_block: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vvu_runtime.launch.checks.time.sleep", lambda _s: None)
    with pytest.raises(CheckFailed, match=r"0 SCSI disks with serial 'c2-disk0' \(none; "
                                          r"disks: sda sdb vda vdb vdc\)"):
        _scsi_device(FakeSysLab(sys_block), "c1", "c2-disk0")


def test_a_blk_disk_is_the_nth_virtio_blk_disk_after_the_root(sys_block: Path) -> None:
    lab = FakeSysLab(sys_block)
    assert _disk_device(lab, "c1", 0) == "/dev/vdb"
    assert _disk_device(lab, "c1", 1) == "/dev/vdc"
    with pytest.raises(CheckFailed, match="no virtio-blk disk 2"):
        _disk_device(lab, "c1", 2)
