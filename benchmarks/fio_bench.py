"""fio and iperf3 in the consumer image: appliance vs host mode, in one run.

The same consumer workloads through an appliance and through the same backend
in host mode; prints the ratios and what vvu-devd pays per I/O and per frame.

Storage (one consumer VM booted from ``appliances/consumer``, ``snapshot=on``,
with one ``vhost-user-blk-pci`` disk of one queue):

* host:      consumer QEMU --vhost-user--> ``vvu-blk --socket`` (a host process)
* appliance: consumer QEMU --vhost-user--> ``vvu-devd`` --vfio-user--> storage
  appliance VM --> ``vvu-blk --vvu ADDR``; every completion is a trapped VVU
  doorbell (appliance vCPU exit -> QEMU -> REGION_WRITE -> vvu-devd -> call eventfd)
* bypass:    the same with the doorbell companion (vvu-devd ``--doorbell-socket``,
  an ``ivshmem-doorbell`` in the appliance): calls do not pass vvu-devd

Workload in the consumer, per queue depth and direction: ``fio --ioengine=libaio
--direct=1 --rw=randread|randwrite --bs=4k --iodepth=N --time_based`` on the raw
disk, JSON output. Per row: IOPS and mean latency (fio's), the ratio to host
mode, and per request the guest completed (``/sys/block/vdX/stat``): vvu-devd
CPU, trapped doorbells and kicks (vvu-devd's counters), the appliance QEMU's
and the consumer QEMU's CPU, and the backend's CPU (host process, or in the
appliance on its emulated CPU).

Switch (two consumer VMs, ``-netdev vhost-user`` + ``virtio-net-pci``): host
``vvu-switch --port`` vs ``vvu-switch --vvu`` in the vswitch appliance (and the
bypass). ``iperf3 -c`` in one consumer against ``iperf3 -s`` in the other, both
directions (``-R``): Gbit/s received, the ratio to host mode, and per frame
switched (frames both guests sent): vvu-devd CPU, trapped doorbells, kicks.

    .venv/bin/python benchmarks/fio_bench.py [--only storage,switch]
        [--modes host,appliance,bypass] [--depths 1,8,32] [--ops randread,randwrite]
        [--runtime 6] [--iperf-seconds 5] [--json] [--keep DIR]

Progress goes to stderr, the tables (or with ``--json`` one JSON document) to
stdout. Needs the tool chain (``./setup``); builds the storage, vswitch and
consumer images if they are not up to date. Under TCG the appliance's and the
consumer's CPUs are emulated: absolute figures are small, the ratios matter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.guest_output import GuestOutputError, block_requests  # noqa: E402
from benchmarks.process_cpu import proc_cpu  # noqa: E402
from benchmarks.ratio_table import Cell, Column, ratio, render_table  # noqa: E402
from benchmarks.vvu_bench import (  # noqa: E402
    DISK_MIB,
    appliance_engine,
    appliance_shell,
    appliance_vm,
    guest_proc_cpu,
    vvu_functions,
)
from vvu_runtime.launch.appliance import (  # noqa: E402
    BOOT_BANNER,
    DEBUG_CONSOLE_CREDENTIAL,
    PROMPT,
    ApplianceImage,
    build_appliance,
)
from vvu_runtime.launch.machine import GuestConsole, QemuMachine  # noqa: E402
from vvu_runtime.launch.process import (  # noqa: E402
    ApplianceProcess,
    BackendProcess,
    DeviceModelProcess,
    VvuLink,
)
from vvu_runtime.launch.render import (  # noqa: E402
    BlkDevice,
    Credential,
    Device,
    NetDevice,
    Rng,
    RootDisk,
    render_devices,
)
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError  # noqa: E402

#: Storage and switch setups, in the order they run and are printed.
MODES = ("host", "appliance", "bypass")
OPS = ("randread", "randwrite")
DEPTHS = (1, 8, 32)
#: The consumer image is a systemd Debian guest: more RAM than the busybox one.
CONSUMER_MIB = 512
#: vvu-devd's default --max-queues; the companion has one vector more (devd's fence).
DEVD_MAX_QUEUES = 64
SWITCH_NET = "10.0.0"


def say(msg: str) -> None:
    print(f"fio_bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- parsing

def json_document(text: str, what: str) -> dict[str, Any]:
    """The JSON object in ``text``: fio and iperf3 may print warnings before it, and a
    console adds nothing after it but whitespace."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise GuestOutputError(f"no {what} JSON object in {text[-300:]!r}")
    try:
        doc = json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        raise GuestOutputError(f"{what} JSON does not parse ({exc}): "
                               f"{text[start:start + 300]!r}") from None
    if not isinstance(doc, dict):
        raise GuestOutputError(f"{what} JSON is not an object: {text[start:start + 300]!r}")
    return doc


