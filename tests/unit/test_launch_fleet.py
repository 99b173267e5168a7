"""vvu-launch with a topology placed on several hosts: the slice a host brings up,
the refusals, and the generated Ansible inventory (no VMs: render only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from vvu_runtime.launch import cli
from vvu_runtime.launch.fleet import FLEET_GROUP, inventory_data
from vvu_runtime.launch.topology import load_topology, load_topology_text

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "examples" / "fleet.yaml"


def test_up_of_a_placed_topology_needs_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["up", "--detach", str(FLEET)]) == 1
    err = capsys.readouterr().err
    assert "lab fleet places its nodes on hosts h1, h2: give --host NAME" in err
    assert cli.main(["up", "--detach", "--host", "h9", str(FLEET)]) == 1
    assert "lab fleet has no host 'h9' (hosts: h1, h2)" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_host_on_a_topology_without_hosts_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["up", "--host", "h1", str(REPO / "examples" / "default.yaml")]) == 1
    assert "--host h1: the topology of lab default has no hosts: (leave --host out)" in \
        capsys.readouterr().err


def test_render_of_a_slice_shows_only_that_hosts_nodes(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", "--host", "h2", str(FLEET)]) == 0
    out = capsys.readouterr().out
    assert "# appliance sw2 (vswitch)" in out and "# consumer c2 (consumer)" in out
    assert "sw1" not in out and "c1-nic0" not in out


def test_validate_lists_the_hosts_and_tunnels(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(FLEET)]) == 0
    out = capsys.readouterr().out
    assert "  host h1 (10.99.0.1): sw1, c1\n  host h2 (10.99.0.2): sw2, c2\n" in out
    assert "1 tunnel(s): sw1 - sw2" in out


def test_inventory_of_the_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hosts.yml"
    assert cli.main(["inventory", str(FLEET), "-o", str(out)]) == 0
    data = YAML(typ="safe").load(out.read_text())
    assert data["all"]["vars"] == {"vvu_lab": "fleet", "vvu_topology_file": "fleet.yaml"}
    hosts = data["all"]["children"][FLEET_GROUP]["hosts"]
    assert hosts["h1"] == {"ansible_host": "10.99.0.1", "ansible_user": "root",
                           "vvu_host": "h1", "vvu_nodes": ["sw1", "c1"],
                           "vvu_tunnel_ports": [4789]}
    assert hosts["h2"]["vvu_nodes"] == ["sw2", "c2"]
    assert cli.main(["inventory", str(REPO / "examples" / "default.yaml")]) == 1
    assert "has no hosts:" in capsys.readouterr().err


def test_inventory_reference_leaves_the_connection_to_the_operators_inventory() -> None:
    topo = load_topology_text(
        "name: lab\nhosts:\n  h1: {inventory: rack1-node7}\n  h2: {address: h2.example, "
        "user: ops, key: /keys/h2}\nconsumers:\n  c1: {host: h1, image: {kernel: k, initrd: i}}"
        "\n  c2: {host: h2, image: {kernel: k, initrd: i}}\n", Path("/t/lab.yaml"))
    hosts = inventory_data(topo)["all"]["children"][FLEET_GROUP]["hosts"]
    assert hosts["rack1-node7"] == {"vvu_host": "h1", "vvu_nodes": ["c1"],
                                    "vvu_tunnel_ports": []}
    assert hosts["h2"]["ansible_ssh_private_key_file"] == "/keys/h2"
    assert hosts["h2"]["ansible_user"] == "ops"
    assert load_topology(FLEET).slice("h1").sliced_for == "h1"
