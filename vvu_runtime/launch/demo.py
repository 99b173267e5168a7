"""``vvu-demo``: the backends serving real consumer VMs, end to end.

Starts ``vvu-switch`` with two ports and ``vvu-blk`` on a fresh image, boots
three small consumer VMs (stock QEMU vhost-user front-ends: two
``-netdev vhost-user`` + ``virtio-net-pci``, one ``vhost-user-blk-pci``), and
shows them working: the two net consumers ping each other and move a file
whose checksum is compared; the disk consumer writes a pattern, flushes it,
and the host image is checked to hold it. Prints a table as it goes and the
switch's counters at the end. Everything it started or created is removed on
success, failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from vvu_runtime.console import run_main
from vvu_runtime.launch.initramfs import ConsumerAssets, consumer_assets
from vvu_runtime.launch.machine import MachineError, QemuMachine
from vvu_runtime.launch.process import BackendError, BackendProcess
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError

IMAGE_MIB = 64
FILE_KIB = 1024


class DemoFailure(Exception):
    """A demo step did not show what it should."""


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float


class Report:
    """The demo's progress, one table row per step, printed as each finishes."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        print(f"{'step':<28} {'result':<7} {'time':>7}  detail", flush=True)
        print(f"{'-' * 28} {'-' * 7} {'-' * 7}  {'-' * 40}", flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        detail: list[str] = [""]
        start = time.monotonic()

        def say(text: str) -> None:
            detail[0] = text

        try:
            yield say
        except BaseException as exc:
            self._row(Step(name, False, detail[0] or str(exc).splitlines()[0][:200],
                           time.monotonic() - start))
            raise
        self._row(Step(name, True, detail[0], time.monotonic() - start))

    def _row(self, s: Step) -> None:
        self.steps.append(s)
        print(f"{s.name:<28} {'ok' if s.ok else 'FAILED':<7} {s.seconds:>6.1f}s  {s.detail}",
              flush=True)


def _net_consumer(tc: Toolchain, assets: ConsumerAssets, name: str, sock: Path, ip: str,
                  mac: str) -> QemuMachine:
    return QemuMachine(
        tc, name=name, kernel=assets.kernel, initrd=assets.initrd, append=f"vvu.ip={ip}/24",
        args=["-chardev", f"socket,id=net0,path={sock},reconnect-ms=1000",
              "-netdev", "vhost-user,id=n0,chardev=net0",
              "-device", f"virtio-net-pci,netdev=n0,mac={mac}"])


def _blk_consumer(tc: Toolchain, assets: ConsumerAssets, sock: Path) -> QemuMachine:
    return QemuMachine(
        tc, name="disk-consumer", kernel=assets.kernel, initrd=assets.initrd,
        args=["-chardev", f"socket,id=blk0,path={sock},reconnect-ms=1000",
              "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"])


def run_demo(workdir: Path) -> Report:
    report = Report()
    with ExitStack() as stack:
        with report.step("tool chain") as say:
            tc = Toolchain()
            tc.require_built()
            say("QEMU " + ".".join(map(str, tc.qemu_version())))
        with report.step("consumer kernel + initramfs") as say:
            assets = consumer_assets(tc)
            say(f"Linux {assets.kernel_version}")

        sockets = {n: workdir / f"{n}.sock" for n in ("vm1", "vm2", "disk")}
        image = workdir / "disk.raw"
        with report.step("vvu-switch (2 ports)") as say:
            switch = stack.enter_context(BackendProcess(
                "vvu-switch",
                ["--port", f"vm1={sockets['vm1']}", "--port", f"vm2={sockets['vm2']}"],
                [sockets["vm1"], sockets["vm2"]], workdir / "vvu-switch.log"))
            say(f"pid {switch.proc.pid if switch.proc else '?'}")
        with report.step("vvu-blk") as say:
            with image.open("wb") as f:
                f.truncate(IMAGE_MIB << 20)
            blk = stack.enter_context(BackendProcess(
                "vvu-blk", ["--socket", str(sockets["disk"]), "--image", str(image),
                            "--serial", "vvu-demo"],
                [sockets["disk"]], workdir / "vvu-blk.log"))
            say(f"{IMAGE_MIB} MiB raw image, pid {blk.proc.pid if blk.proc else '?'}")

        vms = [
            _net_consumer(tc, assets, "vm1", sockets["vm1"], "10.0.0.1", "52:54:00:00:00:01"),
            _net_consumer(tc, assets, "vm2", sockets["vm2"], "10.0.0.2", "52:54:00:00:00:02"),
            _blk_consumer(tc, assets, sockets["disk"]),
        ]
        with report.step("boot 3 consumer VMs") as say:
            for vm in vms:
                stack.callback(vm.shutdown)
                vm.launch()
            for vm in vms:
                vm.wait_for_boot()
            say(f"accelerator {vms[0].accel.name if vms[0].accel else '?'}")
        vm1, vm2, disk = (vm.console for vm in vms)

        with report.step("vm1 pings vm2") as say:
            out = vm1.check("ping -c 3 -W 5 10.0.0.2")
            if " 0% packet loss" not in out:
                raise DemoFailure(f"ping lost packets:\n{out}")
            say(out.strip().splitlines()[-1])
        with report.step(f"vm1 sends {FILE_KIB} KiB to vm2") as say:
            # The listener must not read the console: a background job that does is
            # stopped by SIGTTIN and stops reading its socket too.
            vm2.check("rm -f /tmp/recv; (sleep 120 | nc -l -p 5000 > /tmp/recv) "
                      ">/dev/null 2>&1 &")
            vm1.check(f"dd if=/dev/urandom of=/tmp/send bs=1024 count={FILE_KIB} 2>/dev/null")
            sent = vm1.check("sha256sum /tmp/send").split()[0]
            time.sleep(0.5)
            vm1.check("nc -w 5 10.0.0.2 5000 < /tmp/send", timeout=180)
            deadline = time.monotonic() + 60
            while True:
                size = int(vm2.check("wc -c < /tmp/recv").strip() or 0)
                if size >= FILE_KIB * 1024 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            got = vm2.check("sha256sum /tmp/recv").split()[0]
            if got != sent:
                raise DemoFailure(f"checksums differ: sent {sent}, received {got} ({size} B)")
            say(f"sha256 {sent[:16]}… matches")
        with report.step("disk VM writes + flushes") as say:
            disk.check("dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null")
            want = disk.check("sha256sum /tmp/pattern").split()[0]
            disk.check("dd if=/tmp/pattern of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null")
            back = disk.check("dd if=/dev/vda bs=4096 skip=256 count=256 iflag=direct "
                              "2>/dev/null | sha256sum").split()[0]
            with image.open("rb") as f:
                f.seek(1 << 20)
                host = hashlib.sha256(f.read(1 << 20)).hexdigest()
            if not want == back == host:
                raise DemoFailure(f"pattern {want}, read back {back}, host image {host}")
            say("1 MiB pattern in the host image after FLUSH")
        with report.step("shut down") as say:
            for vm in vms:
                vm.shutdown()
            codes = [switch.stop(), blk.stop()]
            if codes != [0, 0]:
                raise DemoFailure(f"backends exited with {codes}")
            say("backends exited 0, sockets removed")
        print("\nvvu-switch log (last lines):")
        print("\n".join(switch.output().splitlines()[-12:]))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vvu-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path,
                        help="keep logs and sockets here instead of a temporary directory")
    args = parser.parse_args(argv)

    def demo() -> None:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            report = run_demo(args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="vvu-demo-") as tmp:
                report = run_demo(Path(tmp))
        print(f"\nvvu-demo: all {len(report.steps)} steps passed")

    # Everything started is stopped on the way out (context managers), Ctrl-C too.
    return run_main(demo, program="vvu-demo",
                    errors=(DemoFailure, BackendError, MachineError, ToolchainError))


if __name__ == "__main__":
    sys.exit(main())
