"""The compiled split ring (``_split_c.c``) against the reference (``split.py``).

Every scenario runs twice on fresh, identical guest memory: once through
``PureSplitQueue`` and once through ``CompiledSplitQueue``. Both must return
the same chains (same buffers, found by content: each 8 bytes of guest memory
hold their own guest address), raise the same exception (class, message,
queue, head, cause), and leave the rings and positions in the same state.

The memory has two adjacent regions, so buffers and indirect tables can cross
from one into the other (refused), plus a hole after them.
"""

from __future__ import annotations

import array
import functools
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvu_runtime.virtio import accel
from vvu_runtime.virtio.errors import DescriptorError, GuestMemoryError, RingError
from vvu_runtime.virtio.features import DescFlag, VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, memfd_region
from vvu_runtime.virtio.queue import DescriptorChain, RingAddresses
from vvu_runtime.virtio.split import (
    DESC,
    MAX_INDIRECT,
    PureSplitQueue,
    SplitQueue,
    compiled_split_queue,
    split_ring_layout,
)

REPO = Path(__file__).resolve().parents[2]
A = 0x1_0000_0000  # guest-physical base of region A (rings live here)
B = A + (1 << 20)  # region B starts where A ends
HOLE = B + (1 << 20)  # nothing mapped from here
REGION = 1 << 20
UVA_A = 0x7F00_0000_0000
UVA_B = UVA_A + (1 << 20)
RING = A + 0x1000
BUFS = A + 0x2_0000
TABLES = B + 0x1000  # indirect tables

EVENT_IDX = int(VirtioFeature.EVENT_IDX)
INDIRECT = int(VirtioFeature.INDIRECT_DESC)
ALL = EVENT_IDX | INDIRECT | int(VirtioFeature.VERSION_1)
W = int(DescFlag.WRITE)
N = int(DescFlag.NEXT)
I = int(DescFlag.INDIRECT)  # noqa: E741


def compiler_present() -> bool:
    """A C compiler and the Python headers: what ./setup needs to build the extension."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(cc) is not None and include.exists()


def compiled_class() -> type[SplitQueue]:
    try:
        from vvu_runtime.virtio.split import CompiledSplitQueue
    except ImportError as exc:
        if compiler_present():
            pytest.fail(f"a C compiler is here but the compiled ring is not built ({exc}): "
                        "run ./setup (a worktree: python -m vvu_runtime.virtio.accel build)",
                        pytrace=False)
        why = "host capability missing: C compiler or Python headers (compiled ring not built)"
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must not skip)", pytrace=False)
        pytest.skip(why)
    return CompiledSplitQueue


# -- the machinery ------------------------------------------------------------------------

@functools.cache
def pattern(gpa: int) -> bytes:
    """A region's bytes: every u64 holds its own guest address."""
    return array.array("Q", range(gpa, gpa + REGION, 8)).tobytes()


def make_memory() -> GuestMemory:
    """Regions A and B, every u64 holding its own guest address."""
    mem = GuestMemory()
    for gpa, uva in ((A, UVA_A), (B, UVA_B)):
        mapped, fd = memfd_region(REGION, guest_phys_addr=gpa, userspace_addr=uva)
        os.close(fd)
        mapped.view[:] = pattern(gpa)
        mem.add(mapped)
    # The rings start zeroed, as a driver leaves them.
    mem.translate(RING, split_ring_layout(256).total)[:] = bytes(split_ring_layout(256).total)
    return mem


def addrs_for(size: int) -> RingAddresses:
    lay = split_ring_layout(size)
    base = UVA_A + (RING - A)
    return RingAddresses(desc=base + lay.desc_offset, avail=base + lay.avail_offset,
                         used=base + lay.used_offset)


#: A scenario writes guest memory: (memory, ring size) -> None.
Setup = Callable[[GuestMemory, int], None]
#: Operations: ("pop",), ("pop_many", n), ("chain_at", head), ("push", written),
#: ("push_many", written), ("has",)
Op = tuple[str, int] | tuple[str]


def desc(mem: GuestMemory, table: int, i: int, addr: int, length: int, flags: int,
         nxt: int = 0) -> None:
    DESC.pack_into(mem.translate(table + 16 * i, 16), 0, addr, length, flags, nxt)


