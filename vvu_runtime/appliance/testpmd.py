"""The ``engine: testpmd`` command line: DPDK's testpmd behind vvu-proxy in a vswitch.

    vvu-proxy --listen --link ADDR0=/run/vvu/testpmd/LINK0.sock \\
              --link ADDR1=/run/vvu/testpmd/LINK1.sock \\
              --exec-all "stdbuf -oL dpdk-testpmd -l 0,1 --no-huge -m 128 --no-pci ... \\
                          --vdev net_vhost0,iface=/run/vvu/testpmd/LINK0.sock,client=1 \\
                          --vdev net_vhost1,iface=/run/vvu/testpmd/LINK1.sock,client=1 \\
                          -- --forward-mode=io --stats-period=5 ..."

vvu-proxy drives the two VVU functions and listens on one socket per link;
one stock dpdk-testpmd connects to both as a vhost-user back-end (its
``net_vhost`` ports in client mode, which reconnect by themselves whenever the
proxy drops a connection: a consumer that went, or a session the proxy ended).
testpmd forwards every frame of port 0 to port 1 and back (``io``: no lookup,
no learning; that is why the engine takes exactly two links). vvu-proxy
restarts it whenever it exits (``--exec-all``), and a consumer's QEMU
reconnects to the new one as it does to a restarted vvu-switch.

Why these flags (DPDK 24.11, Debian trixie's):

* ``--no-huge -m 128``: no hugepages in the appliance; the EAL takes 128 MiB of
  ordinary memory. testpmd never hands that memory to a device (``--no-pci``:
  no PCI probe at all; the vhost PMD copies frames between the consumers' RAM
  and its mbufs), so IOVA-as-VA is enough;
* ``--total-num-mbufs``: testpmd's default sizes the pool for 32 ports
  (~160,000 mbufs, more than 128 MiB); two ports need far fewer;
* ``--no-shconf --no-telemetry``: no runtime files in /run/dpdk (nothing left
  behind by a killed testpmd for its successor to trip over), no telemetry socket;
* ``-l 0,1 --main-lcore 0``: lcore 1 busy-polls both ports; lcore 0 only prints
  the counters every :data:`STATS_PERIOD` s (``--stats-period``: without it a
  non-interactive testpmd waits for a line on stdin, and stdin is /dev/null,
  so it would stop at once). Hence at least 2 vCPUs;
* ``--disable-link-check``: forward from the start instead of waiting ~9 s for
  links that come up only when a consumer connects;
* ``stdbuf -oL``: the counters reach the journal as they are printed, not 4 KiB later.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vvu_runtime.appliance.config import ApplianceConfig

__all__ = [
    "MEMORY_MB",
    "PROGRAM",
    "STATS_PERIOD",
    "PortCounters",
    "parse_port_stats",
    "proxy_argv",
    "socket_path",
    "testpmd_argv",
]

PROGRAM = "dpdk-testpmd"
#: The EAL's memory (MiB, not hugepages): the mbuf pool and testpmd's own.
MEMORY_MB = 128
#: 8192 mbufs of ~2.3 KiB: ~19 MiB, room for both ports' rings and bursts.
MBUFS = 8192
#: Seconds between two counter reports in the journal.
STATS_PERIOD = 5
#: io forward between port 0 and port 1.
PORTS = 2


def socket_path(run_dir: Path, link: str) -> Path:
    """Where vvu-proxy listens for testpmd's port of ``link``."""
    return run_dir / "testpmd" / f"{link}.sock"


def testpmd_argv(sockets: Sequence[Path], *, memory_mb: int = MEMORY_MB,
                 stats_period: int = STATS_PERIOD) -> list[str]:
    """dpdk-testpmd forwarding (io) between the vhost-user ports on ``sockets``
    (port 0, port 1), each connecting to vvu-proxy (``client=1``)."""
    if len(sockets) != PORTS:
        raise ValueError(f"testpmd forwards between exactly {PORTS} ports, got {len(sockets)}")
    vdevs: list[str] = []
    for i, sock in enumerate(sockets):
        if "," in str(sock):
            raise ValueError(f"{sock}: a vdev argument cannot hold a comma")
        vdevs += ["--vdev", f"net_vhost{i},iface={sock},client=1,queues=1"]
    return [
        "stdbuf", "-oL", PROGRAM,
        "-l", "0,1", "--main-lcore", "0",
        "--no-huge", "-m", str(memory_mb), "--no-pci", "--iova-mode=va",
        "--no-shconf", "--no-telemetry",
        *vdevs,
        "--",
        "--forward-mode=io", "--auto-start", "--nb-cores=1", "--rxq=1", "--txq=1",
        f"--total-num-mbufs={MBUFS}", f"--stats-period={stats_period}",
        "--disable-link-check", "--no-lsc-interrupt",
    ]


def proxy_argv(config: ApplianceConfig, matched: Mapping[str, str], run_dir: Path) -> list[str]:
    """vvu-proxy listening for testpmd on each link's VVU function (``matched``:
    link name -> PCI address), supervising the one testpmd that serves both."""
    if config.kind != "vswitch" or config.options.get("engine") != "testpmd":
        raise ValueError(f"{config.source}: not a vswitch with engine testpmd")
    sockets = [socket_path(run_dir, name) for name in config.link_names]
    argv = ["vvu-proxy", "--listen"]
    for name, sock in zip(config.link_names, sockets, strict=True):
        argv += ["--link", f"{matched[name]}={sock}"]
    return [*argv, "--exec-all", shlex.join(testpmd_argv(sockets))]


@dataclass(frozen=True)
class PortCounters:
    """One port's totals in a testpmd statistics report."""

    rx_packets: int
    tx_packets: int


_PORT = re.compile(r"#+\s*NIC statistics for port (\d+)\s*#+")
_RX = re.compile(r"RX-packets:\s*(\d+)")
_TX = re.compile(r"TX-packets:\s*(\d+)")


def parse_port_stats(text: str) -> dict[int, PortCounters]:
    """The last complete report of each port in testpmd's output (``--stats-period``
    prints ``NIC statistics for port N`` blocks, each with RX-packets and TX-packets).
    A block whose counters are missing is skipped (a log cut mid-report)."""
    found: dict[int, PortCounters] = {}
    blocks = _PORT.split(text)
    # split() gives [before, port, body, port, body, ...].
    for port, body in zip(blocks[1::2], blocks[2::2], strict=True):
        rx, tx = _RX.search(body), _TX.search(body)
        if rx is not None and tx is not None:
            found[int(port)] = PortCounters(int(rx.group(1)), int(tx.group(1)))
    return found