@dataclass(frozen=True)
class FioResult:
    """One fio job's figures (``--output-format=json``, fio 3.x)."""

    version: str  # "fio-3.39"
    rw: str  # "randread" | "randwrite"
    iodepth: int
    iops: float
    bw_bytes: float  # bytes/s
    ios: int  # I/Os fio completed in the measured window (after ramp_time)
    runtime_ms: int
    lat_mean_us: float  # submission to completion
    clat_p99_us: float | None


#: fio's rw option -> the section of its JSON job that holds the figures.
_FIO_SECTION = {"randread": "read", "read": "read", "randwrite": "write", "write": "write"}


def parse_fio(text: str) -> FioResult:
    """The single job of fio's JSON report in ``text``; raises
    :class:`GuestOutputError` for an error, no job or a job that did no I/O."""
    doc = json_document(text, "fio")
    jobs = doc.get("jobs")
    if not isinstance(jobs, list) or len(jobs) != 1:
        raise GuestOutputError(f"fio JSON: expected one job, got "
                               f"{len(jobs) if isinstance(jobs, list) else 'no jobs list'}")
    job = jobs[0]
    if job.get("error"):
        raise GuestOutputError(f"fio job {job.get('jobname')!r} failed: error {job['error']}")
    # A job's own options override the global ones (fio's precedence).
    opts = doc.get("global options", {}) | job.get("job options", {})
    rw = str(opts.get("rw", ""))
    section = _FIO_SECTION.get(rw)
    if section is None:
        raise GuestOutputError(f"fio JSON: rw={rw!r}, expected one of {', '.join(_FIO_SECTION)}")
    s = job.get(section)
    if not isinstance(s, dict):
        raise GuestOutputError(f"fio JSON: job has no {section!r} section")
    try:
        ios = int(s["total_ios"])
        if ios <= 0:
            raise GuestOutputError(f"fio job {job.get('jobname')!r} completed no {section}s")
        pct = s.get("clat_ns", {}).get("percentile", {})
        p99 = pct.get("99.000000")
        return FioResult(
            version=str(doc.get("fio version", "?")), rw=rw,
            iodepth=int(opts.get("iodepth", 1)), iops=float(s["iops"]),
            bw_bytes=float(s["bw_bytes"]), ios=ios, runtime_ms=int(s["runtime"]),
            lat_mean_us=float(s["lat_ns"]["mean"]) / 1000,
            clat_p99_us=None if p99 is None else float(p99) / 1000)
    except (KeyError, TypeError, ValueError) as exc:
        raise GuestOutputError(f"fio JSON: {section} section lacks {exc}") from None


@dataclass(frozen=True)
class IperfResult:
    """One iperf3 client run (``--json``, iperf 3.x), seen from the client."""

    version: str  # "iperf 3.18"
    reverse: bool  # -R: the server sent
    seconds: float
    sent_bps: float
    received_bps: float
    retransmits: int | None

    @property
    def gbps(self) -> float:
        """What arrived, Gbit/s (10^9)."""
        return self.received_bps / 1e9