def publish(mem: GuestMemory, size: int, heads: list[int], idx: int | None = None,
            start: int = 0) -> None:
    """Put ``heads`` in the avail ring from index ``start`` on and move avail idx to
    ``idx`` (default: just past them)."""
    avail = mem.translate(RING + split_ring_layout(size).avail_offset, 4 + 2 * size)
    for k, h in enumerate(heads):
        struct.pack_into("<H", avail, 4 + 2 * ((start + k) % size), h)
    end = start + len(heads) if idx is None else idx
    struct.pack_into("<H", avail, 2, end & 0xFFFF)


def describe_chain(chain: DescriptorChain | None) -> object:
    if chain is None:
        return None
    return (chain.head, [bytes(b) for b in chain.readable], [bytes(b) for b in chain.writable],
            list(chain.writable_gpas), chain.ndescs, type(chain))


def describe_error(exc: BaseException) -> object:
    return (type(exc), str(exc), getattr(exc, "queue", None), getattr(exc, "head", None),
            type(exc.__cause__), str(exc.__cause__))


def run(cls: type[SplitQueue], setup: Setup, ops: list[Op], size: int, features: int,
        base: int) -> list[object]:
    mem = make_memory()
    setup(mem, size)
    out: list[object] = []
    try:
        queue = cls(0, size, addrs_for(size), mem, features, base)
    except Exception as exc:  # construction errors must match too
        return [describe_error(exc)]
    assert type(queue) is cls
    popped: list[DescriptorChain] = []
    for op in ops:
        try:
            if op[0] == "pop":
                chain = queue.pop()
                if chain is not None:
                    popped.append(chain)
                out.append(describe_chain(chain))
            elif op[0] == "pop_many":
                chains = queue.pop_many(op[1])  # type: ignore[misc]
                popped += chains
                out.append([describe_chain(c) for c in chains])
            elif op[0] == "chain_at":
                out.append(describe_chain(queue.chain_at(op[1])))  # type: ignore[misc]
            elif op[0] == "push" and popped:
                queue.push(popped.pop(0), op[1])  # type: ignore[misc]
            elif op[0] == "push_many":
                queue.push_many([(c, op[1]) for c in popped])  # type: ignore[misc]
                popped.clear()
            elif op[0] == "has":
                out.append(queue.has_available())
            elif op[0] == "remove B":  # REM_MEM_REG
                mem.remove(next(m.region for m in mem if m.gpa == B))
            elif op[0] == "add hole":  # ADD_MEM_REG
                mapped, fd = memfd_region(REGION, guest_phys_addr=HOLE,
                                          userspace_addr=UVA_B + REGION)
                os.close(fd)
                mapped.view[:] = pattern(HOLE)
                mem.add(mapped)
        except Exception as exc:
            out.append(describe_error(exc))
        out.append((queue.last_avail_idx, queue.used_idx, queue.in_flight))
    lay = split_ring_layout(size)
    out.append(bytes(mem.translate(RING + lay.used_offset, lay.used_size)))
    mem.clear()
    return out


def both(setup: Setup, ops: list[Op], size: int = 8, features: int = ALL,
         base: int = 0) -> list[object]:
    """Run through both implementations; they must agree. Returns the reference's log."""
    reference = run(PureSplitQueue, setup, ops, size, features, base)
    compiled = run(compiled_class(), setup, ops, size, features, base)
    assert compiled == reference
    return reference


def errors_in(log: list[object]) -> list[type]:
    return [e[0] for e in log if isinstance(e, tuple) and len(e) == 6 and isinstance(e[0], type)]


DRAIN: list[Op] = [("pop_many", 4), ("pop",), ("pop_many", 64), ("push_many", 7), ("has",)]


# -- the switch and the build ---------------------------------------------------------------

def test_compiled_ring_is_built_when_a_compiler_is_here() -> None:
    """./setup builds the extension wherever it can: a compiler without the module is a bug."""
    # Without a compiler compiled_class() skips, naming it (and fails under CI).
    assert compiled_class().__name__ == "CompiledSplitQueue"
    if not accel.pure_python_forced():
        assert compiled_split_queue() is compiled_class()


