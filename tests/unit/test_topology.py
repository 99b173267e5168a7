"""vvu_runtime.launch.topology: the topology file's schema, loader and resolved model.

Every kind of validation error is checked with its exact FILE:LINE:COL and
field path; the shipped examples load and validate against the exported JSON
Schema; loading is pure (creates nothing).
"""

from __future__ import annotations

import json
import os
import pickle
import textwrap
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from vvu_runtime.launch.topology import (
    Accel,
    ApplianceAccess,
    ApplianceKind,
    CheckKind,
    Disk,
    DiskProtocol,
    Location,
    Nic,
    Problem,
    Role,
    Topology,
    TopologyError,
    derived_mac,
    load_topology,
    load_topology_text,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SRC = Path("lab.yaml")
Q = '"'


def load(text: str, source: Path = SRC) -> Topology:
    return load_topology_text(textwrap.dedent(text), source)


def problems(text: str) -> list[str]:
    with pytest.raises(TopologyError) as e:
        load(text)
    return [str(p) for p in e.value.problems]


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, "\n".join(found)
    return found[0]


def at(text: str, needle: str, within: str | None = None) -> str:
    """``lab.yaml:LINE:COL`` of the one ``needle`` in ``text`` (of ``within`` inside it)."""
    text = textwrap.dedent(text)
    assert text.count(needle) == 1, f"{needle!r} is not unique"
    offset = text.index(needle) + (needle.index(within) if within else 0)
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"{SRC}:{line}:{col}"


#: A small valid lab the error tests change one thing in.
LAB = """\
name: lab
appliances:
  sw1: {kind: vswitch, subnet: 10.10.1.0/24}
  st1:
    kind: storage
    exports:
      - {name: disk-a, size: 256M}
      - {name: disk-b, size: 256M, readonly: true}
consumers:
  c1: {nics: [sw1], disks: [st1/disk-a]}
  c2: {nics: [sw1]}
"""


# ------------------------------------------------------------------ examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    topo = load_topology(path)
    assert topo.name == path.stem
    assert topo.source == path.absolute()
    json.dumps(topo.to_json())


def test_the_examples_issue_6_asks_for_are_shipped() -> None:
    assert {p.stem for p in EXAMPLES} >= {"default", "switch4", "storage", "poll"}


def test_default_example_is_the_readme_job() -> None:
    topo = load_topology(ROOT / "examples" / "default.yaml")
    assert {a.kind for a in topo.appliances} == {ApplianceKind.VSWITCH, ApplianceKind.STORAGE}
    assert len(topo.consumers) == 2
    assert all(len(c.nics) == 1 for c in topo.consumers)
    # Both disk protocols: c1's second disk is a SCSI LUN (vvu-scsi).
    assert [[d.protocol for d in c.disks] for c in topo.consumers] == [
        [DiskProtocol.BLK, DiskProtocol.SCSI], [DiskProtocol.BLK]]
    assert {c.kind for c in topo.checks} == set(CheckKind) - {CheckKind.FS}


def test_switch4_poll_and_storage_examples_are_what_they_say() -> None:
    switch4 = load_topology(ROOT / "examples" / "switch4.yaml")
    assert [a.kind for a in switch4.appliances] == [ApplianceKind.VSWITCH]
    assert len(switch4.consumers) == 4
    poll = load_topology(ROOT / "examples" / "poll.yaml")
    assert {a.access for a in poll.appliances} == {ApplianceAccess.POLL}
    storage = load_topology(ROOT / "examples" / "storage.yaml")
    (st,) = storage.appliances
    assert len(st.exports) >= 3 and any(e.readonly for e in st.exports)
    assert any(len(c.disks) > 1 for c in storage.consumers)


# ------------------------------------------------------------------ the model


def test_resolved_lab() -> None:
    topo = load(LAB)
    sw1, st1 = topo.appliances
    assert (sw1.kind, sw1.subnet, sw1.exports) == (ApplianceKind.VSWITCH,
                                                   IPv4Network("10.10.1.0/24"), ())
    assert (sw1.cpus, sw1.memory_mib, sw1.access, sw1.image) == (1, 1024, ApplianceAccess.VIOMMU,
                                                                 None)
    assert dict(sw1.options) == {"busy_poll_us": 0, "engine": "vvu-switch"}
    assert dict(st1.options) == {"direct": True, "queues": 1, "busy_poll_us": 0}
    assert st1.subnet is None
    assert [(e.name, e.size, e.readonly) for e in st1.exports] == [
        ("disk-a", 256 << 20, False), ("disk-b", 256 << 20, True)]
    c1, c2 = topo.consumers
    assert (c1.cpus, c1.memory_mib, c1.image.name, c1.image.is_named) == (1, 512, "consumer",
                                                                          True)
    assert c1.nics[0].link == "c1-nic0" and c1.disks[0].link == "c1-disk0"
    assert c1.disks[0].ref == "st1/disk-a"
    assert [n.address for n in (*c1.nics, *c2.nics)] == [
        IPv4Interface("10.10.1.10/24"), IPv4Interface("10.10.1.11/24")]
    assert topo.options.accel is Accel.AUTO and topo.options.lab_dir is None
    assert topo.options.boot_timeout == 300.0
    assert sw1.role is Role.APPLIANCE and c1.role is Role.CONSUMER
    assert c1.where == Location(SRC, 10, 3) and sw1.where == Location(SRC, 3, 3)


def test_lookups_and_links_of() -> None:
    topo = load(LAB)
    assert topo.node("c2") is topo.consumer("c2")
    assert topo.node("st1") is topo.appliance("st1")
    for lookup in (topo.node, topo.appliance, topo.consumer):
        with pytest.raises(KeyError):
            lookup("nope")
    with pytest.raises(KeyError):
        topo.appliance("c1")
    links = topo.links_of("sw1")
    assert [(c.name, link.link) for c, link in links] == [("c1", "c1-nic0"), ("c2", "c2-nic0")]
    assert all(isinstance(link, Nic) for _, link in links)
    (only,) = topo.links_of("st1")
    assert isinstance(only[1], Disk) and only[1].export == "disk-a"
    assert topo.appliance("st1").export("disk-b").readonly
    with pytest.raises(KeyError):
        topo.links_of("c1")


def test_to_json_is_plain_data() -> None:
    topo = load(LAB)
    data = json.loads(json.dumps(topo.to_json()))
    assert data["name"] == "lab"
    assert [a["name"] for a in data["appliances"]] == ["sw1", "st1"]
    assert data["consumers"][0]["nics"][0]["link"] == "c1-nic0"
    assert data["consumers"][0]["nics"][0]["address"] == "10.10.1.10/24"
    assert data["consumers"][0]["disks"][0] == {"link": "c1-disk0", "index": 0,
                                                "storage": "st1", "export": "disk-a",
                                                "protocol": "blk"}
    assert {n["role"] for n in data["appliances"] + data["consumers"]} == {"appliance",
                                                                         "consumer"}


def test_checks_resolve_with_defaults_and_describe_themselves() -> None:
    topo = load(LAB + """\
checks:
  - ping: {from: c1, to: c2}
  - transfer: {from: c2, to: c1}
  - transfer: {from: c2, to: c1, size: 64}
  - disk: {node: c1, disk: st1/disk-a}
  - command: {node: st1, run: "systemctl is-active vvu-blk", output: "^active"}
""")
    assert [c.kind for c in topo.checks] == [CheckKind.PING, CheckKind.TRANSFER,
                                             CheckKind.TRANSFER, CheckKind.DISK,
                                             CheckKind.COMMAND]
    ping, t8, t64, _, cmd = topo.checks
    assert dict(ping.params) == {"from": "c1", "to": "c2", "count": 3}
    assert t8.params["size"] == 8 << 20 and t64.params["size"] == 64 << 20
    assert dict(cmd.params) == {"node": "st1", "run": "systemctl is-active vvu-blk",
                                "status": 0, "output": "^active"}
    assert [c.describe() for c in topo.checks] == [
        "ping c1 -> c2", "transfer 8 MiB c2 -> c1", "transfer 64 MiB c2 -> c1",
        "disk c1 st1/disk-a", "command st1: systemctl is-active vvu-blk"]
    assert ping.where == Location(SRC, 13, 5)


def test_inheritance_precedence() -> None:
    topo = load("""\
        name: lab
        defaults:
          appliance: {cpus: 2, memory: 2G, access: poll}
          vswitch: {cpus: 3, options: {busy_poll_us: 20}}
          storage: {memory: 512M, options: {queues: 4}}
          consumer: {cpus: 2, memory: 1G}
        appliances:
          sw1: {kind: vswitch}
          sw2: {kind: vswitch, cpus: 4, access: viommu, options: {busy_poll_us: 0}}
          st1: {kind: storage, options: {direct: false}}
        consumers:
          c1: {nics: [sw1]}
          c2: {nics: [sw2], cpus: 1, memory: 256M}
        """)
    sw1, sw2, st1 = topo.appliances
    # node > defaults.<kind> > defaults.appliance > schema default
    assert (sw1.cpus, sw1.memory_mib, sw1.access) == (3, 2048, ApplianceAccess.POLL)
    assert (sw2.cpus, sw2.memory_mib, sw2.access) == (4, 2048, ApplianceAccess.VIOMMU)
    assert (st1.cpus, st1.memory_mib, st1.access) == (2, 512, ApplianceAccess.POLL)
    # backend options merge field by field
    assert dict(sw1.options) == {"busy_poll_us": 20, "engine": "vvu-switch"}
    assert dict(sw2.options) == {"busy_poll_us": 0, "engine": "vvu-switch"}
    assert dict(st1.options) == {"direct": False, "queues": 4, "busy_poll_us": 0}
    c1, c2 = topo.consumers
    assert (c1.cpus, c1.memory_mib) == (2, 1024)
    assert (c2.cpus, c2.memory_mib) == (1, 256)


def test_schema_defaults_without_any_defaults_section() -> None:
    topo = load("name: lab\nappliances: {st: {kind: storage}}\nconsumers: {c: {}}\n")
    (st,), (c,) = topo.appliances, topo.consumers
    assert (st.cpus, st.memory_mib, st.access, st.exports) == (1, 1024, ApplianceAccess.VIOMMU,
                                                               ())
    assert (c.cpus, c.memory_mib, c.nics, c.disks) == (1, 512, (), ())


def test_sizes_bare_integers_are_mib_and_suffixes_are_binary() -> None:
    topo = load("""\
        name: lab
        appliances:
          st:
            kind: storage
            memory: 300
            exports:
              - {name: a, size: 1}
              - {name: b, size: 1536K}
              - {name: c, size: 2GiB}
              - {name: d, size: 1T}
        consumers:
          c: {memory: 2G}
        """)
    (st,) = topo.appliances
    assert st.memory_mib == 300
    assert [e.size for e in st.exports] == [1 << 20, 1536 << 10, 2 << 30, 1 << 40]
    assert topo.consumers[0].memory_mib == 2048


def test_default_subnets_follow_the_switch_index() -> None:
    topo = load("""\
        name: lab
        appliances:
          a: {kind: vswitch}
          st: {kind: storage}
          b: {kind: vswitch, subnet: 192.168.7.0/24}
          c: {kind: vswitch}
        consumers:
          x: {nics: [a, b, c]}
          y: {nics: [c, {switch: b, address: 192.168.7.99}]}
        """)
    assert [str(a.subnet) for a in topo.appliances] == [
        "10.77.0.0/24", "None", "192.168.7.0/24", "10.77.2.0/24"]
    x, y = topo.consumers
    assert [str(n.address) for n in x.nics] == ["10.77.0.10/24", "192.168.7.10/24",
                                                "10.77.2.10/24"]
    # a bare address takes the subnet's prefix length
    assert [str(n.address) for n in y.nics] == ["10.77.2.11/24", "192.168.7.99/24"]


def test_derived_macs_are_stable_unique_locally_administered_unicast() -> None:
    text = "name: lab\nappliances: {sw: {kind: vswitch}}\nconsumers:\n" + "".join(
        f"  c{i}: {{nics: [sw, sw]}}\n" for i in range(16))
    first, again = load(text), load(text)
    macs = [n.mac for c in first.consumers for n in c.nics]
    assert macs == [n.mac for c in again.consumers for n in c.nics]
    assert len(set(macs)) == len(macs)
    for mac in macs:
        octet = int(mac[:2], 16)
        assert octet & 0x02 and not octet & 0x01, mac
    other = load(text.replace("name: lab", "name: other"))
    assert macs[0] != other.consumers[0].nics[0].mac
    assert macs[0] == derived_mac("lab", "c0", 0)


def test_derived_mac_avoids_an_explicit_one() -> None:
    taken = derived_mac("lab", "a", 0)
    topo = load(f"""\
        name: lab
        appliances: {{sw: {{kind: vswitch}}}}
        consumers:
          a: {{nics: [sw]}}
          b: {{nics: [{{switch: sw, mac: "{taken.upper()}"}}]}}
        """)
    a, b = topo.consumers
    assert b.nics[0].mac == taken  # normalised to lower case
    assert a.nics[0].mac != taken and a.nics[0].mac == derived_mac("lab", "a", 0, salt=1)


def test_shorthands_equal_the_long_forms() -> None:
    short = load(LAB)
    long = load(LAB.replace("c1: {nics: [sw1], disks: [st1/disk-a]}",
                            "c1: {nics: [{switch: sw1}], disks: [{storage: st1, "
                            "export: disk-a}]}"))
    assert short.consumers[0].nics[0].mac == long.consumers[0].nics[0].mac
    assert [c.to_json() for c in short.consumers] == [c.to_json() for c in long.consumers]


def test_kernel_image_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    source = tmp_path / "labs" / "t.yaml"
    topo = load("""\
        name: lab
        options: {lab_dir: state, accel: tcg, boot_timeout: 30}
        defaults:
          consumer: {image: {kernel: ../k/vmlinuz, initrd: /abs/initrd.img, append: quiet}}
        appliances: {sw: {kind: vswitch, image: sw.raw}}
        consumers:
          a: {nics: [sw]}
          b: {nics: [sw], image: consumer}
        """, source)
    a, b = topo.consumers
    assert a.image.kernel == tmp_path / "labs" / "../k/vmlinuz"
    assert a.image.initrd == Path("/abs/initrd.img") and a.image.append == "quiet"
    assert not a.image.is_named and b.image.is_named
    assert topo.appliances[0].image == tmp_path / "labs" / "sw.raw"
    assert topo.options.lab_dir == tmp_path / "labs" / "state"
    assert topo.options.accel is Accel.TCG and topo.options.boot_timeout == 30.0


def test_loading_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(LAB)
    before = sorted(os.listdir(tmp_path))
    load_topology(path)
    with pytest.raises(TopologyError):
        load_topology_text(LAB + "bogus: 1\n", path)
    assert sorted(os.listdir(tmp_path)) == before


# ------------------------------------------------------------------ problems: format


def test_problem_and_error_format() -> None:
    p = Problem(Location(Path("t.yaml"), 3, 5), "consumers.c1.cpus", "expected X")
    assert str(p) == "t.yaml:3:5: consumers.c1.cpus: expected X"
    assert str(Problem(Location(Path("t.yaml"), 1, 1), "", "YAML: bad")) == "t.yaml:1:1: YAML: bad"
    q = Problem(Location(Path("t.yaml"), 1, 2), "name", "expected Y")
    e = TopologyError([p, q])
    assert e.problems == [q, p]  # file order
    assert str(e) == f"{q}\n{p}"
    again = pickle.loads(pickle.dumps(e))
    assert again.problems == e.problems and str(again) == str(e)


def test_the_at_helper_counts_from_one() -> None:
    assert at("ab\ncd x\n", "x") == "lab.yaml:2:4"
    assert at("ab\ncd xy\n", "xy", "y") == "lab.yaml:2:5"


def test_all_problems_are_reported_at_once_in_file_order() -> None:
    text = (LAB.replace("name: lab", "name: Lab")
            .replace("c2: {nics: [sw1]}", "c2: {nics: [sw9], cpus: 0}") + "extra: 1\n")
    assert problems(text) == [
        f"{at(text, 'Lab')}: name: expected a name: lower-case letters, digits and '-', "
        'starting with a letter, at most 31 characters (it becomes a host name), got "Lab"',
        f'{at(text, "sw9")}: consumers.c2.nics[0].switch: "sw9" is no appliance; expected the '
        'name of a vswitch appliance; did you mean "sw1"?',
        f"{at(text, 'cpus: 0', '0')}: consumers.c2.cpus: expected an integer 1..16, got 0",
        f"{at(text, 'extra')}: extra: unknown field (fields here: appliances, checks, consumers, "
        "defaults, hosts, name, options)",
    ]


# ------------------------------------------------------------------ problems: the file


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(TopologyError) as e:
        load_topology(path)
    assert str(e.value) == f"{path}:1:1: cannot read the topology file: No such file or directory"


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(TopologyError) as e:
        load_topology(path)
    assert str(e.value).startswith(f"{path}:1:1: cannot read the topology file: 'utf-8' codec")


def test_yaml_syntax_error_has_its_position() -> None:
    assert only_problem("name: lab\nappliances: {sw: [a\n") == (
        "lab.yaml:3:1: YAML: while parsing a flow sequence, expected ',' or ']', but got "
        "'<stream end>'")
    assert only_problem("name: lab\n\tappliances: {}\n") == (
        "lab.yaml:2:1: YAML: while scanning for the next token, found character '\\t' that "
        "cannot start any token")


def test_duplicate_keys_are_reported_with_the_other_problems() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: [sw1], cpus: 1, cpus: 2}\n  c1: {}"
                       ).replace("name: lab", "name: lab\nname: lab2")
    assert problems(text) == [
        "lab.yaml:2:1: name: duplicate key (the first is at lab.yaml:1:1)",
        f"{at(text, 'cpus: 2')}: consumers.c2.cpus: duplicate key (the first is at "
        f"{at(text, 'cpus: 1')})",
        f"{at(text, 'c1: {}')}: consumers.c1: duplicate key (the first is at "
        f"{at(text, 'c1: {nics')})",
    ]


