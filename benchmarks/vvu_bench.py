"""The same consumer workload through an appliance and through the same backend in
host mode, in one run; prints the ratios and kicks / doorbells per I/O.

Storage (one consumer VM, ``vhost-user-blk-pci``, 1 queue, busybox guest):

* host:      consumer QEMU --vhost-user--> ``vvu-blk --socket`` (a host process)
* appliance: consumer QEMU --vhost-user--> ``vvu-devd`` --vfio-user--> storage
  appliance VM --> ``vvu-blk --vvu ADDR`` (vfio-pci behind intel-iommu)

Workload in the consumer: ``dd`` with O_DIRECT, sequential, queue depth 1:
write (ending with one fsync) then read, at 4 KiB and 64 KiB blocks. Per
phase: MB/s and IOPS (dd's own timing), completed requests from
/sys/block/vda/stat, the consumer's virtio interrupts, vvu-devd's per-device
counters (kicks: consumer -> appliance notifications; doorbells: appliance ->
consumer interrupts; tunnelled vhost-user messages), and the host CPU time of
every process on the path (consumer QEMU, vvu-blk | vvu-devd + appliance QEMU)
and, in the appliance, of vvu-blk on its emulated CPU.

Switch (two consumer VMs, ``-netdev vhost-user`` + ``virtio-net-pci``): host
``vvu-switch --port`` vs ``vvu-switch --vvu`` in the vswitch appliance behind
one vvu-devd: ping RTT and the throughput of a busybox nc transfer, with kicks
and doorbells per packet.

    .venv/bin/python benchmarks/vvu_bench.py [--only storage,switch] [--mib4k 8] [--mib64k 32]
        [--doorbell-bypass] [--direct] [--engines vvu-blk,qsd]

``--engines vvu-blk,qsd`` measures four storage setups with the same consumer
workload: vvu-blk and qemu-storage-daemon (the tools tree's, one
vhost-user-blk export of a raw file, ``appliance/qsd.py``'s command line) on
the host, and the same two in the storage appliance, qemu-storage-daemon
there behind ``vvu-proxy`` (the appliance's ``engine: qsd``). It adds a table
of their IOPS and ratios (appl-qsd / appl-vvu-blk, host-qsd / host-vvu-blk,
appliance / host per engine); the CPU table then also has the host qsd, and
vvu-proxy and qsd on the appliance's CPU.

``--doorbell-bypass`` runs the appliance side with the doorbell companion
(vvu-devd ``--doorbell-socket`` and an ``ivshmem-doorbell`` in the appliance):
consumer calls then bypass vvu-devd, so its ``doorb/IO`` (trapped doorbells)
falls to ~0 while the consumer's ``irqs/IO`` stays.

Needs the tool chain (``./setup``) and builds the appliance images if needed.
Under TCG the appliance's Python runs on an emulated CPU: expect large ratios;
the CPU columns say where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.guest_output import (  # noqa: E402
    block_requests,
    parse_dd,
    parse_times,
    timed,
)
from benchmarks.host_daemon import HostDaemon  # noqa: E402
from benchmarks.process_cpu import StatError, cpu_ticks, proc_cpu, tree_cpu  # noqa: E402
from benchmarks.ratio_table import Column, ratio, render_table  # noqa: E402
from vvu_runtime.appliance import qsd  # noqa: E402
from vvu_runtime.appliance.config import Export, FileExport  # noqa: E402
from vvu_runtime.launch.appliance import ApplianceMachine, build_appliance  # noqa: E402
from vvu_runtime.launch.initramfs import ConsumerAssets, consumer_assets  # noqa: E402
from vvu_runtime.launch.machine import GuestConsole, QemuMachine  # noqa: E402
from vvu_runtime.launch.process import (  # noqa: E402
    ApplianceProcess,
    BackendProcess,
    DeviceCounters,
    DeviceModelProcess,
    VvuLink,
)
from vvu_runtime.launch.render import (  # noqa: E402
    BlkDevice,
    DoorbellCompanion,
    NetDevice,
    render_devices,
)
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError  # noqa: E402

CONSUMER_MIB = 256
#: vvu-devd's default --max-queues; the companion has one vector more (devd's fence).
DEVD_MAX_QUEUES = 64
DISK_MIB = 128
#: The storage engines --engines can name: vvu's own, and qemu-storage-daemon (a
#: host process in host mode; behind vvu-proxy in the appliance, appliance/qsd.py).
ENGINES = ("vvu-blk", "qsd")
#: Mode names of each engine's two setups (vvu-blk's are the historical ones).
MODES = {"vvu-blk": ("host", "appliance"), "qsd": ("host-qsd", "appl-qsd")}
QSD = "qemu-storage-daemon"


# --------------------------------------------------------------------------- helpers

def say(msg: str) -> None:
    print(f"vvu_bench: {msg}", file=sys.stderr, flush=True)


def blk_consumer(tc: Toolchain, assets: ConsumerAssets, sock: Path, ram: Path | None
                 ) -> QemuMachine:
    return QemuMachine(
        tc, name="bench-blk", kernel=assets.kernel, initrd=assets.initrd,
        memory_mib=CONSUMER_MIB, memory_file=ram,
        args=render_devices(BlkDevice("blk0", sock, reconnect_ms=300)))


def net_consumer(tc: Toolchain, assets: ConsumerAssets, name: str, sock: Path,
                 ram: Path | None, ip: str, mac: str) -> QemuMachine:
    return QemuMachine(
        tc, name=name, kernel=assets.kernel, initrd=assets.initrd, append=f"vvu.ip={ip}/24",
        memory_mib=CONSUMER_MIB, memory_file=ram,
        args=render_devices(NetDevice("net0", sock, mac)))


def guest_irqs(c: GuestConsole) -> int:
    """Interrupts of the consumer's virtio queues (all CPUs, config interrupts excluded)."""
    total = 0
    for line in c.check("grep virtio /proc/interrupts || true").splitlines():
        words = line.split()
        if not words or "config" in line:
            continue
        total += sum(int(w) for w in words[1:] if w.isdigit())
    return total


