"""The topology file's schema: one table of fields, and what is generated from it.

Every field of ``topology.yaml`` is one :class:`~.spec.Field` below (name,
type, default, help, the appliance kinds that take it, whether ``defaults:``
may set it). The loader, its error messages, :func:`json_schema` (for editors)
and :func:`schema_text` (``vvu-launch schema``) all read this table; nothing
else in the package knows a field by heart except the cross-reference checks
of ``loader.py``.
"""

from __future__ import annotations

from typing import Any

from vvu_runtime.appliance.config import ENGINES, SWITCH_ENGINES
from vvu_runtime.launch.topology.model import (
    Accel,
    ApplianceAccess,
    ApplianceKind,
    CheckKind,
    DiskProtocol,
)
from vvu_runtime.launch.topology.spec import (
    REQUIRED,
    Field,
    ListType,
    MapType,
    ObjectSpec,
    ObjectType,
    Shorthand,
    Tagged,
)
from vvu_runtime.launch.topology.types import (
    EXPORT_PATTERN,
    GIB,
    HOSTNAME_PATTERN,
    INVENTORY_HOST_PATTERN,
    KIB,
    MIB,
    NAME_PATTERN,
    TIB,
    USER_PATTERN,
    Alternatives,
    BoolType,
    ChoiceType,
    InterfaceType,
    IntType,
    MacType,
    NetworkType,
    Nullable,
    NumberType,
    PathType,
    RegexType,
    SizeType,
    StrType,
)

__all__ = [
    "APPLIANCE",
    "CHECKS",
    "CONSUMER",
    "DISK",
    "EXPORT",
    "FS_EXPORT",
    "FS_MOUNT",
    "HOST",
    "MAX_CPUS",
    "MAX_DISKS",
    "MAX_LINKS_PER_APPLIANCE",
    "MAX_NICS",
    "NIC",
    "OPTIONS",
    "TOPOLOGY",
    "TUNNEL",
    "json_schema",
    "schema_text",
]

MAX_CPUS = 16
MAX_NICS = 8
MAX_DISKS = 8
MAX_FS = 8
#: virtio-fs tags are at most 36 bytes (struct virtio_fs_config).
MAX_TAG = 36
MAX_EXPORTS = 32
#: Each link is one VVU function on its own root port in the appliance.
MAX_LINKS_PER_APPLIANCE = 32
MAX_CHECKS = 128
#: Default subnets: 10.77.N.0/24 for the N-th vswitch appliance.
DEFAULT_SUBNET = "10.77.{index}.0/24"
#: Default addresses: host number (index of the NIC on its network) + this.
ADDRESS_OFFSET = 10
#: The IANA VXLAN port: the default UDP port of a switch's tunnel endpoint on its host.
VXLAN_PORT = 4789
MAX_TUNNELS = 32

VSWITCH = frozenset({ApplianceKind.VSWITCH})
STORAGE = frozenset({ApplianceKind.STORAGE})
FS = frozenset({ApplianceKind.FS})

NAME = StrType("a name: lower-case letters, digits and '-', starting with a letter, "
               "at most 31 characters (it becomes a host name)", NAME_PATTERN)
EXPORT_NAME = StrType("an export name: letters, digits, '_', '.', '-', at most 63 characters",
                      EXPORT_PATTERN)
DISK_REF_PATTERN = NAME_PATTERN[:-1] + "/" + EXPORT_PATTERN[1:]
#: An fs export's name is also the consumer's virtio-fs tag (at most 36 bytes).
FS_EXPORT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,35}$"
FS_EXPORT_NAME = StrType("an fs export name: letters, digits, '_', '.', '-', at most 36 "
                         "characters (it is the consumer's virtio-fs tag)", FS_EXPORT_PATTERN)
FS_REF_PATTERN = NAME_PATTERN[:-1] + "/" + FS_EXPORT_PATTERN[1:]


def _cpus() -> Field:
    return Field("cpus", IntType(1, MAX_CPUS), "virtual CPUs", default=1, inherit=True)


# ------------------------------------------------------------------ options

