"""A lab: where it lives, what it is made of, and its recorded state.

A lab is what ``vvu-launch up`` makes of a topology. Everything it creates is
under two directories, both recorded in its state so that ``down`` needs
nothing else (not the topology file, which may have changed since):

* the **lab directory** (default ``$VVU_STATE_DIR/labs/NAME``, ``VVU_STATE_DIR``
  defaulting to ``/var/lib/vvu`` for root): persistent things. ``topology.yaml``
  (the file as it was brought up), ``topology.json`` (resolved, with every
  path, port and command line), ``state.json`` (the supervisor's view of every
  component, rewritten atomically), the per-lab SSH key pair, ``ssh_config``,
  ``inventory.yml`` (Ansible), ``testinfra-hosts`` (pytest-testinfra host specs),
  ``logs/`` and ``disks/`` (the storage appliances' data disks, which survive
  ``down`` so data survives a ``down``/``up``; ``down --cleanup`` removes all);
* the **runtime directory** (``/run/vvu/NAME``): sockets and pid files, short
  paths (UNIX socket paths are limited to 107 bytes); gone after ``down``.

Consumers' RAM files live in ``/dev/shm`` (``vvu-lab-NAME-NODE.ram``): each is
the consumer's guest RAM, shown by every vvu-devd that serves one of its links
as the VVU function's BAR2 (DESIGN decision 2).

:func:`plan_lab` turns a :class:`~vvu_runtime.launch.topology.Topology` into a
:class:`LabPlan`: every command line (rendered from ``qemu/``), credential,
file and port, without starting or creating anything (``vvu-launch render``
prints it).

Errors: :class:`LabError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vvu_runtime.device.vvu import DEFAULT_MAX_QUEUES
from vvu_runtime.errors import VvuError
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.ports import free_port
from vvu_runtime.launch.render import (
    BlkDevice,
    Credential,
    DataDisk,
    DoorbellCompanion,
    FsDevice,
    NetDevice,
    RenderError,
    RootDisk,
    ScsiDevice,
    SshForward,
    UnderlayNic,
    VmConfig,
    VvuFunctionDevice,
    render_vm,
)
from vvu_runtime.launch.topology import (
    Appliance,
    ApplianceAccess,
    ApplianceKind,
    DiskProtocol,
    Topology,
)

__all__ = [
    "ImageFiles",
    "LabError",
    "LabPaths",
    "LabPlan",
    "LinkPlan",
    "NodePlan",
    "default_state_dir",
    "plan_lab",
]

#: Prefix of every /dev/shm file a lab creates.
SHM_PREFIX = "vvu-lab-"
SHM_DIR = Path("/dev/shm")
RUN_ROOT = Path(os.environ.get("VVU_RUN_DIR", "/run/vvu"))
#: sun_path is 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
#: How long a consumer's QEMU waits between reconnects to its vhost-user socket.
RECONNECT_MS = 1000
#: virtio-blk serials are 20 bytes.
MAX_SERIAL = 20
#: The directory of an fs export's data disk that virtiofsd shares (not the file
#: system's root: its lost+found is not the consumer's business).
FS_SHARE_DIR = "share"
#: Where an fs appliance mounts its data disks (vvu_runtime.appliance.backend.data_mount).
APPLIANCE_DISKS = "/run/vvu/disks"


class LabError(VvuError):
    """A lab cannot be planned, started, found or stopped; the message says why."""


def default_state_dir() -> Path:
    """``$VVU_STATE_DIR``, else /var/lib/vvu for root, else ``$XDG_STATE_HOME/vvu``."""
    if env := os.environ.get("VVU_STATE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/vvu")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "vvu"


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LabPaths:
    """Every path of one lab (nothing is created by this class)."""

    name: str
    root: Path
    run: Path

    @classmethod
    def for_lab(cls, name: str, lab_dir: Path | None = None) -> LabPaths:
        root = (lab_dir or default_state_dir() / "labs" / name).absolute()
        return cls(name=name, root=root, run=RUN_ROOT / name)

    @classmethod
    def from_dir(cls, root: Path) -> LabPaths:
        """The paths of an existing lab, from its recorded state."""
        data = read_json(root / "topology.json", what="the lab's resolved topology")
        return cls(name=str(data["name"]), root=root.absolute(), run=Path(data["run_dir"]))

    # persistent
    @property
    def topology_yaml(self) -> Path:
        return self.root / "topology.yaml"

    @property
    def topology_json(self) -> Path:
        return self.root / "topology.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.yml"

    @property
    def testinfra_hosts(self) -> Path:
        return self.root / "testinfra-hosts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def console_log(self, node: str) -> Path:
        return self.logs / f"{node}.console.log"

    def qemu_log(self, node: str) -> Path:
        return self.logs / f"{node}.qemu.log"

    def devd_log(self, appliance: str) -> Path:
        return self.logs / f"{appliance}.devd.log"

    def data_disk(self, appliance: str, export: str) -> Path:
        return self.disks / f"{appliance}-{export}.raw"

    # runtime
    def ram_file(self, node: str) -> Path:
        return SHM_DIR / f"{SHM_PREFIX}{self.name}-{node}.ram"

    def vhost_socket(self, link: str) -> Path:
        return self.run / f"{link}.vu"

    def vfio_socket(self, link: str) -> Path:
        return self.run / f"{link}.vfio"

    def qmp_socket(self, node: str) -> Path:
        return self.run / f"{node}.qmp"

    def console_socket(self, node: str) -> Path:
        return self.run / f"{node}.console"

    def pidfile(self, node: str) -> Path:
        return self.run / f"{node}.pid"

    def devd_status(self, appliance: str) -> Path:
        return self.run / f"{appliance}.devd.json"

    def doorbell_socket(self, appliance: str) -> Path:
        return self.run / f"{appliance}.doorbell.sock"

    @property
    def supervisor_pidfile(self) -> Path:
        return self.run / "supervisor.pid"


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"{path}: not found ({what})") from None
    except (OSError, ValueError) as e:
        raise LabError(f"{path}: cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise LabError(f"{path}: {what} is not a JSON object")
    return data


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFiles:
    """A bootable image: raw disk + kernel + initrd + command line (or kernel + initrd only)."""

    kernel: Path
    initrd: Path
    cmdline: str = ""
    disk: Path | None = None


@dataclass(frozen=True)
class LinkPlan:
    """One consumer-appliance link: one VVU function, one vvu-devd device."""

    name: str
    kind: str  # "net" | "blk" | "scsi" | "fs"
    consumer: str
    appliance: str
    vhost_socket: Path
    vfio_socket: Path
    ram_file: Path
    #: The VVU function's max_vhost_queues (link_queues).
    queues: int = DEFAULT_MAX_QUEUES

    @property
    def devd_spec(self) -> str:
        return (f"{self.name}:{self.vhost_socket}:{self.vfio_socket}:{self.ram_file}:"
                f"{self.queues}")


def appliance_options(a: Appliance) -> dict[str, Any]:
    """The ``options`` of the appliance's config (appliance/config.py). A vswitch's
    engine is named only when it is not vvu-switch (configs of vvu-switch labs stay
    as they were); testpmd takes none of vvu-switch's options, so it gets none."""
    options = dict(a.options)
    if a.kind is ApplianceKind.VSWITCH:
        engine = options.pop("engine", "vvu-switch")
        if engine != "vvu-switch":
            return {"engine": engine}
    return options


