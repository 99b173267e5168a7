"""A back-end that outlives its connection: chains it completes after the front-end
saved the base must not run (and be handed to the driver) a second time.

The situation, from the soak: vvu-devd is killed, the consumer's QEMU reads the used
idx as the next base (no GET_VRING_BASE without a back-end), and the appliance's
vvu-blk, still running until the appliance is stopped, completes the request it had
popped. The next session starts with the used idx one past the base; before the fix
the new back-end ran that request again and pushed its head twice, which Linux
virtio_blk takes as a broken ring (I/O errors on the disk from then on).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vvu_runtime.vhost_user.transport import Notifier
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio.driver_ring import SplitDriverRing
from vvu_runtime.virtio.errors import GuestMemoryError
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, memfd_region
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.split import SplitQueue

GPA = 0x4000_0000
UVA = 0x7F55_0000_0000
RING = GPA + 0x1000
BUFS = GPA + 0x10_0000
SIZE = 8
FEATURES = int(VirtioFeature.EVENT_IDX | VirtioFeature.VERSION_1)


class CountingCall(Notifier):
    def __init__(self) -> None:
        self.signals = 0

    def signal(self) -> None:
        self.signals += 1


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mapped, fd = memfd_region(2 << 20, guest_phys_addr=GPA, userspace_addr=UVA)
    os.close(fd)
    mem.add(mapped)
    yield mem
    mem.clear()


def addresses(driver: SplitDriverRing[int]) -> RingAddresses:
    return RingAddresses(driver.desc_addr - GPA + UVA, driver.avail_addr - GPA + UVA,
                         driver.used_addr - GPA + UVA)


def new_session(memory: GuestMemory, driver: SplitDriverRing[int], base: int,
                call: Notifier | None) -> Vring:
    vring = Vring(0, "blk")
    vring.size = SIZE
    vring.addresses = addresses(driver)
    vring.base = base
    vring.features = FEATURES
    vring.kick_nofd = True
    vring.call = call
    vring.start(memory)
    return vring


def serve_all(vring: Vring) -> list[int]:
    """What the new back-end runs: every chain it pops, pushed at once."""
    ran = []
    while (chain := vring.pop()) is not None:
        ran.append(chain.head)
        vring.push(chain, 0)
    return ran


def completions(driver: SplitDriverRing[int]) -> list[int]:
    return sorted(token for token, _ in driver.get_used())


def test_a_chain_completed_after_the_base_was_saved_runs_once(memory: GuestMemory) -> None:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    for token in range(3):
        driver.add([(BUFS + 64 * token, 8)], [], token)
    old = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    first, second = old.pop(), old.pop()
    assert first is not None and second is not None
    saved_base = old.used_idx  # what QEMU keeps when the connection drops: 0
    old.push(second, 0)  # ...and the orphaned back-end completes one more, out of order

    call = CountingCall()
    vring = new_session(memory, driver, saved_base, call)
    assert call.signals == 1  # the orphan's call may have been lost: the driver is woken
    ran = serve_all(vring)
    assert second.head not in ran and first.head in ran
    # Each request completed exactly once, the orphan's one included.
    assert completions(driver) == [0, 1, 2]
    assert vring.stop() == 3  # the base of a later session: past all three


def test_without_late_completions_nothing_is_skipped(memory: GuestMemory) -> None:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    for token in range(3):
        driver.add([(BUFS + 64 * token, 8)], [], token)
    old = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    assert old.pop() is not None  # popped, never completed: runs again
    vring = new_session(memory, driver, old.used_idx, CountingCall())
    assert serve_all(vring) == [0, 1, 2]
    assert completions(driver) == [0, 1, 2]


def test_a_head_reused_after_its_late_completion_runs_again(memory: GuestMemory) -> None:
    """The driver saw the orphan's completion and put the same head back: the first
    occurrence in the avail ring is the completed one, the second is new work."""
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    driver.add([(BUFS, 8)], [], 0)
    old = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    chain = old.pop()
    assert chain is not None
    old.push(chain, 0)
    assert [t for t, _ in driver.get_used()] == [0]  # the driver takes it...
    head = driver.add([(BUFS, 8)], [], 1)  # ...and may reuse descriptor 0 for new work
    vring = new_session(memory, driver, 0, None)
    assert vring.missed_call  # no call fd yet: signalled when one arrives
    assert serve_all(vring) == [head]  # the new request, once
    assert [t for t, _ in driver.get_used()] == [1]


def test_a_used_idx_beyond_the_ring_size_is_not_taken_as_late_completions(
        memory: GuestMemory) -> None:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    queue = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    queue.used_idx = SIZE + 1  # a garbage position, not an orphan's work
    assert queue.completed_past_base() == []
    queue.used_idx = SIZE
    assert len(queue.completed_past_base()) == SIZE


def test_a_completion_whose_call_was_lost_is_signalled_by_the_next_start(
        memory: GuestMemory) -> None:
    """The orphan completed its last request before the front-end read the used idx
    (so the base is right) but its call went to the dead vvu-devd: without a call at
    start the driver waits for that request forever (the soak's second stall)."""
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    driver.add([(BUFS, 8)], [], 0)
    old = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    chain = old.pop()
    assert chain is not None
    old.push(chain, 0)  # ...and its call is lost
    call = CountingCall()
    vring = new_session(memory, driver, old.used_idx, call)
    assert serve_all(vring) == []  # nothing to run...
    assert call.signals == 1  # ...but the driver is told to look at the used ring
    assert completions(driver) == [0]


def test_a_ring_whose_driver_saw_everything_is_not_signalled(memory: GuestMemory) -> None:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    call = CountingCall()
    new_session(memory, driver, 0, call).stop()  # a fresh ring: nothing owed
    driver.add([(BUFS, 8)], [], 0)
    old = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    chain = old.pop()
    assert chain is not None
    old.push(chain, 0)
    assert completions(driver) == [0]  # the driver took it (and moved used_event)
    new_session(memory, driver, old.used_idx, call)
    assert call.signals == 0


def test_without_event_idx_a_used_ring_with_entries_is_signalled(
        memory: GuestMemory) -> None:
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=False)
    features = int(VirtioFeature.VERSION_1)
    driver.add([(BUFS, 8)], [], 0)
    old = SplitQueue(0, SIZE, addresses(driver), memory, features, 0)
    chain = old.pop()
    assert chain is not None
    old.push(chain, 0)
    vring = Vring(0, "blk")
    vring.size, vring.addresses, vring.base = SIZE, addresses(driver), old.used_idx
    vring.features, vring.kick_nofd = features, True
    vring.start(memory)
    assert vring.missed_call  # no call fd yet: signalled when SET_VRING_CALL comes