def parse_iperf3(text: str) -> IperfResult:
    """iperf3's JSON report in ``text``; raises :class:`GuestOutputError` for an
    error report or one without a summary."""
    doc = json_document(text, "iperf3")
    if doc.get("error"):
        raise GuestOutputError(f"iperf3 failed: {doc['error']}")
    try:
        start, end = doc["start"], doc["end"]
        sent, received = end["sum_sent"], end["sum_received"]
        result = IperfResult(
            version=str(start.get("version", "?")),
            reverse=bool(start["test_start"].get("reverse", 0)),
            seconds=float(received["seconds"]),
            sent_bps=float(sent["bits_per_second"]),
            received_bps=float(received["bits_per_second"]),
            retransmits=int(sent["retransmits"]) if "retransmits" in sent else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise GuestOutputError(f"iperf3 JSON lacks {exc}") from None
    if result.received_bps <= 0:
        raise GuestOutputError("iperf3 moved nothing (0 bit/s received)")
    return result


# --------------------------------------------------------------------------- rows

@dataclass(frozen=True)
class Measurement:
    """One workload in one mode: the figure, and what the path spent on it."""

    mode: str
    workload: str  # "randread QD1", "iperf3 a->b"
    value: float  # IOPS or Gbit/s
    count: int  # requests the guest completed, or frames the guests sent
    seconds: float  # wall time over which cpu and counters were taken
    cpu: Mapping[str, float] = field(default_factory=dict)  # process -> CPU seconds
    counters: Mapping[str, int] = field(default_factory=dict)  # vvu-devd deltas
    lat_us: float | None = None


@dataclass(frozen=True)
class Row:
    """A measurement with its ratio to host mode and its costs per I/O (or frame)."""

    workload: str
    mode: str
    value: float
    ratio: float | None  # value / host mode's value of the same workload
    count: int
    lat_us: float | None
    devd_us: float | None  # vvu-devd CPU per I/O
    doorbells: float | None  # trapped doorbells per I/O
    kicks: float | None
    appliance_qemu_us: float | None
    consumer_qemu_us: float | None
    backend_us: float | None  # vvu-blk / vvu-switch (host CPU, or emulated in the appliance)


#: Process names the measurements use (the CPU keys).
DEVD, APPL_QEMU, CONSUMER_QEMU, BACKEND = "vvu-devd", "appliance QEMU", "consumer QEMU", "backend"


def _per(total: float | None, count: int, scale: float = 1.0) -> float | None:
    if total is None or count <= 0:
        return None
    return total / count * scale


def compute_rows(measurements: Sequence[Measurement]) -> list[Row]:
    """One row per measurement, workloads in first-seen order, modes in :data:`MODES` order."""
    host = {m.workload: m.value for m in measurements if m.mode == "host"}
    workloads = list(dict.fromkeys(m.workload for m in measurements))
    order = {mode: i for i, mode in enumerate(MODES)}
    rows = []
    for m in sorted(measurements, key=lambda m: (workloads.index(m.workload),
                                                 order.get(m.mode, len(MODES)))):
        consumer = sum(v for k, v in m.cpu.items() if k.startswith(CONSUMER_QEMU))
        rows.append(Row(
            workload=m.workload, mode=m.mode, value=m.value,
            ratio=ratio(m.value, host.get(m.workload)), count=m.count, lat_us=m.lat_us,
            devd_us=_per(m.cpu.get(DEVD), m.count, 1e6),
            doorbells=_per(m.counters.get("doorbells"), m.count),
            kicks=_per(m.counters.get("kicks"), m.count),
            appliance_qemu_us=_per(m.cpu.get(APPL_QEMU), m.count, 1e6),
            consumer_qemu_us=_per(consumer if any(k.startswith(CONSUMER_QEMU) for k in m.cpu)
                                  else None, m.count, 1e6),
            backend_us=_per(m.cpu.get(BACKEND), m.count, 1e6)))
    return rows


TableRows = list[tuple[str, list[Cell]]]


def side_by_side(rows: Sequence[Row], fmt: str) -> tuple[list[Column], TableRows]:
    """Each workload on one line: every mode's value, and each non-host mode's ratio."""
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    columns = [Column(m, fmt) for m in modes]
    columns += [Column(f"{m}/host", ".2f") for m in modes if m != "host"]
    lines: TableRows = []
    for workload in dict.fromkeys(r.workload for r in rows):
        by = {r.mode: r for r in rows if r.workload == workload}
        cells: list[Cell] = [by[m].value if m in by else None for m in modes]
        cells += [by[m].ratio if m in by else None for m in modes if m != "host"]
        lines.append((workload, cells))
    return columns, lines


def cost_table(rows: Sequence[Row], per: str) -> list[str]:
    columns = [Column("n", "d"), Column(f"devd us/{per}", ".1f"), Column(f"doorb/{per}", ".2f"),
               Column(f"kicks/{per}", ".2f"), Column(f"applQEMU us/{per}", ".0f"),
               Column(f"consQEMU us/{per}", ".0f"), Column(f"backend us/{per}", ".1f")]
    return render_table("workload / mode", columns, [
        (f"{r.workload} {r.mode}", [r.count, r.devd_us, r.doorbells, r.kicks,
                                    r.appliance_qemu_us, r.consumer_qemu_us, r.backend_us])
        for r in rows])


def report_lines(storage: Sequence[Row], switch: Sequence[Row]) -> list[str]:
    """The tables for people."""
    lines: list[str] = []
    if storage:
        lines += ["", "Storage: fio 4 KiB random, libaio, O_DIRECT, in the consumer VM; "
                  "IOPS; ratio = mode / host"]
        columns, table = side_by_side(storage, ".0f")
        lines += render_table("workload", columns, table)
        lines += ["", "Latency: fio's mean submission-to-completion, us"]
        lines += render_table("workload / mode", [Column("lat us", ".0f")],
                              [(f"{r.workload} {r.mode}", [r.lat_us]) for r in storage])
        lines += ["", "Per I/O the guest completed (host CPU; backend in the appliance: its "
                  "emulated CPU, coarse ticks; doorb = trapped VVU doorbells)"]
        lines += cost_table(storage, "IO")
    if switch:
        lines += ["", "Switch: iperf3 TCP between two consumer VMs, Gbit/s received; "
                  "ratio = mode / host"]
        columns, table = side_by_side(switch, ".3f")
        lines += render_table("workload", columns, table)
        lines += ["", "Per frame switched (frames both guests sent)"]
        lines += cost_table(switch, "frame")
    return lines


# --------------------------------------------------------------------------- guests

@dataclass(frozen=True)
class FioJob:
    rw: str
    iodepth: int

    @property
    def name(self) -> str:
        return f"{self.rw} QD{self.iodepth}"

    def command(self, device: str, runtime: int, ramp: int) -> str:
        return (f"fio --name=bench --filename={device} --ioengine=libaio --direct=1 "
                f"--rw={self.rw} --bs=4k --iodepth={self.iodepth} --time_based "
                f"--runtime={runtime} --ramp_time={ramp} --output-format=json 2>&1")


def consumer_vm(tc: Toolchain, image: ApplianceImage, name: str, ram: Path | None,
                devices: Sequence[Device]) -> QemuMachine:
    """A consumer-image VM on its root console: the image unchanged (``snapshot=on``),
    guest RAM shared (``ram``: vvu-devd's link file; None: a file of its own)."""
    creds = [Credential(DEBUG_CONSOLE_CREDENTIAL, "1")]
    cmdline = " ".join(w for w in image.cmdline.split() if w != "console=ttyS0")
    return QemuMachine(
        tc, name=name, kernel=image.kernel, initrd=image.initrd, append=cmdline,
        memory_mib=CONSUMER_MIB, memory_file=ram,
        args=render_devices(RootDisk(image.disk, snapshot=True), Rng(), *creds, *devices),
        boot_banner=BOOT_BANNER, prompt=PROMPT, boot_timeout=600)


@contextlib.contextmanager
def booted(vm: QemuMachine) -> Iterator[QemuMachine]:
    """``with vm:``, saying how long the boot took (a consumer image boots in about a
    minute under TCG: the run looks stuck otherwise)."""
    say(f"{vm.name}: booting the consumer image")
    start = time.monotonic()
    with vm:
        say(f"{vm.name}: up in {time.monotonic() - start:.0f} s")
        vm.console.check("dmesg -n 1")  # kernel messages would land inside fio's JSON
        yield vm


def find_disk(c: GuestConsole, mib: int) -> str:
    """The consumer's vhost-user disk: the virtio disk of ``mib`` MiB (the root is larger)."""
    out = c.check("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/size); done")
    found = [w[0] for w in (line.split() for line in out.splitlines())
             if len(w) == 2 and w[1] == str(mib * 2048)]
    if len(found) != 1:
        raise GuestOutputError(f"expected one virtio disk of {mib} MiB, got: {out!r}")
    return found[0]


class Meter:
    """CPU of host processes and vvu-devd's counters (summed over its devices)."""

    def __init__(self, processes: Mapping[str, int | None],
                 devd: DeviceModelProcess | None = None,
                 guest: Callable[[], dict[str, float]] | None = None) -> None:
        self.processes = processes
        self.devd = devd
        self.guest = guest

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        cpu = {name: proc_cpu(pid) for name, pid in self.processes.items()}
        if self.guest is not None:
            cpu |= self.guest()
        counters: dict[str, int] = {}
        if self.devd is not None:
            for row in self.devd.counters().values():
                for k in ("kicks", "doorbells"):
                    counters[k] = counters.get(k, 0) + row[k]
        return cpu, counters

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        """``with meter.measure() as d:`` … then ``d["cpu"]``, ``d["counters"]``,
        ``d["seconds"]``: the deltas over the block."""
        out: dict[str, Any] = {}
        cpu0, cnt0 = self.snapshot()
        t0 = time.monotonic()
        yield out
        out["seconds"] = time.monotonic() - t0
        cpu1, cnt1 = self.snapshot()
        out["cpu"] = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
        out["counters"] = {k: cnt1[k] - cnt0.get(k, 0) for k in cnt1}


# --------------------------------------------------------------------------- storage

@dataclass(frozen=True)
class Settings:
    modes: tuple[str, ...]
    ops: tuple[str, ...]
    depths: tuple[int, ...]
    runtime: int
    ramp: int
    iperf_seconds: int
    #: --busy-poll (µs) of vvu-blk and vvu-switch, host mode and the appliance alike:
    #: 0, or every setup polls.
    busy_poll_us: int = 0

    def busy_poll_args(self) -> list[str]:
        return ["--busy-poll", str(self.busy_poll_us)] if self.busy_poll_us else []


def run_fio(mode: str, c: GuestConsole, jobs: Sequence[FioJob], s: Settings, meter: Meter,
            raw: dict[str, str]) -> list[Measurement]:
    disk = find_disk(c, DISK_MIB)
    # Warm-up: the first touches of the path (connect, mappings) are not the workload.
    c.check(f"fio --name=warm --filename=/dev/{disk} --ioengine=libaio --direct=1 --rw=randrw "
            f"--bs=4k --iodepth=4 --size=4m >/dev/null 2>&1", timeout=600)
    out: list[Measurement] = []
    for job in jobs:
        stat = f"cat /sys/block/{disk}/stat"
        n0 = block_requests(c.check(stat))
        with meter.measure() as d:
            text = c.check(job.command(f"/dev/{disk}", s.runtime, s.ramp),
                           timeout=s.runtime * 20 + 600)
        n = block_requests(c.check(stat)) - n0
        raw[f"{mode} {job.name}"] = text
        r = parse_fio(text)
        m = Measurement(mode, job.name, r.iops, n, d["seconds"], d["cpu"], d["counters"],
                        r.lat_mean_us)
        out.append(m)
        devd = f", devd {m.cpu[DEVD] / n * 1e6:.0f} us/IO" if DEVD in m.cpu and n else ""
        say(f"{mode:>9}  {job.name:<14} {r.iops:8.0f} IOPS  lat {r.lat_mean_us:7.0f} us  "
            f"({n} requests{devd})")
    return out


def storage_host(tc: Toolchain, image: ApplianceImage, work: Path, jobs: Sequence[FioJob],
                 s: Settings, raw: dict[str, str]) -> list[Measurement]:
    disk = work / "host-disk.raw"
    with disk.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    sock = work / "blk-host.sock"
    server = BackendProcess("vvu-blk", ["--socket", str(sock), "--image", str(disk),
                                        *s.busy_poll_args()], [sock],
                            work / "vvu-blk-host.log", ready="listening on")
    with server, booted(consumer_vm(tc, image, "fio-host", None,
                                    [BlkDevice("blk0", sock, reconnect_ms=300)])) as vm:
        meter = Meter({CONSUMER_QEMU: vm.qemu_pid, BACKEND: server.pid})
        return run_fio("host", vm.console, jobs, s, meter, raw)


def storage_appliance(tc: Toolchain, image: ApplianceImage, work: Path, jobs: Sequence[FioJob],
                      s: Settings, raw: dict[str, str], *, bypass: bool) -> list[Measurement]:
    mode = "bypass" if bypass else "appliance"
    link = VvuLink.in_dir(work, f"disk-{mode}", ram_prefix="vvu-fio-bench-")
    doorbell = work / f"doorbell-{mode}.sock" if bypass else None
    devd = DeviceModelProcess(
        [link], work / f"devd-blk-{mode}.log", ram_mib=CONSUMER_MIB,
        args=["--max-queues", str(DEVD_MAX_QUEUES)]
        + (["--doorbell-socket", str(doorbell)] if doorbell else []))
    with devd, appliance_vm(tc, "storage", [link.vfio_socket], doorbell) as avm:
        fn = vvu_functions(avm)[0]
        avm.console.check(f"truncate -s {DISK_MIB}M /root/disk.raw")
        tick = int(avm.console.check("getconf CLK_TCK || echo 100").split()[0])
        proc = appliance_engine(avm, fn, "vvu-blk", False, s.busy_poll_args())
        proc.start()
        try:
            pid = proc.pid

            def guest() -> dict[str, float]:
                return {BACKEND: guest_proc_cpu(avm, pid, tick)}

            with booted(consumer_vm(tc, image, f"fio-{mode}", link.ram_file,
                                    [BlkDevice("blk0", link.vhost_socket,
                                               reconnect_ms=300)])) as vm:
                meter = Meter({CONSUMER_QEMU: vm.qemu_pid, DEVD: devd.pid,
                               APPL_QEMU: avm.qemu_pid}, devd, guest)
                return run_fio(mode, vm.console, jobs, s, meter, raw)
        finally:
            proc.stop()


# --------------------------------------------------------------------------- switch

def _net_credential(mac: str, address: str) -> Credential:
    """systemd-networkd config of the vhost-user NIC (before the image's DHCP-on-all)."""
    return Credential("network.network.40-fio-bench",
                      f"[Match]\nMACAddress={mac}\n\n[Network]\nAddress={address}\n"
                      "LinkLocalAddressing=no\n")


def _mac(i: int) -> str:
    return f"52:54:00:00:10:0{i + 1}"


def _ip(i: int) -> str:
    return f"{SWITCH_NET}.{i + 1}"


def _tx_packets(c: GuestConsole, mac: str) -> int:
    """Frames the guest's vhost-user NIC sent (each crosses the switch once)."""
    out = c.check(f"for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {mac} ] && "
                  "cat $i/statistics/tx_packets; done; true")
    try:
        return int(out.split()[0])
    except (IndexError, ValueError):
        raise GuestOutputError(f"no NIC with MAC {mac} (tx_packets): {out!r}") from None


@contextlib.contextmanager
def net_consumers(tc: Toolchain, image: ApplianceImage, mode: str, socks: Sequence[Path],
                  rams: Sequence[Path | None]) -> Iterator[list[QemuMachine]]:
    with contextlib.ExitStack() as stack:
        vms = []
        for i in range(2):
            dev = NetDevice("net0", socks[i], _mac(i))
            vm = consumer_vm(tc, image, f"fio-{mode}-{i}", rams[i],
                             [_net_credential(_mac(i), f"{_ip(i)}/24"), dev])
            stack.callback(vm.shutdown)
            vm.launch()  # both boot at once
            vms.append(vm)
        say(f"{mode}: booting two consumer VMs")
        start = time.monotonic()
        for vm in vms:
            vm.wait_for_boot()
            vm.console.check("dmesg -n 1")
        say(f"{mode}: consumers up in {time.monotonic() - start:.0f} s")
        yield vms


def run_iperf(mode: str, vms: Sequence[QemuMachine], s: Settings, meter: Meter,
              raw: dict[str, str]) -> list[Measurement]:
    a, b = vms[0].console, vms[1].console
    deadline = time.monotonic() + 300
    while a.run(f"ping -c 1 -W 2 {_ip(1)}")[0] != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mode}: {_ip(1)} unreachable from {_ip(0)}")
    b.check("iperf3 -s -D")
    time.sleep(1)
    out = []
    for reverse in (False, True):
        workload = "iperf3 b->a" if reverse else "iperf3 a->b"
        p0 = _tx_packets(a, _mac(0)) + _tx_packets(b, _mac(1))
        with meter.measure() as d:
            text = a.check(f"iperf3 -c {_ip(1)} -t {s.iperf_seconds} --json"
                           + (" -R" if reverse else "") + " 2>&1",
                           timeout=s.iperf_seconds * 20 + 300)
        frames = _tx_packets(a, _mac(0)) + _tx_packets(b, _mac(1)) - p0
        raw[f"{mode} {workload}"] = text
        r = parse_iperf3(text)
        out.append(Measurement(mode, workload, r.gbps, frames, d["seconds"], d["cpu"],
                               d["counters"]))
        say(f"{mode:>9}  {workload:<14} {r.gbps:8.3f} Gbit/s  ({frames} frames, "
            f"{r.retransmits} retransmits)")
    return out


