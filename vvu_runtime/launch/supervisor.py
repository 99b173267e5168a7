"""The lab supervisor: starts a lab in order, watches it, heals it, tears it down.

One supervisor process per running lab (``python -m vvu_runtime.launch.supervisor
LAB_DIR``, started by ``vvu-launch up`` in a session of its own). It reads the
lab's ``topology.json`` (the plan), and:

1. creates the consumers' RAM files and the storage appliances' data disks;
2. starts one ``vvu-devd`` per appliance that has links, and waits for its sockets;
3. starts the appliance VMs and waits until every link's VVU function is
   ``BACKEND_UP`` as vvu-devd sees it (the backend inside is serving; not a sleep);
4. starts the consumer VMs and waits until they answer on SSH (or show their
   console prompt) and their links are connected (``FRONTEND_UP``);
5. watches every process each second. A dead ``vvu-devd`` leaves its
   appliance's VVU functions dead (QEMU cannot hot-unplug them, DESIGN 3), so
   that vvu-devd and that appliance are restarted together; consumers reconnect
   on their own (``reconnect-ms``) and are not restarted. A dead VM is started
   again. Each component is restarted at most :data:`MAX_RESTARTS` times in
   :data:`RESTART_WINDOW` seconds, then left ``failed``.

Everything it knows is in ``state.json`` (rewritten atomically on every change),
which ``vvu-launch status`` reads. SIGTERM, SIGINT or SIGHUP stop the lab at any
moment, also in the middle of a boot: consumers are powered off (``systemctl
poweroff`` over SSH, else the ACPI button) so their file systems are clean, then
every process is stopped and the runtime directory and RAM files are removed.
Every child dies with the supervisor (parent-death signal), so even a SIGKILLed
supervisor leaves no VM running; ``vvu-launch down`` then removes what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from vvu_runtime.errors import VvuError
from vvu_runtime.launch.lab import LabPaths, read_json, write_json
from vvu_runtime.launch.ports import ssh_banner
from vvu_runtime.launch.procs import pid_alive, pid_mentions
from vvu_runtime.launch.toolchain import Toolchain, stop_process_group

log = logging.getLogger("vvu_runtime.launch.supervisor")

#: Restart budget per component.
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0
#: Seconds a consumer gets to power down before it is stopped.
POWERDOWN_GRACE = 20.0
#: Seconds between two looks at every process.
WATCH_INTERVAL = 1.0


class NodeState(enum.Enum):
    """What the supervisor knows of one component (VM or vvu-devd)."""

    PENDING = "pending"
    STARTING = "starting"
    BOOTING = "booting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class LabPhase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Stop(BaseException):
    """A signal asked the supervisor to stop the lab (raised from the handler)."""


class StartError(VvuError):
    """A component did not start or did not become ready."""


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def _tail(path: Path, chars: int = 1500) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars))
        return f.read().decode(errors="replace")
    return ""


@dataclass
class Child:
    """A process of the lab, in a process group of its own, dying with the supervisor."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> None:
        argv = list(self.argv)
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        with self.log_path.open("ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} starting {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        self.started_at = time.time()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc, grace=grace)


@dataclass
class Component:
    """State of one node (a VM, plus the vvu-devd of an appliance)."""

    name: str
    role: str
    kind: str
    plan: dict[str, Any]
    state: NodeState = NodeState.PENDING
    vm: Child | None = None
    devd: Child | None = None
    qemu_pid: int | None = None
    ready_at: float | None = None
    restarts: list[float] = field(default_factory=list)
    error: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "kind": self.kind,
            "state": self.state.value,
            "pid": self.qemu_pid,
            "wrapper_pid": self.vm.pid if self.vm else None,
            "devd_pid": self.devd.pid if self.devd else None,
            "started_at": self.vm.started_at if self.vm else None,
            "ready_at": self.ready_at,
            "restarts": len(self.restarts),
            "ssh_port": self.plan.get("ssh_port"),
            "error": self.error,
        }


# --------------------------------------------------------------------------
# The supervisor
# --------------------------------------------------------------------------


