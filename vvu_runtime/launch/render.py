"""QEMU command lines rendered from the jinja2 templates in ``qemu/``.

Logic stays here; the templates only lay out arguments. A template renders
one argument group per line; each line is split with :func:`shlex.split`, so
every value goes through the ``q`` filter (shell quoting) and, inside a QEMU
option list, through ``opt`` (QEMU's ``,,`` escaping of commas).

The public entry points are :func:`render_vm` (a whole VM from a
:class:`VmConfig`) and :func:`render_devices` (the argument groups of single
devices, for callers that add devices to a :class:`~vvu_runtime.launch.machine.QemuMachine`).

Errors: :class:`RenderError` (a template is missing or uses an unknown name).
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from vvu_runtime.errors import VvuError
from vvu_runtime.launch.accel import Accelerator

__all__ = [
    "BlkDevice",
    "Credential",
    "DataDisk",
    "Device",
    "FsDevice",
    "NetDevice",
    "NoMigrate",
    "RenderError",
    "Rng",
    "RootDisk",
    "ScsiDevice",
    "SshForward",
    "UnderlayNic",
    "Viommu",
    "VmConfig",
    "VvuFunctionDevice",
    "render_devices",
    "render_machine",
    "render_vm",
    "template_dir",
]

#: Credential names systemd accepts (and nothing QEMU's -smbios would misread).
_CRED_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


class RenderError(VvuError):
    """A QEMU configuration could not be rendered from the templates."""


def template_dir() -> Path:
    """``qemu/`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "qemu"


def _qemu_opt(value: object) -> str:
    # A comma inside a QEMU option value is written twice.
    return str(value).replace(",", ",,")


@functools.cache
def _environment() -> jinja2.Environment:
    root = template_dir()
    if not root.is_dir():
        raise RenderError(f"no QEMU templates at {root}: vvu-launch runs from a checkout")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["opt"] = _qemu_opt
    return env


def _render_lines(template: str, context: dict[str, Any]) -> list[str]:
    try:
        text = _environment().get_template(template).render(**context)
    except jinja2.TemplateNotFound as e:
        raise RenderError(f"QEMU template {e.name!r} not found in {template_dir()}") from e
    except jinja2.UndefinedError as e:
        raise RenderError(f"QEMU template {template}: {e.message}") from e
    argv: list[str] = []
    for line in text.splitlines():
        argv += shlex.split(line)
    return argv


# --------------------------------------------------------------------------
# What a VM is made of
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RootDisk:
    path: Path
    format: str = "raw"
    #: Writes go to a throwaway overlay; the image stays as built.
    snapshot: bool = True


@dataclass(frozen=True)
class Credential:
    """A systemd credential passed as SMBIOS type 11."""

    name: str
    value: str

    def __post_init__(self) -> None:
        if not _CRED_NAME.fullmatch(self.name):
            raise RenderError(f"credential name {self.name!r}: use letters, digits, '.', '_', "
                              "'@', '-'")

    @property
    def b64(self) -> str:
        return base64.b64encode(self.value.encode()).decode()


@dataclass(frozen=True)
class SshForward:
    """User-mode management NIC with the guest's port 22 on ``host:port``."""

    port: int
    mac: str = "52:54:00:00:00:01"
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class UnderlayNic:
    """A switch appliance's NIC on the host network (``qemu/underlay.j2``): user-mode
    networking with the host's UDP ``port`` forwarded to the guest's VXLAN socket."""

    port: int
    mac: str
    #: The host address the forward listens on (all of them by default).
    bind: str = "0.0.0.0"
    net: str = "10.0.3.0/24"
    gateway: str = "10.0.3.2"
    guest_address: str = "10.0.3.15"
    guest_port: int = 4789


@dataclass(frozen=True)
class NetDevice:
    """virtio-net on a vhost-user socket (``-netdev vhost-user``)."""

    id: str
    socket: Path
    mac: str | None = None
    #: 0: no reconnect (QEMU gives up when the back end goes away).
    reconnect_ms: int = 1000
    queues: int = 1


@dataclass(frozen=True)
class BlkDevice:
    """vhost-user-blk-pci on a vhost-user socket."""

    id: str
    socket: Path
    #: 0: no reconnect.
    reconnect_ms: int = 1000
    queues: int = 1
    packed: bool = False


@dataclass(frozen=True)
class FsDevice:
    """vhost-user-fs-pci (virtio-fs) on a vhost-user socket, mounted by its ``tag``.

    No reconnect: QEMU's vhost-user-fs has no reconnect support (no chardev event
    handler, unlike vhost-user-blk and -net), and its realize talks to the back
    end at once, so the socket must be connected when QEMU starts (a chardev with
    reconnect-ms connects later, in the main loop, and realize would fail).
    """

    id: str
    socket: Path
    tag: str
    queue_size: int = 128


@dataclass(frozen=True)
class ScsiDevice:
    """vhost-user-scsi-pci on a vhost-user socket (a virtio-scsi controller)."""

    id: str
    socket: Path
    #: 0: no reconnect.
    reconnect_ms: int = 1000
    #: Request queues; QEMU refuses a back end offering fewer.
    queues: int = 1


@dataclass(frozen=True)
class VvuFunctionDevice:
    """A vfio-user-pci device (a VVU function of vvu-devd) on root port ``index``."""

    index: int
    socket: Path
    id: str = ""

    @property
    def json(self) -> str:
        device = {
            "driver": "vfio-user-pci",
            "id": self.id or f"vvu{self.index}",
            "bus": f"vvu-rp{self.index}",
            "socket": {"type": "unix", "path": str(self.socket)},
        }
        return json.dumps(device, separators=(",", ":"))


@dataclass(frozen=True)
class DataDisk:
    """A raw disk image the guest finds as ``/dev/disk/by-id/virtio-SERIAL``."""

    id: str
    path: Path
    serial: str
    readonly: bool = False


@dataclass(frozen=True)
class Viommu:
    """The virtual Intel IOMMU (must come before every PCI device)."""


@dataclass(frozen=True)
class Rng:
    """virtio-rng from the host's /dev/urandom."""


@dataclass(frozen=True)
class DoorbellCompanion:
    """The ivshmem-doorbell served by the appliance's vvu-devd (``--doorbell-socket``):
    calls bypass vvu-devd (``qemu/doorbell-companion.j2``, docs/vvu-abi.md)."""

    socket: Path
    #: vvu-devd's ``--max-queues`` + 1 (one vector per queue's call, and its fence).
    vectors: int


@dataclass(frozen=True)
class NoMigrate:
    """The device that makes QEMU refuse to migrate the VM (``qemu/no-migrate.j2``)."""


@dataclass
class VmConfig:
    """Everything :func:`render_vm` needs for one VM (see ``qemu/*.j2``)."""

    name: str
    accel: Accelerator
    memory_mib: int
    cpus: int = 1
    #: Guest RAM as a shared file (vhost-user needs one; a consumer's is also its VVU
    #: device's BAR2); None: private, or a memfd (``memfd``).
    memory_file: Path | None = None
    #: Guest RAM as a shared memfd, sealed against resizing (QEMU's default): what
    #: vvu-devd requires of the memory an appliance DMA_MAPs (docs/vvu-abi.md).
    memfd: bool = False
    qmp_socket: Path | None = None
    console_socket: Path | None = None
    console_log: Path | None = None
    #: True: QEMU listens on the QMP/console sockets; False: it connects to ours.
    sockets_server: bool = True
    pidfile: Path | None = None
    no_reboot: bool = True
    exit_with_parent: bool = True
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    root_disk: RootDisk | None = None
    viommu: bool = False
    rng: bool = True
    credentials: Sequence[Credential] = ()
    ssh: SshForward | None = None
    #: The underlay NIC of a switch appliance with tunnels.
    underlay: UnderlayNic | None = None
    nets: Sequence[NetDevice] = ()
    blks: Sequence[BlkDevice] = ()
    fss: Sequence[FsDevice] = ()
    scsis: Sequence[ScsiDevice] = ()
    vvu_functions: Sequence[VvuFunctionDevice] = ()
    doorbell: DoorbellCompanion | None = None
    data_disks: Sequence[DataDisk] = ()
    extra_args: Sequence[str] = field(default_factory=list)
    machine_type: str = "q35"

    @property
    def machine(self) -> str:
        machine = self.machine_type
        if self.viommu and self.accel is Accelerator.KVM:
            machine += ",kernel-irqchip=split"  # interrupt remapping of the vIOMMU
        return machine

    def context(self) -> dict[str, Any]:
        if self.qmp_socket is None:
            raise RenderError(f"VM {self.name}: no QMP socket")
        if self.memfd and self.memory_file is not None:
            raise RenderError(f"VM {self.name}: guest RAM is either a memfd or the file "
                              f"{self.memory_file}, not both")
        return {
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "machine": self.machine,
            "accel_args": self.accel.qemu_args(),
            "append": f"console=ttyS0 panic=-1 {self.append}".strip(),
        }


def render_vm(template: str, vm: VmConfig) -> list[str]:
    """The argv of one VM from ``qemu/TEMPLATE`` (``appliance.j2``, ``consumer.j2``)."""
    return _render_lines(template, vm.context())


Device = (NetDevice | BlkDevice | ScsiDevice | FsDevice | VvuFunctionDevice | DataDisk
          | Credential | SshForward | RootDisk | Viommu | Rng | NoMigrate | DoorbellCompanion
          | UnderlayNic)


def render_devices(*devices: Device) -> list[str]:
    """The QEMU arguments of single devices, from their own templates."""
    argv: list[str] = []
    for dev in devices:
        match dev:
            case Viommu():
                argv += _render_lines("viommu.j2", {})
            case Rng():
                argv += _render_lines("rng.j2", {})
            case NoMigrate():
                argv += _render_lines("no-migrate.j2", {})
            case DoorbellCompanion():
                argv += _render_lines("doorbell-companion.j2", {"doorbell": dev})
            case NetDevice():
                argv += _render_lines("net-vhost-user.j2", {"net": dev})
            case BlkDevice():
                argv += _render_lines("blk-vhost-user.j2", {"blk": dev})
            case ScsiDevice():
                argv += _render_lines("scsi-vhost-user.j2", {"scsi": dev})
            case FsDevice():
                argv += _render_lines("fs-vhost-user.j2", {"fs": dev})
            case VvuFunctionDevice():
                argv += _render_lines("vvu-function.j2", {"fn": dev})
            case DataDisk():
                argv += _render_lines("data-disk.j2", {"disk": dev})
            case Credential():
                argv += _render_lines("credential.j2", {"cred": dev})
            case SshForward():
                argv += _render_lines("ssh-forward.j2", {"ssh": dev})
            case UnderlayNic():
                argv += _render_lines("underlay.j2", {"underlay": dev})
            case RootDisk():
                argv += _render_lines("root-disk.j2", {"root_disk": dev})
    return argv


def render_machine(*, name: str, accel: Accelerator, memory_mib: int, cpus: int,
                   memory_file: Path | None, machine: str, qmp_socket: Path,
                   console_socket: Path | None, pidfile: Path, kernel: Path | None,
                   initrd: Path | None, append: str, memfd: bool = False) -> list[str]:
    """The machine of ``qemu/base.j2`` alone, QEMU connecting to the caller's sockets
    (:class:`~vvu_runtime.launch.machine.QemuMachine`; devices are added after it)."""
    vm = VmConfig(name=name, accel=accel, memory_mib=memory_mib, cpus=cpus,
                  memory_file=memory_file, memfd=memfd, qmp_socket=qmp_socket,
                  console_socket=console_socket,
                  sockets_server=False, pidfile=pidfile, kernel=kernel, initrd=initrd,
                  append=append, machine_type=machine)
    return _render_lines("base.j2", vm.context())
