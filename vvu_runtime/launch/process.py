"""Backend processes (``vvu-switch``, ``vvu-blk``) started and stopped for a run.

:class:`BackendProcess` starts a backend program with the current interpreter,
waits until every socket it serves exists, and always stops it: SIGTERM first
(the backends then remove their sockets), SIGKILL after a grace period. Its
output goes to a log file so a failure can show it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


class BackendError(Exception):
    """A backend process did not start, or did not stop when asked."""


class BackendProcess:
    """One backend program, e.g. ``BackendProcess("vvu-blk", [...], [sock], log)``."""

    #: console script name -> module that holds its ``main``
    MODULES = {
        "vvu-switch": "vvu_runtime.backends.switch.cli",
        "vvu-blk": "vvu_runtime.backends.blk.cli",
    }

    def __init__(self, program: str, args: Sequence[str], sockets: Sequence[Path],
                 log_path: Path, *, start_timeout: float = 30.0) -> None:
        if program not in self.MODULES:
            raise BackendError(f"unknown backend program {program!r}; "
                               f"known: {', '.join(self.MODULES)}")
        self.program = program
        self.args = list(args)
        self.sockets = list(sockets)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.MODULES[self.program], *self.args]

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> BackendProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise BackendError(f"{self.program} is already running (pid {self.proc.pid})")
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while not all(s.exists() for s in self.sockets):
            if self.proc.poll() is not None:
                raise BackendError(f"{self.program} exited with {self.proc.returncode} before "
                                   f"listening; its log ({self.log_path}):\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(f"{self.program} did not create "
                                   f"{', '.join(map(str, self.sockets))} within "
                                   f"{self.start_timeout:.0f} s:\n{self.output()}")
            time.sleep(0.05)
        return self

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` s; returns the exit code (None if never run)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # A killed backend cannot remove its sockets; we do, so nothing is left.
        for s in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        return proc.returncode

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
