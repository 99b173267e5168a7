"""The vvu-switch program: argument errors, and a real run (a front-end connects,
SIGUSR1 writes the counters, SIGTERM stops it and removes the sockets)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.net_frames import BROADCAST, DriverPort, ether, mac
from vvu_runtime.serve.switch import build_parser, main


@pytest.mark.parametrize("argv", [
    [],
    ["--port", "noequals"],
    ["--port", "=path"],
    ["--port", "a b=/tmp/x"],
    ["--port", "a=/tmp/x", "--port", "a=/tmp/y"],
    ["--port", "a=/tmp/x", "--port", "b=/tmp/x"],
    ["--port", "a=/tmp/x", "--queues", "0"],
    ["--port", "a=/tmp/x", "--ageing-time", "-1"],
    ["--port", "a=/tmp/x", "--uplink", "a"],
    ["--port", "a=/tmp/x", "--uplink", "much-too-long-name"],
    ["--vvu", "a=0000:00:05.0", "--vvu", "b=0000:00:05.0"],
    ["--vvu", "0000:00:05.0"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "vvu-switch: error:" in capsys.readouterr().err


def test_print_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "net"}


def test_defaults() -> None:
    args = build_parser().parse_args(["--port", "vm1=/run/a.sock"])
    assert args.queues == 1 and args.ageing_time == 300 and args.port[0].name == "vm1"


def test_ports_of_both_kinds_become_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    import vvu_runtime.serve.switch as cli

    seen: dict[str, object] = {}

    def fake_run(endpoints: list[object], **kw: object) -> int:
        seen["endpoints"] = endpoints
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    assert main(["--port", "vm1=/tmp/a.sock", "--vvu", "vvu0=0000:00:05.0",
                 "--vvu-access", "sysfs", "--busy-poll", "50"]) == 0
    eps = seen["endpoints"]
    assert isinstance(eps, list) and len(eps) == 2
    assert eps[0].socket_path == "/tmp/a.sock" and eps[0].vvu is None
    assert eps[1].vvu == "0000:00:05.0" and eps[1].vvu_access == "sysfs"
    assert eps[1].device.port_name == "vvu0" and eps[1].device.busy_poll == 50e-6


def test_a_real_run(tmp_path: Path) -> None:
    socks = {n: tmp_path / f"{n}.sock" for n in ("vm1", "vm2")}
    status = tmp_path / "status.json"
    log = tmp_path / "switch.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vvu_runtime.serve.switch",
             "--port", f"vm1={socks['vm1']}", "--port", f"vm2={socks['vm2']}",
             "--status-file", str(status), "--ageing-time", "60"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not all(s.exists() for s in socks.values()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with DriverPort(str(socks["vm1"])) as a, DriverPort(str(socks["vm2"])) as b:
            a.send(ether(BROADCAST, mac(1), 0x0806, bytes(28)))
            assert len(b.receive()) == 1
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while "port counters" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            data = json.loads(status.read_text())
            assert data["ports"]["vm1"]["in_packets"] == 1
            assert data["ports"]["vm2"]["out_packets"] == 1
            assert data["fdb"][0]["mac"] == "02:00:00:00:00:01"
            text = log.read_text()
            assert "port vm1: link up" in text
            assert "vm1   up 1/1q" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
        assert not any(s.exists() for s in socks.values())
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