OPTIONS = ObjectSpec("options", "options", "Lab-wide options.", (
    Field("accel", ChoiceType.of(Accel), "accelerator: auto uses KVM when it can run a stock "
          "guest and TCG otherwise; kvm or tcg force one", default="auto"),
    Field("lab_dir", Nullable(PathType("a directory", forbid=":")),
          "the lab directory (state, sockets, RAM files, inventory, logs)", default=None,
          default_doc="<state dir>/labs/NAME"),
    Field("boot_timeout", NumberType(1, 3600, "seconds"),
          "seconds a node may take from start to ready", default=300),
))

# ------------------------------------------------------------------ hosts (placement)

HOST_NAME = StrType("the name of a host in hosts:", NAME_PATTERN)

HOST = ObjectSpec(
    "host", "hosts.NAME", "A machine that runs a slice of the lab (`vvu-launch up --host NAME` "
    "there). VVU links never cross hosts; switch tunnels do.", (
        Field("address", Nullable(StrType("a host name or IP address", HOSTNAME_PATTERN)),
              "where SSH (Ansible) reaches the host, and where the other hosts' tunnels send "
              "to", default=None, default_doc="from the inventory entry (then no tunnels)"),
        Field("user", StrType("a user name", USER_PATTERN), "the SSH user", default="root"),
        Field("key", Nullable(PathType("an SSH private key")), "the SSH private key",
              default=None, default_doc="the SSH client's default"),
        Field("inventory", Nullable(StrType("an Ansible inventory host name",
                                            INVENTORY_HOST_PATTERN)),
              "take address, user and key from this host of the operator's Ansible inventory "
              "instead", default=None),
        Field("mtu", IntType(1280, 9216), "the MTU of the host network tunnels cross; a "
              "tunnelled frame is at most this minus the 50 bytes of VXLAN over IPv4",
              default=1500),
    ))

# ------------------------------------------------------------------ appliances

TUNNEL = ObjectSpec(
    "tunnel", "appliances.NAME.tunnels[] (vswitch)", "A VXLAN tunnel to a vswitch appliance on "
    "another host: both switches become one L2 network (declare it on either side).", (
        Field("peer", StrType("the name of a vswitch appliance on another host", NAME_PATTERN),
              "the switch at the other end", default=REQUIRED),
        Field("vni", IntType(1, (1 << 24) - 1), "the VXLAN network identifier: one per "
              "network (every tunnel of a network has the same)", default=REQUIRED),
    ))

VSWITCH_OPTIONS = ObjectSpec(
    "vswitch-options", "appliances.NAME.options (vswitch)", "Backend options of a vswitch.", (
        Field("busy_poll_us", IntType(0, 1_000_000), "after a busy batch, poll the rings this "
              "many microseconds before sleeping (vvu-switch --busy-poll); 0: never",
              default=0),
        Field("engine", ChoiceType(SWITCH_ENGINES), "what forwards the frames: vvu-switch "
              "(ours: a learning switch, any number of ports, tunnels) or testpmd (DPDK "
              "testpmd behind vvu-proxy, docs/vvu-proxy.md: io forward between exactly 2 "
              "consumer NICs; at least 2 cpus (default 2) and 512M of memory; no tunnels, "
              "no busy_poll_us)", default="vvu-switch"),
    ))

STORAGE_OPTIONS = ObjectSpec(
    "storage-options", "appliances.NAME.options (storage)", "Backend options of a storage "
    "appliance.", (
        Field("direct", BoolType(), "open the export disks O_DIRECT (vvu-blk --direct; engine "
              "qsd: its export writes through instead): a "
              "completed write is then on the host when the consumer sees it. false keeps "
              "completed writes in the appliance's page cache until the consumer flushes, and "
              "an appliance restart under a running consumer (vvu-devd died, the VM crashed) "
              "loses them although the consumer's next flush succeeds", default=True),
        Field("queues", IntType(1, 16), "request queues offered to each consumer "
              "(vvu-blk --queues)", default=1),
        Field("busy_poll_us", IntType(0, 1_000_000), "after serving requests, poll the "
              "ring this many microseconds with the consumer's kicks off (vvu-blk "
              "--busy-poll): a next request within the window costs no kick, no vvu-devd "
              "relay and no wakeup, for a CPU spinning that long; vvu-blk exports only "
              "(scsi and qsd exports do not poll); 0: never", default=0),
    ))

