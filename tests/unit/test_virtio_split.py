"""Split rings: driver ring ↔ device ring over a real memfd-backed GuestMemory."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvu_runtime.virtio.driver_ring import SplitDriverRing
from vvu_runtime.virtio.errors import DescriptorError, GuestMemoryError, RingError, VirtioError
from vvu_runtime.virtio.features import (
    AvailFlag,
    DescFlag,
    UsedFlag,
    VhostFeature,
    VirtioFeature,
    need_event,
)
from vvu_runtime.virtio.memory import (
    DirtyLog,
    GuestMemory,
    MemoryRegion,
    map_fd,
    memfd_region,
)
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses
from vvu_runtime.virtio.split import DESC, SplitQueue, split_ring_layout

GPA = 0x1_0000_0000  # guest-physical base of the region
UVA = 0x7F12_0000_0000  # the front-end's user address of the same bytes
MEM_SIZE = 4 << 20
RING = GPA + 0x1000  # rings start here (gpa)
BUFS = GPA + 0x10_0000  # buffers start here (gpa)
INDIRECT_TABLES = GPA + 0x30_0000

EVENT_IDX = int(VirtioFeature.EVENT_IDX)
INDIRECT = int(VirtioFeature.INDIRECT_DESC)
ALL = EVENT_IDX | INDIRECT | int(VirtioFeature.VERSION_1)
W = int(DescFlag.WRITE)
N = int(DescFlag.NEXT)
I = int(DescFlag.INDIRECT)  # noqa: E741


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mapped, fd = memfd_region(MEM_SIZE, guest_phys_addr=GPA, userspace_addr=UVA)
    os.close(fd)
    mem.add(mapped)
    yield mem
    mem.clear()


def uva(gpa: int) -> int:
    return gpa - GPA + UVA


def ring_pair(memory: GuestMemory, size: int = 16, features: int = ALL, base: int = 0,
              log: bool = False) -> tuple[SplitDriverRing[int], SplitQueue]:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(
        memory, size, RING, event_idx=bool(features & EVENT_IDX))
    addrs = RingAddresses(desc=uva(driver.desc_addr), avail=uva(driver.avail_addr),
                          used=uva(driver.used_addr), log_guest_addr=driver.used_addr, log=log)
    return driver, SplitQueue(3, size, addrs, memory, features, base)


def fill(memory: GuestMemory, gpa: int, data: bytes) -> None:
    memory.translate(gpa, len(data))[:] = data


def write_desc(memory: GuestMemory, table_gpa: int, i: int, addr: int, length: int,
               flags: int, nxt: int = 0) -> None:
    DESC.pack_into(memory.translate(table_gpa + 16 * i, 16), 0, addr, length, flags, nxt)


def post(driver: SplitDriverRing[int], head: int) -> None:
    """Publish ``head`` in the avail ring without the driver's bookkeeping (hostile tests)."""
    avail16 = driver._avail16
    avail16[2 + (driver.avail_idx & (driver.size - 1))] = head
    driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
    avail16[1] = driver.avail_idx


# -- layout and construction -------------------------------------------------------------

def test_layout_matches_the_spec_sizes() -> None:
    lay = split_ring_layout(256)
    assert (lay.desc_size, lay.avail_size, lay.used_size) == (4096, 518, 2054)
    assert lay.avail_offset == 4096 and lay.used_offset == 4096 + 520
    assert split_ring_layout(256, used_align=4096).used_offset == 8192
    assert lay.used_event_offset == 4 + 512 and lay.avail_event_offset == 4 + 2048


@pytest.mark.parametrize("size", [0, 3, 100, 65536, 32769, -4])
def test_size_must_be_power_of_two(memory: GuestMemory, size: int) -> None:
    addrs = RingAddresses(uva(RING), uva(RING + 0x8000), uva(RING + 0x9000))
    with pytest.raises(RingError, match=f"queue 7: size {size}"):
        SplitQueue(7, size, addrs, memory, ALL)


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_ring_address_outside_memory(memory: GuestMemory, part: str) -> None:
    for bad in (UVA + MEM_SIZE - 16,  # starts inside, ends outside
                GPA + 0x1000):  # a guest-physical address, which is no user address
        where = {"desc": uva(RING), "avail": uva(RING + 0x1000), "used": uva(RING + 0x2000)}
        where[part] = bad
        with pytest.raises(GuestMemoryError, match="queue 2: "):
            SplitQueue(2, 64, RingAddresses(where["desc"], where["avail"], where["used"]),
                       memory, ALL)


