"""The virtio-blk device logic: requests from a ring in, a raw image underneath.

:class:`BlkDevice` serves every request synchronously while it drains a ring
and completes each popped chain before it returns, so there is never I/O in
flight between two calls: a ring can stop, and a front-end can go away and
reconnect, at any moment without losing or duplicating a completion. Chains
that were popped but not pushed when the process died are resubmitted by the
session from the inflight region (INFLIGHT_SHMFD) on reconnect, and every
request here is idempotent (reads, writes at fixed offsets, flushes, discards),
so serving one twice is harmless.

Malformed requests, decided per VIRTIO 1.2 §5.2.6:

* no device-writable byte at all (no status to write), or a device-readable
  part shorter than the 16-byte header: the chain is *bad*; we cannot report a
  status, so, as QEMU's virtio-blk does (``virtio_error``), the ring is failed
  through ``Vring.fail``: logged, the err notifier signalled, NEEDS_RESET. The
  chain is not completed (the driver must reset the device anyway);
* a header that fits but a request that cannot be served as described — data
  in the wrong direction, a length that is not whole sectors, a range beyond
  the capacity, a write to a read-only disk, too many or oversized
  discard/write-zeroes segments — gets IOERR in its status byte and a log line;
* a type we do not implement (or whose feature was not negotiated) gets UNSUPP,
  as does a discard segment carrying flags (§5.2.6.1: the UNMAP flag is for
  write-zeroes only).

The hot path (IN/OUT) is written for speed: the header is unpacked straight out
of guest memory, data moves with one ``preadv``/``pwritev`` between the image
and the guest's buffers, requests are taken and completed in groups with one
notify per group, and a busy ring is polled briefly before we go back to sleep.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.backends.turns import LoopTurns
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.transport import Register32
from vvu_runtime.virtio import accel, blk
from vvu_runtime.virtio.blk import (
    ID_BYTES,
    REQUEST_HEADER,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEGMENT,
    SEGMENT_F_UNMAP,
    BlkConfig,
    Feature,
    RequestType,
    Status,
)
from vvu_runtime.virtio.errors import DescriptorError
from vvu_runtime.virtio.features import RING_FEATURES
from vvu_runtime.virtio.inflight import SplitInflight
from vvu_runtime.virtio.queue import Virtqueue
from vvu_runtime.virtio.split import compiled_split_queue, is_compiled


class ServeFast(Protocol):
    """serve_fast(readable, writable, fd, capacity_bytes, write_ok[, bounce, align])
    -> bytes written, or -1: not served (_serve_c.c)."""

    def __call__(self, readable: list[memoryview], writable: list[memoryview], fd: int,
                 capacity_bytes: int, write_ok: bool, bounce: memoryview = ...,
                 align: int = ..., /) -> int: ...


class ServeBurst(Protocol):
    """serve_burst(ring, tracker, vring, bell, limit, budget, spin_us, turn_s, fd,
    capacity_bytes, write_ok[, bounce, align]) -> (served, why) (_serve_c.c)."""

    def __call__(self, ring: Virtqueue, tracker: SplitInflight | None, vring: Vring,
                 bell: Register32 | None, limit: int, budget: int, spin_us: float,
                 turn_s: float, fd: int, capacity_bytes: int, write_ok: bool,
                 bounce: memoryview = ..., align: int = ..., /) -> tuple[int, int]: ...


try:  # the compiled fast paths (virtio/accel.py); absent without a compiler
    from vvu_runtime.backends.blk import _serve_c
except ImportError:
    _compiled_serve_fast: ServeFast | None = None
    _compiled_serve_burst: ServeBurst | None = None
else:
    _CURRENT = accel.current(_serve_c, "backends/blk/_serve_c.c", "virtio/_split_core.h")
    _compiled_serve_fast = _serve_c.serve_fast if _CURRENT else None
    _compiled_serve_burst = _serve_c.serve_burst if _CURRENT else None

#: Why serve_burst returned: the ring stayed empty (after spinning, if asked); the
#: next chain is one for Python to pop; `budget` requests were served; `turn_s`
#: passed while polling kept finding requests.
BURST_EMPTY, BURST_DEFER, BURST_BUDGET, BURST_TURN = 0, 1, 2, 3

if TYPE_CHECKING:
    from vvu_runtime.vhost_user.vring import Vring
    from vvu_runtime.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

#: Protocol features this device needs (the session adds what it does for all devices):
#: multiqueue, the config space, and inflight tracking for reconnects.
PROTOCOL_FEATURES = PF.MQ.mask | PF.CONFIG.mask | PF.INFLIGHT_SHMFD.mask

#: Largest single guest segment we advertise (SIZE_MAX); preadv takes any size,
#: this only keeps one request from monopolising the loop for too long.
SIZE_MAX = 1 << 20
#: Segments per request (SEG_MAX): fits a 128-entry ring (header and status take two),
#: as QEMU and qemu-storage-daemon advertise.
SEG_MAX = 128 - 2
MAX_DISCARD_SECTORS = 1 << 16  # 32 MiB per segment
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 1 << 16
MAX_WRITE_ZEROES_SEG = 32

_HDR_SIZE = REQUEST_HEADER.size
_SECTOR_MASK = SECTOR_SIZE - 1
_preadv = os.preadv
_clock = time.perf_counter


def _spin(vring: Vring, us: float) -> bool:
    """Look at the ring until a request is there (True) or ``us`` have passed."""
    has_available = vring.has_available
    deadline = _clock() + us * 1e-6
    while _clock() < deadline:
        if has_available():
            return True
    return False
_pwritev = os.pwritev
_unpack_header = REQUEST_HEADER.unpack_from
_IN = RequestType.IN.value
_OUT = RequestType.OUT.value
_OK = Status.OK.value
_IOERR = Status.IOERR.value
_UNSUPP = Status.UNSUPP.value


class BadChain(DescriptorError):
    """A chain that is not a virtio-blk request at all (no header or no status byte)."""


class RequestFailed(Exception):
    """A request that parses but cannot be served: its status becomes ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class BlkDevice(VhostUserDevice):
    """A virtio-blk device on a raw image, for one vhost-user front-end."""

    #: Requests taken and completed per group, with a notify after each: the driver
    #: can reap and refill while we serve the next group, and EVENT_IDX keeps the
    #: notifies rare. At QD32 (benchmarks/blk_bench.py) 16 measured better than 4 or
    #: 8 (notify cost) and level with one notify per whole batch.
    notify_every = 16
    #: After a busy drain (at least ``notify_every`` requests) finds the ring empty,
    #: spin this long for more before returning to the event loop, saving the
    #: driver's kick and our wakeup when it refills within microseconds. At QD32 on
    #: a quiet machine (benchmarks/blk_bench.py, 3 runs each) 50 us gave 256-263k
    #: IOPS, a saturated core at the same CPU per request, against 108-211k without;
    #: an idle or lightly loaded ring never spins. 0 disables.
    poll_us = 50.0
    #: After any call that served a request, keep polling the ring this long with
    #: the driver's kicks off (EVENT_IDX's avail_event left behind, or NO_NOTIFY),
    #: like vvu-switch --busy-poll: a driver that submits its next request within
    #: the window costs no kick, no vvu-devd relay and no wakeup, which is what a
    #: queue-depth-1 stream through an appliance pays most for. It spins a CPU for
    #: that long after each burst and holds up the event loop (other exports, session
    #: messages) by at most that much. 0 (the default) disables it.
    busy_poll_us = 0.0
    #: A call that keeps finding requests while busy polling gives the event loop
    #: back after this long (seconds; the ring is served again right after): a
    #: driver trickling requests just inside the window must not hold up the
    #: session's messages and the process's other disks for 256 windows.
    busy_turn = 0.005
    #: Polling stops for this call after this many requests (other queues and the
    #: session's messages get their turn); draining what is available still goes on.
    max_polled = 4096
    #: Requests served per call while an event loop runs; then the ring is served
    #: again after everything else ready (other exports, session messages): a
    #: driver that refills as fast as we serve cannot keep the loop to itself.
    turn_budget = 256

    def __init__(
        self,
        image: RawImage,
        *,
        queues: int = 1,
        serial: str = "",
        name: str | None = None,
        max_queue_size: int = 1024,
    ) -> None:
        if queues < 1:
            raise ValueError("a virtio-blk device needs at least one queue")
        self.image = image
        self.name = name or f"disk {image.path}"
        self.read_only = image.read_only
        self._queues = queues
        self._max_queue_size = max_queue_size
        self.serial = serial.encode()[:ID_BYTES]
        # In direct mode the guest should send blocks O_DIRECT accepts as they are.
        self.blk_size = max(SECTOR_SIZE, image.alignment)
        self.capacity = (image.size // self.blk_size * self.blk_size) >> SECTOR_SHIFT
        self._capacity_bytes = self.capacity << SECTOR_SHIFT
        self._acked = 0
        #: Volatile write cache on (writeback, FLUSH makes data durable) or off
        #: (write-through: every write is durable when it completes). Starts on;
        #: only a driver (CONFIG_WCE) changes it, for the life of the process.
        self.writeback = True
        self._log_budget = 20
        self._turns = LoopTurns(lambda: self.name, self.process, log)
        self._fd = image.fd
        #: Plain buffered I/O: the serve() fast paths may call preadv/pwritev themselves.
        self._fast = not image.direct
        #: Writes may skip the general path: writable, and no write-through to honour.
        self._write_ok = not self.read_only
        self._fast_write = self._fast and self._write_ok
        #: serve()'s fast path in C, when built and not switched off (None: Python's).
        self._serve_fast = None if accel.pure_python_forced() else _compiled_serve_fast
        #: process()'s loop in C over compiled split rings (None: Python's only).
        self._serve_burst = (None if accel.pure_python_forced()
                             or compiled_split_queue() is None else _compiled_serve_burst)

    # --- VhostUserDevice -------------------------------------------------------------------

    def num_queues(self) -> int:
        return self._queues

    def max_queue_size(self) -> int:
        return self._max_queue_size

    def features(self) -> int:
        bits = (
            Feature.SIZE_MAX.mask | Feature.SEG_MAX.mask | Feature.BLK_SIZE.mask
            | Feature.TOPOLOGY.mask | Feature.FLUSH.mask | Feature.CONFIG_WCE.mask
            | int(RING_FEATURES)  # VERSION_1, INDIRECT_DESC, EVENT_IDX, RING_PACKED
        )
        if self._queues > 1:
            bits |= Feature.MQ.mask
        if self.read_only:
            bits |= Feature.RO.mask
        else:
            bits |= Feature.DISCARD.mask | Feature.WRITE_ZEROES.mask
        return bits

    def protocol_features(self) -> int:
        return PROTOCOL_FEATURES

    def set_features(self, features: int) -> None:
        self._acked = features

    def config(self) -> BlkConfig:
        physical = max(self.blk_size, 4096)
        return BlkConfig(
            capacity=self.capacity,
            size_max=SIZE_MAX,
            seg_max=SEG_MAX,
            blk_size=self.blk_size,
            physical_block_exp=(physical // self.blk_size).bit_length() - 1,
            min_io_size=1,
            opt_io_size=0,
            writeback=1 if self.writeback else 0,
            num_queues=self._queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=self.blk_size >> SECTOR_SHIFT,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG,
            write_zeroes_may_unmap=1,
        )

    def get_config(self, offset: int, size: int) -> bytes:
        raw = self.config().pack()
        return raw[offset:offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        # Only `writeback` is driver-writable, and only with CONFIG_WCE (§5.2.5).
        start, end = offset, offset + len(data)
        if start <= blk.CONFIG_WRITEBACK_OFFSET < end:
            if not self._acked & Feature.CONFIG_WCE.mask:
                log.warning("%s: front-end wrote 'writeback' without CONFIG_WCE; ignored",
                            self.name)
                return
            value = data[blk.CONFIG_WRITEBACK_OFFSET - start]
            self.writeback = bool(value)
            self._write_ok = not self.read_only and self.writeback
            self._fast_write = self._fast and self._write_ok
            log.info("%s: write cache %s", self.name,
                     "on (writeback)" if self.writeback else "off (write-through)")
        else:
            log.warning("%s: front-end wrote read-only config bytes [%d, %d); ignored",
                        self.name, start, end)

    def queue_started(self, vring: Vring) -> None:
        log.debug("%s: queue %d started", self.name, vring.index)

    def queue_stopped(self, vring: Vring) -> None:
        # Nothing is ever in flight between process() calls: nothing to cancel.
        log.debug("%s: queue %d stopped", self.name, vring.index)

    def reset(self) -> None:
        # `writeback` survives on purpose: QEMU does not repeat SET_CONFIG after a
        # reconnect, so a guest that chose write-through must keep getting it.
        self._acked = 0

    def process(self, vring: Vring) -> None:
        """Drain the ring: serve and complete every available request.

        Requests are taken and completed in groups of :attr:`notify_every`
        (``pop_many``/``push_many``: one avail-index read and one used-index store
        per group) with a notify after each group, so the driver reaps and refills
        while we serve the next one. When a busy ring runs empty we poll it for
        :attr:`poll_us` before going back to the event loop, and after any request
        for :attr:`busy_poll_us` with the driver's kicks off (see both).

        On a compiled split ring the loop runs in C (``_serve_c.serve_burst``) for
        the requests it serves, and this one's steps for every other.

        A disabled ring is left alone: for a disk, "consume without side effects"
        would mean acknowledging writes that never happened, so its requests wait
        in the ring until it is enabled again.
        """
        if not vring.enabled:
            return
        burst = self._burst_args(vring)
        if burst is None:
            self._process_python(vring)
        else:
            self._process_burst(vring, *burst)

    def _burst_args(self, vring: Vring) -> tuple[tuple[object, ...], tuple[object, ...]] | None:
        """What serve_burst needs for this ring, before and after its loop arguments;
        None when it cannot run it (not built, a packed or dirty-logging ring,
        requests to resubmit, an image it cannot do the I/O of)."""
        if self._serve_burst is None:
            return None
        target = vring.tracked_queue
        if target is None:
            return None
        queue, tracker = target
        if not is_compiled(queue) or queue.log_all:
            return None
        if tracker is not None and (type(tracker) is not SplitInflight
                                    or tracker._queue is not queue):
            return None
        io: tuple[object, ...]
        if self._fast:
            io = (self._fd, self._capacity_bytes, self._fast_write)
        elif not self.image.pinnable:
            image = self.image
            io = (self._fd, self._capacity_bytes, self._write_ok, image.bounce,
                  image.alignment)
        else:
            return None
        call = vring.call
        # The call as one register store (the appliance's doorbell companion), or None.
        bell = None if call is None else call.register()
        return (queue, tracker, vring, bell), io

    def _process_burst(self, vring: Vring, head: tuple[object, ...],
                       io: tuple[object, ...]) -> None:
        """process() with serve_burst doing the groups (and the busy poll) it can."""
        assert self._serve_burst is not None
        burst: Callable[..., tuple[int, int]] = self._serve_burst
        limit = self.notify_every
        busy = 0  # served since the ring was last found empty
        polled = 0  # requests served in this call after polls
        left = self.turn_budget  # requests before we give the loop back
        quiet = False  # the driver's kicks are off (busy polling)
        try:
            while True:
                if quiet:
                    served, why = burst(*head, limit, left, self.busy_poll_us,
                                        self.busy_turn, *io)
                else:
                    served, why = burst(*head, limit, left, 0.0, 0.0, *io)
                busy += served
                left -= served
                if why == BURST_DEFER:
                    served = self._serve_group(vring)  # the group it declined
                    if served < 0:
                        return  # the ring failed
                    busy += served
                    left -= served
                    if served and left > 0:
                        continue
                    why = BURST_BUDGET if served else BURST_EMPTY  # or nothing there after all
                if why != BURST_EMPTY or left <= 0:
                    if self._turns.come_back(vring):
                        return  # kicks back on below; served again soon
                    left = self.turn_budget
                    continue
                if self.busy_poll_us > 0 and (busy or quiet):
                    if not quiet:
                        # Served something: poll on with the driver's kicks off.
                        vring.kick_suppression(True)
                        quiet = True
                        busy = 0
                        continue
                    # A whole window without a request: kicks back on, and the ring
                    # re-read so that a request published just then is not stranded.
                    quiet = False
                    if vring.kick_suppression(False):
                        continue
                    return
                if (busy < limit or polled >= self.max_polled
                        or not self._poll_for_more(vring)):
                    return
                polled += busy
                busy = 0
        finally:
            if quiet:
                vring.kick_suppression(False)

    def _serve_group(self, vring: Vring) -> int:
        """Pop up to ``notify_every`` chains, serve, push and notify them; how many
        (0: the ring was empty; -1: a bad chain failed the ring)."""
        chains = vring.pop_many(self.notify_every)
        if not chains:
            return 0
        serve = self.serve
        done: list[tuple[DescriptorChain, int]] = []
        append = done.append
        try:
            for chain in chains:
                append((chain, serve(chain)))
        except BadChain as exc:
            # Like QEMU's virtio_error(): a driver this broken gets NEEDS_RESET.
            # Announce what we completed first; the failed ring stays silent.
            if done:
                vring.push_many(done)
                vring.notify()
            self._log_bad(vring.index, str(exc))
            vring.fail(exc)
            return -1
        vring.push_many(done)
        vring.notify()
        return len(chains)

    def _process_python(self, vring: Vring) -> None:
        """process() in Python: the reference, and the loop for packed rings."""
        limit = self.notify_every
        busy = 0  # served since the ring was last found empty
        polled = 0  # requests served in this call after polls
        left = self.turn_budget  # requests before we give the loop back
        quiet = False  # the driver's kicks are off (busy polling)
        turn_ends = 0.0  # when this call gives the loop back, once it busy-polled
        try:
            while True:
                served = self._serve_group(vring)
                if served < 0:
                    return
                if not served:
                    if busy and self.busy_poll_us > 0:
                        # Kicks stay off while requests keep coming within the window.
                        quiet = True
                        if not self._busy_poll(vring):
                            quiet = False  # _busy_poll turned them back on
                            return
                        busy = 0
                        now = _clock()
                        if not turn_ends:
                            turn_ends = now + self.busy_turn
                        elif now >= turn_ends:
                            if self._turns.come_back(vring):
                                return  # kicks back on below; served again soon
                            turn_ends = now + self.busy_turn
                        continue
                    if (busy < limit or polled >= self.max_polled
                            or not self._poll_for_more(vring)):
                        return
                    polled += busy
                    busy = 0
                    continue
                busy += served
                left -= served
                if left <= 0:
                    if self._turns.come_back(vring):
                        return
                    left = self.turn_budget
        finally:
            if quiet:
                # Leaving with work queued (our turn is up) or on an error: the
                # driver must be able to wake us again.
                vring.kick_suppression(False)

    def _busy_poll(self, vring: Vring) -> bool:
        """Spin up to ``busy_poll_us`` with the driver's kicks off. True: requests came
        (kicks stay off, the caller serves them and polls again). False: nothing came;
        kicks are back on, and nothing was published before they were."""
        vring.kick_suppression(True)
        if _spin(vring, self.busy_poll_us):
            return True
        # Re-enabling re-reads the ring: a request published just before a driver
        # saw kicks on again would otherwise wait for the next one.
        return vring.kick_suppression(False)

    def _poll_for_more(self, vring: Vring) -> bool:
        """Spin up to ``poll_us`` for the driver's next request; True if one came."""
        if self.poll_us <= 0:
            return False
        return _spin(vring, self.poll_us) or vring.has_available()

    # --- requests --------------------------------------------------------------------------

    def serve(self, chain: DescriptorChain) -> int:
        """Serve one request and write its status; returns the bytes written for push().

        The whole device-writable length is reported (QEMU does the same): the
        status byte is its last byte, so it is all "written" as far as the
        driver can tell, and dirty logging then covers data and status alike.
        """
        serve_fast = self._serve_fast
        if serve_fast is not None:
            # The compiled copy of the fast path below; -1: not served, go on here.
            if self._fast:
                done = serve_fast(chain.readable, chain.writable, self._fd,
                                  self._capacity_bytes, self._fast_write)
                if done >= 0:
                    return done
            elif not self.image.pinnable:
                # O_DIRECT into memory it cannot pin (an appliance): what the general
                # path would do through RawImage's bounce buffer, in one C call.
                image = self.image
                done = serve_fast(chain.readable, chain.writable, self._fd,
                                  self._capacity_bytes, self._write_ok, image.bounce,
                                  image.alignment)
                if done >= 0:
                    return done
        readable = chain.readable
        writable = chain.writable
        if not writable:
            raise BadChain("request has no device-writable status byte")
        if not readable:
            raise BadChain("request has no device-readable header")
        first = readable[0]
        if len(first) >= _HDR_SIZE:
            rtype, _, sector = _unpack_header(first)
        else:
            head = b"".join(readable)
            if len(head) < _HDR_SIZE:
                raise BadChain(f"request header is {len(head)} bytes, needs {_HDR_SIZE}")
            rtype, _, sector = _unpack_header(head)
        last = writable[-1]
        nlast = len(last)
        if not nlast:
            # Zero-length descriptors (legal in a ring, useless): the status byte is
            # the last byte of the writable part, wherever that is.
            writable = [w for w in writable if len(w)]
            if not writable:
                raise BadChain("request has no device-writable status byte")
            last = writable[-1]
            nlast = len(last)

        # Fast paths: the layout Linux and libblkio use (header alone in the first
        # descriptor, status alone in the last), buffered I/O, one syscall straight
        # between the image and guest memory. Anything unusual, short or failing
        # falls through to the general path, which redoes it (I/O is idempotent)
        # and reports errors properly.
        if nlast == 1 and len(first) == _HDR_SIZE and self._fast:
            if rtype == _IN and len(readable) == 1:
                data = writable[:-1]
                length = 0
                for d in data:
                    length += len(d)
                offset = sector << SECTOR_SHIFT
                if (length and not length & _SECTOR_MASK
                        and offset + length <= self._capacity_bytes):
                    try:
                        done = _preadv(self._fd, data, offset)
                    except OSError:
                        done = -1
                    if done == length:
                        last[0] = _OK
                        return length + 1
            elif rtype == _OUT and len(writable) == 1 and self._fast_write:
                data = readable[1:]
                length = 0
                for d in data:
                    length += len(d)
                offset = sector << SECTOR_SHIFT
                if (length and not length & _SECTOR_MASK
                        and offset + length <= self._capacity_bytes):
                    try:
                        done = _pwritev(self._fd, data, offset)
                    except OSError:
                        done = -1
                    if done == length:
                        last[0] = _OK
                        return 1

        wlen = nlast
        for w in writable:
            wlen += len(w)
        wlen -= nlast
        try:
            if rtype == _IN:
                status = self._read(readable, writable, first, sector)
            elif rtype == _OUT:
                status = self._write(readable, writable, first, sector)
            else:
                status = self._other(rtype, readable, writable, first, sector)
        except RequestFailed as exc:
            self._log_request(rtype, sector, str(exc))
            status = exc.status
        except OSError as exc:
            self._log_request(rtype, sector, f"I/O error: {exc.strerror or exc}")
            status = _IOERR
        last[nlast - 1] = status
        return wlen

    def _read(self, readable: list[memoryview], writable: list[memoryview],
              first: memoryview, sector: int) -> int:
        if len(readable) > 1 or len(first) > _HDR_SIZE:
            raise RequestFailed(_IOERR, "IN request carries device-readable data")
        last = writable[-1]
        data = writable[:-1] if len(last) == 1 else [*writable[:-1], last[:-1]]
        length = 0
        for d in data:
            length += len(d)
        offset = sector << SECTOR_SHIFT
        if length & (SECTOR_SIZE - 1):
            raise RequestFailed(_IOERR, f"IN of {length} bytes is not whole sectors")
        if offset + length > self._capacity_bytes:
            raise RequestFailed(_IOERR, f"IN of {length} bytes beyond capacity "
                                       f"{self.capacity} sectors")
        if length:
            self.image.readv(data, offset)
        return _OK

    def _write(self, readable: list[memoryview], writable: list[memoryview],
               first: memoryview, sector: int) -> int:
        if len(writable) > 1 or len(writable[0]) > 1:
            raise RequestFailed(_IOERR, "OUT request carries device-writable data")
        if self.read_only:
            raise RequestFailed(_IOERR, "OUT to a read-only disk")
        data = self._readable_data(readable, first)
        length = 0
        for d in data:
            length += len(d)
        offset = sector << SECTOR_SHIFT
        if length & (SECTOR_SIZE - 1):
            raise RequestFailed(_IOERR, f"OUT of {length} bytes is not whole sectors")
        if offset + length > self._capacity_bytes:
            raise RequestFailed(_IOERR, f"OUT of {length} bytes beyond capacity "
                                       f"{self.capacity} sectors")
        if length:
            self.image.writev(data, offset, dsync=not self.writeback)
        return _OK

    @staticmethod
    def _readable_data(readable: list[memoryview], first: memoryview) -> list[memoryview]:
        if len(first) == _HDR_SIZE:
            return readable[1:]
        if len(first) > _HDR_SIZE:
            return [first[_HDR_SIZE:], *readable[1:]]
        # The header itself was split over descriptors: skip its 16 bytes.
        out: list[memoryview] = []
        skip = _HDR_SIZE
        for r in readable:
            if skip >= len(r):
                skip -= len(r)
                continue
            out.append(r[skip:])
            skip = 0
        return out

    def _other(self, rtype: int, readable: list[memoryview], writable: list[memoryview],
               first: memoryview, sector: int) -> int:
        if rtype == RequestType.FLUSH:
            if not self.read_only:
                self.image.flush()
            return _OK
        if rtype == RequestType.GET_ID:
            return self._get_id(writable)
        if rtype == RequestType.DISCARD:
            return self._ranges(rtype, readable, writable, first, Feature.DISCARD,
                                MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        if rtype == RequestType.WRITE_ZEROES:
            return self._ranges(rtype, readable, writable, first, Feature.WRITE_ZEROES,
                                MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        raise RequestFailed(_UNSUPP, f"request type {rtype} is not supported")

    def _get_id(self, writable: list[memoryview]) -> int:
        last = writable[-1]
        data = [*writable[:-1], last[:-1]] if len(last) > 1 else writable[:-1]
        # NUL-padded to 20 bytes, cut to what the driver gave us room for.
        ident = self.serial.ljust(ID_BYTES, b"\0")
        pos = 0
        for d in data:
            if pos >= ID_BYTES:
                break
            take = min(len(d), ID_BYTES - pos)
            d[:take] = ident[pos:pos + take]
            pos += take
        return _OK

    def _ranges(self, rtype: int, readable: list[memoryview], writable: list[memoryview],
                first: memoryview, feature: Feature, max_seg: int, max_sectors: int) -> int:
        """DISCARD and WRITE_ZEROES: validate every segment, then apply them in order."""
        if not self._acked & feature.mask:
            raise RequestFailed(_UNSUPP, f"{feature.name} was not negotiated")
        if self.read_only:
            raise RequestFailed(_IOERR, f"{feature.name} on a read-only disk")
        if len(writable) > 1 or len(writable[0]) > 1:
            raise RequestFailed(_IOERR, f"{feature.name} request carries device-writable data")
        raw = b"".join(self._readable_data(readable, first))
        if not raw or len(raw) % SEGMENT.size:
            raise RequestFailed(_IOERR, f"{feature.name} payload of {len(raw)} bytes is not a "
                                       f"whole number of {SEGMENT.size}-byte segments")
        segments = list(SEGMENT.iter_unpack(raw))
        if len(segments) > max_seg:
            raise RequestFailed(_IOERR, f"{feature.name} with {len(segments)} segments, "
                                       f"at most {max_seg}")
        zeroes = rtype == RequestType.WRITE_ZEROES
        allowed_flags = SEGMENT_F_UNMAP if zeroes else 0
        for seg_sector, num, flags in segments:
            if flags & ~allowed_flags:
                raise RequestFailed(_UNSUPP, f"{feature.name} segment flags {flags:#x}")
            if num > max_sectors:
                raise RequestFailed(_IOERR, f"{feature.name} of {num} sectors, "
                                           f"at most {max_sectors}")
            if seg_sector + num > self.capacity:
                raise RequestFailed(_IOERR, f"{feature.name} of sectors [{seg_sector}, "
                                           f"+{num}) beyond capacity {self.capacity}")
        dsync = not self.writeback
        for seg_sector, num, flags in segments:
            if not num:
                continue
            offset, length = seg_sector << SECTOR_SHIFT, num << SECTOR_SHIFT
            if zeroes:
                self.image.write_zeroes(offset, length, unmap=bool(flags & SEGMENT_F_UNMAP),
                                        dsync=dsync)
            else:
                self.image.discard(offset, length)
        return _OK

    # --- logging ---------------------------------------------------------------------------

    def _log_request(self, rtype: int, sector: int, reason: str) -> None:
        try:
            what = RequestType(rtype).name
        except ValueError:
            what = f"type {rtype}"
        self._log_limited("%s: %s at sector %d: %s", self.name, what, sector, reason)

    def _log_bad(self, queue: int, reason: str) -> None:
        self._log_limited("%s: queue %d: bad descriptor chain: %s", self.name, queue, reason)

    def _log_limited(self, fmt: str, *args: object) -> None:
        """Warn about a guest's bad requests, but don't let a guest flood the log."""
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning(fmt, *args)
            if self._log_budget == 0:
                log.warning("%s: more bad requests will be logged at debug level only",
                            self.name)
        else:
            log.debug(fmt, *args)

