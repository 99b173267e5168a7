"""The switch benchmark with its peers, for real and briefly: every row of
benchmarks/switch_bench.py (about a second each) against vvu-switch, and the
64 B row against DPDK's testpmd and Open vSwitch with DPDK from the tools tree,
in one run. Each target must
forward frames in its measured window, and say itself that it forwarded them;
a figure is not checked (the machine is shared), the peer path is: it had
forwarded nothing and died in a division for as long as nobody ran it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.switch_bench import cases
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _unavailable(why: str) -> None:
    # CI builds the tools tree from mkosi.conf, which has dpdk-dev: missing there is a bug.
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture
def peers_in_tree(toolchain: Toolchain) -> Path:
    for rel, package in (("usr/bin/dpdk-testpmd", "dpdk-dev"),
                         ("usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk",
                          "openvswitch-switch-dpdk")):
        path = toolchain.tree / rel
        if not path.exists():
            _unavailable(f"host capability missing: {path.name} in the tools tree ({path}); "
                         f"the tree predates {package} in mkosi.conf: run ./setup")
    if len(os.sched_getaffinity(0)) < 2:
        _unavailable("host capability missing: two CPUs (a peer's main and forwarding "
                     "threads, the switch and the guests)")
    return toolchain.tree


@pytest.mark.timeout(300)
def test_every_row_and_every_peer_forward(peers_in_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    r = subprocess.run(
        [sys.executable, "benchmarks/switch_bench.py", "--duration", "1", "--warmup", "0.5",
         "--no-profile", "--require-peer", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    explain = f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert r.returncode == 0, explain
    data = json.loads(out.read_text())
    assert data["failures"] == [], explain
    rows = {(row["target"], row["case"]): row for row in data["results"]}
    assert {target for target, _ in rows} == {"vvu-switch", "testpmd", "ovs-dpdk"}, explain
    assert len([t for t, _ in rows if t == "vvu-switch"]) == len(cases()), explain
    for (target, case), row in rows.items():
        assert row["frames"] > 0 and row["rate"] > 0, f"{target} {case}: {row}"
        # The target's own count agrees that something went out of the receiver's port.
        assert row["forwarded"] is not None and row["forwarded"] >= row["frames"], \
            f"{target} {case}: {row}"
    assert "vvu-switch / testpmd at 64 B" in r.stdout
    assert "vvu-switch / ovs-dpdk at 64 B" in r.stdout