@contextlib.contextmanager
def appliance_vm(tc: Toolchain, name: str, sockets: Sequence[Path],
                 doorbell: Path | None = None) -> Iterator[ApplianceMachine]:
    image = build_appliance(tc, name)
    vm = ApplianceMachine(tc, image, doorbell=None if doorbell is None else
                          DoorbellCompanion(doorbell, DEVD_MAX_QUEUES + 1))
    for s in sockets:
        vm.add_vfio_user_device(s)
    start = time.monotonic()
    with vm:
        say(f"{name} appliance up in {time.monotonic() - start:.0f} s")
        vm.console.check("dmesg -n 1")
        vm.console.check("systemctl mask --runtime --now vvu-switch.service vvu-blk.service "
                         ">/dev/null 2>&1")
        yield vm


def vvu_functions(vm: ApplianceMachine) -> list[str]:
    out = vm.console.check("grep -l 0x107f /sys/bus/pci/devices/*/device || true")
    return sorted(Path(p).parent.name for p in out.split() if p.endswith("/device"))


def appliance_shell(vm: ApplianceMachine) -> Callable[[str], str]:
    def run(cmd: str) -> str:
        return vm.console.check(cmd, timeout=300)
    return run


def guest_proc_cpu(vm: ApplianceMachine, pid: int | None, tick: int) -> float:
    """CPU seconds of a process inside the appliance (on its emulated CPU)."""
    if pid is None:
        return 0.0
    out = vm.console.check(f"cat /proc/{pid}/stat 2>/dev/null || true").strip()
    try:
        return cpu_ticks(out) / tick
    except StatError:
        return 0.0  # it is gone


# --------------------------------------------------------------------------- storage