def _queue_type(env: dict[str, str]) -> str:
    code = ("from vvu_runtime.virtio.split import SplitQueue, split_ring_layout\n"
            "from vvu_runtime.virtio.memory import GuestMemory, memfd_region\n"
            "from vvu_runtime.virtio.queue import RingAddresses\n"
            "m = GuestMemory(); r, fd = memfd_region(1 << 16, guest_phys_addr=0, "
            "userspace_addr=0)\n"
            "m.add(r); lay = split_ring_layout(8)\n"
            "q = SplitQueue(0, 8, RingAddresses(lay.desc_offset, lay.avail_offset, "
            "lay.used_offset), m, 0)\n"
            "print(type(q).__name__)\n")
    env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_split_queue_is_compiled_unless_switched_off() -> None:
    compiled_class()
    env = {k: v for k, v in os.environ.items() if k != accel.ENV_PURE_PYTHON}
    assert _queue_type({**env, accel.ENV_PURE_PYTHON: "0"}) == "CompiledSplitQueue"
    assert _queue_type({accel.ENV_PURE_PYTHON: "1"}) == "SplitQueue"


def test_pure_queue_is_pure_and_status_says_which_runs() -> None:
    mem = make_memory()
    queue = PureSplitQueue(0, 8, addrs_for(8), mem, ALL)
    assert not isinstance(queue, compiled_class())
    assert accel.status()["split ring"] in ("compiled", "pure (forced)")
    mem.clear()


def test_compiled_walk_does_the_work_itself() -> None:
    """Guards against a compiled path that always defers (the differential tests would
    then pass trivially): it never calls Python's translate, even when every buffer
    is in another region than the one before (the case of libblkio's requests)."""
    def setup(mem: GuestMemory, size: int) -> None:
        for i in range(size):
            if i % 3 == 0:  # one direct descriptor, in A or in B
                desc(mem, RING, i, (A if i % 2 else B) + 0x100 * i, 64, W if i % 2 else 0)
            elif i % 3 == 1:  # an indirect table of two
                desc(mem, RING, i, BUFS + 0x8000 + 0x100 * i, 32, I)
                desc(mem, BUFS + 0x8000 + 0x100 * i, 0, BUFS + 0x100 * i, 16, N, 1)
                desc(mem, BUFS + 0x8000 + 0x100 * i, 1, BUFS + 0x100 * i + 16, 16, W)
            else:  # a direct chain of one readable descriptor then the next one
                desc(mem, RING, i, BUFS + 0x100 * i, 8, N, (i + 1) % size)
        publish(mem, size, list(range(size)))

    for cls, most in ((compiled_class(), 0), (PureSplitQueue, None)):
        mem = make_memory()
        setup(mem, 16)
        calls: list[tuple[int, int]] = []
        real = mem.translate

        def counting(gpa: int, length: int, real: Callable[[int, int], memoryview] = real,
                     calls: list[tuple[int, int]] = calls) -> memoryview:
            calls.append((gpa, length))
            return real(gpa, length)

        mem.translate = counting  # type: ignore[method-assign]
        queue = cls(0, 16, addrs_for(16), mem, ALL)
        chains = queue.pop_many(16)
        assert len(chains) == 16
        if most is not None:
            assert len(calls) <= most, calls
        else:
            assert len(calls) >= 16  # the reference translates every buffer
        mem.clear()


# -- normal rings -------------------------------------------------------------------------

def test_one_descriptor_chains_and_wrap_around() -> None:
    def setup(mem: GuestMemory, size: int) -> None:
        for i in range(size):
            desc(mem, RING, i, BUFS + 0x100 * i, 64 + i, W if i & 1 else 0)
        publish(mem, size, [(k * 3) % size for k in range(size)], start=0xFFFE)

    log = both(setup, [("pop_many", 3), ("push", 64), ("pop",), ("push_many", 10), ("has",),
                       ("pop_many", 100), ("push_many", 0)], size=8, base=0xFFFE)
    assert not errors_in(log)


def test_chains_indirect_tables_and_zero_length_buffers() -> None:
    def setup(mem: GuestMemory, size: int) -> None:
        desc(mem, RING, 0, BUFS, 16, N, 1)
        desc(mem, RING, 1, BUFS + 0x40, 0, N, 2)  # zero length: skipped
        desc(mem, RING, 2, BUFS + 0x80, 512, W)
        desc(mem, RING, 3, TABLES, 16 * 3, I)  # indirect, in region B
        desc(mem, TABLES, 0, BUFS + 0x400, 100, N, 2)  # follows next, not order
        desc(mem, TABLES, 2, B + 0x8000, 30, N | W, 1)
        desc(mem, TABLES, 1, BUFS + 0x800, 1, W)
        desc(mem, RING, 4, BUFS + 0x900, 0, 0)  # a chain of one empty buffer
        desc(mem, RING, 5, BUFS + 0xA00, 8, N, 6)  # direct then indirect
        desc(mem, RING, 6, TABLES + 0x100, 16, I)
        desc(mem, TABLES + 0x100, 0, BUFS + 0xB00, 4, W)
        publish(mem, size, [0, 3, 4, 5, 0, 3])

    log = both(setup, [("pop",), ("pop_many", 2), ("chain_at", 5), ("chain_at", 3),
                       ("pop_many", 8), ("push", 7), ("push_many", 1)])
    assert not errors_in(log)


