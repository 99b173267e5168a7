"""What the launcher renders for a switch appliance with tunnels, on one host's slice:
the underlay NIC (QEMU user-mode networking with the host's UDP port forwarded),
the appliance config's tunnels, the networkd configs (underlay, consumer MTU), and
the vvu-switch command line the appliance builds from that config."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from vvu_runtime.appliance.backend import commands
from vvu_runtime.appliance.config import ConfigError, Tunnel, Underlay, parse_config
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.lab import ImageFiles, LabPaths, LabPlan, plan_lab
from vvu_runtime.launch.render import UnderlayNic, render_devices
from vvu_runtime.launch.topology import load_topology, load_topology_text

REPO = Path(__file__).resolve().parents[2]
IMAGES = {kind: ImageFiles(kernel=Path(f"/images/vvu-{kind}.vmlinuz"),
                           initrd=Path(f"/images/vvu-{kind}.initrd"), cmdline="rw",
                           disk=Path(f"/images/vvu-{kind}.raw"))
          for kind in ("vswitch", "storage", "consumer")}
PORTS = {"sw1": 40001, "sw2": 40002, "c1": 40003, "c2": 40004}


def _plan(host: str, text: str | None = None) -> LabPlan:
    topo = (load_topology(REPO / "examples" / "fleet.yaml") if text is None
            else load_topology_text(text, Path("/labs/t.yaml")))
    part = topo.slice(host)
    paths = LabPaths(name=topo.name, root=Path(f"/labs/{topo.name}"),
                     run=Path(f"/run/vvu/{topo.name}"))
    return plan_lab(part, paths, accel=Accelerator.TCG, accel_reason="test",
                    public_key="ssh-ed25519 AAAA test", images=IMAGES, ports=PORTS)


def _credentials(argv: list[str]) -> dict[str, str]:
    out = {}
    for i, a in enumerate(argv):
        if a == "-smbios" and "io.systemd.credential.binary:" in argv[i + 1]:
            name, b64 = argv[i + 1].split("io.systemd.credential.binary:", 1)[1].split("=", 1)
            out[name] = base64.b64decode(b64).decode()
    return out


def test_underlay_nic_template() -> None:
    assert render_devices(UnderlayNic(4800, "52:54:00:00:00:09")) == [
        "-netdev", "user,id=underlay,net=10.0.3.0/24,host=10.0.3.2,"
                   "hostfwd=udp:0.0.0.0:4800-10.0.3.15:4789",
        "-device", "virtio-net-pci,netdev=underlay,mac=52:54:00:00:00:09"]


def test_a_hosts_slice_renders_only_its_nodes_and_records_the_host() -> None:
    plan = _plan("h2")
    assert [n.name for n in plan.nodes] == ["sw2", "c2"]
    assert [lk.name for lk in plan.links] == ["c2-nic0"]
    data = plan.to_json()
    assert data["host"] == "h2" and data["topology"]["sliced_for"] == "h2"


def test_switch_with_tunnels_gets_an_underlay_nic_and_its_tunnels_in_the_config() -> None:
    argv = _plan("h1").node("sw1").argv
    i = argv.index("user,id=underlay,net=10.0.3.0/24,host=10.0.3.2,"
                   "hostfwd=udp:0.0.0.0:4789-10.0.3.15:4789")
    assert argv[i - 1] == "-netdev" and argv[i + 1] == "-device"
    assert argv[i + 2].startswith("virtio-net-pci,netdev=underlay,mac=52:54:")
    creds = _credentials(argv)
    config = json.loads(creds["vvu.appliance"])
    assert config["links"] == [{"name": "c1-nic0"}]
    assert config["tunnels"] == [{"name": "sw2", "remote": "10.99.0.2", "port": 4789,
                                  "vni": 100}]
    assert config["underlay"] == {"address": "10.0.3.15", "port": 4789, "mtu": 1500}
    underlay_mac = argv[i + 2].rsplit("=", 1)[1]
    assert creds["network.network.50-vvu-underlay"] == (
        f"[Match]\nMACAddress={underlay_mac}\n\n[Link]\nMTUBytes=1500\n\n[Network]\n"
        "Address=10.0.3.15/24\nLinkLocalAddressing=no\n\n"
        "[Route]\nDestination=10.99.0.2/32\nGateway=10.0.3.2\n")
    # The appliance's own parser takes what the launcher wrote.
    parsed = parse_config(creds["vvu.appliance"], "credential vvu.appliance")
    assert parsed.tunnels == (Tunnel("sw2", "10.99.0.2", 4789, 100),)
    assert parsed.underlay == Underlay("10.0.3.15", 4789, 1500)


def test_consumers_on_a_tunnelled_network_get_the_smaller_mtu() -> None:
    creds = _credentials(_plan("h2").node("c2").argv)
    assert creds["network.network.50-vvu-nic0"].endswith(
        "Address=10.10.9.11/24\nLinkLocalAddressing=no\n\n[Link]\nMTUBytes=1450\n")


def test_peer_port_and_path_mtu_come_from_the_peer() -> None:
    text = (REPO / "examples" / "fleet.yaml").read_text().replace(
        "h2: {address: 10.99.0.2}", "h2: {address: 10.99.0.2, mtu: 9000}").replace(
        "kind: vswitch\n    host: h2", "kind: vswitch\n    host: h2\n    underlay_port: 4900")
    plan = _plan("h1", text)
    config = json.loads(_credentials(plan.node("sw1").argv)["vvu.appliance"])
    assert config["tunnels"][0]["port"] == 4900
    assert config["underlay"]["mtu"] == 1500  # the smaller of the two hosts'
    sw2 = _plan("h2", text).node("sw2").argv
    assert "hostfwd=udp:0.0.0.0:4900-10.0.3.15:4789" in " ".join(sw2)


def test_switch_without_tunnels_has_no_underlay() -> None:
    topo = load_topology(REPO / "examples" / "default.yaml")
    paths = LabPaths(name="default", root=Path("/labs/default"), run=Path("/run/vvu/default"))
    plan = plan_lab(topo, paths, accel=Accelerator.TCG, accel_reason="test",
                    public_key="k", images=IMAGES, ports={})
    argv = plan.node("sw1").argv
    assert not any("underlay" in a for a in argv)
    assert "tunnels" not in json.loads(_credentials(argv)["vvu.appliance"])


def test_vvu_switch_command_line_of_a_switch_with_tunnels() -> None:
    cfg = parse_config(json.dumps({
        "kind": "vswitch", "links": [{"name": "c1-nic0"}],
        "tunnels": [{"name": "sw2", "remote": "192.0.2.2", "vni": 100},
                    {"name": "sw3", "remote": "h3.example", "port": 4900, "vni": 100}],
        "underlay": {"address": "10.0.3.15", "mtu": 9000}}), "test")
    [b] = commands(cfg, {"c1-nic0": "0000:00:05.0"}, prepare=False)
    assert b.argv[b.argv.index("--tunnel"):] == [
        "--tunnel", "sw2=192.0.2.2,port=4789,vni=100",
        "--tunnel", "sw3=h3.example,port=4900,vni=100",
        "--tunnel-bind", "10.0.3.15", "--tunnel-port", "4789", "--underlay-mtu", "9000"]


@pytest.mark.parametrize("tunnels, message", [
    ([{"name": "sw2", "remote": "192.0.2.2"}], "tunnels[0].vni: required"),
    ([{"name": "sw2", "remote": "192.0.2.2", "vni": 0}], "tunnels[0].vni: between 1 and "
                                                         "16777215; got 0"),
    ([{"name": "sw2", "remote": "a b", "vni": 5}], "tunnels[0].remote: an IPv4 address or a "
                                                   'host name; got "a b"'),
    ([{"name": "c1-nic0", "remote": "192.0.2.2", "vni": 5}], "tunnels[0].name: 'c1-nic0' is "
                                                             "used twice"),
])
def test_bad_tunnel_configs(tunnels: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(json.dumps({"kind": "vswitch", "links": [{"name": "c1-nic0"}],
                                 "tunnels": tunnels}), "cred")
    assert any(message in p for p in e.value.problems), e.value.problems
