"""``vvu-devd`` as a process: two devices, a QEMU-like vfio-user client and a
vhost-user front-end against its sockets, bad input on one device, SIGUSR1 table,
SIGTERM cleanup, usage errors."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devd import DevdProcess
from vvu_runtime.device.devd import DeviceSpec, counters_table, main
from vvu_runtime.vhost_user.errors import ConnectionClosed, TransportError
from vvu_runtime.vhost_user.frontend import VhostUserFrontend

MiB = 1 << 20


class Devd(DevdProcess):
    """Devices ``names``, each with an 8 MiB RAM file and its sockets in ``tmp``."""

    def __init__(self, tmp: Path, *extra: str, names: tuple[str, ...] = ("net0", "blk0"),
                 queues: dict[str, int] | None = None) -> None:
        self.tmp = tmp
        self.names = names
        devices = []
        for name in names:
            ram = tmp / f"{name}.ram"
            with ram.open("wb") as f:
                f.truncate(8 * MiB)
            devices.append((name, tmp / f"{name}.vhost", tmp / f"{name}.vfio", ram))
        super().__init__(devices, tmp / "devd.log", "--max-queues", "8", *extra, queues=queues)

    @property
    def sockets(self) -> dict[str, tuple[Path, Path, Path]]:
        return self.devices


@pytest.fixture
def devd(tmp_path: Path) -> Iterator[Devd]:
    d = Devd(tmp_path, "--log-dir", str(tmp_path / "logs"))
    try:
        yield d
    finally:
        d.stop()


def test_serves_two_devices_survives_bad_input_and_cleans_up(devd: Devd) -> None:
    for vhost, vfio, _ in devd.sockets.values():
        assert vhost.exists() and vfio.exists()
    with devd.client("net0") as a, devd.client("blk0") as b:
        assert a.get_info().num_regions == 9
        assert (a.config_read(0, 2), a.config_read(2, 2)) == (0x1AF4, 0x107F)
        status, max_queues = struct.unpack("<II", a.region_read(0, 0x2000, 8))
        assert (status, max_queues) == (0, 8)
        # BACKEND_UP (without a full driver: the connection is accepted, FRONTEND_UP set).
        a.region_write(0, 0x2000, b"\1\0\0\0")
        fe = VhostUserFrontend.connect(devd.sockets["net0"][0])
        deadline = time.monotonic() + 5
        while int.from_bytes(a.region_read(0, 0x2000, 4), "little") != 3:
            assert time.monotonic() < deadline, "no FRONTEND_UP"
            time.sleep(0.02)
        # Bad input from net0's appliance: a write where no register is.
        a.region_write(4, 0x800, b"\1\0\0\0")
        with pytest.raises((ConnectionClosed, TransportError)):
            fe.channel.recv_frame(5)
        fe.close()
        devd.wait_log("net0: appliance error: driver wrote 4 bytes at BAR4+0x800")
        # The process lives on and blk0 is untouched.
        assert devd.proc.poll() is None
        assert struct.unpack("<II", b.region_read(0, 0x2000, 8)) == (0, 8)
        # SIGUSR1: the counters table.
        devd.proc.send_signal(signal.SIGUSR1)
        devd.wait_log("counters (SIGUSR1)")
    assert devd.stop() == 0
    log = devd.log()
    table = log.split("counters (exit):\n", 1)[1].splitlines()
    assert table[0].split()[:4] == ["device", "appliance", "consumer", "status"]
    net0 = next(line for line in table if line.startswith("net0")).split()
    blk0 = next(line for line in table if line.startswith("blk0")).split()
    assert net0[-2:] == ["1", "0"]  # one error, no consumer-side reset
    assert blk0[-2:] == ["0", "0"]
    for vhost, vfio, ram in devd.sockets.values():
        assert not vhost.exists() and not vfio.exists()
        assert ram.exists()  # the consumer's RAM is not ours to remove
    assert "Traceback" not in log
    # Per-device log files hold that device's lines only.
    net0_log = (devd.tmp / "logs" / "net0.log").read_text()
    assert "appliance error" in net0_log and "blk0:" not in net0_log
    assert "net0:" not in (devd.tmp / "logs" / "blk0.log").read_text()


def test_a_new_appliance_client_after_the_first_left(devd: Devd) -> None:
    with devd.client("net0") as a:
        a.region_write(0, 0x2000, b"\1\0\0\0")
    devd.wait_log("net0: client disconnected")
    with devd.client("net0") as a:
        assert int.from_bytes(a.region_read(0, 0x2000, 4), "little") == 0  # reset on leave


def test_missing_ram_file_exits_1_with_a_clear_message(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"x:{tmp_path}/v.sock:{tmp_path}/f.sock:{tmp_path}/nothing.ram"
    assert main(["--device", spec]) == 1
    err = capsys.readouterr().err
    assert "cannot open the consumer RAM file" in err and "Traceback" not in err
    empty = tmp_path / "empty.ram"
    empty.touch()
    assert main(["--device", f"x:{tmp_path}/v.sock:{tmp_path}/f.sock:{empty}"]) == 1
    assert "is empty: provision it" in capsys.readouterr().err
    assert not (tmp_path / "v.sock").exists()


def test_socket_path_taken_by_a_file_exits_1(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ram = tmp_path / "r.ram"
    ram.write_bytes(bytes(4096))
    (tmp_path / "v.sock").write_text("not a socket")
    assert main(["--device", f"x:{tmp_path}/v.sock:{tmp_path}/f.sock:{ram}"]) == 1
    assert "exists and is not a socket" in capsys.readouterr().err
    assert (tmp_path / "v.sock").read_text() == "not a socket"


@pytest.mark.parametrize("argv", [
    [],
    ["--device", "a:b:c"],
    ["--device", "a b:v:f:r"],
    ["--device", "x:v:f:r", "--device", "x:v2:f2:r"],
    ["--device", "x:v:f:r", "--device", "y:v:f2:r"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_a_device_s_own_max_queues_overrides_the_default(tmp_path: Path) -> None:
    # Each queue is an MSI-X vector in the appliance: the launcher sizes every link.
    d = Devd(tmp_path, queues={"net0": 2})
    try:
        with d.client("net0") as a, d.client("blk0") as b:
            assert struct.unpack("<II", a.region_read(0, 0x2000, 8)) == (0, 2)
            assert struct.unpack("<II", b.region_read(0, 0x2000, 8)) == (0, 8)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("field", ["0", "257", "x", "-1", "2 "])
def test_a_bad_max_queues_field_is_a_usage_error_naming_it(
        field: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--device", f"a:/run/v:/run/f:/dev/shm/r:{field}"])
    assert exc.value.code == 2
    assert f"MAX_QUEUES {field!r} is not a number in 1..256" in capsys.readouterr().err


def test_spec_and_table() -> None:
    spec = DeviceSpec.parse("net0:/run/a.sock:/run/b.sock:/dev/shm/c.ram")
    assert (spec.name, spec.vhost_socket, spec.vfio_socket, spec.ram_file, spec.max_queues) == (
        "net0", "/run/a.sock", "/run/b.sock", "/dev/shm/c.ram", None)
    assert DeviceSpec.parse("n:/a:/b:/c:5").max_queues == 5
    assert counters_table([]) == "(no devices)"


def test_sigterm_while_a_consumer_waits_in_the_backlog(tmp_path: Path) -> None:
    d = Devd(tmp_path, names=("c0",))
    fe = VhostUserFrontend.connect(d.sockets["c0"][0])  # no BACKEND_UP: it waits
    try:
        assert d.stop() == 0
        with pytest.raises((ConnectionClosed, TransportError)):
            fe.channel.recv_frame(5)
    finally:
        fe.close()
    assert not d.sockets["c0"][0].exists()
    assert os.path.exists(d.sockets["c0"][2])
