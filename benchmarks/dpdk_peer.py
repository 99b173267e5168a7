"""DPDK ``dpdk-testpmd`` as the switch benchmark's peer: command line, process, counts.

testpmd forwards in ``io`` mode between two ``net_vhost`` ports, so the
benchmark's two vhost-user front ends (the same ones that drive vvu-switch)
connect to its sockets unchanged. What had to be right for it to forward at all:

* no hugepages on these machines (``HugePages_Total: 0``): ``--no-huge`` with
  ``--iova-mode=va`` (vhost copies by virtual address; nothing needs a
  physical one) and ``--no-shconf`` (no /var/run/dpdk state, so two runs and
  a crashed run do not collide; ``--in-memory`` says the same but EAL refuses
  it next to ``--no-huge``, which implies legacy memory);
* the tools tree's ``mkosi sandbox`` must not eat the ``--`` between EAL's and
  testpmd's options (``Toolchain.command`` takes care of it);
* the guests' RAM is a memfd the front end passes in SET_MEM_TABLE, which
  DPDK's vhost library maps itself: testpmd's own pool can be anonymous memory;
* testpmd runs inside the tools tree through ``mkosi sandbox``, so the process
  we start is mkosi's: the real testpmd (whose CPU is measured and whose
  counters are read) is found among its descendants, and it is stopped the way
  it stops cleanly and prints its counters: a newline on standard input
  ("Press enter to exit").

Its own per-port counters are parsed from that exit report
(:func:`parse_forward_stats`): the benchmark prints them next to what the
receiving guest counted, and a peer that forwarded nothing is a
:class:`PeerError`, never a rate of zero to divide by.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from benchmarks.host_daemon import stop_group

__all__ = [
    "Launcher",
    "Peer",
    "PeerError",
    "PortStats",
    "Testpmd",
    "descendants",
    "find_testpmd",
    "parse_forward_stats",
    "process_comm",
    "testpmd_argv",
]

#: comm of the testpmd process (at most 15 characters: the kernel cuts longer names).
TESTPMD_COMM = "dpdk-testpmd"
#: What non-interactive testpmd prints once its forwarding lcores run.
FORWARDING_STARTED = b"Press enter to exit"
#: testpmd's memory (MiB; anonymous, no hugepages) and its mbuf pool. By default
#: testpmd sizes the pool for every port it could ever have (155456 mbufs, 338
#: MB); two ports with one queue of 1024 descriptors each and per-lcore caches
#: need a few thousand.
DEFAULT_MEMORY_MB = 256
MBUFS = 16384


class Peer(Protocol):
    """A running peer as the benchmark drives it: its name, the vhost-user sockets
    of the sender's and the receiver's port, and the process whose CPU counts."""

    name: str
    sockets: tuple[str, str]
    pid: int | None

    def count_forwarded(self) -> int | None:
        """Frames forwarded to the receiver so far, if the peer can tell while it runs."""
        ...


class PeerError(RuntimeError):
    """A peer did not come up, did not forward, or did not report; the message says
    which and carries the tail of the peer's own output."""


@dataclass(frozen=True)
class PortStats:
    """One port of testpmd's "Forward statistics" exit report."""

    port: int
    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


#: Turns testpmd's own argv (``dpdk-testpmd …``) into the command that runs it:
#: inside the tools tree (``mkosi sandbox``) or from PATH.
Launcher = Callable[[Sequence[str]], list[str]]


def testpmd_argv(sockets: tuple[str, str], lcores: tuple[int, int],
                 *, memory_mb: int = DEFAULT_MEMORY_MB) -> list[str]:
    """testpmd's command line (``stdbuf -oL dpdk-testpmd EAL options -- testpmd options``):
    ``sockets`` are the vhost-user sockets of port 0 and port 1 (testpmd is the server);
    ``lcores`` is (main, forwarding): the main lcore only waits on stdin, the
    forwarding lcore busy-polls both ports."""
    main, fwd = lcores
    if main == fwd:
        raise ValueError(f"testpmd needs two distinct lcores, got {main} twice")
    tx, rx = sockets
    return [
        # Line-buffered: start() waits for FORWARDING_STARTED in the log, which a
        # block-buffered stdout would hold back.
        "stdbuf", "-oL", TESTPMD_COMM,
        "-l", f"{main},{fwd}", "--main-lcore", str(main),
        "--no-pci", "--no-huge", "-m", str(memory_mb), "--iova-mode=va", "--no-shconf",
        "--no-telemetry",
        f"--vdev=net_vhost0,iface={tx},queues=1",
        f"--vdev=net_vhost1,iface={rx},queues=1",
        "--",
        "--forward-mode=io", "--nb-cores=1", "--rxq=1", "--txq=1", "--auto-start",
        f"--total-num-mbufs={MBUFS}",
        # Forward from the start: by default testpmd first waits ~9 s for the links
        # to come up, which they only do once a front end connects; a front end
        # that connected meanwhile was served by nobody and saw 0 frames.
        "--disable-link-check",
        # No link-state interrupts: nothing here reacts to them.
        "--no-lsc-interrupt",
    ]


