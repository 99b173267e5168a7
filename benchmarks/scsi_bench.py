"""vvu-scsi against vvu-blk, in one run: the same image, the same workloads, one VM.

One consumer VM (the busybox initramfs guest of the integration tests) gets both
devices at once: a vhost-user-blk-pci disk served by vvu-blk and a
vhost-user-scsi-pci LUN served by vvu-scsi, both on the same raw image (the
workloads never run at the same time). Guest ``dd`` with O_DIRECT drives each
in turn, alternating, ``--rounds`` times: 4 KiB reads at queue depth 1 (per-request
cost), 1 MiB sequential reads and 1 MiB sequential writes (throughput). Times come
from the guest's /proc/uptime around each dd (10 ms resolution: workloads last
seconds); target CPU comes from /proc on the host. Prints the median of each,
and the ratio vvu-scsi / vvu-blk (throughput: above 1 means scsi is faster; CPU
per MiB: above 1 means scsi costs more). libblkio has no vhost-user-scsi driver,
hence a VM rather than blk_bench's qemu-img bench.

    .venv/bin/python benchmarks/scsi_bench.py [--rounds 3] [--image-mib 256]

Run heavy benchmarks under ``flock /tmp/vvu-heavy.lock`` on shared machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.blk_bench import group_cpu  # noqa: E402
from vvu_runtime.launch.initramfs import DEFAULT_MODULES, consumer_assets  # noqa: E402
from vvu_runtime.launch.machine import GuestConsole, QemuMachine  # noqa: E402
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError  # noqa: E402

#: name -> (dd arguments with {dev}, MiB moved)
WORKLOADS = {
    "4k-read-qd1": ("if=/dev/{dev} of=/dev/null bs=4096 count=4096 iflag=direct", 16),
    "1m-seq-read": ("if=/dev/{dev} of=/dev/null bs=1M count={mib} iflag=direct", None),
    "1m-seq-write": ("if=/dev/zero of=/dev/{dev} bs=1M count={mib} oflag=direct", None),
}


@contextmanager
def target(argv: Sequence[str], log: Path, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A target process in its own process group, listening before we go on."""
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while b"listening on" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def timed_dd(console: GuestConsole, dd: str) -> float:
    """Seconds a guest dd took, by the guest's clock."""
    out = console.check(f"a=$(cut -d' ' -f1 /proc/uptime); dd {dd} 2>/dev/null; "
                        "b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\"", timeout=600)
    start, end = (float(x) for x in out.split()[-2:])
    return max(end - start, 0.01)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per workload and target")
    # Sequential runs must last well over /proc/uptime's 10 ms tick: 128 MiB reads
    # took ~0.1 s under TCG here, too close to it; 1 GiB keeps the error near 1%.
    parser.add_argument("--image-mib", type=int, default=1024, help="image size (and MiB "
                        "moved by the sequential workloads)")
    args = parser.parse_args(argv)
    tc = Toolchain()
    try:
        tc.require_built()
    except ToolchainError as exc:
        print(f"scsi_bench: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vvu-scsi-bench-"))
    try:
        image = work / "disk.raw"
        with image.open("wb") as f:  # written through once, so reads hit real blocks
            chunk = os.urandom(1 << 20)
            for _ in range(args.image_mib):
                f.write(chunk)
        blk_sock, scsi_sock = work / "blk.sock", work / "scsi.sock"
        assets = consumer_assets(tc, modules=(*DEFAULT_MODULES, "virtio_scsi", "sd_mod"))
        with target(["vvu_runtime.serve.blk", "--socket", str(blk_sock), "--image",
                     str(image), "--queues", "1"], work / "blk.log", "vvu-blk") as blk, \
                target(["vvu_runtime.serve.scsi", "--socket", str(scsi_sock), "--lun",
                        str(image), "--queues", "1"], work / "scsi.log", "vvu-scsi") as scsi:
            vm = QemuMachine(
                tc, name="scsi-bench", kernel=assets.kernel, initrd=assets.initrd, smp=1,
                args=["-chardev", f"socket,id=b-chr,path={blk_sock}",
                      "-device", "vhost-user-blk-pci,id=b,chardev=b-chr,num-queues=1",
                      "-chardev", f"socket,id=s-chr,path={scsi_sock}",
                      "-device", "vhost-user-scsi-pci,id=s,chardev=s-chr,num_queues=1"])
            with vm:
                c = vm.console
                deadline = time.monotonic() + 60
                while c.run("test -e /sys/class/scsi_disk/0:0:0:0")[0] != 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the guest found no SCSI disk")
                    time.sleep(0.5)
                sd = c.check("ls /sys/class/scsi_disk/0:0:0:0/device/block").strip()
                devs = {"vvu-blk": ("vda", blk.pid), "vvu-scsi": (sd, scsi.pid)}
                print(f"image {args.image_mib} MiB; guest {vm.accel}; blk=/dev/vda, "
                      f"scsi=/dev/{sd}; {args.rounds} rounds, medians")
                print(f"{'workload':<14} {'vvu-blk MiB/s':>14} {'vvu-scsi MiB/s':>15} "
                      f"{'ratio':>6} {'blk CPU s/GiB':>14} {'scsi CPU s/GiB':>15} {'ratio':>6}")
                for name, (dd, mib) in WORKLOADS.items():
                    moved = mib or args.image_mib
                    rates: dict[str, list[float]] = {k: [] for k in devs}
                    cpu: dict[str, list[float]] = {k: [] for k in devs}
                    for _ in range(args.rounds):
                        for who, (dev, pid) in devs.items():
                            before = group_cpu(pid)
                            took = timed_dd(c, dd.format(dev=dev, mib=moved))
                            cpu[who].append((group_cpu(pid) - before) * 1024 / moved)
                            rates[who].append(moved / took)
                    b, s = (statistics.median(rates[k]) for k in devs)
                    bc, sc = (statistics.median(cpu[k]) for k in devs)
                    print(f"{name:<14} {b:>14.1f} {s:>15.1f} {s / b:>6.2f} {bc:>14.2f} "
                          f"{sc:>15.2f} {sc / bc if bc else float('nan'):>6.2f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
