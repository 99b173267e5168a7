"""Inflight tracking (INFLIGHT_SHMFD): layout sizes, resubmission order, crash fix-ups."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvu_runtime.virtio.driver_ring import PackedDriverRing, SplitDriverRing
from vvu_runtime.virtio.errors import RingError
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.inflight import (
    PackedInflight,
    SplitInflight,
    inflight_queue_region_size,
    inflight_region_size,
)
from vvu_runtime.virtio.memory import GuestMemory, memfd_region
from vvu_runtime.virtio.packed import PACKED_INITIAL_BASE, PackedQueue
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses
from vvu_runtime.virtio.split import SplitQueue

GPA = 0x4000_0000
UVA = 0x7F55_0000_0000
RING = GPA + 0x1000
BUFS = GPA + 0x10_0000
FEATURES = int(VirtioFeature.EVENT_IDX | VirtioFeature.INDIRECT_DESC | VirtioFeature.VERSION_1)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mapped, fd = memfd_region(2 << 20, guest_phys_addr=GPA, userspace_addr=UVA)
    os.close(fd)
    mem.add(mapped)
    yield mem
    mem.clear()


def area(num_queues: int, queue_size: int) -> memoryview:
    return memoryview(bytearray(inflight_region_size(num_queues, queue_size)))


class Backend:
    """A back-end lifetime: a queue and its tracker over shared ring and inflight memory."""

    def __init__(self, memory: GuestMemory, driver: SplitDriverRing[int], region: memoryview,
                 size: int, base: int) -> None:
        addrs = RingAddresses(driver.desc_addr - GPA + UVA, driver.avail_addr - GPA + UVA,
                              driver.used_addr - GPA + UVA)
        self.queue = SplitQueue(0, size, addrs, memory, FEATURES, base)
        self.tracker = SplitInflight(region, size)
        self.resubmitted = self.tracker.resubmit(self.queue)

    def pop(self) -> DescriptorChain:
        chain = self.queue.pop()
        assert chain is not None
        self.tracker.fetched(chain)
        return chain

    def push(self, chain: DescriptorChain) -> None:
        self.tracker.completing(chain)
        self.queue.push(chain, 0)
        self.tracker.completed(chain)


def setup(memory: GuestMemory, size: int = 8, requests: int = 6) -> tuple[
        SplitDriverRing[int], memoryview, Backend]:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, size, RING, event_idx=True)
    for token in range(requests):
        driver.add([(BUFS + 64 * token, 8)], [], token)
    region = area(1, size)
    return driver, region, Backend(memory, driver, region, size, 0)


def test_region_sizes_match_libvhost_user_and_dpdk() -> None:
    for qs in (1, 2, 3, 4, 128, 256, 1024, 32768):
        split = inflight_queue_region_size(qs)
        assert split == -(-(16 * qs + 2) // 64) * 64  # libvhost-user
        assert split == -(-(16 * qs + 16) // 64) * 64  # DPDK, the same numbers
        assert split >= 16 + 16 * qs
        packed = inflight_queue_region_size(qs, packed=True)
        assert packed == -(-(32 * qs + 29) // 64) * 64 and packed >= 32 + 32 * qs
    assert inflight_region_size(2, 128) == 2 * 2112
    with pytest.raises(RingError):
        inflight_region_size(0, 128)
    with pytest.raises(RingError):
        SplitInflight(memoryview(bytearray(64)), 8)


def test_fresh_region_is_initialised(memory: GuestMemory) -> None:
    _, region, backend = setup(memory)
    assert backend.resubmitted == []
    assert backend.tracker.initialized
    assert region[8:12].cast("H").tolist() == [1, 8]  # version, desc_num


def test_resubmission_in_submission_order_after_a_crash(memory: GuestMemory) -> None:
    driver, region, old = setup(memory, requests=6)
    chains = [old.pop() for _ in range(5)]
    heads = [c.head for c in chains]
    old.push(chains[1])
    old.push(chains[3])
    assert [t for t, _ in driver.get_used()] == [1, 3]
    # Crash. QEMU could not GET_VRING_BASE: it sends used->idx as the base.
    new = Backend(memory, driver, region, 8, base=old.queue.used_idx)
    assert [c.head for c in new.resubmitted] == [heads[0], heads[2], heads[4]]
    assert new.queue.last_avail_idx == 5  # past the resubmitted entries
    fresh = new.pop()
    assert fresh.head == 5 and new.queue.pop() is None
    for chain in [*new.resubmitted, fresh]:
        new.push(chain)
    assert sorted(t for t, _ in driver.get_used()) == [0, 2, 4, 5]
    # Counters kept increasing: a second crash now finds nothing inflight.
    assert Backend(memory, driver, region, 8, base=new.queue.used_idx).resubmitted == []


def test_counter_order_survives_reconnect_and_new_fetches(memory: GuestMemory) -> None:
    driver, region, old = setup(memory, requests=6)
    a, b = old.pop(), old.pop()
    new = Backend(memory, driver, region, 8, base=old.queue.used_idx)
    assert [c.head for c in new.resubmitted] == [a.head, b.head]
    c = new.pop()
    newer = Backend(memory, driver, region, 8, base=new.queue.used_idx)
    assert [x.head for x in newer.resubmitted] == [a.head, b.head, c.head]


def test_crash_after_publishing_before_clearing(memory: GuestMemory) -> None:
    """used->idx moved but the inflight flags were not cleared: the last batch is done."""
    driver, region, old = setup(memory)
    chains = [old.pop() for _ in range(4)]
    old.tracker.complete(chains[0].head)
    old.queue.push(chains[0], 0)
    old.tracker.commit(old.queue.used_idx)
    # A batch of two published, then the crash before commit():
    for chain in (chains[2], chains[1]):
        old.tracker.complete(chain.head)
    old.queue.push_many([(chains[2], 0), (chains[1], 0)])
    new = Backend(memory, driver, region, 8, base=old.queue.used_idx)
    assert [c.head for c in new.resubmitted] == [chains[3].head]
    assert new.tracker.used_idx == 3


def test_crash_before_publishing(memory: GuestMemory) -> None:
    """complete() was called but the used idx never moved: still inflight."""
    driver, region, old = setup(memory)
    chains = [old.pop() for _ in range(2)]
    old.tracker.complete(chains[0].head)
    new = Backend(memory, driver, region, 8, base=0)
    assert [c.head for c in new.resubmitted] == [chains[0].head, chains[1].head]


def test_region_of_another_queue_size_is_refused(memory: GuestMemory) -> None:
    region = area(1, 16)
    tracker = SplitInflight(region, 16)
    tracker.pending(0)
    with pytest.raises(RingError, match="queue of 16 entries, this queue has 8"):
        SplitInflight(region, 8).pending(0)


def test_for_queues_slices_the_area() -> None:
    a = area(3, 64)
    trackers = SplitInflight.for_queues(a, 3, 64)
    for t in trackers:
        t.pending(0)
    trackers[1].begin(5)
    assert trackers[0].pending(0) == [] and trackers[2].pending(0) == []
    assert SplitInflight.for_queues(a, 3, 64)[1].pending(0) == [5]
    with pytest.raises(RingError):
        SplitInflight.for_queues(a, 4, 64)


def test_resubmit_needs_a_split_queue() -> None:
    tracker = SplitInflight(area(1, 8), 8)
    with pytest.raises(RingError, match="not a split ring"):
        tracker.resubmit(object())  # type: ignore[arg-type]


ops = st.lists(st.tuples(st.sampled_from(["pop", "push", "batch"]), st.integers(0, 7)),
               max_size=60)


@settings(max_examples=80, deadline=2000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lifetimes=st.lists(st.tuples(ops, st.sampled_from(["clean", "published", "completing"])),
                          min_size=1, max_size=4))
def test_model(memory: GuestMemory, lifetimes: list[tuple[list[tuple[str, int]], str]]) -> None:
    """Across back-end crashes, what is resubmitted is exactly what was taken and not
    returned to the driver, in the order it was taken."""
    size = 8
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, size, RING, event_idx=True)
    region = area(1, size)
    taken: list[int] = []  # heads in fetch order, not yet visible as used to the driver
    backend = Backend(memory, driver, region, size, 0)
    token = 0
    for script, crash in lifetimes:
        # Keep the driver's ring full.
        while driver.num_free:
            driver.add([(BUFS, 8)], [], token)
            token += 1
        held = list(backend.resubmitted)
        assert [c.head for c in held] == taken
        for op, arg in script:
            if op == "pop":
                chain = backend.queue.pop()
                if chain is not None:
                    backend.tracker.fetched(chain)
                    held.append(chain)
                    taken.append(chain.head)
            elif held and op == "push":
                chain = held.pop(arg % len(held))
                backend.push(chain)
                taken.remove(chain.head)
            elif held and op == "batch":
                batch = [held.pop(arg % len(held)) for _ in range(min(len(held), 1 + arg % 3))]
                for chain in batch:
                    backend.tracker.completing(chain)
                backend.queue.push_many((c, 0) for c in batch)
                backend.tracker.commit(backend.queue.used_idx)
                for chain in batch:
                    taken.remove(chain.head)
        if held and crash != "clean":
            # Die in the middle of returning one more chain.
            chain = held.pop()
            backend.tracker.completing(chain)
            if crash == "published":
                backend.queue.push(chain, 0)
                taken.remove(chain.head)
        driver.get_used()
        backend = Backend(memory, driver, region, size, base=backend.queue.used_idx)
    assert [c.head for c in backend.resubmitted] == taken


# -- packed --------------------------------------------------------------------------------

PACKED_FEATURES = FEATURES | int(VirtioFeature.RING_PACKED)


class PackedBackend:
    def __init__(self, memory: GuestMemory, driver: PackedDriverRing[int], region: memoryview,
                 size: int, base: int = PACKED_INITIAL_BASE) -> None:
        addrs = RingAddresses(driver.desc_addr - GPA + UVA, driver.driver_area - GPA + UVA,
                              driver.device_area - GPA + UVA)
        self.queue = PackedQueue(0, size, addrs, memory, PACKED_FEATURES, base)
        self.tracker = PackedInflight(region, size)
        self.resubmitted = self.tracker.resubmit(self.queue)

    def pop(self) -> DescriptorChain | None:
        chain = self.queue.pop()
        if chain is not None:
            self.tracker.fetched(chain)
        return chain

    def push(self, chain: DescriptorChain, written: int = 0) -> None:
        self.tracker.completing(chain)
        self.queue.push(chain, written)
        self.tracker.completed(chain)


def packed_area(size: int) -> memoryview:
    return memoryview(bytearray(inflight_region_size(1, size, packed=True)))


def test_packed_resubmission_rebuilds_chains_from_copies(memory: GuestMemory) -> None:
    size = 4
    driver: PackedDriverRing[int] = PackedDriverRing.contiguous(memory, size, RING,
                                                                event_idx=True)
    region = packed_area(size)
    old = PackedBackend(memory, driver, region, size)
    assert old.resubmitted == [] and old.tracker.initialized
    memory.translate(BUFS, 8)[:] = b"ABCDEFGH"
    driver.add([(BUFS, 4), (BUFS + 4, 4)], [(BUFS + 64, 8)], 1)  # slots 0-2
    driver.add([(BUFS, 2)], [], 2)  # slot 3
    a, b = old.pop(), old.pop()
    assert a is not None and b is not None
    old.push(b)
    assert driver.get_used() == [(2, 0)]
    # The driver reuses the slot b came back in: the ring no longer shows it.
    driver.add([(BUFS + 6, 2)], [], 3)
    # Crash; the front-end's base is stale (QEMU keeps the one from ring start).
    new = PackedBackend(memory, driver, region, size)
    assert [c.head for c in new.resubmitted] == [a.head]
    again = new.resubmitted[0]
    assert again.read() == b"ABCDEFGH" and again.writable_len == 8 and again.ndescs == 3
    # Positions: used after b's used descriptor (written at slot 0, one slot: b's
    # ndescs), avail past the three slots a still holds.
    assert (new.queue.used_idx, new.queue.used_wrap) == (1, 1)
    assert (new.queue.last_avail_idx, new.queue.avail_wrap) == (0, 0)
    c = new.pop()
    assert c is not None and c.read() == b"GH"
    new.push(c)
    new.push(again, 8)
    assert sorted(t for t, _ in driver.get_used()) == [1, 3]
    assert PackedBackend(memory, driver, region, size).resubmitted == []


@pytest.mark.timeout(120)
@settings(max_examples=80, deadline=3000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([2, 3, 5, 8]),
       lifetimes=st.lists(st.tuples(ops, st.sampled_from(
           ["clean", "completing", "published", "popped"])), min_size=1, max_size=5),
       chain_len=st.integers(1, 3))
def test_packed_model(memory: GuestMemory, size: int,
                      lifetimes: list[tuple[list[tuple[str, int]], str]], chain_len: int) -> None:
    """Packed: resubmitted = recorded and not completed, in fetch order, whatever the
    crash point; a chain popped but never recorded is simply popped again."""
    chain_len = min(chain_len, size)
    driver: PackedDriverRing[int] = PackedDriverRing.contiguous(memory, size, RING,
                                                                event_idx=True)
    region = packed_area(size)
    backend = PackedBackend(memory, driver, region, size)
    taken: list[int] = []
    unrecorded: int | None = None
    token = 0
    for script, crash in lifetimes:
        while driver.num_free >= chain_len:
            driver.add([(BUFS + 8 * k, 8) for k in range(chain_len)], [], token)
            token += 1
        held = list(backend.resubmitted)
        assert [c.head for c in held] == taken
        if unrecorded is not None:
            chain = backend.pop()
            assert chain is not None and chain.head == unrecorded
            held.append(chain)
            taken.append(chain.head)
            unrecorded = None
        for op, arg in script:
            if op == "pop":
                chain = backend.pop()
                if chain is not None:
                    held.append(chain)
                    taken.append(chain.head)
            elif held:
                for _ in range(1 if op == "push" else 1 + arg % 3):
                    if not held:
                        break
                    chain = held.pop(arg % len(held))
                    backend.push(chain)
                    taken.remove(chain.head)
            if op == "push" and arg == 7:
                driver.get_used()  # the driver recycles slots now and then
                while driver.num_free >= chain_len:
                    driver.add([(BUFS + 8 * k, 8) for k in range(chain_len)], [], token)
                    token += 1
        if crash == "popped":
            chain = backend.queue.pop()  # died before recording it
            if chain is not None:
                unrecorded = chain.head
        elif held and crash != "clean":
            chain = held.pop()
            backend.tracker.completing(chain)
            if crash == "published":
                backend.queue.push(chain, 0)
                taken.remove(chain.head)
        driver.get_used()
        backend = PackedBackend(memory, driver, region, size)
    assert [c.head for c in backend.resubmitted] == taken
