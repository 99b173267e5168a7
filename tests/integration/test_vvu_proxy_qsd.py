"""An unmodified back-end inside the storage appliance: qemu-storage-daemon behind
vvu-proxy, real QEMU on both sides (TCG here).

    consumer VM (stock QEMU vhost-user-blk-pci, busybox)
      -> vvu-devd on the host (one VVU device)
      -> storage appliance VM (vfio-user-pci; mkosi Debian image)
      -> vvu-proxy --link ADDR=/run/qsd.sock --exec ADDR='qemu-storage-daemon ...'
      -> qemu-storage-daemon's vhost-user-blk export on that socket (libvhost-user)

* the consumer writes records with O_DIRECT + fsync, ``ACK i`` only once each
  completed; mid-stream qemu-storage-daemon is SIGKILLed inside the appliance;
  vvu-proxy resets the link, restarts it and hands it the inflight area it kept;
  the consumer's QEMU reconnects; every acknowledged record is in the image
  (read in the appliance) and nothing reported an error;
* 1 MiB random patterns written by the consumer read back with the same
  sha256 in the consumer and in the appliance's image;
* the rig is torn down by a last test that checks nothing is left.

One appliance boot for the module.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.vvu_rig import (
    CONSUMER_MIB,
    acked,
    appliance,
    blk_consumer,
    boot_all,
    leftovers,
    links,
    record,
    records_script,
    shell,
    vvu_functions,
    wait,
)
from vvu_runtime.launch.appliance import ApplianceMachine, build_appliance
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.process import ApplianceProcess, DeviceModelProcess
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

DISK_MIB = 64
IMAGE = "/root/disk.raw"
SOCKET = "/run/qsd.sock"
RECORDS = 120


def qsd_command(image: str, socket: str) -> list[str]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``socket``."""
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", ("type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,"
                         f"num-queues=1,addr.type=unix,addr.path={socket}")]


@dataclass
class Rig:
    workdir: Path
    devd: DeviceModelProcess
    vm: ApplianceMachine
    proxy: ApplianceProcess
    stack: contextlib.ExitStack
    pids: list[int | None] = field(default_factory=list)

    def sh(self, cmd: str, timeout: float = 120.0) -> str:
        return self.vm.console.check(cmd, timeout=timeout)

    def qsd_pids(self) -> list[int]:
        return [int(p) for p in self.sh("pidof qemu-storage-daemon || true").split()]


