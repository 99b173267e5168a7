"""A short run of every fuzz harness (docs/fuzzing.md): no finding, no hang, no leak.

The long runs (a million cases each) are ``python -m fuzz --cases 1000000``; this
is the same engine with a few thousand cases per harness, seconds each. Each run
must also get somewhere (inputs accepted, rings walked, sessions brought up), so
a harness that silently stops reaching the code under test fails here.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest

from fuzz.engine import Budget, Runner, RunResult, open_fds
from fuzz.harnesses import HARNESSES

#: Cases per harness: a few seconds each on a loaded 2-core machine.
CASES = {"codec": 5000, "rings": 4000, "session": 1500, "vfio-user": 800, "registers": 1500,
         "tunnel": 1500}
#: Depth a run must reach (see each harness's run_one): codec, a reply decoded for a
#: high request code; rings, a dozen device operations; session, the whole
#: bring-up and more; vfio-user and registers, a dozen operations in one case;
#: tunnel, the consumer's whole bring-up sent.
MIN_DEPTH = {"codec": 100, "rings": 24, "session": 48, "vfio-user": 12, "registers": 12,
             "tunnel": 11}


def _open_fds() -> set[int]:
    gc.collect()  # earlier tests' sockets and maps, closed when collected
    return open_fds()


def _fuzz_temp_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("vvu-fuzz-")}


def _report(result: RunResult) -> str:
    return "\n\n".join(f"{f.signature} (x{f.count})\n{f.detail}"
                       for f in result.findings.values())


def test_every_harness_is_covered_here() -> None:
    assert set(CASES) == set(HARNESSES) == set(MIN_DEPTH)


@pytest.mark.parametrize("name", list(HARNESSES))
def test_short_run_finds_nothing(name: str, tmp_path: Path) -> None:
    fds, dirs = _open_fds(), _fuzz_temp_dirs()
    result = Runner(HARNESSES[name](), seed=2026, case_timeout=10.0,
                    findings_dir=tmp_path).run(Budget(cases=CASES[name]))
    assert result.findings == {}, _report(result)
    assert result.cases == CASES[name]
    assert result.max_depth >= MIN_DEPTH[name]
    assert result.expected_errors < result.cases
    assert _open_fds() <= fds
    assert _fuzz_temp_dirs() == dirs
    assert not list(tmp_path.iterdir())
