"""ansible/: the playbooks run by the real ``ansible-playbook`` against two "hosts"
that are this machine (``ansible_connection=local``), each with its own directories
and a stand-in vvu-launch (tests/support/fake_vvu_launch.py): the right commands per
host, the merged status, and idempotency (a second run changes nothing). The same
playbooks over SSH against hosts that boot VMs are the acceptance test's job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from vvu_runtime.launch.fleet import FLEET_GROUP, inventory_data
from vvu_runtime.launch.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
FAKE = REPO / "tests" / "support" / "fake_vvu_launch.py"
PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or \
    shutil.which("ansible-playbook")

pytestmark = [pytest.mark.skipif(PLAYBOOK is None, reason="needs ansible-playbook "
                                 "(ansible-core, a dev dependency)"),
              pytest.mark.timeout(600)]


def _inventory(tmp: Path) -> Path:
    data: dict[str, Any] = inventory_data(load_topology(REPO / "examples" / "fleet.yaml"))
    for name, host in data["all"]["children"][FLEET_GROUP]["hosts"].items():
        root = tmp / name
        host.update({
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "vvu_root": str(root / "opt"),
            "vvu_fleet_dir": str(root / "etc"),
            "vvu_launch": f"{sys.executable} {FAKE}",
            "vvu_environment": {"FAKE_VVU_STATE": str(root / "state")},
        })
    data["all"]["vars"].update({
        "vvu_topology": str(REPO / "examples" / "fleet.yaml"),
        "vvu_setup_command": "echo setup",
        "vvu_release_dir": str(tmp / "releases"),
        "vvu_status_dir": str(tmp / "status"),
    })
    path = tmp / "hosts.yml"
    with path.open("w") as f:
        YAML().dump(data, f)
    return path


def _play(playbook: str, inventory: Path, tmp: Path, *extra: str) -> dict[str, dict[str, int]]:
    """Run a playbook; the recap's counters per host."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
           "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOME": str(tmp / "ansible-home")}
    assert PLAYBOOK is not None
    r = subprocess.run([PLAYBOOK, "-i", str(inventory), playbook, *extra], cwd=ANSIBLE,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    recap = r.stdout[r.stdout.index("PLAY RECAP"):]
    out = {}
    for m in re.finditer(r"^(\S+)\s+:\s+(.*)$", recap, re.M):
        out[m[1]] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[2])}
    return out


def _calls(tmp: Path, host: str) -> list[str]:
    path = tmp / host / "state" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_prepare_deploy_status_teardown_are_idempotent(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)

    first = _play("prepare.yml", inv, tmp_path)
    assert first["h1"]["changed"] > 0 and first["h2"]["changed"] > 0
    release = next((tmp_path / "h1" / "opt" / "releases").iterdir())
    assert (release / "pyproject.toml").is_file() and (release / "setup.log").is_file()
    assert (tmp_path / "h1" / "opt" / "current").resolve() == release
    again = _play("prepare.yml", inv, tmp_path)
    assert {h: c["changed"] for h, c in again.items()} == {"h1": 0, "h2": 0}

    first = _play("deploy.yml", inv, tmp_path)
    assert first["h1"]["changed"] > 0
    for host in ("h1", "h2"):
        topology = tmp_path / host / "etc" / "fleet" / "topology.yaml"
        # deploy.yml ends with the fleet's status.
        assert _calls(tmp_path, host) == [f"up --detach --host {host} {topology}",
                                          "status --json fleet"]
    again = _play("deploy.yml", inv, tmp_path)
    assert {h: c["changed"] for h, c in again.items()} == {"h1": 0, "h2": 0}

    # The merged status: both hosts' slices in one document and one table.
    status = json.loads((tmp_path / "status" / "fleet.json").read_text())
    assert set(status["hosts"]) == {"h1", "h2"}
    assert status["hosts"]["h2"]["nodes"][0]["name"] == "sw-h2"
    table = (tmp_path / "status" / "fleet.txt").read_text()
    assert re.search(r"^h1\s+sw-h1\s+appliance\s+vswitch\s+ready", table, re.M), table
    assert re.search(r"^h2\s+c-h2-nic0\s+net\s+c-h2\s+sw-h2\s+0x7", table, re.M), table

    # A changed topology: that host's slice goes down and up again.
    changed = tmp_path / "fleet2.yaml"
    changed.write_text((REPO / "examples" / "fleet.yaml").read_text() + "# changed\n")
    _play("deploy.yml", inv, tmp_path, "-e", f"vvu_topology={changed}")
    assert _calls(tmp_path, "h1")[-4:-1] == [
        "status --json fleet", "down fleet",
        f"up --detach --host h1 {tmp_path / 'h1' / 'etc' / 'fleet' / 'topology.yaml'}"]

    first = _play("teardown.yml", inv, tmp_path)
    assert first["h1"]["changed"] > 0
    assert _calls(tmp_path, "h1")[-1] == "down --cleanup fleet"
    assert not (tmp_path / "h1" / "etc" / "fleet").exists()
    again = _play("teardown.yml", inv, tmp_path)
    assert {h: c["changed"] for h, c in again.items()} == {"h1": 0, "h2": 0}
    _play("teardown.yml", inv, tmp_path, "-e", "vvu_teardown_runtime=true")
    assert not (tmp_path / "h1" / "opt").exists() and not (tmp_path / "h2" / "opt").exists()


def test_status_of_a_fleet_not_deployed_says_so(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    _play("status.yml", inv, tmp_path)
    status = json.loads((tmp_path / "status" / "fleet.json").read_text())
    assert status["hosts"]["h1"]["phase"].startswith("not deployed: vvu-launch: error: no lab")
