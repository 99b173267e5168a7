"""Soak runs on a real vvu-launch lab: one storage appliance ``st1`` with one export,
a consumer ``c1`` whose disk it serves, and a consumer ``c2`` wired to nothing.

While c1 writes verified records (:mod:`tests.support.records`) to its disk, a
disruption is repeated (a backend restart, a kill -9 of the backend, of vvu-devd,
of the appliance's QEMU); after each one the test waits until c1 acknowledged new
records (its I/O came back), and at the end every acknowledged record is read back
in c1 with O_DIRECT and found in the appliance's data-disk image on the host.

The short variants (tests/acceptance/test_soak.py) and the long script
(soak/run.py) drive the same :class:`SoakLab`.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import testinfra

from tests.support import records
from tests.support.launch_lab import Lab, wait_until

DISK = "/dev/vdb"  # c1's disk from st1 (vda is its root disk)
GUEST_RECORDS = "/root/records.py"
#: PCI IDs of what an appliance could read consumer memory through: VVU functions
#: and the ivshmem device (its BAR2 is shared memory too).
VVU_FUNCTION = "0x107f"
IVSHMEM = "0x1110"
#: st1's vvu-blk polls its rings this long after serving (options.busy_poll_us).
BUSY_POLL_US = 500


def topology_yaml(name: str, export_mib: int) -> str:
    # st1 takes the fast path: calls through the doorbell companion, rung by vvu-blk's
    # compiled loop, which also busy-polls (the disruptions below hit that path).
    return f"""\
name: {name}
defaults:
  consumer: {{cpus: 1, memory: 256M}}
appliances:
  st1:
    kind: storage
    memory: 1G  # at 512M vvu-blk failed: its rings crossed a 4 KiB page devd could not map
    doorbell_bypass: true
    options: {{busy_poll_us: {BUSY_POLL_US}}}
    exports:
      - {{name: log, size: {export_mib}M}}
consumers:
  c1: {{disks: [st1/log]}}
  c2: {{}}
"""


@dataclass
class PhaseResult:
    """Figures of one soak phase."""

    name: str
    disruptions: int
    acknowledged: int
    verified_in_consumer: int
    verified_in_image: int
    lost: list[str]
    errors_seen: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Writer:
    """The records writer running in c1 (started detached; stops at ``count`` or when told)."""

    def __init__(self, soak: SoakLab, first: int, count: int, pause: float, *,
                 hold: bool = False) -> None:
        self.soak = soak
        self.run = secrets.token_bytes(16)
        self.first = first
        self.count = count
        tag = self.run.hex()[:8]
        self.log = f"/root/soak-{tag}.log"
        self.stop_file = f"/root/soak-{tag}.stop"
        self.hold_file = f"/root/soak-{tag}.go" if hold else None
        held = f"--hold {self.hold_file} " if hold else ""
        soak.c1().check_output(
            f"nohup python3 {GUEST_RECORDS} write {DISK} --run {self.run.hex()} "
            f"--first {first} --count {count} --log {self.log} --stop {self.stop_file} "
            f"--pause {pause} {held}>/dev/null 2>&1 &")

    def lines(self) -> list[str]:
        out: str = self.soak.c1().check_output(f"cat {self.log} 2>/dev/null || true")
        return out.splitlines()

    def acked(self) -> int:
        """How many records it acknowledged so far (counted in the guest: logs grow long)."""
        out: str = self.soak.c1().check_output(f"grep -c '^ACK ' {self.log} || true")
        return int(out.strip() or 0)

    def wait_acked(self, at_least: int, timeout: float) -> int:
        def enough() -> int | None:
            n = self.acked()
            return n if n >= at_least else None
        return wait_until(f"c1's writer to acknowledge {at_least} records", enough, timeout, 1)

    def done(self) -> list[str] | None:
        """Its log once it wrote DONE (stopped by itself or when told), else None."""
        lines = self.lines()
        return lines if lines and lines[-1].startswith("DONE") else None

    def release(self) -> None:
        """Let a held writer's fsync go (see ``records.write``)."""
        assert self.hold_file is not None
        self.soak.c1().check_output(f"touch {self.hold_file}")

    def finish(self, timeout: float = 300) -> list[str]:
        """Tell it to stop, wait for its DONE line; its log."""
        self.soak.c1().check_output(f"touch {self.stop_file}")
        return wait_until("c1's writer to stop", self.done, timeout, 1)