def link_queues(kind: str, options: Mapping[str, Any]) -> int:
    """The vhost-user queues a link of this kind can use, given its appliance's options.

    Each is an MSI-X vector of the VVU function in the appliance (plus 3 of its own),
    and an x86 vCPU has room for about 200: at vvu-devd's default of 64, a
    1-vCPU appliance could take two links; sized to the link it takes tens.
    """
    if kind == "net":
        # An RX and a TX queue per pair; a topology sets no pairs: vvu-switch's one.
        return 2 * int(options.get("queues", 1))
    if kind == "blk":
        return int(options["queues"])
    if kind == "scsi":
        return 2 + int(options["queues"])   # control and event queues first
    if kind == "fs":
        return 2                            # hiprio and one request queue (QEMU's default)
    raise LabError(f"link kind {kind!r}: no queue count known")


@dataclass
class NodePlan:
    """One VM of the lab."""

    name: str
    role: str  # "appliance" | "consumer"
    kind: str  # vswitch | storage | consumer | initramfs
    argv: list[str]
    ssh_port: int | None
    qmp_socket: Path
    console_socket: Path
    pidfile: Path
    #: The guest-RAM file (consumers); None for a memfd (appliances).
    memory_file: Path | None
    memory_mib: int
    #: True: the serial console is a root shell (busybox initramfs); else SSH only.
    console_shell: bool = False
    links: list[str] = field(default_factory=list)
    #: vvu-devd (appliances with links): its argv and status file.
    devd_argv: list[str] = field(default_factory=list)
    devd_status: Path | None = None
    #: Addresses of the consumer's NICs by switch appliance.
    addresses: dict[str, str] = field(default_factory=dict)


