"""The resolved topology: what a loaded ``topology.yaml`` means, as frozen dataclasses.

Everything here is already validated and resolved (defaults inherited, derived
subnets, MACs and addresses filled in, paths made absolute), so a consumer of a
:class:`Topology` never checks anything again. Sizes are numbers: memory in MiB
(``memory_mib``), export and transfer sizes in bytes.

Errors: :class:`TopologyError` carries every :class:`Problem` found in one load,
each with the ``FILE:LINE:COL`` of the offending key or value and the dotted
path of the field (``consumers.c1.nics[0].switch``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vvu_runtime.errors import VvuError

__all__ = [
    "Accel",
    "Appliance",
    "ApplianceAccess",
    "ApplianceKind",
    "Check",
    "CheckKind",
    "Consumer",
    "ConsumerImage",
    "Disk",
    "DiskProtocol",
    "Export",
    "FsMount",
    "Host",
    "Location",
    "Nic",
    "Options",
    "Problem",
    "Role",
    "Topology",
    "TopologyError",
    "Tunnel",
]

MIB = 1 << 20


# ------------------------------------------------------------------ enums


class Accel(enum.Enum):
    """The accelerator a lab asks for; ``auto`` probes KVM and falls back to TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    @property
    def forced(self) -> bool:
        """True when the user named an accelerator (no probing, no fallback)."""
        return self is not Accel.AUTO


class ApplianceKind(enum.Enum):
    """What an appliance serves, and how consumers link to it."""

    VSWITCH = "vswitch"
    STORAGE = "storage"
    #: virtio-fs shares: stock virtiofsd behind vvu-proxy (appliances/fs).
    FS = "fs"

    @property
    def image_name(self) -> str:
        """The name of the built appliance image of this kind."""
        return self.value

    @property
    def service(self) -> str:
        """The systemd unit inside the appliance that runs the backend."""
        return {ApplianceKind.VSWITCH: "vvu-switch", ApplianceKind.STORAGE: "vvu-blk",
                ApplianceKind.FS: "vvu-fs"}[self]

    @property
    def link_field(self) -> str:
        """The consumer field whose entries link to an appliance of this kind."""
        return {ApplianceKind.VSWITCH: "nics", ApplianceKind.STORAGE: "disks",
                ApplianceKind.FS: "fs"}[self]

    @property
    def link_noun(self) -> str:
        return {ApplianceKind.VSWITCH: "nic", ApplianceKind.STORAGE: "disk",
                ApplianceKind.FS: "fs"}[self]


class DiskProtocol(enum.Enum):
    """How a consumer sees a storage export: the vhost-user device type of its link."""

    BLK = "blk"
    SCSI = "scsi"

    @property
    def frontend(self) -> str:
        """The consumer's QEMU device."""
        return "vhost-user-blk-pci" if self is DiskProtocol.BLK else "vhost-user-scsi-pci"

    @property
    def backend(self) -> str:
        """The program that serves it inside the storage appliance."""
        return "vvu-blk" if self is DiskProtocol.BLK else "vvu-scsi"


class ApplianceAccess(enum.Enum):
    """How the appliance's driver reaches its VVU functions."""

    VIOMMU = "viommu"
    POLL = "poll"

    @property
    def uses_iommu(self) -> bool:
        """vfio-pci behind a virtual IOMMU (interrupts) vs. sysfs + pagemap (polling)."""
        return self is ApplianceAccess.VIOMMU


class Role(enum.Enum):
    CONSUMER = "consumer"
    APPLIANCE = "appliance"


class CheckKind(enum.Enum):
    """A ``checks:`` entry (netlab's ``validate``)."""

    PING = "ping"
    TRANSFER = "transfer"
    DISK = "disk"
    COMMAND = "command"
    #: Files written through a consumer's virtio-fs mount, read back there and in the
    #: appliance's export.
    FS = "fs"

    @property
    def references(self) -> tuple[str, ...]:
        """The fields naming nodes or disks (checked against the topology)."""
        if self in (CheckKind.PING, CheckKind.TRANSFER):
            return ("from", "to")
        if self is CheckKind.DISK:
            return ("node", "disk")
        if self is CheckKind.FS:
            return ("node", "fs")
        return ("node",)

    def describe(self, params: Mapping[str, Any]) -> str:
        """One line naming what the check does, e.g. ``ping c1 -> c2``."""
        if self is CheckKind.PING:
            return f"ping {params['from']} -> {params['to']}"
        if self is CheckKind.TRANSFER:
            return f"transfer {_size_text(params['size'])} {params['from']} -> {params['to']}"
        if self is CheckKind.DISK:
            return f"disk {params['node']} {params['disk']}"
        if self is CheckKind.FS:
            return f"fs {params['node']} {params['fs']} ({_size_text(params['size'])})"
        return f"command {params['node']}: {params['run']}"


