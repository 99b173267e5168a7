"""vvu-blk against qemu-storage-daemon's vhost-user-blk export, in one run.

Both targets serve the same raw image (in the host page cache, buffered I/O on
both sides) and are pinned to the same single CPU; the same front-end drives
both: ``qemu-img bench`` through QEMU's blkio driver (libblkio's
``virtio-blk-vhost-user``), pinned to another CPU. 4 KiB reads at queue depth
1 and 32. Prints IOPS and the ratio vvu-blk / qsd, then a cProfile of vvu-blk
under the QD32 load (top entries by own time) to show where the time goes.
With ``--pure`` vvu-blk is measured a second time with its compiled data path
switched off (``VVU_PURE_PYTHON=1``, vvu_runtime/virtio/accel.py), in the same run.

    .venv/bin/python benchmarks/blk_bench.py [--count N] [--depths 1,32] [--pure] [--no-profile]

Needs the tool chain (``./setup``): qemu-img with the blkio driver and
qemu-storage-daemon come from its tools tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vvu_runtime.launch.toolchain import Toolchain, ToolchainError

REPO = Path(__file__).resolve().parent.parent
BLOCK = 4096


@dataclass
class Result:
    target: str
    depth: int
    iops: float
    cpu_us: float  # target CPU time per request (user + system), microseconds


TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by every process in process group ``pgid``.

    A steadier figure than IOPS on a shared machine: other load slows the
    target down but does not make it spend more CPU per request.
    """
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is pgrp (field 5 of stat)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def cpus() -> tuple[int, int]:
    """(front-end CPU, target CPU): two different CPUs when there are two."""
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) == 1:
        return avail[0], avail[0]
    return avail[0], avail[1]