@dataclass
class LabPlan:
    """Everything ``up`` will create and start, in start order."""

    topology: Topology
    paths: LabPaths
    accel: Accelerator
    accel_reason: str
    public_key: str
    appliances: list[NodePlan]
    consumers: list[NodePlan]
    links: list[LinkPlan]
    #: RAM files to create (sparse, MiB) and data disks (bytes; kept across down/up).
    ram_files: dict[Path, int]
    data_disks: dict[Path, int]

    @property
    def nodes(self) -> list[NodePlan]:
        return [*self.appliances, *self.consumers]

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"lab {self.paths.name} has no node {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.paths.name,
            "lab_dir": str(self.paths.root),
            "run_dir": str(self.paths.run),
            "source": str(self.topology.source),
            "accel": self.accel.value,
            "accel_reason": self.accel_reason,
            "topology": self.topology.to_json(),
            "host": self.topology.sliced_for,
            "nodes": [asdict(n) for n in self.nodes],
            "links": [asdict(link) for link in self.links],
            "ram_files": {str(k): v for k, v in self.ram_files.items()},
            "data_disks": {str(k): v for k, v in self.data_disks.items()},
        }

    def describe(self) -> str:
        """Every command line and file, for ``vvu-launch render``."""
        out = [f"# lab {self.paths.name}: {self.paths.root} (runtime {self.paths.run})",
               f"# accelerator: {self.accel.value} ({self.accel_reason})", ""]
        out.append("# guest RAM files (sparse; a consumer's is also the BAR2 of its VVU functions)")
        out += [f"truncate -s {mib}M {shlex.quote(str(p))}" for p, mib in self.ram_files.items()]
        if self.data_disks:
            out.append("\n# data disks of the storage and fs appliances (created once, kept)")
            out += [f"truncate -s {size} {shlex.quote(str(p))}"
                    for p, size in self.data_disks.items()]
        for n in self.appliances:
            if n.devd_argv:
                out.append(f"\n# vvu-devd of {n.name}")
                out.append(shlex.join(n.devd_argv))
        for n in self.nodes:
            out.append(f"\n# {n.role} {n.name} ({n.kind})")
            out.append(shlex.join(n.argv))
        return "\n".join(out) + "\n"


def _mac(*parts: str) -> str:
    """A stable, locally administered unicast MAC from the given names."""
    h = hashlib.sha256("/".join(parts).encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in h[:4])


def _serial(appliance: str, export: str) -> str:
    serial = export if len(export) <= MAX_SERIAL else ""
    if not serial:
        serial = "x" + hashlib.sha256(f"{appliance}/{export}".encode()).hexdigest()[:MAX_SERIAL - 1]
    return serial


def fs_export_dir(appliance: str, export: str) -> str:
    """The directory inside an fs appliance that its export ``export`` shares."""
    return f"{APPLIANCE_DISKS}/{_serial(appliance, export)}/{FS_SHARE_DIR}"


def _fstab(mounts: list[tuple[str, str]]) -> str:
    """fstab lines of a consumer's virtio-fs mounts (the credential ``fstab.extra``, read
    by systemd-fstab-generator). nofail: a consumer whose appliance is gone still boots."""
    return "".join(f"{tag} {mount} virtiofs defaults,nofail 0 0\n" for tag, mount in mounts)


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LabError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes: use a "
                       "shorter lab or node name (or VVU_RUN_DIR)")