def _size_text(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


# ------------------------------------------------------------------ errors


@dataclass(frozen=True, order=True)
class Location:
    """Where something is in a topology file (1-based line and column)."""

    file: Path
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a topology file.

    ``field`` is the dotted path of the offending field; it is empty only for
    problems that are not about one field (YAML syntax, an unreadable file).
    """

    where: Location
    field: str
    message: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.where}: {self.field}: {self.message}"
        return f"{self.where}: {self.message}"


class TopologyError(VvuError):
    """A topology file is unusable; ``problems`` lists every reason, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.where, p.field))
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[type[TopologyError], tuple[list[Problem]]]:
        return (TopologyError, (self.problems,))


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Options:
    accel: Accel
    #: None: the launcher's default (``<state dir>/labs/<name>``).
    lab_dir: Path | None
    #: Seconds a node may take from start to ready.
    boot_timeout: float

    def to_json(self) -> dict[str, Any]:
        return {
            "accel": self.accel.value,
            "lab_dir": None if self.lab_dir is None else str(self.lab_dir),
            "boot_timeout": self.boot_timeout,
        }


@dataclass(frozen=True)
class Export:
    """A disk a storage appliance offers (one consumer may use it)."""

    name: str
    size: int  # bytes
    readonly: bool
    where: Location
    #: What serves it in the appliance: ``vvu-blk`` or ``qsd`` (appliance/config.py ENGINES).
    engine: str = "vvu-blk"
    protocol: DiskProtocol = DiskProtocol.BLK

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "readonly": self.readonly,
                "engine": self.engine, "protocol": self.protocol.value}


@dataclass(frozen=True)
class Host:
    """A machine that runs a slice of the lab (``hosts:``)."""

    name: str
    #: Where SSH reaches it and the other hosts' tunnels send to; None: from ``inventory``.
    address: str | None
    user: str
    key: Path | None
    #: A host of the operator's Ansible inventory that stands for this one.
    inventory: str | None
    #: The MTU of the host network tunnels cross.
    mtu: int
    where: Location

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "user": self.user,
                "key": None if self.key is None else str(self.key),
                "inventory": self.inventory, "mtu": self.mtu}


#: Bytes VXLAN over IPv4 adds to a frame's L3 packet: outer IPv4 20, UDP 8, VXLAN 8,
#: inner Ethernet 14 (RFC 7348; no outer VLAN tag, no IP options).
VXLAN_OVERHEAD = 50


@dataclass(frozen=True)
class Tunnel:
    """A VXLAN tunnel of a switch to a switch on another host (listed on both ends)."""

    peer: str
    vni: int
    where: Location
    #: The peer's host and the UDP port its tunnels arrive at there (its host's address
    #: is in ``Topology.hosts``): what a slice of the lab needs of a switch it lacks.
    peer_host: str | None = None
    peer_port: int = 4789

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "vni": self.vni, "peer_host": self.peer_host,
                "peer_port": self.peer_port}


