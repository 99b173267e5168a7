"""vvu's appliance images: build them with mkosi, boot them with QEMU.

An appliance is a Debian trixie disk image (``appliances/<name>/``, which
includes ``appliances/base/``) that runs one vvu backend on the VVU PCI
functions the host gives it; ``appliances/consumer`` is the consumer VM image
(fio, iperf3, a kernel with virtiofs) built the same way. mkosi is the build
interface: ``mkosi -C appliances/NAME build`` builds one (its
``standalone.conf`` finds the tool chain ./setup prepared), ``mkosi build`` at
the repository root builds them all. :func:`build_appliance` runs that same
mkosi build and returns an :class:`ApplianceImage`, all files in ``images/``::

    images/vvu-vswitch.raw       root file system (one ext4 partition)
    images/vvu-vswitch.vmlinuz   the image's own kernel
    images/vvu-vswitch.initrd    busybox initrd: loads virtio_blk, mounts root
    images/vvu-vswitch.cmdline   kernel command line of direct kernel boot
    images/vvu-vswitch.manifest  installed packages and versions (JSON)

Nothing is staged from here: the image's mkosi.postinst.chroot builds the
runtime wheel from the checkout (``vvu_runtime.appliance.wheel``) and installs
it; no key is baked in.

Builds are incremental. A build record in the cache holds a digest of every
input (the appliance's mkosi configuration, the runtime's shipped sources,
mkosi's version, the tools tree, the apt sources and this builder); when
nothing changed, :func:`build_appliance` returns at once. Otherwise mkosi runs
with ``Incremental=yes`` on caches shared by all appliances, so a change of
``vvu_runtime`` costs one image assembly, not a Debian installation. Builds
take a lock, so parallel callers wait instead of corrupting the shared cache.

:class:`ApplianceMachine` is a :class:`QemuMachine` for an appliance: direct
kernel boot of the image (a throwaway overlay unless ``persistent=True``), a
virtual Intel IOMMU placed before any vfio-user device
(:meth:`~ApplianceMachine.add_vfio_user_device`), a user-mode NIC with SSH
forwarded to a free local port, the credentials ``ssh.authorized_keys.root``
(the key :func:`ssh_key` keeps in the cache), ``vvu.debug-console=1`` (the
root console tests drive; ``debug_console=False`` for the production login
prompt) and ``vvu.appliance`` (``config=``), and a boot that waits for the
console banner and for sshd. :meth:`~ApplianceMachine.testinfra_host` gives a
pytest-testinfra host on its paramiko backend.

Cache layout (``$VVU_CACHE_DIR``, default ``/var/cache/vvu``)::

    appliances/mkosi-cache/    mkosi's incremental cache (Debian installed once)
    appliances/records/        build records, one directory per output directory
    appliances/logs/           mkosi's full output of the last build of each appliance
    appliances/ssh/id_ed25519  the key tests pass as ssh.authorized_keys.root

Errors: :class:`ApplianceError` (:class:`ApplianceMissing` for an image not
built yet); boot failures are :class:`~vvu_runtime.launch.machine.MachineError`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vvu_runtime.console import run_main
from vvu_runtime.errors import VvuError
from vvu_runtime.launch.accel import Accelerator, choose_accelerator
from vvu_runtime.launch.machine import MachineError, MachineLaunchError, MachineTimeout, QemuMachine
from vvu_runtime.launch.ports import free_port, ssh_banner
from vvu_runtime.launch.render import (
    Credential,
    DoorbellCompanion,
    NoMigrate,
    Rng,
    RootDisk,
    SshForward,
    Viommu,
    VvuFunctionDevice,
    render_devices,
)
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError

__all__ = [
    "BOOT_BANNER",
    "PROMPT",
    "ApplianceError",
    "ApplianceImage",
    "ApplianceMachine",
    "ApplianceMissing",
    "ApplianceStatus",
    "appliance_names",
    "appliance_status",
    "build_appliance",
    "build_appliances",
    "find_appliance",
    "main",
    "ssh_key",
]

#: Printed on the serial console by the autologin shell (etc/profile.d/vvu-console.sh).
BOOT_BANNER = "vvu-appliance: ready"
#: That shell's prompt.
PROMPT = "vvu# "
#: Credentials the images understand (SMBIOS type 11; docs in appliances/README.md).
SSH_KEY_CREDENTIAL = "ssh.authorized_keys.root"
DEBUG_CONSOLE_CREDENTIAL = "vvu.debug-console"
CONFIG_CREDENTIAL = "vvu.appliance"
#: The VVU function's PCI identity (docs/vvu-abi.md).
VVU_PCI_ID = "1af4:107f"
#: Bump when the build or the record format changes.
BUILDER_VERSION = 2
#: Not appliances: shared configuration included by them.
NOT_IMAGES = frozenset({"base"})


class ApplianceError(VvuError):
    """An appliance cannot be built or found; the message says why."""


class ApplianceMissing(ApplianceError):
    """The appliance has not been built (in this output directory) yet."""


def _say(msg: str) -> None:
    print(f"vvu-appliance: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# What an appliance is made of
# --------------------------------------------------------------------------


def appliances_dir(toolchain: Toolchain) -> Path:
    return toolchain.repo / "appliances"


def appliance_names(toolchain: Toolchain) -> list[str]:
    """The images of this checkout: ``appliances/*/mkosi.conf`` except ``base``
    (``vswitch``, ``storage``, ``consumer``)."""
    root = appliances_dir(toolchain)
    return sorted(p.parent.name for p in root.glob("*/mkosi.conf")
                  if p.parent.name not in NOT_IMAGES)


