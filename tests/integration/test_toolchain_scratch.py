"""A killed ``mkosi sandbox`` leaves its temporary files only in its own scratch
directory, and they go once it is gone (Toolchain.scratch_dir / collect_scratch)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration


def _mkosi_temp_files() -> set[Path]:
    return {p for base in (Path("/tmp"), Path("/var/tmp")) for p in base.glob("mkosi-*")}


def test_a_killed_sandbox_leaves_nothing_once_collected(toolchain: Toolchain) -> None:
    before = _mkosi_temp_files()
    proc = subprocess.Popen(toolchain.command(["sleep", "120"]), start_new_session=True)
    mine = toolchain.scratch_dir / str(proc.pid)
    try:
        deadline = time.monotonic() + 60
        # mkosi has copied itself for the sandbox once "sleep" runs.
        while not any(mine.glob("mkosi-path-*")) or \
                b"sleep\x00120" not in _group_cmdlines(proc.pid):
            assert proc.poll() is None, f"mkosi sandbox exited {proc.returncode}"
            assert time.monotonic() < deadline, f"no mkosi-path-* in {mine}"
            time.sleep(0.2)
        assert mine not in toolchain.collect_scratch()  # a running one keeps its files
        assert mine.exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no unwinding: what a crash leaves
        proc.wait()
    assert any(mine.iterdir()), "SIGKILL should have left mkosi's files to collect"
    assert mine in toolchain.collect_scratch()
    assert not mine.exists()
    assert _mkosi_temp_files() - before == set(), "mkosi wrote to the host's /tmp"


def _group_cmdlines(pgid: int) -> bytes:
    out = b""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) == pgid:
                out += (proc / "cmdline").read_bytes() + b"\n"
        except OSError:
            continue
    return out