def switch_host(tc: Toolchain, image: ApplianceImage, work: Path, s: Settings,
                raw: dict[str, str]) -> list[Measurement]:
    socks = [work / "sw-a.sock", work / "sw-b.sock"]
    sw = BackendProcess("vvu-switch", ["--port", f"a={socks[0]}", "--port", f"b={socks[1]}",
                                       *s.busy_poll_args()],
                        socks, work / "vvu-switch-host.log")
    with sw, net_consumers(tc, image, "host", socks, [None, None]) as vms:
        meter = Meter({BACKEND: sw.pid}
                      | {f"{CONSUMER_QEMU} {i}": vm.qemu_pid for i, vm in enumerate(vms)})
        return run_iperf("host", vms, s, meter, raw)


def switch_appliance(tc: Toolchain, image: ApplianceImage, work: Path, s: Settings,
                     raw: dict[str, str], *, bypass: bool) -> list[Measurement]:
    mode = "bypass" if bypass else "appliance"
    links = [VvuLink.in_dir(work, f"{n}-{mode}", ram_prefix="vvu-fio-bench-") for n in "ab"]
    doorbell = work / f"doorbell-net-{mode}.sock" if bypass else None
    devd = DeviceModelProcess(
        links, work / f"devd-net-{mode}.log", ram_mib=CONSUMER_MIB,
        args=["--max-queues", str(DEVD_MAX_QUEUES)]
        + (["--doorbell-socket", str(doorbell)] if doorbell else []))
    with devd, appliance_vm(tc, "vswitch", [ln.vfio_socket for ln in links], doorbell) as avm:
        fns = vvu_functions(avm)
        sw = ApplianceProcess(appliance_shell(avm),
                              ["vvu-switch", "--vvu", f"a={fns[0]}", "--vvu", f"b={fns[1]}",
                               *s.busy_poll_args()],
                              "/root/vvu-switch", ready="ready for a front-end")
        sw.start()
        sw.wait_for("ready for a front-end", 300, count=2)
        try:
            tick = int(avm.console.check("getconf CLK_TCK || echo 100").split()[0])
            pid = sw.pid

            def guest() -> dict[str, float]:
                return {BACKEND: guest_proc_cpu(avm, pid, tick)}

            with net_consumers(tc, image, mode, [ln.vhost_socket for ln in links],
                               [ln.ram_file for ln in links]) as vms:
                meter = Meter({DEVD: devd.pid, APPL_QEMU: avm.qemu_pid}
                              | {f"{CONSUMER_QEMU} {i}": vm.qemu_pid
                                 for i, vm in enumerate(vms)}, devd, guest)
                return run_iperf(mode, vms, s, meter, raw)
        finally:
            sw.stop()