@dataclass(frozen=True)
class Appliance:
    name: str
    kind: ApplianceKind
    #: None: the built image of this kind (``kind.image_name``).
    image: Path | None
    cpus: int
    memory_mib: int
    access: ApplianceAccess
    #: The L2 segment's subnet (vswitch only).
    subnet: IPv4Network | None
    #: The disks offered (storage only).
    exports: tuple[Export, ...]
    #: Backend options of this kind, every key present (defaults filled in); read-only.
    options: Mapping[str, Any] = field(hash=False)
    where: Location
    #: Calls through the doorbell companion (docs/vvu-abi.md "Doorbell bypass").
    doorbell_bypass: bool = False
    #: The host it runs on (a name in ``Topology.hosts``); None: no ``hosts:``, this machine.
    host: str | None = None
    #: Tunnels to switches on other hosts (vswitch), those the peer declared included.
    tunnels: tuple[Tunnel, ...] = ()
    #: The UDP port on its host where its tunnels arrive (vswitch with tunnels).
    underlay_port: int = 4789

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def role(self) -> Role:
        return Role.APPLIANCE

    @property
    def vni(self) -> int | None:
        """The VXLAN network identifier of its network (None: no tunnels)."""
        return self.tunnels[0].vni if self.tunnels else None

    def export(self, name: str) -> Export:
        for e in self.exports:
            if e.name == name:
                return e
        raise KeyError(f"appliance {self.name} has no export {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "kind": self.kind.value,
            "image": None if self.image is None else str(self.image),
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "access": self.access.value,
            "doorbell_bypass": self.doorbell_bypass,
            "subnet": None if self.subnet is None else str(self.subnet),
            "exports": [e.to_json() for e in self.exports],
            "options": dict(self.options),
            "host": self.host,
            "tunnels": [t.to_json() for t in self.tunnels],
            "underlay_port": self.underlay_port,
        }


@dataclass(frozen=True)
class Nic:
    """A consumer's virtio-net device: one VVU link to a vswitch appliance."""

    index: int
    switch: str
    mac: str
    address: IPv4Interface
    where: Location
    #: The consumer that has the NIC (part of the link's name).
    consumer: str

    @property
    def link(self) -> str:
        """The link's name (the vvu-devd device name, sockets, RAM-file users)."""
        return f"{self.consumer}-nic{self.index}"

    @property
    def appliance(self) -> str:
        return self.switch

    def to_json(self) -> dict[str, Any]:
        return {
            "link": self.link,
            "index": self.index,
            "switch": self.switch,
            "mac": self.mac,
            "address": str(self.address),
        }


@dataclass(frozen=True)
class Disk:
    """A consumer's disk (virtio-blk, or virtio-scsi with the disk as LUN 0): one VVU
    link to a storage appliance export."""

    index: int
    storage: str
    export: str
    where: Location
    #: The consumer that has the disk (part of the link's name).
    consumer: str
    #: The export's protocol (copied here: the consumer's device depends on it).
    protocol: DiskProtocol = DiskProtocol.BLK

    @property
    def link(self) -> str:
        return f"{self.consumer}-disk{self.index}"

    @property
    def appliance(self) -> str:
        return self.storage

    @property
    def ref(self) -> str:
        """``STORAGE/EXPORT``, the form ``checks:`` use."""
        return f"{self.storage}/{self.export}"

    def to_json(self) -> dict[str, Any]:
        return {"link": self.link, "index": self.index, "storage": self.storage,
                "export": self.export, "protocol": self.protocol.value}


@dataclass(frozen=True)
class FsMount:
    """A consumer's virtio-fs device (vhost-user-fs-pci): one VVU link to an export of an
    fs appliance, mounted at ``mount`` (its tag is the export's name)."""

    index: int
    appliance: str
    export: str
    mount: str
    where: Location
    #: The consumer that has it (part of the link's name).
    consumer: str

    @property
    def link(self) -> str:
        return f"{self.consumer}-fs{self.index}"

    @property
    def tag(self) -> str:
        """The virtio-fs tag the consumer mounts (``mount -t virtiofs TAG DIR``)."""
        return self.export

    @property
    def ref(self) -> str:
        """``FS/EXPORT``, the form ``checks:`` use."""
        return f"{self.appliance}/{self.export}"

    def to_json(self) -> dict[str, Any]:
        return {"link": self.link, "index": self.index, "appliance": self.appliance,
                "export": self.export, "mount": self.mount, "tag": self.tag}


@dataclass(frozen=True)
class ConsumerImage:
    """Either the named mkosi image (``name``) or a direct kernel boot (``kernel``...)."""

    name: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""

    @property
    def is_named(self) -> bool:
        return self.name is not None

    def to_json(self) -> dict[str, Any] | str:
        if self.name is not None:
            return self.name
        return {"kernel": str(self.kernel),
                "initrd": None if self.initrd is None else str(self.initrd),
                "append": self.append}


