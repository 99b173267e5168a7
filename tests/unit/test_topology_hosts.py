"""Placement in the topology: ``hosts:``, ``host:`` on nodes, tunnels between switches.

Every error is checked with its exact FILE:LINE:COL and field path, as in
test_topology.py; a file without ``hosts:`` means what it always meant.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from tests.unit.test_topology import LAB, at, load, only_problem, problems
from vvu_runtime.launch.topology import load_topology
from vvu_runtime.launch.topology.model import VXLAN_OVERHEAD

ROOT = Path(__file__).resolve().parents[2]

#: Two hosts, a switch and a consumer on each, the switches joined by a tunnel.
FLEET = """\
name: lab
hosts:
  h1: {address: 192.0.2.1}
  h2: {address: 192.0.2.2, user: vvu, key: keys/h2, mtu: 9000}
appliances:
  sw1: {kind: vswitch, host: h1, subnet: 10.10.1.0/24, tunnels: [{peer: sw2, vni: 100}]}
  sw2: {kind: vswitch, host: h2}
  st1: {kind: storage, host: h2, exports: [{name: disk-a, size: 256M}]}
consumers:
  c1: {host: h1, nics: [sw1]}
  c2: {host: h2, nics: [sw2], disks: [st1/disk-a]}
"""


def test_without_hosts_everything_is_local_as_before() -> None:
    topo = load_topology(ROOT / "examples" / "default.yaml")
    assert topo.hosts == ()
    assert {n.host for n in topo.nodes} == {None}
    assert all(a.tunnels == () for a in topo.appliances)
    assert all(not c.nic_mtus for c in topo.consumers)
    assert topo.to_json()["hosts"] == []


def test_hosts_and_placement_resolve() -> None:
    topo = load(FLEET)
    h1, h2 = topo.hosts
    assert (h1.name, h1.address, h1.user, h1.key, h1.mtu) == ("h1", "192.0.2.1", "root", None,
                                                             1500)
    assert (h2.user, h2.mtu) == ("vvu", 9000)
    assert h2.key == Path("keys/h2").absolute()
    assert [(n.name, n.host) for n in topo.nodes] == [
        ("sw1", "h1"), ("sw2", "h2"), ("st1", "h2"), ("c1", "h1"), ("c2", "h2")]
    assert [n.name for n in topo.nodes_on("h2")] == ["sw2", "st1", "c2"]
    json.dumps(topo.to_json())


def test_a_tunnel_is_listed_on_both_ends_and_makes_one_network() -> None:
    topo = load(FLEET)
    sw1, sw2 = topo.appliance("sw1"), topo.appliance("sw2")
    assert [(t.peer, t.vni) for t in sw1.tunnels] == [("sw2", 100)]
    assert [(t.peer, t.vni) for t in sw2.tunnels] == [("sw1", 100)]
    assert sw1.vni == sw2.vni == 100
    # One L2 network: sw2 takes sw1's subnet, addresses are numbered across both.
    assert sw2.subnet == IPv4Network("10.10.1.0/24")
    assert topo.consumer("c1").nics[0].address == IPv4Interface("10.10.1.10/24")
    assert topo.consumer("c2").nics[0].address == IPv4Interface("10.10.1.11/24")
    # NICs on a tunnelled network get the smallest underlay MTU minus VXLAN's 50 bytes.
    assert topo.consumer("c1").nic_mtus == {0: 1500 - VXLAN_OVERHEAD}
    assert topo.consumer("c2").nic_mtus == {0: 1450}


def test_a_ping_check_across_hosts_is_valid_on_one_network() -> None:
    topo = load(FLEET + "checks:\n  - ping: {from: c1, to: c2}\n")
    assert topo.checks[0].describe() == "ping c1 -> c2"


def test_slice_keeps_a_hosts_nodes_and_its_own_checks() -> None:
    topo = load(FLEET + "checks:\n  - ping: {from: c1, to: c2}\n"
                "  - disk: {node: c2, disk: st1/disk-a}\n")
    part = topo.slice("h2")
    assert part.sliced_for == "h2"
    assert [n.name for n in part.nodes] == ["sw2", "st1", "c2"]
    # The cross-host ping is the fleet's to run; the disk check is h2's own.
    assert [c.describe() for c in part.checks] == ["disk c2 st1/disk-a"]
    assert part.hosts == topo.hosts
    assert part.appliance("sw2").tunnels == topo.appliance("sw2").tunnels
    with pytest.raises(KeyError, match="no host 'h9' \\(hosts: h1, h2\\)"):
        topo.slice("h9")


def test_the_fleet_example_loads() -> None:
    topo = load_topology(ROOT / "examples" / "fleet.yaml")
    assert [h.name for h in topo.hosts] == ["h1", "h2"]
    assert topo.appliance("sw2").tunnels[0].peer == "sw1"


# ------------------------------------------------------------------ problems


def test_host_without_hosts_section() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {host: h1, nics: [sw1]}")
    assert only_problem(text) == (
        f'{at(text, "h1")}: consumers.c2.host: host "h1", but the topology has no hosts: (add '
        "hosts:, or leave host out to run the node here)")


def test_unknown_host_name() -> None:
    text = FLEET.replace("c2: {host: h2,", "c2: {host: h3,")
    assert only_problem(text) == (
        f'{at(text, "h3")}: consumers.c2.host: no host named "h3" (hosts: h1, '
        "h2)")


def test_every_node_names_its_host_when_there_are_hosts() -> None:
    text = FLEET.replace("sw2: {kind: vswitch, host: h2}", "sw2: {kind: vswitch}")
    found = problems(text)
    assert found[0] == (
        f"{at(text, 'sw2: {kind')}: appliances.sw2.host: missing: the topology has hosts:, "
        "so every node names the one it runs on (h1, h2)")


def test_a_nic_on_a_switch_of_another_host_is_refused() -> None:
    text = FLEET.replace("c2: {host: h2, nics: [sw2]", "c2: {host: h2, nics: [sw1]")
    assert only_problem(text) == (
        f"{at(text, 'h2, nics: [sw1]', 'sw1')}: consumers.c2.nics[0].switch: sw1 runs on "
        "host h1, c2 on host h2: a VVU link (NIC) is shared memory and cannot cross hosts "
        "(put both on one host; join switches of different hosts with tunnels:)")


def test_a_disk_from_a_storage_appliance_of_another_host_is_refused() -> None:
    text = FLEET.replace("c1: {host: h1, nics: [sw1]}",
                         "c1: {host: h1, nics: [sw1], disks: [{storage: st1, export: disk-a}]}"
                         ).replace(", disks: [st1/disk-a]", "")
    assert only_problem(text) == (
        f"{at(text, 'st1, export', 'st1')}: consumers.c1.disks[0].storage: st1 runs on host h2, "
        "c1 on host h1: a VVU link (disk) is shared memory and cannot cross hosts (put both on "
        "one host)")


def test_host_needs_an_address_or_an_inventory_entry() -> None:
    text = FLEET.replace("h1: {address: 192.0.2.1}", "h1: {user: root}")
    assert problems(text)[0] == (
        f"{at(text, 'h1: {user')}: hosts.h1: give the address (or an inventory host that has "
        "it)")


def test_host_fields_are_strict() -> None:
    text = FLEET.replace("h1: {address: 192.0.2.1}", "h1: {address: 192.0.2.1, port: 22}")
    assert only_problem(text) == (
        f"{at(text, 'port: 22')}: hosts.h1.port: unknown field (fields here: address, inventory, "
        "key, mtu, user)")
    text = FLEET.replace("mtu: 9000", "mtu: 100")
    assert only_problem(text) == (
        f"{at(text, 'mtu: 100', '100')}: hosts.h2.mtu: expected an integer 1280..9216, got 100")
    text = FLEET.replace("address: 192.0.2.1", "address: 'a b'")
    assert only_problem(text) == (
        f"{at(text, chr(39) + 'a b')}: hosts.h1.address: expected a host name or IP address, "
        "got \"a b\"")


def test_tunnels_need_hosts() -> None:
    text = LAB.replace("sw1: {kind: vswitch, subnet: 10.10.1.0/24}",
                       "sw1: {kind: vswitch, subnet: 10.10.1.0/24, tunnels: [{peer: sw1, "
                       "vni: 5}]}")
    assert only_problem(text) == (
        f"{at(text, 'sw1, vni', 'sw1')}: appliances.sw1.tunnels[0].peer: tunnels join "
        "switches on different hosts, and the topology has no hosts:")


def test_tunnel_to_an_unknown_switch_or_one_on_the_same_host() -> None:
    text = FLEET.replace("peer: sw2", "peer: sw3")
    assert only_problem(text) == (
        f'{at(text, "sw3")}: appliances.sw1.tunnels[0].peer: "sw3" is no appliance; expected '
        'the name of a vswitch appliance; did you mean "sw2"?')
    text = FLEET.replace("sw2: {kind: vswitch, host: h2}", "sw2: {kind: vswitch, host: h1}"
                         ).replace("c2: {host: h2, nics: [sw2]", "c2: {host: h1, nics: [sw2]"
                                   ).replace(", disks: [st1/disk-a]", "")
    assert only_problem(text) == (
        f"{at(text, 'sw2, vni', 'sw2')}: appliances.sw1.tunnels[0].peer: sw2 runs on the same "
        "host as sw1 (h1); tunnels join switches of different hosts (on one host, use one "
        "switch)")
    text = FLEET.replace("peer: sw2", "peer: st1")
    assert only_problem(text) == (
        f'{at(text, "st1, vni", "st1")}: appliances.sw1.tunnels[0].peer: "st1" is a storage '
        "appliance; expected a vswitch")


def test_tunnel_declared_on_both_ends_must_agree_on_the_vni() -> None:
    same = FLEET.replace("sw2: {kind: vswitch, host: h2}",
                         "sw2: {kind: vswitch, host: h2, tunnels: [{peer: sw1, vni: 100}]}")
    assert [t.peer for t in load(same).appliance("sw2").tunnels] == ["sw1"]
    text = same.replace("peer: sw1, vni: 100", "peer: sw1, vni: 200")
    assert only_problem(text) == (
        f"{at(text, '200')}: appliances.sw2.tunnels[0].vni: the tunnel sw2 - sw1 is already "
        f"declared with vni 100 ({at(text, 'sw2, vni', 'sw2')})")


THREE = """\
name: lab
hosts:
  h1: {address: 192.0.2.1}
  h2: {address: 192.0.2.2}
  h3: {address: 192.0.2.3, mtu: 1400}