# --------------------------------------------------------------------------- main

def _choices(parser: argparse.ArgumentParser, flag: str, text: str,
             known: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated subset of ``known``, in ``known``'s order."""
    given = [w for w in text.split(",") if w]
    unknown = [w for w in given if w not in known]
    if unknown or not given:
        parser.error(f"{flag} {text!r}: choose from {', '.join(known)}")
    return tuple(k for k in known if k in given)


def _depths(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    try:
        depths = sorted({int(w) for w in text.split(",") if w})
    except ValueError:
        parser.error(f"--depths {text!r}: comma-separated queue depths (e.g. 1,8,32)")
    if not depths or any(d < 1 or d > 1024 for d in depths):
        parser.error(f"--depths {text!r}: queue depths from 1 to 1024")
    return tuple(depths)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default="storage,switch",
                        help="storage, switch or both (comma separated)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="setups, comma separated: host (the ratios' base), appliance, "
                             "bypass (the appliance with the doorbell companion)")
    parser.add_argument("--ops", default=",".join(OPS), help="fio --rw values: randread, "
                        "randwrite")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="fio --iodepth "
                        "values")
    parser.add_argument("--runtime", type=int, default=6, help="seconds per fio job (measured)")
    parser.add_argument("--ramp", type=int, default=1, help="fio --ramp_time, seconds")
    parser.add_argument("--iperf-seconds", type=int, default=5, help="iperf3 -t per direction")
    parser.add_argument("--busy-poll", type=int, default=0, metavar="US",
                        help="--busy-poll of vvu-blk and vvu-switch, in host mode and in the "
                             "appliance alike (after serving, poll with kicks off this many "
                             "µs); default 0")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="also save every raw fio / iperf3 output and logs under DIR")
    return parser


