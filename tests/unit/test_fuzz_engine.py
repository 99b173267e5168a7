"""The fuzz engine and its command line (fuzz/engine.py, fuzz/cli.py) on planted bugs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fuzz import cli
from fuzz.engine import Budget, Runner
from fuzz.harnesses import HARNESSES
from fuzz.source import ByteSource
from tests.support.fuzz_targets import (
    TRIGGER,
    CrashingTarget,
    HangingTarget,
    LeakingTarget,
    RefusingTarget,
)


def test_expected_errors_are_counted_not_reported() -> None:
    result = Runner(RefusingTarget(), seed=1).run(Budget(cases=2000))
    assert result.cases == 2000
    assert result.findings == {}
    assert 0 < result.expected_errors < 2000


def test_a_crash_is_reported_once_with_its_input_saved(tmp_path: Path) -> None:
    result = Runner(CrashingTarget(), findings_dir=tmp_path).run(Budget(cases=500))
    (finding,) = result.findings.values()
    assert finding.kind == "crash"
    assert "KeyError" in finding.signature
    assert finding.path is not None and finding.path.read_bytes().startswith(TRIGGER)
    assert "planted" in finding.path.with_suffix(".txt").read_text()


def test_a_hang_is_cut_off_by_the_case_limit() -> None:
    result = Runner(HangingTarget(), case_timeout=0.2).run(Budget(cases=50))
    assert result.hangs >= 1
    assert result.cases == 50
    assert all(f.kind == "hang" for f in result.findings.values())


def test_an_fd_kept_after_a_case_is_a_leak() -> None:
    result = Runner(LeakingTarget()).run(Budget(cases=100))
    (finding,) = result.findings.values()
    assert finding.kind == "leak"
    assert "/dev/null" in finding.detail


def test_the_same_seed_gives_the_same_run() -> None:
    a = Runner(HARNESSES["codec"](), seed=7).run(Budget(cases=3000))
    b = Runner(HARNESSES["codec"](), seed=7).run(Budget(cases=3000))
    c = Runner(HARNESSES["codec"](), seed=8).run(Budget(cases=3000))
    assert (a.expected_errors, a.max_depth, a.corpus) == (b.expected_errors, b.max_depth,
                                                          b.corpus)
    assert a.expected_errors != c.expected_errors


def test_byte_source_pads_with_zeros_and_stays_in_range() -> None:
    src = ByteSource(b"\xff\x05")
    assert src.below(3) == 0xFF % 3
    assert src.below(1000) == 5  # one byte left, then zeros
    assert src.take(3) == bytes(3)
    assert src.exhausted
    assert not src.chance(50) and src.usually(50)  # zero bytes: the plain choice


def test_cli_prints_json_and_exits_zero_without_findings(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["codec", "rings", "--cases", "300", "--json",
                     "--findings", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["harness"] for r in rows] == ["codec", "rings"]
    assert all(r["cases"] == 300 and r["findings"] == 0 and r["hangs"] == 0 for r in rows)
    assert not list(tmp_path.iterdir())


def test_cli_exits_nonzero_on_a_finding_and_replays_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.setitem(HARNESSES, "crashing", CrashingTarget)
    assert cli.main(["crashing", "--cases", "200", "--findings", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "crashing" in out and "KeyError" in out
    (saved,) = [p for p in tmp_path.iterdir() if p.suffix != ".txt"]
    assert cli.main(["crashing", "--replay", str(saved)]) == 1
    assert "KeyError: 'planted'" in capsys.readouterr().err


def test_cli_refuses_an_unknown_harness(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nonesuch", "--cases", "1"]) == 2
    assert "unknown harness nonesuch" in capsys.readouterr().err


def test_replay_of_a_fine_input_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_bytes(os.urandom(64))
    assert cli.main(["codec", "--replay", str(path)]) == 0
