"""RawImage: vectored I/O, holes and zeroes, and O_DIRECT with bounce buffers."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vvu_runtime.backends.blk import image as image_mod
from vvu_runtime.backends.blk.image import ImageError, RawImage

PATTERN = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(PATTERN)
    return p


def test_readv_writev(path: Path) -> None:
    with RawImage(str(path)) as img:
        assert img.size == len(PATTERN) and img.alignment == 1
        bufs = [memoryview(bytearray(100)), memoryview(bytearray(412))]
        img.readv(bufs, 1000)
        assert bytes(bufs[0]) + bytes(bufs[1]) == PATTERN[1000:1512]
        img.writev([b"a" * 10, memoryview(b"b" * 20)], 5)
        img.flush()
    assert path.read_bytes()[5:35] == b"a" * 10 + b"b" * 20


def test_more_buffers_than_iov_max(path: Path) -> None:
    with RawImage(str(path)) as img:
        bufs = [memoryview(bytearray(4)) for _ in range(image_mod.IOV_MAX + 5)]
        img.readv(bufs, 0)
        assert b"".join(bytes(b) for b in bufs) == PATTERN[:4 * len(bufs)]
        img.writev([b"\xee" * 4] * (image_mod.IOV_MAX + 5), 0)
    assert path.read_bytes()[:4 * (image_mod.IOV_MAX + 5)] == b"\xee" * 4 * (image_mod.IOV_MAX + 5)


def test_read_past_end_reads_zeroes(path: Path) -> None:
    with RawImage(str(path)) as img:
        buf = memoryview(bytearray(b"\xff" * 512))
        img.readv([buf], len(PATTERN) - 256)
        assert bytes(buf) == PATTERN[-256:] + bytes(256)


def test_write_zeroes_and_discard(path: Path) -> None:
    with RawImage(str(path)) as img:
        img.write_zeroes(4096, 4096, unmap=False)
        img.write_zeroes(100, 50, unmap=True)
        img.discard(12288, 4096)
    data = path.read_bytes()
    assert len(data) == len(PATTERN)
    assert data[4096:8192] == bytes(4096)
    assert data[100:150] == bytes(50)
    assert data[150:4096] == PATTERN[150:4096]
    assert data[12288:] in (bytes(4096), PATTERN[12288:])


def test_write_zeroes_without_fallocate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(image_mod, "fallocate", unsupported)
    with RawImage(str(path)) as img:
        img.write_zeroes(1000, 3000, unmap=True)
        img.discard(0, 512)  # a hint: silently nothing
        img.write_zeroes(8000, 10, unmap=True)
    assert len(calls) == 2  # each unsupported mode is tried once, then remembered
    data = path.read_bytes()
    assert data[1000:4000] == bytes(3000) and data[8000:8010] == bytes(10)
    assert data[:512] == PATTERN[:512]


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        RawImage("/dev/null")
    with pytest.raises(ImageError, match="cannot open"):
        RawImage(str(tmp_path / "missing.raw"))


def test_read_only(path: Path) -> None:
    with RawImage(str(path), read_only=True) as img, pytest.raises(OSError):
        img.writev([b"x"], 0)


# --- O_DIRECT --------------------------------------------------------------------------------

@pytest.fixture
def direct(path: Path) -> Iterator[RawImage]:
    try:
        img = RawImage(str(path), direct=True)
    except ImageError as exc:
        pytest.skip(f"host capability missing: O_DIRECT on {path.parent}: {exc}")
    with img:
        yield img


def aligned(size: int) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, max(size, mmap.PAGESIZE))
    return m, memoryview(m)[:size]


def test_direct_aligned(direct: RawImage, path: Path) -> None:
    assert direct.alignment in (512, 1024, 2048, 4096)
    _m, buf = aligned(4096)
    direct.readv([buf], 4096)
    assert bytes(buf) == PATTERN[4096:8192]
    buf[:] = b"\x5a" * 4096
    direct.writev([buf], 8192)
    buf.release()
    assert path.read_bytes()[8192:12288] == b"\x5a" * 4096


@pytest.mark.parametrize("offset,sizes", [
    (0, [100, 412]),          # unaligned lengths
    (512 + 7, [1000]),        # unaligned offset
    (4096 - 300, [600]),      # crossing a block boundary
    (3, [5]),                 # inside one block
])
def test_direct_bounce(direct: RawImage, path: Path, offset: int, sizes: list[int]) -> None:
    bufs = [memoryview(bytearray(n)) for n in sizes]
    direct.readv(bufs, offset)
    total = sum(sizes)
    assert b"".join(bytes(b) for b in bufs) == PATTERN[offset:offset + total]
    data = os.urandom(total)
    pos = 0
    for b in bufs:
        b[:] = data[pos:pos + len(b)]
        pos += len(b)
    direct.writev(bufs, offset)
    after = path.read_bytes()
    assert after[offset:offset + total] == data
    # Read-modify-write kept the neighbours.
    assert after[:offset] == PATTERN[:offset]
    assert after[offset + total:] == PATTERN[offset + total:]


def test_direct_write_zeroes_fallback(direct: RawImage, path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(image_mod, "fallocate", unsupported)
    direct.write_zeroes(700, 5000, unmap=False)
    data = path.read_bytes()
    assert data[700:5700] == bytes(5000)
    assert data[:700] == PATTERN[:700] and data[5700:] == PATTERN[5700:]


def test_direct_bounces_guest_memory_o_direct_cannot_pin(
        direct: RawImage, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In an appliance, guest memory is the VVU function's BAR2 (a PFN mapping):
    # O_DIRECT cannot pin it and the kernel says EFAULT. Simulated here by refusing
    # every buffer but the image's own bounce buffer.
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls: list[str] = []

    def pinned_only(real: Any, name: str) -> Any:
        def call(fd: int, bufs: list[Any], *rest: Any) -> int:
            calls.append(name)
            if any(not isinstance(b, memoryview) or b.obj is not direct._bounce
                   for b in bufs):
                raise OSError(errno.EFAULT, "Bad address")
            return int(real(fd, bufs, *rest))
        return call

    _m, buf = aligned(8192)
    direct._bounce_buffer(mmap.PAGESIZE)  # the bounce buffer exists: pinnable
    monkeypatch.setattr(os, "preadv", pinned_only(real_preadv, "read"))
    monkeypatch.setattr(os, "pwritev", pinned_only(real_pwritev, "write"))
    direct.readv([buf], 4096)  # aligned: tried straight, EFAULT, then bounced
    assert bytes(buf) == PATTERN[4096:12288]
    buf[:] = b"\x33" * 8192
    direct.writev([buf], 16384)
    monkeypatch.undo()
    buf.release()
    assert path.read_bytes()[16384:24576] == b"\x33" * 8192
    # Only the first request tried guest memory: the read's first call.
    assert calls.count("read") == 2 and calls.count("write") == 1, calls


def test_direct_bounce_rounds_bound_the_bounce_buffer(direct: RawImage, path: Path) -> None:
    # A chain may repeat one buffer far past SIZE_MAX: the bounce buffer stays at one
    # round (plus the edge blocks) and every byte still lands where it belongs.
    path.write_bytes(bytes(8 << 20))
    chunk = memoryview(bytearray(os.urandom(1 << 20)))
    offset = 512 + 3  # unaligned: every round bounces, with read-modify-write edges
    direct.writev([chunk, chunk, chunk, chunk[:777]], offset)
    data = path.read_bytes()
    want = bytes(chunk) * 3 + bytes(chunk[:777])
    assert data[offset:offset + len(want)] == want
    assert data[:offset] == bytes(offset) and data[offset + len(want):] == bytes(
        len(data) - offset - len(want))
    assert direct._bounce is not None
    assert len(direct._bounce) <= image_mod.BOUNCE_ROUND + 2 * mmap.PAGESIZE  # page-rounded
    back = [memoryview(bytearray(1 << 20)) for _ in range(3)]
    direct.readv(back, offset)
    assert b"".join(bytes(b) for b in back) == bytes(chunk) * 3
