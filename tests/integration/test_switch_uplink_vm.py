"""vvu-switch's TAP uplink with a real consumer guest: files cross between the
guest and the host's own network stack in both directions, sha256-checked.

The switch runs in a private network namespace (``unshare --net``) so the TAP
and its address never touch the machine's real network; the "host" side of the
test runs in that namespace too (``nsenter``). Both directions use the kernels'
TSO: the guest sends 64 KiB segments that go to the TAP as they are, and the
host kernel sends 64 KiB segments (TUNSETOFFLOAD) that reach the guest whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.render import NetDevice, render_devices
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

TAP = "vvuup0"
HOST_IP = "10.0.7.254"
VM_IP = "10.0.7.1"
FILE_BYTES = 3 << 20

# A background busybox nc must not read the console: a background read of the
# terminal stops it (SIGTTIN), it stops reading the socket too, and the sender
# sits on a zero window. A pipe that never delivers keeps its stdin busy.
_NC_LISTEN = "(sleep 100000 | nc -l -p {port} > {out}) >/dev/null 2>&1 &"

# Runs in the namespace: receive one TCP connection on a port, print its sha256.
_RECEIVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

# Runs in the namespace: connect and send a file.
_SENDER = """
import socket, sys, time
data = open(sys.argv[3], "rb").read()
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        time.sleep(0.2)
c.sendall(data); c.close()
"""


def _need_netns() -> None:
    missing = None
    if os.geteuid() != 0:
        missing = "root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for a TAP in a network namespace"
    elif not os.path.exists("/dev/net/tun"):
        missing = "/dev/net/tun"
    elif not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        missing = "unshare(1), nsenter(1) and ip(8)"
    elif subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode:
        missing = "network namespaces"
    if missing:
        why = f"host capability missing: {missing}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


class NetnsSwitch:
    """vvu-switch with one port and a TAP uplink, alone in a network namespace."""

    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "vm1.sock"
        self.status = workdir / "status.json"
        self.log = workdir / "vvu-switch.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--net", sys.executable, "-m", "vvu_runtime.serve.switch",
                 "--port", f"vm1={self.sock}", "--uplink", TAP,
                 "--status-file", str(self.status)],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"vvu-switch did not start:\n{self.output()}")
            time.sleep(0.05)
        self.ns = ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net"]
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", TAP, "up"],
                    ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP]):
            subprocess.run([*self.ns, *cmd], check=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def run(self, *argv: str, **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen([*self.ns, *argv], stdout=subprocess.PIPE, text=True,
                                **kw)  # type: ignore[call-overload]

    def counters(self) -> dict[str, dict[str, object]]:
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        ports: dict[str, dict[str, object]] = json.loads(self.status.read_text())["ports"]
        return ports

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def netns_switch(tmp_path: Path) -> Iterator[NetnsSwitch]:
    _need_netns()
    sw = NetnsSwitch(tmp_path)
    try:
        yield sw
    finally:
        sw.stop()


def test_files_cross_the_uplink_both_ways(toolchain: Toolchain,
                                          consumer_assets: ConsumerAssets,
                                          netns_switch: NetnsSwitch, tmp_path: Path) -> None:
    sw = netns_switch
    vm = QemuMachine(
        toolchain, name="uplink-vm", kernel=consumer_assets.kernel,
        initrd=consumer_assets.initrd, append=f"vvu.ip={VM_IP}/24",
        args=render_devices(NetDevice("net0", sw.sock, "52:54:00:00:07:01")))
    with vm:
        con = vm.console
        deadline = time.monotonic() + 60
        while con.run(f"ping -c 1 -W 2 {HOST_IP}")[0] != 0:
            assert time.monotonic() < deadline, f"host unreachable\n{sw.output()[-3000:]}"

        # guest -> host
        rx = sw.run(sys.executable, "-c", _RECEIVER, HOST_IP, "6001")
        assert rx.stdout is not None and rx.stdout.readline().strip() == "listening"
        con.check(f"dd if=/dev/urandom of=/tmp/up bs=1024 count={FILE_BYTES // 1024} "
                  "2>/dev/null")
        want = con.check("sha256sum /tmp/up").split()[0]
        con.check(f"nc -w 5 {HOST_IP} 6001 < /tmp/up", timeout=300)
        out, _ = rx.communicate(timeout=120)
        size, got = out.split()
        assert (int(size), got) == (FILE_BYTES, want)

        # host -> guest
        payload = os.urandom(FILE_BYTES)
        src = tmp_path / "down"
        src.write_bytes(payload)
        con.check(f"rm -f /tmp/down; {_NC_LISTEN.format(port=6002, out='/tmp/down')}")
        tx = sw.run(sys.executable, "-c", _SENDER, VM_IP, "6002", str(src))
        assert tx.wait(120) == 0
        deadline = time.monotonic() + 120
        while int(con.check("wc -c < /tmp/down").strip() or 0) < FILE_BYTES:
            assert time.monotonic() < deadline, \
                f"the file did not arrive in full: {sw.counters()}\n{sw.output()[-3000:]}"
            time.sleep(0.5)
        assert con.check("sha256sum /tmp/down").split()[0] == \
            hashlib.sha256(payload).hexdigest()

        c = sw.counters()
        up, port = c[TAP], c["vm1"]
        # The guest's RX ring may run dry while a TCG vCPU lags the host's sender:
        # that backpressure drop is what a NIC does too (TCP resends, the hashes
        # above prove it).  Any other drop reason on either port is a bug.
        assert up["drops"] == {}, c
        assert set(port["drops"]) <= {"rx_ring_full"}, c  # type: ignore[call-overload]
        # Both kernels' TSO crossed whole: GSO super-frames came in on both ports
        # and none had to be cut up (how many depends on the TCP stacks' pace).
        assert int(up["in_gso"]) > 0 and int(port["in_gso"]) > 0, c  # type: ignore[call-overload]
        assert port["sw_offload"] == 0 and up["sw_offload"] == 0
    assert sw.stop() == 0, sw.output()[-2000:]
    assert not sw.sock.exists()