appliances:
  sw1: {kind: vswitch, host: h1, tunnels: [{peer: sw2, vni: 7}, {peer: sw3, vni: 7}]}
  sw2: {kind: vswitch, host: h2, tunnels: [{peer: sw3, vni: 7}]}
  sw3: {kind: vswitch, host: h3}
consumers:
  c1: {host: h1, nics: [sw1]}
  c3: {host: h3, nics: [sw3]}
"""


def test_a_full_mesh_of_three_switches_is_one_network() -> None:
    topo = load(THREE)
    assert sorted(t.peer for t in topo.appliance("sw3").tunnels) == ["sw1", "sw2"]
    assert {a.subnet for a in topo.appliances} == {IPv4Network("10.77.0.0/24")}
    # The smallest MTU of the network's hosts decides.
    assert topo.consumer("c1").nic_mtus == {0: 1400 - VXLAN_OVERHEAD}


def test_a_network_must_be_a_full_mesh_for_split_horizon() -> None:
    text = THREE.replace("tunnels: [{peer: sw3, vni: 7}]}", "tunnels: []}")
    assert only_problem(text) == (
        f"{at(text, 'tunnels: [{peer: sw2', '[{')}: appliances.sw1.tunnels: sw2 and sw3 are one "
        "network (through other switches' tunnels) but have no tunnel between them: split "
        "horizon needs a tunnel between every two switches of a network")


def test_one_network_one_vni_and_one_subnet() -> None:
    text = THREE.replace("{peer: sw3, vni: 7}]}\n  sw3", "{peer: sw3, vni: 8}]}\n  sw3")
    assert only_problem(text) == (
        f"{at(text, 'tunnels: [{peer: sw2', '[{')}: appliances.sw1.tunnels: the network of "
        "sw1, sw2, sw3 has tunnels with vni 7, 8; one network, one vni")
    text = THREE.replace("sw3: {kind: vswitch, host: h3}",
                         "sw3: {kind: vswitch, host: h3, subnet: 10.1.0.0/24}"
                         ).replace("host: h2, tunnels", "host: h2, subnet: 10.2.0.0/24, tunnels")
    assert only_problem(text) == (
        f"{at(text, 'tunnels: [{peer: sw2', '[{')}: appliances.sw1.tunnels: switches joined by "
        "tunnels are one L2 network with one subnet; they have sw2: 10.2.0.0/24, "
        "sw3: 10.1.0.0/24")


def test_two_networks_need_two_vnis() -> None:
    text = FLEET.replace("  st1:", "  sw3: {kind: vswitch, host: h1, underlay_port: 4800, "
                         "tunnels: [{peer: sw4, "
                         "vni: 100}]}\n  sw4: {kind: vswitch, host: h2, underlay_port: 4790}\n"
                         "  st1:")
    assert only_problem(text) == (
        f"{at(text, 'tunnels: [{peer: sw4', '[{')}: appliances.sw3.tunnels: vni 100 is already "
        "the network of sw1")


def test_two_tunnel_switches_on_one_host_need_two_ports() -> None:
    text = FLEET.replace("  st1:", "  sw3: {kind: vswitch, host: h1, tunnels: [{peer: sw4, "
                         "vni: 101}]}\n  sw4: {kind: vswitch, host: h2, underlay_port: 4790}\n"
                         "  st1:")
    assert only_problem(text) == (
        f"{at(text, 'sw3: {')}: appliances.sw3.underlay_port: UDP port 4789 on host h1 is "
        "already sw1's tunnel port")
    ok = text.replace("sw3: {kind: vswitch, host: h1,", "sw3: {kind: vswitch, host: h1, "
                      "underlay_port: 4800,")
    assert load(ok).appliance("sw3").underlay_port == 4800


def test_tunnels_are_for_switches_only() -> None:
    text = FLEET.replace("st1: {kind: storage, host: h2,",
                         "st1: {kind: storage, host: h2, tunnels: [],")
    assert only_problem(text) == (
        f"{at(text, 'tunnels: [],', 'tunnels')}: appliances.st1.tunnels: only for kind vswitch "
        "(this one's kind is storage)")


def test_a_tunnel_host_needs_an_address() -> None:
    text = FLEET.replace("h2: {address: 192.0.2.2,", "h2: {inventory: node-2,")
    assert only_problem(text) == (
        f"{at(text, 'sw2, vni', 'sw2')}: appliances.sw1.tunnels[0].peer: host h2 of sw2 has no "
        "address (only inventory node-2): a tunnel needs the address to send to")