def test_misaligned_ring_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(RingError, match="not 16-byte aligned"):
        SplitQueue(0, 8, RingAddresses(uva(RING) + 8, uva(RING + 0x1000), uva(RING + 0x2000)),
                   memory, ALL)
    with pytest.raises(RingError, match=r"used ring address .* not 4-byte aligned"):
        SplitQueue(0, 8, RingAddresses(uva(RING), uva(RING + 0x1000), uva(RING + 0x2002)),
                   memory, ALL)


# -- round trips --------------------------------------------------------------------------

buffers = st.lists(st.integers(min_value=0, max_value=300), min_size=0, max_size=4)


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=2000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(buffers, buffers), min_size=1, max_size=40),
       size=st.sampled_from([1, 2, 8, 64]), use_indirect=st.booleans(),
       batched=st.booleans())
def test_round_trip(memory: GuestMemory, requests: list[tuple[list[int], list[int]]], size: int,
                    use_indirect: bool, batched: bool) -> None:
    driver, queue = ring_pair(memory, size)
    cursor = BUFS
    pending = list(enumerate(requests))
    expected: dict[int, tuple[bytes, list[tuple[int, int]]]] = {}
    returned: dict[int, int] = {}
    while pending or driver.in_flight:
        # Driver: add what fits.
        added = 0
        while pending:
            token, (rlens, wlens) = pending[0]
            rlens = rlens or [1]
            if not use_indirect:  # a direct chain can't be longer than the ring
                rlens = rlens[:size]
                wlens = wlens[:size - len(rlens)]
            need = 1 if use_indirect else len(rlens) + len(wlens)
            if need > driver.num_free:
                break
            pending.pop(0)
            readable = []
            payload = b""
            for n in rlens:
                data = bytes((token * 7 + k) & 0xFF for k in range(n))
                fill(memory, cursor, data)
                readable.append((cursor, n))
                payload += data
                cursor += n
            writable = []
            for n in wlens:
                writable.append((cursor, n))
                cursor += n
            expected[token] = (payload, writable)
            if use_indirect:
                driver.add_indirect(readable, writable, token,
                                    INDIRECT_TABLES + 16 * 16 * (token % 256))
            else:
                driver.add(readable, writable, token)
            added += 1
        # The device re-armed avail_event when it found the ring empty (or, without
        # EVENT_IDX, never set NO_NOTIFY): every batch of adds wants exactly one kick.
        assert driver.kick_needed() == (added > 0)
        assert not driver.kick_needed()  # nothing added since the last answer
        # Device: serve everything, answer with a byte pattern. Like a real device it
        # polls until the ring is empty, which re-arms avail_event for the next kick.
        if batched:
            chains = []
            while batch := queue.pop_many(1000):
                chains += batch
        else:
            chains = list(iter(queue.pop, None))
        completions = []
        for chain in chains:
            assert chain.read() == expected_by_read(expected, chain)
            reply = bytes([chain.head & 0xFF]) * chain.writable_len
            completions.append((chain, chain.write(reply)))
        if batched:
            queue.push_many(completions)
        else:
            for chain, n in completions:
                queue.push(chain, n)
        queue.should_notify()
        for token, written in driver.get_used():
            returned[token] = written
            _, writable = expected[token]
            assert written == sum(n for _, n in writable)
    assert sorted(returned) == list(range(len(requests)))
    assert queue.in_flight == 0 and driver.num_free == size
    assert queue.get_base() == len(requests) & 0xFFFF == queue.used_idx


def expected_by_read(expected: dict[int, tuple[bytes, list[tuple[int, int]]]],
                     chain: DescriptorChain) -> bytes:
    data = chain.read()
    assert any(data == payload for payload, _ in expected.values())
    return data


