"""vvu-switch throughput between two vhost-user-net front-ends, in one run.

The switch runs as its own process (the real ``vvu-switch`` program) with two
ports. A second process plays both guests: two vhost-user front-ends
(``vhost_user.frontend``, two connections), each sharing a memfd as guest RAM
and driving split rings from the driver side. They drive the rings *in bulk*:
descriptors are written once and buffers recycled by moving ring indexes, a few
Python operations per burst rather than per frame, so that the switch's cost
is what gets measured. (One process for both guests because on a two-CPU
machine the switch gets one CPU and the guests share the other.) The switch's
own CPU time is reported next to the rate, and the rate per switch CPU-second:
on a shared or loaded machine that is the figure to compare.

Cases:
* 64 B frames, sender → receiver (unicast, learned): packets per second;
* 64 KiB TCP segments with TSO on both ends (passed through whole, the receiver
  using 4 KiB mergeable buffers): Gbit/s of frame bytes;
* the same, each segment in one receive buffer (``64k-1buf``);
* the same 64 KiB segments to a receiver without TSO/GUEST_CSUM: the switch
  segments and checksums in software (the slow path): Gbit/s.

With ``--pure`` every case runs a second time against a switch with
``VVU_PURE_PYTHON=1`` (its forwarding loop and rings in Python), and the
ratios compiled / pure are printed, raw and per switch CPU-second.

Then a cProfile of the switch under the 64 B load (a separate, shorter run:
profiling slows it down) shows where the time goes.

The peers, driven by the same two front ends in the same run: DPDK's
``dpdk-testpmd`` (from the tools tree, else PATH) forwarding in io mode between
two ``net_vhost`` ports (benchmarks/dpdk_peer.py), and Open vSwitch with DPDK, a
learning bridge between two ``dpdkvhostuser`` ports (benchmarks/ovs_peer.py).
The 64 B case runs against each, and the ratios vvu-switch/peer are printed, raw
and per CPU-second of the forwarder. Each target's own count of frames it
forwarded (vvu-switch's status file, testpmd's exit report, OVS's datapath
flows) is printed next to what the receiving guest counted. A
target that forwards nothing in the measured window is an error (exit 1) with
the target's own output, not a rate of zero. ``--json`` writes the results.

    .venv/bin/python benchmarks/switch_bench.py [--duration 5] [--no-profile] [--only 64]
        [--no-peer | --require-peer] [--peer testpmd|ovs-dpdk] [--pure] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing as mp
import multiprocessing.sharedctypes
import os
import pstats
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dpdk_peer import Launcher, Peer, PeerError, Testpmd, find_testpmd  # noqa: E402
from benchmarks.ovs_peer import OvsDpdk, find_ovs_dpdk  # noqa: E402
from tests.support.net_frames import (  # noqa: E402
    mac,
    net_hdr,
    tcp4_frame,
    with_partial_csum,
)
from vvu_runtime.virtio.net import GsoType, HdrFlags, NetFeature  # noqa: E402

RING_PACKED = 1 << 34
MAC_TX = mac(0xA)
MAC_RX = mac(0xB)
QUEUE_SIZE = 1024
DESC = struct.Struct("<QIHH")
VIRTQ_DESC_F_WRITE = 2
NO_TSO_RX = (NetFeature.GUEST_TSO4.mask | NetFeature.GUEST_TSO6.mask
             | NetFeature.GUEST_CSUM.mask | NetFeature.GUEST_UFO.mask
             | NetFeature.GUEST_USO4.mask | NetFeature.GUEST_USO6.mask
             | NetFeature.GUEST_ECN.mask)


@dataclass(frozen=True)
class Case:
    name: str
    frame: bytes  # Ethernet frame (no virtio header)
    hdr: bytes  # virtio-net header the sender uses
    rx_buffer: int
    rx_exclude: int = 0
    unit: str = "Mpps"


def cases() -> dict[str, Case]:
    small = tcp4_frame(MAC_RX, MAC_TX, bytes(64 - 54))  # 64 B: Ethernet + IPv4 + TCP + 10
    payload = bytes(range(256)) * 255 + bytes(65535 - 54 - 255 * 256)
    big, start, off = with_partial_csum(tcp4_frame(MAC_RX, MAC_TX, payload))
    tso_hdr = net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, start, off)
    return {
        "64": Case("64 B frames", small, net_hdr(), 2048),
        "64k": Case("64 KiB TSO, passed through", big, tso_hdr, 4096, unit="Gbit/s"),
        # Whole frames in one receive buffer each (as a guest with big buffers, or
        # any receiver without MRG_RXBUF, takes them).
        "64k-1buf": Case("64 KiB TSO, passed through, 1 buffer", big, tso_hdr,
                         -(-(len(big) + 12) // 4096) * 4096, unit="Gbit/s"),
        "64k-sw": Case("64 KiB TSO, segmented in software", big, tso_hdr, 2048,
                       rx_exclude=NO_TSO_RX, unit="Gbit/s"),
    }


# --------------------------------------------------------------------- bulk ring driving

class BulkRing:
    """A split ring driven from the driver side in bulk (see the module docstring).

    Descriptor ``i`` always points at buffer ``i`` and avail slot ``i`` always
    names descriptor ``i``; the switch completes TX in order, so recycling is
    just moving the avail index. For RX the used heads are copied back into
    the avail ring in one slice operation (the switch may complete out of order
    when a merged frame runs the ring dry).
    """

    def __init__(self, dq: Any, ram: Any, size: int) -> None:
        from vvu_runtime.virtio.features import need_event

        self.dq = dq
        self.size = size
        self.mask = size - 1
        ring = dq.ring
        self.desc = ram.view(ring.desc_addr, 16 * size)
        self.avail16 = ram.view(ring.avail_addr, 6 + 2 * size).cast("H")
        used = ram.view(ring.used_addr, 6 + 8 * size)
        self.used16 = used.cast("H")
        self.used32 = used[4:4 + 8 * size].cast("I")
        self.avail_idx = 0
        self.last_used = 0
        self.need_event = need_event
        self.avail_event_at = 2 + 4 * size
        self.used_event_at = 2 + size

    def publish_all(self, buffers: list[tuple[int, int]], flags: int) -> None:
        for i, (gpa, length) in enumerate(buffers):
            DESC.pack_into(self.desc, 16 * i, gpa, length, flags, 0)
            self.avail16[2 + i] = i
        self.advance(len(buffers))

    def advance(self, n: int) -> None:
        old = self.avail_idx
        new = self.avail_idx = (old + n) & 0xFFFF
        self.avail16[1] = new
        if self.need_event(self.used16[self.avail_event_at], new, old):
            os.eventfd_write(self.dq.kick_fd, 1)

    def completed(self) -> int:
        return int((self.used16[1] - self.last_used) & 0xFFFF)

    def wait(self, timeout: float) -> None:
        """Sleep until the device publishes more used buffers (or ``timeout``)."""
        # Interrupt when a quarter of the ring is done, not at every frame.
        self.avail16[self.used_event_at] = (self.last_used + self.size // 4) & 0xFFFF
        if self.completed():
            return
        r, _, _ = select.select([self.dq.call_fd], [], [], timeout)
        if r:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.dq.call_fd)

    def used_runs(self, n: int) -> Iterator[tuple[int, int]]:
        """The used slots of the next ``n`` entries as (start, end) runs without wrap."""
        start = self.last_used & self.mask
        while n:
            run = min(n, self.size - start)
            yield start, start + run
            n -= run
            start = 0


def _connect(path: str, exclude: int) -> Any:
    from vvu_runtime.vhost_user import messages as m
    from vvu_runtime.vhost_user.frontend import VhostUserFrontend

    fe = VhostUserFrontend.connect(path, retry_for=10)
    offered = fe.get_features()
    # Split rings: BulkRing drives the split layout (and QEMU's default is split).
    fe.negotiate(features=offered & ~m.VHOST_F_LOG_ALL & ~exclude & ~RING_PACKED)
    return fe


def _driver_ok(fe: Any) -> None:
    """Tell the back end the driver is done, as QEMU does once the rings are set up:
    with the STATUS protocol feature, DPDK's vhost library does not start a
    device (testpmd forwards nothing) before it sees DRIVER_OK."""
    from vvu_runtime.vhost_user.messages import ProtocolFeature
    from vvu_runtime.virtio.pci_layout import DeviceStatus

    if fe.protocol_features >> ProtocolFeature.STATUS & 1:
        fe.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                      | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


class Receiver:
    """The receiving guest: fills its RX ring, counts what arrives, recycles in bulk."""

    def __init__(self, path: str, case: Case) -> None:
        from vvu_runtime.vhost_user.frontend import GuestRam, setup_queue

        self.case = case
        self.fe = _connect(path, case.rx_exclude)
        self.ram = ram = GuestRam(QUEUE_SIZE * case.rx_buffer + (8 << 20))
        self.fe.set_mem_table([(ram.region, ram.fd)])
        rxq = setup_queue(self.fe, ram, 0, QUEUE_SIZE)
        txq = setup_queue(self.fe, ram, 1, 16)
        _driver_ok(self.fe)
        self.ring = BulkRing(rxq, ram, QUEUE_SIZE)
        self.bufs = [(ram.alloc(case.rx_buffer, 64), case.rx_buffer) for _ in range(QUEUE_SIZE)]
        self.ring.publish_all(self.bufs, VIRTQ_DESC_F_WRITE)
        # Say who we are, so that the sender's frames are unicast to us.
        hello = net_hdr() + bytes(MAC_TX) + bytes(MAC_RX) + b"\x08\x06" + bytes(46)
        gpa = ram.alloc(len(hello))
        ram.view(gpa, len(hello))[:] = hello
        txq.ring.add([(gpa, len(hello))], [], gpa)
        txq.kick()
        self.nbytes = 0
        self.per_frame = len(case.frame) + 12
        self.checked = False

    def poll(self) -> int:
        ring = self.ring
        n = ring.completed()
        if not n:
            return 0
        used32 = ring.used32
        if not self.checked and not self.case.rx_exclude:
            # The switch must deliver what was sent: check the first frame's bytes.
            head = used32[2 * (ring.last_used & ring.mask)]
            first = bytes(self.ram.view(self.bufs[head][0],
                                        min(self.case.rx_buffer, self.per_frame)))
            if first[12:self.per_frame] != self.case.frame[:len(first) - 12]:
                raise SystemExit("receiver: frame content differs from what was sent")
            self.checked = True
        avail16 = ring.avail16
        mask = ring.mask
        a = ring.avail_idx
        for s, e in ring.used_runs(n):
            self.nbytes += sum(used32[2 * s + 1:2 * e:2])
            heads = used32[2 * s:2 * e:2].tolist()
            # Heads back into the avail ring at the next slots (the run may wrap there).
            start = a & mask
            first_run = min(len(heads), ring.size - start)
            avail16[2 + start:2 + start + first_run] = array("H", heads[:first_run])
            if first_run < len(heads):
                rest = len(heads) - first_run
                avail16[2:2 + rest] = array("H", heads[first_run:])
            a += len(heads)
        ring.last_used = (ring.last_used + n) & 0xFFFF
        ring.advance(n)
        return n


class Sender:
    """The sending guest: keeps its TX ring full of the same frame, recycles in bulk."""

    def __init__(self, path: str, case: Case) -> None:
        from vvu_runtime.vhost_user.frontend import GuestRam, setup_queue

        self.fe = _connect(path, 0)
        data = case.hdr + case.frame
        # Large frames: few in flight, as a TCP window would allow, so that one
        # refill does not ask for more receive buffers than the receiver's ring has.
        size = QUEUE_SIZE if len(data) < 4096 else 16
        self.ram = ram = GuestRam(size * (len(data) + 64) + (8 << 20))
        self.fe.set_mem_table([(ram.region, ram.fd)])
        setup_queue(self.fe, ram, 0, 16)  # an RX ring, unused (nothing is sent to us)
        txq = setup_queue(self.fe, ram, 1, size)
        _driver_ok(self.fe)
        self.ring = BulkRing(txq, ram, size)
        bufs = []
        for _ in range(size):
            gpa = ram.alloc(len(data), 64)
            ram.view(gpa, len(data))[:] = data
            bufs.append((gpa, len(data)))
        self.ring.publish_all(bufs, 0)
        self.sent = 0

    def poll(self) -> int:
        ring = self.ring
        n = ring.completed()
        if n:
            ring.last_used = (ring.last_used + n) & 0xFFFF
            self.sent += n
            ring.advance(n)
        return n


def traffic(tx_path: str, rx_path: str, case: Case, cpu: int | None, ready: Any, stop: Any,
            counters: Any) -> None:
    """Both guests in one process, polling both rings: on a two-CPU machine one CPU
    is the switch's, and two guest processes would fight over the other."""
    _pin(cpu)
    rx = Receiver(rx_path, case)
    ready.set()
    while not ready.is_set():
        pass
    time.sleep(0.2)  # let the hello frame teach the switch where MAC_RX is
    tx = Sender(tx_path, case)
    idle = 0
    fds = [tx.ring.dq.call_fd, rx.ring.dq.call_fd]
    while not stop.value:
        if tx.poll() + rx.poll():
            counters[0] = rx.nbytes // rx.per_frame
            counters[1] = rx.nbytes
            counters[2] = tx.sent
            idle = 0
            continue
        idle += 1
        if idle > 50:
            # Nothing moving: sleep until either ring's device interrupts.
            for ring in (tx.ring, rx.ring):
                ring.avail16[ring.used_event_at] = ring.last_used
            if not (tx.ring.completed() or rx.ring.completed()):
                r, _, _ = select.select(fds, [], [], 0.01)
                for fd in r:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
    tx.fe.close()
    rx.fe.close()


