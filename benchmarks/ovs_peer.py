"""Open vSwitch with DPDK as the switch benchmark's second peer.

testpmd's io forwarding is the upper bound of a vhost-user forwarder; OVS is
what a switch like vvu-switch is compared with: a learning bridge (the NORMAL
action) between two ``dpdkvhostuser`` ports, one PMD thread. Everything runs
inside the tools tree (``openvswitch-switch-dpdk``), with all of OVS's state in
one directory under /tmp, which the sandbox shares with the host, so the
benchmark's front ends reach the ports' sockets:

* ``ovsdb-server`` on a fresh database, ``ovs-vswitchd-dpdk`` with
  ``OVS_RUNDIR`` pointing there (its vhost-user sockets land in the run dir);
* EAL as for testpmd (no hugepages here): ``--no-huge --iova-mode=va
  --no-shconf``, plus ``--legacy-mem``, which ``--no-huge`` implies anyway and
  which keeps OVS from adding ``--in-memory`` (refused next to ``--no-huge``);
* ``dpdkvhostuser`` (OVS is the server) rather than the recommended
  ``dpdkvhostuserclient``: the benchmark's front ends connect, like QEMU's
  ``-chardev socket`` without ``server=on``. OVS logs a deprecation warning.

Frames it forwarded to the receiver: the ``tx_packets`` statistic of the
receiver's port, read before it stops.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.dpdk_peer import Launcher, PeerError, descendants, process_comm
from benchmarks.host_daemon import stop_group

__all__ = ["VSWITCHD", "OvsDpdk", "find_ovs_dpdk", "flow_packets_to"]

VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
#: The kernel keeps 15 characters of a command name.
VSWITCHD_COMM = "ovs-vswitchd-dpdk"[:15]
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
#: Ports: the sender's (p0) and the receiver's (p1), as for testpmd.
PORTS = ("p0", "p1")


def find_ovs_dpdk() -> tuple[Launcher | None, str]:
    """How to run OVS's programs (the tools tree only), and where they were found
    or looked for."""
    from vvu_runtime.launch.toolchain import Toolchain, ToolchainError

    try:
        tc = Toolchain()
        if not tc.is_built():
            return None, f"the tools tree is not built at {tc.tree}"
        if not (tc.tree / VSWITCHD.lstrip("/")).exists():
            return None, (f"the tools tree at {tc.tree} has no {VSWITCHD} (is "
                          "openvswitch-switch-dpdk in mkosi.conf's ToolsTreePackages=? "
                          "run ./setup)")
        return tc.command, f"tools tree {tc.tree}"
    except ToolchainError as e:
        return None, f"tool chain: {e}"


def flow_packets_to(dump_flows: str, port: str) -> int:
    """Packets of the datapath flows whose only action is output to ``port``, from
    ``ovs-appctl dpctl/dump-flows --names``."""
    total = 0
    for line in dump_flows.splitlines():
        m = re.search(r"\bpackets:(\d+),.*\bactions:(\S+)\s*$", line)
        if m and m[2] == port:
            total += int(m[1])
    return total


def eal_args() -> str:
    """``other_config:dpdk-extra``: OVS appends these to its own EAL arguments."""
    return ("--no-huge -m 512 --iova-mode=va --no-shconf --legacy-mem --no-pci "
            "--no-telemetry")


class OvsDpdk:
    """ovsdb-server and ovs-vswitchd-dpdk with one bridge of two vhost-user ports.

    ``lcores`` is (main, PMD): OVS's own threads on the first CPU, the one PMD
    thread (which busy-polls both ports) on the second. A context manager that
    always stops both daemons.
    """

    name = "ovs-dpdk"

    def __init__(self, launcher: Launcher, workdir: Path, lcores: tuple[int, int]) -> None:
        self.launcher = launcher
        self.dir = workdir
        self.lcores = lcores
        self.db = workdir / "conf.db"
        self.db_sock = workdir / "db.sock"
        self.sockets = (str(workdir / PORTS[0]), str(workdir / PORTS[1]))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pid: int | None = None
        self.forwarded: int | None = None

    def __enter__(self) -> OvsDpdk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 25) -> str:
        parts = []
        for log in ("vswitchd.log", "vswitchd.out", "ovsdb.log", "ovsdb.out"):
            with contextlib.suppress(OSError):
                text = (self.dir / log).read_text(errors="replace").rstrip()
                if text:
                    parts.append(f"--- {log}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no output)"

    def _run(self, argv: Sequence[str], timeout: float = 60) -> str:
        r = subprocess.run(self.launcher(argv), capture_output=True, text=True,
                           timeout=timeout, check=False)
        if r.returncode != 0:
            raise PeerError(f"{' '.join(argv)} failed ({r.returncode}): "
                            f"{(r.stderr or r.stdout).strip()[-1500:]}\n{self.log_tail()}")
        return r.stdout

    def vsctl(self, *args: str, wait: bool = True) -> str:
        return self._run(["ovs-vsctl", f"--db=unix:{self.db_sock}",
                          *([] if wait else ["--no-wait"]), "--timeout=60", *args])

    def _daemon(self, argv: Sequence[str], out: str) -> subprocess.Popen[bytes]:
        with open(self.dir / out, "wb") as f:
            # Own session each: the sandbox and the daemon are stopped as one group.
            proc = subprocess.Popen(self.launcher(argv), stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_for(self, what: str, ready: Sequence[Path], timeout: float,
                  proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in ready):
            if proc.poll() is not None:
                raise PeerError(f"{what} exited ({proc.returncode})\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise PeerError(f"{what} not ready within {timeout:g} s\n{self.log_tail()}")
            time.sleep(0.1)

    def start(self, timeout: float = 90.0) -> None:
        main, pmd = self.lcores
        d = self.dir
        self._run(["ovsdb-tool", "create", str(self.db), SCHEMA])
        db = self._daemon(["ovsdb-server", str(self.db), f"--remote=punix:{self.db_sock}",
                           f"--unixctl={d / 'ovsdb.ctl'}", f"--pidfile={d / 'ovsdb.pid'}",
                           f"--log-file={d / 'ovsdb.log'}"], "ovsdb.out")
        self._wait_for("ovsdb-server", [self.db_sock], timeout, db)
        self.vsctl("init", "--", "set", "Open_vSwitch", ".",
                   "other_config:dpdk-init=true",
                   f"other_config:dpdk-lcore-mask={1 << main:#x}",
                   f"other_config:pmd-cpu-mask={1 << pmd:#x}",
                   f"other_config:dpdk-extra={eal_args()}", wait=False)
        # OVS_RUNDIR: the vhost-user sockets go to the run dir, here under /tmp.
        vswitchd = self._daemon(["env", f"OVS_RUNDIR={d}", VSWITCHD, f"unix:{self.db_sock}",
                                 f"--unixctl={d / 'vswitchd.ctl'}",
                                 f"--pidfile={d / 'vswitchd.pid'}",
                                 f"--log-file={d / 'vswitchd.log'}"], "vswitchd.out")
        self._wait_for("ovs-vswitchd-dpdk", [d / "vswitchd.ctl"], timeout, vswitchd)
        ports: list[str] = []
        for p in PORTS:
            ports += ["--", "add-port", "br0", p, "--", "set", "Interface", p,
                      "type=dpdkvhostuser"]
        # NORMAL (the default flow of a new bridge): MAC learning, like vvu-switch.
        self.vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev",
                   *ports)
        self._wait_for("the dpdkvhostuser sockets", [Path(s) for s in self.sockets],
                       timeout, vswitchd)
        self.pid = next((p for p in descendants(vswitchd.pid) if process_comm(p) == VSWITCHD_COMM),
                        None)
        if self.pid is None:
            raise PeerError(f"no {VSWITCHD_COMM} process under {vswitchd.pid}")

    def count_forwarded(self) -> int:
        """Frames the datapath sent to the receiver's port so far, summed over its
        flows; call it while the traffic runs (an idle flow is evicted).

        Not the port's counters: for these vhost-user ports OVS 3.5 reports
        them as "?" (ovs-ofctl dump-ports) or not at all (Interface statistics).
        """
        out = self._run(["ovs-appctl", f"--target={self.dir / 'vswitchd.ctl'}",
                         "dpctl/dump-flows", "--names"])
        self.forwarded = flow_packets_to(out, PORTS[1])
        return self.forwarded

    def stop(self) -> None:
        # vswitchd first (it holds the ports), then the database; SIGTERM is
        # their clean exit, SIGKILL for whatever is left of each group.
        for proc in reversed(self.procs):
            stop_group(proc, signal.SIGTERM, 10.0)
        self.procs = []