class Supervisor:
    def __init__(self, lab_dir: Path, *, owner: int | None = None,
                 toolchain: Toolchain | None = None) -> None:
        self.paths = LabPaths.from_dir(lab_dir)
        self.plan = read_json(self.paths.topology_json, what="the lab's resolved topology")
        self.toolchain = toolchain or Toolchain()
        self.owner = owner
        self.phase = LabPhase.STARTING
        self.error: str | None = None
        self.started_at = time.time()
        self.components = {
            n["name"]: Component(n["name"], n["role"], n["kind"], n) for n in self.plan["nodes"]}
        self._last_state: str = ""
        self._stopping = False

    # ---- state ---------------------------------------------------------------

    def links(self) -> dict[str, dict[str, str]]:
        rows: dict[str, dict[str, str]] = {}
        for c in self.components.values():
            status = c.plan.get("devd_status")
            if not status or c.devd is None or not c.devd.running():
                continue
            with contextlib.suppress(OSError, ValueError):
                for row in json.loads(Path(status).read_text()).get("devices", []):
                    rows[row["device"]] = row
        return rows

    def save(self) -> None:
        state = {
            "supervisor": {"pid": os.getpid(), "started_at": self.started_at,
                           "owner": self.owner},
            "phase": self.phase.value,
            "error": self.error,
            "accel": self.plan["accel"],
            "accel_reason": self.plan["accel_reason"],
            "nodes": {c.name: c.snapshot() for c in self.components.values()},
            "links": self.links(),
            "updated_at": time.time(),
        }
        text = json.dumps({k: v for k, v in state.items() if k != "updated_at"}, sort_keys=True)
        if text != self._last_state:
            self._last_state = text
            write_json(self.paths.state, state)

    def set_state(self, c: Component, state: NodeState, error: str | None = None) -> None:
        if c.state is not state:
            log.info("%s: %s%s", c.name, state.value, f" ({error})" if error else "")
        c.state = state
        if error is not None or state is NodeState.READY:
            c.error = error
        self.save()

    # ---- waiting -------------------------------------------------------------

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float,
                 alive: Callable[[], str | None]) -> None:
        """Poll ``predicate``; ``alive`` returns a reason when waiting is pointless."""
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = alive()
            if dead:
                raise StartError(f"{what}: {dead}")
            if time.monotonic() > deadline:
                raise StartError(f"{what}: not within {timeout:.0f} s")
            self.check_owner()
            time.sleep(0.25)
            self.save()

    def check_owner(self) -> None:
        if self.owner is not None and not pid_alive(self.owner):
            log.info("owner %d is gone: stopping the lab", self.owner)
            raise Stop

    @property
    def boot_timeout(self) -> float:
        return float(self.plan["topology"].get("options", {}).get("boot_timeout", 300))

    # ---- starting ------------------------------------------------------------

    def prepare_files(self) -> None:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.paths.disks.mkdir(parents=True, exist_ok=True)
        for path, mib in self.plan["ram_files"].items():
            p = Path(path)
            p.unlink(missing_ok=True)  # a stale file of this lab (the name is ours)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, int(mib) << 20)  # sparse
            finally:
                os.close(fd)
        for path, size in self.plan["data_disks"].items():
            p = Path(path)
            if not p.exists():
                with p.open("wb") as f:
                    f.truncate(int(size))

    def start_devd(self, c: Component) -> None:
        argv = c.plan["devd_argv"]
        if not argv:
            return
        links = [lk for lk in self.plan["links"] if lk["appliance"] == c.name]
        for lk in links:  # left behind by a killed vvu-devd
            Path(lk["vhost_socket"]).unlink(missing_ok=True)
            Path(lk["vfio_socket"]).unlink(missing_ok=True)
        Path(c.plan["devd_status"]).unlink(missing_ok=True)
        c.devd = Child(f"{c.name} vvu-devd", argv, self.paths.devd_log(c.name))
        c.devd.start()
        devd = c.devd

        def sockets() -> bool:
            return all(Path(lk["vhost_socket"]).exists() and Path(lk["vfio_socket"]).exists()
                       for lk in links) and Path(c.plan["devd_status"]).exists()

        self.wait_for(f"vvu-devd of {c.name}", sockets, 30,
                      lambda: None if devd.running() else
                      f"exited with status {devd.exit_status()}:\n"
                      f"{_tail(self.paths.devd_log(c.name))}")

    def start_vm(self, c: Component) -> None:
        Path(c.plan["pidfile"]).unlink(missing_ok=True)
        for sock in (c.plan["qmp_socket"], c.plan["console_socket"]):
            Path(sock).unlink(missing_ok=True)
        c.vm = Child(c.name, self.toolchain.command(c.plan["argv"]),
                     self.paths.qemu_log(c.name))
        c.qemu_pid = None
        c.ready_at = None
        c.vm.start()
        self.set_state(c, NodeState.BOOTING)

    def vm_problem(self, c: Component) -> str | None:
        if c.vm is None or not c.vm.running():
            status = c.vm.exit_status() if c.vm else None
            return (f"QEMU exited with status {status}:\n"
                    f"{_tail(self.paths.qemu_log(c.name))}")
        if c.devd is not None and not c.devd.running():
            return f"its vvu-devd exited with status {c.devd.exit_status()}"
        if c.qemu_pid is None:
            with contextlib.suppress(OSError, ValueError):
                c.qemu_pid = int(Path(c.plan["pidfile"]).read_text().strip())
        return None

    def links_have(self, c: Component, bit: str) -> bool:
        names = c.plan["links"]
        rows = self.links()
        return all(bit in rows.get(n, {}).get("status", "") for n in names)

    def consumer_links_up(self, c: Component) -> bool:
        rows = self.links()
        return all("FRONTEND_UP" in rows.get(n, {}).get("status", "") for n in c.plan["links"])

    def node_ready(self, c: Component) -> bool:
        if c.vm is None:
            return False
        if c.role == "appliance":
            if c.plan["links"]:
                return self.links_have(c, "BACKEND_UP")
            return ssh_banner(c.plan["ssh_port"], 2.0).startswith(b"SSH-")
        if c.plan["ssh_port"] is not None:
            up = ssh_banner(c.plan["ssh_port"], 2.0).startswith(b"SSH-")
        else:
            up = "vvu# " in _tail(self.paths.console_log(c.name), 400)
        return up and self.consumer_links_up(c)

    def start_component(self, c: Component) -> None:
        self.set_state(c, NodeState.STARTING)
        if c.role == "appliance":
            self.start_devd(c)
        self.start_vm(c)

    def wait_ready(self, comps: Sequence[Component]) -> None:
        pending = list(comps)
        deadline = time.monotonic() + self.boot_timeout
        while pending:
            for c in list(pending):
                problem = self.vm_problem(c)
                if problem:
                    raise StartError(f"{c.name}: {problem}")
                if self.node_ready(c):
                    c.ready_at = time.time()
                    self.set_state(c, NodeState.READY)
                    pending.remove(c)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StartError(f"not ready within {self.boot_timeout:.0f} s: {names}"
                                 + "".join(f"\n--- {c.name} console:\n"
                                           f"{_tail(self.paths.console_log(c.name), 800)}"
                                           for c in pending))
            self.check_owner()
            self.save()
            time.sleep(0.25)

    def start_all(self) -> None:
        self.prepare_files()
        self.save()
        appliances = [c for c in self.components.values() if c.role == "appliance"]
        consumers = [c for c in self.components.values() if c.role == "consumer"]
        for c in appliances:
            self.start_component(c)
        self.wait_ready(appliances)
        for c in consumers:
            self.start_component(c)
        self.wait_ready(consumers)

    # ---- watching and healing --------------------------------------------------

    def restart(self, c: Component, why: str) -> None:
        now = time.time()
        c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW]
        if len(c.restarts) >= MAX_RESTARTS:
            self.stop_component(c)
            self.set_state(c, NodeState.FAILED,
                           f"{why}; restarted {MAX_RESTARTS} times in {RESTART_WINDOW:.0f} s, "
                           "giving up")
            return
        c.restarts.append(now)
        self.set_state(c, NodeState.RESTARTING, why)
        self.stop_component(c)
        try:
            self.start_component(c)
            self.wait_ready([c])
        except StartError as e:
            self.set_state(c, NodeState.FAILED, str(e))
            return
        c.error = f"healed after: {why}"
        self.save()

    def watch(self) -> None:
        while True:
            self.check_owner()
            for c in self.components.values():
                if c.state in (NodeState.FAILED, NodeState.STOPPED):
                    continue
                if c.devd is not None and not c.devd.running():
                    self.restart(c, f"vvu-devd exited with status {c.devd.exit_status()}:\n"
                                    f"{_tail(self.paths.devd_log(c.name), 600)}")
                elif c.vm is not None and not c.vm.running():
                    self.restart(c, f"QEMU exited with status {c.vm.exit_status()}:\n"
                                    f"{_tail(self.paths.qemu_log(c.name), 600)}")
            self.save()
            time.sleep(WATCH_INTERVAL)

    # ---- stopping --------------------------------------------------------------

    def qmp(self, c: Component, command: str, timeout: float = 5.0) -> bool:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        path = c.plan["qmp_socket"]
        if not Path(path).exists():
            return False
        try:
            mon = QEMUMonitorProtocol(path, nickname=c.name)
            mon.connect(negotiate=True)
            try:
                mon.settimeout(timeout)
                mon.cmd(command)
            finally:
                mon.close()
        except Exception as e:
            log.debug("%s: QMP %s: %r", c.name, command, e)
            return False
        return True

    def stop_component(self, c: Component, *, powerdown: float = 0.0) -> None:
        if c.vm is not None and c.vm.running():
            if powerdown and self.qmp(c, "system_powerdown"):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    assert c.vm.proc is not None
                    c.vm.proc.wait(timeout=powerdown)
            if c.vm.running():
                self.qmp(c, "quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    assert c.vm.proc is not None
                    c.vm.proc.wait(timeout=10)
            c.vm.stop(grace=5)
        if c.qemu_pid and pid_alive(c.qemu_pid) and pid_mentions(c.qemu_pid, self.paths.run):
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.qemu_pid, signal.SIGKILL)
        if c.devd is not None:
            c.devd.stop(grace=10)

    def power_off(self, c: Component) -> None:
        """Ask a guest to shut down: over SSH (images need no ACPI button handling), else ACPI."""
        port = c.plan.get("ssh_port")
        if port is not None:
            from vvu_runtime.launch.shell import ShellError, SshShell

            shell = SshShell(c.name, port, self.paths.key, connect_timeout=5)
            try:
                shell.run("systemctl poweroff --no-block", timeout=10)
                return
            except ShellError as e:
                log.info("%s: no power-off over SSH (%s): ACPI power button", c.name, e)
            finally:
                shell.close()
        self.qmp(c, "system_powerdown")

    def teardown(self) -> None:
        self._stopping = True
        self.phase = LabPhase.STOPPING
        for c in self.components.values():
            if c.vm is not None:
                c.state = NodeState.STOPPING
        self.save()
        consumers = [c for c in self.components.values() if c.role == "consumer"]
        appliances = [c for c in self.components.values() if c.role == "appliance"]
        # Consumers first, gracefully, so their file systems reach the storage appliance.
        booted = [c for c in consumers if c.state is not NodeState.PENDING and c.vm
                  and c.vm.running()]
        # A busybox initramfs guest has no ACPI power button handling: no point waiting.
        booted = [c for c in booted if c.ready_at is not None and c.kind != "initramfs"]
        for c in booted:
            self.power_off(c)
        deadline = time.monotonic() + POWERDOWN_GRACE
        for c in booted:
            if c.ready_at is None or c.vm is None or c.vm.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.vm.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for c in [*consumers, *appliances]:
            self.stop_component(c)
            c.state = NodeState.STOPPED
        remove_runtime(self.paths, self.plan)
        self.save()


