"""Loading a topology file: YAML with positions, the schema, inheritance, cross-references.

:func:`load_topology` reads the file with ruamel.yaml's round-trip loader (every
mapping and sequence keeps its line and column), parses it against the schema
table (``schema.py``: unknown keys, types, ranges), resolves inheritance and the
derived values (subnets, MACs, addresses), and checks what one field alone
cannot: references between nodes, uniqueness, counts per appliance, checks
that can run. All problems are collected and raised together as one
:class:`TopologyError`. Loading is pure: it reads one file and creates nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vvu_runtime.launch.topology.model import (
    VXLAN_OVERHEAD,
    Accel,
    Appliance,
    ApplianceKind,
    Check,
    CheckKind,
    Consumer,
    ConsumerImage,
    Disk,
    DiskProtocol,
    Export,
    FsMount,
    Host,
    Location,
    Nic,
    Options,
    Problem,
    Topology,
    TopologyError,
    Tunnel,
)
from vvu_runtime.launch.topology.schema import (
    ADDRESS_OFFSET,
    APPLIANCE,
    CHECKS,
    CONSUMER,
    DEFAULT_SUBNET,
    HOST,
    KERNEL_IMAGE,
    MAX_LINKS_PER_APPLIANCE,
    OPTIONS,
    TOPOLOGY,
)
from vvu_runtime.launch.topology.spec import Parsed, TaggedValue
from vvu_runtime.launch.topology.types import INVALID, Cursor, Sink, did_you_mean, show

__all__ = ["load_topology", "load_topology_text"]

#: engine testpmd: one vCPU busy-polls both ports, the other runs everything else;
#: testpmd takes 128M of ordinary memory (appliance/testpmd.py).
TESTPMD_CPUS = 2
TESTPMD_MIN_MEMORY_MIB = 512
#: What vvu-devd accepts as a device name (DeviceSpec.parse).
_LINK_NAME = re.compile(r"[A-Za-z0-9._-]+")


def load_topology(path: Path) -> Topology:
    """Load and validate a topology file; raise :class:`TopologyError` with every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TopologyError([Problem(Location(path, 1, 1), "",
                                     f"cannot read the topology file: {why}")]) from None
    return load_topology_text(text, path)


def load_topology_text(text: str, source: Path) -> Topology:
    """Load a topology from text; ``source`` names it in messages and anchors relative paths."""
    source = Path(source)
    sink = Sink(source, source.absolute().parent)
    data = _read_yaml(text, source)
    sink.problems.extend(_duplicate_keys(text, source))
    root = Cursor.root(sink)
    if not isinstance(data, Mapping):
        root.problem("expected a mapping (name:, appliances:, consumers:, ...), "
                     f"got {'an empty file' if data is None else show(data)}")
        raise TopologyError(sink.problems)
    top = TOPOLOGY.parse(data, root)
    topology = _Resolver(top, sink, source).topology()
    if sink.problems or topology is None:
        raise TopologyError(sink.problems)
    return topology


def _read_yaml(text: str, source: Path) -> Any:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = True  # reported by _duplicate_keys, with the other problems
    try:
        return yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source, 1, 1)
        what = ", ".join(str(x) for x in (e.context, e.problem) if x) or str(e)
        raise TopologyError([Problem(where, "", f"YAML: {what}")]) from None
    except (YAMLError, ValueError, TypeError, RecursionError) as e:
        raise TopologyError([Problem(Location(source, 1, 1), "", f"YAML: {e}")]) from None


def _duplicate_keys(text: str, source: Path) -> list[Problem]:
    """Every repeated key of every mapping (the loader keeps the first value)."""
    try:
        top = YAML(typ="rt").compose(text)
    except YAMLError:
        return []  # _read_yaml has reported it
    problems: list[Problem] = []
    visited: set[int] = set()

    def where(node: Node) -> Location:
        return Location(source, node.start_mark.line + 1, node.start_mark.column + 1)

    def walk(node: Node, path: str) -> None:
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[str, Location] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, ScalarNode) else "?"
                sub = f"{path}.{name}" if path else name
                if isinstance(key, ScalarNode) and name != "<<":
                    if name in first:
                        problems.append(Problem(where(key), sub, "duplicate key (the first is "
                                                f"at {first[name]})"))
                    else:
                        first[name] = where(key)
                walk(value, sub)
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    if top is not None:
        walk(top, "")
    return problems


def _valid(*values: Any) -> bool:
    return all(v is not INVALID for v in values)