@dataclass(frozen=True)
class Phase:
    op: str  # "write" or "read"
    block: int
    mib: int
    jobs: int = 1  # dd processes side by side, each on its own part of the disk

    @property
    def name(self) -> str:
        return f"{self.op} {self.block >> 10} KiB" + (f" x{self.jobs}" if self.jobs > 1 else "")

    @property
    def count(self) -> int:
        return (self.mib << 20) // self.block

    def command(self) -> str:
        """The dd(s), timed by the guest's clock (busybox dd prints no timing here)."""
        n = self.count // self.jobs
        dds = []
        for j in range(self.jobs):
            if self.op == "write":
                dds.append(f"dd if=/tmp/src of=/dev/vda bs={self.block} count={n} skip={j * n} "
                           f"seek={j * n} oflag=direct conv=fsync")
            else:
                dds.append(f"dd if=/dev/vda of=/dev/null bs={self.block} count={n} "
                           f"skip={j * n} iflag=direct")
        run = dds[0] + " 2>&1" if self.jobs == 1 else \
            " ".join(f"( {dd} 2>&1 ) &" for dd in dds) + " wait"
        return timed(run)


@dataclass
class Sample:
    mode: str
    phase: Phase
    seconds: float
    nbytes: int
    ios: int  # requests the guest completed (reads + writes + flushes)
    irqs: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds
    counters: dict[str, int] = field(default_factory=dict)  # vvu-devd deltas

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def iops(self) -> float:
        return self.phase.count / self.seconds


def _blk_stat(c: GuestConsole) -> int:
    return block_requests(c.check("cat /sys/block/vda/stat"))


class Probe:
    """What to read around each phase: host processes, vvu-devd, the appliance's
    processes (name -> pid there, read on its emulated CPU)."""

    def __init__(self, processes: dict[str, int | None],
                 devd: DeviceModelProcess | None = None, device: str = "",
                 guest: tuple[ApplianceMachine, dict[str, Sequence[int]], int] | None = None,
                 trees: dict[str, int | None] | None = None) -> None:
        self.processes = processes
        self.devd = devd
        self.device = device
        self.guest = guest
        #: Host processes counted with everything below them (a tools-tree daemon's
        #: ``mkosi sandbox`` wrapper: constant between snapshots).
        self.trees = trees or {}

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        cpu = {name: proc_cpu(pid) for name, pid in self.processes.items()}
        cpu |= {name: tree_cpu(pid) for name, pid in self.trees.items()}
        if self.guest is not None:
            vm, pids, tick = self.guest
            for name, some in pids.items():
                cpu[f"{name} (guest CPU)"] = sum(guest_proc_cpu(vm, p, tick) for p in some)
        counters: dict[str, int] = {}
        if self.devd is not None:
            row: DeviceCounters = self.devd.counters()[self.device]
            counters = row.numbers()
            counters["messages"] = row.messages
        return cpu, counters


def run_phase(mode: str, c: GuestConsole, phase: Phase, probe: Probe) -> Sample:
    ios0, irq0 = _blk_stat(c), guest_irqs(c)
    cpu0, cnt0 = probe.snapshot()
    out = c.check(phase.command(), timeout=3600)
    cpu1, cnt1 = probe.snapshot()
    ios1, irq1 = _blk_stat(c), guest_irqs(c)
    done = sum(r.full for r in parse_dd(out))
    if done != phase.count:
        raise RuntimeError(f"dd did not complete {phase.count} blocks: {out!r}")
    seconds = parse_times(out)
    s = Sample(mode, phase, seconds, phase.count * phase.block, ios1 - ios0, irq1 - irq0,
               {k: cpu1[k] - cpu0[k] for k in cpu1},
               {k: cnt1[k] - cnt0.get(k, 0) for k in cnt1})
    say(f"{mode:>9}  {phase.name:<13} {s.mbps:8.2f} MB/s {s.iops:9.0f} IOPS  "
        f"({s.ios} requests, {s.seconds:.1f} s)")
    return s


def prepare(c: GuestConsole, phases: Sequence[Phase]) -> None:
    most = max(p.mib for p in phases)
    c.check(f"dd if=/dev/urandom of=/tmp/src bs=1M count={most} 2>/dev/null", timeout=300)
    # Warm-up: the connect path, the first touches of the image.
    c.check("dd if=/tmp/src of=/dev/vda bs=65536 count=16 oflag=direct conv=fsync 2>/dev/null",
            timeout=300)
    c.check("dd if=/dev/vda of=/dev/null bs=4096 count=64 iflag=direct 2>/dev/null",
            timeout=300)