def test_buffers_anywhere_in_either_region_and_region_switches() -> None:
    def setup(mem: GuestMemory, size: int) -> None:
        places = [A, B, A + REGION - 1, B + REGION - 64, B, A + 0x3_0000, B + 8, A + 8]
        for i, gpa in enumerate(places):
            desc(mem, RING, i, gpa, 1 if gpa == A + REGION - 1 else 64, W if i > 3 else 0)
        publish(mem, size, list(range(size)))

    assert not errors_in(both(setup, DRAIN))


def test_memory_table_changes_are_seen() -> None:
    """Regions removed and added on a live ring (REM_MEM_REG, ADD_MEM_REG)."""
    def setup(mem: GuestMemory, size: int) -> None:
        desc(mem, RING, 0, B + 0x100, 16, W)
        desc(mem, RING, 1, HOLE + 0x100, 16, W)
        desc(mem, RING, 2, A + 0x100, 16, 0)
        publish(mem, size, [0, 1, 2, 0, 1, 2, 0, 1])

    log = both(setup, [("pop",), ("pop",), ("pop",), ("remove B",), ("pop",), ("pop",),
                       ("add hole",), ("pop",), ("pop",), ("chain_at", 1), ("push_many", 4)])
    # not mapped yet, B gone, not mapped yet, B gone; then the added region serves.
    assert errors_in(log) == [GuestMemoryError] * 4


# -- hostile rings: the same exception, message and state -------------------------------------

def hostile(table: list[tuple[int, int, int, int, int]], heads: list[int],
            extra: Callable[[GuestMemory], None] | None = None) -> Setup:
    def setup(mem: GuestMemory, size: int) -> None:
        for i, addr, length, flags, nxt in table:
            desc(mem, RING, i, addr, length, flags, nxt)
        if extra is not None:
            extra(mem)
        publish(mem, size, heads)
    return setup