def _complete(p: Any) -> bool:
    """A parsed object with every field valid and every required field present."""
    return isinstance(p, Parsed) and _valid(*p.spec.resolve([p]).values())


def derived_mac(lab: str, consumer: str, index: int, salt: int = 0) -> str:
    """A locally administered unicast MAC derived from the link's identity."""
    digest = bytearray(hashlib.sha256(f"{lab}\0{consumer}\0{index}\0{salt}".encode()).digest())
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest[:6])


class _Resolver:
    """Inheritance, derived values and cross-reference checks over a parsed file."""

    def __init__(self, top: Parsed, sink: Sink, source: Path) -> None:
        self.top = top
        self.sink = sink
        self.source = source
        self.name: str | None = top.get("name")
        defaults = top.get("defaults")
        self.defaults: Parsed | None = defaults if isinstance(defaults, Parsed) else None
        self.appliance_nodes: dict[str, Parsed] = self._nodes("appliances")
        self.consumer_nodes: dict[str, Parsed] = self._nodes("consumers")
        self.appliances: dict[str, Appliance] = {}
        self.consumers: dict[str, Consumer] = {}
        self.host_nodes: dict[str, Parsed] = self._nodes("hosts")
        self.hosts: dict[str, Host] = {}
        #: Switch name -> the name of its network (the first switch of its tunnel mesh).
        self.network: dict[str, str] = {}
        #: vswitches with engine testpmd -> where the engine is chosen.
        self.testpmd: dict[str, Cursor] = {}

    def _nodes(self, field: str) -> dict[str, Parsed]:
        nodes = self.top.get(field) or {}
        return {name: p for name, p in nodes.items() if isinstance(p, Parsed)}

    def _default_layer(self, name: str) -> list[Parsed]:
        layer = self.defaults.get(name) if self.defaults is not None else None
        return [layer] if isinstance(layer, Parsed) else []

    # ---------------------------------------------------------------- the whole

    def topology(self) -> Topology | None:
        self._check_names()
        options = self._options()
        self._hosts()
        for name, p in self.appliance_nodes.items():
            if (a := self._appliance(name, p)) is not None:
                self.appliances[name] = a
        self._tunnels()
        self._check_subnets()
        self._consumers()
        self._check_link_counts()
        self._check_testpmd()
        checks = self._checks()
        if self.name is not None and all(
                self.top.values.get(f) in (None, {}) for f in ("appliances", "consumers")):
            self.top.at("name").problem("the lab has no appliances and no consumers")
        if self.sink.problems or options is None or self.name is None:
            return None
        return Topology(
            name=self.name,
            source=self.source.absolute(),
            options=options,
            appliances=tuple(self.appliances.values()),
            consumers=tuple(self.consumers.values()),
            checks=tuple(checks),
            hosts=tuple(self.hosts.values()),
        )

    def _check_names(self) -> None:
        for name, p in self.consumer_nodes.items():
            if name in self.appliance_nodes:
                other = self.appliance_nodes[name].cur.key_where
                p.cur.problem(f'the name "{name}" is already an appliance\'s ({other}); '
                              "appliances and consumers share one namespace", at_key=True)

    def _options(self) -> Options | None:
        p = self.top.get("options")
        values = OPTIONS.resolve([p] if isinstance(p, Parsed) else [])
        if not _valid(*values.values()):
            return None
        accel: Accel = values["accel"]
        return Options(accel=accel, lab_dir=values["lab_dir"],
                       boot_timeout=float(values["boot_timeout"]))

    # ---------------------------------------------------------------- appliances

    def _appliance(self, name: str, p: Parsed) -> Appliance | None:
        kind = p.kind
        if not isinstance(kind, ApplianceKind):
            return None  # missing or wrong: reported
        layers = [p, *self._default_layer(kind.value), *self._default_layer("appliance")]
        v = APPLIANCE.resolve(layers, kind)
        raw = v.get("exports")
        # An exports value that was not a list is reported already: nothing to walk.
        exports = INVALID if raw is INVALID else self._exports(raw or [])
        subnet = v.get("subnet")
        if kind is ApplianceKind.VSWITCH and subnet is None:
            subnet = self._default_subnet(name, p)
        host = self._node_host(p, v["host"])
        if not _valid(*v.values(), exports, subnet, host):
            return None
        if kind is ApplianceKind.VSWITCH and v["options"].get("engine") == "testpmd":
            v["cpus"] = self._testpmd_appliance(name, layers, v)
            if v["cpus"] is INVALID:
                return None
        return Appliance(name=name, kind=kind, image=v["image"], cpus=v["cpus"],
                         memory_mib=v["memory"], access=v["access"], subnet=subnet,
                         exports=exports, options=dict(v["options"]), where=p.cur.key_where,
                         doorbell_bypass=v["doorbell_bypass"], host=host,
                         underlay_port=v.get("underlay_port", 4789))

    def _testpmd_appliance(self, name: str, layers: list[Parsed], v: dict[str, Any]) -> Any:
        """A vswitch with ``engine: testpmd``: its cpus (2 unless set), or INVALID
        after saying what testpmd lacks (appliance/testpmd.py says why each)."""
        ok = True
        options = [q for layer in layers
                   if isinstance(q := layer.values.get("options"), Parsed)]
        self.testpmd[name] = next(q.at("engine") for q in options if q.has("engine"))
        for q in options:
            if q.has("busy_poll_us"):
                q.at("busy_poll_us").problem("a vvu-switch option; engine testpmd busy-polls "
                                             "by itself: remove it, or use engine vvu-switch")
                ok = False
                break
        memory = next((layer for layer in layers if layer.has("memory")), None)
        if memory is not None and v["memory"] < TESTPMD_MIN_MEMORY_MIB:
            memory.at("memory").problem(
                f"engine testpmd needs at least {TESTPMD_MIN_MEMORY_MIB}M (testpmd alone "
                f"takes 128M without hugepages); got {v['memory']}M")
            ok = False
        cpus = next((layer for layer in layers if layer.has("cpus")), None)
        if cpus is None:
            return TESTPMD_CPUS if ok else INVALID
        if v["cpus"] < TESTPMD_CPUS:
            cpus.at("cpus").problem(
                f"engine testpmd needs at least {TESTPMD_CPUS} cpus (one busy-polls both "
                f"ports, the other runs the rest); got {v['cpus']}: set {TESTPMD_CPUS} or "
                "leave cpus out")
            ok = False
        return v["cpus"] if ok else INVALID

    def _check_testpmd(self) -> None:
        """testpmd forwards port 0 to port 1 and back: exactly 2 consumer NICs, no tunnels."""
        for name, cur in self.testpmd.items():
            nics = [n for c in self.consumers.values() for n in c.nics if n.switch == name]
            broken = [c for c, p in self.consumer_nodes.items() if c not in self.consumers
                      and any(isinstance(n, Parsed) and n.get("switch") == name
                              for n in p.get("nics") or [])]
            if len(nics) != 2 and not broken:
                on = ", ".join(f"{n.consumer} ({n.where})" for n in nics) or "none"
                cur.problem(f"engine testpmd forwards between exactly 2 ports (io forward), "
                            f"and {name} has {len(nics)} consumer NICs: {on}; give it 2, "
                            "or use engine vvu-switch")
            a = self.appliances.get(name)
            for t in a.tunnels if a is not None else ():
                cur.problem(f"engine testpmd has no tunnels (it forwards between its 2 ports "
                            f"only), and {name} has one to {t.peer} ({t.where}); remove it, "
                            "or use engine vvu-switch")

    def _default_subnet(self, name: str, p: Parsed) -> Any:
        switches = [n for n, q in self.appliance_nodes.items()
                    if q.kind is ApplianceKind.VSWITCH]
        index = switches.index(name)
        if index > 255:
            p.missing("subnet").problem(f"no default subnet for vswitch number {index + 1} "
                                        "(10.77.0.0/24 .. 10.77.255.0/24 are taken): set one")
            return INVALID
        return IPv4Network(DEFAULT_SUBNET.format(index=index))

    def _exports(self, items: Any) -> Any:
        out: list[Export] = []
        seen: dict[str, Parsed] = {}
        ok = True
        for e in items:
            if not _complete(e):
                ok = False
                continue
            name = e.get("name")
            if name in seen:
                e.at("name").problem(f'export "{name}" is already defined '
                                     f"({seen[name].cur.where})")
                ok = False
                continue
            seen[name] = e
            v = e.spec.resolve([e])
            if v.get("engine") == "qsd" and v.get("protocol") is DiskProtocol.SCSI:
                e.at("engine").problem(f'export "{name}": engine qsd serves vhost-user-blk '
                                       "only; protocol scsi needs engine vvu-blk (vvu-scsi)")
                ok = False
                continue
            # (fs exports have no readonly, engine or protocol: virtiofsd serves them
            # read-write.)
            out.append(Export(name=name, size=v["size"], readonly=v.get("readonly", False),
                              where=e.cur.where, engine=v.get("engine", "vvu-blk"),
                              protocol=v.get("protocol", DiskProtocol.BLK)))
        return tuple(out) if ok else INVALID

    def _check_subnets(self) -> None:
        switches = [a for a in self.appliances.values() if a.subnet is not None]
        for i, a in enumerate(switches):
            assert a.subnet is not None
            for b in switches[:i]:
                assert b.subnet is not None
                if self._same_network(a.name, b.name):
                    continue  # one L2 network through tunnels: one subnet (see _tunnels)
                if a.subnet.overlaps(b.subnet):
                    pa, pb = self.appliance_nodes[a.name], self.appliance_nodes[b.name]
                    default = "" if pa.has("subnet") else " (the default)"
                    pa.at("subnet").problem(
                        f"{a.subnet}{default} overlaps {b.name}'s subnet {b.subnet} "
                        f"({pb.at('subnet').where}); each switch needs its own")

    # ---------------------------------------------------------------- placement

    def _hosts(self) -> None:
        for name, p in self.host_nodes.items():
            v = HOST.resolve([p])
            if not _valid(*v.values()):
                continue
            if v["address"] is None and v["inventory"] is None:
                p.cur.problem("give the address (or an inventory host that has it)",
                              at_key=True)
                continue
            self.hosts[name] = Host(name=name, address=v["address"], user=v["user"],
                                    key=v["key"], inventory=v["inventory"], mtu=v["mtu"],
                                    where=p.cur.key_where)

    def _node_host(self, p: Parsed, host: Any) -> Any:
        """The node's host name (None without hosts:), or INVALID after saying why."""
        if host is INVALID:
            return INVALID
        if not self.host_nodes:
            if host is not None:
                p.at("host").problem(f'host "{host}", but the topology has no hosts: (add '
                                     "hosts:, or leave host out to run the node here)")
                return INVALID
            return None
        if host is None:
            p.missing("host").problem("missing: the topology has hosts:, so every node names "
                                      f"the one it runs on ({', '.join(self.host_nodes)})")
            return INVALID
        if host not in self.host_nodes:
            p.at("host").problem(f'no host named "{host}"{did_you_mean(host, self.host_nodes)}'
                                 f" (hosts: {', '.join(self.host_nodes)})")
            return INVALID
        return host

    def _same_host(self, consumer: str, host: str | None, v: dict[str, Any],
                   nics: tuple[Nic, ...], disks: tuple[Disk, ...],
                   fs: tuple[FsMount, ...] = ()) -> bool:
        """VVU links are shared memory: a consumer and its appliances share a host."""
        ok = True
        items = [*(v["nics"] or []), *(v["disks"] or []), *(v["fs"] or [])]
        links: tuple[Nic | Disk | FsMount, ...] = (*nics, *disks, *fs)
        for link, item in zip(links, items, strict=True):
            target = self.appliances[link.appliance]
            if target.host == host:
                continue
            field, what = (("switch", "NIC") if isinstance(link, Nic) else
                           ("storage", "disk") if isinstance(link, Disk) else
                           ("appliance", "virtio-fs mount"))
            item.at(field).problem(
                f"{target.name} runs on host {target.host}, {consumer} on host {host}: a VVU "
                f"link ({what}) is shared memory and cannot cross hosts (put both on one host"
                + ("; join switches of different hosts with tunnels:)" if field == "switch"
                   else ")"))
            ok = False
        return ok

    def _nic_mtus(self, nics: tuple[Nic, ...]) -> dict[int, int]:
        out: dict[int, int] = {}
        for n in nics:
            switch = self.appliances[n.switch]
            if switch.tunnels:
                mtus = [self.hosts[h].mtu for h in self._network_hosts(n.switch)
                        if h in self.hosts]  # (a broken host is reported already)
                out[n.index] = min(mtus, default=1500) - VXLAN_OVERHEAD
        return out

    def _network_hosts(self, switch: str) -> set[str]:
        net = self.network.get(switch, switch)
        return {a.host for a in self.appliances.values()
                if self.network.get(a.name, a.name) == net and a.host is not None}

    def _same_network(self, a: str, b: str) -> bool:
        return self.network.get(a, a) == self.network.get(b, b)

    def _networks(self, c: Consumer) -> set[str]:
        return {self.network.get(s, s) for s in c.switches}

    def _tunnels(self) -> None:
        """Tunnels on both ends, one network per full mesh, its subnet and VNI shared."""
        declared: dict[frozenset[str], tuple[int, Cursor]] = {}
        ends: dict[str, list[Tunnel]] = {}
        for name, p in self.appliance_nodes.items():
            items = p.get("tunnels") if p.kind is ApplianceKind.VSWITCH else None
            for t in items if isinstance(items, list) else []:
                if not _complete(t):
                    continue
                peer, vni, cur = t.get("peer"), t.get("vni"), t.at("peer")
                if self._tunnel_ok(name, peer, cur):
                    pair = frozenset((name, peer))
                    if pair in declared:
                        first_vni, first = declared[pair]
                        if first_vni != vni:
                            t.at("vni").problem(f"the tunnel {name} - {peer} is already "
                                                f"declared with vni {first_vni} ({first.where})")
                        continue
                    declared[pair] = (vni, cur)
                    me, other = self.appliances[name], self.appliances[peer]
                    ends.setdefault(name, []).append(Tunnel(
                        peer, vni, t.cur.where, other.host, other.underlay_port))
                    ends.setdefault(peer, []).append(Tunnel(
                        name, vni, t.cur.where, me.host, me.underlay_port))
        # Networks: connected components, in file order of their first switch.
        for name in self.appliance_nodes:
            if name in ends and name not in self.network:
                todo = [name]
                while todo:
                    n = todo.pop()
                    if n not in self.network:
                        self.network[n] = name
                        todo += [t.peer for t in ends.get(n, [])]
        members: dict[str, list[str]] = {}
        for n in self.appliance_nodes:  # file order
            if n in self.network:
                members.setdefault(self.network[n], []).append(n)
        vnis: dict[int, str] = {}
        for net, names in members.items():
            self._check_network(net, names, ends, vnis)
        ports: dict[tuple[str | None, int], str] = {}
        for a in self.appliances.values():
            if a.name in self.network:
                key = (a.host, a.underlay_port)
                if key in ports:
                    self.appliance_nodes[a.name].at("underlay_port").problem(
                        f"UDP port {a.underlay_port} on host {a.host} is already "
                        f"{ports[key]}'s tunnel port")
                ports.setdefault(key, a.name)
        for name, tunnels in ends.items():
            if (sw := self.appliances.get(name)) is not None:
                subnet = self.appliances[self.network[name]].subnet
                explicit = self.appliance_nodes[name].has("subnet")
                self.appliances[name] = replace(sw, tunnels=tuple(tunnels),
                                                subnet=sw.subnet if explicit else subnet)

    def _tunnel_ok(self, name: str, peer: str, cur: Cursor) -> bool:
        if not self.host_nodes:
            cur.problem("tunnels join switches on different hosts, and the topology has no "
                        "hosts:")
            return False
        target = self._link_target(peer, cur, ApplianceKind.VSWITCH)
        a = self.appliances.get(name)
        if target is None or a is None:
            return False
        if target.name == name:
            cur.problem(f"a tunnel from {name} to itself; expected a switch on another host")
            return False
        if target.host == a.host:
            cur.problem(f"{peer} runs on the same host as {name} ({a.host}); tunnels join "
                        "switches of different hosts (on one host, use one switch)")
            return False
        for sw in (a, target):
            host = self.hosts.get(sw.host or "")
            if host is not None and host.address is None:
                cur.problem(f"host {host.name} of {sw.name} has no address (only inventory "
                            f"{host.inventory}): a tunnel needs the address to send to")
                return False
        return True

    def _check_network(self, net: str, names: list[str], ends: dict[str, list[Tunnel]],
                       vnis: dict[int, str]) -> None:
        p = self.appliance_nodes[net]
        where = p.at("tunnels")
        # Split horizon (a frame from a tunnel never goes to another tunnel) needs a
        # full mesh: every switch of the network has a tunnel to every other.
        for i, a in enumerate(names):
            peers = {t.peer for t in ends.get(a, [])}
            for b in names[i + 1:]:
                if b not in peers:
                    where.problem(f"{a} and {b} are one network (through other switches' "
                                  f"tunnels) but have no tunnel between them: split horizon "
                                  "needs a tunnel between every two switches of a network")
        own = {t.vni for n in names for t in ends.get(n, [])}
        if len(own) > 1:
            where.problem(f"the network of {', '.join(names)} has tunnels with vni "
                          f"{', '.join(map(str, sorted(own)))}; one network, one vni")
        for vni in own:
            if vni in vnis and vnis[vni] != net:
                where.problem(f"vni {vni} is already the network of {vnis[vni]}")
            vnis.setdefault(vni, net)
        explicit = {n: self.appliances[n].subnet for n in names
                    if n in self.appliances and self.appliance_nodes[n].has("subnet")}
        if len(set(explicit.values())) > 1:
            where.problem("switches joined by tunnels are one L2 network with one subnet; "
                          "they have " + ", ".join(f"{n}: {s}" for n, s in explicit.items()))
        elif explicit and net in self.appliances:
            # The network's subnet: the one given (by any member).
            self.appliances[net] = replace(self.appliances[net],
                                           subnet=next(iter(explicit.values())))

    # ---------------------------------------------------------------- consumers

    def _consumers(self) -> None:
        resolved = {name: CONSUMER.resolve([p, *self._default_layer("consumer")])
                    for name, p in self.consumer_nodes.items()}
        explicit_macs = self._explicit_macs(resolved)
        taken_macs: set[str] = set(explicit_macs)
        addresses: dict[IPv4Address, Cursor] = {}
        per_switch: dict[str, int] = {}
        exports_used: dict[tuple[str, str], Parsed] = {}
        for name, p in self.consumer_nodes.items():
            v = resolved[name]
            nics = self._nics(name, v["nics"], explicit_macs, taken_macs, addresses, per_switch)
            disks = self._disks(name, v["disks"], exports_used)
            fs = self._fs(name, v["fs"], exports_used)
            image = self._image(v["image"])
            host = self._node_host(p, v["host"])
            if not _valid(v["cpus"], v["memory"], nics, disks, fs, image, host):
                continue
            if not self._same_host(name, host, v, nics, disks, fs):
                continue
            self.consumers[name] = Consumer(name=name, image=image, cpus=v["cpus"],
                                            memory_mib=v["memory"], nics=nics, disks=disks,
                                            where=p.cur.key_where, host=host,
                                            nic_mtus=self._nic_mtus(nics), fs=fs)

    @staticmethod
    def _image(value: Any) -> Any:
        if isinstance(value, str):
            return ConsumerImage(name=value)
        if isinstance(value, Parsed):
            v = KERNEL_IMAGE.resolve([value])
            if not _valid(*v.values()):
                return INVALID
            return ConsumerImage(kernel=v["kernel"], initrd=v["initrd"], append=v["append"])
        return INVALID

    def _explicit_macs(self, resolved: dict[str, dict[str, Any]]) -> dict[str, Cursor]:
        macs: dict[str, Cursor] = {}
        for v in resolved.values():
            for nic in v["nics"] if isinstance(v["nics"], list) else []:
                if isinstance(nic, Parsed) and nic.has("mac") and nic.get("mac") is not None:
                    mac, cur = nic.get("mac"), nic.at("mac")
                    if mac in macs:
                        cur.problem(f"MAC {mac} is already used ({macs[mac].where})")
                    else:
                        macs[mac] = cur
        return macs

    def _switch(self, nic: Parsed) -> Appliance | None:
        """The NIC's vswitch, or None after saying why not."""
        name = nic.get("switch")
        if name is None:
            return None
        return self._link_target(name, nic.at("switch"), ApplianceKind.VSWITCH)

    def _link_target(self, name: str, cur: Cursor, kind: ApplianceKind) -> Appliance | None:
        p = self.appliance_nodes.get(name)
        if p is None:
            names = [n for n, q in self.appliance_nodes.items() if q.kind is kind]
            what = "a consumer" if name in self.consumer_nodes else "no appliance"
            hint = did_you_mean(name, names)
            cur.problem(f'"{name}" is {what}; expected the name of a {kind.value} appliance'
                        f"{hint or ' (' + (', '.join(names) or 'there is none') + ')'}")
            return None
        if isinstance(p.kind, ApplianceKind) and p.kind is not kind:
            cur.problem(f'"{name}" is a {p.kind.value} appliance; expected a {kind.value}')
            return None
        return self.appliances.get(name)  # None if the appliance itself is broken

    def _nics(self, consumer: str, items: Any, explicit_macs: dict[str, Cursor],
              taken_macs: set[str], addresses: dict[IPv4Address, Cursor],
              per_switch: dict[str, int]) -> Any:
        if items is INVALID:
            return INVALID
        out: list[Nic] = []
        ok = True
        for index, nic in enumerate(items):
            if not _complete(nic):
                ok = False
                continue
            switch = self._switch(nic)
            if switch is None or switch.subnet is None:
                ok = False
                continue
            # Addresses are numbered per network: switches joined by tunnels share a subnet.
            net = self.network.get(switch.name, switch.name)
            host = per_switch.get(net, 0)
            per_switch[net] = host + 1
            address = self._address(nic, switch.name, switch.subnet, host, addresses)
            mac = nic.get("mac") or self._derive_mac(consumer, index, taken_macs)
            if address is None:
                ok = False
                continue
            out.append(Nic(consumer=consumer, index=index, switch=switch.name, mac=mac,
                           address=address, where=nic.cur.where))
        return tuple(out) if ok else INVALID

    def _derive_mac(self, consumer: str, index: int, taken: set[str]) -> str:
        salt = 0
        while (mac := derived_mac(self.name or "", consumer, index, salt)) in taken:
            salt += 1
        taken.add(mac)
        return mac

    def _address(self, nic: Parsed, switch: str, subnet: IPv4Network, host: int,
                 addresses: dict[IPv4Address, Cursor]) -> IPv4Interface | None:
        given = nic.get("address")
        cur = nic.at("address")
        if given is None:
            ip = subnet.network_address + host + ADDRESS_OFFSET
            if ip >= subnet.broadcast_address:
                cur.problem(f"{switch}'s subnet {subnet} has no default address left (host "
                            f"{host} + {ADDRESS_OFFSET} is past its end): set the address")
                return None
            address = IPv4Interface(f"{ip}/{subnet.prefixlen}")
            how = f" (the default: host {host} + {ADDRESS_OFFSET})"
        else:
            if not isinstance(given, IPv4Interface):  # (an IPv4Interface is an IPv4Address)
                given = IPv4Interface(f"{given}/{subnet.prefixlen}")
            if given.network.prefixlen != subnet.prefixlen or given.ip not in subnet:
                cur.problem(f"{given} is not an address in {switch}'s subnet {subnet}")
                return None
            if given.ip in (subnet.network_address, subnet.broadcast_address):
                which = "network" if given.ip == subnet.network_address else "broadcast"
                cur.problem(f"{given.ip} is the {which} address of {switch}'s subnet {subnet}; "
                            "expected a host address")
                return None
            address, how = given, ""
        if address.ip in addresses:
            cur.problem(f"address {address.ip}{how} is already used "
                        f"({addresses[address.ip].where})")
            return None
        addresses[address.ip] = cur
        return address

    def _disks(self, consumer: str, items: Any,
               exports_used: dict[tuple[str, str], Parsed]) -> Any:
        if items is INVALID:
            return INVALID
        out: list[Disk] = []
        ok = True
        for index, disk in enumerate(items):
            if not _complete(disk):
                ok = False
                continue
            found = self._free_export(disk, "storage", ApplianceKind.STORAGE, exports_used,
                                      "is already the disk of", "disk")
            if found is None:
                ok = False
                continue
            storage, export = found
            exports_used[storage.name, export] = disk
            out.append(Disk(consumer=consumer, index=index, storage=storage.name,
                            export=export, where=disk.cur.where,
                            protocol=storage.export(export).protocol))
        return tuple(out) if ok else INVALID

    def _free_export(self, item: Parsed, field: str, kind: ApplianceKind,
                     exports_used: dict[tuple[str, str], Parsed], taken: str,
                     serves: str) -> tuple[Appliance, str] | None:
        """The (appliance, export) a consumer's entry names in ``field`` and ``export``,
        if both exist and no other entry has that export; else None, the problem
        reported ("export A/E {taken} ENTRY; each export serves one {serves}")."""
        target = self._link_target(item.get(field), item.at(field), kind)
        if target is None:
            return None
        export = item.get("export")
        names = [e.name for e in target.exports]
        cur = item.at("export")
        if export not in names:
            cur.problem(f'{target.name} has no export "{export}"'
                        f"{did_you_mean(export, names)} (its exports: "
                        f"{', '.join(names) or 'none'})")
            return None
        if (first := exports_used.get((target.name, export))) is not None:
            cur.problem(f"export {target.name}/{export} {taken} {first.cur.path} "
                        f"({first.cur.where}); each export serves one {serves}")
            return None
        return target, export

    def _fs(self, consumer: str, items: Any,
            exports_used: dict[tuple[str, str], Parsed]) -> Any:
        """The consumer's virtio-fs mounts (``fs:``), each on an unused fs export."""
        if items is INVALID:
            return INVALID
        out: list[FsMount] = []
        mounts: dict[str, Cursor] = {}
        ok = True
        for index, item in enumerate(items):
            if not _complete(item):
                ok = False
                continue
            found = self._free_export(item, "appliance", ApplianceKind.FS, exports_used,
                                      "is already mounted by", "consumer")
            if found is None:
                ok = False
                continue
            target, export = found
            mount = item.get("mount") or f"/mnt/{export}"
            if mount in mounts:
                (item.at("mount") if item.has("mount") else item.cur).problem(
                    f"{mount} is already the mount point of another fs entry "
                    f"({mounts[mount].where})")
                ok = False
                continue
            mounts[mount] = item.cur
            exports_used[target.name, export] = item
            out.append(FsMount(consumer=consumer, index=index, appliance=target.name,
                               export=export, mount=mount, where=item.cur.where))
        return tuple(out) if ok else INVALID

    def _check_link_counts(self) -> None:
        counts: dict[str, int] = {}
        names: dict[str, str] = {}
        for c in self.consumers.values():
            for link in c.links:
                counts[link.appliance] = counts.get(link.appliance, 0) + 1
                if not _LINK_NAME.fullmatch(link.link) or link.link in names:
                    self.consumer_nodes[c.name].cur.problem(
                        f'link name "{link.link}" is not usable by vvu-devd or not unique',
                        at_key=True)
                names[link.link] = c.name
        for name, n in counts.items():
            if n > MAX_LINKS_PER_APPLIANCE:
                self.appliance_nodes[name].cur.problem(
                    f"{n} links to this appliance, at most {MAX_LINKS_PER_APPLIANCE} "
                    "(one VVU function on its own root port each)", at_key=True)

    # ---------------------------------------------------------------- checks

    def _checks(self) -> list[Check]:
        out: list[Check] = []
        for item in self.top.get("checks") or []:
            if not isinstance(item, TaggedValue):
                continue
            kind = CheckKind(item.tag)
            body = item.body
            params = CHECKS[kind].resolve([body])
            refs_ok = _valid(*(params[f] for f in kind.references))
            if refs_ok and self._check_refs(kind, body, params) and _valid(*params.values()):
                out.append(Check(kind=kind, params=params, where=body.cur.key_where))
        return out

    def _consumer_ref(self, body: Parsed, field: str) -> Consumer | None:
        name = body.get(field)
        cur = body.at(field)
        if name in self.consumers:
            return self.consumers[name]
        if name in self.consumer_nodes:
            return None  # that consumer has problems of its own
        what = "an appliance" if name in self.appliance_nodes else "no consumer"
        cur.problem(f'"{name}" is {what}; expected the name of a consumer'
                    f"{did_you_mean(name, self.consumer_nodes)}")
        return None

    def _check_refs(self, kind: CheckKind, body: Parsed, params: dict[str, Any]) -> bool:
        if kind in (CheckKind.PING, CheckKind.TRANSFER):
            a, b = self._consumer_ref(body, "from"), self._consumer_ref(body, "to")
            if a is None or b is None:
                return False
            if a.name == b.name:
                body.at("to").problem(f"{kind.value} from {a.name} to itself; expected another "
                                      "consumer")
                return False
            if not self._networks(a) & self._networks(b):
                body.at("to").problem(
                    f"{a.name} and {b.name} share no switch ({a.name}: "
                    f"{', '.join(sorted(a.switches)) or 'no NIC'}; {b.name}: "
                    f"{', '.join(sorted(b.switches)) or 'no NIC'})")
                return False
            return True
        if kind is CheckKind.DISK:
            c = self._consumer_ref(body, "node")
            if c is None:
                return False
            refs = [d.ref for d in c.disks]
            if params["disk"] not in refs:
                body.at("disk").problem(
                    f'{c.name} has no disk "{params["disk"]}"{did_you_mean(params["disk"], refs)}'
                    f" (its disks: {', '.join(refs) or 'none'})")
                return False
            disk = c.disks[refs.index(params["disk"])]
            if self.appliances[disk.storage].export(disk.export).readonly:
                body.at("disk").problem(f"{disk.ref} is read-only; the disk check writes to it")
                return False
            return True
        if kind is CheckKind.FS:
            c = self._consumer_ref(body, "node")
            if c is None:
                return False
            refs = [f.ref for f in c.fs]
            if params["fs"] not in refs:
                body.at("fs").problem(
                    f'{c.name} has no virtio-fs mount "{params["fs"]}"'
                    f"{did_you_mean(params['fs'], refs)} (its mounts: "
                    f"{', '.join(refs) or 'none'})")
                return False
            return True
        name = params["node"]
        if name in self.appliances or name in self.consumers:
            return True
        if name not in self.appliance_nodes and name not in self.consumer_nodes:
            nodes = [*self.appliance_nodes, *self.consumer_nodes]
            body.at("node").problem(f'no node named "{name}"{did_you_mean(name, nodes)}')
        return False
