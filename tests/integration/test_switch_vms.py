"""vvu-switch under real QEMU: two stock consumer guests (``-netdev vhost-user`` +
``virtio-net-pci``, shared guest RAM) on two switch ports.

They ping each other, move a file with busybox nc and compare sha256 sums, with
the guests' own TSO and checksum offloads crossing the switch untouched; one
guest goes away and comes back (a new QEMU on the same socket) while the switch
keeps running and the other port keeps its session; SIGTERM ends the switch
cleanly and removes its sockets.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.vvu_rig import wait_ping
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import GuestConsole, QemuMachine
from vvu_runtime.launch.process import BackendProcess
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

FILE_KIB = 2048


@dataclass
class Rig:
    tc: Toolchain
    assets: ConsumerAssets
    workdir: Path
    switch: BackendProcess
    sockets: dict[str, Path]
    status: Path

    def vm(self, name: str, ip: str, mac: str, queues: int = 1) -> QemuMachine:
        """A consumer on port ``name``; ``queues`` > 1: multiqueue virtio-net (one
        vCPU per queue pair, so that the guest enables them all)."""
        mq = f",mq=on,vectors={2 * queues + 2}" if queues > 1 else ""
        return QemuMachine(
            self.tc, name=name, kernel=self.assets.kernel, initrd=self.assets.initrd,
            append=f"vvu.ip={ip}/24", smp=queues,
            args=["-chardev", f"socket,id=net0,path={self.sockets[name]},reconnect-ms=1000",
                  "-netdev", f"vhost-user,id=n0,chardev=net0,queues={queues}",
                  "-device", f"virtio-net-pci,netdev=n0,mac={mac}{mq}"])

    def counters(self) -> dict[str, dict[str, object]]:
        """The switch's per-port counters, fresh (SIGUSR1 rewrites the status file)."""
        before = self.status.stat().st_mtime_ns if self.status.exists() else 0
        self.switch.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.status.exists() and self.status.stat().st_mtime_ns != before:
                break
            time.sleep(0.05)
        ports: dict[str, dict[str, object]] = json.loads(self.status.read_text())["ports"]
        return ports