def devd_program() -> list[str]:
    """vvu-devd of this installation (host side, outside the tools tree)."""
    return [sys.executable, "-m", "vvu_runtime.device.devd"]


def _network_credential(mac: str, address: str, mtu: int | None = None) -> str:
    text = f"[Match]\nMACAddress={mac}\n\n[Network]\nAddress={address}\nLinkLocalAddressing=no\n"
    if mtu is not None:
        # A NIC on a tunnelled network: nothing it sends may be too large for a tunnel.
        text += f"\n[Link]\nMTUBytes={mtu}\n"
    return text


def underlay_mtu(topology: Topology, a: Appliance) -> int:
    """The path MTU of a switch's tunnels: the smallest of its and its peers' hosts'."""
    hosts = {a.host, *(t.peer_host for t in a.tunnels)}
    return min(h.mtu for h in topology.hosts if h.name in hosts)


def _underlay_credential(nic: UnderlayNic, mtu: int, peers: list[str]) -> str:
    """systemd-networkd config of the underlay NIC: static, peers routed through it."""
    prefix = ipaddress.IPv4Network(nic.net).prefixlen
    text = (f"[Match]\nMACAddress={nic.mac}\n\n[Link]\nMTUBytes={mtu}\n\n[Network]\n"
            f"Address={nic.guest_address}/{prefix}\nLinkLocalAddressing=no\n")
    for peer in peers:
        # (A peer given by name goes by the default route: still out through the host.)
        with contextlib.suppress(ValueError):
            text += f"\n[Route]\nDestination={ipaddress.IPv4Address(peer)}/32\n" \
                    f"Gateway={nic.gateway}\n"
    return text


def tunnel_config(topology: Topology, a: Appliance,
                  underlay: UnderlayNic) -> dict[str, Any]:
    """The appliance config's ``tunnels`` and ``underlay`` (vvu_runtime/appliance/config.py)."""
    tunnels = []
    for t in a.tunnels:
        address = topology.host(t.peer_host or "").address
        if address is None:
            raise LabError(f"appliance {a.name}: the host {t.peer_host} of its tunnel peer "
                           f"{t.peer} has no address")
        tunnels.append({"name": t.peer, "remote": address, "port": t.peer_port, "vni": t.vni})
    return {"tunnels": tunnels,
            "underlay": {"address": underlay.guest_address, "port": underlay.guest_port,
                         "mtu": underlay_mtu(topology, a)}}