def test_more_than_one_document() -> None:
    assert only_problem("name: lab\n---\nname: b\n") == (
        "lab.yaml:2:1: YAML: expected a single document in the stream, but found another "
        "document")


@pytest.mark.parametrize("text, got", [("", "an empty file"), ("- a\n", "a list"),
                                       ("just text\n", '"just text"')])
def test_top_level_must_be_a_mapping(text: str, got: str) -> None:
    assert only_problem(text) == (
        f"lab.yaml:1:1: expected a mapping (name:, appliances:, consumers:, ...), got {got}")


def test_empty_lab() -> None:
    assert only_problem("name: lab\n") == (
        "lab.yaml:1:7: name: the lab has no appliances and no consumers")


# ------------------------------------------------------------------ problems: one field


def test_unknown_field_with_did_you_mean() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: [sw1], memroy: 1G}")
    assert only_problem(text) == (
        f'{at(text, "memroy")}: consumers.c2.memroy: unknown field; did you mean "memory"? '
        "(fields here: cpus, disks, fs, host, image, memory, nics)")


def test_unknown_top_level_field() -> None:
    text = LAB + "consumer: {}\n"
    assert only_problem(text) == (
        f'{at(text, "consumer: {}")}: consumer: unknown field; did you mean "consumers"? '
        "(fields here: appliances, checks, consumers, defaults, hosts, name, options)")