@pytest.fixture(scope="module")
def rig(toolchain: Toolchain, consumer_assets: ConsumerAssets,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("switch")
    sockets = {n: workdir / f"{n}.sock" for n in ("vm1", "vm2")}
    status = workdir / "status.json"
    switch = BackendProcess(
        "vvu-switch",
        ["--port", f"vm1={sockets['vm1']}", "--port", f"vm2={sockets['vm2']}",
         "--queues", "2", "--status-file", str(status), "--log-level", "INFO"],
        list(sockets.values()), workdir / "vvu-switch.log")
    switch.start()
    try:
        yield Rig(toolchain, consumer_assets, workdir, switch, sockets, status)
    finally:
        switch.stop()


@pytest.fixture(scope="module")
def vm1(rig: Rig) -> Iterator[QemuMachine]:
    with rig.vm("vm1", "10.0.0.1", "52:54:00:00:00:01") as vm:
        yield vm


def _send_file(src: GuestConsole, dst: GuestConsole, dst_ip: str, kib: int) -> str:
    # The listener's stdin is a pipe that never delivers: a background busybox nc
    # reading the console would be stopped (SIGTTIN) and stop reading the socket.
    dst.check("rm -f /tmp/recv; (sleep 100000 | nc -l -p 5000 > /tmp/recv) >/dev/null 2>&1 &")
    src.check(f"dd if=/dev/urandom of=/tmp/send bs=1024 count={kib} 2>/dev/null")
    sent = src.check("sha256sum /tmp/send").split()[0]
    time.sleep(0.5)
    src.check(f"nc -w 5 {dst_ip} 5000 < /tmp/send", timeout=300)
    deadline = time.monotonic() + 120
    while int(dst.check("wc -c < /tmp/recv").strip() or 0) < kib * 1024:
        assert time.monotonic() < deadline, "the file did not arrive in full"
        time.sleep(0.5)
    got = dst.check("sha256sum /tmp/recv").split()[0]
    assert got == sent, f"sent sha256 {sent}, received {got}"
    return sent


def test_ping_and_file_transfer_with_offloads_end_to_end(rig: Rig, vm1: QemuMachine) -> None:
    # vm1 uses one queue pair of the two the switch offers, vm2 both.
    with rig.vm("vm2", "10.0.0.2", "52:54:00:00:00:02", queues=2) as vm2:
        queues = vm2.console.check("ls /sys/class/net/eth0/queues").split()
        assert {"rx-0", "rx-1", "tx-0", "tx-1"} <= set(queues), queues
        wait_ping(vm1.console, "10.0.0.2", timeout=60)
        out = vm1.console.check("ping -c 5 -W 5 10.0.0.2")
        assert " 0% packet loss" in out
        out = vm2.console.check("ping -c 3 -W 5 10.0.0.1")
        assert " 0% packet loss" in out

        # The guests negotiated the offloads the switch offers (logged per port).
        log = rig.switch.output()
        assert re.search(r"port vm1: features .* offloads .*host_tso4.*guest_tso4", log) \
            or re.search(r"port vm1: features .*offloads csum,guest_csum", log), log[-2000:]

        _send_file(vm1.console, vm2.console, "10.0.0.2", FILE_KIB)
        _send_file(vm2.console, vm1.console, "10.0.0.1", FILE_KIB // 4)

        c = rig.counters()
        v1, v2 = c["vm1"], c["vm2"]
        # A guest slow to refill its RX ring costs a dropped frame (TCP resends it);
        # any other drop reason (bad frames, ring errors) is a bug.
        assert set(v1["drops"]) <= {"rx_ring_full"}, c  # type: ignore[arg-type]
        assert set(v2["drops"]) <= {"rx_ring_full"}, c  # type: ignore[arg-type]
        assert v1["state"] == "up 1/2q" and v2["state"] == "up 2/2q", c
        # TSO end to end: the sender's GSO super-frames crossed whole (how many
        # depends on the TCP stack's pace) and nothing was cut up in software.
        assert int(v1["in_bytes"]) > FILE_KIB * 1024  # type: ignore[call-overload]
        assert int(v1["in_gso"]) > 0, c  # type: ignore[call-overload]
        assert v1["sw_offload"] == 0 and v2["sw_offload"] == 0


def test_consumer_reconnects_without_restarting_the_switch(rig: Rig, vm1: QemuMachine) -> None:
    switch_pid = rig.switch.proc.pid if rig.switch.proc else None
    vm1_connections_before = rig.switch.output().count("port vm1 (connection")
    for attempt in range(2):
        with rig.vm("vm2", "10.0.0.2", "52:54:00:00:00:02") as vm2:
            wait_ping(vm2.console, "10.0.0.1", timeout=60)
            out = vm1.console.check("ping -c 3 -W 5 10.0.0.2")
            assert " 0% packet loss" in out, f"attempt {attempt}: {out}"
        # vm2's QEMU is gone: its port went down, vm1's session lives on.
        deadline = time.monotonic() + 10
        while rig.counters()["vm2"]["state"] != "down":
            assert time.monotonic() < deadline, "vm2's port did not go down"
            time.sleep(0.2)
        assert rig.counters()["vm1"]["state"].startswith("up")  # type: ignore[union-attr]
    assert rig.switch.proc is not None and rig.switch.proc.pid == switch_pid
    assert rig.switch.proc.poll() is None
    log = rig.switch.output()
    assert "port vm2 (connection 3)" in log or "port vm2 (connection 2)" in log
    # vm1 kept the session it had: no new "connection" lines for it beyond the first.
    assert "port vm1 (connection 2)" not in log
    assert log.count("port vm1 (connection") >= vm1_connections_before


def test_switch_restart_consumers_reconnect(rig: Rig, vm1: QemuMachine) -> None:
    """The other direction: the switch goes away and comes back; QEMU's
    reconnect-ms brings both guests back onto it and traffic resumes."""
    with rig.vm("vm2", "10.0.0.2", "52:54:00:00:00:02") as vm2:
        wait_ping(vm1.console, "10.0.0.2", timeout=60)
        assert rig.switch.stop() == 0
        rig.switch.start()
        # QEMU retries every second; the rings resume where the guests are.
        wait_ping(vm1.console, "10.0.0.2", timeout=90)
        out = vm2.console.check("ping -c 3 -W 5 10.0.0.1")
        assert " 0% packet loss" in out
        _send_file(vm2.console, vm1.console, "10.0.0.1", 256)


def test_sigterm_stops_cleanly_and_removes_sockets(tmp_path: Path) -> None:
    # A switch of its own: the module's rig keeps running, whatever the test order.
    sockets = {n: tmp_path / f"{n}.sock" for n in ("vm1", "vm2")}
    switch = BackendProcess(
        "vvu-switch", [a for n, s in sockets.items() for a in ("--port", f"{n}={s}")],
        list(sockets.values()), tmp_path / "vvu-switch.log")
    switch.start()
    proc = switch.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    finally:
        with contextlib.suppress(Exception):
            switch.stop()
    assert code == 0, switch.output()[-2000:]
    assert not any(s.exists() for s in sockets.values())
    out = switch.output()
    assert "Traceback" not in out
    assert "port counters" in out  # the final table was logged