CASES: dict[str, tuple[Setup, type]] = {
    "loop": (hostile([(0, BUFS, 8, N, 1), (1, BUFS, 8, N, 0)], [0]), DescriptorError),
    "self loop": (hostile([(2, BUFS, 8, N, 2)], [2]), DescriptorError),
    "loop of zero-length": (hostile([(0, BUFS, 0, N, 1), (1, BUFS, 0, N, 0)], [0]),
                            DescriptorError),
    "loop in indirect table": (hostile([(0, TABLES, 32, I, 0)], [0], lambda m: (
        desc(m, TABLES, 0, BUFS, 8, N, 1), desc(m, TABLES, 1, BUFS, 8, N, 0))),
        DescriptorError),
    "head out of range": (hostile([], [8]), DescriptorError),
    "head far out of range": (hostile([], [0xFFFF]), DescriptorError),
    "next out of range": (hostile([(0, BUFS, 8, N, 8)], [0]), DescriptorError),
    "next past indirect table": (hostile([(0, TABLES, 32, I, 0)], [0], lambda m: desc(
        m, TABLES, 0, BUFS, 8, N, 2)), DescriptorError),
    "buffer in the hole": (hostile([(0, HOLE + 0x100, 8, 0, 0)], [0]), GuestMemoryError),
    "buffer below memory": (hostile([(0, 0x1000, 8, W, 0)], [0]), GuestMemoryError),
    "buffer crossing A into B": (hostile([(0, B - 8, 16, 0, 0)], [0]), GuestMemoryError),
    "buffer one byte past A": (hostile([(0, B - 8, 9, W, 0)], [0]), GuestMemoryError),
    "second buffer one byte past A": (hostile([(0, B - 9, 8, N, 1), (1, B - 1, 2, W, 0)], [0]),
                                      GuestMemoryError),
    "buffer crossing B into the hole": (hostile([(0, HOLE - 8, 9, W, 0)], [0]),
                                        GuestMemoryError),
    "buffer at 2^64 - 8": (hostile([(0, (1 << 64) - 8, 16, 0, 0)], [0]), GuestMemoryError),
    "huge length": (hostile([(0, A, 0xFFFF_FFFF, W, 0)], [0]), GuestMemoryError),
    "second buffer out of range": (hostile([(0, BUFS, 8, N, 1), (1, HOLE, 8, W, 0)], [0]),
                                   GuestMemoryError),
    "indirect table crossing regions": (hostile([(0, B - 16, 32, I, 0)], [0]),
                                        GuestMemoryError),
    "indirect table in the hole": (hostile([(0, HOLE, 32, I, 0)], [0]), GuestMemoryError),
    "indirect entry out of range": (hostile([(0, TABLES, 16, I, 0)], [0], lambda m: desc(
        m, TABLES, 0, HOLE + 64, 8, W)), GuestMemoryError),
    "indirect length not a multiple of 16": (hostile([(0, TABLES, 24, I, 0)], [0]),
                                             DescriptorError),
    "indirect length zero": (hostile([(0, TABLES, 0, I, 0)], [0]), DescriptorError),
    "indirect table too long": (hostile([(0, TABLES, 16 * (MAX_INDIRECT + 1), I, 0)], [0]),
                                DescriptorError),
    "indirect with next": (hostile([(0, TABLES, 16, I | N, 1), (1, BUFS, 8, 0, 0)], [0]),
                           DescriptorError),
    "nested indirect": (hostile([(0, TABLES, 16, I, 0)], [0], lambda m: desc(
        m, TABLES, 0, TABLES + 0x100, 16, I)), DescriptorError),
    "readable after writable": (hostile([(0, BUFS, 8, N | W, 1), (1, BUFS, 8, 0, 0)], [0]),
                                DescriptorError),
    "readable after writable, indirect": (hostile([(0, TABLES, 32, I, 0)], [0], lambda m: (
        desc(m, TABLES, 0, BUFS, 8, N | W, 1), desc(m, TABLES, 1, BUFS, 8, 0))),
        DescriptorError),
    "readable after writable across the indirect": (hostile(
        [(0, BUFS, 8, N | W, 1), (1, TABLES, 16, I, 0)], [0],
        lambda m: desc(m, TABLES, 0, BUFS, 8, 0)), DescriptorError),
    # Seven descriptors in a circle (slot 7 stays free for the batch test).
    "chain longer than the ring": (hostile(
        [(i, BUFS, 1, N, i + 1) for i in range(6)] + [(6, BUFS, 1, N, 0)], [0]),
        DescriptorError),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_chain(name: str) -> None:
    setup, error = CASES[name]
    log = both(setup, [("pop",), ("has",), ("chain_at", 0), ("push", 0)])
    assert error in errors_in(log)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_chain_in_a_batch(name: str) -> None:
    """pop_many: the good chains before a bad one come out, the next call raises."""
    setup, error = CASES[name]

    def with_good_ones(mem: GuestMemory, size: int) -> None:
        setup(mem, size)
        avail = mem.translate(RING + split_ring_layout(size).avail_offset, 4 + 2 * size)
        bad = struct.unpack_from("<H", avail, 4)[0]
        # A good one-descriptor chain in slot 7, which no case uses, twice.
        desc(mem, RING, 7, BUFS + 0x700, 16, W)
        publish(mem, size, [7, 7, bad, 7])

    log = both(with_good_ones, [("pop_many", 8), ("pop_many", 8), ("pop_many", 8),
                                ("push_many", 16)])
    assert error in errors_in(log)


def test_indirect_not_negotiated() -> None:
    setup = hostile([(0, TABLES, 16, I, 0)], [0], lambda m: desc(m, TABLES, 0, BUFS, 8, 0))
    log = both(setup, [("pop",)], features=EVENT_IDX)
    assert DescriptorError in errors_in(log)


@pytest.mark.parametrize("idx", [9, 0x8000, 0xFFFF])
def test_avail_idx_jump(idx: int) -> None:
    def setup(mem: GuestMemory, size: int) -> None:
        desc(mem, RING, 0, BUFS, 8, 0)
        publish(mem, size, [0], idx=idx)

    log = both(setup, [("pop",), ("pop_many", 4), ("has",)])
    assert RingError in errors_in(log)


@pytest.mark.parametrize("written", [-1, 1 << 31, (1 << 32) - 1, 1 << 32])
def test_push_values_only_python_judges(written: int) -> None:
    """Odd ``written`` values go to the reference push (stored, or refused) alike."""
    setup = hostile([(0, BUFS, 8, W, 0), (1, BUFS, 8, 0, 0)], [0, 1])
    both(setup, [("pop",), ("push", written), ("pop",), ("push_many", written)])


def test_push_of_foreign_chains_and_generators() -> None:
    for cls in (PureSplitQueue, compiled_class()):
        mem = make_memory()
        queue = cls(0, 8, addrs_for(8), mem, ALL)
        queue.push(DescriptorChain(3), 5)
        queue.push_many((DescriptorChain(h), h) for h in (1, 2))
        with pytest.raises(AttributeError):
            queue.push_many([(object(), 1)])  # type: ignore[list-item]
        used = mem.translate(RING + split_ring_layout(8).used_offset, 4 + 8 * 3)
        assert struct.unpack("<HH6I", used) == (0, 3, 3, 5, 1, 1, 2, 2)
        assert queue.used_idx == 3
        mem.clear()


# -- anything at all ---------------------------------------------------------------------------

ADDRS = [A, A + 0x10, BUFS, B - 1, B - 8, B - 16, B, B + 0x40, HOLE - 1, HOLE - 16, HOLE, 0,
         1 << 63, (1 << 64) - 16, TABLES, TABLES + 0x100, RING]
LENGTHS = [0, 1, 2, 8, 9, 15, 16, 17, 32, 48, 64, 0x1000, 0xFFFF_FFFF]


def descriptors(count: int) -> st.SearchStrategy[list[tuple[int, int, int, int]]]:
    one = st.tuples(st.sampled_from(ADDRS), st.sampled_from(LENGTHS),
                    st.integers(0, 7), st.integers(0, 9))
    return st.lists(one, min_size=count, max_size=count)


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([1, 2, 8]), ring=descriptors(8), tables=descriptors(8),
       heads=st.lists(st.integers(0, 10), min_size=0, max_size=10),
       idx=st.one_of(st.none(), st.integers(0, 0xFFFF)), features=st.sampled_from(
           [ALL, EVENT_IDX, INDIRECT]),
       ops=st.lists(st.one_of(
           st.tuples(st.sampled_from(["pop_many", "chain_at", "push", "push_many"]),
                     st.integers(0, 9)),
           st.tuples(st.sampled_from(["pop", "has"]))), min_size=1, max_size=8))
