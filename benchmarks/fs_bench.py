"""virtio-fs through the fs appliance vs virtiofsd on the host: the same consumer
workload in one run; prints throughput, metadata ops/s, CPU per operation and the
appliance / host ratios.

* host:      consumer QEMU --vhost-user-fs--> ``virtiofsd`` (the tools tree's, a
  host process)
* appliance: consumer QEMU --vhost-user--> ``vvu-devd`` --vfio-user--> fs
  appliance VM --> ``vvu-proxy`` --> the appliance's stock ``virtiofsd``
  (as ``examples/fs.yaml`` runs it, appliance/backend.py)

Both virtiofsd share a directory on tmpfs (``/dev/shm``, on the host and in
the appliance), with the same ``--cache`` and ``--sandbox``: what is compared
is the path between the consumer and virtiofsd, not two disks. The consumer is
the consumer image (the lab's default consumer, with dd, coreutils and a
page cache to drop), booted with direct kernel boot, driven over its
serial console; it mounts the share with ``mount -t virtiofs``.

Workload in the consumer, each phase timed by the guest's clock:

* sequential write of one file (``dd`` from /dev/zero, ``oflag=direct
  conv=fsync``), then its read (``iflag=direct`` after dropping the page cache),
  at 4 KiB and 64 KiB blocks. If the mount refuses O_DIRECT, plain dd with
  ``--cache never`` (every request reaches virtiofsd) and the caches dropped
  before each read;
* metadata: create (``touch``), ``stat`` and unlink (``rm``) of N empty files,
  one process per phase so that the guest's fork/exec is not what is measured.

A short untimed warm-up of each kind comes first (without it the first round
was 2-4x slower than the others).

Per phase: MB/s (10^6 B/s) or ops/s, and the host CPU per operation of every
process on the path (consumer QEMU; virtiofsd | vvu-devd + appliance QEMU) and,
in the appliance, of vvu-proxy and virtiofsd on its emulated CPU.

    .venv/bin/python benchmarks/fs_bench.py [--kib4k 4096] [--kib64k 16384] [--files 200]
        [--rounds 3] [--cache never] [--only host,appliance] [--keep]

The whole workload runs ``--rounds`` times per setup; the tables show the
median round of each phase and how far the rounds spread (on a shared
machine single rounds are disturbed by other VMs).

Needs the tool chain (``./setup``; virtiofsd is in the tools tree) and builds
the fs and consumer images if needed. Under TCG the appliance's Python runs on
an emulated CPU: expect large ratios; the CPU columns say where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.guest_output import parse_dd, parse_times, timed  # noqa: E402
from benchmarks.host_daemon import HostDaemon  # noqa: E402
from benchmarks.process_cpu import proc_cpu, tree_cpu  # noqa: E402
from benchmarks.ratio_table import Cell, Column, ratio, render_table  # noqa: E402
from benchmarks.vvu_bench import (  # noqa: E402
    appliance_shell,
    appliance_vm,
    guest_pids,
    guest_proc_cpu,
    vvu_functions,
)
from vvu_runtime.launch.appliance import (  # noqa: E402
    BOOT_BANNER,
    DEBUG_CONSOLE_CREDENTIAL,
    PROMPT,
    ApplianceImage,
    ApplianceMachine,
    build_appliance,
)
from vvu_runtime.launch.machine import GuestConsole, QemuMachine  # noqa: E402
from vvu_runtime.launch.process import ApplianceProcess, DeviceModelProcess, VvuLink  # noqa: E402
from vvu_runtime.launch.render import Credential, FsDevice, Rng, RootDisk, render_devices  # noqa: E402
from vvu_runtime.launch.toolchain import PATH_NAMES, Toolchain, ToolchainError  # noqa: E402

#: The consumer image's RAM (vvu-devd maps the same amount as the VVU function's BAR2).
CONSUMER_MIB = 512
TAG = "share"
MOUNT = "/mnt/share"
#: virtiofsd inside the tools tree and inside the fs appliance (Debian's path, off PATH).
VIRTIOFSD = "/" + PATH_NAMES["virtiofsd"]
#: Where the appliance's virtiofsd shares from and listens (tmpfs, like the host's).
APPLIANCE_SHARE = "/dev/shm/vvu-fs-bench"
APPLIANCE_SOCKET = "/run/vvu/fs/share.sock"
MODES = ("host", "appliance")


def say(msg: str) -> None:
    print(f"fs_bench: {msg}", file=sys.stderr, flush=True)


def virtiofsd_argv(socket: str, directory: str, *, cache: str, sandbox: str) -> list[str]:
    """One virtiofsd serving ``directory`` on ``socket``: the same options on both sides."""
    return [VIRTIOFSD, f"--socket-path={socket}", f"--shared-dir={directory}",
            f"--cache={cache}", f"--sandbox={sandbox}"]


# --------------------------------------------------------------------------- workload

@dataclass(frozen=True)
class FsPhase:
    """One timed step of the consumer's workload."""

    op: str  # write | read | create | stat | unlink
    count: int  # dd blocks, or files
    block: int = 0  # bytes per dd block (0: a metadata phase)

    @property
    def name(self) -> str:
        if self.block:
            return f"{self.op} {self.block >> 10} KiB"
        return f"{self.op} x{self.count}"

    @property
    def nbytes(self) -> int:
        return self.count * self.block

    def command(self, direct: bool) -> str:
        """The phase's shell command in the consumer (untimed; :func:`timed` wraps it)."""
        data = f"{MOUNT}/seq{self.block >> 10}k"
        files = f"$(seq -f {MOUNT}/meta/f%g 1 {self.count})"
        if self.op == "write":
            flag = " oflag=direct" if direct else ""
            return (f"dd if=/dev/zero of={data} bs={self.block} count={self.count}"
                    f"{flag} conv=fsync 2>&1")
        if self.op == "read":
            flag = " iflag=direct" if direct else ""
            return f"dd if={data} of=/dev/null bs={self.block} count={self.count}{flag} 2>&1"
        if self.op == "create":
            return f"touch {files}"
        if self.op == "stat":
            return f"stat -c %s {files} > /dev/null"
        if self.op == "unlink":
            return f"rm {files}"
        raise ValueError(f"unknown fs phase {self.op!r}")

    def setup(self) -> str:
        """Untimed, before the phase: reads start from an empty page cache."""
        if self.op == "read":
            return "sync; echo 3 > /proc/sys/vm/drop_caches"
        if self.op == "create":
            return f"rm -rf {MOUNT}/meta && mkdir {MOUNT}/meta"
        return "true"


