"""Issue 13's proof: a lab over two "hosts" (network namespaces on one bridge, an
sshd in each), deployed, inspected and torn down by the real ``ansible-playbook``
over SSH with the playbooks of ansible/.

* ``test_playbooks_over_ssh``: the playbooks over SSH with a stand-in vvu-launch
  (no VMs, about a minute): every host gets its own slice, a second run changes
  nothing, teardown leaves nothing.
* ``test_a_network_across_two_hosts``: examples/fleet.yaml's shape with the real
  vvu-launch: a vswitch appliance and a consumer per host, the switches joined by
  a VXLAN tunnel over the hosts' bridge; the consumers ping each other and move
  2 MiB with its sha256 across the tunnel; a second deploy changes nothing;
  teardown leaves no process, RAM file, socket or lab directory on any host.
  Boots four TCG guests: take /tmp/vvu-heavy.lock on a shared machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import unavailable
from tests.support.fleet_hosts import FleetHosts, missing
from vvu_runtime.launch.checks import check_ping, check_transfer
from vvu_runtime.launch.fleet import FLEET_GROUP, inventory_data
from vvu_runtime.launch.shell import CommandResult
from vvu_runtime.launch.topology import load_topology

pytestmark = [pytest.mark.acceptance]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
FAKE = REPO / "tests" / "support" / "fake_vvu_launch.py"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
HOSTS = ["h1", "h2"]

TOPOLOGY = """\
name: {lab}
hosts:
  h1: {{address: {a1}}}
  h2: {{address: {a2}}}
appliances:
  sw1: {{kind: vswitch, host: h1, subnet: 10.10.9.0/24, tunnels: [{{peer: sw2, vni: 100}}]}}
  sw2: {{kind: vswitch, host: h2}}
consumers:
  c1: {{host: h1, nics: [sw1]}}
  c2: {{host: h2, nics: [sw2]}}
"""


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[FleetHosts]:
    why = missing()
    if why is not None:
        unavailable(f"host capability missing: {why}")
    if not PLAYBOOK.exists():
        unavailable("host capability missing: ansible-playbook in the venv (ansible-core, "
                    "a dev dependency: run ./setup)")
    with FleetHosts(tmp_path / "hosts", HOSTS) as h:
        yield h
    assert h.links_left() == [], "the hosts' network outlived them"


def _topology(tmp: Path, hosts: FleetHosts, lab: str) -> Path:
    path = tmp / f"{lab}.yaml"
    path.write_text(TOPOLOGY.format(lab=lab, a1=hosts.address("h1"), a2=hosts.address("h2")))
    return path


def _environment(tmp: Path, host: str, lab: str) -> dict[str, str]:
    return {"VVU_STATE_DIR": str(tmp / host / "state"), "VVU_RUN_DIR": f"/run/vvuf-{lab}-{host}",
            "PYTHONPATH": str(REPO), "FAKE_VVU_STATE": str(tmp / host / "fake")}


def _inventory(tmp: Path, hosts: FleetHosts, topology: Path, launcher: str) -> Path:
    lab = load_topology(topology).name
    data: dict[str, Any] = inventory_data(load_topology(topology))
    for name, host in data["all"]["children"][FLEET_GROUP]["hosts"].items():
        host.update({
            "ansible_ssh_private_key_file": str(hosts.key),
            "ansible_ssh_common_args": f"-o IdentitiesOnly=yes -o UserKnownHostsFile="
                                       f"{hosts.known_hosts} -o StrictHostKeyChecking=accept-new",
            "ansible_python_interpreter": "/usr/bin/python3",
            "vvu_root": str(tmp / name / "opt"),
            "vvu_fleet_dir": str(tmp / name / "etc"),
            "vvu_launch": launcher,
            "vvu_environment": _environment(tmp, name, lab),
        })
    data["all"]["vars"].update({"vvu_topology": str(topology),
                                "vvu_setup_command": "echo setup > setup.log",
                                "vvu_release_dir": str(tmp / "releases"),
                                "vvu_status_dir": str(tmp / "status"),
                                "vvu_up_timeout": 1500})
    path = tmp / "hosts.yml"
    with path.open("w") as f:
        YAML().dump(data, f)
    return path


def _play(playbook: str, inventory: Path, tmp: Path, timeout: float = 1800) -> dict[str, int]:
    """Run a playbook over SSH; ``changed`` per host from its recap."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOME": str(tmp / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp")}
    r = subprocess.run([str(PLAYBOOK), "-i", str(inventory), playbook], cwd=ANSIBLE, env=env,
                       capture_output=True, text=True, timeout=timeout)
    (tmp / f"{playbook}.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    recap = r.stdout[r.stdout.index("PLAY RECAP"):]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+:.*changed=(\d+)", recap, re.M)}


def test_playbooks_over_ssh(hosts: FleetHosts, tmp_path: Path) -> None:
    topology = _topology(tmp_path, hosts, "sshfleet")
    inv = _inventory(tmp_path, hosts, topology, f"{sys.executable} {FAKE}")
    assert _play("prepare.yml", inv, tmp_path)["h1"] > 0
    assert _play("prepare.yml", inv, tmp_path) == {"h1": 0, "h2": 0}
    assert _play("deploy.yml", inv, tmp_path)["h2"] > 0
    assert _play("deploy.yml", inv, tmp_path) == {"h1": 0, "h2": 0}
    for host in HOSTS:
        calls = (tmp_path / host / "fake" / "calls").read_text().splitlines()
        assert calls[0].startswith(f"up --detach --host {host} ")
    status = json.loads((tmp_path / "status" / "sshfleet.json").read_text())
    assert {h: s["host"] for h, s in status["hosts"].items()} == {"h1": "h1", "h2": "h2"}
    assert _play("teardown.yml", inv, tmp_path)["h1"] > 0
    assert _play("teardown.yml", inv, tmp_path) == {"h1": 0, "h2": 0}
    assert hosts.leftovers() == []