def plan_lab(
    topology: Topology,
    paths: LabPaths,
    *,
    accel: Accelerator,
    accel_reason: str,
    public_key: str,
    images: Mapping[str, ImageFiles],
    ports: Mapping[str, int] | None = None,
) -> LabPlan:
    """Resolve a topology into command lines, files and ports (creates nothing).

    ``images``: the image of each appliance kind and of ``consumer``;
    ``ports``: SSH ports to reuse (a restarted lab keeps its ports), else free ones.
    """
    ports = dict(ports or {})
    links: list[LinkPlan] = []
    ram_files: dict[Path, int] = {}
    data_disks: dict[Path, int] = {}
    consumer_links: dict[str, list[LinkPlan]] = {c.name: [] for c in topology.consumers}
    appliance_links: dict[str, list[tuple[LinkPlan, Any]]] = {
        a.name: [] for a in topology.appliances}

    options_of = {a.name: a.options for a in topology.appliances}
    for c in topology.consumers:
        ram_files[paths.ram_file(c.name)] = c.memory_mib
        for nic in c.nics:
            lk = LinkPlan(nic.link, "net", c.name, nic.switch, paths.vhost_socket(nic.link),
                          paths.vfio_socket(nic.link), paths.ram_file(c.name),
                          link_queues("net", options_of[nic.switch]))
            links.append(lk)
            consumer_links[c.name].append(lk)
            appliance_links[nic.switch].append((lk, nic))
        for disk in c.disks:
            lk = LinkPlan(disk.link, disk.protocol.value, c.name, disk.storage,
                          paths.vhost_socket(disk.link), paths.vfio_socket(disk.link),
                          paths.ram_file(c.name),
                          link_queues(disk.protocol.value, options_of[disk.storage]))
            links.append(lk)
            consumer_links[c.name].append(lk)
            appliance_links[disk.storage].append((lk, disk))
        for fs in c.fs:
            lk = LinkPlan(fs.link, "fs", c.name, fs.appliance, paths.vhost_socket(fs.link),
                          paths.vfio_socket(fs.link), paths.ram_file(c.name),
                          link_queues("fs", options_of[fs.appliance]))
            links.append(lk)
            consumer_links[c.name].append(lk)
            appliance_links[fs.appliance].append((lk, fs))
    for lk in links:
        if ":" in lk.name or ":" in str(lk.vhost_socket) or ":" in str(lk.ram_file):
            raise LabError(f"link {lk.name}: vvu-devd paths cannot contain ':'")
        _check_socket_path(lk.vhost_socket)
        _check_socket_path(lk.vfio_socket)

    cred_key = Credential("ssh.authorized_keys.root", public_key)

    def image_of(kind: str) -> ImageFiles:
        if kind not in images:
            raise LabError(f"no image for {kind!r}")
        return images[kind]

    def vm(name: str, memory_mib: int, cpus: int, image: ImageFiles, *, memfd: bool = False,
           **kw: Any) -> VmConfig:
        _check_socket_path(paths.qmp_socket(name))
        append = " ".join(w for w in image.cmdline.split() if w != "console=ttyS0")
        if image.disk is not None:
            # The node's name: the kernel command line beats the image's /etc/hostname.
            append = f"{append} systemd.hostname={name}".strip()
        return VmConfig(
            name=name, accel=accel, memory_mib=memory_mib, cpus=cpus,
            memory_file=None if memfd else paths.ram_file(name), memfd=memfd,
            qmp_socket=paths.qmp_socket(name),
            console_socket=paths.console_socket(name), console_log=paths.console_log(name),
            pidfile=paths.pidfile(name), kernel=image.kernel, initrd=image.initrd,
            append=append,
            root_disk=RootDisk(image.disk) if image.disk is not None else None, **kw)

    appliances: list[NodePlan] = []
    for a in topology.appliances:
        image = (ImageFiles(**{**asdict(image_of(a.kind.value)), "disk": a.image})
                 if a.image is not None else image_of(a.kind.value))
        port = ports.get(a.name) or free_port()
        own = appliance_links[a.name]
        config: dict[str, Any] = {"kind": a.kind.value, "options": appliance_options(a)}
        disks: list[DataDisk] = []
        serial_of: dict[str, str] = {}
        # One data disk per export (an fs appliance makes its file system on first boot).
        for i, ex in enumerate(a.exports):
            path = paths.data_disk(a.name, ex.name)
            data_disks[path] = ex.size
            serial_of[ex.name] = _serial(a.name, ex.name)
            disks.append(DataDisk(f"data{i}", path, serial_of[ex.name], ex.readonly))
        if a.kind is ApplianceKind.STORAGE:
            export_of = {ex.name: ex for ex in a.exports}
            config["exports"] = []
            for lk, d in own:
                ex = export_of[d.export]
                entry = {"name": lk.name, "disk": serial_of[d.export],
                         "readonly": ex.readonly, "protocol": ex.protocol.value}
                if ex.engine != "vvu-blk":  # only then: configs of vvu-blk labs stay as they were
                    entry["engine"] = ex.engine
                config["exports"].append(entry)
        elif a.kind is ApplianceKind.FS:
            config["exports"] = [{"name": lk.name, "disk": serial_of[m.export],
                                  "path": FS_SHARE_DIR} for lk, m in own]
        else:
            config["links"] = [{"name": lk.name} for lk, _ in own]
        underlay = None
        extra_creds: list[Credential] = []
        if a.tunnels:
            underlay = UnderlayNic(a.underlay_port, _mac(topology.name, a.name, "underlay"))
            config.update(tunnel_config(topology, a, underlay))
            extra_creds.append(Credential("network.network.50-vvu-underlay", _underlay_credential(
                underlay, config["underlay"]["mtu"], [t["remote"] for t in config["tunnels"]])))
        creds = [cred_key, Credential("vvu.appliance", json.dumps(config)), *extra_creds]
        if os.environ.get("VVU_DEBUG_CONSOLE"):
            creds.append(Credential("vvu.debug-console", "1"))
        functions = [VvuFunctionDevice(i, lk.vfio_socket, id=f"vvu{i}")
                     for i, (lk, _) in enumerate(own)]
        # An appliance's RAM is a sealed memfd: vvu-devd maps only memory that
        # cannot shrink under it (docs/vvu-abi.md "DMA").
        bypass = a.doorbell_bypass and bool(own)
        doorbell = paths.doorbell_socket(a.name)
        if bypass:
            _check_socket_path(doorbell)
        cfg = vm(a.name, a.memory_mib, a.cpus, image, memfd=True,
                 viommu=a.access is ApplianceAccess.VIOMMU, credentials=creds,
                 ssh=SshForward(port, mac=_mac(topology.name, a.name, "mgmt")),
                 underlay=underlay, vvu_functions=functions, data_disks=disks,
                 doorbell=DoorbellCompanion(doorbell, max(lk.queues for lk, _ in own) + 1)
                 if bypass else None)
        devd: list[str] = []
        if own:
            # Consumers start once the appliance is ready; a vvu-devd restarted
            # under them must refuse them until the appliance is back, not freeze them.
            devd = [*devd_program(), "--status-file", str(paths.devd_status(a.name)),
                    "--log-dir", str(paths.logs / f"{a.name}.devd"), "--refuse-while-down"]
            if bypass:
                devd += ["--doorbell-socket", str(doorbell)]
            for lk, _ in own:
                devd += ["--device", lk.devd_spec]
        try:
            argv = render_vm("appliance.j2", cfg)
        except RenderError as e:
            raise LabError(f"appliance {a.name}: {e}") from e
        appliances.append(NodePlan(
            name=a.name, role="appliance", kind=a.kind.value, argv=argv, ssh_port=port,
            qmp_socket=paths.qmp_socket(a.name), console_socket=paths.console_socket(a.name),
            pidfile=paths.pidfile(a.name), memory_file=None,
            memory_mib=a.memory_mib, links=[lk.name for lk, _ in own], devd_argv=devd,
            devd_status=paths.devd_status(a.name) if own else None))

    consumers: list[NodePlan] = []
    for c in topology.consumers:
        if c.image.kernel is not None:
            assert c.image.initrd is not None
            image = ImageFiles(kernel=c.image.kernel, initrd=c.image.initrd,
                               cmdline=c.image.append or "")
            kind = "initramfs"
        else:
            image = image_of(c.image.name or "consumer")
            kind = "consumer"
        port = ports.get(c.name) or free_port()
        nets = [NetDevice(f"net{n.index}", paths.vhost_socket(n.link), n.mac,
                          reconnect_ms=RECONNECT_MS) for n in c.nics]
        blks = [BlkDevice(f"blk{d.index}", paths.vhost_socket(d.link),
                          reconnect_ms=RECONNECT_MS)
                for d in c.disks if d.protocol is DiskProtocol.BLK]
        scsis = [ScsiDevice(f"scsi{d.index}", paths.vhost_socket(d.link),
                            reconnect_ms=RECONNECT_MS)
                 for d in c.disks if d.protocol is DiskProtocol.SCSI]
        fss = [FsDevice(f"fs{m.index}", paths.vhost_socket(m.link), m.tag) for m in c.fs]
        creds = [cred_key]
        if c.fs:
            creds.append(Credential("fstab.extra", _fstab([(m.tag, m.mount) for m in c.fs])))
        addresses: dict[str, str] = {}
        nic_config = []
        for n in c.nics:
            address = str(n.address)
            addresses[n.switch] = address
            nic_config.append({"mac": n.mac, "address": address})
            creds.append(Credential(f"network.network.50-vvu-nic{n.index}",
                                    _network_credential(n.mac, address,
                                                        c.nic_mtus.get(n.index))))
        if nic_config:
            creds.append(Credential("vvu.consumer-net", json.dumps(nic_config)))
        append = image.cmdline
        if kind == "initramfs" and c.nics:
            # The busybox /init configures one NIC from the command line.
            first = c.nics[0]
            append = f"{append} vvu.ip={ipaddress.IPv4Interface(first.address).with_prefixlen}"
            image = ImageFiles(image.kernel, image.initrd, append.strip(), image.disk)
        cfg = vm(c.name, c.memory_mib, c.cpus, image, credentials=creds,
                 ssh=SshForward(port, mac=_mac(topology.name, c.name, "mgmt"))
                 if kind == "consumer" else None,
                 nets=nets, blks=blks, scsis=scsis, fss=fss, no_reboot=False)
        try:
            argv = render_vm("consumer.j2", cfg)
        except RenderError as e:
            raise LabError(f"consumer {c.name}: {e}") from e
        consumers.append(NodePlan(
            name=c.name, role="consumer", kind=kind, argv=argv,
            ssh_port=port if kind == "consumer" else None,
            qmp_socket=paths.qmp_socket(c.name), console_socket=paths.console_socket(c.name),
            pidfile=paths.pidfile(c.name), memory_file=paths.ram_file(c.name),
            memory_mib=c.memory_mib, console_shell=kind == "initramfs",
            links=[lk.name for lk in consumer_links[c.name]], addresses=addresses))

    return LabPlan(topology=topology, paths=paths, accel=accel, accel_reason=accel_reason,
                   public_key=public_key, appliances=appliances, consumers=consumers,
                   links=links, ram_files=ram_files, data_disks=data_disks)


