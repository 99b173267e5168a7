"""The page-granular IOVA table DMA_MAP / DMA_UNMAP fill."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.guest_ram import sealed_memfd
from vvu_runtime.device.dma import PAGE_SIZE, DmaMemory, DmaTable
from vvu_runtime.device.errors import DmaError
from vvu_runtime.virtio.errors import GuestMemoryError

P = PAGE_SIZE


@pytest.fixture
def ram() -> Iterator[int]:
    fd = sealed_memfd("vvu-dma-test", 64 * P)
    for page in range(64):
        os.pwrite(fd, page.to_bytes(2, "little") * (P // 2), page * P)
    yield fd
    os.close(fd)


def _page_of(table: DmaTable, iova: int) -> int:
    return int.from_bytes(table.read(iova, 2), "little")


def test_map_translate_and_cross_map_copies(ram: int) -> None:
    t = DmaTable()
    t.map(0x10000, 4 * P, fd=ram, fd_offset=0)
    t.map(0x10000 + 4 * P, 2 * P, fd=ram, fd_offset=40 * P)  # adjacent, not contiguous in fd
    assert _page_of(t, 0x10000 + 3 * P) == 3
    assert _page_of(t, 0x10000 + 4 * P) == 40
    view = t.translate(0x10000 + P, 16, write=True)
    view[:4] = b"ABCD"
    assert os.pread(ram, 4, P) == b"ABCD"
    # One view cannot span two maps; the copying helpers can.
    with pytest.raises(DmaError, match="not inside one DMA mapping"):
        t.translate(0x10000 + 4 * P - 8, 16)
    assert len(t.translate_sg(0x10000 + 4 * P - 8, 16)) == 2
    t.write(0x10000 + 4 * P - 2, b"wxyz")
    assert os.pread(ram, 2, 4 * P - 2) == b"wx" and os.pread(ram, 2, 40 * P) == b"yz"
    assert t.read(0x10000 + 4 * P - 2, 4) == b"wxyz"


def test_refusals(ram: int) -> None:
    t = DmaTable(max_maps=2)
    t.map(0, 4 * P, fd=ram)
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: t.map(2 * P, 4 * P, fd=ram), errno.EEXIST),
        (lambda: t.map(0x100, P, fd=ram), errno.EINVAL),
        (lambda: t.map(8 * P, 100, fd=ram), errno.EINVAL),
        (lambda: t.map(8 * P, P, fd=ram, fd_offset=100), errno.EINVAL),
        (lambda: t.map(8 * P, 128 * P, fd=ram), errno.EINVAL),  # past the memfd's end
        (lambda: t.map((1 << 64) - P, 2 * P, fd=ram), errno.EINVAL),
        (lambda: t.map(8 * P, P, readable=False, writable=False), errno.EINVAL),
        (lambda: t.map(8 * P, P, fd=9999), errno.EBADF),
    ]
    for call, err in cases:
        with pytest.raises(DmaError) as exc:
            call()
        assert exc.value.errno == err
    t.map(8 * P, P)
    with pytest.raises(DmaError) as exc:
        t.map(16 * P, P)
    assert exc.value.errno == errno.ENOSPC
    assert isinstance(exc.value, GuestMemoryError)  # ring code catches it as such


def test_only_memory_sealed_against_shrinking_is_mapped(tmp_path: Path) -> None:
    t = DmaTable(name="dev0")
    plain = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    path = tmp_path / "ram"
    path.write_bytes(bytes(4 * P))
    regular = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(plain, 4 * P)
        for fd in (plain, regular):
            with pytest.raises(DmaError, match=r"F_SEAL_SHRINK.*memory-backend-memfd") as exc:
                t.map(0, P, fd=fd)
            assert exc.value.errno == errno.EINVAL
        assert len(t) == 0 and t.mapped_files == 0
    finally:
        os.close(plain)
        os.close(regular)


def test_one_mapping_per_file_shared_by_page_maps(ram: int) -> None:
    t = DmaTable(max_files=2)
    for i in range(16):  # QEMU through a vIOMMU: one DMA_MAP per page, same fd
        t.map(0x10000 + i * P, P, fd=ram, fd_offset=(15 - i) * P, writable=i % 2 == 0)
    assert t.mapped_files == 1 and t.mapped_bytes == 64 * P
    assert _page_of(t, 0x10000 + 3 * P) == 12
    assert t.translate(0x10000 + P, 8).readonly  # a read-only entry stays read-only
    t.translate(0x10000, 8, write=True)[:2] = b"ok"
    assert os.pread(ram, 2, 15 * P) == b"ok"
    others = [sealed_memfd(f"other{i}", P) for i in range(2)]
    try:
        t.map(0x100000, P, fd=others[0])
        with pytest.raises(DmaError, match="at most 2") as exc:
            t.map(0x200000, P, fd=others[1])
        assert exc.value.errno == errno.ENOSPC
    finally:
        for fd in others:
            os.close(fd)
    t.unmap(0x10000, 16 * P)
    assert t.mapped_files == 1  # the other file's
    t.unmap_all()
    assert t.mapped_files == 0 and t.mapped_bytes == 0


def test_read_only_and_fd_less_maps(ram: int) -> None:
    t = DmaTable()
    t.map(0, P, fd=ram, writable=False)
    t.map(P, P)  # no fd: ROM / peer BAR, reachable only via DMA_READ/WRITE
    assert t.translate(0, 2).readonly
    with pytest.raises(DmaError) as exc:
        t.translate(0, 2, write=True)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(DmaError, match="without an fd"):
        t.read(P, 4)
    assert [m.has_fd for m in t] == [True, False]


def test_unmap_splits_and_accepts_ranges_matching_nothing(ram: int) -> None:
    t = DmaTable()
    seen: list[tuple[int, int]] = []
    t.add_unmap_listener(lambda iova, size: seen.append((iova, size)))
    t.map(0x100000, 8 * P, fd=ram, fd_offset=8 * P)
    assert t.unmap(0x900000, 16 * P) == 0
    assert t.unmap(0, 1 << 64) == 8 * P  # everything, up to 2^64
    t.map(0x100000, 8 * P, fd=ram, fd_offset=8 * P)
    assert t.unmap(0x100000 + 2 * P, 3 * P) == 3 * P
    assert [(m.iova, m.size, m.fd_offset) for m in t] == [
        (0x100000, 2 * P, 8 * P), (0x100000 + 5 * P, 3 * P, 13 * P)]
    assert _page_of(t, 0x100000 + P) == 9
    assert _page_of(t, 0x100000 + 5 * P) == 13
    with pytest.raises(DmaError):
        t.read(0x100000 + 2 * P, 2)
    assert seen == [(0x100000, 8 * P), (0x100000 + 2 * P, 3 * P)]
    with pytest.raises(DmaError):
        t.unmap(0x1234, P)
    assert t.unmap_all() == 5 * P
    assert len(t) == 0


def test_mapping_released_when_its_last_piece_goes(ram: int) -> None:
    t = DmaTable()
    entry = t.map(0, 4 * P, fd=ram)
    backing = entry._backing
    assert backing is not None
    t.unmap(P, P)
    assert not backing.mmap.closed
    t.unmap(0, P)
    t.unmap(2 * P, 2 * P)
    assert backing.mmap.closed


def test_dma_memory_is_guest_memory_for_rings(ram: int) -> None:
    t = DmaTable()
    t.map(0x4000, 4 * P, fd=ram)
    mem = DmaMemory(t)
    assert bytes(mem.translate(0x4000, 2)) == bytes(mem.translate_user(0x4000, 2))
    assert mem.user_to_guest(0x5000) == 0x5000
    mem.mark_dirty(0x4000, 8)  # no dirty log: a no-op
    with pytest.raises(GuestMemoryError):
        mem.translate(0, 8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 31), st.integers(1, 8)), max_size=40))
def test_table_matches_a_page_model(ops: list[tuple[bool, int, int]]) -> None:
    fd = sealed_memfd("vvu-dma-model", 40 * P)
    for page in range(40):
        os.pwrite(fd, page.to_bytes(2, "little"), page * P)
    t = DmaTable()
    model: dict[int, int] = {}  # iova page -> fd page
    try:
        for is_map, page, count in ops:
            pages = range(page, page + count)
            if is_map:
                if any(p in model for p in pages):
                    with pytest.raises(DmaError):
                        t.map(page * P, count * P, fd=fd, fd_offset=page * P)
                    continue
                t.map(page * P, count * P, fd=fd, fd_offset=page * P)
                model.update({p: p for p in pages})
            else:
                removed = t.unmap(page * P, count * P)
                assert removed == sum(P for p in pages if p in model)
                for p in pages:
                    model.pop(p, None)
        for p in range(40):
            if p in model:
                assert _page_of(t, p * P) == model[p]
            else:
                assert t.lookup(p * P) is None
        assert sum(m.size for m in t) == len(model) * P
    finally:
        t.close()
        os.close(fd)