def test_unknown_backend_option() -> None:
    text = LAB.replace("subnet: 10.10.1.0/24}", "subnet: 10.10.1.0/24, options: {queues: 2}}")
    assert only_problem(text) == (
        f"{at(text, 'queues')}: appliances.sw1.options.queues: unknown field "
        "(fields here: busy_poll_us, engine)")


def test_unknown_defaults_section_and_field() -> None:
    text = LAB + "defaults:\n  vswich: {cpus: 2}\n  consumer: {access: poll}\n"
    assert problems(text) == [
        f'{at(text, "vswich")}: defaults.vswich: unknown field; did you mean "vswitch"? '
        "(fields here: appliance, consumer, fs, storage, vswitch)",
        f'{at(text, "access: poll")}: defaults.consumer.access: unknown field '
        "(fields here: cpus, image, memory)",
    ]


def test_defaults_cannot_set_what_is_per_node() -> None:
    text = LAB + "defaults:\n  vswitch: {subnet: 10.9.0.0/16}\n  appliance: {options: {}}\n"
    assert problems(text) == [
        f"{at(text, 'subnet: 10.9')}: defaults.vswitch.subnet: unknown field "
        "(fields here: access, cpus, doorbell_bypass, image, memory, options)",
        f"{at(text, 'options: {}')}: defaults.appliance.options: unknown field "
        "(fields here: access, cpus, doorbell_bypass, image, memory)",
    ]


