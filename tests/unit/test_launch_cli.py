"""vvu-launch without VMs: validation errors and exit status, the schema, render, and
`down`/`up`/`status` working from a lab's recorded state after partial starts and crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vvu_runtime.launch import cli
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.lab import ImageFiles, LabPaths, plan_lab, write_json
from vvu_runtime.launch.topology import load_topology_text

REPO = Path(__file__).resolve().parents[2]

BROKEN = """\
name: bad
appliances:
  sw1: {kind: vswitch, cpuz: 2}
consumers:
  c1:
    memory: 300M
    nics: [sw9]
"""


def test_validate_reports_every_problem_with_its_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "bad.yaml"
    topo.write_text(BROKEN)
    assert cli.main(["validate", str(topo)]) == 2
    err = capsys.readouterr().err
    assert f"{topo}:3:24: appliances.sw1.cpuz:" in err and 'did you mean "cpus"' in err
    assert f"{topo}:6:13: consumers.c1.memory:" in err
    assert f"{topo}:7:12: consumers.c1.nics[0]" in err and "sw9" in err
    assert "3 problems; nothing was started" in err
    assert not (tmp_path / "labs").exists()


def test_up_with_a_broken_topology_starts_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    topo = tmp_path / "bad.yaml"
    topo.write_text(BROKEN)
    assert cli.main(["up", "--detach", str(topo)]) == 2
    assert not (tmp_path / "state").exists()


def test_every_shipped_example_validates(capsys: pytest.CaptureFixture[str]) -> None:
    for example in sorted((REPO / "examples").glob("*.yaml")):
        assert cli.main(["validate", str(example)]) == 0, example
    assert "lab default: 2 appliance(s), 2 consumer(s), 5 link(s)" in capsys.readouterr().out


def test_schema_prints_docs_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema"]) == 0
    assert "consumers" in capsys.readouterr().out
    assert cli.main(["schema", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False


def test_render_prints_every_command_line_and_starts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["render", str(REPO / "examples" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("qemu-system-x86_64") == 4
    assert out.count("vvu_runtime.device.devd") == 2
    assert not (tmp_path / "state").exists()
    assert not list(Path("/dev/shm").glob("vvu-lab-default-*"))


def test_graph_of_a_topology_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["graph", str(REPO / "examples" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph LR")
    assert 'c1 -- "net: c1-nic0" --- sw1' in out
    assert 'c2 -- "blk: c2-disk0" --- st1' in out


# --------------------------------------------------------------------------
# Recorded state
# --------------------------------------------------------------------------

TOPO = """\
name: {name}
appliances:
  sw1: {{kind: vswitch}}
consumers:
  c1: {{memory: 128M, nics: [sw1]}}
"""


def _lab(tmp_path: Path, name: str) -> LabPaths:
    """A lab that was brought up: its topology.json, as `up` writes it."""
    topo = load_topology_text(TOPO.format(name=name), tmp_path / "t.yaml")
    paths = LabPaths(name=name, root=tmp_path / "state" / "labs" / name,
                     run=tmp_path / "run" / name)
    images = {k: ImageFiles(Path("/k"), Path("/i"), "", Path("/d.raw"))
              for k in ("vswitch", "consumer")}
    plan = plan_lab(topo, paths, accel=Accelerator.TCG, accel_reason="test",
                    public_key="ssh-ed25519 AAAA x", images=images, ports={"sw1": 1, "c1": 2})
    paths.root.mkdir(parents=True)
    write_json(paths.topology_json, plan.to_json())
    return paths


def _sleeper(*marker: str) -> subprocess.Popen[bytes]:
    """A process whose command line names the lab, like the lab's QEMU and vvu-devd."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *marker])


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return False
    return True


def test_down_after_a_supervisor_crash_kills_and_removes_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    name = f"crash{os.getpid()}"
    paths = _lab(tmp_path, name)
    paths.run.mkdir(parents=True)
    (paths.run / "c1-nic0.vu").write_text("")
    ram = Path(f"/dev/shm/vvu-lab-{name}-c1.ram")
    ram.write_bytes(b"")
    recorded = _sleeper(str(paths.run / "sw1.qmp"))
    unrecorded = _sleeper(str(paths.run / "c1.qmp"))  # started, pid not yet written
    try:
        write_json(paths.state, {
            "supervisor": {"pid": 999999999}, "phase": "running",
            "nodes": {"sw1": {"state": "ready", "pid": recorded.pid}}, "links": {}})
        assert cli.main(["down", name]) == 0
        assert _gone(recorded) and _gone(unrecorded)
        assert not ram.exists() and not paths.run.exists()
        assert json.loads(paths.state.read_text())["phase"] == "stopped"
        assert paths.topology_json.exists()  # the lab directory stays (data disks, logs)
        assert cli.main(["down", name, "--cleanup"]) == 0
        assert not paths.root.exists()
    finally:
        ram.unlink(missing_ok=True)
        for p in (recorded, unrecorded):
            p.kill()