def phases(kib4k: int, kib64k: int, files: int) -> list[FsPhase]:
    out = []
    for block, kib in ((4096, kib4k), (65536, kib64k)):
        count = (kib << 10) // block
        out += [FsPhase("write", count, block), FsPhase("read", count, block)]
    out += [FsPhase(op, files) for op in ("create", "stat", "unlink")]
    return out


@dataclass
class FsSample:
    mode: str
    phase: FsPhase
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds

    @property
    def rate(self) -> float:
        """MB/s (10^6 B/s) of a data phase, ops/s of a metadata phase."""
        if self.phase.block:
            return self.phase.nbytes / self.seconds / 1e6
        return self.phase.count / self.seconds


class Probe:
    """CPU seconds of host processes and of processes in the appliance (on its CPU)."""

    def __init__(self, processes: dict[str, int | None],
                 guest: tuple[ApplianceMachine, dict[str, Sequence[int]], int] | None = None,
                 trees: dict[str, int | None] | None = None) -> None:
        self.processes = processes
        self.guest = guest
        #: Host processes counted with everything below them: the host virtiofsd
        #: runs under mkosi sandbox, and serves from a child of its namespace sandbox.
        self.trees = trees or {}

    def snapshot(self) -> dict[str, float]:
        cpu = {name: proc_cpu(pid) for name, pid in self.processes.items()}
        cpu |= {name: tree_cpu(pid) for name, pid in self.trees.items()}
        if self.guest is not None:
            vm, pids, tick = self.guest
            for name, some in pids.items():
                cpu[f"{name}*"] = sum(guest_proc_cpu(vm, p, tick) for p in some)
        return cpu


