"""vvu_runtime.launch.process: vvu-devd supervision, its counters, programs in an appliance."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from vvu_runtime.device.devd import VvuFunction, counters_table
from vvu_runtime.launch.process import (
    ApplianceProcess,
    BackendError,
    BackendProcess,
    DeviceModelProcess,
    VvuLink,
    parse_counters,
)

TABLE = """\
vvu-devd: counters (SIGUSR1):
device  appliance  consumer                status                              conns  rx msgs  tx replies  tx reqs  tx dropped  kicks  unrouted  doorbells  no fd  errors  resets
------  ---------  ----------------------  ----------------------------------  -----  -------  ----------  -------  ----------  -----  --------  ---------  -----  ------  ------
a       connected  connected               BACKEND_UP|FRONTEND_UP (driver ok)      2       41          17        0           0   1234         0        987      3       0       0
disk    listening  waiting for BACKEND_UP  down (status 0x0)                       0        0           0        0           0      0         0          0      0       0       0
"""  # noqa: E501


def test_parse_counters_reads_every_column() -> None:
    table = parse_counters(TABLE)
    assert table is not None and set(table) == {"a", "disk"}
    a = table["a"]
    assert a.columns["status"] == "BACKEND_UP|FRONTEND_UP (driver ok)"
    assert a.columns["consumer"] == "connected"
    assert (a.kicks, a.doorbells, a.messages, a["no fd"]) == (1234, 987, 58, 3)
    assert table["disk"].columns["consumer"] == "waiting for BACKEND_UP"
    assert a.numbers()["rx msgs"] == 41 and "status" not in a.numbers()


def test_parse_counters_takes_the_last_complete_table() -> None:
    newer = TABLE.replace("1234", "2000").replace("SIGUSR1", "exit")
    both = TABLE + "vvu-devd: INFO x: something\n" + newer
    table = parse_counters(both)
    assert table is not None and table["a"].kicks == 2000
    by_signal = parse_counters(both, when="SIGUSR1")
    assert by_signal is not None and by_signal["a"].kicks == 1234
    # A table still being written (its last row has no newline yet) is skipped.
    partial = TABLE + newer[:-40]
    table = parse_counters(partial, devices=2)
    assert table is not None and table["a"].kicks == 1234
    assert parse_counters("nothing here\n") is None


def test_parse_counters_matches_what_vvu_devd_prints(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(1 << 20))
    link = VvuLink("c0", tmp_path / "v", tmp_path / "f", ram)
    from vvu_runtime.device.devd import DeviceSpec

    fn = VvuFunction(DeviceSpec.parse(link.spec))
    try:
        text = f"vvu-devd: counters (exit):\n{counters_table([fn])}\n"
    finally:
        fn.device.close()
    table = parse_counters(text, devices=1)
    assert table is not None
    assert table["c0"].columns == fn.row()


def test_vvu_link_spec_and_paths(tmp_path: Path) -> None:
    link = VvuLink.in_dir(tmp_path, "c1", ram_dir=tmp_path, ram_prefix="r-")
    assert link.vhost_socket == tmp_path / "c1.vhost"
    assert link.ram_file == tmp_path / f"r-{os.getpid()}-c1.ram"
    assert link.spec == f"c1:{tmp_path}/c1.vhost:{tmp_path}/c1.vfio:{link.ram_file}"
    with pytest.raises(BackendError, match="cannot contain"):
        _ = VvuLink("x", Path("/a:b"), Path("/c"), Path("/d")).spec


def test_device_model_process_provisions_ram_reports_counters_and_cleans_up(
    tmp_path: Path,
) -> None:
    links = [VvuLink.in_dir(tmp_path, n, ram_dir=tmp_path) for n in ("c0", "c1")]
    devd = DeviceModelProcess(links, tmp_path / "devd.log", ram_mib=4)
    with devd:
        assert all(link.ram_file.stat().st_size == 4 << 20 for link in links)
        assert all(link.vhost_socket.exists() and link.vfio_socket.exists() for link in links)
        counters = devd.counters()
        assert set(counters) == {"c0", "c1"}
        assert counters["c0"].kicks == 0 and counters["c1"]["conns"] == 0
        assert devd.counters()["c0"].columns["consumer"] == "waiting for BACKEND_UP"
    assert devd.proc is not None and devd.proc.returncode == 0
    assert not any(p.exists() for link in links
                   for p in (link.vhost_socket, link.vfio_socket, link.ram_file))
    final = devd.last_counters()
    assert final is not None and final["c1"].columns["appliance"] == "closed"
    with pytest.raises(BackendError, match="not running"):
        devd.counters()


def test_device_model_process_start_failure_removes_the_ram(tmp_path: Path) -> None:
    link = VvuLink.in_dir(tmp_path, "c0", ram_dir=tmp_path)
    link.vhost_socket.write_text("taken")  # not a socket: vvu-devd cannot bind there
    devd = DeviceModelProcess([link], tmp_path / "devd.log", ram_mib=1, start_timeout=10)
    with pytest.raises(BackendError):
        devd.start()
    assert not link.ram_file.exists()
    devd.stop()


def test_backend_process_waits_for_its_ready_line(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    blk = BackendProcess("vvu-blk", ["--socket", str(sock), "--image", str(image)], [sock],
                         tmp_path / "blk.log", ready="listening on")
    with blk:
        assert blk.is_running() and "listening on" in blk.run_output()
        pid = blk.pid
    blk.start()  # the log is appended to; only this run's output counts
    assert blk.pid != pid and blk.run_output().count("listening on") == 1
    assert blk.output().count("listening on") == 2
    assert blk.stop() == 0 and not sock.exists()


def _local_shell(cmd: str) -> str:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30,
                       check=False)
    if r.returncode:
        raise RuntimeError(f"{cmd!r}: {r.returncode} {r.stderr}")
    return r.stdout


def test_appliance_process_start_kill_restart_stop(tmp_path: Path) -> None:
    script = "echo starting; sleep 0.3; echo ready now; trap 'echo stopped; exit 0' TERM; " \
             "while :; do sleep 0.1; done"
    prog = ApplianceProcess(_local_shell, ["sh", "-c", script], str(tmp_path / "prog"),
                            ready="ready now", start_timeout=20, poll=0.05)
    prog.start()
    assert prog.is_running() and prog.runs == 1 and prog.log.endswith("prog.1.log")
    first = prog.pid
    prog.kill()  # SIGKILL: no "stopped"
    assert not prog.is_running() and "stopped" not in prog.output()
    prog.start()
    assert prog.pid != first and prog.pids == [first, prog.pid]
    assert prog.logs() == [str(tmp_path / "prog.1.log"), str(tmp_path / "prog.2.log")]
    out = prog.wait_for("ready now", 5)
    assert out.count("ready now") == 1
    prog.stop()
    assert not prog.is_running()
    assert "stopped" in _local_shell(f"cat {shlex.quote(prog.log)}")
    prog.stop()  # idempotent


def test_appliance_process_that_dies_before_ready(tmp_path: Path) -> None:
    prog = ApplianceProcess(_local_shell, ["sh", "-c", "echo oops; exit 3"],
                            str(tmp_path / "bad"), ready="never", start_timeout=20, poll=0.05)
    with pytest.raises(BackendError, match="exited in the appliance before logging 'never'"):
        prog.start()
    prog.signal(signal.SIGTERM)  # nothing to signal: no error