def test_down_never_touches_a_process_that_only_reuses_a_recorded_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    name = f"reuse{os.getpid()}"
    paths = _lab(tmp_path, name)
    stranger = _sleeper("not-this-lab")
    try:
        write_json(paths.state, {"supervisor": {"pid": stranger.pid}, "phase": "running",
                                 "nodes": {"sw1": {"pid": stranger.pid}}, "links": {}})
        assert cli.main(["down", name]) == 0
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_up_of_a_running_lab_says_so_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    name = f"running{os.getpid()}"
    paths = _lab(tmp_path, name)
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPO.format(name=name))
    supervisor = _sleeper("vvu_runtime.launch.supervisor", str(paths.root))
    try:
        state = {"supervisor": {"pid": supervisor.pid}, "phase": "running", "nodes": {},
                 "links": {}}
        write_json(paths.state, state)
        before = {p: p.stat().st_mtime_ns for p in paths.root.iterdir()}
        assert cli.main(["up", "--detach", str(topo)]) == 0
        assert "already running" in capsys.readouterr().err
        assert {p: p.stat().st_mtime_ns for p in paths.root.iterdir() if p.name != ".lock"} \
            == {p: t for p, t in before.items()}
        assert supervisor.poll() is None
        st = cli.lab_status(paths)
        assert st["phase"] == "running" and st["supervisor_pid"] == supervisor.pid
    finally:
        supervisor.kill()
        supervisor.wait()


def test_status_of_a_crashed_lab_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    name = f"gone{os.getpid()}"
    paths = _lab(tmp_path, name)
    write_json(paths.state, {"supervisor": {"pid": 999999999}, "phase": "running",
                             "nodes": {"sw1": {"state": "ready", "pid": 999999999}},
                             "links": {}})
    assert cli.main(["status", name, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["phase"].startswith("crashed")
    assert [(n["name"], n["role"], n["state"], n["pid"]) for n in st["nodes"]] == [
        ("sw1", "appliance", "stopped", None), ("c1", "consumer", "stopped", None)]
    assert st["links"][0]["name"] == "c1-nic0" and st["links"][0]["status"] == "down"


def test_unknown_lab_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["status", "nosuchlab"]) == 1
    assert "no lab 'nosuchlab'" in capsys.readouterr().err


def test_down_of_a_lab_never_touches_a_lab_whose_name_it_prefixes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    name = f"pre{os.getpid()}"
    paths = _lab(tmp_path, name)
    other = _sleeper(f"{paths.run}2/sw1.qmp", f"{paths.root}2")
    mine = _sleeper(f"{paths.run}/sw1.qmp")
    try:
        write_json(paths.state, {"supervisor": {"pid": 999999999}, "phase": "running",
                                 "nodes": {}, "links": {}})
        assert cli.main(["down", name]) == 0
        assert _gone(mine)
        assert other.poll() is None
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_a_lab_brought_up_again_keeps_its_free_ssh_ports(tmp_path: Path) -> None:
    import socket

    paths = _lab(tmp_path, f"ports{os.getpid()}")
    plan = json.loads(paths.topology_json.read_text())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    for n in plan["nodes"]:
        n["ssh_port"] = {"sw1": taken.getsockname()[1], "c1": free_port}[n["name"]]
    write_json(paths.topology_json, plan)
    try:
        assert cli._previous_ports(paths) == {"c1": free_port}
    finally:
        taken.close()


def test_status_says_degraded_when_a_ready_node_has_a_link_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The VMs run (the supervisor says "ready") but sw1's back-end is not up: both
    # ends of its link are degraded, and the table says which link and why.
    monkeypatch.setenv("VVU_STATE_DIR", str(tmp_path / "state"))
    name = f"degr{os.getpid()}"
    paths = _lab(tmp_path, name)
    supervisor = _sleeper("vvu_runtime.launch.supervisor", str(paths.root))
    vm = _sleeper(str(paths.run / "sw1.qmp"))
    try:
        def running(link_status: str) -> None:
            write_json(paths.state, {
                "supervisor": {"pid": supervisor.pid}, "phase": "running",
                "nodes": {n: {"state": "ready", "pid": vm.pid} for n in ("sw1", "c1")},
                "links": {"c1-nic0": {"device": "c1-nic0", "status": link_status}}})

        running("0")
        st = cli.lab_status(paths)
        assert {n["name"]: n["state"] for n in st["nodes"]} == {
            "sw1": "degraded", "c1": "degraded"}
        errors = {n["name"]: n["error"] for n in st["nodes"]}
        assert errors == {"sw1": "link c1-nic0: the appliance's back-end is not up",
                          "c1": "link c1-nic0: not connected to sw1"}
        assert cli.main(["status", name]) == 0
        text = capsys.readouterr().out
        assert "degraded" in text and "c1: link c1-nic0: not connected to sw1" in text
        # Both bits up: ready again.
        running("BACKEND_UP|FRONTEND_UP")
        assert {n["name"]: n["state"] for n in cli.lab_status(paths)["nodes"]} == {
            "sw1": "ready", "c1": "ready"}
    finally:
        for p in (supervisor, vm):
            p.kill()
            p.wait()