@dataclass(frozen=True)
class Consumer:
    name: str
    image: ConsumerImage
    cpus: int
    memory_mib: int
    nics: tuple[Nic, ...]
    disks: tuple[Disk, ...]
    where: Location
    #: The host it runs on (see :attr:`Appliance.host`).
    host: str | None = None
    #: MTU of each NIC (by index) on a switch with tunnels: the underlay's minus the
    #: VXLAN overhead, so nothing it sends is too large for a tunnel. Absent: the default.
    nic_mtus: Mapping[int, int] = field(default_factory=dict, hash=False)
    #: virtio-fs mounts, each a link to an fs appliance's export.
    fs: tuple[FsMount, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nic_mtus", MappingProxyType(dict(self.nic_mtus)))

    @property
    def role(self) -> Role:
        return Role.CONSUMER

    @property
    def links(self) -> tuple[Nic | Disk | FsMount, ...]:
        return (*self.nics, *self.disks, *self.fs)

    @property
    def switches(self) -> frozenset[str]:
        return frozenset(n.switch for n in self.nics)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "image": self.image.to_json(),
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "nics": [n.to_json() for n in self.nics],
            "disks": [d.to_json() for d in self.disks],
            "fs": [f.to_json() for f in self.fs],
            "host": self.host,
            "nic_mtus": {str(i): m for i, m in self.nic_mtus.items()},
        }


@dataclass(frozen=True)
class Check:
    kind: CheckKind
    #: The check's fields by their YAML names, defaults filled in (sizes in bytes); read-only.
    params: Mapping[str, Any] = field(hash=False)
    where: Location

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def describe(self) -> str:
        return self.kind.describe(self.params)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "describe": self.describe(), **dict(self.params)}


Node = Appliance | Consumer


@dataclass(frozen=True)
class Topology:
    name: str
    source: Path
    options: Options
    appliances: tuple[Appliance, ...]
    consumers: tuple[Consumer, ...]
    checks: tuple[Check, ...]
    #: ``hosts:`` in file order; empty: everything runs on this machine.
    hosts: tuple[Host, ...] = ()
    #: The host this topology was cut down to (:meth:`slice`); None: the whole lab.
    sliced_for: str | None = None

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (*self.appliances, *self.consumers)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none: the topology has no hosts:"
        raise KeyError(f"lab {self.name} has no host {name!r} (hosts: {known})")

    def nodes_on(self, host: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.host == host)

    def slice(self, host: str) -> Topology:
        """The part of the lab that runs on ``host``: its nodes, and the checks that
        name only them (a check across hosts runs from the fleet, not from one host)."""
        self.host(host)
        names = {n.name for n in self.nodes_on(host)}
        checks = tuple(c for c in self.checks
                       if {str(c.params[f]).split("/")[0] for f in c.kind.references} <= names)
        return replace(self, appliances=tuple(a for a in self.appliances if a.host == host),
                       consumers=tuple(c for c in self.consumers if c.host == host),
                       checks=checks, sliced_for=host)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"lab {self.name} has no node {name!r}")

    def appliance(self, name: str) -> Appliance:
        for a in self.appliances:
            if a.name == name:
                return a
        raise KeyError(f"lab {self.name} has no appliance {name!r}")

    def consumer(self, name: str) -> Consumer:
        for c in self.consumers:
            if c.name == name:
                return c
        raise KeyError(f"lab {self.name} has no consumer {name!r}")

    def links_of(self, appliance_name: str) -> list[tuple[Consumer, Nic | Disk | FsMount]]:
        """Every link served by that appliance: consumers in file order, then link index."""
        self.appliance(appliance_name)
        return [(c, link) for c in self.consumers for link in c.links
                if link.appliance == appliance_name]

    def to_json(self) -> dict[str, Any]:
        """The resolved topology as JSON-serialisable data."""
        return {
            "name": self.name,
            "source": str(self.source),
            "options": self.options.to_json(),
            "appliances": [a.to_json() for a in self.appliances],
            "consumers": [c.to_json() for c in self.consumers],
            "checks": [c.to_json() for c in self.checks],
            "hosts": [h.to_json() for h in self.hosts],
            "sliced_for": self.sliced_for,
        }