def mount_share(c: GuestConsole) -> bool:
    """Mount the share; whether it takes O_DIRECT (FUSE may refuse it: EINVAL)."""
    c.check(f"mkdir -p {MOUNT} && mount -t virtiofs {TAG} {MOUNT}", timeout=120)
    c.check(f"findmnt -n -o FSTYPE {MOUNT} | grep -qx virtiofs")
    rc, _ = c.run(f"dd if=/dev/zero of={MOUNT}/probe bs=4096 count=1 oflag=direct 2>/dev/null "
                  f"&& dd if={MOUNT}/probe of=/dev/null bs=4096 iflag=direct 2>/dev/null",
                  timeout=120)
    c.check(f"rm -f {MOUNT}/probe")
    return rc == 0


def median_sample(samples: Sequence[FsSample]) -> FsSample:
    """The round whose time is the median (the lower one of an even count), with its
    own CPU figures: a shared machine disturbs single rounds, not the middle one."""
    if not samples:
        raise ValueError("no samples")
    return sorted(samples, key=lambda s: s.seconds)[(len(samples) - 1) // 2]


def spread(samples: Sequence[FsSample]) -> float:
    """(slowest - fastest) / median rate: how much the rounds disagreed."""
    rates = [s.rate for s in samples]
    return (max(rates) - min(rates)) / median_sample(samples).rate


def best_rate(samples: Sequence[FsSample]) -> float | None:
    """The fastest round's rate (None without rounds)."""
    return max((s.rate for s in samples), default=None)


def run_phases(mode: str, c: GuestConsole, plan: Sequence[FsPhase], probe: Probe,
               written: Callable[[str], int], rounds: int) -> list[list[FsSample]]:
    """Every phase in the consumer, the whole plan ``rounds`` times; per phase its
    rounds. ``written(name)`` is the size of a file of the share as the server side
    sees it (a write that did not reach it fails the run)."""
    direct = mount_share(c)
    say(f"{mode}: virtiofs mounted; O_DIRECT {'taken' if direct else 'refused: plain dd'}")
    # Warm-up, untimed: the first round was 2-4x slower than the next ones (first
    # touches in the consumer and in virtiofsd).
    warm = [FsPhase("write", 64, 65536), FsPhase("read", 64, 65536), FsPhase("write", 256, 4096),
            FsPhase("create", 50), FsPhase("unlink", 50)]
    for p in warm:
        c.check(f"{p.setup()}; {p.command(direct)} >/dev/null", timeout=600)
    samples: list[list[FsSample]] = [[] for _ in plan]
    for n in range(rounds):
        for i, p in enumerate(plan):
            c.check(p.setup(), timeout=300)
            cpu0 = probe.snapshot()
            out = c.check(timed(p.command(direct)), timeout=3600)
            cpu1 = probe.snapshot()
            if p.block:
                done = sum(r.full for r in parse_dd(out))
                if done != p.count:
                    raise RuntimeError(f"{mode} {p.name}: dd did {done} of {p.count} blocks: "
                                       f"{out!r}")
            if p.op == "write":
                size = written(f"seq{p.block >> 10}k")
                if size != p.nbytes:
                    raise RuntimeError(f"{mode} {p.name}: the server side has {size} bytes, "
                                       f"the consumer wrote {p.nbytes}")
            s = FsSample(mode, p, parse_times(out), {k: cpu1[k] - cpu0[k] for k in cpu1})
            unit = "MB/s" if p.block else "ops/s"
            say(f"{mode:>9}  {p.name:<13} {s.rate:9.2f} {unit}  ({s.seconds:.2f} s, "
                f"round {n + 1})")
            samples[i].append(s)
    c.check(f"sync; umount {MOUNT}", timeout=300)
    return samples


# --------------------------------------------------------------------------- setups

def consumer_vm(tc: Toolchain, image: ApplianceImage, sock: Path, ram: Path | None
                ) -> QemuMachine:
    """The consumer image with one vhost-user-fs-pci; root shell on the serial console."""
    cmdline = " ".join(w for w in image.cmdline.split() if w != "console=ttyS0")
    return QemuMachine(
        tc, name="bench-fs", kernel=image.kernel, initrd=image.initrd, append=cmdline,
        memory_mib=CONSUMER_MIB, memory_file=ram, smp=1,
        args=render_devices(RootDisk(image.disk, snapshot=True), Rng(),
                            Credential(DEBUG_CONSOLE_CREDENTIAL, "1"),
                            FsDevice("fs0", sock, TAG)),
        boot_banner=BOOT_BANNER, prompt=PROMPT, boot_timeout=600)


@contextlib.contextmanager
def host_share() -> Iterator[Path]:
    """The host virtiofsd's directory, on tmpfs like the appliance's."""
    path = Path(tempfile.mkdtemp(prefix="vvu-fs-bench-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fs_host(tc: Toolchain, consumer: ApplianceImage, work: Path, plan: Sequence[FsPhase],
            *, cache: str, sandbox: str, rounds: int) -> list[list[FsSample]]:
    sock = work / "virtiofsd.sock"
    with host_share() as share:
        argv = virtiofsd_argv(str(sock), str(share), cache=cache, sandbox=sandbox)
        with HostDaemon(tc.command, argv, sock, work / "virtiofsd-host.log") as fsd, \
                consumer_vm(tc, consumer, sock, None) as vm:
            say(f"host: consumer up; virtiofsd pid {fsd.pid}")
            assert fsd.proc is not None
            probe = Probe({"consumer QEMU": vm.qemu_pid}, trees={"virtiofsd (host)": fsd.proc.pid})
            return run_phases("host", vm.console, plan, probe,
                              lambda name: (share / name).stat().st_size, rounds)


def fs_appliance(tc: Toolchain, consumer: ApplianceImage, work: Path,
                 plan: Sequence[FsPhase], *, cache: str, sandbox: str, rounds: int
                 ) -> list[list[FsSample]]:
    link = VvuLink.in_dir(work, "share", ram_prefix="vvu-fs-bench-")
    # virtio-fs uses 2 queues (hiprio + one request queue): as vvu-launch sizes an fs link.
    devd = DeviceModelProcess([link], work / "devd-fs.log", ram_mib=CONSUMER_MIB,
                              args=["--max-queues", "2"])
    with devd, appliance_vm(tc, "fs", [link.vfio_socket]) as avm:
        shell = appliance_shell(avm)
        shell("systemctl mask --runtime --now vvu-fs.service >/dev/null 2>&1 || true")
        fn = vvu_functions(avm)[0]
        tick = int(shell("getconf CLK_TCK || echo 100").split()[0])
        shell(f"mkdir -p {APPLIANCE_SHARE} {Path(APPLIANCE_SOCKET).parent}")
        fsd = virtiofsd_argv(APPLIANCE_SOCKET, APPLIANCE_SHARE, cache=cache, sandbox=sandbox)
        # As appliance/backend.py runs it: vvu-proxy supervises virtiofsd (which exits
        # when its front-end goes) and says "ready" once it connected to it.
        proxy = ApplianceProcess(
            shell, ["vvu-proxy", "--link", f"{fn}={APPLIANCE_SOCKET}",
                    "--exec", f"{fn}={shlex.join(fsd)}"],
            "/root/vvu-proxy", ready="BACKEND_UP (its back-end connected): ready")
        proxy.start()
        try:
            with consumer_vm(tc, consumer, link.vhost_socket, link.ram_file) as vm:
                say("appliance: consumer up")
                assert proxy.pid is not None
                # virtiofsd's namespace sandbox: a waiting parent and the serving child.
                guest: dict[str, Sequence[int]] = {
                    "vvu-proxy": [proxy.pid], "appl virtiofsd": guest_pids(avm, "virtiofsd")}
                probe = Probe({"consumer QEMU": vm.qemu_pid, "vvu-devd": devd.pid,
                               "appliance QEMU": avm.qemu_pid}, (avm, guest, tick))

                def written(name: str) -> int:
                    return int(shell(f"stat -c %s {APPLIANCE_SHARE}/{name}").strip())

                return run_phases("appliance", vm.console, plan, probe, written, rounds)
        finally:
            proxy.stop()


# --------------------------------------------------------------------------- report

def print_results(rounds: dict[tuple[str, FsPhase], list[FsSample]],
                  plan: Sequence[FsPhase]) -> None:
    """Medians of the rounds, their spread, the ratios; CPU of the median rounds."""
    by = {key: median_sample(some) for key, some in rounds.items()}
    n = max(len(some) for some in rounds.values())
    print()
    print("virtio-fs: the consumer's workload through virtiofsd on the host and through the fs "
          f"appliance (vvu-proxy + virtiofsd); median of {n} rounds, spread = (max - min) / "
          "median; ratio = appliance / host of the medians, best/best = of the fastest rounds "
          "(the least disturbed by the machine's other load)")
    columns = [Column("unit", "s", 7), Column("host", ".2f", 10), Column("spread", ".0%", 8),
               Column("appliance", ".2f"), Column("spread", ".0%", 8), Column("ratio", ".3f", 8),
               Column("best/best", ".3f")]
    rows: list[tuple[str, list[Cell]]] = []
    for p in plan:
        h, a = by.get(("host", p)), by.get(("appliance", p))
        hv, av = (h.rate if h else None), (a.rate if a else None)
        hs = spread(rounds[("host", p)]) if h else None
        as_ = spread(rounds[("appliance", p)]) if a else None
        best = ratio(best_rate(rounds.get(("appliance", p), [])),
                     best_rate(rounds.get(("host", p), [])))
        rows.append((p.name, ["MB/s" if p.block else "ops/s", hv, hs, av, as_,
                              ratio(av, hv), best]))
    for line in render_table("workload", columns, rows):
        print(line)
    samples = list(by.values())

    print()
    print("Where the time goes: CPU microseconds per operation (dd block or file) of each "
          "process on the path (host CPU; '*' = on the appliance's emulated CPU)")
    names: list[str] = []
    for s in samples:
        names += [n for n in s.cpu if n not in names]
    columns = [Column("mode", "s", 11), Column("wall us/op", ".0f")] + [
        Column(n, ".0f", 12) for n in names]
    cpu_rows: list[tuple[str, list[Cell]]] = []
    for p in plan:
        for mode in MODES:
            got = by.get((mode, p))
            if got is None:
                continue
            per = 1e6 / p.count
            cells: list[Cell] = [mode, got.seconds * per]
            cells += [got.cpu[n] * per if n in got.cpu else None for n in names]
            cpu_rows.append((p.name, cells))
    for line in render_table("workload", columns, cpu_rows):
        print(line)
    print("(* in guest clock ticks of 1/CLK_TCK s: coarse for short phases)")


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kib4k", type=int, default=4096, help="KiB moved at 4 KiB blocks")
    parser.add_argument("--kib64k", type=int, default=16384, help="KiB moved at 64 KiB blocks")
    parser.add_argument("--files", type=int, default=200,
                        help="files created, stat'ed and unlinked")
    parser.add_argument("--cache", default="never", choices=["never", "auto", "always",
                                                              "metadata"],
                        help="virtiofsd --cache on both sides (never: every request reaches "
                             "virtiofsd)")
    parser.add_argument("--sandbox", default="namespace", choices=["namespace", "chroot",
                                                                    "none"],
                        help="virtiofsd --sandbox on both sides (the appliance's default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run the whole workload this many times; tables show the "
                             "median round")
    parser.add_argument("--only", default="host,appliance",
                        help="setups to run: host, appliance or both (comma separated)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(MODES) or min(args.kib4k, args.kib64k, args.files, args.rounds) <= 0:
        parser.error("--only takes host and/or appliance; sizes and rounds must be positive")
    plan = phases(args.kib4k, args.kib64k, args.files)

    tc = Toolchain()
    try:
        tc.require_built()
        tc.path("virtiofsd")
        consumer = build_appliance(tc, "consumer")
    except ToolchainError as exc:
        print(f"fs_bench: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vvu-fs-bench-"))
    say(f"work directory {work}; {os.cpu_count()} host CPUs, load "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    started = time.monotonic()
    results: dict[tuple[str, FsPhase], list[FsSample]] = {}
    try:
        if "host" in only:
            got = fs_host(tc, consumer, work, plan, cache=args.cache, sandbox=args.sandbox,
                          rounds=args.rounds)
            results |= {("host", p): some for p, some in zip(plan, got, strict=True)}
        if "appliance" in only:
            got = fs_appliance(tc, consumer, work, plan, cache=args.cache,
                               sandbox=args.sandbox, rounds=args.rounds)
            results |= {("appliance", p): some for p, some in zip(plan, got, strict=True)}
        print_results(results, plan)
    finally:
        say(f"done in {time.monotonic() - started:.0f} s; load "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