def test_field_of_another_kind() -> None:
    text = LAB.replace("kind: storage", "kind: storage\n    subnet: 10.0.0.0/24")
    assert only_problem(text) == (
        f"{at(text, 'subnet: 10.0')}: appliances.st1.subnet: only for kind vswitch "
        "(this one's kind is storage)")
    text = LAB.replace("subnet: 10.10.1.0/24}", "exports: []}")
    assert only_problem(text) == (
        f"{at(text, 'exports: []')}: appliances.sw1.exports: only for kind fs or storage "
        "(this one's kind is vswitch)")


def test_missing_required_field_points_at_the_object() -> None:
    text = LAB.replace("st1:\n    kind: storage\n", "st1:\n")
    assert only_problem(text) == (
        f"{at(text, 'st1:')}: appliances.st1.kind: missing (expected one of vswitch, storage, fs)")
    text = LAB.replace("{name: disk-b, size: 256M, readonly: true}", "{name: disk-b}")
    assert only_problem(text) == (
        f"{at(text, '{name: disk-b}')}: appliances.st1.exports[1].size: missing (expected a "
        'size 1M..1T (an integer of MiB, or a string like "512M", "2G"))')
    assert only_problem("appliances: {sw: {kind: vswitch}}\n") == (
        "lab.yaml:1:1: name: missing (expected a name: lower-case letters, digits and '-', "
        "starting with a letter, at most 31 characters (it becomes a host name))")


def test_unknown_kind_reports_only_the_kind() -> None:
    text = LAB.replace("kind: storage", "kind: cdrom")
    assert only_problem(text) == (
        f'{at(text, "cdrom")}: appliances.st1.kind: expected one of vswitch, storage, fs, '
        'got "cdrom"')


def test_enum_value_with_did_you_mean() -> None:
    text = LAB + "options: {accel: kvn}\n"
    assert only_problem(text) == (
        f'{at(text, "kvn")}: options.accel: expected one of auto, kvm, tcg, got "kvn"; '
        'did you mean "kvm"?')


@pytest.mark.parametrize("name", ["Lab", "1lab", "lab-", "a" * 32, "la_b", "lab.x"])
def test_bad_lab_name(name: str) -> None:
    assert only_problem(LAB.replace("name: lab", f"name: {name}")) == (
        "lab.yaml:1:7: name: expected a name: lower-case letters, digits and '-', starting "
        f'with a letter, at most 31 characters (it becomes a host name), got "{name}"')


