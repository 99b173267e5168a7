"""vvu-launch's lifecycle with real QEMU, driven through the CLI as a user would.

One lab (a vswitch appliance, two busybox initramfs consumers, a ping and a transfer
check) is brought up once for the module and used by the "running lab" tests: up and
status, a failing check, healing a killed vvu-devd, migration refused, a second up,
then its supervisor SIGKILLed and down leaving nothing. The cleanup tests then start
short-lived labs of their own: Ctrl-C during up, a start that fails. Each lab has a name of
its own and every lab directory is under a tmp ``VVU_STATE_DIR``.

Run with ``flock /tmp/vvu-heavy.lock python -m pytest tests/acceptance/test_launch_lifecycle.py``
(TCG boots of the appliance take 40-90 s on a loaded machine).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.launch_lab import Lab, explain, processes_mentioning, topology_yaml, wait_until
from vvu_runtime.launch.appliance import ApplianceImage, build_appliance
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.shell import ConsoleShell
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

#: Seconds for ``up`` (image check, appliance TCG boot, consumers) on a loaded machine.
UP_TIMEOUT = 600.0
#: Seconds for a check run (the transfer check retries when it fails).
CHECK_TIMEOUT = 400.0
NODES = {"sw1": ("appliance", "vswitch"), "c1": ("consumer", "initramfs"),
         "c2": ("consumer", "initramfs")}


def _lab(tmp: Path, assets: ConsumerAssets, suffix: str, *, kernel: Path | None = None) -> Lab:
    name = f"acc{os.getpid()}-{suffix}"
    topo = tmp / f"{name}.yaml"
    topo.write_text(topology_yaml(name, kernel or assets.kernel, assets.initrd))
    return Lab(name=name, topology=topo, state_dir=tmp / "state")


def _down_cleanup(lab: Lab) -> None:
    if (lab.lab_dir / "topology.json").exists():
        lab.vvu("down", lab.name, "--cleanup", timeout=300)


def _up_detached(lab: Lab) -> subprocess.CompletedProcess[str]:
    return lab.vvu("up", "--detach", str(lab.topology), timeout=UP_TIMEOUT)


def _assert_clean(lab: Lab, when: str) -> None:
    left = wait_until_clean(lab)
    assert left == [], f"{when}, lab {lab.name} left behind:\n  " + "\n  ".join(left)


def wait_until_clean(lab: Lab, timeout: float = 15.0) -> list[str]:
    """Leftovers once processes had ``timeout`` s to go (a SIGKILLed process exits async)."""
    deadline = time.monotonic() + timeout
    while (left := lab.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _lab_pid_alive(lab: Lab, pid: int) -> bool:
    """Whether ``pid`` runs and is still one of the lab's (not a reused pid)."""
    return any(line.startswith(f"pid {pid}:")
               for line in processes_mentioning(str(lab.run_dir), str(lab.lab_dir)))


