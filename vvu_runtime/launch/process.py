"""Processes of a vvu topology, started and stopped for a run.

:class:`BackendProcess` starts a vvu program (``vvu-switch``, ``vvu-blk``,
``vvu-devd``) with the current interpreter, waits until every socket it serves
exists (and, if asked, until its log says it is ready), and always stops it:
SIGTERM first (the programs then remove their sockets), SIGKILL after a grace
period. Its output goes to a log file so a failure can show it.

:class:`DeviceModelProcess` is ``vvu-devd`` serving one VVU device per
:class:`VvuLink` (a consumer's vhost-user socket, the appliance's vfio-user
socket and the consumer's RAM file, which it can provision and remove). Its
per-device counters (messages, kicks, doorbells...) are read with
:meth:`DeviceModelProcess.counters` (SIGUSR1 makes vvu-devd print them) and are
printed once more when it exits (:meth:`DeviceModelProcess.last_counters`).

:class:`ApplianceProcess` is a program inside an appliance VM (e.g. ``vvu-blk
--vvu ADDR``), run through a shell in the guest (its serial console or SSH):
started detached with its own log, waited for, signalled (SIGKILL included, to
model a crash) and stopped.

Errors: :class:`BackendError` (a process did not start, did not stop, or its
counters cannot be read).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import Signals
from types import TracebackType

from vvu_runtime.errors import VvuError

__all__ = [
    "ApplianceProcess",
    "BackendError",
    "BackendProcess",
    "DeviceCounters",
    "DeviceModelProcess",
    "VvuLink",
    "parse_counters",
]


class BackendError(VvuError):
    """A backend process did not start, or did not stop when asked."""


class BackendProcess:
    """One vvu program, e.g. ``BackendProcess("vvu-blk", [...], [sock], log)``.

    ``ready``: a text the program logs once it really serves (a socket file
    exists from bind(), before listen()); :meth:`start` waits for it too. Only
    output written after this start counts (the log is appended to, so a
    restarted program keeps one log).
    """

    #: console script name -> module that holds its ``main``
    MODULES = {
        "vvu-switch": "vvu_runtime.serve.switch",
        "vvu-blk": "vvu_runtime.serve.blk",
        "vvu-devd": "vvu_runtime.device.devd",
    }

    def __init__(self, program: str, args: Sequence[str], sockets: Sequence[Path],
                 log_path: Path, *, start_timeout: float = 30.0,
                 ready: str | None = None) -> None:
        if program not in self.MODULES:
            raise BackendError(f"unknown backend program {program!r}; "
                               f"known: {', '.join(self.MODULES)}")
        self.program = program
        self.args = list(args)
        self.sockets = list(sockets)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where the current run's output begins in the log

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.MODULES[self.program], *self.args]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def run_output(self) -> str:
        """The output of the current (or last) run only."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _is_ready(self) -> bool:
        if not all(s.exists() for s in self.sockets):
            return False
        return self.ready is None or self.ready in self.run_output()

    def start(self) -> BackendProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise BackendError(f"{self.program} is already running (pid {self.proc.pid})")
        with self.log_path.open("ab") as logf:
            self._log_start = logf.tell()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while not self._is_ready():
            if self.proc.poll() is not None:
                raise BackendError(f"{self.program} exited with {self.proc.returncode} before "
                                   f"listening; its log ({self.log_path}):\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                what = ", ".join(map(str, self.sockets))
                if self.ready is not None:
                    what += f" (and log {self.ready!r})"
                raise BackendError(f"{self.program} did not create {what} within "
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


# --------------------------------------------------------------------------
# vvu-devd
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class VvuLink:
    """One VVU device of vvu-devd: ``--device NAME:VHOST_SOCKET:VFIO_SOCKET:RAM_FILE``.

    The consumer QEMU connects to ``vhost_socket`` with its RAM in ``ram_file``
    (``memory-backend-file,share=on``); the appliance QEMU to ``vfio_socket``.
    """

    name: str
    vhost_socket: Path
    vfio_socket: Path
    ram_file: Path

    @classmethod
    def in_dir(cls, workdir: Path, name: str, *, ram_dir: Path = Path("/dev/shm"),
               ram_prefix: str = "vvu-link-") -> VvuLink:
        """Sockets ``workdir/NAME.vhost``, ``workdir/NAME.vfio``; RAM in ``ram_dir``.

        The RAM file name carries our pid, so that a leak is easy to trace.
        """
        return cls(name, workdir / f"{name}.vhost", workdir / f"{name}.vfio",
                   ram_dir / f"{ram_prefix}{os.getpid()}-{name}.ram")

    @property
    def spec(self) -> str:
        parts = (self.name, str(self.vhost_socket), str(self.vfio_socket), str(self.ram_file))
        if any(":" in p for p in parts):
            raise BackendError(f"vvu-devd device {self.name}: paths cannot contain ':' {parts}")
        return ":".join(parts)


#: The counters table vvu-devd prints on SIGUSR1 and at exit (device/devd.py).
_TABLE_START = re.compile(r"^vvu-devd: counters \((?P<when>[^)]*)\):$", re.M)


@dataclass(frozen=True)
class DeviceCounters:
    """One row of vvu-devd's counters table (column name -> text)."""

    columns: Mapping[str, str]

    @property
    def device(self) -> str:
        return self.columns["device"]

    def __getitem__(self, column: str) -> int:
        return int(self.columns[column])

    @property
    def messages(self) -> int:
        """vhost-user messages tunnelled, both ways."""
        return self["rx msgs"] + self["tx replies"] + self["tx reqs"]

    @property
    def kicks(self) -> int:
        """Consumer kicks turned into driver notifications (MSI-X or ISR)."""
        return self["kicks"]

    @property
    def doorbells(self) -> int:
        """Doorbell writes of the appliance that signalled a consumer eventfd."""
        return self["doorbells"]

    def numbers(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.columns.items() if v.isdigit()}


def _table_rows(lines: Sequence[str]) -> list[dict[str, str]] | None:
    """Rows of a header / rule / rows table whose columns the rule line delimits."""
    if len(lines) < 2 or not set(lines[1]) <= {"-", " "} or "-" not in lines[1]:
        return None
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    def cells(line: str) -> list[str]:
        # Columns are separated by two spaces; the last one runs to the end of line.
        out = []
        for i, (start, end) in enumerate(spans):
            stop = spans[i + 1][0] if i + 1 < len(spans) else len(line)
            out.append(line[start:max(end, stop)].strip())
        return out
    header = cells(lines[0])
    return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


def parse_counters(text: str, *, devices: int | None = None,
                   when: str | None = None) -> dict[str, DeviceCounters] | None:
    """The last complete counters table in vvu-devd's output, by device name.

    ``devices``: how many rows make it complete (a table being written is
    skipped); ``when``: only tables printed for this reason ("SIGUSR1", "exit").
    None if there is none.
    """
    for m in reversed(list(_TABLE_START.finditer(text))):
        if when is not None and m.group("when") != when:
            continue
        lines = text[m.end():].lstrip("\n").split("\n")
        block: list[str] = []
        for line in lines:
            # The table ends at a blank line (its final newline) or the next log line.
            if not line.strip() or line.startswith("vvu-devd:"):
                break
            block.append(line)
        else:
            continue  # its last line is still being written
        rows = _table_rows(block)
        if rows is None or (devices is not None and len(rows) < devices):
            continue
        return {r["device"]: DeviceCounters(r) for r in rows}
    return None


class DeviceModelProcess(BackendProcess):
    """``vvu-devd`` serving one VVU device per link::

        links = [VvuLink.in_dir(work, "c0"), VvuLink.in_dir(work, "c1")]
        with DeviceModelProcess(links, work / "devd.log", ram_mib=256) as devd:
            ...  # consumers on link.vhost_socket, the appliance on link.vfio_socket
            devd.counters()["c0"].kicks

    ``ram_mib``: provision every link's RAM file (sparse, this size) at start
    and remove it at stop; None if the caller provides them.
    """

    def __init__(self, links: Sequence[VvuLink], log_path: Path, *, ram_mib: int | None = None,
                 args: Sequence[str] = (), start_timeout: float = 30.0) -> None:
        if not links:
            raise BackendError("vvu-devd needs at least one link")
        self.links = list(links)
        self.ram_mib = ram_mib
        argv = list(args)
        for link in self.links:
            argv += ["--device", link.spec]
        n = len(self.links)
        super().__init__(
            "vvu-devd", argv,
            [p for link in self.links for p in (link.vhost_socket, link.vfio_socket)],
            log_path, start_timeout=start_timeout,
            ready=f"serving {n} VVU device{'' if n == 1 else 's'}")
        self._made_ram: list[Path] = []

    def link(self, name: str) -> VvuLink:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def start(self) -> DeviceModelProcess:
        if self.ram_mib is not None and not self._made_ram:
            try:
                for link in self.links:
                    fd = os.open(link.ram_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    self._made_ram.append(link.ram_file)
                    try:
                        os.ftruncate(fd, self.ram_mib << 20)  # sparse
                    finally:
                        os.close(fd)
            except OSError as exc:
                self._remove_ram()
                raise BackendError(f"cannot provision consumer RAM: {exc}") from exc
        try:
            super().start()
        except BaseException:
            self._remove_ram()
            raise
        return self

    def _remove_ram(self) -> None:
        for path in self._made_ram:
            path.unlink(missing_ok=True)
        self._made_ram.clear()

    def stop(self, grace: float = 20.0) -> int | None:
        try:
            return super().stop(grace)
        finally:
            self._remove_ram()

    def counters(self, timeout: float = 10.0) -> dict[str, DeviceCounters]:
        """Fresh counters of every device (SIGUSR1, then the table it prints)."""
        if not self.is_running():
            raise BackendError("vvu-devd is not running")
        before = len(_TABLE_START.findall(self.run_output()))
        self.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            text = self.run_output()
            if len(_TABLE_START.findall(text)) > before:
                table = parse_counters(text, devices=len(self.links), when="SIGUSR1")
                if table is not None:
                    return table
            if time.monotonic() > deadline:
                raise BackendError(f"vvu-devd printed no counters within {timeout:.0f} s "
                                   f"of SIGUSR1:\n{text[-2000:]}")
            time.sleep(0.05)

    def last_counters(self) -> dict[str, DeviceCounters] | None:
        """The last table it printed (after :meth:`stop`: the one printed at exit)."""
        return parse_counters(self.run_output(), devices=len(self.links))

    def __enter__(self) -> DeviceModelProcess:
        return self.start()


# --------------------------------------------------------------------------
# Programs inside an appliance VM
# --------------------------------------------------------------------------


class ApplianceProcess:
    """A program inside an appliance VM, run through a shell there.

    ``shell(cmd)`` runs one shell command line in the guest and returns its
    output, raising if it fails: e.g. ``vm.console.check`` (the appliance's
    root console) or an SSH runner. Every :meth:`start` writes a new log
    (``LOG_PREFIX.N.log``) and a pid file; :meth:`start` waits until the log
    shows ``ready``::

        blk = ApplianceProcess(vm.console.check,
                               ["vvu-blk", "--vvu", addr, "--image", "/root/disk.raw"],
                               "/root/vvu-blk", ready="ready for a front-end")
        blk.start(); blk.kill(); blk.start(); blk.stop()
    """

    def __init__(self, shell: Callable[[str], str], argv: Sequence[str], log_prefix: str, *,
                 ready: str | None = None, start_timeout: float = 300.0,
                 poll: float = 0.5) -> None:
        self.shell = shell
        self.argv = list(argv)
        self.log_prefix = log_prefix
        self.ready = ready
        self.start_timeout = start_timeout
        self.poll = poll
        self.runs = 0
        self.pid: int | None = None
        self.pids: list[int] = []

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    @property
    def log(self) -> str:
        """The current (last) run's log file in the guest."""
        return f"{self.log_prefix}.{self.runs}.log"

    def logs(self) -> list[str]:
        return [f"{self.log_prefix}.{n}.log" for n in range(1, self.runs + 1)]

    def output(self, log: str | None = None) -> str:
        return self.shell(f"cat {shlex.quote(log or self.log)} 2>/dev/null || true")

    def is_running(self) -> bool:
        if self.pid is None:
            return False
        return self.shell(f"kill -0 {self.pid} 2>/dev/null && echo up || echo down"
                          ).strip().endswith("up")

    def start(self) -> ApplianceProcess:
        if self.is_running():
            raise BackendError(f"{self.name} is already running in the appliance (pid {self.pid})")
        self.runs += 1
        pidfile = f"{self.log_prefix}.{self.runs}.pid"
        inner = f"echo $$ > {shlex.quote(pidfile)}; exec {shlex.join(self.argv)}"
        self.shell(f"rm -f {shlex.quote(pidfile)}; setsid -f sh -c {shlex.quote(inner)} "
                   f"> {shlex.quote(self.log)} 2>&1 < /dev/null")
        deadline = time.monotonic() + self.start_timeout
        self.pid = None
        while self.pid is None:
            text = self.shell(f"cat {shlex.quote(pidfile)} 2>/dev/null || true").strip()
            if text.isdigit():
                self.pid = int(text)
            elif time.monotonic() > deadline:
                raise BackendError(f"{self.name} did not start in the appliance:\n"
                                   f"{self.output()}")
            else:
                time.sleep(0.1)
        self.pids.append(self.pid)
        if self.ready is not None:
            self.wait_for(self.ready, self.start_timeout)
        return self

    def wait_for(self, text: str, timeout: float, *, count: int = 1) -> str:
        """Until the current run's log holds ``text`` ``count`` times; returns the log.

        Raises :class:`BackendError` if the program exits first or time runs out.
        """
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if out.count(text) >= count:
                return out
            if not self.is_running():
                raise BackendError(f"{self.name} (pid {self.pid}) exited in the appliance "
                                   f"before logging {text!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise BackendError(f"{self.name} did not log {text!r} within {timeout:.0f} s:\n"
                                   f"{out[-3000:]}")
            time.sleep(self.poll)

    def signal(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            self.shell(f"kill -{sig.name.removeprefix('SIG')} {self.pid} 2>/dev/null || true")

    def wait_exit(self, timeout: float) -> bool:
        """True once the process is gone (within ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def kill(self, sig: Signals | None = None, timeout: float = 30.0) -> None:
        """Send ``sig`` (default SIGKILL: a crash) and wait until the process is gone."""
        sig = signal.SIGKILL if sig is None else sig
        self.signal(sig)
        if not self.wait_exit(timeout):
            raise BackendError(f"{self.name} (pid {self.pid}) survived {sig.name}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s."""
        if not self.is_running():
            return
        self.signal(signal.SIGTERM)
        if not self.wait_exit(grace):
            self.kill(signal.SIGKILL)