def test_bad_node_name_points_at_the_key() -> None:
    for key in ("C2", "7", "c_2"):
        text = LAB.replace("c2: {nics: [sw1]}", f"{key}: {{nics: [sw1]}}")
        shown = key if key == "7" else f'"{key}"'
        assert only_problem(text) == (
            f"{at(text, key + ':')}: consumers.{key}: expected a name: lower-case letters, "
            "digits and '-', starting with a letter, at most 31 characters (it becomes a host "
            f"name), got {shown}")


def test_names_are_shared_by_appliances_and_consumers() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "st1: {nics: [sw1]}")
    assert only_problem(text) == (
        f'{at(text, "st1: {")}: consumers.st1: the name "st1" is already an appliance\'s '
        f"({at(text, 'st1:' + chr(10))}); appliances and consumers share one namespace")


@pytest.mark.parametrize("value", ['"2"', "0", "17", "true", "1.5", "null"])
def test_cpus_type_and_range(value: str) -> None:
    text = LAB.replace("c2: {nics: [sw1]}", f"c2: {{nics: [sw1], cpus: {value}}}")
    shown = {"null": "null", "true": "true"}.get(value, value)
    assert only_problem(text) == (
        f"{at(text, 'cpus: ' + value, value)}: consumers.c2.cpus: expected an integer 1..16, "
        f"got {shown}")


@pytest.mark.parametrize("memory", ["768M", "64M", "32G", "100", "1536K", "1X", "-1", "1g"])
def test_consumer_memory_is_a_power_of_two_in_range(memory: str) -> None:
    text = LAB.replace("c2: {nics: [sw1]}", f"c2: {{nics: [sw1], memory: {memory}}}")
    shown = memory if memory.lstrip("-").isdigit() else f'"{memory}"'
    assert only_problem(text) == (
        f"{at(text, 'memory: ' + memory, memory)}: consumers.c2.memory: expected a power of "
        f'two size 128M..16G (an integer of MiB, or a string like "512M", "2G"), got {shown}')


def test_appliance_memory_range_and_whole_mib() -> None:
    text = LAB.replace("kind: storage", "kind: storage\n    memory: 128M")
    assert only_problem(text) == (
        f"{at(text, '128M')}: appliances.st1.memory: expected a size 256M..16G (an integer of "
        'MiB, or a string like "512M", "2G"), got "128M"')
    text = LAB.replace("kind: storage", "kind: storage\n    memory: 262148K")
    assert only_problem(text) == (
        f'{at(text, "262148K")}: appliances.st1.memory: expected a whole number of 1M, got '
        '"262148K"')


@pytest.mark.parametrize("size", ["0", "512K", "2T", "1.5G", "abc"])
def test_export_size_range(size: str) -> None:
    text = LAB.replace("{name: disk-a, size: 256M}", f"{{name: disk-a, size: {size}}}")
    assert only_problem(text).startswith(
        f"{at(text, 'size: ' + size, size)}: appliances.st1.exports[0].size: expected a size "
        "1M..1T (an integer of MiB, or a string like \"512M\", \"2G\"), got ")


def test_lab_dir_cannot_hold_a_colon() -> None:
    text = LAB + 'options: {lab_dir: "/tmp/a:b"}\n'
    assert only_problem(text) == (
        f"{at(text, Q + '/tmp')}: options.lab_dir: expected a directory without ':' (relative to "
        "the topology file), got \"/tmp/a:b\" (contains ':')")


def test_boot_timeout_range() -> None:
    text = LAB + "options: {boot_timeout: 0}\n"
    assert only_problem(text) == (
        f"{at(text, '0}')}: options.boot_timeout: expected a number 1..3600 seconds, got 0")


def test_wrong_container_types() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: sw1}")
    assert only_problem(text) == (
        f'{at(text, "sw1}")}: consumers.c2.nics: expected a list of at most 8 NICs, got "sw1"')
    text = LAB.replace("c2: {nics: [sw1]}", "c2: [sw1]")
    assert only_problem(text) == (
        f"{at(text, 'c2: [sw1]', '[sw1]')}: consumers.c2: expected a mapping (consumer), "
        "got a list")
    text = LAB + "checks: {ping: {}}\n"
    assert only_problem(text) == (
        f"{at(text, '{ping')}: checks: expected a list of at most 128 checks, got a mapping")


# ------------------------------------------------------------------ problems: NICs


def test_nic_to_an_unknown_switch() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: [sw2]}")
    assert only_problem(text) == (
        f'{at(text, "sw2")}: consumers.c2.nics[0].switch: "sw2" is no appliance; expected the '
        'name of a vswitch appliance; did you mean "sw1"?')


def test_nic_to_a_storage_appliance_or_a_consumer() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: [{switch: st1}]}")
    assert only_problem(text) == (
        f'{at(text, "st1}")}: consumers.c2.nics[0].switch: "st1" is a storage appliance; '
        "expected a vswitch")
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: [c1]}")
    assert only_problem(text) == (
        f'{at(text, "c1]")}: consumers.c2.nics[0].switch: "c1" is a consumer; expected the '
        "name of a vswitch appliance (sw1)")


def test_too_many_nics() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {nics: [" + ", ".join(["sw1"] * 9) + "]}")
    assert only_problem(text) == (
        f"{at(text, 'sw1]}')}: consumers.c2.nics[8]: at most 8 NICs, got 9")


def test_too_many_links_on_one_appliance() -> None:
    text = "name: lab\nappliances:\n  sw: {kind: vswitch, subnet: 10.0.0.0/16}\nconsumers:\n"
    text += "".join(f"  c{i}: {{nics: [sw, sw, sw, sw, sw, sw, sw, sw]}}\n" for i in range(5))
    assert only_problem(text) == (
        f"{at(text, 'sw: {')}: appliances.sw: 40 links to this appliance, at most 32 (one VVU "
        "function on its own root port each)")


