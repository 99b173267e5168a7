"""Listening/connecting endpoints, the backend daemon runner and vvu-probe."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vhost_user_harness import EchoDevice, LoopThread, open_fds
from vvu_runtime.vhost_user import probe
from vvu_runtime.vhost_user.errors import TransportError, VhostUserError
from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.server import VhostUserClient, VhostUserServer


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


def wait_for(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_server_serves_reconnections_and_refuses_a_second_client(
        lt: LoopThread, tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    dev = EchoDevice()
    before = open_fds()
    server = VhostUserServer(path, dev, loop=lt.loop)
    lt.call(server.start)
    assert path.is_socket()
    for round_ in range(3):
        fe = VhostUserFrontend.connect(path)
        fe.negotiate()
        ram = GuestRam(1 << 20)
        fe.set_mem_table([(ram.region, ram.fd)])
        dq = setup_queue(fe, ram, 0, 8)
        # A second front-end while the first is connected: refused, first unharmed.
        intruder = VhostUserFrontend.connect(path)
        with pytest.raises(VhostUserError):
            intruder.get_features()
        intruder.close()
        src = ram.alloc(2)
        ram.view(src, 2)[:] = b"hi"
        dq.ring.add([(src, 2)], [(ram.alloc(8), 8)], token=round_)
        dq.kick()
        assert dq.wait_call()
        assert dq.ring.get_used() == [(round_, 2)]
        fe.close()
        assert wait_for(lambda: server.session is None)
        dq.close()
        del dq
        ram.close()
    assert server.connections == 3
    assert dev.resets == 3
    lt.call(server.close)
    assert not path.exists()
    gc.collect()
    assert open_fds() == before


def test_server_replaces_a_stale_socket_but_not_a_live_one(lt: LoopThread,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()           # file left behind, nobody listening
    server = VhostUserServer(path, EchoDevice(), loop=lt.loop)
    lt.call(server.start)
    other = VhostUserServer(path, EchoDevice(), loop=lt.loop)
    with pytest.raises(TransportError, match="another process is listening"):
        lt.call(other.start)
    lt.call(server.close)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TransportError, match="not a socket"):
        lt.call(VhostUserServer(tmp_path / "file", EchoDevice(), loop=lt.loop).start)


def test_server_survives_garbage_and_serves_the_next_client(lt: LoopThread,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    server = VhostUserServer(path, EchoDevice(), loop=lt.loop)
    lt.call(server.start)
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(str(path))
    bad.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
    with contextlib.suppress(ConnectionResetError):   # dropped with our bytes unread
        assert bad.recv(100) == b""                   # dropped
    bad.close()
    assert wait_for(lambda: server.session is None)
    with VhostUserFrontend.connect(path) as fe:
        assert fe.get_queue_num() == 2
    lt.call(server.close)


def test_client_mode_connects_with_retry_and_reconnects(lt: LoopThread, tmp_path: Path) -> None:
    path = tmp_path / "qemu.sock"
    dev = EchoDevice()
    client = VhostUserClient(path, dev, retry_interval=0.05, loop=lt.loop)
    lt.call(client.start)
    time.sleep(0.15)        # nobody listens yet: retries
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(5)
    for _ in range(2):
        conn, _ = listener.accept()
        fe = VhostUserFrontend.from_socket(conn)
        assert fe.get_queue_num() == 2
        fe.close()
    lt.call(client.close)
    listener.close()
    assert client.connections == 2


def test_probe_prints_features_and_config(lt: LoopThread, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.sock"
    server = VhostUserServer(path, EchoDevice(), loop=lt.loop)
    lt.call(server.start)
    try:
        assert probe.main([str(path)]) == 0
    finally:
        lt.call(server.close)
    out = capsys.readouterr().out
    assert "VERSION_1" in out and "EVENT_IDX" in out and "PROTOCOL_FEATURES" in out
    assert "REPLY_ACK" in out and "CONFIGURE_MEM_SLOTS" in out
    assert "queues" in out and "2" in out
    assert "00 01 02 03" in out


def test_probe_explains_a_socket_that_is_not_vhost_user(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert probe.main([str(tmp_path / "missing.sock")]) == 1
    assert "not a usable vhost-user back-end" in capsys.readouterr().err
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(path))
    silent.listen(1)
    try:
        assert probe.main([str(path), "--timeout", "0.2"]) == 1
    finally:
        silent.close()
    assert "no message within" in capsys.readouterr().err


def test_probe_decodes_blk_config() -> None:
    import struct
    cfg = struct.pack("<QII", 2048, 0, 126) + bytes(8) + struct.pack("<I", 512) + bytes(48)
    assert probe.guess_kind((1 << 6) | (1 << 9), cfg) == "blk"
    rows = dict(probe.decode_config("blk", cfg))
    assert rows["capacity"].startswith("2048 sectors")
    assert probe.guess_kind((1 << 15) | (1 << 16), None) == "net"


#: The daemon scripts run from the checkout, so ``tests.support`` imports.
ROOT = Path(__file__).resolve().parents[2]

DAEMON = textwrap.dedent("""
    import sys
    from tests.support.vhost_user_harness import EchoDevice
    from vvu_runtime.serve.runner import run
    a, b = EchoDevice(), EchoDevice()
    a.name, b.name = "port a", "port b"
    sys.exit(run([(a, {p1!r}), (b, {p2!r})], program="echo-daemon", log_level="INFO",
                 ready=lambda: print("READY", flush=True)))
""")


def test_daemon_runs_until_sigterm_and_removes_sockets(tmp_path: Path) -> None:
    p1, p2 = tmp_path / "a.sock", tmp_path / "b.sock"
    script = DAEMON.format(p1=str(p1), p2=str(p2))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        with VhostUserFrontend.connect(p1) as fe:
            assert fe.get_queue_num() == 2
        with VhostUserFrontend.connect(p2) as fe:
            fe.negotiate()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert not p1.exists() and not p2.exists()
    assert "port a: listening on" in err and "port b" in err
    assert "echo-daemon: INFO" in err


def test_daemon_reports_an_unusable_socket_path(tmp_path: Path) -> None:
    bad = tmp_path / "no-such-dir" / "x.sock"
    script = DAEMON.format(p1=str(bad),
                           p2=str(tmp_path / "ok.sock"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on {bad}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ok.sock").exists()


def test_daemon_sigint_is_a_clean_exit(tmp_path: Path) -> None:
    p1, p2 = tmp_path / "a.sock", tmp_path / "b.sock"
    script = DAEMON.format(p1=str(p1), p2=str(p2))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not p1.exists()