_PORT_HEADER = re.compile(r"-+\s*Forward statistics for port\s+(\d+)\s*-+")
_COUNTS = re.compile(r"(RX|TX)-packets:\s*(\d+)\s+(?:RX|TX)-dropped:\s*(\d+)")


def parse_forward_stats(text: str) -> dict[int, PortStats]:
    """testpmd's per-port exit report, by port number.

    Only the per-port blocks are read (the "Accumulated" block sums them). A
    block missing its RX or TX line is an error: a half-read report would pass
    for a count of zero.
    """
    stats: dict[int, PortStats] = {}
    blocks = _PORT_HEADER.split(text)
    # split() with one group: [before, port, body, port, body, ...]
    for port_text, body in zip(blocks[1::2], blocks[2::2], strict=True):
        port = int(port_text)
        # The block ends at its closing rule (a line of dashes or pluses).
        body = re.split(r"\n\s*[-+]{20,}", body, maxsplit=1)[0]
        counts = {kind: (int(pkts), int(dropped)) for kind, pkts, dropped in
                  _COUNTS.findall(body)}
        if set(counts) != {"RX", "TX"}:
            raise PeerError(f"testpmd's statistics for port {port} lack "
                            f"{' and '.join(sorted({'RX', 'TX'} - set(counts)))} counts")
        stats[port] = PortStats(port, counts["RX"][0], counts["RX"][1], counts["TX"][0],
                                counts["TX"][1])
    return stats


def find_testpmd() -> tuple[Launcher | None, str]:
    """How to run dpdk-testpmd, and where it was found or looked for.

    The tools tree first (it is what CI and the other peers use), then PATH.
    """
    from vvu_runtime.launch.toolchain import Toolchain, ToolchainError

    looked = []
    try:
        tc = Toolchain()
        if tc.is_built():
            if (tc.tree / "usr/bin/dpdk-testpmd").exists():
                return tc.command, f"tools tree {tc.tree}"
            looked.append(f"the tools tree at {tc.tree} has no usr/bin/dpdk-testpmd "
                          "(is dpdk in mkosi.conf's ToolsTreePackages=? run ./setup)")
        else:
            looked.append(f"the tools tree is not built at {tc.tree}")
    except ToolchainError as e:
        looked.append(f"tool chain: {e}")
    path = shutil.which(TESTPMD_COMM)
    if path:
        return list, path
    looked.append("not in PATH")
    return None, "; ".join(looked)


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def descendants(pid: int) -> Iterator[int]:
    """``pid`` and every process below it: a program run through ``mkosi sandbox``
    is a few levels below the process we started."""
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        todo += child_pids(p)


def process_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class Testpmd:
    """A running testpmd with two net_vhost ports; a context manager that always stops it.

    Output goes to ``log`` (a file: a pipe nobody reads would block testpmd once
    full). ``pid`` is the testpmd process itself, not the sandbox around it.
    """

    name = "testpmd"

    def __init__(self, launcher: Launcher, workdir: Path, lcores: tuple[int, int],
                 *, memory_mb: int = DEFAULT_MEMORY_MB) -> None:
        self.sockets = (str(workdir / "testpmd0.sock"), str(workdir / "testpmd1.sock"))
        self.argv = launcher(testpmd_argv(self.sockets, lcores, memory_mb=memory_mb))
        self.log_path = workdir / "testpmd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.stats: dict[int, PortStats] | None = None

    def __enter__(self) -> Testpmd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count_forwarded(self) -> None:
        # testpmd tells only when it exits (its exit report: stop()).
        return None

    def log_tail(self, lines: int = 25) -> str:
        """The first and the last lines of testpmd's output: EAL says why it refuses
        to start at the top, above a long usage text."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        all_lines = text.rstrip().splitlines()
        if len(all_lines) > 2 * lines:
            all_lines = [*all_lines[:lines], "[…]", *all_lines[-lines:]]
        return "\n".join(all_lines) or "(no output)"

    def start(self, timeout: float = 60.0) -> None:
        """Start testpmd and wait until both sockets listen, it forwards, and the
        process is known."""
        with open(self.log_path, "wb") as log:
            # Its own session: the sandbox and testpmd are stopped as one group.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PeerError(f"testpmd exited ({self.proc.returncode}) before its sockets "
                                f"appeared; command: {' '.join(self.argv)}\n{self.log_tail()}")
            if self.pid is None:
                self.pid = next((p for p in descendants(self.proc.pid)
                                 if process_comm(p) == TESTPMD_COMM), None)
            if (self.pid is not None and all(os.path.exists(s) for s in self.sockets)
                    and FORWARDING_STARTED in self.log_path.read_bytes()):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"testpmd did not create {' and '.join(self.sockets)} and start "
                                f"forwarding within {timeout:g} s\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> dict[int, PortStats] | None:
        """Ask testpmd to exit (newline on stdin), collect its exit report, and make
        sure nothing of it is left. Returns the per-port counters if it reported."""
        proc = self.proc
        if proc is None:
            return self.stats
        self.proc = None
        if proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b"\n")
                proc.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        stop_group(proc, signal.SIGINT, 5.0)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        with contextlib.suppress(OSError, PeerError):
            self.stats = parse_forward_stats(self.log_path.read_text(errors="replace")) or None
        return self.stats
