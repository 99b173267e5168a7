"""Local TCP ports of VMs: a free one for QEMU's SSH forwarding, and whether sshd answers.

Used by ApplianceMachine, the lab plan and the lab supervisor.
"""

from __future__ import annotations

import socket

__all__ = ["free_port", "port_free", "ssh_banner"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ssh_banner(port: int, timeout: float = 3.0) -> bytes:
    """The first bytes the forwarded port sends (slirp accepts even with no sshd)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64)
    except OSError:
        return b""