@dataclass(frozen=True)
class Options:
    only: tuple[str, ...]
    settings: Settings
    json: bool
    keep: Path | None


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line, checked: a bad value exits 2 naming the option."""
    parser = make_parser()
    a = parser.parse_args(argv)
    only = _choices(parser, "--only", a.only, ("storage", "switch"))
    modes = _choices(parser, "--modes", a.modes, MODES)
    for name, value, low in (("--runtime", a.runtime, 1), ("--ramp", a.ramp, 0),
                             ("--iperf-seconds", a.iperf_seconds, 1)):
        if not low <= value <= 600:
            parser.error(f"{name} {value}: from {low} to 600 seconds")
    if not 0 <= a.busy_poll <= 1_000_000:
        parser.error(f"--busy-poll {a.busy_poll}: from 0 to 1000000 µs")
    return Options(only, Settings(modes, _choices(parser, "--ops", a.ops, OPS),
                                  _depths(parser, a.depths), a.runtime, a.ramp,
                                  a.iperf_seconds, a.busy_poll), a.json, a.keep)


def _load() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def run(opts: Options, work: Path, raw: dict[str, str]) -> tuple[list[Row], list[Row]]:
    tc = Toolchain()
    tc.require_built()
    s = opts.settings
    image = build_appliance(tc, "consumer")
    storage: list[Measurement] = []
    switch: list[Measurement] = []
    if "storage" in opts.only:
        jobs = [FioJob(op, qd) for qd in s.depths for op in s.ops]
        for mode in s.modes:
            if mode == "host":
                storage += storage_host(tc, image, work, jobs, s, raw)
            else:
                storage += storage_appliance(tc, image, work, jobs, s, raw,
                                             bypass=mode == "bypass")
    if "switch" in opts.only:
        for mode in s.modes:
            if mode == "host":
                switch += switch_host(tc, image, work, s, raw)
            else:
                switch += switch_appliance(tc, image, work, s, raw, bypass=mode == "bypass")
    return compute_rows(storage), compute_rows(switch)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vvu-fio-bench-"))
    before = _load()
    say(f"work directory {work}; {before['cpus']} host CPUs, load "
        f"{' '.join(map(str, before['loadavg']))}; busy poll "
        f"{opts.settings.busy_poll_us} µs")
    raw: dict[str, str] = {}
    started = time.monotonic()
    try:
        storage, switch = run(opts, work, raw)
    except ToolchainError as exc:
        say(str(exc))
        return 2
    finally:
        say(f"done in {time.monotonic() - started:.0f} s; load "
            f"{' '.join(map(str, _load()['loadavg']))}")
        if opts.keep is not None:
            opts.keep.mkdir(parents=True, exist_ok=True)
            for name, text in raw.items():
                (opts.keep / (name.replace(" ", "-").replace(">", "") + ".out")).write_text(text)
            for log in work.glob("*.log"):
                shutil.copy(log, opts.keep / log.name)
            say(f"raw outputs and logs in {opts.keep}")
        shutil.rmtree(work, ignore_errors=True)
    if opts.json:
        json.dump({"load_before": before, "load_after": _load(),
                   "settings": asdict(opts.settings),
                   "storage": [asdict(r) for r in storage],
                   "switch": [asdict(r) for r in switch]}, sys.stdout, indent=2)
        print()
    else:
        for line in report_lines(storage, switch):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
