"""Issue 13's proof: a lab over two "hosts" (network namespaces on one bridge, an
sshd in each), prepared, deployed, inspected and torn down by the real
``ansible-playbook`` over SSH with the playbooks of ansible/.

One set of hosts and one lab for the module, in the order an operator goes:

* prepare.yml runs the release's own ``./setup`` on each host (a ``git archive`` of
  this checkout's HEAD, unpacked per host: the hosts share this machine's file
  system, so each gets its own release directory and .venv; the tool chain cache
  is shared as on any host). A second prepare changes nothing.
* deploy.yml brings up examples/fleet.yaml's shape with the release's
  ``vvu-launch``: a vswitch appliance and a consumer per host, the switches joined
  by a VXLAN tunnel over the hosts' bridge. The images are built once, in this
  checkout, and shared (``vvu_images_dir``), as hosts on one file share would.
* the tests: the consumers ping each other and move a file with its sha256 across
  the tunnel; a second deploy changes nothing; teardown (the runtime too) leaves no
  process, RAM file, socket, lab or release directory on any host.

Boots four TCG guests: take /tmp/vvu-heavy.lock on a shared machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import unavailable
from tests.support.fleet_hosts import FleetHosts, missing
from vvu_runtime.launch.checks import check_ping, check_transfer
from vvu_runtime.launch.fleet import FLEET_GROUP, inventory_data
from vvu_runtime.launch.shell import CommandResult
from vvu_runtime.launch.toolchain import Toolchain
from vvu_runtime.launch.topology import Topology, load_topology

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
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


@dataclass
class Fleet:
    """The module's hosts and lab, and what the playbooks said so far."""

    hosts: FleetHosts
    tmp: Path
    topo: Topology
    inventory: Path
    #: ``changed`` per host of each run, by playbook: {"prepare.yml": [{h1: 3, ...}, ...]}
    recaps: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    torn_down: bool = False

    @property
    def lab(self) -> str:
        return self.topo.name

    def play(self, playbook: str, *extra: str, timeout: float = 1800) -> dict[str, int]:
        """Run a playbook over SSH; ``changed`` per host from its recap."""
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOME": str(self.tmp / "ansible-home"),
               "ANSIBLE_LOCAL_TEMP": str(self.tmp / "ansible-tmp")}
        start = time.monotonic()
        r = subprocess.run([str(PLAYBOOK), "-i", str(self.inventory), playbook, *extra],
                           cwd=ANSIBLE, env=env, capture_output=True, text=True,
                           timeout=timeout)
        n = len(self.recaps.get(playbook, []))
        (self.tmp / f"{playbook}.{n}.log").write_text(
            f"{time.monotonic() - start:.1f} s\n{r.stdout}{r.stderr}")
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        recap = r.stdout[r.stdout.index("PLAY RECAP"):]
        changed = {m[1]: int(m[2])
                   for m in re.finditer(r"^(\S+)\s+:.*changed=(\d+)", recap, re.M)}
        self.recaps.setdefault(playbook, []).append(changed)
        return changed

    def release(self, host: str) -> Path:
        return self.tmp / host / "opt" / "current"

    # What vvu_runtime.launch.checks needs of a lab (``run``, ``address``), for nodes
    # on several hosts: `vvu-launch ssh` of the host's release in the host's namespace.
    def run(self, node: str, command: str, timeout: float = 120) -> CommandResult:
        host = self.topo.node(node).host
        assert host is not None
        r = self.hosts.run(host, [str(self.release(host) / ".venv" / "bin" / "vvu-launch"),
                                  "ssh", "--lab", self.lab, "--timeout", str(timeout), node,
                                  "--", command],
                           timeout=timeout + 60, env=_environment(self.tmp, host, self.lab))
        return CommandResult(r.returncode, r.stdout, r.stderr)

    def address(self, src: str, dst: str) -> str:
        return str(self.topo.consumer(dst).nics[0].address.ip)


