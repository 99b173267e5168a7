"""Micro-benchmark of the split ring hot path: pop + push of 1-descriptor chains.

A driver publishes batches of one-descriptor chains (64-byte buffers) in a
memfd-backed guest memory; the device side pops and pushes them back. Only the
device-side work is timed in the ``device`` rows (the driver refills the avail
ring with plain stores between batches); the ``round trip`` row includes the
driver's add/get_used bookkeeping too.

    python benchmarks/ring_micro.py [--seconds 1.0] [--size 256] [--batch 32]

Prints pop+push pairs per second for each variant. The budget this serves:
a Python switch forwarding 0.5 Mpps of 64-byte packets pops and pushes one
chain on the sending port's TX ring and one on the receiving port's RX ring
per packet, i.e. ~1 M pop+push pairs per second plus the switching itself.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from vvu_runtime.virtio.driver_ring import PackedDriverRing, SplitDriverRing
from vvu_runtime.virtio.features import DescFlag, VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, MemoryRegion, map_fd
from vvu_runtime.virtio.packed import PACKED_DESC, PackedQueue
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.split import DESC, SplitQueue, split_ring_layout

GPA = 0x0
UVA = 0x7F00_0000_0000
MEM = 16 << 20
RING = 0x1000
BUFS = 0x10_0000
PKT = 64


def make_memory() -> GuestMemory:
    fd = os.memfd_create("ring-micro")
    os.ftruncate(fd, MEM)
    mem = GuestMemory()
    mem.add(map_fd(MemoryRegion(GPA, MEM, UVA, 0), fd))
    os.close(fd)
    return mem


def setup(size: int, features: int, writable: bool) -> tuple[SplitDriverRing[int], SplitQueue]:
    mem = make_memory()
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(
        mem, size, RING, event_idx=bool(features & VirtioFeature.EVENT_IDX))
    lay = split_ring_layout(size)
    addrs = RingAddresses(desc=UVA + RING + lay.desc_offset, avail=UVA + RING + lay.avail_offset,
                          used=UVA + RING + lay.used_offset)
    # Pre-write every descriptor once: descriptor i is buffer i.
    table = mem.translate(RING, 16 * size)
    flags = int(DescFlag.WRITE) if writable else 0
    for i in range(size):
        DESC.pack_into(table, 16 * i, BUFS + i * 2048, PKT, flags, 0)
    return driver, SplitQueue(0, size, addrs, mem, features)


def refill(driver: SplitDriverRing[int], batch: int) -> None:
    """Publish ``batch`` heads as a driver would, minus its bookkeeping."""
    avail16 = driver._avail16
    idx = driver.avail_idx
    mask = driver.size - 1
    for k in range(batch):
        avail16[2 + ((idx + k) & mask)] = (idx + k) & mask
    driver.avail_idx = (idx + batch) & 0xFFFF
    avail16[1] = driver.avail_idx


def run(name: str, seconds: float, body: Callable[[], int]) -> float:
    """Run ``body`` (200 batches per call) for ``seconds``; print rates from the
    per-batch device times: median and best, which shrug off other load on the host."""
    body()  # warm up
    _batch_times.clear()
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < seconds:
        done += body()
    per_batch = done / len(_batch_times)
    times = sorted(_batch_times)
    median = per_batch / times[len(times) // 2]
    best = per_batch / times[0]
    print(f"{name:<46} median {median / 1e6:5.2f} M/s ({1e9 / median:5.0f} ns), "
          f"best {best / 1e6:5.2f} M/s")
    return median


#: Device-side seconds of each batch of the current run.
_batch_times: list[float] = []


def device_loop(size: int, batch: int, features: int, *, writable: bool, batched: bool,
                notify: bool) -> Callable[[], int]:
    driver, queue = setup(size, features, writable)
    rounds = 200
    payload = b"\xab" * PKT

    def body() -> int:
        total = 0
        clock = time.perf_counter
        for _ in range(rounds):
            refill(driver, batch)
            t0 = clock()
            if batched:
                chains = queue.pop_many(batch)
                if writable:
                    queue.push_many([(c, c.write(payload)) for c in chains])
                else:
                    queue.push_many([(c, 0) for c in chains])
                n = len(chains)
            else:
                n = 0
                pop, push = queue.pop, queue.push
                chain = pop()
                while chain is not None:
                    push(chain, chain.write(payload) if writable else 0)
                    n += 1
                    chain = pop()
            if notify:
                queue.should_notify()
            _batch_times.append(clock() - t0)
            total += n
            # Driver side: acknowledge used entries cheaply.
            driver.last_used_idx = queue.used_idx
        return total

    return body


def packed_loop(size: int, batch: int, features: int, *, writable: bool) -> Callable[[], int]:
    mem = make_memory()
    driver: PackedDriverRing[int] = PackedDriverRing.contiguous(
        mem, size, RING, event_idx=bool(features & VirtioFeature.EVENT_IDX))
    addrs = RingAddresses(desc=UVA + RING, avail=UVA + driver.driver_area,
                          used=UVA + driver.device_area)
    queue = PackedQueue(0, size, addrs, mem, features)
    table = mem.translate(RING, 16 * size)
    wflag = int(DescFlag.WRITE) if writable else 0
    avail, used = int(DescFlag.AVAIL), int(DescFlag.USED)
    state = {"next": 0, "wrap": 1}
    payload = b"\xab" * PKT

    def refill() -> None:
        i, wrap = state["next"], state["wrap"]
        for _ in range(batch):
            PACKED_DESC.pack_into(table, 16 * i, BUFS + i * 2048, PKT, i,
                                  wflag | (avail if wrap else used))
            i += 1
            if i == size:
                i, wrap = 0, wrap ^ 1
        state["next"], state["wrap"] = i, wrap

    def body() -> int:
        total = 0
        clock = time.perf_counter
        for _ in range(200):
            refill()
            t0 = clock()
            n = 0
            pop, push = queue.pop, queue.push
            chain = pop()
            while chain is not None:
                push(chain, chain.write(payload) if writable else 0)
                n += 1
                chain = pop()
            queue.should_notify()
            _batch_times.append(clock() - t0)
            total += n
        return total

    return body


def round_trip(size: int, batch: int, features: int) -> Callable[[], int]:
    driver, queue = setup(size, features, False)
    bufs = [[(BUFS + i * 2048, PKT)] for i in range(batch)]

    def body() -> int:
        total = 0
        clock = time.perf_counter
        for _ in range(200):
            t0 = clock()
            for k in range(batch):
                driver.add(bufs[k], (), k)
            driver.kick_needed()
            for chain in queue.pop_many(batch):
                queue.push(chain, 0)
            queue.should_notify()
            total += len(driver.get_used())
            _batch_times.append(clock() - t0)
        return total

    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    s, b, t = args.size, args.batch, args.seconds
    ev = int(VirtioFeature.EVENT_IDX | VirtioFeature.VERSION_1)
    print(f"split ring, size {s}, batches of {b}, {PKT}-byte 1-descriptor chains")
    run("device pop()/push(), readable", t,
        device_loop(s, b, ev, writable=False, batched=False, notify=True))
    run("device pop_many()/push_many(), readable", t,
        device_loop(s, b, ev, writable=False, batched=True, notify=True))
    run("device pop()/push(), writable + 64B write", t,
        device_loop(s, b, ev, writable=True, batched=False, notify=True))
    run("device pop_many()/push_many(), writable + write", t,
        device_loop(s, b, ev, writable=True, batched=True, notify=True))
    run("round trip incl. driver add/kick/get_used", t, round_trip(s, b, ev))
    pk = ev | int(VirtioFeature.RING_PACKED)
    run("packed: device pop()/push(), readable", t, packed_loop(s, b, pk, writable=False))
    run("packed: device pop()/push(), writable + write", t, packed_loop(s, b, pk, writable=True))


if __name__ == "__main__":
    main()
