"""vvu-scsi's command line and LUN configuration file (serve/scsi.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vvu_runtime.backends.scsi.lun import LunSpec
from vvu_runtime.serve.scsi import ConfigError, load_config, parse_args, parse_lun


def test_lun_options() -> None:
    assert parse_lun("a.raw", 0) == LunSpec(0, "a.raw")
    assert parse_lun("7=b.raw,ro,serial=XY", 0) == LunSpec(7, "b.raw", True, "XY")
    for bad, why in (("x=a.raw", "not an integer"), ("1=", "names no image"),
                     ("a.raw,rw", "unknown option"), ("99999=a.raw", "between 0 and")):
        with pytest.raises(ValueError, match=why):
            parse_lun(bad, 0)


def test_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--socket", "s", "--lun", "a.raw", "--lun", "b.raw,ro",
                       "--lun", "9=c.raw"])
    assert [(s.lun, s.path, s.read_only) for s in args.specs] == [
        (0, "a.raw", False), (1, "b.raw", True), (9, "c.raw", False)]
    for argv, why in (
        (["--lun", "a.raw"], "give --socket or --vvu"),
        (["--socket", "s"], "no LUNs"),
        (["--socket", "s", "--vvu", "0000:00:05.0", "--lun", "a"], "give --socket or --vvu"),
        (["--socket", "s", "--lun", "a", "--config", "c.json"], "not both"),
        (["--socket", "s", "--lun", "1=a", "--lun", "1=b"], "LUN 1 is given twice"),
        (["--socket", "s", "--lun", "a", "--queues", "0"], "--queues must be"),
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert why in capsys.readouterr().err, argv


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "luns.json"
    cfg.write_text(json.dumps({"luns": [{"lun": 3, "image": "d.raw", "read_only": True},
                                        {"image": "/abs/e.raw", "serial": "E"}]}))
    assert load_config(str(cfg)) == [LunSpec(3, str(tmp_path / "d.raw"), True, ""),
                                      LunSpec(1, "/abs/e.raw", False, "E")]


@pytest.mark.parametrize("content,why", [
    ("{", "luns.json"),
    ('{"disks": []}', "list 'luns'"),
    ('{"luns": [1]}', r"luns\[0\] is not an object"),
    ('{"luns": [{"image": "a", "size": 1}]}', "unknown field"),
    ('{"luns": [{"lun": -1, "image": "a"}]}', "'lun' must be"),
    ('{"luns": [{"lun": true, "image": "a"}]}', "'lun' must be"),
    ('{"luns": [{"lun": 0}]}', "'image' must be"),
    ('{"luns": [{"image": "a", "read_only": "yes"}]}', "boolean"),
    ('{"luns": [{"lun": 1, "image": "a"}, {"lun": 1, "image": "b"}]}', "given twice"),
])
def test_bad_config_files_name_the_fault(tmp_path: Path, content: str, why: str) -> None:
    cfg = tmp_path / "luns.json"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=why):
        load_config(str(cfg))


def test_unusable_image_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vvu_runtime.serve.scsi", "--socket", str(tmp_path / "s"),
         "--lun", str(tmp_path / "missing.raw")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "missing.raw" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_print_capabilities() -> None:
    out = subprocess.run([sys.executable, "-m", "vvu_runtime.serve.scsi",
                          "--print-capabilities"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out) == {"type": "scsi"}