def test_pop_many_hands_out_good_chains_before_a_bad_one_and_raises_next(
        memory: GuestMemory) -> None:
    """While late completions are skipped, pop_many pops one chain at a time: a bad
    chain after good ones must not cost the good ones (popped, then never completed)
    nor be lost itself. As the rings' own pop_many: the good ones come out, the next
    call raises for the bad one."""
    driver: SplitDriverRing[int] = SplitDriverRing.contiguous(memory, SIZE, RING,
                                                              event_idx=True)
    for token in range(2):
        driver.add([(BUFS + 64 * token, 8)], [], token)
    old = SplitQueue(0, SIZE, addresses(driver), memory, FEATURES, 0)
    first, second = old.pop(), old.pop()
    assert first is not None and second is not None
    saved_base = old.used_idx
    old.push(second, 0)  # the orphan's late completion: skipped by the new session
    driver.add([(BUFS + 128, 8)], [], 2)
    driver.add([(0xDEAD_0000_0000, 8)], [], 3)  # a buffer outside guest memory
    vring = new_session(memory, driver, saved_base, CountingCall())
    chains = vring.pop_many(8)
    assert [c.head for c in chains] == [first.head, 2]
    with pytest.raises(GuestMemoryError, match="not inside guest memory"):
        vring.pop_many(8)