@pytest.mark.parametrize("mac, got", [
    ("52:54:00:12:34", '"52:54:00:12:34"'),
    ("52-54-00-12-34-56", '"52-54-00-12-34-56"'),
    ("03:00:00:00:00:01", 'a multicast address "03:00:00:00:00:01"'),
])
def test_bad_mac(mac: str, got: str) -> None:
    text = LAB.replace("c2: {nics: [sw1]}", f'c2: {{nics: [{{switch: sw1, mac: "{mac}"}}]}}')
    assert only_problem(text) == (
        f"{at(text, mac, mac)}: consumers.c2.nics[0].mac: expected a unicast MAC address like "
        f'"52:54:00:12:34:56", got {got}'.replace(at(text, mac, mac), at(text, '"' + mac)))


def test_duplicate_mac() -> None:
    text = LAB.replace("c1: {nics: [sw1]", 'c1: {nics: [{switch: sw1, mac: "52:54:00:00:00:01"}]'
                       ).replace("c2: {nics: [sw1]}", "c2: {nics: [{switch: sw1, mac: "
                                 '"52:54:00:00:00:01"}]}')
    first = at(text, 'c1: {nics: [{switch: sw1, mac: "52', '"52')
    second = at(text, 'c2: {nics: [{switch: sw1, mac: "52', '"52')
    assert only_problem(text) == (
        f"{second}: consumers.c2.nics[0].mac: MAC 52:54:00:00:00:01 is already used ({first})")


@pytest.mark.parametrize("address, message", [
    ("10.10.2.5/24", "10.10.2.5/24 is not an address in sw1's subnet 10.10.1.0/24"),
    ("10.10.1.5/16", "10.10.1.5/16 is not an address in sw1's subnet 10.10.1.0/24"),
    ("10.10.1.0", "10.10.1.0 is the network address of sw1's subnet 10.10.1.0/24; "
                  "expected a host address"),
    ("10.10.1.255/24", "10.10.1.255 is the broadcast address of sw1's subnet 10.10.1.0/24; "
                       "expected a host address"),
    ("10.10.1.10", "address 10.10.1.10 is already used ({c1})"),
    ("10.10.1", 'expected an IPv4 address like "10.10.1.11/24", got "10.10.1" '
                "(Expected 4 octets in '10.10.1')"),
])
def test_bad_address(address: str, message: str) -> None:
    text = LAB.replace("c2: {nics: [sw1]}", f"c2: {{nics: [{{switch: sw1, address: {address}}}]}}")
    c1 = at(text, "c1: {nics: [sw1]", "sw1")
    assert only_problem(text) == (
        f"{at(text, 'address: ' + address, address)}: consumers.c2.nics[0].address: "
        f"{message.format(c1=c1)}")


def test_default_address_taken_by_an_explicit_one() -> None:
    text = LAB.replace("c1: {nics: [sw1]", "c1: {nics: [{switch: sw1, address: 10.10.1.11}]")
    assert only_problem(text) == (
        f"{at(text, 'c2: {nics: [sw1', 'sw1')}: consumers.c2.nics[0].address: address "
        f"10.10.1.11 (the default: host 1 + 10) is already used ({at(text, '10.10.1.11')})")


def test_small_subnet_runs_out_of_default_addresses() -> None:
    text = LAB.replace("10.10.1.0/24", "10.10.1.0/28").replace(
        "c2: {nics: [sw1]}", "c2: {nics: [sw1, sw1, sw1, sw1, sw9x]}").replace("sw9x", "sw1")
    # c1 takes host 0 (.10); c2's NICs hosts 1..5: .11 .. .15 (the broadcast address)
    assert only_problem(text) == (
        f"{at(text, 'sw1]}')}: consumers.c2.nics[4].address: sw1's subnet 10.10.1.0/28 has no "
        "default address left (host 5 + 10 is past its end): set the address")


# ------------------------------------------------------------------ problems: subnets


def test_overlapping_subnets() -> None:
    text = LAB.replace("  st1:\n", "  sw2: {kind: vswitch, subnet: 10.10.0.0/16}\n  st1:\n")
    assert only_problem(text) == (
        f"{at(text, '10.10.0.0/16')}: appliances.sw2.subnet: 10.10.0.0/16 overlaps sw1's subnet "
        f"10.10.1.0/24 ({at(text, '10.10.1.0/24')}); each switch needs its own")


def test_default_subnet_overlapping_an_explicit_one() -> None:
    text = LAB.replace("sw1: {kind: vswitch, subnet: 10.10.1.0/24}",
                       "sw1: {kind: vswitch, subnet: 10.77.1.0/24}\n  sw2: {kind: vswitch}")
    assert only_problem(text) == (
        f"{at(text, 'sw2:')}: appliances.sw2.subnet: 10.77.1.0/24 (the default) overlaps sw1's "
        f"subnet 10.77.1.0/24 ({at(text, '10.77.1.0/24')}); each switch needs its own")


@pytest.mark.parametrize("subnet, detail", [
    ("10.10.1.1/24", " (10.10.1.1/24 has host bits set)"),
    ("10.10.1.0", ""),
    ("10.10.1.0/30", ""),
])
def test_bad_subnet(subnet: str, detail: str) -> None:
    text = LAB.replace("10.10.1.0/24", subnet).replace(
        "c1: {nics: [sw1], ", "c1: {").replace("c2: {nics: [sw1]}", "c2: {}")
    assert only_problem(text) == (
        f'{at(text, subnet)}: appliances.sw1.subnet: expected an IPv4 subnet like '
        f'"10.10.1.0/24" (prefix length 8..29), got "{subnet}"{detail}')


# ------------------------------------------------------------------ problems: disks and exports


def test_disk_shorthand_needs_storage_and_export() -> None:
    text = LAB.replace("disks: [st1/disk-a]", "disks: [st1]")
    assert only_problem(text) == (
        f'{at(text, "st1]")}: consumers.c1.disks[0]: expected "STORAGE/EXPORT", got "st1"')