def remove_runtime(paths: LabPaths, plan: dict[str, Any]) -> None:
    """Remove the lab's runtime directory and RAM files (its persistent files stay)."""
    for path in plan.get("ram_files", {}):
        Path(path).unlink(missing_ok=True)
    shutil.rmtree(paths.run, ignore_errors=True)


@contextlib.contextmanager
def _signals_raise_stop() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(lab_dir: Path, owner: int | None) -> int:
    sup = Supervisor(lab_dir, owner=owner)
    sup.paths.run.mkdir(parents=True, exist_ok=True)
    sup.paths.supervisor_pidfile.write_text(f"{os.getpid()}\n")
    code = 0
    with _signals_raise_stop():
        try:
            sup.start_all()
            sup.phase = LabPhase.RUNNING
            sup.save()
            log.info("lab %s is up", sup.paths.name)
            sup.watch()
        except Stop:
            log.info("stopping lab %s", sup.paths.name)
        except StartError as e:
            log.error("%s", e)
            sup.error = str(e)
            code = 1
        except Exception as e:
            log.exception("supervisor failed")
            sup.error = f"supervisor error: {e!r}"
            code = 1
        finally:
            # No second signal may interrupt the teardown half-way.
            old = signal.pthread_sigmask(signal.SIG_BLOCK,
                                         {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            try:
                sup.teardown()
                sup.phase = LabPhase.FAILED if sup.error else LabPhase.STOPPED
                sup.save()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    log.info("lab %s stopped", sup.paths.name)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vvu-launch-supervisor",
                                description="Run one vvu lab (started by vvu-launch up).")
    p.add_argument("lab_dir", type=Path)
    p.add_argument("--owner", type=int, help="stop the lab when this process is gone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.ERROR)  # its per-connection chatter
    return run(args.lab_dir, args.owner)


if __name__ == "__main__":
    sys.exit(main())