def _wheelhouse(toolchain: Toolchain) -> Path:
    """Wheels of everything ./setup installs, for hosts without PyPI.

    The namespaces have no route out (no NAT here), like an air-gapped fleet: their
    ./setup installs from this directory (PIP_NO_INDEX, PIP_FIND_LINKS). Built once
    per set of requirements (about 12 s) and kept in the tool chain cache.
    """
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = sorted([*pyproject["project"]["dependencies"],
                     *pyproject["project"]["optional-dependencies"]["dev"],
                     *pyproject["build-system"]["requires"], "pip"])
    key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
    house = toolchain.cache_dir / "fleet-wheelhouse" / key
    if not house.is_dir():
        part = house.with_name(f"{key}.part{os.getpid()}")
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(part),
                            *wanted], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"pip wheel: {r.stderr[-3000:]}"
        part.rename(house)
    return house


def _environment(tmp: Path, host: str, lab: str) -> dict[str, str]:
    # The hosts' sshd sessions start from a clean environment: the tool chain cache
    # this machine uses is named, so each host's ./setup finds it (CI's may not be
    # the default), and pip is pointed at the wheelhouse.
    tc = Toolchain()
    return {"VVU_STATE_DIR": str(tmp / host / "state"), "VVU_RUN_DIR": f"/run/vvuf-{lab}-{host}",
            "VVU_CACHE_DIR": str(tc.cache_dir), "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(_wheelhouse(tc))}


def _inventory(tmp: Path, hosts: FleetHosts, topology: Path) -> Path:
    """`vvu-launch inventory`'s data, with this test's SSH key and per-host directories."""
    topo = load_topology(topology)
    data: dict[str, Any] = inventory_data(topo)
    for name, host in data["all"]["children"][FLEET_GROUP]["hosts"].items():
        host.update({
            "ansible_ssh_private_key_file": str(hosts.key),
            "ansible_ssh_common_args": f"-o IdentitiesOnly=yes -o UserKnownHostsFile="
                                       f"{hosts.known_hosts} -o StrictHostKeyChecking=accept-new",
            "ansible_python_interpreter": "/usr/bin/python3",
            "vvu_root": str(tmp / name / "opt"),
            "vvu_fleet_dir": str(tmp / name / "etc"),
            "vvu_environment": _environment(tmp, name, topo.name),
        })
    data["all"]["vars"].update({"vvu_topology": str(topology),
                                "vvu_images_dir": str((REPO / "images").resolve()),
                                "vvu_release_dir": str(tmp / "releases"),
                                "vvu_status_dir": str(tmp / "status"),
                                "vvu_up_timeout": 1500})
    path = tmp / "hosts.yml"
    with path.open("w") as f:
        YAML().dump(data, f)
    return path


def _wait_for_ssh(fleet: Fleet, nodes: list[str], timeout: float = 300) -> None:
    """TCG guests under load can be slow to answer right after `up`: wait for each."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            r = fleet.run(node, "true", timeout=30)
            if r.ok:
                break
            assert time.monotonic() < deadline, f"{node} does not answer SSH: {r.stderr[-500:]}"
            time.sleep(5)


def _keep_logs(fleet: Fleet) -> None:
    """Each host's lab logs, kept beside the test's files (teardown removes the lab's)."""
    for h in HOSTS:
        logs = fleet.tmp / h / "state" / "labs" / fleet.lab / "logs"
        if logs.is_dir():
            shutil.copytree(logs, fleet.tmp / "logs" / h, dirs_exist_ok=True)


def _left_on_the_machine(fleet: Fleet) -> list[str]:
    lab, tmp = fleet.lab, fleet.tmp
    out = [str(p) for p in Path("/dev/shm").glob(f"vvu-lab-{lab}-*")]
    for h in HOSTS:
        # The hosts' runtime roots are this test's choice: empty, they go too.
        root = Path(_environment(tmp, h, lab)["VVU_RUN_DIR"])
        if root.is_dir():
            out += [str(p) for p in root.iterdir()]
            if not any(root.iterdir()):
                root.rmdir()
        out += [str(p) for p in (tmp / h / "state" / "labs").glob("*")]
        out += [str(p) for p in (tmp / h / "etc").glob("*")]
        out += [str(p) for p in [tmp / h / "opt"] if p.exists()]
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, toolchain: Toolchain) -> Iterator[Fleet]:
    why = missing()
    if why is not None:
        unavailable(f"host capability missing: {why}")
    if not PLAYBOOK.exists():
        unavailable("host capability missing: ansible-playbook in the venv (ansible-core, "
                    "a dev dependency: run ./setup)")
    from vvu_runtime.launch.appliance import build_appliance

    # The hosts share this checkout's images/ (vvu_images_dir): build them once here,
    # before two `up`s would.
    for kind in ("vswitch", "consumer"):
        build_appliance(toolchain, kind)
    _wheelhouse(toolchain)
    tmp = tmp_path_factory.mktemp("fleet")
    lab = f"fleet{os.getpid() % 10000}"
    with FleetHosts(tmp / "hosts", HOSTS) as hosts:
        topology = tmp / f"{lab}.yaml"
        topology.write_text(TOPOLOGY.format(lab=lab, a1=hosts.address("h1"),
                                            a2=hosts.address("h2")))
        fleet = Fleet(hosts, tmp, load_topology(topology), _inventory(tmp, hosts, topology))
        try:
            fleet.play("prepare.yml")
            fleet.play("prepare.yml")
            fleet.play("deploy.yml")
            _wait_for_ssh(fleet, ["c1", "c2"])
            yield fleet
        finally:
            _keep_logs(fleet)
            if not fleet.torn_down:
                fleet.play("teardown.yml", "-e", "vvu_teardown_runtime=true")
    assert hosts.links_left() == [], "the hosts' network outlived them"


def test_prepare_runs_setup_on_every_host_once(fleet: Fleet) -> None:
    first, second = fleet.recaps["prepare.yml"]
    assert all(first[h] > 0 for h in HOSTS), first
    assert second == {"h1": 0, "h2": 0}
    for h in HOSTS:
        release = fleet.release(h).resolve()
        assert release.name.startswith("vvu-") and release.parent.parent == fleet.tmp / h / "opt"
        log = (release / "setup.log").read_text()
        assert "installed vvu (editable)" in log and "==> setup: done" in log, log[-2000:]
        assert (release / ".venv" / "bin" / "vvu-launch").is_file()


def test_each_host_runs_its_own_slice(fleet: Fleet) -> None:
    first = fleet.recaps["deploy.yml"][0]
    assert sorted(first) == HOSTS and all(n > 0 for n in first.values()), first
    status = json.loads((fleet.tmp / "status" / f"{fleet.lab}.json").read_text())
    nodes = {h: {n["name"]: n["state"] for n in s["nodes"]} for h, s in status["hosts"].items()}
    assert nodes == {"h1": {"sw1": "ready", "c1": "ready"}, "h2": {"sw2": "ready", "c2": "ready"}}
    assert {h: s["host"] for h, s in status["hosts"].items()} == {"h1": "h1", "h2": "h2"}


def test_consumers_ping_each_other_across_the_tunnel(fleet: Fleet) -> None:
    for src, dst in (("c1", "c2"), ("c2", "c1")):
        ping = check_ping(fleet, {"from": src, "to": dst, "count": 3})  # type: ignore[arg-type]
        assert "0% loss" in ping, ping


def test_a_file_crosses_the_tunnel_with_its_checksum(fleet: Fleet) -> None:
    moved = check_transfer(fleet, {"from": "c1", "to": "c2",  # type: ignore[arg-type]
                                   "size": 2 << 20})
    assert "sha256 equal" in moved, moved
    (fleet.tmp / "transfer.txt").write_text(moved + "\n")
    # The frames crossed the tunnel: sw1's table counts them on its tunnel port.
    table = fleet.run("sw1", "kill -USR1 $(systemctl show -p MainPID --value vvu-switch); "
                             "sleep 1; journalctl -u vvu-switch --no-pager | tail -8").stdout
    (fleet.tmp / "sw1.table").write_text(table)
    row = re.search(r"\bsw2\s+up \(vxlan .*vni 100.*\)\s+(\d+)\s+(\d+)\s+\d+\s+(\d+)", table)
    assert row is not None, table
    assert int(row[3]) > 1000, table  # out pkts: the 2 MiB went into the tunnel


def test_second_deploy_changes_nothing(fleet: Fleet) -> None:
    assert fleet.play("deploy.yml") == {"h1": 0, "h2": 0}


def test_teardown_leaves_nothing_on_any_host(fleet: Fleet) -> None:
    fleet.torn_down = True
    assert all(n > 0 for n in fleet.play("teardown.yml", "-e",
                                         "vvu_teardown_runtime=true").values())
    assert fleet.hosts.leftovers() == []
    assert _left_on_the_machine(fleet) == []
    assert fleet.play("teardown.yml", "-e", "vvu_teardown_runtime=true") == {"h1": 0, "h2": 0}
