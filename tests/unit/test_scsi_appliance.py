"""The storage appliance's ``protocol: scsi`` exports: the config field and the
vvu-scsi command line vvu-backend runs for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vvu_runtime.appliance import backend
from vvu_runtime.appliance.config import ConfigError, parse_config
from vvu_runtime.serve.scsi import parse_args


def test_scsi_export_runs_vvu_scsi_with_the_disk_as_lun0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disks = tmp_path / "by-id"
    disks.mkdir()
    (disks / "virtio-data0").write_bytes(b"")
    monkeypatch.setattr(backend, "disk_path", lambda serial: disks / f"virtio-{serial}")
    s = parse_config('{"kind": "storage", "exports": [{"name": "c1-disk0", "disk": "data0",'
                     ' "readonly": true, "protocol": "scsi"}, {"name": "c2-disk0",'
                     ' "disk": "data0"}], "options": {"direct": true}}', "f")
    assert [e.protocol for e in s.exports] == ["scsi", "blk"]
    scsi, blk = backend.commands(s, {"c1-disk0": "0000:03:00.0", "c2-disk0": "0000:04:00.0"})
    image = disks / "virtio-data0"
    assert scsi.argv == ["vvu-scsi", "--vvu", "0000:03:00.0", "--lun",
                         f"0={image},serial=c1-disk0,ro", "--queues", "4", "--direct"]
    assert blk.argv[0] == "vvu-blk"
    args = parse_args(scsi.argv[1:])  # vvu-scsi takes the command line it is given
    (spec,) = args.specs
    assert (spec.lun, spec.path, spec.read_only, spec.serial) == (0, str(image), True,
                                                                  "c1-disk0")


def test_unknown_protocol_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"exports\[0\]\.protocol: blk or scsi"):
        parse_config('{"kind": "storage", "exports": [{"name": "a", "disk": "d0",'
                     ' "protocol": "nvme"}]}', "f")