@pytest.fixture(scope="module")
def rig(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("proxy-qsd")
    with contextlib.ExitStack() as stack:
        image = build_appliance(toolchain, "storage")
        devd = stack.enter_context(DeviceModelProcess(links(workdir, "disk"),
                                                      workdir / "devd.log",
                                                      ram_mib=CONSUMER_MIB))
        vm = stack.enter_context(appliance(toolchain, image,
                                           [link.vfio_socket for link in devd.links]))
        vm.console.check("command -v qemu-storage-daemon vvu-proxy")
        (function,) = vvu_functions(vm)
        vm.console.check(f"truncate -s {DISK_MIB}M {IMAGE}")
        proxy = ApplianceProcess(
            shell(vm), ["vvu-proxy", "--link", f"{function}={SOCKET}",
                        "--exec", f"{function}={shlex.join(qsd_command(IMAGE, SOCKET))}"],
            "/root/vvu-proxy", ready="ready for a front-end")
        proxy.start()
        stack.callback(proxy.stop)
        the_rig = Rig(workdir, devd, vm, proxy, stack.pop_all(), [devd.pid, vm.qemu_pid])
    try:
        yield the_rig
    finally:
        the_rig.stack.close()


def _image_sha256(rig: Rig, offset: int, length: int) -> str:
    return rig.sh(f"dd if={IMAGE} bs=512 skip={offset // 512} count={length // 512} "
                  "2>/dev/null | sha256sum").split()[0]


def _write_pattern(vm: QemuMachine, mib_at: int) -> str:
    c = vm.console
    c.check("dd if=/dev/urandom of=/tmp/pattern bs=65536 count=16 2>/dev/null")
    want = c.check("sha256sum /tmp/pattern").split()[0]
    c.check(f"dd if=/tmp/pattern of=/dev/vda bs=65536 seek={16 * mib_at} oflag=direct "
            "conv=fsync 2>/dev/null", timeout=300)
    return want


@pytest.mark.timeout(1500)
def test_qsd_behind_the_proxy_survives_a_kill_mid_io(
        toolchain: Toolchain, consumer_assets: ConsumerAssets, rig: Rig) -> None:
    with contextlib.ExitStack() as stack:
        vm = blk_consumer(toolchain, consumer_assets, rig.devd.links[0], name="qsd-consumer")
        boot_all(stack, [vm])
        rig.pids.append(vm.qemu_pid)
        c = vm.console
        assert c.check("cat /sys/block/vda/size").strip() == str((DISK_MIB << 20) // 512)

        # Whole-MiB patterns: the consumer's and the appliance's sha256 agree.
        want = _write_pattern(vm, 8)
        got = c.check("dd if=/dev/vda bs=65536 skip=128 count=16 iflag=direct 2>/dev/null "
                      "| sha256sum", timeout=300).split()[0]
        assert got == want
        assert _image_sha256(rig, 8 << 20, 1 << 20) == want

        # Records, acknowledged one by one; qemu-storage-daemon killed mid-stream.
        c.check(f"( {records_script(RECORDS)} ) > /dev/null 2>&1 &")
        wait(lambda: int(c.check("cat /tmp/acks 2>/dev/null | wc -l") or 0) >= 20,
             "the consumer's first acknowledged writes", 300)
        (qsd,) = rig.qsd_pids()
        killed_at = len(acked(c.check("cat /tmp/acks")))
        assert killed_at < RECORDS
        rig.sh(f"kill -9 {qsd}")
        down = time.monotonic()
        wait(lambda: bool(rig.qsd_pids()) and rig.qsd_pids() != [qsd],
             "vvu-proxy to restart qemu-storage-daemon", 60, every=0.5)
        rig.proxy.wait_for("ready for a front-end", 120, count=2)
        print(f"\nqemu-storage-daemon SIGKILLed after {killed_at} ACKs; the link was "
              f"armed again after {time.monotonic() - down:.1f} s")
        wait(lambda: "DONE" in c.check("tail -n 1 /tmp/acks", timeout=300),
             "the consumer's last write", 900, every=2)
        acks = c.check("cat /tmp/acks")
        assert "ERR" not in acks, acks
        assert acked(acks) == list(range(RECORDS)), acks
        assert vm.is_running()
    wantr = hashlib.sha256(b"".join(record(i) for i in range(RECORDS))).hexdigest()
    assert _image_sha256(rig, 0, 512 * RECORDS) == wantr
    log = rig.proxy.output()
    assert "Traceback" not in log, log[-3000:]
    assert "back-end exited with status -9" in log, log[-3000:]
    # qemu-storage-daemon's export does not offer INFLIGHT_SHMFD (it resubmits from
    # the used idx QEMU restarts the ring at): then the proxy must not make an area.
    offers = re.findall(r"the back-end offers protocol features (0x[0-9a-f]+)", log)
    assert offers, log[-3000:]
    inflight = int(offers[0], 16) >> 12 & 1
    assert ("inflight area" in log) == bool(inflight), log[-3000:]
    print(f"qemu-storage-daemon offers protocol features {offers[0]} "
          f"(INFLIGHT_SHMFD {'yes' if inflight else 'no'})")
    counters = rig.devd.counters()["disk"]
    assert counters["conns"] >= 2 and counters["errors"] == 0, counters.columns


def test_rig_leaves_nothing_behind(rig: Rig) -> None:
    rig.proxy.stop()
    out = rig.proxy.output()
    assert "stopped" in out and "Traceback" not in out, out[-3000:]
    assert rig.qsd_pids() == []  # the supervised back-end went with the proxy
    rig.stack.close()
    assert not rig.devd.is_running() and not rig.vm.is_running()
    left = leftovers(rig.workdir, rig.pids)
    assert left == [], left