def qsd_export(image: str) -> Export:
    """The export qemu-storage-daemon serves, in host mode and in the appliance alike
    (appliance/qsd.py renders both command lines from it): a raw file, writable."""
    return Export(name="disk", disk=None, file=FileExport("bench", image, DISK_MIB << 20),
                  readonly=False, engine="qsd")


def storage_host(tc: Toolchain, assets: ConsumerAssets, work: Path,
                 phases: Sequence[Phase], *, engine: str = "vvu-blk",
                 direct: bool = False) -> list[Sample]:
    image = work / f"host-disk-{engine}.raw"
    with image.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    sock = work / f"blk-{engine}.sock"
    mode = MODES[engine][0]
    server: BackendProcess | HostDaemon
    if engine == "qsd":
        # The same command line as in the appliance (one queue: the consumer uses one);
        # direct = write-through there, so the same here.
        argv = qsd.qsd_argv(qsd_export(str(image)), image, sock, queues=1, direct=direct)
        server = HostDaemon(tc.command, argv, sock, work / "qsd-host.log")
        name = "qsd (host)"
    else:
        server = BackendProcess("vvu-blk", ["--socket", str(sock), "--image", str(image)]
                                + (["--direct"] if direct else []), [sock],
                                work / "vvu-blk-host.log", ready="listening on")
        name = "vvu-blk (host)"
    with server, blk_consumer(tc, assets, sock, None) as vm:
        c = vm.console
        prepare(c, phases)
        if isinstance(server, HostDaemon):
            assert server.proc is not None
            probe = Probe({"consumer QEMU": vm.qemu_pid}, trees={name: server.proc.pid})
        else:
            probe = Probe({"consumer QEMU": vm.qemu_pid, name: server.pid})
        return [run_phase(mode, c, p, probe) for p in phases]


def appliance_engine(avm: ApplianceMachine, fn: str, engine: str, direct: bool,
                     extra: Sequence[str] = ()) -> ApplianceProcess:
    """The engine's process in the appliance, started on VVU function ``fn``
    (``extra``: more vvu-blk options)."""
    shell = appliance_shell(avm)
    if engine == "qsd":
        run_dir = Path("/run/vvu")
        shell(f"mkdir -p {run_dir}")
        image = "/root/disk.raw"
        # vvu-proxy starts qemu-storage-daemon and logs "ready" once it connected to it.
        return ApplianceProcess(
            shell, qsd.proxy_argv(qsd_export(image), fn, Path(image), run_dir, queues=1,
                                  direct=direct),
            "/root/vvu-proxy", ready="BACKEND_UP (its back-end connected): ready")
    return ApplianceProcess(shell, ["vvu-blk", "--vvu", fn, "--image", "/root/disk.raw"]
                            + (["--direct"] if direct else []) + list(extra),
                            "/root/vvu-blk", ready="ready for a front-end")


def guest_pids(avm: ApplianceMachine, program: str) -> list[int]:
    """Every process of ``program`` in the appliance (a forking daemon has several)."""
    return [int(p) for p in avm.console.check(f"pidof {program} || true").split()]


def storage_appliance(tc: Toolchain, assets: ConsumerAssets, work: Path,
                      phases: Sequence[Phase], *, engine: str = "vvu-blk",
                      bypass: bool = False, direct: bool = False) -> list[Sample]:
    link = VvuLink.in_dir(work, f"disk-{engine}", ram_prefix="vvu-bench-")
    doorbell = work / f"doorbell-{engine}.sock" if bypass else None
    devd = DeviceModelProcess(
        [link], work / f"devd-blk-{engine}.log", ram_mib=CONSUMER_MIB,
        args=["--max-queues", str(DEVD_MAX_QUEUES)]
        + (["--doorbell-socket", str(doorbell)] if doorbell else []))
    mode = MODES[engine][1]
    with devd, appliance_vm(tc, "storage", [link.vfio_socket], doorbell) as avm:
        fn = vvu_functions(avm)[0]
        avm.console.check(f"truncate -s {DISK_MIB}M /root/disk.raw")
        tick = int(avm.console.check("getconf CLK_TCK || echo 100").split()[0])
        proc = appliance_engine(avm, fn, engine, direct)
        proc.start()
        try:
            assert proc.pid is not None
            guest: dict[str, Sequence[int]] = (
                {"vvu-proxy": [proc.pid], "appl qsd": guest_pids(avm, QSD)} if engine == "qsd"
                else {"appl vvu-blk": [proc.pid]})
            with blk_consumer(tc, assets, link.vhost_socket, link.ram_file) as vm:
                c = vm.console
                prepare(c, phases)
                probe = Probe({"consumer QEMU": vm.qemu_pid, "vvu-devd": devd.pid,
                               "appliance QEMU": avm.qemu_pid}, devd, link.name,
                              (avm, guest, tick))
                return [run_phase(mode, c, p, probe) for p in phases]
        finally:
            proc.stop()