class SoakLab:
    """Drives the soak lab (already up) through :class:`Lab`."""

    def __init__(self, lab: Lab, export_mib: int) -> None:
        self.lab = lab
        self.blocks = export_mib * 1024 * 1024 // records.BLOCK
        self.next_block = 0
        self._hosts: dict[str, Any] = {}

    # -- access -----------------------------------------------------------------------

    def host(self, node: str) -> Any:
        """A testinfra host on the paramiko backend (the lab's ssh_config and key)."""
        if node not in self._hosts:
            self._hosts[node] = testinfra.get_host(
                f"paramiko://{node}", ssh_config=str(self.lab.lab_dir / "ssh_config"))
        return self._hosts[node]

    def c1(self) -> Any:
        return self.host("c1")

    def reconnect(self, node: str) -> None:
        """Forget a node's SSH connection (its VM was restarted)."""
        self._hosts.pop(node, None)

    def install_writer(self) -> None:
        text = Path(records.__file__).read_bytes()
        self.c1().check_output(
            f"echo {base64.b64encode(text).decode()} | base64 -d > {GUEST_RECORDS}")

    def data_disk(self) -> Path:
        disks = [Path(p) for p in self.lab.plan()["data_disks"]]
        (disk,) = [p for p in disks if "log" in p.name]
        return disk

    def qemu_pids(self) -> dict[str, int]:
        st = self.lab.status()
        return {n: self.lab.node(n, st)["pid"] for n in ("st1", "c1", "c2")}

    def wait_backend_serving(self, timeout: float = 300) -> None:
        st1 = self.host("st1")

        def active() -> bool:
            state: str = st1.run("systemctl is-active vvu-blk").stdout.strip()
            if state == "failed":  # systemd gave up: no point in waiting
                journal = st1.run("journalctl -u vvu-blk --no-pager | tail -8").stdout
                raise AssertionError(f"vvu-blk in st1 failed for good:\n{journal}")
            return state == "active"
        wait_until("vvu-blk active in st1", active, timeout, 1)

    def wait_healthy(self, timeout: float = 600) -> dict[str, Any]:
        """Until `vvu-launch status` shows every node ready and every link up both ways."""
        def healthy() -> dict[str, Any] | None:
            st = self.lab.status()
            ok = (all(n["state"] == "ready" for n in st["nodes"])
                  and all("BACKEND_UP" in lk["status"] and "FRONTEND_UP" in lk["status"]
                          for lk in st["links"]))
            return st if ok else None
        return wait_until("the lab healthy (status: every node ready, every link up)",
                          healthy, timeout, 2)

    # -- a phase ------------------------------------------------------------------------

    def phase(self, name: str, disrupt: Callable[[int], None], times: int, *,
              count: int, pause: float = 0.02, progress: int = 3,
              timeout: float = 600) -> PhaseResult:
        """Writes running; ``disrupt(i)`` ``times`` times, each followed by ``progress``
        new acknowledged records; then every acknowledged record is checked."""
        if self.next_block + count > self.blocks:
            raise ValueError(f"phase {name}: {count} records do not fit in the export")
        start = time.monotonic()
        writer = Writer(self, self.next_block, count, pause)
        self.next_block += count
        try:
            writer.wait_acked(progress, timeout)
            for i in range(times):
                disrupt(i)
                before = writer.acked()
                writer.wait_acked(before + progress, timeout)
        except AssertionError as e:
            # A stalled writer is the one failure that says nothing by itself: say
            # where c1's I/O stopped (guest, devd, backend) with everything at hand.
            raise AssertionError(f"{e}\n{self.diagnosis(writer)}") from None
        log = writer.finish()
        return self.verify(name, writer, log, times, time.monotonic() - start)

    def verify(self, name: str, writer: Writer, log: list[str], disruptions: int,
               seconds: float) -> PhaseResult:
        acked = records.acked_in(log)
        # Read back in the consumer, past its page cache: what the appliance serves.
        out = self.c1().run(f"python3 {GUEST_RECORDS} verify {DISK} --run {writer.run.hex()} "
                            f"--first {writer.first} --log {writer.log}")
        in_guest = json.loads(out.stdout)
        # ...and on the host, in the data disk's image: what the appliance flushed.
        on_host = records.find_records(str(self.data_disk()), writer.run, writer.first, acked)
        lost = sorted(set(in_guest["lost"]) | {f"image {x}" for x in on_host.lost})
        return PhaseResult(name=name, disruptions=disruptions, acknowledged=len(set(acked)),
                           verified_in_consumer=in_guest["verified"],
                           verified_in_image=on_host.verified, lost=lost,
                           errors_seen=sum(1 for ln in log if ln.startswith("ERR ")),
                           seconds=round(seconds, 1))

    def diagnosis(self, writer: Writer) -> str:
        """What each layer says about a stalled writer (best effort: never raises)."""
        def safe(what: str, get: Callable[[], str]) -> str:
            try:
                return f"--- {what}:\n{get().rstrip()}"
            except Exception as e:  # a diagnosis must not hide the failure
                return f"--- {what}: unavailable ({type(e).__name__}: {e})"

        def devd_status() -> str:
            state = self.lab.status()
            return json.dumps({"nodes": state["nodes"], "links": state["links"]}, indent=1)
        parts = [
            safe("vvu-launch status", devd_status),
            safe("c1 writer log (tail)", lambda: "\n".join(writer.lines()[-5:])),
            safe("c1 kernel log (tail, repeated I/O errors left out)", lambda: self.c1().run(
                "dmesg | grep -v 'I/O error, dev' | tail -25").stdout),
            safe("c1 inflight of vdb", lambda: self.c1().run(
                "cat /sys/block/vdb/inflight; cat /sys/block/vdb/stat").stdout),
            safe("st1 vvu-blk journal (tail)", lambda: self.host("st1").run(
                "journalctl -u vvu-blk --no-pager | tail -30").stdout),
            safe("st1 kernel log (tail)", lambda: self.host("st1").run(
                "dmesg | tail -15").stdout),
            safe("st1 vvu-devd log (tail)", lambda: (
                self.lab.lab_dir / "logs" / "st1.devd.log").read_text(errors="replace")[-3000:]),
            safe("supervisor log (tail)", lambda: self.lab.supervisor_log(4000)),
        ]
        return "\n".join(parts)

    def held_write(self) -> Writer:
        """One record written to c1's disk and completed, its fsync held back (the
        device may keep it in a volatile cache until then): disrupt, then
        :meth:`flush_held`."""
        writer = Writer(self, self.next_block, 1, 0.0, hold=True)
        self.next_block += 1
        wait_until("c1's held record to be written",
                   lambda: any(ln.startswith("WRITTEN ") for ln in writer.lines()) or None,
                   120, 0.5)
        return writer

    def flush_held(self, writer: Writer, name: str, disruptions: int) -> PhaseResult:
        """Let the held record's fsync go after a disruption: it must reach the image."""
        start = time.monotonic()
        writer.release()
        log = wait_until("c1's held record to be flushed", writer.done, 600, 0.5)
        return self.verify(name, writer, log, disruptions, time.monotonic() - start)

    # -- disruptions --------------------------------------------------------------------

    def restart_backend(self, _: int) -> None:
        """A clean restart of vvu-blk in st1: devd closes c1's session, c1 reconnects."""
        self.host("st1").check_output("systemctl restart vvu-blk")
        self.wait_backend_serving()

    def kill_backend(self, _: int) -> None:
        """kill -9 of vvu-blk; systemd in st1 starts it again."""
        st1 = self.host("st1")
        pid = st1.check_output("systemctl show -P MainPID vvu-blk").strip()
        st1.check_output(f"kill -9 {pid}")

        def new_pid() -> str | None:
            now: str = st1.check_output("systemctl show -P MainPID vvu-blk").strip()
            return now if now not in ("0", pid) else None
        wait_until("vvu-blk restarted with a new pid", new_pid, 300, 1)
        self.wait_backend_serving()

    def kill_devd(self, _: int) -> None:
        """kill -9 of st1's vvu-devd; the supervisor restarts it and st1 (no hot-unplug)."""
        before = self.lab.node("st1")
        os.kill(before["devd_pid"], signal.SIGKILL)
        wait_until("the supervisor to restart st1's vvu-devd",
                   lambda: self.lab.node("st1")["restarts"] > before["restarts"] or None, 300, 2)
        self.reconnect("st1")
        self.wait_healthy()

    def kill_appliance_after_flush(self, count: int) -> tuple[PhaseResult, list[int]]:
        """c1 writes ``count`` records (each O_DIRECT + fsync) and stops; at once st1's QEMU
        gets SIGKILL. The records must be in st1's data-disk image on the host."""
        start = time.monotonic()
        writer = Writer(self, self.next_block, count, 0.0)
        self.next_block += count
        log = wait_until("c1's writer to finish", writer.done, 600, 0.5)
        st1 = self.lab.node("st1")
        os.kill(st1["pid"], signal.SIGKILL)
        acked = records.acked_in(log)
        on_host = records.find_records(str(self.data_disk()), writer.run, writer.first, acked)
        result = PhaseResult(name="kill -9 of st1's QEMU after FLUSH", disruptions=1,
                             acknowledged=len(set(acked)), verified_in_consumer=0,
                             verified_in_image=on_host.verified, lost=list(on_host.lost),
                             errors_seen=sum(1 for ln in log if ln.startswith("ERR ")),
                             seconds=round(time.monotonic() - start, 1),
                             notes=[f"st1 QEMU pid {st1['pid']} killed"])
        wait_until("the supervisor to start st1 again",
                   lambda: self.lab.node("st1")["pid"] != st1["pid"] or None, 300, 2)
        self.reconnect("st1")
        return result, [st1["pid"], self.lab.node("st1")["pid"]]

    # -- isolation ----------------------------------------------------------------------

    def isolation(self) -> dict[str, Any]:
        """Markers in c1's RAM (wired to st1) and c2's (wired to nothing); from inside st1
        every shared-memory BAR of its VVU functions and of its ivshmem device is
        searched. See tests/acceptance/test_soak.py for what this proves."""
        markers = {n: b"VVU-ISOLATION-" + n.encode() + secrets.token_bytes(16)
                   for n in ("c1", "c2")}
        holders = {}
        for node, marker in markers.items():
            # The marker exists only in that process's heap (the command line has hex).
            holders[node] = self.host(node).check_output(
                "nohup python3 -c 'import sys, time; m = bytes.fromhex(sys.argv[1]) * 64; "
                f"time.sleep(3600)' {marker.hex()} >/dev/null 2>&1 & echo $!").strip()
        try:
            # The host's view: each marker is in its own consumer's RAM file, and only there.
            # Wait for both first (python starts slowly under TCG): the scan below must
            # look for markers that exist.
            ram_files = self.lab.plan()["ram_files"]

            def where() -> dict[str, list[str]] | None:
                seen = {node: [other for other, m in markers.items()
                               if _file_contains(ram_files, node, m)] for node in markers}
                return seen if all(node in seen[node] for node in markers) else None
            in_ram_files = wait_until("the markers in the consumers' RAM files", where, 120, 1)
            st1 = self.host("st1")
            st1.check_output("systemctl stop vvu-blk")  # vfio-pci lets go of the BARs
            try:
                script = base64.b64encode(SCAN.encode()).decode()
                arg = json.dumps({n: m.hex() for n, m in markers.items()})
                out = st1.run(f"echo {script} | base64 -d > /root/scan.py && "
                              f"python3 /root/scan.py '{arg}'")
                if out.rc != 0:
                    raise AssertionError(f"scan in st1 failed: {out.stderr}")
                scanned = json.loads(out.stdout)
            finally:
                st1.check_output("systemctl start vvu-blk")
                self.wait_backend_serving()
        finally:
            for node, pid in holders.items():
                self.host(node).run(f"kill {pid}")
        return {"ram_files": in_ram_files, "bars": scanned,
                "links": [lk["name"] for lk in self.lab.status()["links"]]}