def test_anything_goes_the_same_way(
        size: int, ring: list[tuple[int, int, int, int]],
        tables: list[tuple[int, int, int, int]], heads: list[int], idx: int | None,
        features: int, ops: list[Op]) -> None:
    def setup(mem: GuestMemory, s: int) -> None:
        for i, (addr, length, flags, nxt) in enumerate(ring[:s]):
            desc(mem, RING, i, addr, length, flags, nxt)
        for table in (TABLES, TABLES + 0x100):
            for i, (addr, length, flags, nxt) in enumerate(tables):
                desc(mem, table, i, addr, length, flags, nxt)
        publish(mem, s, heads, idx)

    both(setup, ops, size=size, features=features)


def test_a_compiled_module_older_than_its_sources_is_set_aside(tmp_path: Path) -> None:
    """After a pull that changed the C without ./setup, the old extensions would run
    against the new Python: every one of them is left alone, with a warning."""
    compiled_class()
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "vvu_runtime", copy / "vvu_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))  # copy2: mtimes kept
    code = ("from vvu_runtime.virtio import accel\n"
            "from vvu_runtime.backends.blk import device\n"
            "from vvu_runtime.backends.switch import switch\n"
            "print(accel.status()['split ring'], device._compiled_serve_fast is None,"
            " switch._compiled_forward_burst is None)\n")
    env = {k: v for k, v in os.environ.items() if k != accel.ENV_PURE_PYTHON}
    env["PYTHONPATH"] = str(copy)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True, cwd=tmp_path)

    fresh = run()
    assert fresh.stdout.split() == ["compiled", "False", "False"], fresh.stderr
    assert "older than" not in fresh.stderr
    later = time.time() + 60  # edited after every build
    for source in ("virtio/_split_core.h", "backends/blk/_serve_c.c"):
        os.utime(copy / "vvu_runtime" / source, (later, later))
    stale = run()
    assert stale.stdout.split()[-2:] == ["True", "True"], stale.stderr
    assert stale.stdout.startswith("pure (compiled module older than its sources")
    for name in ("_split_c", "_serve_c", "_forward_c"):
        assert f"{name}." in stale.stderr and "run ./setup" in stale.stderr, stale.stderr