def _notifies(counters: dict[str, int]) -> int:
    """rxq + txq notifies of the VVU device (-1: a vvu-devd without those counters)."""
    if "rxq notifies" not in counters:
        return -1
    return counters["rxq notifies"] + counters["txq notifies"]


def _modes(samples: Sequence[Sample]) -> list[str]:
    """The modes measured, in the order of :data:`MODES`."""
    present = {s.mode for s in samples}
    return [m for pair in MODES.values() for m in pair if m in present]


def print_storage(samples: list[Sample], phases: Sequence[Phase]) -> None:
    by = {(s.mode, s.phase): s for s in samples}
    modes = _modes(samples)
    print()
    print("Storage: dd O_DIRECT in the consumer VM (xN: N dd side by side = queue depth N), "
          "1 queue; MB/s = 10^6 B/s; ratio = appliance / host")
    head = (f"{'workload':<16}{'host MB/s':>11}{'host IOPS':>11}{'appl MB/s':>11}"
            f"{'appl IOPS':>11}{'ratio':>8}")
    print(head)
    print("-" * len(head))
    for p in phases:
        h, a = by.get(("host", p)), by.get(("appliance", p))
        row = f"{p.name:<16}"
        row += f"{h.mbps:>11.2f}{h.iops:>11.0f}" if h else f"{'-':>11}{'-':>11}"
        row += f"{a.mbps:>11.2f}{a.iops:>11.0f}" if a else f"{'-':>11}{'-':>11}"
        row += f"{a.iops / h.iops:>8.3f}" if a and h else f"{'-':>8}"
        print(row)
    if any(m in modes for m in MODES["qsd"]):
        print_engines(by, phases)

    print()
    print("Per I/O (requests the guest completed; appliance: vvu-devd counters)")
    head = (f"{'workload':<16}{'mode':<10}{'reqs':>6}{'irqs/IO':>9}{'kicks/IO':>10}"
            f"{'doorb/IO':>10}{'msgs/IO':>9}{'ntf/IO':>8}")
    print(head)
    print("-" * len(head))
    for p in phases:
        for mode in modes:
            s = by.get((mode, p))
            if s is None or not s.ios:
                continue
            row = f"{p.name:<16}{mode:<10}{s.ios:>6}{s.irqs / s.ios:>9.2f}"
            if s.counters:
                row += (f"{s.counters['kicks'] / s.ios:>10.2f}"
                        f"{s.counters['doorbells'] / s.ios:>10.2f}"
                        f"{s.counters['messages'] / s.ios:>9.2f}")
                ntf = _notifies(s.counters)
                row += f"{ntf / s.ios:>8.2f}" if ntf >= 0 else f"{'n/a':>8}"
            else:
                row += f"{'n/a':>10}{'n/a':>10}{'n/a':>9}{'n/a':>8}"
            print(row)

    print()
    print("Where the time goes: CPU microseconds per I/O of each process on the path "
          "(host CPU; '*' = on the appliance's emulated CPU)")
    names: list[str] = []
    for s in samples:
        names += [n for n in s.cpu if n not in names]
    short = {n: n.replace(" (guest CPU)", "*") for n in names}
    head = f"{'workload':<16}{'mode':<10}{'wall us/IO':>11}" + "".join(
        f"{short[n]:>17}" for n in names)
    print(head)
    print("-" * len(head))
    for p in phases:
        for mode in modes:
            s = by.get((mode, p))
            if s is None or not s.ios:
                continue
            row = f"{p.name:<16}{mode:<10}{s.seconds / s.ios * 1e6:>11.0f}"
            for n in names:
                row += f"{s.cpu[n] / s.ios * 1e6:>17.0f}" if n in s.cpu else f"{'':>17}"
            print(row)
    print("(* guest CPU inside the appliance, in guest clock ticks of "
          "1/CLK_TCK s: coarse for short phases)")