# --------------------------------------------------------------------------
# Files the lab hands to its users (ssh, Ansible, testinfra)
# --------------------------------------------------------------------------


def make_key(paths: LabPaths) -> str:
    """The lab's SSH key pair (made once per lab directory); returns the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = paths.key.with_suffix(".pub")
    if paths.key.is_file() and pub.is_file():
        return pub.read_text().strip()
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    text = f"{public.decode()} vvu-lab-{paths.name}"
    pub.write_text(text + "\n")
    return text


def ssh_alias(lab: str, node: str) -> str:
    return f"{node}.{lab}"


def write_access_files(plan: LabPlan) -> None:
    """ssh_config, inventory.yml and testinfra-hosts for the lab's SSH-reachable nodes."""
    paths = plan.paths
    reachable = [n for n in plan.nodes if n.ssh_port is not None]
    lines = []
    for n in reachable:
        lines += [
            f"Host {ssh_alias(paths.name, n.name)} {n.name}",
            "    HostName 127.0.0.1",
            f"    Port {n.ssh_port}",
            "    User root",
            f"    IdentityFile {paths.key}",
            "    IdentitiesOnly yes",
            # Host keys are made on every first boot; the port is the lab's.
            "    StrictHostKeyChecking no",
            "    UserKnownHostsFile /dev/null",
            "    LogLevel ERROR",
            "",
        ]
    paths.ssh_config.write_text("\n".join(lines))

    from ruamel.yaml import YAML

    groups: dict[str, dict[str, Any]] = {}
    for n in reachable:
        for group in (f"{n.role}s", n.kind):
            groups.setdefault(group, {"hosts": {}})["hosts"][n.name] = None
    hostvars = {
        n.name: {
            "ansible_host": "127.0.0.1",
            "ansible_port": n.ssh_port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(paths.key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                       "-o UserKnownHostsFile=/dev/null",
            "vvu_role": n.role,
            "vvu_kind": n.kind,
        }
        for n in reachable
    }
    inventory = {"all": {"vars": {"vvu_lab": paths.name}, "hosts": hostvars,
                         "children": groups}}
    yaml = YAML()
    yaml.default_flow_style = False
    with paths.inventory.open("w") as f:
        f.write(f"# Ansible inventory of vvu lab {paths.name} (written by vvu-launch up)\n")
        yaml.dump(inventory, f)
    paths.testinfra_hosts.write_text("".join(
        f"paramiko://{n.name}?ssh_config={paths.ssh_config}\n" for n in reachable))


@contextlib.contextmanager
def lab_lock(paths: LabPaths) -> Iterator[None]:
    """One up/down at a time per lab (fcntl lock on the lab directory's .lock)."""
    import fcntl

    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError(f"lab {paths.name} is busy: another vvu-launch holds "
                           f"{paths.lock}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def now() -> float:
    return time.time()