# --------------------------------------------------------------------- the switch process

@dataclass
class Result:
    target: str
    case: Case
    rate: float  # Mpps or Gbit/s
    pps: float
    sent_pps: float
    cpu: float  # switch CPU seconds per wall second
    drops: dict[str, int]
    gen_cpu: float = 0.0  # the traffic generator's CPU seconds per wall second
    frames: int = 0  # frames the receiving guest got in the measured window
    #: Frames the target says it forwarded to the receiver over its whole life
    #: (warm-up included): vvu-switch's status file, testpmd's exit report.
    forwarded: int | None = None

    @property
    def per_cpu(self) -> float:
        """The rate per CPU-second of the forwarder (Mpps or Gbit/s per core)."""
        return self.rate / self.cpu if self.cpu > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"target": self.target, "case": self.case.name, "unit": self.case.unit,
                "rate": self.rate, "per_cpu": self.per_cpu, "pps": self.pps,
                "offered_pps": self.sent_pps, "cpu": self.cpu, "gen_cpu": self.gen_cpu,
                "frames": self.frames, "forwarded": self.forwarded, "drops": self.drops}


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpus() -> tuple[int | None, int | None]:
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) < 2:
        return None, None
    return avail[0], avail[1]


#: Seconds a target has to deliver its first frame before the warm-up starts.
FIRST_FRAME_TIMEOUT = 20.0