def print_engines(by: dict[tuple[str, Phase], Sample], phases: Sequence[Phase]) -> None:
    """IOPS of the four setups side by side, and the ratios between them."""
    print()
    print("Engines: IOPS of vvu-blk and qemu-storage-daemon (qsd), on the host and in the "
          "storage appliance (qsd behind vvu-proxy)")
    columns = [Column("host vvu-blk", ".0f"), Column("host qsd", ".0f"),
               Column("appl vvu-blk", ".0f"), Column("appl qsd", ".0f"),
               Column("appl-qsd/appl-vvu-blk", ".3f"), Column("host-qsd/host-vvu-blk", ".3f"),
               Column("appl/host vvu-blk", ".3f"), Column("appl/host qsd", ".3f")]
    rows = []
    for p in phases:
        iops = {m: (s.iops if (s := by.get((m, p))) else None)
                for m in ("host", "host-qsd", "appliance", "appl-qsd")}
        rows.append((p.name, [iops["host"], iops["host-qsd"], iops["appliance"],
                              iops["appl-qsd"],
                              ratio(iops["appl-qsd"], iops["appliance"]),
                              ratio(iops["host-qsd"], iops["host"]),
                              ratio(iops["appliance"], iops["host"]),
                              ratio(iops["appl-qsd"], iops["host-qsd"])]))
    for line in render_table("workload", columns, rows):
        print(line)


# --------------------------------------------------------------------------- switch

@dataclass
class NetResult:
    mode: str
    rtt_ms: tuple[float, float, float]  # min / avg / max
    kib: int
    seconds: float
    packets: int
    counters: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def mbps(self) -> float:
        return self.kib * 1024 / self.seconds / 1e6


def _packets(c: GuestConsole) -> int:
    """Frames this guest sent (each crosses the switch once)."""
    return int(c.check("cat /sys/class/net/eth0/statistics/tx_packets"))


