"""Running commands on a lab's VMs: over SSH (fabric) or on a root serial console.

Image-based nodes (appliances, the consumer image) are reached over SSH with
the lab's key; nodes booted from the busybox initramfs have no sshd, but a root
shell on their serial console, which QEMU serves on a UNIX socket.

Errors: :class:`ShellError`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vvu_runtime.errors import VvuError

__all__ = ["CommandResult", "ConsoleShell", "NodeShell", "ShellError", "SshShell"]


class ShellError(VvuError):
    """A command could not be run on a node (not its exit status: that is a result)."""


@dataclass(frozen=True)
class CommandResult:
    status: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0


class NodeShell(Protocol):
    name: str

    def run(self, command: str, timeout: float = 60.0) -> CommandResult: ...

    def close(self) -> None: ...


class SshShell:
    """root@127.0.0.1:PORT with the lab's key, through fabric (paramiko)."""

    def __init__(self, name: str, port: int, key: Path, connect_timeout: float = 10.0) -> None:
        self.name = name
        self.port = port
        self.key = key
        self.connect_timeout = connect_timeout
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            import fabric
            import paramiko

            conn = fabric.Connection(
                "127.0.0.1", user="root", port=self.port,
                connect_timeout=self.connect_timeout,
                connect_kwargs={"key_filename": [str(self.key)], "look_for_keys": False,
                                "allow_agent": False, "banner_timeout": self.connect_timeout,
                                "auth_timeout": self.connect_timeout})
            # Every boot makes new host keys on a port the lab owns: trust none on file.
            conn.client = paramiko.SSHClient()
            conn.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            self._conn = conn
        return self._conn

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        import invoke
        import paramiko

        try:
            r = self._connection().run(command, hide=True, warn=True, timeout=timeout,
                                       in_stream=False)
        except invoke.exceptions.CommandTimedOut as e:
            raise ShellError(f"{self.name}: {command!r} did not finish in {timeout:.0f} s") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise ShellError(f"{self.name}: ssh to 127.0.0.1:{self.port}: {e or type(e).__name__}"
                             ) from e
        return CommandResult(int(r.exited), r.stdout, r.stderr)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class ConsoleShell:
    """The root shell on a busybox guest's serial console (QEMU's console socket)."""

    def __init__(self, name: str, console_socket: Path) -> None:
        self.name = name
        self.path = console_socket
        self._console: Any = None

    def _open(self) -> Any:
        if self._console is None:
            from vvu_runtime.launch.machine import GuestConsole

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError as e:
                sock.close()
                raise ShellError(f"{self.name}: console {self.path}: {e}") from e
            self._console = GuestConsole(sock)
            time.sleep(0.2)
        return self._console

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        from vvu_runtime.launch.machine import MachineError

        try:
            status, out = self._open().run(command, timeout=timeout)
        except MachineError as e:
            self.close()
            raise ShellError(f"{self.name}: {e}") from e
        return CommandResult(status, out)

    def close(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None
