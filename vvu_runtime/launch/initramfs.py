"""A tiny initramfs for consumer guests, built in Python.

The consumer guests of the integration tests are a stock Debian cloud kernel
plus this initramfs: busybox-static with its applet links, the kernel's virtio
modules (decompressed, so busybox ``insmod`` can load them, in dependency order
from ``modules.dep``) and an ``/init`` that mounts the API file systems, loads
the modules, configures the network from the kernel command line and runs a
shell on the console.

Kernel command-line parameters understood by ``/init``:

``vvu.ip=ADDR/PREFIX``   address for ``vvu.iface`` (default ``eth0``)
``vvu.gw=ADDR``          default route
``vvu.iface=NAME``       interface to configure
``vvu.console=NAME``     tty for the shell (default: the kernel's console)

The archive is the cpio "newc" format (the one the kernel unpacks), gzipped,
written here rather than by an external ``cpio`` so the build needs nothing
but Python. Builds are cached by kernel version and a hash of all inputs.

Errors: every failure is an :class:`InitramfsError`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from vvu_runtime.errors import VvuError

if TYPE_CHECKING:
    from vvu_runtime.launch.toolchain import Toolchain

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODULES",
    "ConsumerAssets",
    "CpioEntry",
    "CpioFormatError",
    "InitramfsError",
    "KernelModules",
    "build_consumer_initramfs",
    "consumer_assets",
    "consumer_init_script",
    "iter_names",
    "read_cpio",
    "write_cpio",
]

#: Modules a consumer needs: virtio transport, net, blk, console. Whatever of
#: these the kernel has built in is skipped; their dependencies come along.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
)

#: The hvc0/ttyS0 shell prints this once everything is set up.
READY_BANNER = "vvu-consumer: ready"


class InitramfsError(VvuError):
    """Building a consumer initramfs failed; the message says what to fix."""


class CpioFormatError(InitramfsError):
    """A byte string is not a well-formed newc cpio archive."""


# --------------------------------------------------------------------------
# cpio "newc" (SVR4 without CRC): the format the kernel's initramfs unpacker reads
# --------------------------------------------------------------------------

_NEWC_MAGIC = b"070701"
_NEWC_HEADER_LEN = 110  # 6 magic + 13 fields of 8 hex digits
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` is relative (no leading ``/``).

    ``mode`` is a full ``st_mode`` (file type bits included). A symlink's
    target is its ``data``. ``rdev`` is ``(major, minor)`` for device nodes.
    """

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise entries (in the given order) plus the trailer as newc cpio.

    Parents must come before children: the kernel creates entries in order.
    """
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry(_TRAILER, 0)], start=1):
        name = entry.name.encode() + b"\0"
        if entry.name != _TRAILER and (entry.name.startswith("/") or not entry.name):
            raise InitramfsError(f"cpio member name must be relative and non-empty: {entry.name!r}")
        if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
            raise InitramfsError(f"cpio member {entry.name!r}: only files and symlinks carry data")
        is_trailer = entry.name == _TRAILER
        fields = (
            0 if is_trailer else ino,
            entry.mode,
            entry.uid,
            entry.gid,
            0 if is_trailer else (2 if stat.S_ISDIR(entry.mode) else 1),
            entry.mtime,
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        out += _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        out += name + b"\0" * _pad4(_NEWC_HEADER_LEN + len(name))
        out += entry.data + b"\0" * _pad4(len(entry.data))
    return bytes(out)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (uncompressed) back into entries, trailer excluded."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = data[pos : pos + _NEWC_HEADER_LEN]
        if len(header) < _NEWC_HEADER_LEN:
            raise CpioFormatError(f"truncated header at offset {pos}")
        if header[:6] != _NEWC_MAGIC:
            raise CpioFormatError(f"bad magic {header[:6]!r} at offset {pos}")
        try:
            f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError as e:
            raise CpioFormatError(f"bad header field at offset {pos}") from e
        mode, uid, gid, _nlink, mtime, filesize = f[1], f[2], f[3], f[4], f[5], f[6]
        rdev, namesize = (f[9], f[10]), f[11]
        pos += _NEWC_HEADER_LEN
        raw_name = data[pos : pos + namesize]
        if len(raw_name) != namesize or not raw_name.endswith(b"\0"):
            raise CpioFormatError(f"bad name at offset {pos}")
        name = raw_name[:-1].decode()
        pos += namesize + _pad4(_NEWC_HEADER_LEN + namesize)
        body = data[pos : pos + filesize]
        if len(body) != filesize:
            raise CpioFormatError(f"truncated body of {name!r}")
        pos += filesize + _pad4(filesize)
        if name == _TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, body, uid, gid, mtime, rdev))


# --------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------


def _module_file(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net.ko`` (as stored, uncompressed)."""
    return PurePosixPath(path).name.split(".ko", 1)[0] + ".ko"


