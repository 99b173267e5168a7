"""One QEMU virtual machine, run from the tools tree, that always cleans up.

Modelled on QEMU's own ``QEMUMachine``: :class:`QemuMachine` renders an argv,
starts QEMU (through :meth:`Toolchain.command`), speaks QMP with the
``qemu.qmp`` library and gives the serial console as a :class:`GuestConsole`.
Both sockets live in a private temporary directory; vvu listens on them and
QEMU connects, so there is no race waiting for QEMU to create them.

Whatever happens (success, exception, Ctrl-C), :meth:`QemuMachine.shutdown`
stops QEMU (QMP ``quit``, then SIGTERM, then SIGKILL of its process group) and
removes the temporary directory and any guest-RAM file the machine created.
QEMU also dies with its parent (``-run-with exit-with-parent=on`` plus a
parent-death signal on the wrapper), so even a killed test runner leaves no VM.

Guest RAM is shared (``memory-backend-file,share=on``), as vhost-user needs:
either a file the caller passes (``memory_file=``, e.g. one the launcher also
hands to the device model), or a sparse file the machine creates in /dev/shm
and removes. With ``memfd=True`` it is a sealed memfd instead
(``memory-backend-memfd,share=on``): what a VM with vfio-user devices served by
vvu needs, since the device model maps only memory that cannot shrink.

Exceptions (all :class:`MachineError`):

* :class:`MachineLaunchError` - QEMU did not start; carries argv and stderr.
* :class:`MachineTimeout` - boot or a console command took too long.
* :class:`ConsoleError` - the console closed, or a checked command failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from vvu_runtime.errors import VvuError
from vvu_runtime.launch.accel import Accelerator, choose_accelerator
from vvu_runtime.launch.initramfs import READY_BANNER
from vvu_runtime.launch.procs import pid_alive
from vvu_runtime.launch.toolchain import Toolchain, stop_process_group

log = logging.getLogger(__name__)

__all__ = [
    "ConsoleError",
    "GuestConsole",
    "MachineError",
    "MachineLaunchError",
    "MachineTimeout",
    "QemuMachine",
]

#: Prefix of every temp dir and /dev/shm file a machine creates (plus our pid).
RUNTIME_PREFIX = "vvu-qemu-"
SHM_DIR = Path("/dev/shm")


class MachineError(VvuError):
    """A VM could not be run or driven as asked."""


class MachineLaunchError(MachineError):
    """QEMU failed to start; ``argv`` and ``stderr`` say how and why."""

    def __init__(self, message: str, argv: Sequence[str], stderr: str) -> None:
        self.argv = list(argv)
        self.stderr = stderr
        shown = stderr.strip() or "(empty)"
        super().__init__(f"{message}\ncommand: {shlex.join(self.argv)}\nQEMU stderr:\n{shown}")


class MachineTimeout(MachineError):
    """Waiting for the guest took longer than allowed."""


class ConsoleError(MachineError):
    """The serial console closed, or a command checked with ``check`` failed."""


# --------------------------------------------------------------------------
# Serial console
# --------------------------------------------------------------------------


class GuestConsole:
    """The guest's serial console over a connected UNIX stream socket.

    A reader thread drains the socket continuously (a full socket would stall
    the guest's UART) into a transcript, also written to ``log_path``.
    :meth:`read_until` consumes the transcript up to a match.
    """

    def __init__(self, sock: socket.socket, log_path: Path | None = None) -> None:
        self._sock = sock
        self._buf = ""
        self._pos = 0  # transcript consumed up to here
        self._closed = False
        self._cond = threading.Condition()
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self._thread = threading.Thread(target=self._reader, name="vvu-console", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    data = b""
                text = decoder.decode(data, final=not data).replace("\r", "")
                with self._cond:
                    self._buf += text
                    if not data:
                        self._closed = True
                    self._cond.notify_all()
                if self._log and text:
                    self._log.write(text)
                    self._log.flush()
                if not data:
                    return
        finally:
            if self._log:
                self._log.close()

    @property
    def transcript(self) -> str:
        """Everything the guest printed so far (CR removed)."""
        with self._cond:
            return self._buf

    def tail(self, chars: int = 2000) -> str:
        return self.transcript[-chars:]

    def write(self, text: str) -> None:
        try:
            self._sock.sendall(text.encode())
        except OSError as e:
            raise ConsoleError(f"cannot write to the guest console: {e}") from e

    def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in unconsumed output; consume through it."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                if self._closed:
                    raise ConsoleError(
                        f"console closed while waiting for {rx.pattern!r}; last output:\n"
                        f"{self._buf[-2000:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MachineTimeout(
                        f"no {rx.pattern!r} on the console within {timeout:.0f} s; last output:\n"
                        f"{self._buf[-2000:]}"
                    )
                self._cond.wait(min(left, 1.0))

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a one-line shell command in the guest: (exit status, output).

        The output is framed by markers whose text never appears in the echo
        of the typed line (printf assembles them from separate words).
        """
        if "\n" in cmd:
            raise ValueError("GuestConsole.run takes one line; wrap longer scripts in sh -c")
        tok = secrets.token_hex(6)
        # One line: the shell reads (and echoes) it whole before running it, so
        # no echo of typed-ahead text can land between the markers.
        sep = " " if cmd.rstrip().endswith("&") else "; "
        self.write(
            f"printf '%s:%s\\n' VVU-BEGIN {tok}; {cmd}{sep}"
            f"printf '\\n%s:%s:%s\\n' VVU-END {tok} $?\n"
        )
        try:
            self.read_until(rf"VVU-BEGIN:{tok}\n", timeout)
            end = self.read_until(rf"\nVVU-END:{tok}:(\d+)\n", timeout)
        except MachineTimeout:
            self.write("\x03")  # interrupt the command so the shell is usable again
            raise
        with self._cond:
            output = self._buf[self._begin_of(tok) : end.start()]
        return int(end.group(1)), output

    def _begin_of(self, tok: str) -> int:
        marker = f"VVU-BEGIN:{tok}\n"
        return self._buf.rindex(marker, 0, self._pos) + len(marker)

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        """Like :meth:`run`, but a non-zero exit status raises :class:`ConsoleError`."""
        rc, out = self.run(cmd, timeout)
        if rc != 0:
            raise ConsoleError(f"guest command {cmd!r} exited {rc}:\n{out}")
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


def _sweep_stale() -> None:
    """Remove runtime files of machines whose process died without cleanup (SIGKILL)."""
    for base in (Path(tempfile.gettempdir()), SHM_DIR):
        for p in base.glob(f"{RUNTIME_PREFIX}*"):
            m = re.match(rf"{RUNTIME_PREFIX}(\d+)-", p.name)
            if m and not pid_alive(int(m.group(1))):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _cleanup(proc: subprocess.Popen[bytes] | None, qemu_pid: int | None, paths: list[Path]) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit)."""
    if proc is not None and proc.poll() is None:
        stop_process_group(proc, grace=2.0)
    if qemu_pid is not None and pid_alive(qemu_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu_pid, signal.SIGKILL)
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Keep a second Ctrl-C from interrupting cleanup half-way (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class QemuMachine:
    """A QEMU VM from the tools tree, used as a context manager::

        with QemuMachine(tc, kernel=k, initrd=i, append="vvu.ip=10.0.0.1/24") as vm:
            rc, out = vm.console.run("uname -r")

    Entering launches QEMU and, if ``boot_banner`` is set, waits for it on the
    console; leaving always shuts down and cleans up. ``accel=None`` picks
    KVM if it really works here, else TCG (see :mod:`vvu_runtime.launch.accel`).
    """

    def __init__(
        self,
        toolchain: Toolchain,
        *,
        name: str = "vm",
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str = "",
        memory_mib: int = 256,
        smp: int = 1,
        accel: Accelerator | None = None,
        memory_file: Path | None = None,
        shared_memory: bool = True,
        memfd: bool = False,
        machine: str = "q35",
        args: Sequence[str] = (),
        console: bool = True,
        boot_banner: str | None = READY_BANNER,
        prompt: str | None = "vvu# ",
        launch_timeout: float = 60.0,
        boot_timeout: float = 300.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"machine name {name!r}: use letters, digits, '.', '_', '-'")
        self.toolchain = toolchain
        self.name = name
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.memory_mib = memory_mib
        self.smp = smp
        self.accel = accel
        if memfd and memory_file is not None:
            raise ValueError(f"machine {name}: guest RAM is either a memfd or {memory_file}")
        self.memory_file = memory_file
        self.memfd = memfd
        self.shared_memory = not memfd and (shared_memory or memory_file is not None)
        self.machine_type = machine
        self.boot_banner = boot_banner
        self.prompt = prompt
        self.launch_timeout = launch_timeout
        self.boot_timeout = boot_timeout
        self._want_console = console
        self._extra_args: list[str] = list(args)

        self.temp_dir: Path | None = None
        self.argv: list[str] = []
        self.qemu_pid: int | None = None
        self.exitcode: int | None = None
        self._final_stderr = ""
        self._owned_memory: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._console: GuestConsole | None = None
        self._listeners: list[socket.socket] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # ---- configuration ---------------------------------------------------

    def add_args(self, *args: str) -> QemuMachine:
        """Append raw QEMU arguments (before :meth:`launch`)."""
        if self._proc is not None:
            raise MachineError("add_args() after launch()")
        self._extra_args.extend(args)
        return self

    @property
    def memory_path(self) -> Path | None:
        """The guest-RAM file (given or created), or None for private RAM."""
        return self.memory_file or self._owned_memory

    def _base_args(self, qmp_path: Path, console_path: Path, pidfile: Path) -> list[str]:
        """QEMU's argv from ``qemu/base.j2``; QEMU connects to our QMP and console sockets."""
        from vvu_runtime.launch.render import render_machine

        assert self.accel is not None
        args = render_machine(
            name=self.name, accel=self.accel, memory_mib=self.memory_mib, cpus=self.smp,
            memory_file=self.memory_path if self.shared_memory else None, memfd=self.memfd,
            machine=self.machine_type, qmp_socket=qmp_path,
            console_socket=console_path if self._want_console else None, pidfile=pidfile,
            kernel=self.kernel, initrd=self.initrd, append=self.append)
        return args + self._extra_args

    # ---- lifecycle -----------------------------------------------------------

    def __enter__(self) -> QemuMachine:
        try:
            self.launch()
            if self.boot_banner is not None and self._want_console:
                self.wait_for_boot()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def launch(self) -> None:
        """Start QEMU and connect QMP and the console; raises :class:`MachineLaunchError`."""
        if self._proc is not None:
            raise MachineError(f"machine {self.name} was already launched")
        _sweep_stale()
        try:
            self._launch()
        except BaseException:
            self.shutdown()
            raise

    def _launch(self) -> None:
        if self.accel is None:
            self.accel = choose_accelerator(self.toolchain).accel
        prefix = f"{RUNTIME_PREFIX}{os.getpid()}-{self.name}-"
        self.temp_dir = Path(tempfile.mkdtemp(prefix=prefix))
        if self.shared_memory and self.memory_file is None:
            self._owned_memory = SHM_DIR / f"{prefix}{secrets.token_hex(4)}.ram"
            fd = os.open(self._owned_memory, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, self.memory_mib << 20)  # sparse: costs nothing until used
            finally:
                os.close(fd)
        self._finalizer = weakref.finalize(
            self, _cleanup, None, None, [p for p in (self.temp_dir, self._owned_memory) if p]
        )
        qmp_path = self.temp_dir / "qmp.sock"
        console_path = self.temp_dir / "console.sock"
        pidfile = self.temp_dir / "qemu.pid"
        qmp_listener = self._listen(qmp_path)
        console_listener = self._listen(console_path) if self._want_console else None

        inner = self._base_args(qmp_path, console_path, pidfile)
        self.argv = self.toolchain.command(inner)
        if shutil.which("setpriv"):
            # If this Python dies, mkosi dies, and QEMU (exit-with-parent) with it.
            self.argv = ["setpriv", "--pdeathsig", "KILL", "--", *self.argv]
        log.info("launching %s: %s", self.name, shlex.join(inner))
        stderr = open(self.temp_dir / "qemu.stderr", "wb")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own process group: killed as a whole
            )
        finally:
            stderr.close()
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _cleanup, self._proc, None, [p for p in (self.temp_dir, self._owned_memory) if p]
        )

        qmp_sock = self._accept(qmp_listener, "QMP")
        self._qmp = QEMUMonitorProtocol(qmp_sock, nickname=self.name)
        try:
            self._qmp.connect(negotiate=True)
        except Exception as e:
            raise self._launch_error(f"QMP handshake with QEMU failed: {e}") from e
        self._qmp.settimeout(30)
        if console_listener is not None:
            console_sock = self._accept(console_listener, "serial console")
            self._console = GuestConsole(console_sock, self.temp_dir / "console.log")
        self.qemu_pid = self._read_pid(pidfile)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self,
            _cleanup,
            self._proc,
            self.qemu_pid,
            [p for p in (self.temp_dir, self._owned_memory) if p],
        )

    def _listen(self, path: Path) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        self._listeners.append(s)
        return s

    def _accept(self, listener: socket.socket, what: str) -> socket.socket:
        """Wait for QEMU to connect, noticing at once if it died instead."""
        assert self._proc is not None
        deadline = time.monotonic() + self.launch_timeout
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if self._proc.poll() is not None:
                    raise self._launch_error(
                        f"QEMU exited with status {self._proc.returncode} before connecting {what}"
                    ) from None
                if time.monotonic() > deadline:
                    raise self._launch_error(
                        f"QEMU did not connect {what} within {self.launch_timeout:.0f} s"
                    ) from None
                continue
            conn.settimeout(None)
            return conn

    def _read_pid(self, pidfile: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(pidfile.read_text().strip())
        return None

    def stderr_text(self) -> str:
        """What QEMU (and the mkosi sandbox around it) printed."""
        if self.temp_dir is None or not self.temp_dir.exists():
            return self._final_stderr
        with contextlib.suppress(OSError):
            return (self.temp_dir / "qemu.stderr").read_text(errors="replace")
        return ""

    def _launch_error(self, message: str) -> MachineLaunchError:
        # QEMU may still be on its way out: let it finish writing stderr.
        self._kill(grace=5.0)
        return MachineLaunchError(message, self.argv, self.stderr_text())

    def wait_for_boot(self, timeout: float | None = None) -> None:
        """Wait for ``boot_banner`` and then ``prompt`` (if set) on the console."""
        if self.boot_banner is None:
            raise MachineError("wait_for_boot() needs a boot_banner")
        budget = self.boot_timeout if timeout is None else timeout
        start = time.monotonic()
        try:
            self.console.read_until(re.escape(self.boot_banner), budget)
            if self.prompt is not None:
                left = max(5.0, budget - (time.monotonic() - start))
                self.console.read_until(re.escape(self.prompt), left)
        except MachineError as e:
            raise MachineTimeout(
                f"{self.name} did not boot ({e}); QEMU stderr:\n{self.stderr_text()}"
            ) from e
        log.info("%s booted in %.1f s", self.name, time.monotonic() - start)

    @property
    def console(self) -> GuestConsole:
        if self._console is None:
            raise MachineError(f"machine {self.name} has no console (launch it with console=True)")
        return self._console

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def process_group(self) -> int | None:
        """The process group QEMU (and its tools-tree wrapper) runs in; None before launch."""
        return self._proc.pid if self._proc is not None else None

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Execute a QMP command and return its ``return`` value."""
        if self._qmp is None or not self.is_running():
            raise MachineError(f"machine {self.name} is not running")
        return self._qmp.cmd(command, **arguments)

    # ---- shutdown -----------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop QEMU (QMP quit, SIGTERM, SIGKILL) and remove every runtime file. Idempotent."""
        with _sigint_deferred():
            try:
                if self._proc is not None and self._proc.poll() is None:
                    self._quit(timeout)
            finally:
                self._kill()
                self._release()

    def _quit(self, timeout: float) -> None:
        assert self._proc is not None
        quit_sent = False
        if self._qmp is not None:
            try:
                self._qmp.settimeout(5)
                self._qmp.cmd("quit")
                quit_sent = True
            except Exception as e:
                log.debug("%s: QMP quit failed: %r", self.name, e)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout if quit_sent else 2.0)
            return
        if quit_sent:
            log.warning("%s did not quit in %.0f s; stopping it", self.name, timeout)
        stop_process_group(self._proc)

    def _kill(self, grace: float = 0.0) -> None:
        """Make sure nothing of the machine runs any more.

        ``grace``: time for the wrapper to exit on its own first (after QEMU
        quit it reaps QEMU; killing it early would leave QEMU a zombie).
        """
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=grace)
            if self._proc.poll() is None:
                stop_process_group(self._proc)
            self.exitcode = self._proc.returncode
        if self.qemu_pid is not None and pid_alive(self.qemu_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.qemu_pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while pid_alive(self.qemu_pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _release(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._console is not None:
            self._console.close()
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        if self.temp_dir is not None:
            self._final_stderr = self.stderr_text()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._owned_memory is not None:
            self._owned_memory.unlink(missing_ok=True)
        if self._finalizer is not None:
            self._finalizer.detach()
