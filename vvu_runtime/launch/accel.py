"""Which accelerator a VM gets: KVM when it can run a stock guest, else TCG.

Having ``/dev/kvm`` is not enough: some hosts (``kvm_pvm``, a paravirtual KVM)
accept ``-accel kvm`` but stop a stock kernel with an emulation error. So the
probe boots the consumer kernel for real (no initrd: it panics at once with
"VFS: Unable to mount root fs", which proves the guest ran) and only then
trusts KVM. ``VVU_ACCEL=kvm|tcg|auto`` overrides the choice.

Errors: :class:`AccelError` (only when KVM is forced and unusable).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vvu_runtime.errors import VvuError
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError, stop_process_group

log = logging.getLogger(__name__)

__all__ = ["AccelChoice", "AccelError", "Accelerator", "choose_accelerator"]

#: Seen on the serial console when the probe guest really ran (and died).
_PROBE_OK = re.compile(r"Kernel panic|VFS: Unable to mount root|Run /init|Linux version")
_PROBE_FAIL = re.compile(r"KVM internal error|emulation failure|failed to initialize kvm", re.I)
PROBE_TIMEOUT = 45.0


class AccelError(VvuError):
    """The requested accelerator cannot be used here."""


class Accelerator(enum.Enum):
    """A QEMU accelerator and the CPU model that goes with it."""

    KVM = "kvm"
    TCG = "tcg"

    def qemu_args(self) -> list[str]:
        if self is Accelerator.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        # TCG: "max" gives the guest every feature TCG emulates (x86-64-v3 and more).
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]


@dataclass(frozen=True)
class AccelChoice:
    accel: Accelerator
    reason: str


_cache: dict[Path, AccelChoice] = {}


def _kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def probe_kvm(toolchain: Toolchain, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the consumer kernel under KVM until it panics: (usable, why)."""
    if problem := _kvm_device_problem():
        return False, problem
    try:
        kernel = toolchain.path("kernel")
    except ToolchainError as e:
        return False, f"no kernel to probe KVM with ({e})"
    pvm = " (kvm_pvm module loaded)" if Path("/sys/module/kvm_pvm").exists() else ""
    argv = toolchain.command(
        [
            "qemu-system-x86_64",
            *Accelerator.KVM.qemu_args(),
            "-machine", "q35", "-m", "128M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio",
            "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 loglevel=4",
        ]
    )  # fmt: skip
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            verdict: tuple[bool, str] | None = None
            while verdict is None:
                time.sleep(0.2)
                out.seek(0)
                text = out.read().decode(errors="replace")
                if _PROBE_OK.search(text):
                    verdict = (True, f"a stock kernel boots under KVM{pvm}")
                elif m := _PROBE_FAIL.search(text):
                    verdict = (False, f"-accel kvm fails: {m.group(0)!r}{pvm}")
                elif proc.poll() is not None:
                    last = text.strip().splitlines()[-1:] or ["no output"]
                    verdict = (False, f"QEMU with -accel kvm exited {proc.returncode}: {last[0]}")
                elif time.monotonic() - start > timeout:
                    verdict = (
                        False,
                        f"a stock kernel did not start under KVM in {timeout:.0f} s{pvm}",
                    )
        finally:
            stop_process_group(proc, grace=3.0)
    return verdict


def _probe_key(toolchain: Toolchain) -> str:
    # Valid until the host reboots (KVM modules may change) or the tools tree changes.
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        tree = toolchain.stamp_file.read_text()
    except OSError:
        return ""
    return hashlib.sha256(f"{boot_id}\0{tree}".encode()).hexdigest()


def _probe_file(toolchain: Toolchain) -> Path:
    return toolchain.cache_dir / "accel-probe.json"


def _load_probe(toolchain: Toolchain) -> AccelChoice | None:
    try:
        data = json.loads(_probe_file(toolchain).read_text())
        if data["key"] == _probe_key(toolchain) != "":
            return AccelChoice(Accelerator(data["accel"]), str(data["reason"]) + " (cached probe)")
    except (OSError, ValueError, KeyError):
        pass
    return None


def _save_probe(toolchain: Toolchain, choice: AccelChoice) -> None:
    data = {"key": _probe_key(toolchain), "accel": choice.accel.value, "reason": choice.reason}
    with contextlib.suppress(OSError):
        _probe_file(toolchain).write_text(json.dumps(data) + "\n")


def choose_accelerator(toolchain: Toolchain) -> AccelChoice:
    """KVM if it really runs a stock guest, else TCG; logged once per process.

    ``VVU_ACCEL=tcg`` skips the probe; ``VVU_ACCEL=kvm`` insists (raises
    :class:`AccelError` if KVM cannot run a guest).
    """
    wanted = os.environ.get("VVU_ACCEL", "auto").lower()
    if wanted not in ("auto", "kvm", "tcg"):
        raise AccelError(f"VVU_ACCEL={wanted!r}: expected kvm, tcg or auto")
    if wanted == "tcg":
        return AccelChoice(Accelerator.TCG, "VVU_ACCEL=tcg")
    key = toolchain.tree
    if key not in _cache:
        choice = _load_probe(toolchain)
        if choice is None:
            ok, why = probe_kvm(toolchain)
            if ok:
                choice = AccelChoice(Accelerator.KVM, why)
            else:
                choice = AccelChoice(Accelerator.TCG, f"KVM unusable: {why}; using TCG -cpu max")
            _save_probe(toolchain, choice)
        log.warning("accelerator: %s (%s)", choice.accel.value, choice.reason)
        _cache[key] = choice
    choice = _cache[key]
    if wanted == "kvm" and choice.accel is not Accelerator.KVM:
        raise AccelError(f"VVU_ACCEL=kvm but {choice.reason}")
    return choice