#: ``--busy-poll`` for the switch (microseconds), set from the command line.
BUSY_POLL_USEC = 0.0


def start_switch(tmp: Path, profile: Path | None, cpu: int | None,
                 pure: bool = False) -> subprocess.Popen[bytes]:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "vvu_runtime.serve.switch",
            "--port", f"tx={tmp / 'tx.sock'}", "--port", f"rx={tmp / 'rx.sock'}",
            "--queue-size", str(QUEUE_SIZE), "--status-file", str(tmp / "status.json"),
            "--busy-poll", str(BUSY_POLL_USEC), "--log-level", "WARNING"]
    env = {**os.environ, "VVU_PURE_PYTHON": "1"} if pure else None
    proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                            preexec_fn=(lambda: _pin(cpu)) if cpu is not None else None)
    deadline = time.monotonic() + 20
    while not ((tmp / "tx.sock").exists() and (tmp / "rx.sock").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vvu-switch did not start (exit {proc.returncode})")
        time.sleep(0.05)
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_case(case: Case, duration: float, warmup: float, *, profile: Path | None = None,
             peer: Peer | None = None, pure: bool = False) -> Result:
    """One measurement: against a fresh vvu-switch (``pure``: in pure Python), or
    against a started ``peer``.

    Raises :class:`PeerError` if the receiving guest got nothing in the
    measured window: a rate of zero would only move the failure to a division.
    """
    switch_cpu, guest_cpu = cpus()
    ctx = mp.get_context("fork")
    counters = multiprocessing.sharedctypes.RawArray(ctypes.c_uint64, 3)
    stop = ctx.RawValue(ctypes.c_int, 0)
    ready = ctx.Event()
    with tempfile.TemporaryDirectory(prefix="vvu-switch-bench-") as d:
        tmp = Path(d)
        proc = None
        gen = None
        drops: dict[str, int] = {}
        forwarded = None
        try:
            if peer is None:
                proc = start_switch(tmp, profile, switch_cpu, pure)
                tx_path, rx_path = str(tmp / "tx.sock"), str(tmp / "rx.sock")
                pid = proc.pid
            else:
                tx_path, rx_path = peer.sockets
                if peer.pid is None:
                    raise PeerError(f"{peer.name} is not running")
                pid = peer.pid
            gen = ctx.Process(target=traffic, args=(tx_path, rx_path, case, guest_cpu, ready,
                                                    stop, counters))
            gen.start()
            if not ready.wait(20):
                raise SystemExit("the traffic generator did not come up")
            # Warm-up starts once frames arrive: a peer may take seconds to start a
            # device after its front end connects (OVS reconfigures the port in its
            # main loop, slowly on a loaded machine). One that never does fails below.
            deadline = time.monotonic() + FIRST_FRAME_TIMEOUT
            while not counters[0] and time.monotonic() < deadline and gen.is_alive():
                time.sleep(0.05)
            time.sleep(warmup)
            assert gen.pid is not None
            t0, f0, b0, s0, c0, g0 = (time.monotonic(), counters[0], counters[1], counters[2],
                                      _proc_cpu(pid), _proc_cpu(gen.pid))
            time.sleep(duration)
            t1, f1, b1, s1, c1, g1 = (time.monotonic(), counters[0], counters[1], counters[2],
                                      _proc_cpu(pid), _proc_cpu(gen.pid))
            if peer is not None:
                # While the front ends are still connected: OVS has no counters
                # for a vhost-user port whose front end has gone.
                forwarded = peer.count_forwarded()
        finally:
            # Whatever happened (an error, Ctrl-C, SIGTERM): nothing is left running.
            stop.value = 1
            if gen is not None:
                gen.join(10)
                if gen.is_alive():
                    gen.kill()
            if proc is not None:
                if proc.poll() is None:
                    time.sleep(1.2)  # one more status-file period
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        status = json.loads((tmp / "status.json").read_text())
                        drops = status["ports"]["rx"]["drops"]
                        forwarded = int(status["ports"]["rx"]["out_packets"])
                stop_process(proc)
    target = ("vvu-switch pure" if pure else "vvu-switch") if peer is None else peer.name
    dt = t1 - t0
    return window_result(target, case, dt, int(f1 - f0), int(b1 - b0), int(s1 - s0),
                         (c1 - c0) / dt, (g1 - g0) / dt, drops, forwarded, warmup)


def window_result(target: str, case: Case, dt: float, frames: int, nbytes: int, offered: int,
                  cpu: float, gen_cpu: float, drops: dict[str, int], forwarded: int | None,
                  warmup: float) -> Result:
    """The figures of one measured window of ``dt`` seconds; :class:`PeerError` if
    the receiver got nothing in it (a target that does not forward is a failure
    to report, not a rate of zero that a ratio would divide by)."""
    if frames <= 0 or dt <= 0:
        raise PeerError(f"{target} forwarded 0 frames to the receiver in {dt:.1f} s "
                        f"({case.name}; the sender offered {offered}, after {warmup:g} s "
                        "of warm-up)")
    pps = frames / dt
    rate = pps / 1e6 if case.unit == "Mpps" else nbytes * 8 / dt / 1e9
    return Result(target, case, rate, pps, offered / dt, cpu, drops, gen_cpu, frames,
                  forwarded)


# --------------------------------------------------------------------- DPDK peer

def run_testpmd(launcher: Launcher, case: Case, duration: float, warmup: float) -> Result:
    """The same measurement against testpmd io-forwarding between two net_vhost ports
    (``launcher`` runs dpdk-testpmd: :func:`find_testpmd`).

    A :class:`PeerError` carrying testpmd's output if it does not come up, does
    not forward or does not report.
    """
    switch_cpu, guest_cpu = cpus()
    if switch_cpu is None or guest_cpu is None:
        raise PeerError("testpmd needs two CPUs (a main lcore and a forwarding lcore)")
    # Main lcore (it only waits on stdin) on the guests' CPU, the one forwarding
    # lcore on the switch's: testpmd busy-polls, so its CPU use is always ~100%
    # and the figure to compare is the rate per CPU-second.
    with tempfile.TemporaryDirectory(prefix="vvu-testpmd-") as d, \
            Testpmd(launcher, Path(d), (guest_cpu, switch_cpu)) as pmd:
        pmd.start()
        try:
            res = run_case(case, duration, warmup, peer=pmd)
        except PeerError as e:
            pmd.stop()
            raise PeerError(f"{e}\ntestpmd's output (tail):\n{pmd.log_tail()}") from e
        stats = pmd.stop()
    if stats is None or 1 not in stats:
        raise PeerError(f"testpmd did not print its forward statistics at exit\n"
                        f"{pmd.log_tail()}")
    # Port 0 is the sender's, port 1 the receiver's: what testpmd sent out of port 1.
    res.forwarded = stats[1].tx_packets
    return res


def run_ovs(launcher: Launcher, case: Case, duration: float, warmup: float) -> Result:
    """The same measurement against Open vSwitch with DPDK: a learning bridge
    between two dpdkvhostuser ports, one PMD thread (benchmarks/ovs_peer.py)."""
    switch_cpu, guest_cpu = cpus()
    if switch_cpu is None or guest_cpu is None:
        raise PeerError("OVS-DPDK needs two CPUs (its main threads and a PMD thread)")
    # As for testpmd: the PMD thread on the switch's CPU, OVS's other threads
    # (idle while forwarding) with the guests.
    with tempfile.TemporaryDirectory(prefix="vvu-ovs-") as d, \
            OvsDpdk(launcher, Path(d), (guest_cpu, switch_cpu)) as ovs:
        ovs.start()
        try:
            res = run_case(case, duration, warmup, peer=ovs)
        except PeerError as e:
            raise PeerError(f"{e}\nOVS's output (tail):\n{ovs.log_tail()}") from e
    return res


#: The peers, in the order they run: name, how to find it, how to measure it.
PEERS = (("testpmd", find_testpmd, run_testpmd), ("ovs-dpdk", find_ovs_dpdk, run_ovs))


# --------------------------------------------------------------------- in-process micro

def micro(case: Case, seconds: float, profile: bool = False, pure: bool = False) -> float:
    """The switch's forwarding path alone, in this process, on real split rings and
    Vrings over a memfd: the driver side is index stores between timed bursts.
    Returns frames per second; prints a profile with ``profile``. ``pure``: the
    rings and the switch built with ``VVU_PURE_PYTHON=1``."""
    saved = os.environ.get("VVU_PURE_PYTHON")
    if pure:
        os.environ["VVU_PURE_PYTHON"] = "1"
    try:
        return _micro(case, seconds, profile)
    finally:
        if saved is None:
            os.environ.pop("VVU_PURE_PYTHON", None)
        else:
            os.environ["VVU_PURE_PYTHON"] = saved


def _micro(case: Case, seconds: float, profile: bool) -> float:
    import cProfile

    from vvu_runtime.backends.switch.port import SwitchPort
    from vvu_runtime.backends.switch.switch import Switch
    from vvu_runtime.vhost_user.vring import Vring
    from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd
    from vvu_runtime.virtio.queue import RingAddresses
    from vvu_runtime.virtio.split import split_ring_layout

    size = QUEUE_SIZE
    data = case.hdr + case.frame
    tx_buf = -(-len(data) // 64) * 64
    uva = 0x7F00_0000_0000
    need = size * (tx_buf + case.rx_buffer) + (1 << 20)
    fd = os.memfd_create("switch-micro")
    os.ftruncate(fd, need)
    mem = GuestMemory()
    mem.add(map_fd(MemoryRegion(0, need, uva, 0), fd))
    os.close(fd)
    lay = split_ring_layout(size)
    sw = Switch()
    tx_port = SwitchPort(sw, "tx", queue_size=size)
    rx_port = SwitchPort(sw, "rx", queue_size=size)
    negotiated = tx_port.features() & ~RING_PACKED  # the rings below are split
    rx_features = negotiated & ~case.rx_exclude
    tx_port.set_features(negotiated)
    rx_port.set_features(rx_features)
    base = 0
    rings = {}
    for name, index, feats in (("tx", 1, negotiated), ("rx", 0, rx_features)):
        v = Vring(index, f"micro {name}")
        v.size = size
        v.addresses = RingAddresses(uva + base + lay.desc_offset, uva + base + lay.avail_offset,
                                    uva + base + lay.used_offset)
        v.kick_nofd = True
        v.enabled = True
        v.features = feats
        v.start(mem)
        rings[name] = (v, base)
        base += -(-lay.total // 4096) * 4096
    bufs = base
    tx_v, tx_base = rings["tx"]
    rx_v, rx_base = rings["rx"]
    for i in range(size):
        gpa = bufs + i * tx_buf
        mem.translate(gpa, len(data))[:] = data
        DESC.pack_into(mem.translate(tx_base + lay.desc_offset + 16 * i, 16), 0, gpa,
                       len(data), 0, 0)
        rgpa = bufs + size * tx_buf + i * case.rx_buffer
        DESC.pack_into(mem.translate(rx_base + lay.desc_offset + 16 * i, 16), 0, rgpa,
                       case.rx_buffer, VIRTQ_DESC_F_WRITE, 0)
    avails = {}
    for name, (_, rbase) in rings.items():
        a16 = mem.translate(rbase + lay.avail_offset, 4 + 2 * size).cast("H")
        for i in range(size):
            a16[2 + i] = i
        avails[name] = a16
    rx_port.queue_started(rx_v)
    tx_port.queue_started(tx_v)
    # The receiver "speaks" once so that the frames are unicast to it.
    sw.fdb.learn(bytes(MAC_RX), rx_port, sw.clock())
    per_round = size if len(data) < 4096 else 16

    def refill(name: str, n: int) -> None:
        a16 = avails[name]
        a16[1] = (a16[1] + n) & 0xFFFF

    frames = 0
    spent = 0.0
    prof = cProfile.Profile() if profile else None
    rx_avail = avails["rx"]
    rx_queue = rx_v.queue
    assert rx_queue is not None
    while spent < seconds:
        refill("tx", per_round)
        # Every RX buffer the switch used goes straight back (it completes in order).
        rx_avail[1] = (rx_queue.used_idx + size) & 0xFFFF  # type: ignore[attr-defined]
        # CPU time of this thread: the machine may be shared, wall time would lie.
        t = time.thread_time()
        if prof is not None:
            prof.enable()
        tx_port.process(tx_v)
        if prof is not None:
            prof.disable()
        spent += time.thread_time() - t
        frames += per_round
    drops = rx_port.counters.drops
    if drops:
        print(f"micro: drops {drops}")
    if prof is not None:
        path = Path(tempfile.mkdtemp()) / "micro.prof"
        prof.dump_stats(str(path))
        print_profile(path, label="the forwarding path (in-process micro run)")
    return frames / spent


# --------------------------------------------------------------------- report

def print_table(results: list[Result]) -> None:
    print()
    print(f"{'target':<11} {'case':<36} {'rate':>14} {'frames/s':>11} {'offered/s':>11} "
          f"{'CPU':>5} {'rate per CPU-s':>16} {'gen CPU':>7} {'received':>11} "
          f"{'forwarded':>11}  drops")
    for r in results:
        drops = ", ".join(f"{k}={v}" for k, v in r.drops.items()) or "-"
        fwd = "?" if r.forwarded is None else f"{r.forwarded:,}"
        print(f"{r.target:<11} {r.case.name:<36} {r.rate:>8.3f} {r.case.unit:<5} "
              f"{r.pps:>11,.0f} {r.sent_pps:>11,.0f} {r.cpu * 100:>4.0f}% "
              f"{r.per_cpu:>9.3f} {r.case.unit:<6} {r.gen_cpu * 100:>6.0f}% {r.frames:>11,} "
              f"{fwd:>11}  {drops}")
    print("(received: frames the receiving guest got in the measured window; forwarded: "
          "what the target itself counts, warm-up included)")


def print_profile(path: Path, top: int = 18,
                  label: str = "vvu-switch under the 64 B load") -> None:
    """Top functions by own time, as shares of the *busy* time: waiting in epoll
    (before the traffic starts, between kicks) is idle and left out."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    idle = sum(v[2] for (_f, _l, fn), v in entries.items() if fn.startswith(
        "<method 'poll' of 'select.epoll"))
    busy = stats.total_tt - idle  # type: ignore[attr-defined]
    print(f"\ncProfile of {label} (top {top} by own time; {busy:.2f} s busy, "
          f"{idle:.2f} s idle in epoll left out):")
    print(f"{'own s':>7} {'busy %':>6} {'calls':>10}  function")
    rows = sorted(((k, v) for k, v in entries.items()
                   if not k[2].startswith("<method 'poll' of 'select.epoll")),
                  key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, func), (_cc, nc, tt, _ct, _callers) in rows:
        where = f"{Path(file).name}:{line}" if file != "~" else "builtin"
        print(f"{tt:>7.2f} {100 * tt / busy:>5.1f}% {nc:>10}  {func} ({where})")


def load_average() -> str:
    """The machine's load as ``uptime`` shows it: on a shared machine, read every
    figure next to it."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> int:
    # SIGTERM (e.g. from timeout(1)) unwinds like Ctrl-C, so the switch and the
    # traffic generator are stopped by the finally clauses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per case")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--only", choices=sorted(cases()), action="append",
                   help="run only these cases (repeat)")
    p.add_argument("--no-profile", action="store_true")
    peer_opts = p.add_mutually_exclusive_group()
    peer_opts.add_argument("--no-peer", action="store_true",
                           help="skip the peers (testpmd, OVS-DPDK)")
    peer_opts.add_argument("--require-peer", action="store_true",
                           help="fail (exit 1) if a peer that should run is not found")
    p.add_argument("--peer", choices=[name for name, _, _ in PEERS], action="append",
                   help="run only these peers (repeat; default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--pure", action="store_true",
                   help="also run each case against vvu-switch in pure Python "
                        "(VVU_PURE_PYTHON=1) and print the ratios compiled / pure")
    p.add_argument("--busy-poll", type=float, default=0.0, metavar="USEC",
                   help="run vvu-switch with --busy-poll USEC")
    p.add_argument("--micro", action="store_true",
                   help="only the in-process forwarding micro-benchmark (no IPC, no guests)")
    args = p.parse_args()
    global BUSY_POLL_USEC
    BUSY_POLL_USEC = args.busy_poll
    if args.micro:
        for key in args.only or list(cases()):
            c = cases()[key]
            variants = (False, True) if args.pure else (False,)
            got = {}
            for pure in variants:
                fps = got[pure] = micro(c, args.duration, pure=pure)
                rate = f"{fps / 1e6:.3f} Mpps" if c.unit == "Mpps" else \
                    f"{fps * len(c.frame) * 8 / 1e9:.2f} Gbit/s"
                label = f"{c.name}{' (pure)' if pure else ''}"
                print(f"micro {label:<43} {fps:>12,.0f} frames/s  {rate} per core")
            if args.pure:
                print(f"micro {c.name}: compiled / pure {got[False] / got[True]:.2f}x")
        if not args.no_profile:
            micro(cases()["64"], min(args.duration, 2.0), profile=True)
        return 0
    all_cases = cases()
    chosen = args.only or list(all_cases)
    switch_cpu, guest_cpu = cpus()
    print(f"CPUs: switch on {switch_cpu}, guests on {guest_cpu}; ring size {QUEUE_SIZE}; "
          f"{args.duration:g} s per case after {args.warmup:g} s warm-up; "
          f"busy-poll {args.busy_poll:g} us; {load_average()}")
    results: list[Result] = []
    # A target that forwards nothing is reported and the run goes on (the other
    # rows are still worth having), but the exit status says it failed.
    failures: list[str] = []
    pure_pairs: list[tuple[Result, Result]] = []
    for key in chosen:
        row: dict[bool, Result] = {}
        for pure in (False, True) if args.pure else (False,):
            try:
                res = run_case(all_cases[key], args.duration, args.warmup, pure=pure)
            except PeerError as e:
                failures.append(str(e))
                print(f"\nerror: {e}")
                continue
            row[pure] = res
            results.append(res)
            print_table([res])
        if len(row) == 2:
            pure_pairs.append((row[False], row[True]))
    peers: list[Result] = []
    for name, find, run in PEERS:
        if "64" not in chosen or args.no_peer or (args.peer and name not in args.peer):
            continue
        launcher, where = find()
        if launcher is None:
            msg = f"peer: {name} not found ({where}); no comparison run"
            print(f"\n{msg}")
            if args.require_peer:
                failures.append(msg)
            continue
        print(f"\npeer: {name} from {where}")
        try:
            peers.append(run(launcher, all_cases["64"], args.duration, args.warmup))
        except PeerError as e:
            failures.append(str(e))
            print(f"\nerror: {e}")
    results += peers
    print_table(results)
    ours = next((r for r in results if r.target == "vvu-switch" and r.case.unit == "Mpps"),
                None)
    # Every rate is > 0 here: run_case refuses a window with no frames.
    for peer in peers:
        if ours is None:
            break
        print(f"\nvvu-switch / {peer.target} at 64 B: {ours.rate / peer.rate:.3f} in Mpps, "
              f"{ours.per_cpu / peer.per_cpu:.3f} in Mpps per forwarding CPU-second "
              f"({ours.per_cpu:.3f} vs {peer.per_cpu:.3f})")
    for comp, pure_res in pure_pairs:
        print(f"\n{comp.case.name}: compiled / pure {comp.rate / pure_res.rate:.2f}x raw, "
              f"{comp.per_cpu / pure_res.per_cpu:.2f}x per switch CPU-second "
              f"({comp.per_cpu:.3f} vs {pure_res.per_cpu:.3f} {comp.case.unit} per core)")
    print(f"after the runs: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "results": [r.as_dict() for r in results], "failures": failures,
            "load_average": os.getloadavg(), "cpus": [switch_cpu, guest_cpu],
            "duration": args.duration}, indent=1) + "\n")
    if failures:
        print("\nFAILED:\n" + "\n".join(f"  {f.splitlines()[0]}" for f in failures),
              file=sys.stderr)
        return 1
    if not args.no_profile:
        with tempfile.TemporaryDirectory(prefix="vvu-switch-prof-") as d:
            prof = Path(d) / "switch.prof"
            run_case(all_cases["64"], min(args.duration, 3.0), 1.0, profile=prof)
            print_profile(prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