def test_device_sees_driver_bytes_and_driver_sees_device_bytes(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    fill(memory, BUFS, b"hello, ")
    fill(memory, BUFS + 100, b"world")
    head = driver.add([(BUFS, 7), (BUFS + 100, 5)], [(BUFS + 200, 4), (BUFS + 300, 10)], 42)
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert chain.read() == b"hello, world"
    assert [len(b) for b in chain.writable] == [4, 10]
    assert chain.writable_gpas == [BUFS + 200, BUFS + 300]
    assert chain.write(b"0123456789ABC") == 13
    queue.push(chain, 13)
    assert queue.pop() is None
    assert driver.get_used() == [(42, 13)]
    assert bytes(memory.translate(BUFS + 200, 4)) + bytes(memory.translate(BUFS + 300, 9)) \
        == b"0123456789ABC"


def test_write_with_offset_spans_buffers(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    driver.add([(BUFS, 1)], [(BUFS + 16, 4), (BUFS + 32, 4)], 0)
    chain = queue.pop()
    assert chain is not None
    assert chain.write(b"abcdef", offset=2) == 6
    assert bytes(memory.translate(BUFS + 16, 4)) == b"\0\0ab"
    assert bytes(memory.translate(BUFS + 32, 4)) == b"cdef"
    assert chain.write(b"xyz", offset=7) == 1  # only one byte left


def test_zero_length_buffers_are_skipped(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    # A zero-length buffer may carry any address: it is never translated.
    write_desc(memory, driver.desc_addr, 0, 0xDEAD_0000_0000, 0, N, 1)
    write_desc(memory, driver.desc_addr, 1, BUFS, 3, W)
    post(driver, 0)
    chain = queue.pop()
    assert chain is not None and chain.readable == [] and len(chain.writable) == 1
    assert chain.ndescs == 2


def test_base_and_wrap_around_of_free_running_indexes(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    # Start both sides near the 16-bit wrap, as after a long uptime.
    for view16, pos in ((driver._avail16, 1), (driver._used16, 1)):
        view16[pos] = 0xFFFE
    driver.avail_idx = driver.last_used_idx = driver._kicked_at = 0xFFFE
    addrs = queue.addrs
    queue = SplitQueue(3, 4, addrs, memory, ALL, base=0xFFFE)
    assert queue.used_idx == 0xFFFE and queue.get_base() == 0xFFFE
    for round_ in range(10):
        for k in range(3):
            driver.add([(BUFS + 64 * k, 8)], [], round_ * 3 + k)
        got = queue.pop_many(10)
        assert len(got) == 3
        queue.push_many((c, 0) for c in got)
        assert [t for t, _ in driver.get_used()] == [round_ * 3 + k for k in range(3)]
    assert queue.get_base() == (0xFFFE + 30) & 0xFFFF


def test_construct_from_base_resumes(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    for k in range(5):
        driver.add([(BUFS + 64 * k, 8)], [], k)
    for _ in range(2):
        chain = queue.pop()
        assert chain is not None
        queue.push(chain, 0)
    base = queue.get_base()
    resumed = SplitQueue(3, 8, queue.addrs, memory, ALL, base=base | 0xABCD0000)  # upper bits
    assert resumed.last_avail_idx == 2 and resumed.used_idx == 2                  # reserved
    assert [c.head for c in resumed.pop_many(8)] == [2, 3, 4]


def test_chain_at_rebuilds_without_consuming(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    head = driver.add([(BUFS, 8)], [(BUFS + 64, 8)], 0)
    chain = queue.chain_at(head)
    assert chain.readable_len == 8 and chain.writable_len == 8
    assert queue.last_avail_idx == 0 and queue.has_available()


# -- indirect --------------------------------------------------------------------------------

def test_indirect_chain(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    fill(memory, BUFS, b"abc")
    fill(memory, BUFS + 8, b"def")
    driver.add_indirect([(BUFS, 3), (BUFS + 8, 3)], [(BUFS + 16, 5)] * 5, 9, INDIRECT_TABLES)
    chain = queue.pop()
    assert chain is not None
    assert chain.read() == b"abcdef" and len(chain.writable) == 5 and chain.ndescs == 1
    assert driver.num_free == 3


def test_direct_descriptors_followed_by_an_indirect_one(memory: GuestMemory) -> None:
    # VIRTIO 1.2 2.7.5.3.2: the device MUST handle zero or more direct descriptors
    # followed by a single indirect one.
    driver, queue = ring_pair(memory, 8)
    fill(memory, BUFS, b"head")
    fill(memory, BUFS + 64, b"tail")
    write_desc(memory, driver.desc_addr, 5, BUFS, 4, N, 6)
    write_desc(memory, driver.desc_addr, 6, INDIRECT_TABLES, 32, I | W)  # WRITE ignored
    write_desc(memory, INDIRECT_TABLES, 0, BUFS + 64, 4, N, 1)
    write_desc(memory, INDIRECT_TABLES, 1, BUFS + 128, 16, W)
    post(driver, 5)
    chain = queue.pop()
    assert chain is not None
    assert chain.read() == b"headtail" and chain.writable_len == 16 and chain.ndescs == 2


def test_indirect_table_walk_follows_next_not_order(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    fill(memory, BUFS, b"12")
    fill(memory, BUFS + 2, b"34")
    write_desc(memory, INDIRECT_TABLES, 2, BUFS, 2, N, 0)
    write_desc(memory, INDIRECT_TABLES, 0, BUFS + 2, 2, 0)
    write_desc(memory, driver.desc_addr, 0, INDIRECT_TABLES, 48, I)
    post(driver, 0)
    # The walk starts at entry 0 of the table (the spec), so only "34".
    chain = queue.pop()
    assert chain is not None and chain.read() == b"34"


# -- rejections --------------------------------------------------------------------------------

def rejected(memory: GuestMemory, setup: list[tuple[int, int, int, int, int]], head: int = 0,
             features: int = ALL, size: int = 8) -> VirtioError:
    """Write descriptors (table_gpa or 0 for the ring, i, addr, len, flags, next...) and pop."""
    driver, queue = ring_pair(memory, size, features)
    for table, i, addr, length, flags_next in setup:
        flags, nxt = flags_next & 0xFFFF, flags_next >> 16
        write_desc(memory, table or driver.desc_addr, i, addr, length, flags, nxt)
    post(driver, head)
    with pytest.raises(VirtioError) as info:
        queue.pop()
    assert info.value.queue == 3
    assert "queue 3" in str(info.value)
    return info.value


def nx(flags: int, nxt: int) -> int:
    return flags | nxt << 16


def test_reject_loop(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, BUFS, 8, nx(N, 1)), (0, 1, BUFS, 8, nx(N, 0))])
    assert isinstance(err, DescriptorError) and "a loop" in str(err) and err.head == 0


def test_reject_self_loop(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 3, BUFS, 8, nx(N, 3))], head=3)
    assert isinstance(err, DescriptorError) and err.head == 3


def test_reject_loop_in_indirect_table(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 64, I),
                            (INDIRECT_TABLES, 0, BUFS, 8, nx(N, 1)),
                            (INDIRECT_TABLES, 1, BUFS, 8, nx(N, 0))])
    assert isinstance(err, DescriptorError) and "indirect table" in str(err)


def test_full_length_chain_is_fine_but_no_longer(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    for i in range(4):
        write_desc(memory, driver.desc_addr, i, BUFS + 8 * i, 8, N if i < 3 else 0, i + 1)
    post(driver, 0)
    chain = queue.pop()
    assert chain is not None and chain.ndescs == 4


def test_reject_overlong_indirect_table(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 16 * 1025, I)])
    assert isinstance(err, DescriptorError) and "1025 entries" in str(err)


def test_reject_next_out_of_range(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, BUFS, 8, nx(N, 8))])
    assert isinstance(err, DescriptorError) and "links to 8" in str(err)
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 32, I),
                            (INDIRECT_TABLES, 0, BUFS, 8, nx(N, 2))])
    assert isinstance(err, DescriptorError) and "links to 2" in str(err)


