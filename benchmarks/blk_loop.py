"""Micro-benchmark of vvu-blk's request loop: BlkDevice.process() per request.

One process, no VM: a driver side (``SplitDriverRing``) publishes 4 KiB reads
the way Linux's virtio-blk does (header, data, status through an indirect
table) into memfd guest memory; the device side is a real ``Vring`` with a
compiled split ring and an inflight region (as QEMU's vhost-user-blk sets
up), over a raw image in the page cache. Each round publishes ``depth``
requests, calls ``process()`` once, and reaps them; only ``process()`` is
timed. Three loops, in the same run:

* ``compiled loop``: ``_serve_c.serve_burst`` (the default where it was built);
* ``python loop``: the Python loop, each request's I/O through ``serve_fast``;
* ``pure python``: the Python loop and ``serve()`` in Python (``VVU_PURE_PYTHON``'s
  data path, but on the same compiled ring).

    .venv/bin/python benchmarks/blk_loop.py [--seconds 2] [--depths 1,32]

Prints microseconds of ``process()`` per request and each loop's ratio to the
compiled one. Under TCG (an appliance) every microsecond here is emulated many
times over: this is the part of a request's latency vvu-blk itself controls.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.ratio_table import Cell, Column, ratio, render_table  # noqa: E402
from vvu_runtime.backends.blk import device as device_mod  # noqa: E402
from vvu_runtime.backends.blk.device import BlkDevice  # noqa: E402
from vvu_runtime.backends.blk.image import RawImage  # noqa: E402
from vvu_runtime.vhost_user.transport import Notifier  # noqa: E402
from vvu_runtime.vhost_user.vring import Vring  # noqa: E402
from vvu_runtime.virtio.blk import RequestType  # noqa: E402
from vvu_runtime.virtio.driver_ring import SplitDriverRing  # noqa: E402
from vvu_runtime.virtio.features import VirtioFeature  # noqa: E402
from vvu_runtime.virtio.inflight import SplitInflight, inflight_region_size  # noqa: E402
from vvu_runtime.virtio.memory import GuestMemory, memfd_region  # noqa: E402
from vvu_runtime.virtio.queue import RingAddresses  # noqa: E402
from vvu_runtime.virtio.split import compiled_split_queue, split_ring_layout  # noqa: E402

SIZE = 256
GPA, UVA = 1 << 32, 0x7F00_0000_0000
REGION = 8 << 20
RING, TABLES, BUFS = 0x1000, 0x1_0000, 0x10_0000
IMAGE_MIB = 64
FEATURES = (int(VirtioFeature.VERSION_1) | int(VirtioFeature.INDIRECT_DESC)
            | int(VirtioFeature.EVENT_IDX))
LOOPS = ("compiled loop", "python loop", "pure python")


class Calls(Notifier):
    def __init__(self) -> None:
        self.count = 0

    def signal(self) -> None:
        self.count += 1


def measure(loop: str, depth: int, seconds: float, image_path: Path) -> float:
    """Microseconds of process() per request for ``loop`` at queue depth ``depth``."""
    ring_class = compiled_split_queue()
    if ring_class is None:
        raise SystemExit("the compiled split ring is not built (or VVU_PURE_PYTHON is set): "
                         "run ./setup")
    mem = GuestMemory()
    mapped, fd = memfd_region(REGION, guest_phys_addr=GPA, userspace_addr=UVA)
    os.close(fd)
    mem.add(mapped)
    lay = split_ring_layout(SIZE)
    driver: SplitDriverRing[int] = SplitDriverRing(
        mem, SIZE, GPA + RING + lay.desc_offset, GPA + RING + lay.avail_offset,
        GPA + RING + lay.used_offset, event_idx=True)
    v = Vring(0, "bench", queue_factory=lambda *a: ring_class(*a))
    v.size = SIZE
    v.addresses = RingAddresses(UVA + RING + lay.desc_offset, UVA + RING + lay.avail_offset,
                                UVA + RING + lay.used_offset)
    v.kick_nofd = True
    v.enabled = True
    v.features = FEATURES
    v.call = Calls()
    area = memoryview(bytearray(inflight_region_size(1, SIZE)))
    v.inflight = SplitInflight.for_queues(area, 1, SIZE)[0]
    v.start(mem)
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image)
        dev.set_features(FEATURES | dev.features() & ~int(VirtioFeature.RING_PACKED))
        dev.poll_us = 0.0  # each round is one process() call, no spinning after it
        if loop != "compiled loop":
            dev._serve_burst = None
        if loop == "pure python":
            dev._serve_fast = None
        view = mapped.view
        slots = [(BUFS + k * 8192, TABLES + k * 64) for k in range(depth)]
        sectors = IMAGE_MIB * 2048 // 8
        done = 0
        spent = 0.0
        round_no = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for k, (buf, table) in enumerate(slots):
                sector = ((round_no * depth + k) * 7919 % sectors) * 8
                view[buf:buf + 16] = int(RequestType.IN).to_bytes(4, "little") + bytes(4) \
                    + sector.to_bytes(8, "little")
                driver.add_indirect([(GPA + buf, 16)],
                                    [(GPA + buf + 4096, 4096), (GPA + buf + 16, 1)], k,
                                    GPA + table)
            t0 = time.perf_counter()
            dev.process(v)
            spent += time.perf_counter() - t0
            got = driver.get_used()
            if len(got) != depth:
                raise SystemExit(f"{loop}: {len(got)} of {depth} requests completed")
            done += depth
            round_no += 1
    return spent / done * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per loop and depth")
    ap.add_argument("--depths", default="1,32", help="requests per process() call")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    if device_mod._compiled_serve_burst is None:
        raise SystemExit("vvu-blk's compiled loop is not built: run ./setup")
    with tempfile.TemporaryDirectory(prefix="vvu-blk-loop-") as tmp:
        image = Path(tmp) / "disk.raw"
        with image.open("wb") as f:
            f.write(bytes(range(256)) * (IMAGE_MIB << 12))
        rows: list[tuple[str, list[Cell]]] = []
        for depth in depths:
            us = {loop: measure(loop, depth, args.seconds, image) for loop in LOOPS}
            print(f"QD{depth}: " + ", ".join(f"{k} {v:.2f} us" for k, v in us.items()),
                  file=sys.stderr)
            cells: list[Cell] = [us[loop] for loop in LOOPS]
            cells += [ratio(us[loop], us["compiled loop"]) for loop in LOOPS[1:]]
            rows.append((f"QD{depth}", cells))
    columns = [Column(f"{loop} us/req") for loop in LOOPS]
    columns += [Column(f"{loop} / compiled") for loop in LOOPS[1:]]
    print("\n".join(render_table("depth", columns, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
