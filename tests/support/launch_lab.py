"""Driving ``vvu-launch`` as a user would (the real CLI in subprocesses), and finding
what a lab left behind on the machine.

Every lab these helpers make lives under one ``VVU_STATE_DIR`` (a tmp dir), so nothing
touches a user's labs; its runtime directory is ``/run/vvu/NAME`` as for any lab.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vvu_runtime.launch.checks import LabAccess

#: The worktree whose code runs (``python -m`` puts the cwd first on sys.path).
REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def _mentions(text: str, directory: str) -> bool:
    """Whether ``text`` names ``directory`` itself or a path under it (not a longer name)."""
    return re.search(re.escape(directory.rstrip("/")) + r"(?=/|\s|,|$)", text) is not None


def processes_mentioning(*directories: str) -> list[str]:
    """``"PID: cmdline"`` of every live process whose command line names one of ``directories``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if not cmdline or stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if any(_mentions(cmdline, d) for d in directories):
            found.append(f"pid {proc.name}: {cmdline[:300]}")
    return found


def leftovers(lab_name: str, run_dir: Path, lab_dir: Path) -> list[str]:
    """What a stopped lab left on the machine: live processes naming its runtime or lab
    directory, its RAM files in /dev/shm, its runtime directory. ``[]`` when clean."""
    found = processes_mentioning(str(run_dir), str(lab_dir))
    found += [f"RAM file {p}" for p in sorted(Path("/dev/shm").glob(f"vvu-lab-{lab_name}-*"))]
    if run_dir.exists():
        entries = sorted(p.name for p in run_dir.iterdir())
        found.append(f"runtime directory {run_dir} ({', '.join(entries) or 'empty'})")
    return found


def wait_until(what: str, probe: Callable[[], T | None], timeout: float,
               interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def topology_yaml(name: str, kernel: Path, initrd: Path, *, boot_timeout: int = 300) -> str:
    """Two busybox initramfs consumers on one vswitch appliance, with a ping and a transfer
    check (the lab the lead brought up by hand)."""
    return f"""\
name: {name}
options: {{boot_timeout: {boot_timeout}}}
defaults:
  consumer:
    memory: 128M
    image: {{kernel: {kernel}, initrd: {initrd}}}
appliances:
  sw1: {{kind: vswitch}}
consumers:
  c1: {{nics: [sw1]}}
  c2: {{nics: [sw1]}}
checks:
  - ping: {{from: c1, to: c2}}
  - transfer: {{from: c1, to: c2, size: 2M}}
"""


@dataclass(frozen=True)
class Lab:
    """One lab of a test: its topology file and where ``up`` puts it."""

    name: str
    topology: Path
    state_dir: Path
    #: What ``up`` printed (stdout and stderr), once it ran.
    up_output: str = ""

    @property
    def lab_dir(self) -> Path:
        return self.state_dir / "labs" / self.name

    @property
    def run_dir(self) -> Path:
        return Path(os.environ.get("VVU_RUN_DIR", "/run/vvu")) / self.name

    def env(self) -> dict[str, str]:
        return {**os.environ, "VVU_STATE_DIR": str(self.state_dir), "PYTHONUNBUFFERED": "1"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vvu_runtime.launch.cli", *args]

    def vvu(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``vvu-launch ARGS`` to completion (output captured)."""
        return subprocess.run(self.argv(*args), cwd=REPO, env=self.env(), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), cwd=REPO, env=self.env(), text=True, **kw)

    def status(self) -> dict[str, Any]:
        r = self.vvu("status", self.name, "--json", timeout=60)
        assert r.returncode == 0, f"status --json exited {r.returncode}:\n{r.stderr}"
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def node(self, name: str, status: Mapping[str, Any] | None = None) -> dict[str, Any]:
        st = status if status is not None else self.status()
        for n in st["nodes"]:
            if n["name"] == name:
                return dict(n)
        raise AssertionError(f"no node {name} in status: {st}")

    def plan(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.lab_dir / "topology.json").read_text())
        return data

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.lab_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

    def leftovers(self) -> list[str]:
        return leftovers(self.name, self.run_dir, self.lab_dir)

    def supervisor_log(self, chars: int = 3000) -> str:
        try:
            return (self.lab_dir / "logs" / "supervisor.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no supervisor log)"


def explain(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}"


@contextmanager
def detached_lab(prefix: str, topology: Callable[[str], str], nodes: tuple[str, ...]
                 ) -> Iterator[tuple[Lab, LabAccess]]:
    """A lab of ``topology(name)`` (YAML text) brought up with ``up --detach --no-check``
    under a fresh state directory, with SSH access to its nodes; brought down with
    ``--cleanup`` and its state removed however the block ends. Prints when each of
    ``nodes`` started and was ready (shown with ``-rP``)."""
    # Not pytest's tmp_path: a concurrent pytest of the same user prunes old base
    # directories, and with them this lab's state while the lab runs.
    state = Path(tempfile.mkdtemp(prefix=f"vvu-{prefix}-"))
    name = f"{prefix}-{os.getpid() % 100000}"
    path = state / f"{prefix}.yaml"
    path.write_text(topology(name))
    lab = Lab(name=name, topology=path, state_dir=state)
    access: LabAccess | None = None
    try:
        start = time.time()
        r = lab.vvu("up", "--detach", "--no-check", "--name", name, str(path), timeout=1200)
        assert r.returncode == 0, f"vvu-launch up: {explain(r)}\n{lab.supervisor_log()}"
        times = {n: lab.state()["nodes"][n] for n in nodes}
        print(f"up: {time.time() - start:.0f} s; " + ", ".join(
            f"{n} started at {v['started_at'] - start:.0f} s, ready at "
            f"{v['ready_at'] - start:.0f} s" for n, v in times.items()))
        access = LabAccess(lab.plan(), lab.lab_dir / "id_ed25519")
        yield lab, access
    finally:
        if access is not None:
            access.close()
        if (lab.lab_dir / "topology.json").exists():
            lab.vvu("down", name, "--cleanup", timeout=300)
        shutil.rmtree(state, ignore_errors=True)