def test_reject_head_out_of_range(memory: GuestMemory) -> None:
    err = rejected(memory, [], head=8)
    assert isinstance(err, DescriptorError) and "head 8" in str(err)
    err = rejected(memory, [], head=0xFFFF)
    assert isinstance(err, DescriptorError)


@pytest.mark.parametrize("addr,length", [
    (GPA + MEM_SIZE - 4, 8),          # straddles the end of the region
    (GPA - 4, 8),                     # straddles the start
    (0x10, 8),                        # nowhere
    (2**64 - 8, 16),                  # wraps past 2^64
    (BUFS, 0xFFFF_FFFF),              # too long
])
def test_reject_out_of_bounds_buffer(memory: GuestMemory, addr: int, length: int) -> None:
    err = rejected(memory, [(0, 0, addr, length, 0)])
    assert isinstance(err, GuestMemoryError) and f"{addr:#x}" in str(err)
    err = rejected(memory, [(0, 0, BUFS, 8, nx(N, 1)), (0, 1, addr, length, W)])
    assert isinstance(err, GuestMemoryError) and "descriptor 1 of chain 0" in str(err)


def test_reject_out_of_bounds_indirect_table(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, GPA + MEM_SIZE - 16, 32, I)])
    assert isinstance(err, GuestMemoryError)