class CrossHostLab:
    """What vvu_runtime.launch.checks needs of a lab (``run``, ``address``), for nodes
    on several hosts: commands go through `vvu-launch ssh` in the node's namespace."""

    def __init__(self, hosts: FleetHosts, tmp: Path, topology: Path) -> None:
        self.hosts, self.tmp = hosts, tmp
        self.topo = load_topology(topology)

    def run(self, node: str, command: str, timeout: float = 120) -> CommandResult:
        host = self.topo.node(node).host
        assert host is not None
        r = self.hosts.run(host, [sys.executable, "-m", "vvu_runtime.launch.cli", "ssh",
                                  "--lab", self.topo.name, "--timeout", str(timeout), node,
                                  "--", command],
                           timeout=timeout + 60, env=_environment(self.tmp, host,
                                                                  self.topo.name))
        return CommandResult(r.returncode, r.stdout, r.stderr)

    def address(self, src: str, dst: str) -> str:
        return str(self.topo.consumer(dst).nics[0].address.ip)


def _wait_for_ssh(access: CrossHostLab, nodes: list[str], timeout: float = 300) -> None:
    """TCG guests under load can be slow to answer right after `up`: wait for each."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            r = access.run(node, "true", timeout=30)
            if r.ok:
                break
            assert time.monotonic() < deadline, f"{node} does not answer SSH: {r.stderr[-500:]}"
            time.sleep(5)


def _keep_logs(tmp: Path, lab: str) -> None:
    """Each host's lab logs, kept beside the test's files (teardown removes the lab's)."""
    for h in HOSTS:
        logs = tmp / h / "state" / "labs" / lab / "logs"
        if logs.is_dir():
            shutil.copytree(logs, tmp / "logs" / h, dirs_exist_ok=True)


def _left_on_the_machine(lab: str, tmp: Path) -> list[str]:
    out = [str(p) for p in Path("/dev/shm").glob(f"vvu-lab-{lab}-*")]
    for h in HOSTS:
        # The hosts' runtime roots are this test's choice: empty, they go too.
        root = Path(_environment(tmp, h, lab)["VVU_RUN_DIR"])
        if root.is_dir():
            out += [str(p) for p in root.iterdir()]
            if not any(root.iterdir()):
                root.rmdir()
    out += [str(p) for h in HOSTS for p in (tmp / h / "state" / "labs").glob("*")]
    out += [str(p) for h in HOSTS for p in (tmp / h / "etc").glob("*")]
    return out


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_a_network_across_two_hosts(hosts: FleetHosts, tmp_path: Path) -> None:
    from vvu_runtime.launch.appliance import build_appliance
    from vvu_runtime.launch.toolchain import Toolchain

    # Both hosts share this checkout's images/: build them once, before two `up`s would.
    tc = Toolchain()
    for kind in ("vswitch", "consumer"):
        build_appliance(tc, kind)
    lab = f"fleet{os.getpid() % 10000}"
    topology = _topology(tmp_path, hosts, lab)
    inv = _inventory(tmp_path, hosts, topology, f"{sys.executable} -m vvu_runtime.launch.cli")
    access = CrossHostLab(hosts, tmp_path, topology)
    try:
        assert _play("deploy.yml", inv, tmp_path)["h1"] > 0
        _wait_for_ssh(access, ["c1", "c2"])
        ping = check_ping(access, {"from": "c1", "to": "c2", "count": 3})  # type: ignore[arg-type]
        assert "0% loss" in ping, ping
        assert "0% loss" in check_ping(access, {"from": "c2", "to": "c1",  # type: ignore[arg-type]
                                                "count": 3})
        moved = check_transfer(access, {"from": "c1", "to": "c2",  # type: ignore[arg-type]
                                        "size": 2 << 20})
        assert "sha256 equal" in moved, moved
        # The frames crossed the tunnel: sw1's table counts them on its tunnel port.
        table = access.run("sw1", "cat /run/vvu/switch.status 2>/dev/null || "
                                  "journalctl -u vvu-switch --no-pager | tail -40").stdout
        (tmp_path / "sw1.status").write_text(table)
        assert _play("deploy.yml", inv, tmp_path) == {"h1": 0, "h2": 0}
        status = json.loads((tmp_path / "status" / f"{lab}.json").read_text())
        states = {n["name"]: n["state"] for s in status["hosts"].values() for n in s["nodes"]}
        assert states == {"sw1": "ready", "c1": "ready", "sw2": "ready", "c2": "ready"}
    finally:
        _keep_logs(tmp_path, lab)
        _play("teardown.yml", inv, tmp_path)
    assert hosts.leftovers() == []
    assert _left_on_the_machine(lab, tmp_path) == []
    assert _play("teardown.yml", inv, tmp_path) == {"h1": 0, "h2": 0}