def test_disk_of_an_unknown_storage_or_a_switch() -> None:
    text = LAB.replace("disks: [st1/disk-a]", "disks: [st2/disk-a]")
    assert only_problem(text) == (
        f'{at(text, "st2")}: consumers.c1.disks[0].storage: "st2" is no appliance; expected '
        'the name of a storage appliance; did you mean "st1"?')
    text = LAB.replace("disks: [st1/disk-a]", "disks: [{storage: sw1, export: disk-a}]")
    assert only_problem(text) == (
        f'{at(text, "sw1, export")}: consumers.c1.disks[0].storage: "sw1" is a vswitch '
        "appliance; expected a storage")


def test_disk_of_an_unknown_export() -> None:
    text = LAB.replace("disks: [st1/disk-a]", "disks: [{storage: st1, export: disk_a}]")
    assert only_problem(text) == (
        f'{at(text, "disk_a")}: consumers.c1.disks[0].export: st1 has no export "disk_a"; did '
        'you mean "disk-a"? (its exports: disk-a, disk-b)')


def test_export_used_twice() -> None:
    text = LAB.replace("c2: {nics: [sw1]}", "c2: {disks: [{storage: st1, export: disk-a}]}")
    assert only_problem(text) == (
        f"{at(text, 'disk-a}]')}: consumers.c2.disks[0].export: export st1/disk-a is already "
        f"the disk of consumers.c1.disks[0] ({at(text, 'st1/disk-a')}); each export serves one "
        "disk")


def test_export_defined_twice() -> None:
    text = LAB.replace("name: disk-b", "name: disk-x").replace(
        "c1: {nics: [sw1], disks: [st1/disk-a]}", "c1: {nics: [sw1]}").replace("disk-x",
                                                                               "disk-a ")
    assert only_problem(text) == (
        f'{at(text, "disk-a ")}: appliances.st1.exports[1].name: export "disk-a" is already '
        f"defined ({at(text, '{name: disk-a,')})")


@pytest.mark.parametrize("export", ["-a", "a/b", "a:b", "a" * 64])
def test_bad_export_name(export: str) -> None:
    text = LAB.replace("name: disk-b", f'name: "{export}"')
    assert only_problem(text) == (
        f'{at(text, Q + export)}: appliances.st1.exports[1].name: expected an export '
        f"name: letters, digits, '_', '.', '-', at most 63 characters, got \"{export}\"")


def test_too_many_disks() -> None:
    exports = "".join(f"      - {{name: e{i}, size: 1}}\n" for i in range(9))
    text = LAB.replace("      - {name: disk-a, size: 256M}\n", exports).replace(
        "disks: [st1/disk-a]", "disks: [" + ", ".join(f"st1/e{i}" for i in range(9)) + "]")
    assert only_problem(text) == (
        f"{at(text, 'st1/e8')}: consumers.c1.disks[8]: at most 8 disks, got 9")


# ------------------------------------------------------------------ problems: checks


def check_problem(check: str) -> tuple[str, str]:
    """(the problem, the text) of LAB with one check."""
    text = LAB + "checks:\n  - " + check + "\n"
    return only_problem(text), text


def test_unknown_check_kind() -> None:
    found, text = check_problem("pong: {from: c1, to: c2}")
    assert found == (
        f'{at(text, "pong")}: checks[0].pong: unknown check; did you mean "ping"? (expected '
        "one of ping, transfer, disk, fs, command)")


def test_check_with_two_kinds() -> None:
    found, text = check_problem("{ping: {from: c1, to: c2}, disk: {node: c1}}")
    assert found == (
        f"{at(text, '{ping')}: checks[0]: expected a mapping with one key, the check (ping, "
        "transfer, disk, fs, command), got a mapping with 2 keys")


def test_check_fields_are_strict_and_required() -> None:
    found, text = check_problem("ping: {from: c1, to: c2, cuont: 2}")
    assert found == (
        f'{at(text, "cuont")}: checks[0].ping.cuont: unknown field; did you mean "count"? '
        "(fields here: count, from, to)")
    found, text = check_problem("ping: {from: c1}")
    assert found == (
        f"{at(text, 'ping')}: checks[0].ping.to: missing (expected the name of a consumer)")


def test_ping_endpoints() -> None:
    found, text = check_problem("ping: {from: c1, to: c3}")
    assert found == (
        f'{at(text, "c3")}: checks[0].ping.to: "c3" is no consumer; expected the name of a '
        "consumer")
    found, text = check_problem("ping: {from: sw1, to: c2}")
    assert found == (
        f'{at(text, "sw1, to")}: checks[0].ping.from: "sw1" is an appliance; expected the '
        "name of a consumer")
    found, text = check_problem("ping: {from: c1, to: c1}")
    assert found == (
        f"{at(text, 'c1}')}: checks[0].ping.to: ping from c1 to itself; expected another "
        "consumer")


def test_ping_endpoints_share_a_switch() -> None:
    text = LAB.replace("  st1:\n", "  sw2: {kind: vswitch}\n  st1:\n").replace(
        "c2: {nics: [sw1]}", "c2: {nics: [sw2]}\n  c3: {}")
    text += "checks:\n  - transfer: {from: c1, to: c2}\n  - ping: {from: c3, to: c1}\n"
    assert problems(text) == [
        f"{at(text, 'c2}')}: checks[0].transfer.to: c1 and c2 share no switch (c1: sw1; c2: "
        "sw2)",
        f"{at(text, 'c1}' + chr(10))}: checks[1].ping.to: c3 and c1 share no switch (c3: no "
        "NIC; c1: sw1)",
    ]


def test_transfer_size() -> None:
    found, text = check_problem("transfer: {from: c1, to: c2, size: 2G}")
    assert found == (
        f"{at(text, '2G')}: checks[0].transfer.size: expected a size 1M..1G (an integer of MiB, "
        'or a string like "512M", "2G"), got "2G"')