def test_reject_readable_after_writable(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, BUFS, 8, nx(W | N, 1)), (0, 1, BUFS, 8, 0)])
    assert isinstance(err, DescriptorError) and "readable descriptor 1 follows a writable" \
        in str(err)
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 32, I),
                            (INDIRECT_TABLES, 0, BUFS, 8, nx(W | N, 1)),
                            (INDIRECT_TABLES, 1, BUFS, 8, 0)])
    assert isinstance(err, DescriptorError) and "readable indirect descriptor 1" in str(err)


def test_reject_nested_indirect(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 32, I),
                            (INDIRECT_TABLES, 0, INDIRECT_TABLES + 0x100, 16, I)])
    assert isinstance(err, DescriptorError) and "inside an indirect table" in str(err)


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_reject_bad_indirect_length(memory: GuestMemory, length: int) -> None:
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, length, I)])
    assert isinstance(err, DescriptorError) and "not a positive multiple of 16" in str(err)


def test_reject_indirect_with_next(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 32, nx(I | N, 1)), (0, 1, BUFS, 8, 0)])
    assert isinstance(err, DescriptorError) and "both INDIRECT and NEXT" in str(err)


def test_reject_indirect_not_negotiated(memory: GuestMemory) -> None:
    err = rejected(memory, [(0, 0, INDIRECT_TABLES, 32, I)], features=EVENT_IDX)
    assert isinstance(err, DescriptorError) and "INDIRECT_DESC was not negotiated" in str(err)