def _config_dir(toolchain: Toolchain, name: str) -> Path:
    names = appliance_names(toolchain)
    if name not in names:
        raise ApplianceError(
            f"no appliance {name!r} in {appliances_dir(toolchain)}; known: {', '.join(names)}"
        )
    return appliances_dir(toolchain) / name


def image_id(toolchain: Toolchain, name: str) -> str:
    """``ImageId=`` of the appliance (the output files' stem), e.g. ``vvu-vswitch``."""
    conf = (_config_dir(toolchain, name) / "mkosi.conf").read_text()
    m = re.search(r"^ImageId=(\S+)\s*$", conf, re.M)
    if not m:
        raise ApplianceError(f"appliances/{name}/mkosi.conf sets no ImageId=")
    return m.group(1)


def _tree_digest(h: Any, root: Path, label: str) -> None:
    """Feed every file, symlink and mode under ``root`` into ``h``."""
    for p in sorted(root.rglob("*")):
        rel = f"{label}/{p.relative_to(root)}"
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            h.update(f"L {rel} {os.readlink(p)}\0".encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(f"F {rel} {st.st_mode & 0o7777:o}\0".encode() + p.read_bytes() + b"\0")
        elif stat.S_ISDIR(st.st_mode):
            h.update(f"D {rel}\0".encode())


def _inputs_digest(toolchain: Toolchain, name: str) -> str:
    from vvu_runtime.appliance.wheel import shipped_files

    h = hashlib.sha256()
    h.update(f"vvu-appliance builder {BUILDER_VERSION} {name}\0".encode())
    h.update(Path(__file__).read_bytes())
    for d in ("base", name):
        _tree_digest(h, appliances_dir(toolchain) / d, d)
    for f in sorted(appliances_dir(toolchain).glob("*.conf")):
        h.update(f"C {f.name}\0".encode() + f.read_bytes() + b"\0")
    h.update(b"P\0" + (toolchain.repo / "pyproject.toml").read_bytes() + b"\0")
    for rel, path in shipped_files(toolchain.repo / "vvu_runtime"):
        h.update(f"S {rel}\0".encode() + path.read_bytes() + b"\0")
    h.update(toolchain.mkosi().version.encode() + b"\0")
    with contextlib.suppress(OSError, ValueError):
        h.update(str(json.loads(toolchain.stamp_file.read_text()).get("inputs")).encode())
    _tree_digest(h, toolchain.sources_tree, "sources")
    return h.hexdigest()


# --------------------------------------------------------------------------
# The SSH key
# --------------------------------------------------------------------------


def _appliance_cache(toolchain: Toolchain) -> Path:
    return toolchain.cache_dir / "appliances"


def ssh_key(toolchain: Toolchain) -> Path:
    """A private key for tests and ``vvu-appliance boot`` (made once per cache).

    No image contains it: :class:`ApplianceMachine` passes ``<key>.pub`` at boot
    as the credential ``ssh.authorized_keys.root``.
    """
    key = _appliance_cache(toolchain) / "ssh/id_ed25519"
    pub = key.with_suffix(".pub")
    if key.is_file() and pub.is_file():
        return key
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    key.parent.mkdir(parents=True, exist_ok=True)
    key.parent.chmod(0o700)
    priv_bytes = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub_bytes = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    # Publish atomically: a concurrent caller sees the old pair or the new one.
    tmp = key.with_name(f".{key.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_bytes)
    tmp_pub = pub.with_name(f".{pub.name}.{os.getpid()}")
    tmp_pub.write_bytes(pub_bytes + b" vvu-appliance\n")
    os.replace(tmp_pub, pub)
    os.replace(tmp, key)
    _say(f"made the appliances' SSH key {key}")
    return key


# --------------------------------------------------------------------------
# Built images and their records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplianceImage:
    """A built appliance: what :class:`ApplianceMachine` boots."""

    name: str  # "vswitch"
    image_id: str  # "vvu-vswitch"
    disk: Path
    kernel: Path
    initrd: Path
    #: Kernel command line of direct kernel boot (root=, console, IOMMU).
    cmdline: str
    ssh_key: Path
    #: Digest of the inputs it was built from.
    inputs: str
    built_at: float
    #: Seconds the build took (mkosi included).
    build_seconds: float
    #: Whether this call ran mkosi (False: the image was up to date).
    rebuilt: bool = False

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.disk, self.kernel, self.initrd


def _output_dir(toolchain: Toolchain, output_dir: Path | None) -> Path:
    return (output_dir or toolchain.repo / "images").resolve()


def _record_path(toolchain: Toolchain, out: Path, name: str) -> Path:
    key = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return _appliance_cache(toolchain) / "records" / key / f"{name}.json"


def _file_facts(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _image_paths(out: Path, iid: str) -> tuple[Path, Path, Path]:
    return out / f"{iid}.raw", out / f"{iid}.vmlinuz", out / f"{iid}.initrd"


def _load_image(toolchain: Toolchain, name: str, out: Path) -> ApplianceImage | None:
    """The recorded build, if its files are still the ones that build produced."""
    try:
        record = json.loads(_record_path(toolchain, out, name).read_text())
        iid = record["image_id"]
        files = _image_paths(out, iid)
        if [_file_facts(p) for p in files] != record["files"]:
            return None
        return ApplianceImage(
            name=name,
            image_id=iid,
            disk=files[0],
            kernel=files[1],
            initrd=files[2],
            cmdline=record["cmdline"],
            ssh_key=Path(record["ssh_key"]),
            inputs=record["inputs"],
            built_at=float(record["built_at"]),
            build_seconds=float(record["build_seconds"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_record(toolchain: Toolchain, out: Path, image: ApplianceImage) -> None:
    path = _record_path(toolchain, out, image.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "image_id": image.image_id,
        "output_dir": str(out),
        "files": [_file_facts(p) for p in image.files],
        "cmdline": image.cmdline,
        "ssh_key": str(image.ssh_key),
        "inputs": image.inputs,
        "built_at": image.built_at,
        "build_seconds": image.build_seconds,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def find_appliance(
    toolchain: Toolchain, name: str, *, output_dir: Path | None = None
) -> ApplianceImage:
    """The last build of ``name`` (even if its inputs changed since); no build."""
    out = _output_dir(toolchain, output_dir)
    image = _load_image(toolchain, name, out)
    if image is None:
        raise ApplianceMissing(
            f"appliance {name!r} is not built in {out}: run vvu-appliance build {name}"
        )
    return image


@dataclass(frozen=True)
class ApplianceStatus:
    """One line of ``vvu-appliance status``."""

    name: str
    state: str  # "up to date", "stale", "not built"
    image: ApplianceImage | None
    where: Path


def appliance_status(
    toolchain: Toolchain, names: Sequence[str] | None = None, *, output_dir: Path | None = None
) -> list[ApplianceStatus]:
    out = _output_dir(toolchain, output_dir)
    rows = []
    for name in names or appliance_names(toolchain):
        iid = image_id(toolchain, name)
        image = _load_image(toolchain, name, out)
        if image is None:
            rows.append(ApplianceStatus(name, "not built", None, out / f"{iid}.raw"))
            continue
        try:
            digest = _inputs_digest(toolchain, name)
            state = "up to date" if digest == image.inputs else "stale (inputs changed)"
        except (ToolchainError, ApplianceError) as e:
            state = f"unknown ({e})"
        rows.append(ApplianceStatus(name, state, image, image.disk))
    return rows


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(toolchain: Toolchain) -> Iterator[None]:
    cache = _appliance_cache(toolchain)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("waiting for another appliance build to finish…")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _mkosi_build_argv(toolchain: Toolchain, name: str, out: Path, force: bool) -> list[str]:
    """``mkosi -C appliances/NAME build``, as a user runs it, plus the output directory."""
    args = [
        f"--directory={_config_dir(toolchain, name)}",
        f"--output-directory={out}",
        # -f replaces the previous outputs; -ff also drops the incremental cache.
        "-ff" if force else "-f",
        "build",
    ]
    return toolchain.mkosi_argv(*args)


def _run_mkosi(argv: Sequence[str], log_path: Path, name: str) -> None:
    """Run mkosi with its full output in ``log_path`` and its steps (‣) shown live."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                text = line.strip()
                if text.startswith("‣") or "mkosi.finalize:" in text:
                    elapsed = time.monotonic() - start
                    _say(f"{name} [{elapsed:5.0f} s] {text.lstrip('‣ ')}")
            rc = proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM: stop mkosi and everything it started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
        raise ApplianceError(
            f"mkosi failed to build appliance {name!r} (exit {rc}); full log: {log_path}\n{tail}"
        )


def build_appliance(
    toolchain: Toolchain,
    name: str,
    *,
    force: bool = False,
    output_dir: Path | None = None,
) -> ApplianceImage:
    """Build appliance ``name`` (``appliances/<name>``) unless it is up to date.

    ``force`` rebuilds even then, and drops mkosi's incremental cache too (a
    fresh Debian installation). Images land in ``output_dir`` (default: the
    checkout's ``images/``).
    """
    toolchain.require_built()
    out = _output_dir(toolchain, output_dir)
    iid = image_id(toolchain, name)
    with _build_lock(toolchain):
        digest = _inputs_digest(toolchain, name)
        current = _load_image(toolchain, name, out)
        if current is not None and current.inputs == digest and not force:
            return current
        why = "forced" if force else ("inputs changed" if current else "not built yet")
        _say(f"building appliance {name} ({why}) into {out}")
        start = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        cache = _appliance_cache(toolchain)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "mkosi-cache").mkdir(exist_ok=True)
        toolchain.package_cache.mkdir(parents=True, exist_ok=True)
        _record_path(toolchain, out, name).unlink(missing_ok=True)
        argv = _mkosi_build_argv(toolchain, name, out, force)
        _run_mkosi(argv, cache / "logs" / f"{name}.log", name)
        disk, kernel, initrd = _image_paths(out, iid)
        missing = [p.name for p in (disk, kernel, initrd) if not p.is_file()]
        if missing:
            raise ApplianceError(
                f"mkosi built appliance {name!r} but {', '.join(missing)} is missing in {out}"
            )
        cmdline_file = out / f"{iid}.cmdline"
        try:
            cmdline = cmdline_file.read_text().strip()
        except OSError as e:
            raise ApplianceError(f"mkosi.finalize wrote no {cmdline_file}: {e}") from e
        # Not mkosi's "NAME -> NAME.raw" symlink: images/ holds the boot files.
        link = out / iid
        if link.is_symlink():
            link.unlink()
        image = ApplianceImage(
            name=name,
            image_id=iid,
            disk=disk,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            ssh_key=ssh_key(toolchain),
            inputs=digest,
            built_at=time.time(),
            build_seconds=round(time.monotonic() - start, 1),
            rebuilt=True,
        )
        _save_record(toolchain, out, image)
        _say(f"appliance {name} built in {image.build_seconds:.0f} s: {disk}")
        return image


def build_appliances(
    toolchain: Toolchain,
    names: Sequence[str] | None = None,
    *,
    force: bool = False,
    output_dir: Path | None = None,
) -> list[ApplianceImage]:
    """Build several appliances (default: all) one after the other."""
    return [
        build_appliance(toolchain, n, force=force, output_dir=output_dir)
        for n in (names or appliance_names(toolchain))
    ]


# --------------------------------------------------------------------------
# Booting
# --------------------------------------------------------------------------


class ApplianceMachine(QemuMachine):
    """An appliance VM, used as a context manager::

        image = build_appliance(tc, "vswitch")
        with ApplianceMachine(tc, image) as vm:
            vm.console.check("systemctl is-active ssh")
            host = vm.testinfra_host()  # paramiko backend, root with the image's key
            assert host.service("vvu-switch").is_enabled

    Entering boots the image with direct kernel boot and waits for the console
    banner (:data:`BOOT_BANNER`, then :data:`PROMPT`) and for sshd on
    :attr:`ssh_port`. Leaving always shuts QEMU down and removes every
    runtime file; with ``persistent=False`` (default) the guest's writes went
    to a throwaway overlay and the image is unchanged.

    vfio-user devices (VVU functions served by a device model) are added with
    :meth:`add_vfio_user_device` before launch, each on its own
    ``pcie-root-port`` behind the virtual Intel IOMMU. Guest RAM is a sealed
    memfd (vfio-user DMA needs fds, and vvu-devd maps only memory that cannot
    shrink). Systemd credentials (SMBIOS type 11):
    ``ssh.authorized_keys.root`` = ``ssh_key`` (default: the image's test key,
    :func:`ssh_key`) + ``.pub``; ``vvu.debug-console=1`` unless
    ``debug_console=False`` (then the console is a login prompt and entering
    waits for ``login:``); ``vvu.appliance`` = ``config`` (a mapping, sent as
    JSON, or text); ``credentials`` adds or overrides any (appliances/README.md).
    """

    def __init__(
        self,
        toolchain: Toolchain,
        image: ApplianceImage,
        *,
        name: str | None = None,
        memory_mib: int = 1024,
        smp: int = 2,
        accel: Accelerator | None = None,
        persistent: bool = False,
        ssh_port: int | None = None,
        wait_for_ssh: bool = True,
        ssh_timeout: float = 120.0,
        args: Sequence[str] = (),
        append: str = "",
        credentials: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | str | None = None,
        debug_console: bool = True,
        ssh_key: Path | None = None,
        viommu: bool = True,
        launch_timeout: float = 60.0,
        boot_timeout: float = 300.0,
        doorbell: DoorbellCompanion | None = None,
    ) -> None:
        if accel is None:
            accel = choose_accelerator(toolchain).accel
        machine = "q35"
        if accel is Accelerator.KVM and viommu:
            machine += ",kernel-irqchip=split"  # interrupt remapping of the vIOMMU
        key = ssh_key or image.ssh_key
        creds: dict[str, str] = {}
        with contextlib.suppress(OSError):
            creds[SSH_KEY_CREDENTIAL] = key.with_suffix(".pub").read_text()
        if debug_console:
            creds[DEBUG_CONSOLE_CREDENTIAL] = "1"
        if config is not None:
            creds[CONFIG_CREDENTIAL] = config if isinstance(config, str) else json.dumps(config)
        creds.update(credentials or {})
        # From qemu/*.j2, as vvu-launch's appliances: the vIOMMU before every PCI device.
        base_args = render_devices(
            *([Viommu()] if viommu else []),
            RootDisk(image.disk, snapshot=not persistent), Rng(), NoMigrate(),
            *([doorbell] if doorbell is not None else []),
            *(Credential(name, value) for name, value in creds.items()))
        # QemuMachine adds "console=ttyS0 panic=-1" itself.
        cmdline = " ".join(w for w in image.cmdline.split() if w != "console=ttyS0")
        super().__init__(
            toolchain,
            name=name or image.name,
            kernel=image.kernel,
            initrd=image.initrd,
            append=f"{cmdline} {append}".strip(),
            memory_mib=memory_mib,
            smp=smp,
            accel=accel,
            # vfio-user DMA_MAPs carry fds only for fd-backed RAM, and vvu-devd maps
            # only fds sealed against shrinking: a memfd as QEMU seals it by default.
            memfd=True,
            machine=machine,
            args=[*base_args, *args],
            console=True,
            # Without the debug console there is only a login prompt to wait for.
            boot_banner=BOOT_BANNER if debug_console else "login: ",
            prompt=PROMPT if debug_console else None,
            launch_timeout=launch_timeout,
            boot_timeout=boot_timeout,
        )
        self.image = image
        self.persistent = persistent
        self.ssh_key = key
        self.debug_console = debug_console
        self.ssh_user = "root"
        self.ssh_host = "127.0.0.1"
        self._want_port = ssh_port
        self.ssh_port: int | None = None
        self.ssh_timeout = ssh_timeout
        self._wait_ssh = wait_for_ssh
        self._root_ports = 0
        self._fixed_args = list(self._extra_args)
        self._devices: list[str] = []

    # ---- configuration ---------------------------------------------------

    def add_vfio_user_device(self, socket_path: Path | str, *, device_id: str | None = None) -> str:
        """Plug a vfio-user device (e.g. a VVU function) on a new root port; returns its id.

        Cold-plugged only: QEMU 11.1.3 aborts on unplugging a vfio-user device
        with MSI-X (DESIGN decision 3).
        """
        if self._proc is not None:
            raise MachineError("add_vfio_user_device() after launch()")
        index = self._root_ports
        self._root_ports += 1
        dev_id = device_id or f"vvu{index}"
        self._devices += render_devices(VvuFunctionDevice(index, Path(socket_path), id=dev_id))
        return dev_id

    # ---- lifecycle ----------------------------------------------------------

    def launch(self) -> None:
        """Start QEMU with SSH forwarded to a free port (retried if it was taken meanwhile)."""
        for attempt in range(3):
            port = self._want_port or free_port()
            self._compose_args(port)
            try:
                super().launch()
            except MachineLaunchError as e:
                taken = "host forwarding" in e.stderr
                if not taken or self._want_port is not None or attempt == 2:
                    raise
                self._proc = None  # shut down already: launch again with another port
                continue
            self.ssh_port = port
            self._write_ssh_config()
            return

    def _compose_args(self, ssh_port: int) -> list[str]:
        """The QEMU arguments after the kernel's: IOMMU, disk, rng, NIC, vfio-user devices."""
        self._extra_args = [
            *self._fixed_args,
            *render_devices(SshForward(ssh_port, host=self.ssh_host)),
            *self._devices,
        ]
        return list(self._extra_args)

    def __enter__(self) -> ApplianceMachine:
        super().__enter__()
        if self._wait_ssh:
            try:
                self.wait_for_ssh()
            except BaseException:
                self.shutdown()
                raise
        return self

    def wait_for_ssh(self, timeout: float | None = None) -> None:
        """Wait until sshd answers on :attr:`ssh_port`."""
        if self.ssh_port is None:
            raise MachineError(f"machine {self.name} is not running")
        budget = self.ssh_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        while not ssh_banner(self.ssh_port).startswith(b"SSH-"):
            if not self.is_running():
                raise MachineError(f"{self.name} exited while waiting for sshd")
            if time.monotonic() > deadline:
                status = ""
                with contextlib.suppress(MachineError):
                    _, status = self.console.run("systemctl status ssh --no-pager", 20)
                raise MachineTimeout(
                    f"no sshd on 127.0.0.1:{self.ssh_port} of {self.name} within "
                    f"{budget:.0f} s:\n{status}"
                )
            time.sleep(0.5)

    # ---- SSH ----------------------------------------------------------------

    @property
    def ssh_alias(self) -> str:
        """The host name :attr:`ssh_config_path` defines for this machine."""
        return f"vvu-{self.name}"

    @property
    def ssh_config_path(self) -> Path:
        """An OpenSSH client config for this machine (``ssh -F PATH ALIAS``)."""
        if self.temp_dir is None:
            raise MachineError(f"machine {self.name} is not running")
        return self.temp_dir / "ssh_config"

    def _write_ssh_config(self) -> None:
        self.ssh_config_path.write_text(
            f"Host {self.ssh_alias}\n"
            f"    HostName {self.ssh_host}\n"
            f"    Port {self.ssh_port}\n"
            f"    User {self.ssh_user}\n"
            f"    IdentityFile {self.ssh_key}\n"
            "    IdentitiesOnly yes\n"
            # A fresh host key every boot, ports reused by other machines.
            "    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n"
            "    LogLevel ERROR\n"
        )

    def ssh_argv(self, *command: str) -> list[str]:
        """``ssh`` (the host's client) into the appliance as root, running ``command``."""
        return ["ssh", "-F", str(self.ssh_config_path), self.ssh_alias, *command]

    def testinfra_host(self) -> Any:
        """A ``testinfra.host.Host`` on the paramiko backend, root with the image's key."""
        import testinfra

        return testinfra.get_host(
            f"paramiko://{self.ssh_alias}", ssh_config=str(self.ssh_config_path)
        )


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _allocated(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_blocks * 512
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _image_row(image: ApplianceImage, state: str) -> list[str]:
    built = time.strftime("%Y-%m-%d %H:%M", time.localtime(image.built_at))
    return [
        image.name,
        state,
        _human_size(_allocated(image.disk)),
        f"{image.build_seconds:.0f} s",
        built,
        str(image.disk),
    ]


HEADER = ("appliance", "state", "disk used", "build", "built at", "image")


def _boot(toolchain: Toolchain, name: str, *, persistent: bool, output_dir: Path | None,
          config: Path | None = None) -> int:
    image = build_appliance(toolchain, name, output_dir=output_dir)
    _say(f"booting {image.disk} ({'persistent' if persistent else 'throwaway overlay'})…")
    start = time.monotonic()
    text = None
    if config is not None:
        from vvu_runtime.appliance.config import ConfigError, parse_config

        text = config.read_text()
        try:
            parse_config(text, str(config))
        except ConfigError as e:
            _say(f"error: {e}")
            return 1
    try:
        with ApplianceMachine(toolchain, image, persistent=persistent, config=text) as vm:
            _say(f"{name} is up after {time.monotonic() - start:.0f} s")
            print(f"ssh:     {shlex.join(vm.ssh_argv())}", flush=True)
            if vm.temp_dir is not None:
                print(f"console: {vm.temp_dir / 'console.log'}", flush=True)
            print("Ctrl-C stops it.", flush=True)
            while vm.is_running():
                time.sleep(1)
            _say(f"{name} exited")
    except MachineError as e:
        _say(f"error: {e}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vvu-appliance",
        description="Build vvu's appliance images (mkosi, appliances/) and show their state.",
        epilog="Images land in the checkout's images/; caches in $VVU_CACHE_DIR/appliances.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="build appliances that are not up to date")
    p_build.add_argument("names", nargs="*", metavar="NAME", help="default: all appliances")
    p_build.add_argument(
        "--force", action="store_true", help="rebuild from scratch (drops mkosi's cache)"
    )
    p_build.add_argument("--output-dir", type=Path, help="instead of images/")
    p_status = sub.add_parser("status", help="table of the appliances and their images")
    p_status.add_argument("--output-dir", type=Path, help="instead of images/")
    p_boot = sub.add_parser("boot", help="build if needed, boot, wait for Ctrl-C")
    p_boot.add_argument("name", metavar="NAME")
    p_boot.add_argument(
        "--persistent", action="store_true", help="keep the guest's writes in the image"
    )
    p_boot.add_argument("--output-dir", type=Path, help="instead of images/")
    p_boot.add_argument("--config", type=Path,
                        help="appliance config (JSON/YAML) passed as the vvu.appliance credential")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_main(lambda: _command(args), program="vvu-appliance")


def _command(args: argparse.Namespace) -> int:
    tc = Toolchain()
    if args.cmd == "build":
        rows = []
        for name in args.names or appliance_names(tc):
            start = time.monotonic()
            image = build_appliance(tc, name, force=args.force, output_dir=args.output_dir)
            took = time.monotonic() - start
            state = f"built ({took:.0f} s)" if image.rebuilt else "up to date"
            rows.append(_image_row(image, state))
        _print_table(HEADER, rows)
    elif args.cmd == "status":
        rows = []
        for st in appliance_status(tc, output_dir=args.output_dir):
            if st.image is None:
                rows.append([st.name, st.state, "-", "-", "-", str(st.where)])
            else:
                rows.append(_image_row(st.image, st.state))
        _print_table(HEADER, rows)
        return 0 if all(r[1] == "up to date" for r in rows) else 1
    elif args.cmd == "boot":
        return _boot(tc, args.name, persistent=args.persistent, output_dir=args.output_dir,
                     config=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