def test_disk_check_needs_that_consumers_writable_disk() -> None:
    found, text = check_problem("disk: {node: c2, disk: st1/disk-a}")
    assert found == (
        f'{at(text, "st1/disk-a}")}: checks[0].disk.disk: c2 has no disk "st1/disk-a" (its '
        "disks: none)")
    text = LAB.replace("disks: [st1/disk-a]", "disks: [st1/disk-b]")
    text += "checks:\n  - disk: {node: c1, disk: st1/disk-b}\n"
    assert only_problem(text) == (
        f"{at(text, 'st1/disk-b}')}: checks[0].disk.disk: st1/disk-b is read-only; the disk "
        "check writes to it")
    found, text = check_problem("disk: {node: st1, disk: st1/disk-a}")
    assert found == (
        f'{at(text, "st1, disk")}: checks[0].disk.node: "st1" is an appliance; expected the '
        "name of a consumer")


def test_command_check() -> None:
    found, text = check_problem("command: {node: st2, run: ls}")
    assert found == (
        f'{at(text, "st2")}: checks[0].command.node: no node named "st2"; did you mean "st1"?')
    found, text = check_problem('command: {node: st1, run: ls, output: "("}')
    assert found == (
        f"{at(text, Q + '(' + Q)}: checks[0].command.output: expected a regular expression "
        '(Python syntax, searched in the output), got "(" (missing ), unterminated subpattern '
        "at position 0)")
    found, text = check_problem("command: {node: st1, run: ls, status: 256}")
    assert found == (
        f"{at(text, 'status: 256', '256')}: checks[0].command.status: expected an integer "
        "0..255, got 256")
    found, text = check_problem('command: {node: st1, run: ""}')
    assert found == (
        f"{at(text, Q + Q)}: checks[0].command.run: expected a shell command, got \"\"")


def test_the_model_is_immutable_and_hashable() -> None:
    topo = load(LAB + "checks:\n  - ping: {from: c1, to: c2}\n")
    sw1 = topo.appliances[0]
    with pytest.raises(TypeError):
        sw1.options["busy_poll_us"] = 5  # type: ignore[index]
    with pytest.raises(TypeError):
        topo.checks[0].params["count"] = 5  # type: ignore[index]
    assert len({*topo.appliances, *topo.consumers, *topo.checks, topo}) == 6
    assert load(LAB).appliances == topo.appliances
    assert ApplianceKind.STORAGE.service == "vvu-blk" and ApplianceKind.VSWITCH.service == (
        "vvu-switch")


def test_yaml_anchors_and_merge_keys_work() -> None:
    topo = load("""\
        name: lab
        appliances:
          sw: &switch {kind: vswitch, cpus: 2}
          sw2: *switch
        consumers:
          c:
            <<: {cpus: 3, memory: 256M}
            nics: [sw, sw2]
        """)
    assert [a.cpus for a in topo.appliances] == [2, 2]
    assert (topo.consumers[0].cpus, topo.consumers[0].memory_mib) == (3, 256)


def test_tags_and_sets_are_not_values() -> None:
    assert only_problem("name: !foo lab\nconsumers: {c: {}}\n").endswith(
        "got a value tagged !foo")
    assert only_problem("name: lab\nconsumers: !!set {a, b}\n") == (
        "lab.yaml:2:12: consumers: expected a mapping of consumers by name, got a set")
    assert only_problem('name: !!python/object/apply:os.system ["true"]\nconsumers: {c: {}}\n'
                        ).endswith("got a list")


# ------------------------------------------------------------------ disk protocols


def test_an_export_is_blk_unless_it_says_scsi_and_its_disk_follows() -> None:
    topo = load(LAB.replace("{name: disk-a, size: 256M}",
                            "{name: disk-a, size: 256M, protocol: scsi}"))
    st1 = topo.appliance("st1")
    assert [(e.name, e.protocol) for e in st1.exports] == [
        ("disk-a", DiskProtocol.SCSI), ("disk-b", DiskProtocol.BLK)]
    (disk,) = topo.consumer("c1").disks
    assert disk.protocol is DiskProtocol.SCSI
    assert disk.to_json()["protocol"] == "scsi"
    assert st1.to_json()["exports"][0]["protocol"] == "scsi"
    assert (DiskProtocol.SCSI.frontend, DiskProtocol.SCSI.backend) == (
        "vhost-user-scsi-pci", "vvu-scsi")


def test_a_bad_protocol_names_the_field_and_where_it_is() -> None:
    text = LAB.replace("{name: disk-a, size: 256M}", "{name: disk-a, size: 256M, protocol: nvme}")
    msg = only_problem(text)
    assert msg.startswith(f"{at(text, 'nvme')}: appliances.st1.exports[0].protocol: "), msg
    assert "one of blk, scsi" in msg and "nvme" in msg, msg


def test_protocol_is_an_export_field_only() -> None:
    text = LAB.replace("sw1: {kind: vswitch, subnet: 10.10.1.0/24}",
                       "sw1: {kind: vswitch, subnet: 10.10.1.0/24, protocol: scsi}")
    msg = only_problem(text)
    assert msg.startswith(f"{at(text, 'protocol')}: appliances.sw1.protocol: unknown field"), msg


def test_storage_busy_poll_is_bounded_and_reaches_the_appliance_options() -> None:
    text = LAB.replace("    kind: storage\n",
                       "    kind: storage\n    options: {busy_poll_us: 500}\n")
    st1 = next(a for a in load(text).appliances if a.name == "st1")
    assert st1.options["busy_poll_us"] == 500
    bad = LAB.replace("    kind: storage\n",
                      "    kind: storage\n    options: {busy_poll_us: 2000000}\n")
    assert only_problem(bad) == (
        f"{at(bad, '2000000')}: appliances.st1.options.busy_poll_us: expected an integer "
        "0..1000000, got 2000000")