EXPORT = ObjectSpec("export", "appliances.NAME.exports[]", "A disk a storage appliance offers; "
                    "one consumer disk may use it.", (
    Field("name", EXPORT_NAME, "the export's name (consumers say STORAGE/NAME)",
          default=REQUIRED),
    Field("size", SizeType(MIB, TIB, unit=1), "the disk's size (bare integers are MiB)",
          default=REQUIRED),
    Field("readonly", BoolType(), "offer the disk read-only", default=False),
    Field("engine", ChoiceType(ENGINES), "what serves the disk in the appliance: vvu-blk "
          "(ours) or qsd (qemu-storage-daemon behind vvu-proxy, docs/vvu-proxy.md)",
          default="vvu-blk"),
    Field("protocol", ChoiceType.of(DiskProtocol), "how the consumer sees the disk: blk "
          "(vhost-user-blk-pci, served by vvu-blk) or scsi (vhost-user-scsi-pci, served by "
          "vvu-scsi: the disk is LUN 0 of its own controller)", default="blk"),
))

FS_OPTIONS = ObjectSpec(
    "fs-options", "appliances.NAME.options (fs)", "virtiofsd options of an fs appliance.", (
        Field("cache", ChoiceType(["auto", "always", "never", "metadata"]), "virtiofsd "
              "--cache: how long the consumer's kernel may cache what it read (never: every "
              "access asks the appliance; changes made in the appliance show at once)",
              default="auto"),
    ))

FS_EXPORT = ObjectSpec("fs-export", "appliances.NAME.exports[] (fs)", "A directory an fs "
                       "appliance shares through virtio-fs (stock virtiofsd behind vvu-proxy): "
                       "the file system of its own data disk; one consumer mounts it.", (
    Field("name", FS_EXPORT_NAME, "the export's name (consumers say FS/NAME; also the tag "
          "they mount)", default=REQUIRED),
    Field("size", SizeType(16 * MIB, TIB, unit=1), "the size of the data disk whose file "
          "system is shared (bare integers are MiB)", default=REQUIRED),
))

APPLIANCE = ObjectSpec(
    "appliance", "appliances.NAME",
    "An appliance VM: serves its consumers' links from inside the VM, through VVU.", (
        Field("kind", ChoiceType.of(ApplianceKind), "what the appliance serves",
              default=REQUIRED),
        Field("image", Nullable(PathType("a raw disk image")), "the boot image", default=None,
              default_doc="the built image of the kind", inherit=True),
        _cpus(),
        Field("memory", SizeType(256 * MIB, 16 * GIB, unit=MIB),
              "RAM (bare integers are MiB)", default="1G", inherit=True),
        Field("access", ChoiceType.of(ApplianceAccess), "how the appliance drives its VVU "
              "functions: viommu (vfio-pci behind a virtual IOMMU, interrupts) or poll "
              "(poll-mode driver, no vIOMMU)", default="viommu", inherit=True),
        Field("doorbell_bypass", BoolType(), "ring the consumers' calls through an "
              "ivshmem-doorbell served by vvu-devd instead of trapped VVU doorbells "
              "(docs/vvu-abi.md, 'Doorbell bypass')", default=False, inherit=True),
        Field("subnet", Nullable(NetworkType()), "the switch segment's IPv4 subnet; consumer "
              "addresses are taken from it (switches joined by tunnels share one)", default=None,
              default_doc=DEFAULT_SUBNET.format(index="N") + " (N: index among vswitches)",
              kinds=VSWITCH),
        Field("host", Nullable(HOST_NAME), "the host the appliance runs on (a name in "
              "hosts:)", default=None, default_doc="required when hosts: is given"),
        Field("tunnels", ListType(ObjectType(TUNNEL), MAX_TUNNELS, "tunnels"),
              "VXLAN tunnels to switches on other hosts", default=[], default_doc="none",
              kinds=VSWITCH),
        Field("underlay_port", IntType(1, 65535), "the UDP port on its host where the "
              "switch's tunnels arrive (forwarded to the appliance's underlay NIC)",
              default=VXLAN_PORT, kinds=VSWITCH),
        Field("exports", ListType(ObjectType(EXPORT), MAX_EXPORTS, "exports"),
              "the disks offered", default=[], default_doc="none", kinds=STORAGE),
        Field("exports", ListType(ObjectType(FS_EXPORT), MAX_EXPORTS, "exports"),
              "the directories shared", default=[], default_doc="none", kinds=FS),
        Field("options", ObjectType(VSWITCH_OPTIONS), "backend options", default={},
              kinds=VSWITCH, inherit=True),
        Field("options", ObjectType(STORAGE_OPTIONS), "backend options", default={},
              kinds=STORAGE, inherit=True),
        Field("options", ObjectType(FS_OPTIONS), "backend options", default={},
              kinds=FS, inherit=True),
    ), discriminator="kind")

