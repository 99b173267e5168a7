"""The ring walkers (virtio/split.py, packed.py, queue.py, memory.py) on hostile rings.

Guest memory is a real memfd, mapped as two regions (as a front-end's table
would describe it) and written by the harness acting as a hostile driver:
descriptor tables, indirect tables, avail/used indexes and event words come from
the input, mostly plausible and sometimes not. A case builds a split or packed
queue (EVENT_IDX, INDIRECT_DESC and dirty logging chosen by the input) and runs a
sequence of device operations (pop, pop_many, read, write, push, should_notify,
kick suppression, get_base) interleaved with the driver rewriting ring memory
under the device's feet. The walkers must refuse bad rings with a VirtioError;
chains they hand out must lie inside guest memory and match the ring.
"""

from __future__ import annotations

import mmap
import os

from fuzz.engine import Finding, Harness
from fuzz.guest_ram import (
    AVAIL_AT,
    DESC_AT,
    RAM_SIZE,
    REGION_B,
    REGION_SIZE,
    USED_AT,
    UVA,
    ring_size,
    scribble,
    write_ring,
)
from fuzz.source import ByteSource
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.features import VhostFeature, VirtioFeature
from vvu_runtime.virtio.memory import DirtyLog, GuestMemory, MemoryRegion, map_fd
from vvu_runtime.virtio.packed import PACKED_INITIAL_BASE, PackedQueue, encode_packed_base
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses, Virtqueue
from vvu_runtime.virtio.split import SplitQueue


class RingsHarness(Harness):
    name = "rings"
    doc = "split/packed ring walkers with indirect descriptors and EVENT_IDX in mmap'd memory"
    expected = (VirtioError,)
    checks_fds_each_case = False  # the case makes no fds; checked every 1024 cases

    def open(self) -> None:
        self.fd = os.memfd_create("vvu-fuzz-rings", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RAM_SIZE)
        self.ram = mmap.mmap(self.fd, RAM_SIZE)
        self.view = memoryview(self.ram)
        self.memory = GuestMemory()
        self.memory.add(map_fd(MemoryRegion(0, REGION_SIZE, UVA, 0), self.fd))
        self.memory.add(map_fd(MemoryRegion(REGION_B, REGION_SIZE, UVA + REGION_B,
                                            REGION_SIZE), self.fd))
        self.log_fd = os.memfd_create("vvu-fuzz-log", os.MFD_CLOEXEC)
        os.ftruncate(self.log_fd, 4096)
        self.log = DirtyLog(self.log_fd, 64, 0)  # covers 2 MiB: region B's top is past it

    def close(self) -> None:
        self.memory.clear()
        self.log.close()
        self.view.release()
        self.ram.close()
        os.close(self.fd)
        os.close(self.log_fd)

    # ------------------------------------------------------------------ a case
    def _queue(self, src: ByteSource) -> tuple[Virtqueue, int, bool]:
        packed = src.chance(40)
        size = ring_size(src, packed)
        features = int(VirtioFeature.VERSION_1)
        if src.chance(50):
            features |= int(VirtioFeature.EVENT_IDX)
        if src.chance(50):
            features |= int(VirtioFeature.INDIRECT_DESC)
        log_all = src.chance(10)
        if log_all:
            features |= int(VhostFeature.LOG_ALL)
        self.memory.dirty_log = self.log if log_all else None
        addrs = RingAddresses(UVA + src.edge_int(16, DESC_AT), UVA + src.edge_int(16, AVAIL_AT),
                              UVA + src.edge_int(16, USED_AT), log_guest_addr=USED_AT,
                              log=log_all and src.chance(50))
        write_ring(self.view, src, max(1, min(size, 256)), packed)
        queue: Virtqueue
        if packed:
            base = (PACKED_INITIAL_BASE if src.usually(80) else
                    encode_packed_base(src.below(size + 1), src.below(2), src.below(size + 1),
                                       src.below(2)))
            queue = PackedQueue(0, size, addrs, self.memory, features, base)
        else:
            queue = SplitQueue(0, size, addrs, self.memory, features, src.edge_int(16, 0))
        return queue, size, packed

    def run_one(self, data: bytes) -> int:
        src = ByteSource(data)
        queue, size, packed = self._queue(src)
        held: list[DescriptorChain] = []
        done = 0
        try:
            for _ in range(1 + src.below(24)):
                op = src.below(10)
                if op <= 2:
                    chain = queue.pop()
                    if chain is not None:
                        self._check(chain, size, packed)
                        held.append(chain)
                elif op == 3:
                    for chain in queue.pop_many(1 + src.below(8)):
                        self._check(chain, size, packed)
                        held.append(chain)
                elif op == 4 and held:
                    chain = held.pop(src.below(len(held)))
                    data_in = chain.read()
                    written = chain.write(data_in[:src.below(len(data_in) + 1)] or b"x",
                                          src.below(chain.writable_len + 1))
                    if written > chain.writable_len:
                        raise Finding(f"chain.write wrote {written} bytes into "
                                      f"{chain.writable_len} writable")
                    queue.push(chain, written)
                elif op == 5:
                    if held and src.chance(50):  # a batch, published with one index store
                        batch = [(c, min(src.below(8), c.writable_len))
                                 for c in held[:1 + src.below(len(held))]]
                        del held[:len(batch)]
                        queue.push_many(batch)
                    queue.should_notify()
                elif op == 6:
                    queue.set_kick_suppression(src.chance(50))
                elif op == 7:
                    queue.get_base()
                elif op == 8:
                    scribble(self.view, src)
                else:
                    queue.has_available()
                done += 1
        finally:
            self.memory.dirty_log = None
        return done * 2 + packed

    @staticmethod
    def _check(chain: DescriptorChain, size: int, packed: bool) -> None:
        if not packed and not 0 <= chain.head < size:
            raise Finding(f"split ring handed out head {chain.head} in a ring of {size}")
        if chain.ndescs < 1:
            raise Finding(f"chain of {chain.ndescs} descriptors")
        if packed and chain.ndescs > size:
            raise Finding(f"packed chain took {chain.ndescs} slots of a ring of {size}")
        if len(chain.writable) != len(chain.writable_gpas):
            raise Finding("writable buffers and their guest addresses differ in number")
