"""virtio-vhost-user end to end: real QEMU on both sides, under whatever
accelerator the host has (TCG here).

    consumer VMs (stock QEMU: -netdev vhost-user / vhost-user-blk-pci, busybox)
      -> vvu-devd on the host (one VVU device per consumer)
      -> appliance VM (QEMU >= 10.1, vfio-user-pci; mkosi Debian image)
      -> vvu-switch / vvu-blk --vvu inside it (vfio-pci behind intel-iommu)

* switch appliance: two consumers on two VVU devices of one vvu-devd, one
  ``vvu-switch --vvu a=ADDR1 --vvu b=ADDR2`` in the vswitch appliance: they ping,
  and a 1 MiB random file crosses each way with busybox nc (sha256 compared);
* storage appliance: a consumer writes records with O_DIRECT + fsync, printing
  ``ACK i`` only once each completed; mid-stream ``vvu-blk`` inside the
  appliance is SIGKILLed and started again, the consumer's QEMU reconnects, and
  every acknowledged record is in the appliance's image (read there) with no
  error reported and no VM restarted;
* consumer reboot: the consumer reboots (guest ``reboot -f``, then QMP
  ``system_reset``) while attached to the storage appliance, reads back what it
  wrote before and writes more that lands in the appliance's image; appliance,
  vvu-devd and vvu-blk keep running throughout;
* each appliance rig is torn down by a last test that checks nothing is left:
  no vvu-devd or QEMU process, no socket, no RAM or runtime file.

One appliance boot per appliance for the module (each costs ~45-90 s under TCG).
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import signal
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
    net_consumer,
    record,
    records_script,
    send_file,
    shell,
    vvu_functions,
    wait,
    wait_ping,
)
from vvu_runtime.launch.appliance import ApplianceMachine, build_appliance
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.process import ApplianceProcess, DeviceModelProcess
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

FILE_KIB = 1024
DISK_MIB = 64
IMAGE = "/root/disk.raw"  # the disk image inside the storage appliance
RECORDS = 150


@dataclass
class Rig:
    """vvu-devd + one appliance VM + the backend inside it; closed by the last test."""

    workdir: Path
    devd: DeviceModelProcess
    vm: ApplianceMachine
    backend: ApplianceProcess
    functions: list[str]
    stack: contextlib.ExitStack
    pids: list[int | None] = field(default_factory=list)

    def sh(self, cmd: str, timeout: float = 120.0) -> str:
        return self.vm.console.check(cmd, timeout=timeout)

    def close(self) -> None:
        self.stack.close()


def _start(toolchain: Toolchain, appliance_name: str, names: tuple[str, ...],
           workdir: Path, stack: contextlib.ExitStack
           ) -> tuple[DeviceModelProcess, ApplianceMachine]:
    """vvu-devd with one device per name, then the appliance on its vfio-user sockets."""
    image = build_appliance(toolchain, appliance_name)
    devd = DeviceModelProcess(links(workdir, *names), workdir / "devd.log",
                              ram_mib=CONSUMER_MIB)
    stack.enter_context(devd)
    vm = stack.enter_context(appliance(toolchain, image,
                                       [link.vfio_socket for link in devd.links]))
    return devd, vm


def _assert_clean_logs(rig: Rig) -> None:
    assert "Traceback" not in rig.devd.output(), rig.devd.output()[-3000:]
    for log in rig.backend.logs():
        out = rig.backend.output(log)
        assert "Traceback" not in out, out[-3000:]


def _assert_nothing_left(rig: Rig) -> None:
    rig.close()
    assert not rig.devd.is_running() and rig.devd.proc is not None
    assert rig.devd.proc.returncode == 0, rig.devd.output()[-2000:]
    assert not rig.vm.is_running()
    left = leftovers(rig.workdir, rig.pids)
    assert left == [], left


# --------------------------------------------------------------------------
# The switch appliance
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def switch_rig(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("e2e-switch")
    with contextlib.ExitStack() as stack:
        devd, vm = _start(toolchain, "vswitch", ("a", "b"), workdir, stack)
        functions = vvu_functions(vm)
        assert len(functions) == 2, functions
        switch = ApplianceProcess(
            shell(vm), ["vvu-switch", "--vvu", f"a={functions[0]}", "--vvu", f"b={functions[1]}"],
            "/root/vvu-switch", ready="ready for a front-end")
        switch.start()
        switch.wait_for("ready for a front-end", 120, count=2)
        stack.callback(switch.stop)
        rig = Rig(workdir, devd, vm, switch, functions, stack.pop_all(),
                  [devd.pid, vm.qemu_pid])
    try:
        yield rig
    finally:
        rig.close()


def test_two_consumers_ping_and_exchange_files_through_the_switch_appliance(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, switch_rig: Rig,
) -> None:
    rig = switch_rig
    a_link, b_link = rig.devd.links
    with contextlib.ExitStack() as stack:
        vm_a = net_consumer(toolchain, consumer_assets, a_link, "10.0.0.1", "52:54:00:00:00:01",
                            name="consumer-a")
        vm_b = net_consumer(toolchain, consumer_assets, b_link, "10.0.0.2", "52:54:00:00:00:02",
                            name="consumer-b")
        boot_all(stack, [vm_a, vm_b])
        rig.pids += [vm_a.qemu_pid, vm_b.qemu_pid]
        a, b = vm_a.console, vm_b.console
        wait_ping(a, "10.0.0.2")
        out = a.check("ping -c 3 -W 5 10.0.0.2")
        assert " 0% packet loss" in out, out
        out = b.check("ping -c 3 -W 5 10.0.0.1")
        assert " 0% packet loss" in out, out

        sent_ab, secs_ab = send_file(a, b, "10.0.0.2", FILE_KIB)
        sent_ba, secs_ba = send_file(b, a, "10.0.0.1", FILE_KIB, port=5001)
        assert sent_ab != sent_ba  # two different random files
        print(f"\n1 MiB a->b in {secs_ab:.1f} s, b->a in {secs_ba:.1f} s")

        counters = rig.devd.counters()
        for name in ("a", "b"):
            c = counters[name]
            assert c.columns["status"].startswith("BACKEND_UP|FRONTEND_UP"), c.columns
            # Frames went both ways through this link: kicks in, doorbells out.
            assert c.kicks > 10 and c.doorbells > 10, c.columns
            assert c["errors"] == 0 and c["resets"] == 0, c.columns
        assert vm_a.is_running() and vm_b.is_running()
    log = rig.backend.output()
    assert "Traceback" not in log, log[-3000:]
    assert rig.backend.is_running()


def test_switch_rig_leaves_nothing_behind(switch_rig: Rig) -> None:
    """Last of the switch tests: the rig goes down for good and leaves nothing."""
    rig = switch_rig
    _assert_clean_logs(rig)
    rig.backend.stop()
    out = rig.backend.output()
    assert "stopped" in out and "Traceback" not in out, out[-3000:]
    _assert_nothing_left(rig)
    final = rig.devd.last_counters()
    assert final is not None and final["a"].kicks > 0 and final["b"].doorbells > 0


# --------------------------------------------------------------------------
# The storage appliance
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_rig(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("e2e-storage")
    with contextlib.ExitStack() as stack:
        devd, vm = _start(toolchain, "storage", ("disk",), workdir, stack)
        functions = vvu_functions(vm)
        assert len(functions) == 1, functions
        vm.console.check(f"truncate -s {DISK_MIB}M {IMAGE}")
        blk = ApplianceProcess(
            shell(vm), ["vvu-blk", "--vvu", functions[0], "--image", IMAGE],
            "/root/vvu-blk", ready="ready for a front-end")
        blk.start()
        stack.callback(blk.stop)
        rig = Rig(workdir, devd, vm, blk, functions, stack.pop_all(), [devd.pid, vm.qemu_pid])
    try:
        yield rig
    finally:
        rig.close()


def _image_sha256(rig: Rig, offset: int, length: int) -> str:
    """sha256 of ``length`` bytes at ``offset`` of the disk image, read in the appliance."""
    assert offset % 512 == 0 and length % 512 == 0
    return rig.sh(f"dd if={IMAGE} bs=512 skip={offset // 512} count={length // 512} "
                  "2>/dev/null | sha256sum").split()[0]


def _write_pattern(vm: QemuMachine, mib_at: int, mib: int = 1) -> str:
    """``mib`` MiB of random data at ``mib_at`` MiB, O_DIRECT + fsync; its sha256."""
    c = vm.console
    c.check(f"dd if=/dev/urandom of=/tmp/pattern bs=65536 count={16 * mib} 2>/dev/null")
    want = c.check("sha256sum /tmp/pattern").split()[0]
    c.check(f"dd if=/tmp/pattern of=/dev/vda bs=65536 seek={16 * mib_at} oflag=direct "
            "conv=fsync 2>/dev/null", timeout=300)
    return want


def _read_sha256(vm: QemuMachine, mib_at: int, mib: int = 1) -> str:
    return vm.console.check(f"dd if=/dev/vda bs=65536 skip={16 * mib_at} count={16 * mib} "
                            "iflag=direct 2>/dev/null | sha256sum", timeout=300).split()[0]


def _storage_pids(rig: Rig) -> tuple[int | None, int | None]:
    return rig.devd.pid, rig.vm.qemu_pid


@pytest.mark.timeout(1200)
def test_backend_killed_mid_stream_loses_no_acknowledged_write(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, storage_rig: Rig,
) -> None:
    rig = storage_rig
    blk = rig.backend
    pids = _storage_pids(rig)
    runs_before = blk.runs
    with contextlib.ExitStack() as stack:
        vm = blk_consumer(toolchain, consumer_assets, rig.devd.links[0])
        boot_all(stack, [vm])
        consumer_pid = vm.qemu_pid
        rig.pids.append(consumer_pid)
        c = vm.console
        assert c.check("cat /sys/block/vda/size").strip() == str((DISK_MIB << 20) // 512)
        c.check(f"( {records_script(RECORDS)} ) > /dev/null 2>&1 &")
        wait(lambda: int(c.check("cat /tmp/acks 2>/dev/null | wc -l") or 0) >= 25,
             "the consumer's first acknowledged writes", 300)
        # Crash the back-end inside the appliance mid-stream. vfio-pci resets the
        # function when its fd closes, so vvu-devd drops the consumer's connection at
        # once and stops listening until BACKEND_UP; the consumer's QEMU is refused
        # and retries every reconnect-ms (its vCPUs keep running), then connects
        # once the new vvu-blk sets BACKEND_UP.
        killed_at = len(acked(c.check("cat /tmp/acks")))
        assert killed_at < RECORDS
        blk.kill(signal.SIGKILL)
        wait(lambda: "device reset: link down" in rig.devd.run_output(),
             "vvu-devd to see the function reset", 30, every=0.1)
        time.sleep(1.5)
        down = time.monotonic()
        blk.start()
        blk.wait_for("queue 0 started", 300)
        print(f"\nvvu-blk SIGKILLed after {killed_at} ACKs; restarted and serving again "
              f"after {time.monotonic() - down + 1.5:.1f} s")
        wait(lambda: "DONE" in c.check("tail -n 1 /tmp/acks", timeout=300),
             "the consumer's last write", 900, every=2)
        acks = c.check("cat /tmp/acks")
        assert "ERR" not in acks, acks
        assert acked(acks) == list(range(RECORDS)), acks
        assert "restart" not in c.check("dmesg | grep -i virtio_blk || true")
        # Nothing restarted but vvu-blk: same QEMU (consumer, appliance), same vvu-devd.
        assert vm.is_running() and vm.qemu_pid == consumer_pid
    assert _storage_pids(rig) == pids and rig.vm.is_running() and rig.devd.is_running()
    assert blk.runs == runs_before + 1 and len(set(blk.pids)) == len(blk.pids)
    # Every acknowledged record is in the appliance's image, read inside the appliance.
    want = hashlib.sha256(b"".join(record(i) for i in range(RECORDS))).hexdigest()
    got = _image_sha256(rig, 0, 512 * RECORDS)
    if got != want:
        script = (f"d = open({IMAGE!r}, 'rb').read({512 * RECORDS}); "
                  f"print([i for i in range({RECORDS}) "
                  "if d[512 * i:512 * i + 512] != b'%511d\\n' % i])")
        lost = rig.sh(f"python3 -c {shlex.quote(script)}")
        raise AssertionError(f"acknowledged records missing from the image: {lost}")
    c_now = rig.devd.counters()["disk"]
    assert c_now["conns"] >= 2, c_now.columns  # the consumer reconnected through vvu-devd
    assert c_now["errors"] == 0, c_now.columns


@pytest.mark.timeout(900)
def test_consumer_reboots_and_resumes_on_the_same_appliance(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, storage_rig: Rig,
) -> None:
    rig = storage_rig
    blk = rig.backend
    pids = _storage_pids(rig)
    blk_pid = blk.pid
    with contextlib.ExitStack() as stack:
        vm = blk_consumer(toolchain, consumer_assets, rig.devd.links[0], name="rebooting")
        boot_all(stack, [vm])
        consumer_pid = vm.qemu_pid
        rig.pids.append(consumer_pid)
        starts = blk.output().count("queue 0 started")
        before = _write_pattern(vm, 8)
        assert _image_sha256(rig, 8 << 20, 1 << 20) == before
        # QemuMachine runs QEMU with -no-reboot: make a reset reset, not exit.
        vm.qmp("set-action", reboot="reset")

        # 1. The guest reboots itself (kernel reboot: the device is reset, vhost
        #    stops the rings and starts them again when the new kernel drives it).
        vm.console.write("reboot -f\n")
        vm.wait_for_boot()
        assert _read_sha256(vm, 8) == before
        after_reboot = _write_pattern(vm, 12)
        assert _image_sha256(rig, 12 << 20, 1 << 20) == after_reboot

        # 2. A reset from outside (QMP system_reset), as a hypervisor would do it.
        vm.qmp("system_reset")
        vm.wait_for_boot()
        assert _read_sha256(vm, 8) == before
        assert _read_sha256(vm, 12) == after_reboot
        after_reset = _write_pattern(vm, 16)
        assert _image_sha256(rig, 16 << 20, 1 << 20) == after_reset

        assert vm.is_running() and vm.qemu_pid == consumer_pid  # reset, never restarted
        # The same vvu-blk saw the rings stop and start again for each boot.
        assert blk.output().count("queue 0 started") >= starts + 2, blk.output()[-3000:]
    assert blk.pid == blk_pid and blk.is_running()
    assert _storage_pids(rig) == pids and rig.vm.is_running() and rig.devd.is_running()
    assert rig.devd.counters()["disk"]["errors"] == 0


def test_storage_rig_leaves_nothing_behind(storage_rig: Rig) -> None:
    """Last test of the module: the storage rig goes down for good, leaving nothing."""
    rig = storage_rig
    _assert_clean_logs(rig)
    rig.backend.stop()
    out = rig.backend.output()
    assert "stopped" in out and "Traceback" not in out, out[-3000:]
    _assert_nothing_left(rig)