# ------------------------------------------------------------------ consumers


def _split_nic(text: str) -> dict[str, str] | None:
    return {"switch": text}


def _split_disk(text: str) -> dict[str, str] | None:
    parts = text.split("/")
    return {"storage": parts[0], "export": parts[1]} if len(parts) == 2 else None


NIC = ObjectSpec("nic", "consumers.NAME.nics[]", "A virtio-net device: one VVU link to a "
                 'vswitch appliance. Shorthand: the switch\'s name ("- sw1").', (
    Field("switch", StrType("the name of a vswitch appliance", NAME_PATTERN),
          "the vswitch appliance", default=REQUIRED),
    Field("mac", Nullable(MacType()), "the MAC address", default=None,
          default_doc="derived from lab, consumer and index (locally administered, unique)"),
    Field("address", Nullable(InterfaceType()), "the IPv4 address; inside the switch's subnet "
          "(a bare address takes the subnet's prefix length)", default=None,
          default_doc=f"subnet host <index on the switch> + {ADDRESS_OFFSET}"),
))

DISK = ObjectSpec("disk", "consumers.NAME.disks[]", "A virtio-blk (or, for a scsi export, "
                  "virtio-scsi) device: one VVU link to an export of a storage appliance. "
                  'Shorthand: "- STORAGE/EXPORT".', (
    Field("storage", StrType("the name of a storage appliance", NAME_PATTERN),
          "the storage appliance", default=REQUIRED),
    Field("export", EXPORT_NAME, "the export (each export serves one disk)", default=REQUIRED),
))

def _split_fs(text: str) -> dict[str, str] | None:
    parts = text.split("/")
    return {"appliance": parts[0], "export": parts[1]} if len(parts) == 2 else None


FS_MOUNT = ObjectSpec("fs-mount", "consumers.NAME.fs[]", "A virtio-fs device "
                      "(vhost-user-fs-pci): one VVU link to an export of an fs appliance, "
                      "mounted by the consumer at boot. Shorthand: \"- FS/EXPORT\".", (
    Field("appliance", StrType("the name of an fs appliance", NAME_PATTERN),
          "the fs appliance", default=REQUIRED),
    Field("export", FS_EXPORT_NAME, "the export (each export serves one consumer)",
          default=REQUIRED),
    Field("mount", Nullable(StrType("an absolute path in the consumer", r"^/[^\s,\\]*$")),
          "where the consumer mounts it", default=None, default_doc="/mnt/EXPORT"),
))

KERNEL_IMAGE = ObjectSpec("kernel-image", "consumers.NAME.image (direct kernel boot)",
                          "Boot a kernel and initramfs instead of the consumer disk image.", (
    Field("kernel", PathType("a kernel image"), "the kernel", default=REQUIRED),
    Field("initrd", Nullable(PathType("an initramfs")), "the initramfs", default=None),
    Field("append", StrType("a kernel command line", empty=True), "extra kernel command line",
          default=""),
))

