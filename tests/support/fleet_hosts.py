"""Several "hosts" on this machine: one network namespace each, joined by a bridge
(the "host network"), each with its own sshd, so the real ``ansible-playbook``
reaches them over SSH as it would reach machines.

    with FleetHosts(tmp_path, ["h1", "h2"]) as hosts:
        hosts.address("h1")          # 10.X.0.1, reachable from this namespace too
        hosts.run("h1", ["ip", "addr"])
        hosts.key                    # the client key every sshd accepts for root

The namespaces share this machine's file system: whatever a test deploys there
keeps its own directories per host (VVU_STATE_DIR, VVU_RUN_DIR). Needs root,
``ip`` and ``sshd``; :func:`missing` says what is absent. On exit every sshd
is stopped, the namespaces and the bridge are deleted, and :meth:`leftovers`
lists any process still in a namespace (checked before deleting it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def missing() -> str | None:
    """Why fleet hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "root (network namespaces, a bridge, sshd)"
    for tool in ("ip", "ssh-keygen", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool}(1)"
    if not os.access(SSHD, os.X_OK):
        return "sshd (Debian: openssh-server)"
    r = subprocess.run(["ip", "netns", "add", "vvuf-probe"], capture_output=True)
    if r.returncode != 0:
        return f"network namespaces ({r.stderr.decode().strip()})"
    subprocess.run(["ip", "netns", "del", "vvuf-probe"], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


class FleetHosts:
    """Network namespaces with sshd, on one bridge; a context manager."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.names = list(names)
        tag = os.getpid() % 10000
        self.prefix = f"vvuf{tag}"
        # A /24 unlikely to be in use; the bridge (this namespace) is .254.
        self.net = f"10.{200 + tag % 50}.{tag % 250}"
        self.bridge = f"{self.prefix}br"
        self.key = root / "id_ed25519"
        self.known_hosts = root / "known_hosts"
        self._sshd: dict[str, subprocess.Popen[bytes]] = {}
        self._made: list[str] = []

    # ------------------------------------------------------------------ names
    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def address(self, name: str) -> str:
        return f"{self.net}.{self.names.index(name) + 1}"

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> FleetHosts:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)],
                       check=True)
        authorized = self.root / "authorized_keys"
        authorized.write_text(self.key.with_suffix(".pub").read_text())
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append("bridge")
        _ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            ns = self.ns(name)
            _ip("netns", "add", ns)
            self._made.append(ns)
            outer, inner = f"{self.prefix}o{i}", f"{self.prefix}i{i}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("addr", "add", f"{self.address(name)}/24", "dev", inner, ns=ns)
            _ip("link", "set", inner, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            self._start_sshd(name, authorized)
        for name in self.names:
            self._wait_ssh(name)

    def _start_sshd(self, name: str, authorized: Path) -> None:
        d = self.root / name
        d.mkdir(exist_ok=True)
        host_key = d / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                       check=True)
        config = d / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {self.address(name)}", "Port 22", f"HostKey {host_key}",
            f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {authorized}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "Subsystem sftp internal-sftp", "MaxSessions 50", "MaxStartups 50", ""]))
        log = (d / "sshd.log").open("ab")
        self._sshd[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def ssh_args(self) -> list[str]:
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=5"]

    def _wait_ssh(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["ssh", *self.ssh_args(), f"root@{self.address(name)}", "true"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = (self.root / name / "sshd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sshd of host {name} not reachable: {r.stderr.strip()}\n"
                                   f"{log}")
            time.sleep(0.3)

    def run(self, name: str, argv: list[str], timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` inside host ``name``'s namespace (not through SSH)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], text=True,
                              capture_output=True, timeout=timeout,
                              env={**os.environ, **(env or {})})

    def leftovers(self) -> list[str]:
        """Processes still in any of the namespaces (sshd excluded)."""
        sshd = {str(p.pid) for p in self._sshd.values()}
        found = []
        for name in self.names:
            r = subprocess.run(["ip", "netns", "pids", self.ns(name)], capture_output=True,
                               text=True)
            for pid in r.stdout.split():
                if pid in sshd:
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                if cmd.startswith(SSHD.encode()) or cmd.startswith(b"sshd"):
                    continue  # an sshd session winding down
                found.append(f"{name}: pid {pid}: {cmd.decode(errors='replace')[:200]}")
        return found

    def links_left(self) -> list[str]:
        """Interfaces or namespaces of these hosts that still exist."""
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split(":")[1].strip() for line in links.splitlines()
                if line.split(":")[1].strip().startswith(self.prefix)] + \
            [n.split()[0] for n in names.splitlines() if n.startswith(self.prefix)]

    def close(self) -> None:
        for proc in self._sshd.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._sshd.clear()
        for made in reversed(self._made):
            if made == "bridge":
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            else:
                # Whatever still runs in it dies with it: kill it, a namespace with
                # processes would outlive `ip netns del`.
                r = subprocess.run(["ip", "netns", "pids", made], capture_output=True,
                                   text=True)
                for pid in r.stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                # The veth goes first: a namespace can outlive `ip netns del` (a socket
                # of a closed connection), and its veth pair with it.
                i = self.names.index(made[len(self.prefix):])
                subprocess.run(["ip", "link", "del", f"{self.prefix}o{i}"], capture_output=True)
                subprocess.run(["ip", "netns", "del", made], capture_output=True)
        self._made.clear()