def _file_contains(ram_files: dict[str, Any], node: str, marker: bytes) -> bool:
    (path,) = [p for p in ram_files if p.endswith(f"-{node}.ram")]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return m.find(marker) >= 0


#: Runs in the appliance: every function that could map consumer memory, its BARs
#: (from sysfs ``resource``), and which markers its mmappable BAR2 holds.
SCAN = f"""\
import glob, json, mmap, os, sys
markers = {{n: bytes.fromhex(h) for n, h in json.loads(sys.argv[1]).items()}}
out = []
for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
    ids = [open(f"{{dev}}/{{f}}").read().strip() for f in ("vendor", "device")]
    if ids[0] != "0x1af4" or ids[1] not in ("{VVU_FUNCTION}", "{IVSHMEM}"):
        continue
    bars = []
    for i, line in enumerate(open(f"{{dev}}/resource").read().splitlines()[:6]):
        start, end, flags = (int(x, 16) for x in line.split())
        if end:
            bars.append({{"bar": i, "size": end - start + 1, "flags": flags}})
    found = None
    size = os.path.getsize(f"{{dev}}/resource2") if os.path.exists(f"{{dev}}/resource2") else 0
    if size:
        with open(f"{{dev}}/resource2", "rb") as f:
            m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
            found = sorted(n for n, b in markers.items() if m.find(b) >= 0)
            m.close()
    driver = os.path.basename(os.readlink(f"{{dev}}/driver")) if os.path.exists(
        f"{{dev}}/driver") else None
    out.append({{"function": os.path.basename(dev), "device": ids[1], "driver": driver,
                "bars": bars, "bar2_size": size, "bar2_found": found}})
print(json.dumps(out))
"""