def make_image(path: Path, size_mib: int) -> None:
    """A raw image full of non-zero data (holes would make reads unrealistically cheap)."""
    chunk = (bytes(range(256)) * (1 << 12))  # 1 MiB
    with path.open("wb") as f:
        for i in range(size_mib):
            f.write(chunk[i % 256:] + chunk[:i % 256])
    # Warm the page cache: both targets then read from memory.
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str,
                    timeout: float = 30.0) -> None:
    """Until ``path`` accepts connections (the file exists from bind(), before listen())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening:\n{out}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not create {path} within {timeout} s")


@contextlib.contextmanager
def target(argv: Sequence[str], sock: Path, what: str, cpu: int, log: Path,
           env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a vhost-user-blk target pinned to ``cpu`` until the block ends (SIGTERM)."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    with log.open("wb") as logf:
        proc = subprocess.Popen(["taskset", "-c", str(cpu), *argv], stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        try:
            wait_for_socket(sock, proc, what)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from None
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def bench(tc: Toolchain, sock: Path, depth: int, count: int, cpu: int) -> float:
    """IOPS of ``count`` 4 KiB reads at ``depth`` through the blkio driver."""
    opts = f"driver=virtio-blk-vhost-user,path={sock},cache.direct=on"
    argv = ["taskset", "-c", str(cpu), *tc.command(
        ["qemu-img", "bench", "--image-opts", opts, "-c", str(count), "-d", str(depth),
         "-s", str(BLOCK), "-S", str(BLOCK)])]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench failed (exit {out.returncode}):\n"
                           f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return count / float(m.group(1))


def measure(tc: Toolchain, name: str, sock: Path, depths: Sequence[int], count: int,
            cpu: int, repeat: int, pgid: int) -> list[Result]:
    bench(tc, sock, 1, min(count, 2000), cpu)  # warm up (connect path, caches)
    results = []
    for depth in depths:
        runs = []
        for _ in range(repeat):
            before = group_cpu(pgid)
            iops = bench(tc, sock, depth, count, cpu)
            runs.append((iops, (group_cpu(pgid) - before) / count * 1e6))
        best = max(r[0] for r in runs)
        cpu_us = min(r[1] for r in runs)
        print(f"  {name:>20}  QD{depth:<3} {best:>10,.0f} IOPS  {cpu_us:6.1f} us CPU/request",
              flush=True)
        results.append(Result(name, depth, best, cpu_us))
    return results


def qsd_argv(tc: Toolchain, image: Path, sock: Path, aio: str = "threads") -> list[str]:
    return tc.command([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off,aio={aio}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues=1",
    ])


def vvu_argv(image: Path, sock: Path, profile: Path | None = None,
             extra: Sequence[str] = ()) -> list[str]:
    cli = ["-m", "vvu_runtime.serve.blk", "--socket", str(sock), "--image", str(image),
           "--log-level", "WARNING", *extra]
    if profile is not None:
        return [sys.executable, "-m", "cProfile", "-o", str(profile), *cli]
    return [sys.executable, *cli]


#: vvu-blk variants: name -> environment overrides (the accelerator switch).
VVU_DEFAULT: dict[str, dict[str, str]] = {"vvu-blk": {}}
VVU_PURE: dict[str, dict[str, str]] = {"vvu-blk pure": {"VVU_PURE_PYTHON": "1"}}


def print_table(results: list[Result], depths: Sequence[int], peers: Sequence[str],
                ours: Sequence[str] = ("vvu-blk",)) -> None:
    by = {(r.target, r.depth): r for r in results}
    cols = [*peers, *ours]
    pairs = [(o, p) for o in ours for p in peers]
    print()
    print("4 KiB reads, qemu-img bench via blkio; IOPS (target CPU us per request)")
    print(f"{'':<8}" + "".join(f"{c:>22}" for c in cols)
          + "".join(f"{o + ' / ' + p:>34}" for o, p in pairs))
    for d in depths:
        line = f"{'QD' + str(d):<8}"
        for c in cols:
            r = by.get((c, d))
            line += f"{f'{r.iops:,.0f} ({r.cpu_us:.1f})':>22}" if r else f"{'-':>22}"
        for o, p in pairs:
            v, q = by.get((o, d)), by.get((p, d))
            line += f"{v.iops / q.iops:>34.2f}" if v and q else f"{'-':>34}"
        print(line)
    # IOPS on a shared machine swing with everyone else's load; CPU per request
    # does not: it says what one saturated core would give.
    for d in depths:
        for o, p in pairs:
            v, q = by.get((o, d)), by.get((p, d))
            if v and q and v.cpu_us:
                print(f"QD{d}: CPU efficiency of {o} vs {p} (its CPU per request / ours): "
                      f"{q.cpu_us / v.cpu_us:.2f}")


def print_profile(path: Path, top: int, requests: int) -> None:
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values())
    idle = sum(tt for (fn, (_cc, _nc, tt, _ct, _callers)) in entries.items()
               if fn[2] in ("<method 'poll' of 'select.epoll' objects>",))
    busy = total - idle
    process = sum(ct for (fn, (_cc, _nc, _tt, ct, _callers)) in entries.items()
                  if fn[0].endswith("blk/device.py") and fn[2] == "process")
    print()
    print(f"cProfile of vvu-blk under {requests} QD32 reads: {total:.2f} s profiled, "
          f"{idle:.2f} s idle in epoll, {busy:.2f} s busy; BlkDevice.process "
          f"{process:.2f} s = {process / requests * 1e6:.1f} us per request "
          "(with profiler overhead)")
    print(f"top {top} by own time:")
    stats.strip_dirs().sort_stats("tottime").print_stats(top)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000, help="requests per run")
    parser.add_argument("--depths", default="1,32", help="queue depths, comma separated")
    parser.add_argument("--image-mib", type=int, default=256, help="image size")
    parser.add_argument("--repeat", type=int, default=2, help="runs per point (best kept)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    parser.add_argument("--top", type=int, default=20, help="profile entries shown")
    parser.add_argument("--qsd-aio", default="threads,io_uring",
                        help="qemu-storage-daemon aio modes to measure (comma separated)")
    parser.add_argument("--vvu-args", default="", help="extra vvu-blk options, e.g. "
                        "'--poll-us 0'")
    parser.add_argument("--pure", action="store_true", help="also measure vvu-blk with "
                        "VVU_PURE_PYTHON=1 (compiled data path off)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]

    tc = Toolchain()
    try:
        tc.require_built()
    except ToolchainError as exc:
        print(f"blk_bench: {exc}", file=sys.stderr)
        return 2
    fe_cpu, be_cpu = cpus()
    work = Path(tempfile.mkdtemp(prefix="vvu-blk-bench-"))
    try:
        image = work / "disk.raw"
        make_image(image, args.image_mib)
        sock = work / "blk.sock"
        print(f"image {args.image_mib} MiB in page cache; target on CPU {be_cpu}, "
              f"qemu-img bench on CPU {fe_cpu}; {args.count} requests per run")
        results: list[Result] = []
        peers = []
        for aio in args.qsd_aio.split(","):
            peer = f"qsd aio={aio}"
            try:
                with target(qsd_argv(tc, image, sock, aio), sock, f"qemu-storage-daemon "
                            f"(aio={aio})", be_cpu, work / f"qsd-{aio}.log") as proc:
                    results += measure(tc, peer, sock, depths, args.count, fe_cpu,
                                       args.repeat, proc.pid)
                peers.append(peer)
            except RuntimeError as exc:
                print(f"  {peer}: cannot measure: {str(exc).splitlines()[0]}")
        extra = args.vvu_args.split()
        variants = {**VVU_DEFAULT, **(VVU_PURE if args.pure else {})}
        for name, env in variants.items():
            with target(vvu_argv(image, sock, extra=extra), sock, name, be_cpu,
                        work / f"vvu-{len(env)}.log", env) as proc:
                results += measure(tc, name, sock, depths, args.count, fe_cpu, args.repeat,
                                   proc.pid)
        print_table(results, depths, peers, list(variants))
        if not args.no_profile:
            prof = work / "vvu-blk.prof"
            with target(vvu_argv(image, sock, prof, extra), sock, "vvu-blk (cProfile)", be_cpu,
                        work / "vvu-prof.log"):
                bench(tc, sock, max(depths), args.count, fe_cpu)
            print_profile(prof, args.top, args.count)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