def test_reject_avail_idx_jump(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    driver._avail16[1] = 9
    with pytest.raises(RingError, match="queue 3: driver moved avail idx to 9, 9 entries"):
        queue.pop()
    # Undone, the queue serves the driver's next real buffer: the rejection left no state.
    driver._avail16[1] = 0
    driver.add([(BUFS, 8)], [], 5)
    chain = queue.pop()
    assert chain is not None and chain.read() == bytes(memory.translate(BUFS, 8))
    assert queue.pop() is None


def test_rejected_chain_is_consumed_and_can_be_returned(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    driver.add([(BUFS, 8)], [], 0)
    write_desc(memory, driver.desc_addr, 7, 0x10, 8, 0)
    post(driver, 7)
    driver.add([(BUFS, 8)], [], 2)
    first = queue.pop()
    with pytest.raises(GuestMemoryError) as info:
        queue.pop()
    assert info.value.head == 7
    queue.push(DescriptorChain(info.value.head), 0)  # a lenient device hands it back
    nxt = queue.pop()
    assert first is not None and nxt is not None and nxt.head == 1


def test_pop_many_returns_the_good_chains_before_a_bad_one(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    driver.add([(BUFS, 8)], [], 0)
    write_desc(memory, driver.desc_addr, 7, BUFS, 8, N, 7)  # a self-loop
    post(driver, 7)
    driver.add([(BUFS, 8)], [], 2)
    assert [c.head for c in queue.pop_many(8)] == [0]
    assert queue.last_avail_idx == 1
    with pytest.raises(DescriptorError) as info:
        queue.pop_many(8)
    assert info.value.head == 7 and queue.last_avail_idx == 2
    assert [c.head for c in queue.pop_many(8)] == [1]


# -- memory ------------------------------------------------------------------------------------

def test_regions_never_overlap() -> None:
    mem = GuestMemory()
    a, fa = memfd_region(0x10000, guest_phys_addr=0, userspace_addr=0x1000_0000)
    mem.add(a)
    for gpa, uva_ in ((0x8000, 0x2000_0000), (0x1_0000 - 1, 0x2000_0000),
                      (0x10_0000, 0x1000_8000)):
        b, fb = memfd_region(0x10000, guest_phys_addr=gpa, userspace_addr=uva_)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add(b)
        b.close()
        os.close(fb)
    c, fc = memfd_region(0x10000, guest_phys_addr=0x10000, userspace_addr=0x1001_0000)
    mem.add(c)  # adjacent in both spaces: fine
    # ...but a buffer across the seam is refused, although both halves are mapped.
    with pytest.raises(GuestMemoryError, match="not inside one mapped region"):
        mem.translate(0xFFF0, 0x20)
    assert len(mem.translate(0xFFF0, 0x10)) == 0x10
    assert len(mem.translate(0x10000, 0x10)) == 0x10
    with pytest.raises(GuestMemoryError):
        mem.translate_user(0x1000_FFF0, 0x20)
    with pytest.raises(GuestMemoryError):
        mem.translate(0x10, -1)
    mem.clear()
    os.close(fa)
    os.close(fc)


def test_map_fd_refuses_a_short_file() -> None:
    fd = os.memfd_create("short")
    os.ftruncate(fd, 0x1000)
    with pytest.raises(GuestMemoryError, match="fd holds only"):
        map_fd(MemoryRegion(0, 0x2000, 0, 0), fd)
    os.close(fd)


# -- notifications -----------------------------------------------------------------------

@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_need_event_is_the_spec_formula(event: int, new: int, old: int) -> None:
    # vring_need_event() from the spec, with C's u16 arithmetic.
    spec = (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
    assert need_event(event, new, old) is spec
    # ...which means: event lies in [old, new) going forward modulo 2^16.
    span = (new - old) & 0xFFFF
    assert spec == any((old + k) & 0xFFFF == event for k in range(span)) or span > 2000


def test_should_notify_event_idx(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 16)
    used_event = driver._used_event_at

    def serve(n: int) -> None:
        for k in range(n):
            driver.add([(BUFS + 64 * k, 8)], [], k)
        queue.push_many((c, 0) for c in queue.pop_many(n))

    assert not queue.should_notify()  # nothing pushed: nothing to say
    serve(2)
    assert queue.should_notify()  # first batch after start: always
    driver.get_used()
    driver._avail16[used_event] = 5
    serve(2)  # used 2 -> 4
    assert not queue.should_notify()
    serve(2)  # used 4 -> 6: passes 5
    assert queue.should_notify()
    serve(2)  # 6 -> 8: event 5 is behind
    assert not queue.should_notify()
    # The driver's own helper keeps used_event at its last_used when interrupts are on.
    assert driver.enable_interrupts()  # the 4 buffers served since get_used are waiting
    assert driver._avail16[used_event] == driver.last_used_idx == 2
    driver.get_used()
    serve(1)
    assert queue.should_notify()
    driver.get_used()
    driver.disable_interrupts()
    serve(3)
    assert not queue.should_notify()


def test_should_notify_flags_without_event_idx(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8, features=INDIRECT)
    driver.add([(BUFS, 8)], [], 0)
    queue.push(queue.pop() or DescriptorChain(0), 0)
    assert queue.should_notify()
    driver.disable_interrupts()
    assert driver._avail16[0] == AvailFlag.NO_INTERRUPT
    driver.add([(BUFS, 8)], [], 1)
    queue.push(queue.pop() or DescriptorChain(0), 0)
    assert not queue.should_notify()
    assert driver.enable_interrupts()  # one is waiting already


def test_kick_suppression_without_event_idx(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8, features=0)
    assert queue.set_kick_suppression(True) is False
    assert driver._used16[0] == UsedFlag.NO_NOTIFY
    driver.add([(BUFS, 8)], [], 0)
    assert not driver.kick_needed()
    assert queue.set_kick_suppression(False) is True  # already one there: poll again
    assert driver._used16[0] == 0
    driver.add([(BUFS, 8)], [], 1)
    assert driver.kick_needed()


def test_kick_suppression_event_idx(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    avail_event = driver._avail_event_at
    assert queue.set_kick_suppression(False) is False
    assert driver._used16[avail_event] == 0
    driver.add([(BUFS, 8)], [], 0)
    assert driver.kick_needed()  # crossed avail_event 0
    driver.add([(BUFS, 8)], [], 1)
    assert not driver.kick_needed()  # device has not re-armed
    assert len(queue.pop_many(8)) == 2
    assert queue.pop() is None  # empty: re-arms at avail idx 2
    assert driver._used16[avail_event] == 2
    driver.add([(BUFS, 8)], [], 2)
    assert driver.kick_needed()
    # Suppressed: emptying the ring does not re-arm.
    assert queue.set_kick_suppression(True) is True
    assert queue.pop() is not None and queue.pop() is None
    driver.add([(BUFS, 8)], [], 3)
    driver.add([(BUFS, 8)], [], 4)
    assert not driver.kick_needed()
    assert queue.set_kick_suppression(False) is True
    assert driver._used16[avail_event] == 5


def test_pop_rechecks_after_rearming(memory: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver publishing between our empty read and the avail_event write is not lost."""
    driver, queue = ring_pair(memory, 8)
    import vvu_runtime.virtio.split as split_mod

    def racing_barrier() -> None:
        if driver.avail_idx == 0:
            driver.add([(BUFS, 8)], [], 0)  # lands just before the re-read
    monkeypatch.setattr(split_mod, "memory_barrier", racing_barrier)
    assert queue.pop() is not None


# -- dirty log ----------------------------------------------------------------------------------

def page(gpa: int) -> int:
    return gpa // 0x1000


def test_dirty_log_marks_written_pages_and_the_used_ring(memory: GuestMemory) -> None:
    log_fd = os.memfd_create("dirty-log")
    log_size = (GPA + MEM_SIZE) // 0x1000 // 8 + 1
    os.ftruncate(log_fd, log_size)
    log = memory.dirty_log = DirtyLog(log_fd, log_size, 0)
    features = ALL | int(VhostFeature.LOG_ALL)
    driver, queue = ring_pair(memory, 8, features, log=True)

    def dirty_pages() -> set[int]:
        return {i * 8 + b for i, byte in enumerate(log.view) if byte for b in range(8)
                if byte >> b & 1}

    # The first writable buffer straddles a page boundary; of the second, only
    # the first 16 bytes are written.
    w1 = BUFS + 0x5000 - 0x800
    driver.add([(BUFS, 16)], [(w1, 0x1000), (BUFS + 0x20000, 0x1000)], 0)
    driver.add([(BUFS, 16)], [(BUFS + 0x30000, 0x1000)], 1)
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 0x1000 + 0x10)
    assert dirty_pages() == {page(w1), page(w1) + 1, page(BUFS + 0x20000),
                             page(driver.used_addr)}
    log.view[:] = bytes(log_size)
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 0)  # nothing written: only the used ring
    assert dirty_pages() == {page(driver.used_addr)}
    # The ring's log flag off: buffers only.
    log.view[:] = bytes(log_size)
    queue.set_log(True, RingAddresses(queue.addrs.desc, queue.addrs.avail, queue.addrs.used,
                                      queue.addrs.log_guest_addr, log=False))
    driver.get_used()
    driver.add([(BUFS, 16)], [(BUFS + 0x40000, 64)], 2)
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 64)
    assert dirty_pages() == {page(BUFS + 0x40000)}
    # LOG_ALL dropped: no logging at all.
    log.view[:] = bytes(log_size)
    queue.set_log(False)
    driver.get_used()
    driver.add([(BUFS, 16)], [(BUFS + 0x40000, 64)], 3)
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 64)
    assert dirty_pages() == set()
    memory.dirty_log = None
    log.close()
    os.close(log_fd)


def test_used_ring_log_goes_to_log_guest_addr(memory: GuestMemory) -> None:
    """log_guest_addr need not be the used ring's gpa (vhost-user.rst): we log there."""
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, 1 << 16)
    memory.dirty_log = DirtyLog(log_fd, 1 << 16, 0)
    driver, queue = ring_pair(memory, 8, ALL | int(VhostFeature.LOG_ALL), log=True)
    queue.set_log(True, RingAddresses(queue.addrs.desc, queue.addrs.avail, queue.addrs.used,
                                      log_guest_addr=0x4000_0000, log=True))
    driver.add([(BUFS, 16)], [], 0)
    queue.push_many((c, 0) for c in queue.pop_many(4))
    view = memory.dirty_log.view
    page = 0x4000_0000 // 0x1000
    assert view[page // 8] & (1 << page % 8)
    assert sum(bin(b).count("1") for b in view) == 1
    memory.dirty_log.close()
    memory.dirty_log = None
    os.close(log_fd)


# -- driver ring against a misbehaving device -----------------------------------------------

def test_driver_ring_full_and_device_lies(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    for k in range(4):
        driver.add([(BUFS, 8)], [], k)
    with pytest.raises(RingError, match="ring full"):
        driver.add([(BUFS, 8)], [], 9)
    with pytest.raises(ValueError):
        driver.add([], [], 9)
    # A used element naming a descriptor that is not a head in flight.
    queue._used64[0] = 7
    queue._used16[1] = 1
    with pytest.raises(RingError, match="descriptor 7"):
        driver.get_used()
    queue._used16[1] = 9
    with pytest.raises(RingError, match="4 chains in flight"):
        driver.get_used()


def test_driver_ring_over_a_bare_memoryview() -> None:
    buf = bytearray(0x4000)
    view = memoryview(buf)
    driver: SplitDriverRing[str] = SplitDriverRing.contiguous(view, 8, 0)
    head = driver.add([(0x2000, 4)], [(0x3000, 4)], "t")
    assert struct.unpack_from("<QIHH", buf, head * 16) == (0x2000, 4, N, 1)
    assert driver.avail_idx == 1
    with pytest.raises(GuestMemoryError):
        SplitDriverRing(view, 8, 0x3FF0, 0x100, 0x200)


# -- hostile memory ----------------------------------------------------------------------------

def mostly(plausible: st.SearchStrategy[int],
           wild: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Mostly plausible values, sometimes anything: walks get deep, edges still get hit."""
    return st.integers(0, 7).flatmap(lambda k: wild if k == 0 else plausible)


hostile_addr = mostly(st.sampled_from([BUFS + 0x100 * k for k in range(8)]
                                      + [INDIRECT_TABLES, INDIRECT_TABLES + 32]),
                      st.sampled_from([GPA + MEM_SIZE - 8, GPA - 8, 0, 2**64 - 16])
                      | st.integers(0, 2**64 - 1))
hostile_len = mostly(st.sampled_from([0, 1, 16, 32, 48, 64]),
                     st.sampled_from([4096, 16 * 1025, 2**32 - 1]) | st.integers(0, 2**32 - 1))
hostile_flags = mostly(st.sampled_from([0, N, W, N | W, N, N | W, I, I | W]),
                       st.sampled_from([I | N, 0xFFFF]) | st.integers(0, 0xFFFF))
hostile_next = mostly(st.integers(0, 3), st.integers(0, 0xFFFF))
hostile_desc = st.tuples(hostile_addr, hostile_len, hostile_flags, hostile_next)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=500,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from([1, 2, 4, 16]),
    ring=st.lists(hostile_desc, min_size=16, max_size=16),
    tables=st.lists(hostile_desc, min_size=8, max_size=8),
    heads=st.lists(mostly(st.integers(0, 15), st.integers(0, 0xFFFF)), min_size=16, max_size=16),
    avail_idx=mostly(st.integers(0, 16), st.integers(0, 0xFFFF)),
    features=st.sampled_from([ALL, ALL, ALL, 0, INDIRECT, EVENT_IDX]),
)
def test_hostile_rings_only_raise_virtio_errors(
    memory: GuestMemory, size: int, ring: list[tuple[int, int, int, int]],
    tables: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int, features: int,
) -> None:
    """Whatever the driver writes, the device gets valid chains or a VirtioError, in
    bounded time: never IndexError, struct.error, ValueError or a hang."""
    driver, queue = ring_pair(memory, size, features)
    for i, (addr, length, flags, nxt) in enumerate(ring[:size]):
        write_desc(memory, driver.desc_addr, i, addr, length, flags, nxt)
    # An indirect table area that indirect descriptors (INDIRECT_TABLES) land in.
    for i, (addr, length, flags, nxt) in enumerate(tables):
        write_desc(memory, INDIRECT_TABLES, i, addr, length, flags, nxt)
    for k, h in enumerate(heads[:size]):
        driver._avail16[2 + k] = h % size if h < 16 else h
    if avail_idx <= 16:  # mostly a plausible count, sometimes a jump
        avail_idx %= size + 1
    driver._avail16[1] = avail_idx
    seen = 0
    try:
        while (chain := queue.pop()) is not None:
            seen += 1
            assert seen <= size
            assert 0 <= chain.head < size
            assert 1 <= chain.ndescs <= size
            assert all(len(b) for b in chain.readable + chain.writable)
            wrote = chain.write(b"x" * chain.writable_len)
            assert wrote == chain.writable_len
            assert len(chain.read()) == chain.readable_len
            queue.push(chain, wrote)
        queue.should_notify()
    except VirtioError as exc:
        assert exc.queue == 3 and "queue 3" in str(exc)
