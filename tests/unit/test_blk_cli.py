"""The vvu-blk program: options, a session over its socket, clean SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vvu_runtime.serve.blk import main, parse_args
from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend, setup_queue
from vvu_runtime.virtio.blk import BlkConfig, BlkRequestHeader, RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature


def test_parse_args() -> None:
    args = parse_args(["--socket", "s", "--image", "i", "--queues", "4", "--read-only",
                       "--direct", "--serial", "abc"])
    assert (args.socket, args.image, args.queues, args.read_only, args.direct, args.serial) == (
        "s", "i", 4, True, True, "abc")
    args = parse_args(["--socket-path", "s", "--blk-file", "i", "--read-only-mode"])
    assert (args.socket, args.image, args.read_only) == ("s", "i", True)
    assert args.busy_poll == 0
    assert parse_args(["--socket", "s", "--image", "i", "--busy-poll", "750"]).busy_poll == 750
    for bad in (["--queues", "0"], ["--serial", "x" * 21], ["--busy-poll", "-1"],
                ["--busy-poll", "2000000"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--socket", "s", "--image", "i", *bad])
        assert exc.value.code == 2


def test_missing_socket_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--image", "i"])
    assert exc.value.code == 2


def test_print_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-capabilities"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps["type"] == "block" and "read-only" in caps["features"]


def run_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vvu_runtime.serve.blk", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_missing_image_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("--socket", str(tmp_path / "s"), "--image", str(tmp_path / "nope.raw"))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "nope.raw" in out and "Traceback" not in out


def test_serves_and_stops_cleanly(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    proc = run_cli("--socket", str(sock), "--image", str(image), "--queues", "2",
                   "--serial", "cli-test")
    try:
        fe = VhostUserFrontend.connect(sock, retry_for=20)
        ram = GuestRam(1 << 20)
        fe.negotiate(features=(1 << 64) - 1 & ~int(VirtioFeature.RING_PACKED))
        assert fe.get_queue_num() == 2
        assert BlkConfig.unpack(fe.get_config(0, 60)).capacity == 2048
        fe.set_mem_table([(ram.region, ram.fd)])
        dq = setup_queue(fe, ram, 0, 16)
        hdr, data, status = ram.alloc(16), ram.alloc(512), ram.alloc(1)
        ram.view(hdr, 16)[:] = BlkRequestHeader(RequestType.OUT, 0, 7).pack()
        ram.view(data, 512)[:] = b"\x77" * 512
        dq.ring.add([(hdr, 16), (data, 512)], [(status, 1)], token=0)
        dq.kick()
        assert dq.wait_call(10)
        assert dq.ring.get_used() == [(0, 1)]
        assert ram.view(status, 1)[0] == Status.OK
        assert image.read_bytes()[7 * 512:8 * 512] == b"\x77" * 512
        fe.close()
        dq.close()
        ram.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert not sock.exists()
    assert "disk disk.raw" in out  # logs name the disk
    assert "Traceback" not in out


def test_socket_directory_missing(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    proc = run_cli("--socket", str(tmp_path / "no" / "such" / "dir.sock"), "--image", str(image))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert "Traceback" not in out



def test_connect_mode(tmp_path: Path) -> None:
    """--connect: vvu-blk dials a front-end that listens (QEMU's server=on chardev)."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    sock_path = tmp_path / "fe.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    listener.settimeout(30)
    proc = run_cli("--socket", str(sock_path), "--image", str(image), "--connect")
    try:
        conn, _ = listener.accept()
        fe = VhostUserFrontend.from_socket(conn)
        fe.negotiate(features=(1 << 64) - 1 & ~int(VirtioFeature.RING_PACKED))
        assert BlkConfig.unpack(fe.get_config(0, 60)).capacity == 2048
        fe.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        listener.close()
    assert proc.returncode == 0, out
    assert sock_path.exists()  # the front-end's socket: not ours to remove