def _wait_ping(c: GuestConsole, peer: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while c.run(f"ping -c 1 -W 2 {peer}")[0] != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{peer} unreachable")


def net_run(mode: str, a: GuestConsole, b: GuestConsole, kib: int, pings: int,
            counters: Callable[[], dict[str, int]], processes: dict[str, int | None]
            ) -> NetResult:
    _wait_ping(a, "10.0.0.2")
    out = a.check(f"ping -c {pings} -i 0.2 -W 5 10.0.0.2", timeout=600)
    m = re.search(r"min/avg/max = ([0-9.]+)/([0-9.]+)/([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"unexpected ping output: {out!r}")
    rtt = (float(m.group(1)), float(m.group(2)), float(m.group(3)))
    a.check(f"dd if=/dev/urandom of=/tmp/send bs=1024 count={kib} 2>/dev/null", timeout=300)
    sent = a.check("sha256sum /tmp/send").split()[0]
    # stdin a pipe that never delivers: a background nc reading the console stops (SIGTTIN)
    b.check("rm -f /tmp/recv; (sleep 100000 | nc -l -p 5000 > /tmp/recv) >/dev/null 2>&1 &")
    time.sleep(0.5)
    pk0, cnt0 = _packets(a) + _packets(b), counters()
    cpu0 = {n: proc_cpu(p) for n, p in processes.items()}
    start = time.monotonic()
    a.check("nc -w 10 10.0.0.2 5000 < /tmp/send", timeout=3600)
    while int(b.check("wc -c < /tmp/recv").strip() or 0) < kib * 1024:
        if time.monotonic() - start > 3600:
            raise RuntimeError("the transfer did not complete")
        time.sleep(0.05)
    took = time.monotonic() - start
    cpu1 = {n: proc_cpu(p) for n, p in processes.items()}
    pk1, cnt1 = _packets(a) + _packets(b), counters()
    got = b.check("sha256sum /tmp/recv").split()[0]
    if got != sent:
        raise RuntimeError(f"{mode}: sent sha256 {sent}, received {got}")
    r = NetResult(mode, rtt, kib, took, pk1 - pk0,
                  {k: cnt1[k] - cnt0.get(k, 0) for k in cnt1},
                  {n: cpu1[n] - cpu0[n] for n in cpu1})
    say(f"{mode:>9}  ping avg {rtt[1]:.2f} ms, {kib} KiB in {took:.2f} s = {r.mbps:.2f} MB/s")
    return r


def _net_vms(tc: Toolchain, assets: ConsumerAssets, socks: Sequence[Path],
             rams: Sequence[Path | None], stack: contextlib.ExitStack) -> list[QemuMachine]:
    vms = [net_consumer(tc, assets, f"bench-net{i}", socks[i], rams[i], f"10.0.0.{i + 1}",
                        f"52:54:00:00:00:0{i + 1}") for i in range(2)]
    for vm in vms:
        stack.callback(vm.shutdown)
        vm.launch()
    for vm in vms:
        vm.wait_for_boot()
    return vms


def switch_host(tc: Toolchain, assets: ConsumerAssets, work: Path, kib: int,
                pings: int) -> NetResult:
    socks = [work / "sw-a.sock", work / "sw-b.sock"]
    sw = BackendProcess("vvu-switch", ["--port", f"a={socks[0]}", "--port", f"b={socks[1]}"],
                        socks, work / "vvu-switch-host.log")
    with sw, contextlib.ExitStack() as stack:
        vms = _net_vms(tc, assets, socks, [None, None], stack)
        return net_run("host", vms[0].console, vms[1].console, kib, pings, dict,
                       {"vvu-switch (host)": sw.pid}
                       | {f"consumer QEMU {i}": vm.qemu_pid for i, vm in enumerate(vms)})


def switch_appliance(tc: Toolchain, assets: ConsumerAssets, work: Path, kib: int,
                     pings: int) -> NetResult:
    links = [VvuLink.in_dir(work, n, ram_prefix="vvu-bench-") for n in ("a", "b")]
    devd = DeviceModelProcess(links, work / "devd-net.log", ram_mib=CONSUMER_MIB)
    with devd, appliance_vm(tc, "vswitch", [ln.vfio_socket for ln in links]) as avm:
        fns = vvu_functions(avm)
        sw = ApplianceProcess(appliance_shell(avm),
                              ["vvu-switch", "--vvu", f"a={fns[0]}", "--vvu", f"b={fns[1]}"],
                              "/root/vvu-switch", ready="ready for a front-end")
        sw.start()
        sw.wait_for("ready for a front-end", 300, count=2)
        try:
            with contextlib.ExitStack() as stack:
                vms = _net_vms(tc, assets, [ln.vhost_socket for ln in links],
                               [ln.ram_file for ln in links], stack)

                def counters() -> dict[str, int]:
                    rows = devd.counters()
                    return {k: rows["a"].numbers()[k] + rows["b"].numbers()[k]
                            for k in ("kicks", "doorbells")}

                return net_run("appliance", vms[0].console, vms[1].console, kib, pings,
                               counters, {"vvu-devd": devd.pid, "appliance QEMU": avm.qemu_pid}
                               | {f"consumer QEMU {i}": vm.qemu_pid
                                  for i, vm in enumerate(vms)})
        finally:
            sw.stop()


def print_switch(results: list[NetResult]) -> None:
    by = {r.mode: r for r in results}
    print()
    print("Switch: two consumer VMs, ping RTT (ms) and one busybox nc transfer "
          "(MB/s = 10^6 B/s; ratio = appliance / host)")
    head = (f"{'metric':<26}{'host':>12}{'appliance':>12}{'ratio':>8}")
    print(head)
    print("-" * len(head))
    h, a = by.get("host"), by.get("appliance")

    def row(name: str, hv: float | None, av: float | None, fmt: str = ".2f") -> None:
        line = f"{name:<26}"
        line += f"{hv:>12{fmt}}" if hv is not None else f"{'-':>12}"
        line += f"{av:>12{fmt}}" if av is not None else f"{'-':>12}"
        line += f"{av / hv:>8.2f}" if hv and av is not None else f"{'-':>8}"
        print(line)

    row("ping RTT min (ms)", h.rtt_ms[0] if h else None, a.rtt_ms[0] if a else None)
    row("ping RTT avg (ms)", h.rtt_ms[1] if h else None, a.rtt_ms[1] if a else None)
    row("ping RTT max (ms)", h.rtt_ms[2] if h else None, a.rtt_ms[2] if a else None)
    row("nc MB/s", h.mbps if h else None, a.mbps if a else None)
    row("frames switched", h.packets if h else None, a.packets if a else None, ".0f")
    if a and a.packets:
        print(f"appliance per frame switched (sent by either guest): "
              f"{a.counters['kicks'] / a.packets:.2f} kicks, "
              f"{a.counters['doorbells'] / a.packets:.2f} doorbells")
    for r in (h, a):
        if r is not None:
            cpu = ", ".join(f"{n} {v:.2f} s" for n, v in r.cpu.items() if v)
            print(f"{r.mode} CPU during the transfer ({r.seconds:.2f} s wall): {cpu}")


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="storage,switch",
                        help="what to measure: storage, switch or both (comma separated)")
    parser.add_argument("--mib4k", type=int, default=16, help="MiB moved at 4 KiB per phase")
    parser.add_argument("--mib64k", type=int, default=64, help="MiB moved at 64 KiB per phase")
    parser.add_argument("--jobs", type=int, default=4,
                        help="also run the 4 KiB phases with this many dd side by side (1: no)")
    parser.add_argument("--net-kib", type=int, default=16384, help="KiB sent through the switch")
    parser.add_argument("--pings", type=int, default=20, help="pings per RTT figure")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--doorbell-bypass", action="store_true",
                        help="appliance calls through the doorbell companion (ivshmem-doorbell "
                             "served by vvu-devd), not the trapped VVU doorbells")
    parser.add_argument("--direct", action="store_true",
                        help="storage: vvu-blk --direct on both sides, as vvu-launch runs it "
                             "(in the appliance O_DIRECT bounces: BAR2 cannot be pinned)")
    parser.add_argument("--skip-host", action="store_true",
                        help="storage: measure the appliance path only (no host-mode run)")
    parser.add_argument("--engines", default="vvu-blk",
                        help="storage engines, comma separated: vvu-blk, qsd "
                             "(qemu-storage-daemon: on the host, and behind vvu-proxy in the "
                             "appliance); with both, 4 setups and their ratios")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown or not engines:
        parser.error(f"--engines {args.engines!r}: choose from {', '.join(ENGINES)}")

    tc = Toolchain()
    try:
        tc.require_built()
        assets = consumer_assets(tc)
    except ToolchainError as exc:
        print(f"vvu_bench: {exc}", file=sys.stderr)
        return 2
    phases = [Phase(op, block, mib) for block, mib in ((4096, args.mib4k),
                                                       (65536, args.mib64k))
              for op in ("write", "read")]
    if args.jobs > 1:
        phases += [Phase(op, 4096, args.mib4k, args.jobs) for op in ("write", "read")]
    work = Path(tempfile.mkdtemp(prefix="vvu-bench-"))
    say(f"work directory {work}; {os.cpu_count()} host CPUs, load "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    started = time.monotonic()
    try:
        if "storage" in only:
            samples: list[Sample] = []
            for engine in engines:
                if not args.skip_host:
                    samples += storage_host(tc, assets, work, phases, engine=engine,
                                            direct=args.direct)
                samples += storage_appliance(tc, assets, work, phases, engine=engine,
                                             bypass=args.doorbell_bypass, direct=args.direct)
            print_storage(samples, phases)
        if "switch" in only:
            results = [switch_host(tc, assets, work, args.net_kib, args.pings),
                       switch_appliance(tc, assets, work, args.net_kib, args.pings)]
            print_switch(results)
    finally:
        say(f"done in {time.monotonic() - started:.0f} s; load "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
