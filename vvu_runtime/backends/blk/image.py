"""Raw disk image access for the blk backend.

Reads and writes go straight between the image and the guest's buffers
(``os.preadv`` / ``os.pwritev`` on memoryviews of guest memory: no copy in
Python). FLUSH is ``fdatasync``; DISCARD punches holes; WRITE_ZEROES uses
``fallocate`` ZERO_RANGE (or PUNCH_HOLE when the driver allows unmapping),
falling back to writing zeroes where the file system supports neither.

With ``direct=True`` the image is opened O_DIRECT. The kernel then wants the
file offset, the length and every buffer address aligned to the file system's
direct-I/O alignment; guest buffers usually are (Linux guests send page-sized
segments), and when one is not, the request goes through an aligned bounce
buffer (read-modify-write at the edges for writes) instead of failing. So does
every request once the kernel refused to pin guest memory for direct I/O
(EFAULT): in an appliance, guest memory is the VVU function's BAR2, a PFN
mapping that get_user_pages cannot take.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import stat
from collections.abc import Iterator, Sequence

from vvu_runtime.errors import VvuError

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: preadv/pwritev take at most this many buffers per call (Linux UIO_MAXIOV).
IOV_MAX = 1024

_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

Buffer = memoryview | bytearray | bytes


class ImageError(VvuError):
    """The image cannot be opened or used as asked."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address(buf: Buffer) -> int | None:
    """Address of a buffer's first byte, or None if ctypes cannot see it (read-only)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return None


#: Bytes per bounce round: a chain's length (a guest may ignore SIZE_MAX/SEG_MAX and
#: repeat one buffer) must not size the bounce buffer, and so the appliance's memory.
BOUNCE_ROUND = 1 << 20
#: The largest O_DIRECT alignment _probe_alignment accepts.
MAX_ALIGNMENT = 4096


def _rounds(buffers: Sequence[Buffer], offset: int) -> Iterator[tuple[int, list[memoryview]]]:
    """``buffers`` as consecutive rounds of at most BOUNCE_ROUND bytes: (image offset
    of the round, byte views)."""
    views: list[memoryview] = []
    length = 0
    for b in buffers:
        view = memoryview(b).cast("B")
        while len(view):
            take = min(len(view), BOUNCE_ROUND - length)
            views.append(view[:take])
            length += take
            view = view[take:]
            if length == BOUNCE_ROUND:
                yield offset, views
                offset += length
                views, length = [], 0
    if views:
        yield offset, views


class RawImage:
    """A raw image file (or block device) opened for the backend."""

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise ImageError(f"{path}: this file system does not support O_DIRECT "
                                 f"(drop --direct)") from exc
            raise ImageError(f"{path}: cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageError(f"{path}: not a regular file or block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            #: Alignment O_DIRECT needs for offsets, lengths and buffer addresses.
            self.alignment = self._probe_alignment() if direct else 1
        except BaseException:
            os.close(self.fd)
            raise
        self._bounce: mmap.mmap | None = None
        self._bounce_view: memoryview | None = None
        self._zeroes: mmap.mmap | None = None
        #: Cleared once O_DIRECT could not pin guest buffers (EFAULT): bounce from then on.
        self._pinnable = True
        #: Set once an fallocate mode turned out to be unsupported, so we stop trying.
        self._no_punch = False
        self._no_zero_range = False

    # --- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        if self._bounce_view is not None:
            self._bounce_view.release()
            self._bounce_view = None
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        if self._zeroes is not None:
            self._zeroes.close()
            self._zeroes = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- data path ---------------------------------------------------------------------

    def readv(self, buffers: Sequence[Buffer], offset: int) -> None:
        """Fill ``buffers`` from the image at ``offset``; raises OSError on failure.

        Bytes past the end of the image (only possible if it shrank under us)
        read as zeroes rather than stale guest memory.
        """
        if self.direct and not (self._pinnable and self._aligned(buffers, offset)):
            self._bounce_read(buffers, offset)
            return
        fd = self.fd
        total = 0
        for b in buffers:
            total += len(b)
        try:
            if len(buffers) <= IOV_MAX:
                n = os.preadv(fd, buffers, offset)
                if n == total:
                    return
            else:
                n = 0
            self._finish_read(buffers, offset, n)
        except OSError as exc:
            if not self._unpinnable(exc):
                raise
            self._bounce_read(buffers, offset)  # the whole request again: reads repeat

    def _finish_read(self, buffers: Sequence[Buffer], offset: int, done: int) -> None:
        """Short read, or too many buffers for one call: go on buffer by buffer."""
        pos = 0
        for b in buffers:
            blen = len(b)
            if pos + blen <= done:
                pos += blen
                continue
            view = memoryview(b)[max(0, done - pos):] if done > pos else memoryview(b)
            while len(view):
                n = os.preadv(self.fd, [view], offset + pos + (blen - len(view)))
                if n == 0:  # end of file
                    view[:] = bytes(len(view))
                    break
                view = view[n:]
            pos += blen
            done = pos

    def writev(self, buffers: Sequence[Buffer], offset: int, *, dsync: bool = False) -> None:
        """Write ``buffers`` to the image at ``offset``; raises OSError on failure.

        ``dsync`` makes the write durable before returning (write-through mode).
        """
        if self.direct and not (self._pinnable and self._aligned(buffers, offset)):
            self._bounce_write(buffers, offset, dsync)
            return
        try:
            self._writev(buffers, offset, os.RWF_DSYNC if dsync else 0)
        except OSError as exc:
            if not self._unpinnable(exc):
                raise
            self._bounce_write(buffers, offset, dsync)  # the whole request: writes repeat

    def _writev(self, buffers: Sequence[Buffer], offset: int, flags: int) -> None:
        total = 0
        for b in buffers:
            total += len(b)
        done = 0
        if len(buffers) <= IOV_MAX:
            done = os.pwritev(self.fd, buffers, offset, flags)
            if done == total:
                return
        pos = 0
        for b in buffers:
            blen = len(b)
            if pos + blen <= done:
                pos += blen
                continue
            view = memoryview(b)[max(0, done - pos):]
            while len(view):
                n = os.pwritev(self.fd, [view], offset + pos + (blen - len(view)), flags)
                if n == 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
            pos += blen
            done = pos

    def flush(self) -> None:
        """Make every completed write durable (FLUSH)."""
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range. Discard is a hint: where holes are unsupported, do nothing."""
        if self._no_punch:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                raise
            log.info("%s: file system cannot punch holes; DISCARD becomes a no-op", self.path)
            self._no_punch = True

    def write_zeroes(self, offset: int, length: int, *, unmap: bool, dsync: bool = False) -> None:
        """Make a range read as zeroes; with ``unmap`` it may also be deallocated."""
        if unmap and not self._no_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                self._sync_if(dsync)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                    raise
                self._no_punch = True
        if not self._no_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                self._sync_if(dsync)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                    raise
                self._no_zero_range = True
        # Neither mode (tmpfs lacks ZERO_RANGE, some devices both): write real zeroes.
        zeroes = self._zero_buffer(min(length, _ZERO_CHUNK))
        pos = 0
        while pos < length:
            take = min(length - pos, len(zeroes))
            self.writev([zeroes[:take]], offset + pos)
            pos += take
        self._sync_if(dsync)

    def _sync_if(self, dsync: bool) -> None:
        if dsync:
            os.fdatasync(self.fd)

    # --- O_DIRECT support ----------------------------------------------------------------

    def _probe_alignment(self) -> int:
        """The smallest alignment O_DIRECT accepts here (512 .. 4096).

        Probed with reads at offset 0 from a page-aligned buffer: the kernel
        checks the offset, length and address before looking at the file size,
        so this also works on an empty image.
        """
        page = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        view = memoryview(page)
        try:
            for align in (512, 1024, 2048, MAX_ALIGNMENT):
                try:
                    # Address 'align' bytes into a page: aligned to align, not more.
                    os.preadv(self.fd, [view[align:2 * align]], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise ImageError(f"{self.path}: O_DIRECT read failed: {exc}") from exc
            raise ImageError(f"{self.path}: O_DIRECT refuses even 4096-byte aligned I/O")
        finally:
            view.release()
            page.close()

    def _unpinnable(self, exc: OSError) -> bool:
        """Whether ``exc`` is O_DIRECT refusing guest memory it cannot pin; if so, every
        later request bounces (the memory does not change kind while we serve it)."""
        if not (self.direct and exc.errno == errno.EFAULT and self._pinnable):
            return False
        self._pinnable = False
        log.info("%s: guest memory cannot be pinned for O_DIRECT (a device BAR?): "
                 "requests go through an aligned bounce buffer", self.path)
        return True

    def _aligned(self, buffers: Sequence[Buffer], offset: int) -> bool:
        mask = self.alignment - 1
        if offset & mask:
            return False
        for b in buffers:
            if len(b) & mask:
                return False
            addr = _address(b)
            if addr is None or addr & mask:
                return False
        return True

    @property
    def pinnable(self) -> bool:
        """False once O_DIRECT turned out unable to pin guest memory: I/O bounces."""
        return self._pinnable

    @property
    def bounce(self) -> memoryview:
        """The page-aligned bounce buffer, allocated once at its largest: a round plus
        the partial blocks at both of its edges. Never reallocated, so a view of it
        (the compiled serve path keeps one) stays valid for the image's life."""
        if self._bounce_view is None:
            size = -(-(BOUNCE_ROUND + 2 * MAX_ALIGNMENT) // mmap.PAGESIZE) * mmap.PAGESIZE
            self._bounce = mmap.mmap(-1, size)
            self._bounce_view = memoryview(self._bounce)
        return self._bounce_view

    def _bounce_buffer(self, size: int) -> memoryview:
        """``size`` bytes of the bounce buffer (a round's aligned span fits)."""
        return self.bounce[:size]

    def _zero_buffer(self, size: int) -> memoryview:
        """Zeroes to write; page-aligned (anonymous mmap) so O_DIRECT takes them as they are.

        Not the bounce buffer: an unaligned tail of the zero write bounces through that.
        """
        if self._zeroes is None:
            self._zeroes = mmap.mmap(-1, _ZERO_CHUNK)
        return memoryview(self._zeroes)[:size]

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The aligned range [start, start + size) covering [offset, offset + length)."""
        a = self.alignment
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        return start, end - start

    def _bounce_read(self, buffers: Sequence[Buffer], offset: int) -> None:
        for at, views in _rounds(buffers, offset):
            length = sum(len(v) for v in views)
            start, size = self._span(at, length)
            bounce = self._bounce_buffer(size)
            self._direct_read_full(bounce, start)
            pos = at - start
            for v in views:
                n = len(v)
                v[:] = bounce[pos:pos + n]
                pos += n

    def _bounce_write(self, buffers: Sequence[Buffer], offset: int, dsync: bool) -> None:
        flags = os.RWF_DSYNC if dsync else 0
        a = self.alignment
        for at, views in _rounds(buffers, offset):
            length = sum(len(v) for v in views)
            start, size = self._span(at, length)
            bounce = self._bounce_buffer(size)
            # Read-modify-write of the partial blocks at both edges (the previous
            # round's tail is on the image already: O_DIRECT wrote it through).
            if at != start:
                self._direct_read_full(bounce[:a], start)
            if at + length != start + size:
                # May be the same block as above; reading it twice is harmless.
                self._direct_read_full(bounce[size - a:size], start + size - a)
            pos = at - start
            for v in views:
                n = len(v)
                bounce[pos:pos + n] = v
                pos += n
            done = 0
            while done < size:
                n = os.pwritev(self.fd, [bounce[done:]], start + done, flags)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                done += n

    def _direct_read_full(self, buf: memoryview, offset: int) -> None:
        """Fill an aligned buffer; past the end of the image it reads zeroes."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                buf[done:] = bytes(len(buf) - done)
                return
            done += n
