"""A vhost-user back-end from the tools tree run on the host: the benchmarks' host-mode peers
(qemu-storage-daemon, virtiofsd).

The program runs inside the tools tree through ``mkosi sandbox``
(``Toolchain.command``), so the process started here is mkosi's; the daemon
itself (whose CPU is measured) is found among its descendants by name. It
runs in its own session, and :meth:`HostDaemon.stop` ends the whole group:
nothing is left whatever happened. Output goes to a log file (a pipe nobody
reads would block the daemon once full); a daemon that exits before its
socket appears is a :class:`DaemonError` carrying that log's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.process_cpu import find_descendant

__all__ = ["DaemonError", "HostDaemon"]

#: Turns the daemon's own argv into the command that runs it (``Toolchain.command``).
Launcher = Callable[[Sequence[str]], list[str]]


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (which init reaps, not us)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def stop_group(proc: subprocess.Popen[Any], first: signal.Signals, wait: float) -> None:
    """Stop ``proc`` and its process group: ``first``, up to ``wait`` s for the
    leader, then SIGKILL (5 s); the group gets a last SIGKILL even when its
    leader is gone, for children that ignored ``first``."""
    for sig, timeout in ((first, wait), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class DaemonError(RuntimeError):
    """The daemon did not come up; the message carries its command and output."""


class HostDaemon:
    """``with HostDaemon(tc.command, argv, socket, log) as d:`` … ``d.pid`` is the daemon."""

    def __init__(self, launcher: Launcher, argv: Sequence[str], socket: Path, log_path: Path,
                 *, start_timeout: float = 60.0) -> None:
        self.argv = list(argv)
        self.command = launcher(self.argv)
        self.socket = socket
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    def __enter__(self) -> HostDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"

    def start(self) -> None:
        """Start the daemon; return once its socket exists and its process is known."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise DaemonError(f"{self.name} exited ({self.proc.returncode}) before "
                                      f"{self.socket} appeared; command: "
                                      f"{' '.join(self.command)}\n{self.log_tail()}")
                # Looked up once the socket exists: before its exec, a freshly forked
                # wrapper still carries its parent's name, which may be the daemon's.
                if self.socket.exists():
                    self.pid = find_descendant(self.proc.pid, self.argv[0])
                    if self.pid is not None:
                        return
                if time.monotonic() > deadline:
                    raise DaemonError(f"{self.name} did not create {self.socket} within "
                                      f"{self.start_timeout:g} s\n{self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the daemon's whole group, SIGKILL what is left; its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        # The group outlives its leader if the daemon ignored mkosi's signal.
        stop_group(proc, signal.SIGTERM, timeout)
        # The daemon is not our child (its wrapper is): wait until it is really gone.
        deadline = time.monotonic() + 5.0
        while self.pid is not None and _running(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        return proc.returncode
