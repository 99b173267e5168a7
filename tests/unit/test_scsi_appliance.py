"""The storage appliance's ``protocol: scsi`` exports: the config field and the
vvu-scsi command line vvu-backend runs for them."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from vvu_runtime.appliance import backend
from vvu_runtime.appliance.config import ConfigError, parse_config
from vvu_runtime.serve.scsi import load_config, parse_args


def test_scsi_export_runs_vvu_scsi_with_the_disk_as_lun0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disks = tmp_path / "by-id"
    disks.mkdir()
    (disks / "virtio-data0").write_bytes(b"")
    monkeypatch.setattr(backend, "disk_path", lambda serial: disks / f"virtio-{serial}")
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    s = parse_config('{"kind": "storage", "exports": [{"name": "c1-disk0", "disk": "data0",'
                     ' "readonly": true, "protocol": "scsi"}, {"name": "c2-disk0",'
                     ' "disk": "data0"}], "options": {"direct": true}}', "f")
    assert [e.protocol for e in s.exports] == ["scsi", "blk"]
    scsi, blk = backend.commands(s, {"c1-disk0": "0000:03:00.0", "c2-disk0": "0000:04:00.0"})
    image = disks / "virtio-data0"
    luns = tmp_path / "run" / "scsi" / "c1-disk0.json"
    assert scsi.argv == ["vvu-scsi", "--vvu", "0000:03:00.0", "--config", str(luns),
                         "--queues", "4", "--direct"]
    assert blk.argv[0] == "vvu-blk"
    args = parse_args(scsi.argv[1:])  # vvu-scsi takes the command line it is given
    (spec,) = load_config(args.config)  # the LUN file vvu-backend wrote
    assert (spec.lun, spec.path, spec.read_only, spec.serial) == (0, str(image), True,
                                                                  "c1-disk0")


def test_the_lun_file_is_written_afresh_at_each_start_and_check_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "disk_path", lambda serial: tmp_path / f"virtio-{serial}")
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    (tmp_path / "virtio-d0").write_bytes(b"")
    s = parse_config('{"kind": "storage", "exports": [{"name": "x", "disk": "d0",'
                     ' "protocol": "scsi"}]}', "f")
    luns = tmp_path / "run" / "scsi" / "x.json"
    (planned,) = backend.commands(s, {"x": "0000:03:00.0"}, prepare=False)
    assert str(luns) in planned.argv and not luns.exists()
    backend.commands(s, {"x": "0000:03:00.0"})
    luns.write_text('{"luns": []}')  # an operator's run-time change ...
    backend.commands(s, {"x": "0000:03:00.0"})  # ... is gone after a restart
    assert [x.lun for x in load_config(str(luns))] == [0]


def test_sighup_reaches_only_the_vvu_scsi_children(tmp_path: Path) -> None:
    s = parse_config('{"kind": "storage", "exports": [{"name": "a", "disk": "d0"},'
                     ' {"name": "b", "disk": "d1", "protocol": "scsi"}]}', "f")
    got = {}

    class Proc:
        def __init__(self, name: str) -> None:
            self.name = name

        def poll(self) -> None:
            return None

        def send_signal(self, signum: int) -> None:
            got[self.name] = signum

    blk = backend.Backend(["vvu-blk"], {}, proc=Proc("blk"))  # type: ignore[arg-type]
    scsi = backend.Backend(["vvu-scsi"], {}, proc=Proc("scsi"))  # type: ignore[arg-type]
    backend.Supervisor(s, [blk, scsi]).reload()
    assert got == {"scsi": signal.SIGHUP}


def test_unknown_protocol_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"exports\[0\]\.protocol: blk or scsi"):
        parse_config('{"kind": "storage", "exports": [{"name": "a", "disk": "d0",'
                     ' "protocol": "nvme"}]}', "f")