def _check_rows(out: str) -> dict[str, str]:
    """``check`` name -> its row, from the table ``vvu-launch check`` prints."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(ping|transfer)\b.*?\s(pass|FAIL)\s", line)
        if m:
            rows[m.group(1)] = line
    return rows


@pytest.fixture(scope="module", autouse=True)
def vswitch_image(toolchain: Toolchain) -> ApplianceImage:
    """Built (or found up to date) before any ``up``, which would otherwise build it on
    the clock of its timeout; a failing build fails here, saying so."""
    return build_appliance(toolchain, "vswitch")


# --------------------------------------------------------------------------
# The running lab
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory,
        consumer_assets: ConsumerAssets) -> Iterator[Lab]:
    lab = _lab(tmp_path_factory.mktemp("life"), consumer_assets, "life")
    start = time.monotonic()
    up = _up_detached(lab)
    try:
        assert up.returncode == 0, f"up --detach failed:\n{explain(up)}\n" \
                                   f"--- supervisor log:\n{lab.supervisor_log()}"
        print(f"lab {lab.name} up in {time.monotonic() - start:.0f} s")
        yield dataclasses.replace(lab, up_output=up.stdout + up.stderr)
    finally:
        _down_cleanup(lab)


@pytest.mark.timeout(1200)
def test_up_detach_status_check_logs_graph(lab: Lab) -> None:
    # up ran the topology's checks and showed the lab.
    assert "checks: 2 passed, 0 failed" in lab.up_output, lab.up_output
    assert f"lab {lab.name}: running" in lab.up_output, lab.up_output

    st = lab.status()
    assert st["phase"] == "running", st
    assert st["supervisor_pid"] and Path(f"/proc/{st['supervisor_pid']}").exists()
    assert {n["name"]: (n["role"], n["kind"]) for n in st["nodes"]} == NODES
    for n in st["nodes"]:
        assert n["state"] == "ready", n
        assert n["pid"] and Path(f"/proc/{n['pid']}").exists(), n
        assert n["restarts"] == 0, n
    assert lab.node("sw1", st)["devd_pid"], st
    assert len(st["links"]) == 2, st["links"]
    for lk in st["links"]:
        assert lk["appliance"] == "sw1" and lk["consumer"] in ("c1", "c2"), lk
        assert "BACKEND_UP" in lk["status"] and "FRONTEND_UP" in lk["status"], lk

    chk = lab.vvu("check", lab.name, timeout=CHECK_TIMEOUT)
    assert chk.returncode == 0, explain(chk)
    rows = _check_rows(chk.stdout)
    assert set(rows) == {"ping", "transfer"}, explain(chk)
    assert all(" pass " in r for r in rows.values()), explain(chk)

    text = lab.vvu("status", lab.name)
    assert text.returncode == 0, explain(text)
    for name in NODES:
        assert re.search(rf"^{name}\s.*\sready\s", text.stdout, re.M), text.stdout
    listed = lab.vvu("list")
    assert listed.returncode == 0, explain(listed)
    assert re.search(rf"^{lab.name}\s+running\s+3/3\s", listed.stdout, re.M), listed.stdout

    logs = lab.vvu("logs", "--lab", lab.name, "c1")
    assert logs.returncode == 0, explain(logs)
    assert "Linux version" in logs.stdout and "vvu# " in logs.stdout, logs.stdout[-2000:]

    graph = lab.vvu("graph", lab.name)
    assert graph.returncode == 0, explain(graph)
    lines = graph.stdout.splitlines()
    assert lines[0] == "graph LR", graph.stdout
    for node in NODES:
        assert any(line.strip().startswith(node) for line in lines[1:]), graph.stdout
    assert sum(1 for line in lines if "---" in line and "sw1" in line) == 2, graph.stdout


def _console(lab: Lab, node: str, command: str) -> None:
    plan = lab.plan()
    socket_path = next(n["console_socket"] for n in plan["nodes"] if n["name"] == node)
    shell = ConsoleShell(node, Path(socket_path))
    try:
        r = shell.run(command, timeout=30)
    finally:
        shell.close()
    assert r.ok, f"{node}: {command}: exit {r.status}: {r.stdout}"


def _address(lab: Lab, node: str) -> str:
    n = next(n for n in lab.plan()["nodes"] if n["name"] == node)
    return str(n["addresses"]["sw1"]).split("/")[0]


@pytest.mark.timeout(1200)
def test_check_fails_clearly_and_recovers(lab: Lab) -> None:
    ip = _address(lab, "c2")
    _console(lab, "c2", "ip link set eth0 down")
    try:
        chk = lab.vvu("check", lab.name, timeout=CHECK_TIMEOUT)
        assert chk.returncode == 1, explain(chk)
        rows = _check_rows(chk.stdout)
        assert "FAIL" in rows.get("ping", ""), explain(chk)
        assert ip in rows["ping"], f"the ping's FAIL row does not name {ip}:\n{explain(chk)}"
    finally:
        _console(lab, "c2", "ip link set eth0 up")
    chk = lab.vvu("check", lab.name, timeout=CHECK_TIMEOUT)
    assert chk.returncode == 0, f"check after eth0 came back up:\n{explain(chk)}"


@pytest.mark.timeout(1200)
def test_killed_devd_heals(lab: Lab) -> None:
    st = lab.status()
    sw1 = lab.node("sw1", st)
    consumers = {n["name"]: n["pid"] for n in st["nodes"] if n["role"] == "consumer"}
    devd = sw1["devd_pid"]
    assert devd and Path(f"/proc/{devd}").exists(), sw1
    os.kill(devd, signal.SIGKILL)
    boot_timeout = float(lab.plan()["topology"]["options"]["boot_timeout"])

    def healed() -> dict[str, Any] | None:
        now = lab.status()
        n = lab.node("sw1", now)
        links_up = all("BACKEND_UP" in lk["status"] and "FRONTEND_UP" in lk["status"]
                       for lk in now["links"])
        return now if n["state"] == "ready" and n["restarts"] == 1 and links_up else None

    st = wait_until("sw1 ready again with its links up after vvu-devd was killed", healed,
                    boot_timeout + 60, interval=2)
    sw1 = lab.node("sw1", st)
    assert sw1["devd_pid"] != devd and _lab_pid_alive(lab, sw1["devd_pid"]), sw1
    assert not _lab_pid_alive(lab, devd), "the killed vvu-devd is still there"
    for name, pid in consumers.items():
        n = lab.node(name, st)
        assert n["pid"] == pid and n["restarts"] == 0, f"{name} was restarted: {n}"
        assert n["state"] == "ready", n
    chk = lab.vvu("check", lab.name, timeout=CHECK_TIMEOUT)
    assert chk.returncode == 0, f"check after the heal:\n{explain(chk)}"


@pytest.mark.timeout(300)
def test_appliance_refuses_migration(lab: Lab) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    node = next(n for n in lab.plan()["nodes"] if n["name"] == "sw1")
    qmp_path = node["qmp_socket"]
    assert qmp_path == str(lab.run_dir / "sw1.qmp")
    pid = lab.node("sw1")["pid"]
    mon = QEMUMonitorProtocol(qmp_path)
    mon.connect(negotiate=True)
    try:
        mon.settimeout(30)
        reply = mon.cmd_raw("migrate", {"uri": "exec:cat > /dev/null"})
        assert "error" in reply, f"migrate was accepted: {reply}"
        desc = str(reply["error"].get("desc", ""))
        assert "migration is disabled" in desc.lower(), reply
        status = mon.cmd_raw("query-status")
        assert status["return"]["running"] is True, status
        migration = mon.cmd_raw("query-migrate")
        assert migration["return"].get("status") in (None, "none", "failed"), migration
    finally:
        mon.close()
    time.sleep(2)
    sw1 = lab.node("sw1")
    assert sw1["state"] == "ready" and sw1["pid"] == pid, sw1


@pytest.mark.timeout(300)
def test_second_up_changes_nothing(lab: Lab) -> None:
    before = lab.status()
    again = _up_detached(lab)
    assert again.returncode == 0, explain(again)
    assert "already running" in again.stderr, explain(again)
    after = lab.status()
    assert after["supervisor_pid"] == before["supervisor_pid"]
    pids = [(n["name"], n["pid"], n["devd_pid"], n["restarts"]) for n in before["nodes"]]
    assert [(n["name"], n["pid"], n["devd_pid"], n["restarts"]) for n in after["nodes"]] == pids


@pytest.mark.timeout(600)
def test_killed_supervisor_takes_the_vms_and_down_cleans_up(lab: Lab) -> None:
    """The module lab's end: its supervisor SIGKILLed (the VMs and vvu-devd must die
    with it), then ``down`` of the crashed lab and ``down --cleanup``. (A graceful
    ``down`` of a running lab: test_default_lab.py.)"""
    assert list(Path("/dev/shm").glob(f"vvu-lab-{lab.name}-*")), "no RAM files while running"
    st = lab.status()
    sup = st["supervisor_pid"]
    vms = [n["pid"] for n in st["nodes"]] + [lab.node("sw1", st)["devd_pid"]]
    assert sup and all(vms), st
    os.kill(sup, signal.SIGKILL)

    def all_gone() -> bool:
        return not any(_lab_pid_alive(lab, p) for p in vms)

    try:
        wait_until("the lab's VMs and vvu-devd die with their supervisor", all_gone, 30)
    except AssertionError as e:
        survivors = processes_mentioning(str(lab.run_dir), str(lab.lab_dir))
        raise AssertionError(f"{e}:\n  " + "\n  ".join(survivors)) from None
    assert processes_mentioning(str(lab.run_dir), str(lab.lab_dir)) == []
    st = lab.status()
    assert st["phase"].startswith("crashed"), st
    assert all(n["state"] == "stopped" for n in st["nodes"]), st
    status_text = lab.vvu("status", lab.name)
    assert status_text.returncode == 0 and "crashed" in status_text.stdout, \
        explain(status_text)
    down = lab.vvu("down", lab.name, timeout=300)
    assert down.returncode == 0, explain(down)
    _assert_clean(lab, "after down of a crashed lab")
    assert (lab.lab_dir / "topology.json").is_file()
    assert (lab.lab_dir / "logs" / "c1.console.log").is_file()
    st = lab.status()
    assert st["phase"] == "stopped" and st["supervisor_pid"] is None, st
    assert all(n["state"] == "stopped" and n["pid"] is None for n in st["nodes"]), st
    cleanup = lab.vvu("down", lab.name, "--cleanup", timeout=120)
    assert cleanup.returncode == 0, explain(cleanup)
    assert not lab.lab_dir.exists()
    _assert_clean(lab, "after down --cleanup")


# --------------------------------------------------------------------------
# Short-lived labs: stopping at the wrong moment leaves nothing either
# --------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_ctrl_c_while_the_appliance_boots_leaves_nothing(
        tmp_path: Path, consumer_assets: ConsumerAssets) -> None:
    lab = _lab(tmp_path, consumer_assets, "intr")
    out = tmp_path / "up.out"
    try:
        # Ctrl-C reaches a terminal's foreground job. A test run started in the
        # background by a non-interactive shell has SIGINT ignored (POSIX), and `up`
        # would inherit that: hand it the disposition a terminal job has.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with out.open("w") as f:
                proc = lab.popen("up", str(lab.topology), stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            def booting_or_exited() -> bool:
                sw1 = lab.state().get("nodes", {}).get("sw1", {})
                return sw1.get("state") == "booting" or proc.poll() is not None

            wait_until("sw1 booting", booting_or_exited, UP_TIMEOUT, interval=0.2)
            assert proc.poll() is None, f"up exited {proc.returncode}:\n{out.read_text()}"
            time.sleep(2)  # well into the boot
            assert processes_mentioning(str(lab.run_dir)), "no QEMU of the lab is running"
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            code = proc.wait(timeout=90)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = out.read_text()
        assert code == 130, f"up exited {code} on Ctrl-C:\n{text}"
        assert took < 60, f"up took {took:.0f} s to stop on Ctrl-C:\n{text}"
        assert f"interrupted: stopping lab {lab.name}" in text, text
        assert f"lab {lab.name} stopped" in text, text
        _assert_clean(lab, "after Ctrl-C during up")
        assert lab.state().get("phase") == "stopped", lab.state()
    finally:
        _down_cleanup(lab)


@pytest.mark.timeout(900)
def test_failed_start_leaves_nothing(tmp_path: Path, consumer_assets: ConsumerAssets) -> None:
    garbage = tmp_path / "kernel"
    garbage.write_bytes(os.urandom(1 << 20))
    lab = _lab(tmp_path, consumer_assets, "fail", kernel=garbage)
    try:
        up = _up_detached(lab)
        assert up.returncode == 1, explain(up)
        err = up.stderr
        assert f"lab {lab.name} did not start" in err, explain(up)
        # Random bytes are no kernel: the guest crashes at once and QEMU (-no-reboot) exits.
        assert re.search(r"\bc[12]: QEMU exited with status \d+", err), \
            f"the failure does not name the consumer and QEMU's exit:\n{err}"
        _assert_clean(lab, "after a failed start")
        st = lab.status()
        assert st["supervisor_pid"] is None and st["error"], st
        assert all(n["state"] == "stopped" and n["pid"] is None for n in st["nodes"]), st
    finally:
        _down_cleanup(lab)
