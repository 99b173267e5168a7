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
import struct

from fuzz.engine import Finding, Harness
from fuzz.source import ByteSource
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.features import DescFlag, VhostFeature, VirtioFeature
from vvu_runtime.virtio.memory import DirtyLog, GuestMemory, MemoryRegion, map_fd
from vvu_runtime.virtio.packed import PACKED_INITIAL_BASE, PackedQueue, encode_packed_base
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses, Virtqueue
from vvu_runtime.virtio.split import SplitQueue

#: Front-end user address of region A (region B follows at +REGION_B).
UVA = 0x7F00_0000_0000
REGION_SIZE = 0x8000
REGION_B = 0x10_0000
DESC_AT, AVAIL_AT, USED_AT, INDIRECT_AT, DATA_AT = 0x0, 0x1000, 0x1800, 0x2800, 0x3000
SPLIT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_DESC = struct.Struct("<QIHH")
_FLAG_SETS = (0, int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.NEXT | DescFlag.WRITE),
              int(DescFlag.INDIRECT), int(DescFlag.INDIRECT | DescFlag.NEXT),
              int(DescFlag.INDIRECT | DescFlag.WRITE), 7)
_AVAIL, _USED = int(DescFlag.AVAIL), int(DescFlag.USED)


class RingsHarness(Harness):
    name = "rings"
    doc = "split/packed ring walkers with indirect descriptors and EVENT_IDX in mmap'd memory"
    expected = (VirtioError,)
    checks_fds_each_case = False  # the case makes no fds; checked every 1024 cases

    def open(self) -> None:
        self.fd = os.memfd_create("vvu-fuzz-rings", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 2 * REGION_SIZE)
        self.ram = mmap.mmap(self.fd, 2 * REGION_SIZE)
        self.view = memoryview(self.ram)
        self.memory = GuestMemory()
        self.memory.add(map_fd(MemoryRegion(0, REGION_SIZE, UVA, 0), self.fd))
        self.memory.add(map_fd(MemoryRegion(REGION_B, REGION_SIZE, UVA + REGION_B,
                                            REGION_SIZE), self.fd))
        self.log_fd = os.memfd_create("vvu-fuzz-log", os.MFD_CLOEXEC)
        os.ftruncate(self.log_fd, 4096)
        self.log = DirtyLog(self.log_fd, 64, 0)  # covers 2 MiB: region B's top is past it
        self.zero = bytes(2 * REGION_SIZE)

    def close(self) -> None:
        self.memory.clear()
        self.log.close()
        self.view.release()
        self.ram.close()
        os.close(self.fd)
        os.close(self.log_fd)

    # ------------------------------------------------------------------ the driver
    def _gpa(self, src: ByteSource) -> int:
        mode = src.below(16)
        if mode < 10:
            return DATA_AT + src.below(REGION_SIZE - DATA_AT)
        if mode < 12:
            return REGION_B + src.below(REGION_SIZE)
        if mode < 14:
            return INDIRECT_AT + 16 * src.below(64)
        return src.uint(8)

    def _desc(self, src: ByteSource, size: int, packed: bool, wrap: int, slot: int = 0) -> bytes:
        addr = self._gpa(src)
        length = src.pick((1, 16, 64, 512, 4096, 0, src.below(REGION_SIZE), src.uint(4)))
        flags = src.pick(_FLAG_SETS)
        if packed:
            # mostly "available in the current wrap"
            flags |= (_AVAIL if wrap else _USED) if src.chance(90) else src.pick(
                (0, _AVAIL, _USED, _AVAIL | _USED))
            return _DESC.pack(addr, length, src.below(size + 1), flags)
        if flags & int(DescFlag.INDIRECT):
            length = 16 * src.pick((1, 2, 4, 8, 0, 3, 128)) if src.chance(85) else length
            addr = INDIRECT_AT if src.chance(80) else addr
        nxt = (slot + 1) % size if src.chance(80) else src.below(size + 1)
        return _DESC.pack(addr, length, flags, nxt)

    def _write_driver(self, src: ByteSource, size: int, packed: bool) -> None:
        v = self.view
        v[:] = self.zero
        n = min(size, 1 + src.below(16))
        for i in range(n):
            slot = src.below(size) if src.chance(30) else i
            v[DESC_AT + 16 * slot:DESC_AT + 16 * slot + 16] = self._desc(src, size, packed, 1,
                                                                          slot)
        for i in range(src.below(9)):  # an indirect table
            v[INDIRECT_AT + 16 * i:INDIRECT_AT + 16 * i + 16] = self._desc(src, 8, False, 1, i)
        if packed:
            struct.pack_into("<HH", v, AVAIL_AT, src.uint(2), src.below(4))
            struct.pack_into("<HH", v, USED_AT, src.uint(2), src.below(4))
            return
        avail_idx = src.edge_int(16, n)
        struct.pack_into("<HH", v, AVAIL_AT, src.below(2), avail_idx)
        for i in range(min(size, n + 2)):
            struct.pack_into("<H", v, AVAIL_AT + 4 + 2 * i,
                             i if src.chance(70) else src.edge_int(16, src.below(size)))
        struct.pack_into("<H", v, AVAIL_AT + 4 + 2 * size, src.uint(2))  # used_event
        struct.pack_into("<HH", v, USED_AT, src.below(2), src.edge_int(16, 0))

    def _scribble(self, src: ByteSource) -> None:
        """The driver rewriting ring memory while the device walks it."""
        at = src.pick((DESC_AT, AVAIL_AT, USED_AT, INDIRECT_AT)) + src.below(0x800)
        chunk = src.take(src.pick((2, 4, 8, 16)))
        self.view[at:at + len(chunk)] = chunk

    # ------------------------------------------------------------------ a case
    def _queue(self, src: ByteSource) -> tuple[Virtqueue, int, bool]:
        packed = src.chance(40)
        size = src.pick(SPLIT_SIZES) if not packed or src.chance(50) else 1 + src.below(256)
        size = src.edge_int(16, size)
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
        self._write_driver(src, max(1, min(size, 256)), packed)
        queue: Virtqueue
        if packed:
            base = (PACKED_INITIAL_BASE if src.chance(80) else
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
                    queue.should_notify()
                elif op == 6:
                    queue.set_kick_suppression(src.chance(50))
                elif op == 7:
                    queue.get_base()
                elif op == 8:
                    self._scribble(src)
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
