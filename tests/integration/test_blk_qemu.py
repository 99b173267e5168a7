"""vvu-blk under real front-ends: a QEMU consumer VM (vhost-user-blk-pci) and
QEMU's blkio driver (libblkio virtio-blk-vhost-user, through qemu-io, no VM)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.render import BlkDevice, render_devices
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = pytest.mark.integration

IMAGE_MIB = 64

#: vvu-blk with a slow disk (every request takes 50 ms), so that a SIGKILL lands
#: while requests are popped but not completed: the inflight area must bring them back.
SLOW_RUNNER = """
import os, sys, time
from vvu_runtime.backends.blk import device
from vvu_runtime.serve import blk as cli

MARK = os.environ["VVU_TEST_MARK"]

class SlowBlkDevice(device.BlkDevice):
    def serve(self, chain):
        with open(MARK, "w") as f:  # the test kills us while this says "busy"
            f.write("busy")
        time.sleep(0.05)
        written = super().serve(chain)
        with open(MARK, "w") as f:
            f.write("idle")
        return written

cli.BlkDevice = SlowBlkDevice
sys.exit(cli.main(sys.argv[1:]))
"""


class VvuBlk:
    """A vvu-blk process serving ``image`` on ``socket`` (restartable)."""

    def __init__(self, image: Path, socket: Path, *args: str, slow: bool = False) -> None:
        self.runner = ["-c", SLOW_RUNNER] if slow else ["-m", "vvu_runtime.serve.blk"]
        self.image = image
        self.socket = socket
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.logs: list[str] = []

    @property
    def mark(self) -> Path:
        """Where the slow runner says whether it is inside a request."""
        return self.socket.with_suffix(".mark")

    def start(self) -> VvuBlk:
        log = self.socket.with_suffix(f".log{len(self.logs)}")
        self.logs.append(str(log))
        with open(log, "w") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, *self.runner, "--socket",
                 str(self.socket), "--image", str(self.image), *self.args],
                stdout=logf, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "VVU_TEST_MARK": str(self.mark)})
        # The socket file appears at bind(), before listen(): wait for the log line
        # the daemon prints once it really listens, or QEMU may be refused.
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vvu-blk did not listen:\n{self.output()}")
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return "".join(Path(p).read_text(errors="replace") for p in self.logs)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"vvu-blk ignored {sig.name}:\n{self.output()}") from None


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(IMAGE_MIB << 20)
    return path


@pytest.fixture
def blk(image: Path, tmp_path: Path) -> Iterator[VvuBlk]:
    server = VvuBlk(image, tmp_path / "blk.sock", "--serial", "vvu-it-0", "--queues", "2")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def consumer(toolchain: Toolchain, assets: ConsumerAssets, sock: Path, *,
             reconnect: bool = False, smp: int = 1, queues: int = 2,
             packed: bool = False) -> QemuMachine:
    return QemuMachine(
        toolchain, name="blk-consumer", kernel=assets.kernel, initrd=assets.initrd, smp=smp,
        args=render_devices(BlkDevice("blk0", sock, reconnect_ms=300 if reconnect else 0,
                                      queues=queues, packed=packed)))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_consumer_writes_flushes_and_reads_back(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, blk: VvuBlk, image: Path
) -> None:
    with consumer(toolchain, consumer_assets, blk.socket, smp=2) as vm:
        c = vm.console
        assert c.check("cat /sys/block/vda/size").strip() == str((IMAGE_MIB << 20) // 512)
        assert c.check("cat /sys/block/vda/serial").strip() == "vvu-it-0"
        assert c.check("cat /sys/block/vda/ro").strip() == "0"
        assert c.check("ls /sys/block/vda/mq").split() == ["0", "1"]  # two queues in use
        # A volatile write cache, so the guest sends FLUSH on fsync.
        assert c.check("cat /sys/block/vda/queue/write_cache").strip() == "write back"

        # 1 MiB of random data at 4 MiB, written with fsync (WRITE + FLUSH).
        c.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null")
        guest_md5 = c.check("md5sum /tmp/pattern").split()[0]
        c.check("dd if=/tmp/pattern of=/dev/vda bs=4096 seek=1024 conv=fsync 2>/dev/null")
        # Durable on the host once FLUSH completed: the image file holds it.
        with image.open("rb") as f:
            f.seek(4 << 20)
            assert md5(f.read(1 << 20)) == guest_md5
        # Read back around the guest's page cache.
        back = c.check("dd if=/dev/vda bs=4096 skip=1024 count=256 iflag=direct 2>/dev/null"
                       " | md5sum").split()[0]
        assert back == guest_md5
        # Host writes are visible to the guest's direct reads too.
        with image.open("r+b") as f:
            f.seek(8 << 20)
            f.write(b"\x5a" * 4096)
        host = c.check("dd if=/dev/vda bs=4096 skip=2048 count=1 iflag=direct 2>/dev/null"
                       " | md5sum").split()[0]
        assert host == md5(b"\x5a" * 4096)

        # DISCARD from the guest.
        assert int(c.check("cat /sys/block/vda/queue/discard_max_bytes")) > 0
        c.check("blkdiscard -o 4194304 -l 524288 /dev/vda")
        with image.open("rb") as f:
            f.seek(4 << 20)
            assert f.read(512 << 10) == bytes(512 << 10)  # punched: reads zeroes
            f.seek((4 << 20) + (512 << 10))
            assert md5(f.read(512 << 10)) != md5(bytes(512 << 10))  # neighbour kept
        # (busybox has no way to send WRITE_ZEROES; the libblkio test below does.)

        # SIGTERM while the VM is still connected: a clean stop, no socket left.
        assert blk.stop() == 0, blk.output()
        assert not blk.socket.exists()
    out = blk.output()
    assert "Traceback" not in out
    assert "disk disk.raw" in out


def test_consumer_on_packed_rings(toolchain: Toolchain, consumer_assets: ConsumerAssets,
                                  blk: VvuBlk, image: Path) -> None:
    with consumer(toolchain, consumer_assets, blk.socket, packed=True) as vm:
        c = vm.console
        c.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null")
        want = c.check("md5sum /tmp/pattern").split()[0]
        c.check("dd if=/tmp/pattern of=/dev/vda bs=4096 seek=10 oflag=direct conv=fsync "
                "2>/dev/null")
        got = c.check("dd if=/dev/vda bs=4096 skip=10 count=64 iflag=direct 2>/dev/null"
                      " | md5sum").split()[0]
        assert got == want
    with image.open("rb") as f:
        f.seek(10 * 4096)
        assert md5(f.read(64 * 4096)) == want


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_busy_poll_serves_qd1_and_wakes_again_after_idle(
        toolchain: Toolchain, consumer_assets: ConsumerAssets, image: Path, tmp_path: Path,
        packed: bool) -> None:
    """--busy-poll: requests submitted within the window are taken with the guest's
    kicks off (EVENT_IDX on split rings, the event suppression area on packed ones);
    after an idle pause longer than the window, the next request must still wake
    the back-end: kicks were turned back on."""
    server = VvuBlk(image, tmp_path / "poll.sock", "--busy-poll", "20000")
    server.start()
    try:
        with consumer(toolchain, consumer_assets, server.socket, packed=packed) as vm:
            c = vm.console
            c.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=128 2>/dev/null")
            want = c.check("md5sum /tmp/pattern").split()[0]
            for round_ in range(3):
                # one 4 KiB write at a time (queue depth 1), then as many reads
                c.check(f"dd if=/tmp/pattern of=/dev/vda bs=4096 seek={round_ * 256} "
                        "oflag=direct 2>/dev/null", timeout=120)
                got = c.check(f"dd if=/dev/vda bs=4096 skip={round_ * 256} count=128 "
                              "iflag=direct 2>/dev/null | md5sum", timeout=120).split()[0]
                assert got == want, f"round {round_}"
                time.sleep(0.5)  # idle for 25 windows: the back-end sleeps, kicks on
        assert server.stop() == 0, server.output()
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
    with image.open("rb") as f:
        f.seek(2 * 256 * 4096)
        assert md5(f.read(128 * 4096)) == want
    assert "Traceback" not in server.output()


def test_read_only_disk(toolchain: Toolchain, consumer_assets: ConsumerAssets,
                        image: Path, tmp_path: Path) -> None:
    with image.open("r+b") as f:
        f.write(b"\xc3" * 4096)
    server = VvuBlk(image, tmp_path / "ro.sock", "--read-only").start()
    try:
        with consumer(toolchain, consumer_assets, server.socket, queues=1) as vm:
            c = vm.console
            assert c.check("cat /sys/block/vda/ro").strip() == "1"
            assert c.check("dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | md5sum"
                           ).split()[0] == md5(b"\xc3" * 4096)
            rc, _ = c.run("dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1")
            assert rc != 0
        assert image.read_bytes()[:4096] == b"\xc3" * 4096
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("slow", [False, True], ids=["idle-kill", "kill-inflight"])
def test_consumer_survives_backend_restart_mid_io(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, image: Path, tmp_path: Path,
    slow: bool
) -> None:
    """vvu-blk is killed (SIGKILL) and restarted while the guest writes; QEMU
    reconnects; every write the guest saw acknowledged is in the image."""
    records = 120 if slow else 300
    blk = VvuBlk(image, tmp_path / "blk.sock", "--queues", "2", slow=slow).start()
    with consumer(toolchain, consumer_assets, blk.socket, reconnect=True) as vm:
        c = vm.console
        # Record i: 512 bytes of "i" at sector i, each written with O_DIRECT + fsync;
        # "ACK i" is printed only once the write (and its FLUSH) completed.
        script = (
            f"i=0; while [ $i -lt {records} ]; do "
            "printf '%511d\\n' $i > /tmp/rec; "
            "dd if=/tmp/rec of=/dev/vda bs=512 seek=$i oflag=direct conv=fsync 2>/dev/null "
            "&& echo ACK $i >> /tmp/acks || echo ERR $i >> /tmp/acks; "
            "i=$((i+1)); done; echo DONE >> /tmp/acks"
        )
        c.check(f"( {script} ) > /dev/null 2>&1 &")
        # Let some writes through, then crash the back-end mid-stream.
        deadline = time.monotonic() + 120
        while int(c.check("cat /tmp/acks 2>/dev/null | wc -l") or 0) < 30:
            assert time.monotonic() < deadline, "the guest does not write"
            time.sleep(0.5)
        if slow:  # kill it in the middle of a request: popped, written, not completed
            while blk.mark.read_text() != "busy":
                assert time.monotonic() < deadline, "vvu-blk never busy"
                time.sleep(0.002)
        blk.stop(signal.SIGKILL)
        time.sleep(1.5)  # the guest's writes now wait in the ring
        blk.start()
        deadline = time.monotonic() + 240
        while "DONE" not in c.check("tail -n 1 /tmp/acks"):
            assert time.monotonic() < deadline, c.check("tail -n 5 /tmp/acks")
            time.sleep(1)
        acks = c.check("cat /tmp/acks")
        assert "ERR" not in acks, acks
        acked = [int(n) for n in re.findall(r"ACK (\d+)", acks)]
        assert acked == list(range(records))
        assert "restart" not in c.check("dmesg | grep -i virtio_blk || true")
    # The second vvu-blk really served the reconnected consumer.
    restarted = Path(blk.logs[1]).read_text()
    assert len(blk.logs) == 2 and "queue 0 started" in restarted
    if slow:  # the killed process held a request: the new one got it back from inflight
        assert "resubmitting" in restarted, restarted
    data = image.read_bytes()
    for i in acked:
        assert data[512 * i:512 * (i + 1)] == (b"%511d\n" % i), f"record {i} lost"
    assert blk.stop() == 0


@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_qemu_io_through_libblkio(toolchain: Toolchain, image: Path, tmp_path: Path,
                                  mode: str) -> None:
    """A second, independent front-end: libblkio's virtio-blk-vhost-user driver."""
    blk = VvuBlk(image, tmp_path / "blk.sock", *(["--direct"] if mode == "direct" else []))
    blk.start()
    opts = f"driver=virtio-blk-vhost-user,path={blk.socket},cache.direct=on"
    commands = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "flush",
        "write -P 0xcd 2M 64k",
        "write -z 2M 4k",
        "read -P 0 2M 4k",
        "read -P 0xcd 2101248 60k",
        "write -P 0xef 3M 64k",
        "write -z -u 3M 64k",
        "read -P 0 3M 64k",
        "discard 4M 1M",
    ]
    argv = ["qemu-io", "--image-opts", opts]
    for cmd in commands:
        argv += ["-c", cmd]
    res = toolchain.run(argv, check=False, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Pattern verification failed" not in out and "failed" not in out.lower(), out
    data = image.read_bytes()
    assert data[:1 << 20] == b"\xab" * (1 << 20)
    assert data[2 << 20:(2 << 20) + 4096] == bytes(4096)
    assert data[(2 << 20) + 4096:(2 << 20) + (64 << 10)] == b"\xcd" * (60 << 10)
    assert data[3 << 20:(3 << 20) + (64 << 10)] == bytes(64 << 10)
    # Out of range: the driver sees an I/O error, vvu-blk logs it and goes on.
    res = toolchain.run(["qemu-io", "--image-opts", opts, "-c",
                         f"read {IMAGE_MIB << 20} 4k"], check=False, timeout=60)
    assert blk.proc is not None and blk.proc.poll() is None
    assert blk.stop() == 0
    assert not blk.socket.exists()
    assert os.path.getsize(image) == IMAGE_MIB << 20