CONSUMER = ObjectSpec("consumer", "consumers.NAME", "A consumer VM: stock virtio-net and "
                      "virtio-blk devices, each one VVU link to an appliance.", (
    Field("host", Nullable(HOST_NAME), "the host the consumer runs on (a name in hosts:); "
          "its appliances must be on the same host", default=None,
          default_doc="required when hosts: is given"),
    Field("image", Alternatives(ChoiceType(["consumer"]), ObjectType(KERNEL_IMAGE)),
          'what the VM boots: "consumer" (the built consumer image) or a kernel',
          default="consumer", inherit=True),
    _cpus(),
    Field("memory", SizeType(128 * MIB, 16 * GIB, unit=MIB, power_of_two=True),
          "RAM, a power of two (it is shared with the appliances as a PCI BAR; bare integers "
          "are MiB)", default="512M", inherit=True),
    Field("nics", ListType(Alternatives(
        Shorthand(NIC, "SWITCH", _split_nic, NAME_PATTERN), ObjectType(NIC)), MAX_NICS, "NICs"),
          "network devices, each a link to a vswitch", default=[], default_doc="none"),
    Field("disks", ListType(Alternatives(
        Shorthand(DISK, "STORAGE/EXPORT", _split_disk, DISK_REF_PATTERN), ObjectType(DISK)),
        MAX_DISKS, "disks"), "block devices, each a link to a storage export", default=[],
          default_doc="none"),
    Field("fs", ListType(Alternatives(
        Shorthand(FS_MOUNT, "FS/EXPORT", _split_fs, FS_REF_PATTERN), ObjectType(FS_MOUNT)),
        MAX_FS, "virtio-fs mounts"), "virtio-fs mounts, each a link to an fs appliance's "
          "export (the consumer image mounts them at boot)", default=[], default_doc="none"),
))

# ------------------------------------------------------------------ defaults

DEFAULTS = ObjectSpec("defaults", "defaults", "What nodes inherit. Precedence: the node's own "
                      "value, then defaults.KIND, then defaults.appliance or defaults.consumer, "
                      "then the schema default.", (
    Field("appliance", ObjectType(APPLIANCE.derive(
        "defaults-appliance", "defaults.appliance", "Inherited by every appliance.")),
          "for every appliance", default={}),
    Field("consumer", ObjectType(CONSUMER.derive(
        "defaults-consumer", "defaults.consumer", "Inherited by every consumer.")),
          "for every consumer", default={}),
    *(Field(kind.value, ObjectType(APPLIANCE.derive(
        f"defaults-{kind.value}", f"defaults.{kind.value}",
        f"Inherited by every {kind.value} appliance (before defaults.appliance).", kind)),
            f"for every {kind.value} appliance", default={})
      for kind in ApplianceKind),
))

# ------------------------------------------------------------------ checks

_CONSUMER_REF = StrType("the name of a consumer", NAME_PATTERN)
_NODE_REF = StrType("the name of a node", NAME_PATTERN)

CHECKS: dict[CheckKind, ObjectSpec] = {
    CheckKind.PING: ObjectSpec("check-ping", "checks[].ping", "Ping from one consumer to "
                               "another; both must have a NIC on a common switch.", (
        Field("from", _CONSUMER_REF, "the consumer that pings", default=REQUIRED),
        Field("to", _CONSUMER_REF, "the consumer pinged (its address on the common switch)",
              default=REQUIRED),
        Field("count", IntType(1, 100), "echo requests; all must be answered", default=3),
    )),
    CheckKind.TRANSFER: ObjectSpec("check-transfer", "checks[].transfer", "Send random data "
                                   "from one consumer to another over a common switch and "
                                   "compare checksums.", (
        Field("from", _CONSUMER_REF, "the sender", default=REQUIRED),
        Field("to", _CONSUMER_REF, "the receiver", default=REQUIRED),
        Field("size", SizeType(MIB, GIB, unit=1), "how much (bare integers are MiB)",
              default="8M"),
    )),
    CheckKind.DISK: ObjectSpec("check-disk", "checks[].disk", "Write a pattern through a "
                               "filesystem on a consumer's disk, sync, read it back.", (
        Field("node", _CONSUMER_REF, "the consumer", default=REQUIRED),
        Field("disk", StrType('one of its disks, "STORAGE/EXPORT"', DISK_REF_PATTERN),
              "the disk", default=REQUIRED),
    )),
    CheckKind.FS: ObjectSpec("check-fs", "checks[].fs", "Write files through a consumer's "
                             "virtio-fs mount (one of SIZE, a small tree), read them back "
                             "there after dropping the page cache, and compare their sha256 "
                             "with the same files read in the fs appliance's export.", (
        Field("node", _CONSUMER_REF, "the consumer", default=REQUIRED),
        Field("fs", StrType('one of its virtio-fs mounts, "FS/EXPORT"', FS_REF_PATTERN),
              "the mount", default=REQUIRED),
        Field("size", SizeType(KIB, GIB, unit=1), "the largest file written (bare integers "
              "are MiB)", default="4M"),
    )),
    CheckKind.COMMAND: ObjectSpec("check-command", "checks[].command", "Run a command on a "
                                  "node (over SSH) and check its exit status and output.", (
        Field("node", _NODE_REF, "the node (consumer or appliance)", default=REQUIRED),
        Field("run", StrType("a shell command"), "the command", default=REQUIRED),
        Field("status", IntType(0, 255), "the expected exit status", default=0),
        Field("output", Nullable(RegexType()), "a regular expression the output must contain",
              default=None, default_doc="not checked"),
    )),
}