def _module_name(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net``."""
    base = PurePosixPath(path).name
    return base.split(".ko", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class KernelModules:
    """The module tree of one kernel (``/usr/lib/modules/VERSION``)."""

    root: Path

    @property
    def version(self) -> str:
        return self.root.name

    @classmethod
    def find(cls, modules_base: Path, version: str | None = None) -> KernelModules:
        """The only (or the given) kernel under ``modules_base`` (``.../lib/modules``)."""
        if version is not None:
            root = modules_base / version
            if not (root / "modules.dep").is_file():
                raise InitramfsError(f"no modules.dep for kernel {version} under {modules_base}")
            return cls(root)
        found = sorted(p for p in modules_base.glob("*") if (p / "modules.dep").is_file())
        if not found:
            raise InitramfsError(
                f"no kernel modules under {modules_base}; is linux-image-cloud-amd64 in the "
                "tools tree? Run: vvu-toolchain ensure"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise InitramfsError(f"several kernels under {modules_base} ({names}): pick a version")
        return cls(found[0])

    def _dep_table(self) -> dict[str, tuple[str, list[str]]]:
        """name -> (relative path, [relative paths of dependencies])."""
        table: dict[str, tuple[str, list[str]]] = {}
        for line in (self.root / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            mod, _, deps = line.partition(":")
            table[_module_name(mod)] = (mod.strip(), deps.split())
        return table

    def _builtin(self) -> set[str]:
        path = self.root / "modules.builtin"
        if not path.is_file():
            return set()
        return {_module_name(line) for line in path.read_text().split()}

    def resolve(self, names: Sequence[str]) -> list[str]:
        """Relative paths of the modules for ``names`` and their dependencies,
        in load order (dependencies first). Built-in modules are skipped."""
        table = self._dep_table()
        builtin = self._builtin()
        by_path = {path: name for name, (path, _) in table.items()}
        order: list[str] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str, wanted_by: str | None) -> None:
            if name in done:
                return
            if name not in table:
                if name in builtin:
                    return
                who = f" (needed by {wanted_by})" if wanted_by else ""
                raise InitramfsError(
                    f"kernel {self.version} has no module {name!r}{who}, neither loadable "
                    "nor built in"
                )
            if name in visiting:
                raise InitramfsError(f"dependency cycle at module {name!r}")
            visiting.add(name)
            for dep in table[name][1]:
                visit(by_path.get(dep, _module_name(dep)), name)
            visiting.discard(name)
            done.add(name)
            order.append(table[name][0])

        for n in names:
            visit(n.replace("-", "_"), None)
        return order

    def read_uncompressed(self, relpath: str) -> bytes:
        """A module's ELF bytes; busybox insmod cannot decompress."""
        path = self.root / relpath
        raw = path.read_bytes()
        if relpath.endswith(".ko"):
            return raw
        if relpath.endswith(".ko.xz"):
            return lzma.decompress(raw)
        if relpath.endswith(".ko.gz"):
            return gzip.decompress(raw)
        if relpath.endswith(".ko.zst"):
            return _zstd_decompress(raw, path)
        raise InitramfsError(f"unknown module compression: {path}")


def _zstd_decompress(raw: bytes, path: Path) -> bytes:
    # Python 3.11 has no zstd in the standard library; use the zstd tool.
    tool = shutil.which("zstd")
    if tool is None:
        raise InitramfsError(
            f"{path} is zstd-compressed and no 'zstd' program is on PATH (apt-get install zstd)"
        )
    result = subprocess.run([tool, "-dc"], input=raw, capture_output=True, check=False)
    if result.returncode != 0:
        raise InitramfsError(f"zstd -d {path}: {result.stderr.decode(errors='replace')}")
    return result.stdout


# --------------------------------------------------------------------------
# The consumer initramfs
# --------------------------------------------------------------------------


def consumer_init_script(modules: Sequence[str]) -> str:
    """The ``/init`` shell script; ``modules`` are paths under /lib/modules."""
    module_list = " ".join(f"/lib/modules/{_module_file(m)}" for m in modules)
    return f"""#!/bin/sh
# vvu consumer init: generated by vvu_runtime.launch.initramfs
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
# Quiet kernel messages so they do not interleave with console output.
echo 1 >/proc/sys/kernel/printk
for m in {module_list}; do
    insmod "$m" || echo "vvu-consumer: insmod $m failed"
done
# Let udev-less device discovery settle: wait for the interface to appear.
iface=eth0 ip= gw= console=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vvu.ip=*) ip="${{arg#vvu.ip=}}" ;;
        vvu.gw=*) gw="${{arg#vvu.gw=}}" ;;
        vvu.iface=*) iface="${{arg#vvu.iface=}}" ;;
        vvu.console=*) console="${{arg#vvu.console=}}" ;;
    esac
done
ip link set lo up
if [ -n "$ip" ]; then
    n=0
    while [ ! -e "/sys/class/net/$iface" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
    ip addr add "$ip" dev "$iface" && ip link set "$iface" up ||
        echo "vvu-consumer: cannot configure $iface"
    [ -n "$gw" ] && ip route add default via "$gw"
fi
hostname vvu-consumer
export PS1='vvu# ' HOME=/root TERM=dumb
echo "{READY_BANNER}"
while true; do
    if [ -n "$console" ]; then
        setsid sh -c "stty -echo 2>/dev/null; exec sh -i" </dev/$console >/dev/$console 2>&1
    else
        setsid cttyhack sh -c 'stty -echo 2>/dev/null; exec sh -i'
    fi
    sleep 1
done
"""


@dataclass
class _Tree:
    """Archive contents with parent directories created on demand."""

    entries: list[CpioEntry] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)

    def mkdir(self, name: str) -> None:
        parts = PurePosixPath(name).parts
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.entries.append(CpioEntry.directory(d))

    def add(self, entry: CpioEntry) -> None:
        parent = str(PurePosixPath(entry.name).parent)
        if parent != ".":
            self.mkdir(parent)
        if stat.S_ISDIR(entry.mode):
            self.mkdir(entry.name)
        else:
            self.entries.append(entry)


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/sh``, ``sbin/ip``…): busybox-static runs on any host."""
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise InitramfsError(f"cannot list busybox applets with {busybox} --list-full: {e}") from e
    # Merged /usr is not needed in a throwaway initramfs: flatten to bin/ and sbin/.
    applets = []
    for line in out.split():
        p = PurePosixPath(line)
        top = "sbin" if p.parent.name == "sbin" else "bin"
        applets.append(f"{top}/{p.name}")
    return sorted(set(applets))


def _consumer_entries(
    busybox: Path, kernel: KernelModules, modules: Sequence[str]
) -> list[CpioEntry]:
    tree = _Tree()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "lib/modules"):
        tree.mkdir(d)
    # The kernel opens /dev/console before /init runs (devtmpfs is not mounted yet).
    tree.add(CpioEntry.char_device("dev/console", 5, 1))
    tree.add(CpioEntry.char_device("dev/null", 1, 3, 0o666))
    tree.add(CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755))
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            tree.add(CpioEntry.symlink(applet, "/bin/busybox"))
    paths = kernel.resolve(modules)
    for rel in paths:
        tree.add(CpioEntry.file(f"lib/modules/{_module_file(rel)}", kernel.read_uncompressed(rel)))
    tree.add(CpioEntry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    tree.add(CpioEntry.file("etc/group", b"root:x:0:\n"))
    tree.add(CpioEntry.file("init", consumer_init_script(paths).encode(), 0o755))
    return tree.entries


def _builder_fingerprint(busybox: Path, kernel: KernelModules, modules: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())  # any change of this builder invalidates the cache
    h.update(busybox.read_bytes())
    h.update((kernel.root / "modules.dep").read_bytes())
    h.update("\0".join(modules).encode())
    return h.hexdigest()[:16]


def build_consumer_initramfs(
    *,
    busybox: Path,
    kernel: KernelModules,
    cache_dir: Path,
    modules: Sequence[str] = DEFAULT_MODULES,
) -> Path:
    """Build (or reuse) the consumer initramfs and return the ``.cpio.gz`` path.

    ``busybox`` is a static busybox binary, ``kernel`` the module tree of the
    kernel it will boot with. The result lives in ``cache_dir`` under a name
    carrying the kernel version and a hash of every input, so it is rebuilt
    exactly when something changed.
    """
    if not busybox.is_file():
        raise InitramfsError(f"busybox not found at {busybox}; run: vvu-toolchain ensure")
    key = _builder_fingerprint(busybox, kernel, modules)
    out = cache_dir / f"consumer-{kernel.version}-{key}.cpio.gz"
    if out.is_file():
        with contextlib.suppress(OSError):
            os.utime(out)  # mark as in use, for _prune()
        _prune(cache_dir, keep=out)
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("building consumer initramfs for kernel %s -> %s", kernel.version, out)
    blob = gzip.compress(write_cpio(_consumer_entries(busybox, kernel, modules)), 6, mtime=0)
    # Atomic publish: concurrent builders (pytest-xdist, two shells) never see half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".consumer-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(cache_dir, keep=out)
    return out


#: Cached images unused for this long are removed (others may still use theirs:
#: different module sets or builder versions live side by side).
CACHE_MAX_AGE_S = 14 * 24 * 3600


def _prune(cache_dir: Path, keep: Path) -> None:
    now = time.time()
    for old in cache_dir.glob("consumer-*.cpio.gz"):
        with contextlib.suppress(OSError):
            if old != keep and now - old.stat().st_mtime > CACHE_MAX_AGE_S:
                old.unlink()


def iter_names(data: bytes) -> Iterator[str]:
    """Member names of a (possibly gzipped) newc archive: handy for inspection."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    for entry in read_cpio(data):
        yield entry.name


@dataclass(frozen=True)
class ConsumerAssets:
    """What a consumer guest boots: the tools tree's kernel plus our initramfs."""

    kernel: Path
    initrd: Path
    kernel_version: str


def consumer_assets(
    toolchain: Toolchain, modules: Sequence[str] = DEFAULT_MODULES
) -> ConsumerAssets:
    """Kernel and (cached) initramfs for consumer guests from the tools tree."""
    kernel = KernelModules(toolchain.path("modules"))
    initrd = build_consumer_initramfs(
        busybox=toolchain.path("busybox"),
        kernel=kernel,
        cache_dir=toolchain.initramfs_cache,
        modules=modules,
    )
    return ConsumerAssets(toolchain.path("kernel"), initrd, kernel.version)
