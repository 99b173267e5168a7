"""Packed rings: PackedDriverRing ↔ PackedQueue over a memfd-backed GuestMemory."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvu_runtime.virtio.driver_ring import PackedDriverRing
from vvu_runtime.virtio.errors import DescriptorError, GuestMemoryError, RingError, VirtioError
from vvu_runtime.virtio.features import DescFlag, PackedEventFlag, VhostFeature, VirtioFeature
from vvu_runtime.virtio.memory import DirtyLog, GuestMemory, memfd_region
from vvu_runtime.virtio.packed import (
    PACKED_DESC,
    PACKED_INITIAL_BASE,
    PackedQueue,
    decode_packed_base,
    encode_packed_base,
)
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses

GPA = 0x8000_0000
UVA = 0x7F33_0000_0000
MEM_SIZE = 4 << 20
RING = GPA + 0x1000
BUFS = GPA + 0x10_0000
TABLES = GPA + 0x30_0000

ALL = int(VirtioFeature.EVENT_IDX | VirtioFeature.INDIRECT_DESC | VirtioFeature.VERSION_1
          | VirtioFeature.RING_PACKED)
NO_EVENT = int(VirtioFeature.INDIRECT_DESC | VirtioFeature.RING_PACKED)
N = int(DescFlag.NEXT)
W = int(DescFlag.WRITE)
I = int(DescFlag.INDIRECT)  # noqa: E741
A = int(DescFlag.AVAIL)
U = int(DescFlag.USED)


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


def ring_pair(memory: GuestMemory, size: int = 8, features: int = ALL,
              base: int = PACKED_INITIAL_BASE) -> tuple[PackedDriverRing[int], PackedQueue]:
    driver: PackedDriverRing[int] = PackedDriverRing.contiguous(
        memory, size, RING, event_idx=bool(features & VirtioFeature.EVENT_IDX))
    addrs = RingAddresses(uva(driver.desc_addr), uva(driver.driver_area), uva(driver.device_area))
    return driver, PackedQueue(5, size, addrs, memory, features, base)


def fill(memory: GuestMemory, gpa: int, data: bytes) -> None:
    memory.translate(gpa, len(data))[:] = data


def put(memory: GuestMemory, slot: int, addr: int, length: int, buf_id: int, flags: int,
        table: int = RING) -> None:
    PACKED_DESC.pack_into(memory.translate(table + 16 * slot, 16), 0, addr, length, buf_id, flags)


# -- base encoding ------------------------------------------------------------------------

def test_base_encoding() -> None:
    assert PACKED_INITIAL_BASE == encode_packed_base(0, 1, 0, 1) == 0x8000_8000
    assert decode_packed_base(encode_packed_base(5, 0, 3, 1)) == (5, 0, 3, 1)
    assert decode_packed_base(0x8005) == (5, 1, 5, 1)  # no used half: used = avail
    assert decode_packed_base(0) == (0, 0, 0, 0)


@pytest.mark.parametrize("size", [0, 32769, -1])
def test_bad_sizes(memory: GuestMemory, size: int) -> None:
    with pytest.raises(RingError, match="queue 1: packed ring size"):
        PackedQueue(1, size, RingAddresses(uva(RING), uva(RING + 0x800), uva(RING + 0x804)),
                    memory, ALL)


def test_odd_sizes_are_fine_and_bases_are_checked(memory: GuestMemory) -> None:
    addrs = RingAddresses(uva(RING), uva(RING + 0x800), uva(RING + 0x804))
    assert PackedQueue(1, 3, addrs, memory, ALL).size == 3
    with pytest.raises(RingError, match="names index 3 in a ring of 3"):
        PackedQueue(1, 3, addrs, memory, ALL, encode_packed_base(3, 1, 0, 1))


def test_ring_outside_memory_and_misaligned(memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="queue 1: descriptor ring"):
        PackedQueue(1, 64, RingAddresses(UVA + MEM_SIZE - 16, uva(RING), uva(RING + 4)),
                    memory, ALL)
    with pytest.raises(GuestMemoryError, match="device event area"):
        PackedQueue(1, 64, RingAddresses(uva(RING), uva(RING + 0x800), UVA + MEM_SIZE),
                    memory, ALL)
    with pytest.raises(RingError, match=r"driver event area address .* not 4-byte aligned"):
        PackedQueue(1, 64, RingAddresses(uva(RING), uva(RING + 0x802), uva(RING + 0x808)),
                    memory, ALL)


# -- round trips --------------------------------------------------------------------------

@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=3000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([1, 2, 3, 4, 7, 16, 33]), seed=st.integers(0, 2**32),
       use_indirect=st.booleans(), rounds=st.integers(1, 60))
def test_round_trip_with_wrap_around(memory: GuestMemory, size: int, seed: int,
                                     use_indirect: bool, rounds: int) -> None:
    """Several laps of the ring, chains of several descriptors wrapping at the end,
    completion out of order (the device holds some buffers across rounds)."""
    rng = random.Random(seed)
    driver, queue = ring_pair(memory, size)
    expected: dict[int, tuple[bytes, int]] = {}
    returned: list[int] = []
    held: list[DescriptorChain] = []
    # Buffer slots of requests in flight (at most ``size`` < 64): a held chain can
    # outlive many later tokens, so slots are recycled on completion, not by token.
    free_slots = list(range(64))
    slot_of: dict[int, int] = {}
    token = 0
    for _ in range(rounds):
        # Driver: a few requests.
        for _ in range(rng.randint(0, 3)):
            nr, nw = rng.randint(1, 3), rng.randint(0, 2)
            need = 1 if use_indirect else nr + nw
            if need > driver.num_free or need > size:
                break
            slot = slot_of[token] = free_slots.pop(0)
            # The first buffer starts with the token: chains are told apart by it.
            readable = [(BUFS + 0x1000 * slot + 64 * k, rng.randint(4 if k == 0 else 1, 40))
                        for k in range(nr)]
            writable = [(BUFS + 0x80000 + 0x1000 * slot + 64 * k, rng.randint(1, 40))
                        for k in range(nw)]
            payload = b""
            for k, (addr, n) in enumerate(readable):
                data = bytes(rng.randrange(256) for _ in range(n))
                if k == 0:
                    data = token.to_bytes(4, "little") + data[4:]
                fill(memory, addr, data)
                payload += data
            expected[token] = (payload, sum(n for _, n in writable))
            if use_indirect:
                driver.add_indirect(readable, writable, token, TABLES + 0x100 * slot)
            else:
                driver.add(readable, writable, token)
            token += 1
        driver.kick_needed()
        # Device: take everything, complete a random subset (the rest later).
        while (chain := queue.pop()) is not None:
            held.append(chain)
        rng.shuffle(held)
        keep = rng.randint(0, len(held))
        for chain in held[keep:]:
            data = chain.read()
            payload, wlen = expected[int.from_bytes(data[:4], "little")]
            assert data == payload and chain.writable_len == wlen
            queue.push(chain, chain.write(b"\x5a" * wlen))
        del held[keep:]
        queue.should_notify()
        for tok, written in driver.get_used():
            assert written == expected[tok][1]
            returned.append(tok)
            free_slots.append(slot_of.pop(tok))
    for chain in held:
        queue.push(chain, 0)
    returned += [t for t, _ in driver.get_used()]
    assert sorted(returned) == list(range(token))
    assert driver.num_free == size and queue.pop() is None


def test_chain_wrapping_the_ring_end_and_buffer_id_from_last(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    for k in range(3):
        driver.add([(BUFS, 4)], [], k)
    for _ in range(3):
        chain = queue.pop()
        assert chain is not None
        queue.push(chain, 0)
    driver.get_used()
    # Slots 3, 0, 1: the chain crosses the end (the wrap flips mid-chain).
    fill(memory, BUFS, b"abcdefghijkl")
    buf_id = driver.add([(BUFS, 4), (BUFS + 4, 4)], [(BUFS + 64, 4)], 99)
    chain = queue.pop()
    assert chain is not None and chain.head == buf_id and chain.ndescs == 3
    assert chain.read() == b"abcdefgh"
    assert queue.last_avail_idx == 2 and queue.avail_wrap == 0
    queue.push(chain, 4)
    assert driver.get_used() == [(99, 4)]
    assert queue.used_idx == 2 and queue.used_wrap == 0


def test_resume_from_base(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 5)
    for lap in range(3):
        for k in range(4):
            driver.add([(BUFS + 64 * k, 8)], [], lap * 10 + k)
        chains = [queue.pop() for _ in range(4)]
        for c in chains:
            assert c is not None
            queue.push(c, 0)
        driver.get_used()
    driver.add([(BUFS, 8)], [], 100)
    base = queue.get_base()
    assert decode_packed_base(base) == (2, 1, 2, 1)  # 12 slots: two laps and two
    resumed = PackedQueue(5, 5, queue.addrs, memory, ALL, base)
    chain = resumed.pop()
    assert chain is not None and chain.read() == bytes(memory.translate(BUFS, 8))
    resumed.push(chain, 0)
    assert driver.get_used() == [(100, 0)]


def test_indirect(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    fill(memory, BUFS, b"xyz!")
    # Entries carry stray NEXT/INDIRECT/id bits: reserved in a packed table, ignored.
    put(memory, 0, BUFS, 2, 77, N | I, table=TABLES)
    put(memory, 1, BUFS + 2, 2, 0, 0, table=TABLES)
    put(memory, 2, BUFS + 64, 8, 0, W | N, table=TABLES)
    put(memory, 0, TABLES, 48, 6, I | A | W)  # WRITE on the indirect descriptor: ignored
    chain = queue.pop()
    assert chain is not None and chain.head == 6 and chain.ndescs == 1
    assert chain.read() == b"xyz!" and chain.writable_len == 8
    del driver


def test_zero_length_descriptors_skipped(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    put(memory, 1, BUFS, 4, 3, W | A)
    put(memory, 0, 0xDEAD_0000_0000, 0, 3, N | A)
    chain = queue.pop()
    assert chain is not None and chain.readable == [] and chain.writable_len == 4
    assert chain.ndescs == 2
    del driver


# -- rejections --------------------------------------------------------------------------

def reject(memory: GuestMemory, descs: list[tuple[int, int, int, int, int]],
           features: int = ALL, size: int = 4) -> VirtioError:
    driver, queue = ring_pair(memory, size, features)
    for slot, addr, length, buf_id, flags in descs:
        put(memory, slot, addr, length, buf_id, flags)
    with pytest.raises(VirtioError) as info:
        queue.pop()
    assert info.value.queue == 5 and "queue 5" in str(info.value)
    del driver
    return info.value


def test_reject_chain_around_the_ring(memory: GuestMemory) -> None:
    err = reject(memory, [(k, BUFS, 4, 0, N | A) for k in range(4)])
    assert isinstance(err, DescriptorError) and "more than 4 descriptors" in str(err)


def test_reject_readable_after_writable(memory: GuestMemory) -> None:
    err = reject(memory, [(0, BUFS, 4, 0, W | N | A), (1, BUFS, 4, 0, A)])
    assert isinstance(err, DescriptorError) and "readable descriptor 1" in str(err)
    put(memory, 0, BUFS, 4, 0, W, table=TABLES)
    put(memory, 1, BUFS, 4, 0, 0, table=TABLES)
    err = reject(memory, [(0, TABLES, 32, 0, I | A)])
    assert isinstance(err, DescriptorError) and "readable indirect descriptor 1" in str(err)


def test_reject_bad_indirect(memory: GuestMemory) -> None:
    for length in (0, 8, 24):
        err = reject(memory, [(0, TABLES, length, 0, I | A)])
        assert "not a positive multiple of 16" in str(err)
    err = reject(memory, [(0, TABLES, 16 * 1025, 0, I | A)])
    assert "1025 entries" in str(err)
    err = reject(memory, [(0, TABLES, 32, 0, I | N | A), (1, BUFS, 4, 0, A)])
    assert "both INDIRECT and NEXT" in str(err)
    err = reject(memory, [(0, TABLES, 32, 0, I | A)], features=int(VirtioFeature.RING_PACKED))
    assert "INDIRECT_DESC was not negotiated" in str(err)
    err = reject(memory, [(0, GPA + MEM_SIZE - 16, 32, 0, I | A)])
    assert isinstance(err, GuestMemoryError)


def test_reject_out_of_bounds(memory: GuestMemory) -> None:
    err = reject(memory, [(0, GPA + MEM_SIZE - 2, 4, 9, A)])
    assert isinstance(err, GuestMemoryError) and err.head == 9
    err = reject(memory, [(0, BUFS, 4, 0, N | A), (1, 2**64 - 1, 4, 0, A)])
    assert isinstance(err, GuestMemoryError) and "descriptor 1" in str(err)


def test_not_available_patterns(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    for flags in (0, U, A | U, U | N):
        put(memory, 0, BUFS, 4, 0, flags)
        assert not queue.has_available() and queue.pop() is None
    put(memory, 0, BUFS, 4, 0, A)
    assert queue.has_available()
    del driver


# -- notifications -----------------------------------------------------------------------

def serve(driver: PackedDriverRing[int], queue: PackedQueue, n: int) -> None:
    for k in range(n):
        driver.add([(BUFS + 8 * k, 8)], [], k)
    for _ in range(n):
        chain = queue.pop()
        assert chain is not None
        queue.push(chain, 0)


def test_should_notify_enable_disable(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8, NO_EVENT)
    assert not queue.should_notify()
    serve(driver, queue, 2)
    assert queue.should_notify()  # driver area zeroed: ENABLE
    driver.get_used()
    driver.disable_interrupts()
    serve(driver, queue, 2)
    assert not queue.should_notify()
    assert driver.enable_interrupts()  # two used buffers wait already
    driver.get_used()
    serve(driver, queue, 1)
    assert queue.should_notify()


def test_should_notify_desc_event_across_the_wrap(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 8)
    drv = driver._drv16

    serve(driver, queue, 6)
    assert queue.should_notify()  # first decision: always
    driver.get_used()
    drv[1] = PackedEventFlag.DESC
    drv[0] = 7 | 1 << 15  # when used passes slot 7 of this lap
    serve(driver, queue, 1)  # used 6 -> 7
    assert not queue.should_notify()
    serve(driver, queue, 2)  # used 7 -> 1 of the next lap: passed 7
    assert queue.should_notify()
    driver.get_used()
    drv[0] = 3 | 0 << 15  # slot 3 of the current lap (wrap 0)
    serve(driver, queue, 1)  # 1 -> 2
    assert not queue.should_notify()
    serve(driver, queue, 2)  # 2 -> 4
    assert queue.should_notify()
    driver.get_used()
    drv[0] = 2 | 1 << 15  # slot 2 of the next lap
    serve(driver, queue, 3)  # 4 -> 7
    assert not queue.should_notify()
    serve(driver, queue, 3)  # 7 -> 2 (wrap 1): reaches 2 but not past it
    assert not queue.should_notify()
    serve(driver, queue, 1)  # 2 -> 3: passes 2
    assert queue.should_notify()
    # The driver's own enable_interrupts arms at its last_used, i.e. the next buffer.
    driver.get_used()
    assert not driver.enable_interrupts()
    serve(driver, queue, 1)
    assert queue.should_notify()


def test_kick_suppression_and_rearm(memory: GuestMemory) -> None:
    driver, queue = ring_pair(memory, 4)
    dev = driver._dev16
    assert queue.set_kick_suppression(True) is False
    assert dev[1] == PackedEventFlag.DISABLE
    driver.add([(BUFS, 8)], [], 0)
    assert not driver.kick_needed()
    assert queue.set_kick_suppression(False) is True
    assert dev[1] == PackedEventFlag.DESC and dev[0] == 0 | 1 << 15
    chain = queue.pop()
    assert chain is not None and queue.pop() is None  # empty: re-armed at slot 1
    assert dev[0] == 1 | 1 << 15
    driver.add([(BUFS, 8)], [], 1)
    assert driver.kick_needed()
    driver.add([(BUFS, 8)], [], 2)
    assert not driver.kick_needed()  # not re-armed while the device has not looked
    # Without EVENT_IDX: plain ENABLE.
    driver2, queue2 = ring_pair(memory, 4, NO_EVENT)
    queue2.set_kick_suppression(True)
    queue2.set_kick_suppression(False)
    assert driver2._dev16[1] == PackedEventFlag.ENABLE
    driver2.add([(BUFS, 8)], [], 0)
    assert driver2.kick_needed()


# -- dirty log ----------------------------------------------------------------------------

def test_dirty_log(memory: GuestMemory) -> None:
    fd = os.memfd_create("log")
    size = (GPA + MEM_SIZE) // 0x1000 // 8 + 1
    os.ftruncate(fd, size)
    log = memory.dirty_log = DirtyLog(fd, size, 0)
    driver, queue = ring_pair(memory, 8, ALL | int(VhostFeature.LOG_ALL))
    driver.add([(BUFS, 8)], [(BUFS + 0x3000 - 8, 16)], 0)
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 12)
    pages = {i * 8 + b for i, byte in enumerate(log.view) for b in range(8) if byte >> b & 1}
    assert pages == {(BUFS + 0x2000) // 0x1000, (BUFS + 0x3000) // 0x1000, RING // 0x1000}
    memory.dirty_log = None
    log.close()
    os.close(fd)


# -- hostile memory ----------------------------------------------------------------------

@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=500,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([1, 2, 3, 8]),
       ring=st.lists(st.tuples(
           st.sampled_from([BUFS, TABLES, GPA + MEM_SIZE - 8, 0]) | st.integers(0, 2**64 - 1),
           st.sampled_from([0, 4, 16, 32]) | st.integers(0, 2**32 - 1),
           st.integers(0, 0xFFFF),
           st.sampled_from([A, A | N, A | W, A | N | W, A | I, U, 0]) | st.integers(0, 0xFFFF)),
           min_size=8, max_size=8),
       table=st.binary(min_size=64, max_size=64),
       base=st.sampled_from([PACKED_INITIAL_BASE, 0]) | st.integers(0, 2**32 - 1),
       features=st.sampled_from([ALL, NO_EVENT, int(VirtioFeature.RING_PACKED)]))
def test_hostile_rings_only_raise_virtio_errors(
    memory: GuestMemory, size: int, ring: list[tuple[int, int, int, int]], table: bytes,
    base: int, features: int,
) -> None:
    driver, _ = ring_pair(memory, size, features)
    for slot, (addr, length, buf_id, flags) in enumerate(ring[:size]):
        put(memory, slot, addr, length, buf_id, flags)
    fill(memory, TABLES, table)
    try:
        queue = PackedQueue(5, size, RingAddresses(uva(driver.desc_addr), uva(driver.driver_area),
                                                   uva(driver.device_area)), memory, features,
                            base)
        for _ in range(2 * size + 2):  # a packed ring can be re-offered as we go
            chain = queue.pop()
            if chain is None:
                break
            assert 1 <= chain.ndescs <= size
            assert chain.write(b"y" * chain.writable_len) == chain.writable_len
            assert len(chain.read()) == chain.readable_len
            queue.push(chain, chain.writable_len)
        queue.should_notify()
        queue.set_kick_suppression(False)
    except VirtioError as exc:
        assert exc.queue == 5 and "queue 5" in str(exc)