# ------------------------------------------------------------------ the file

TOPOLOGY = ObjectSpec("topology", "(top level)", "A vvu lab: appliance VMs, consumer VMs "
                      "linked to them through VVU, and the checks the lab must pass.", (
    Field("name", NAME, "the lab's name (RAM files, lab directory, host names)",
          default=REQUIRED),
    Field("options", ObjectType(OPTIONS), "lab-wide options", default={}),
    Field("appliances", MapType(NAME, ObjectType(APPLIANCE), "appliances"),
          "the appliance VMs by name", default={}, default_doc="none"),
    Field("consumers", MapType(NAME, ObjectType(CONSUMER), "consumers"),
          "the consumer VMs by name", default={}, default_doc="none"),
    Field("defaults", ObjectType(DEFAULTS), "what nodes inherit", default={}),
    Field("hosts", MapType(NAME, ObjectType(HOST), "hosts"),
          "the machines the lab is spread over, by name", default={},
          default_doc="none: everything on this machine"),
    Field("checks", ListType(Tagged({k.value: s for k, s in CHECKS.items()}, "check"),
                             MAX_CHECKS, "checks"),
          "checks `vvu-launch check` runs", default=[], default_doc="none"),
))


# ------------------------------------------------------------------ generated outputs

SCHEMA_ID = "urn:vvu:topology"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a topology file, for editors and CI."""
    defs: dict[str, Any] = {}
    TOPOLOGY.json_schema(defs)
    root = defs.pop(TOPOLOGY.name)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "vvu topology",
        **root,
        "$defs": defs,
    }


_PREAMBLE = """\
# vvu topology files

A topology file (YAML) describes a lab: appliance VMs (a vswitch, a storage
target, a virtio-fs server) and consumer VMs whose NICs, disks and virtio-fs
mounts are links to them through VVU.
`vvu-launch validate FILE` checks one; every problem is reported at once, as
FILE:LINE:COL: FIELD: what was expected.

* Unknown fields are errors; so are duplicate keys.
* Names of appliances and consumers share one namespace and become host names.
* Sizes: a string with a binary suffix ("512M", "2G", "1T"; K, M, G, T are
  KiB, MiB, GiB, TiB; an optional "iB" is allowed) or a bare integer, which
  counts MiB (never bytes).
* Relative paths are relative to the topology file's directory.
* Inheritance: a node's own value, then defaults.KIND (appliances), then
  defaults.appliance or defaults.consumer, then the default below. Backend
  `options` are merged field by field the same way.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def schema_text() -> str:
    """The schema as printed docs: one section per object, a table of its fields."""
    out = [_PREAMBLE]
    for spec in TOPOLOGY.walk():
        out.append(f"## {spec.place}\n\n{spec.help}\n")
        out.append("| field | type | default | help |")
        out.append("| --- | --- | --- | --- |")
        for f in spec.fields:
            kinds = f"({f.kinds_text()} only) " if f.kinds else ""
            out.append(f"| {f.name} | {_cell(f.type.describe())} | {_cell(f.default_text())} "
                       f"| {_cell(kinds + f.help)} |")
        out.append("")
    return "\n".join(out)
