"""The virtio-scsi device: one controller (target 0), several LUNs, for one front-end.

Queues (VIRTIO 1.2 §5.6.2): 0 control (task management, asynchronous
notification queries), 1 events (LUNs added and removed), 2.. requests
(multiqueue: every request queue is served alike).

Like :class:`~vvu_runtime.backends.blk.device.BlkDevice`, every command is
executed synchronously while a ring is drained and completed before
``process`` returns: nothing is ever in flight between two calls. That makes
task management simple and honest: by the time a TMF is read from the control
queue, every command the driver made available before it has completed, so
ABORT TASK / ABORT TASK SET / CLEAR TASK SET find nothing to abort and answer
FUNCTION COMPLETE, QUERY TASK answers FUNCTION COMPLETE (not in the task set),
and LOGICAL UNIT RESET has no queue to drain. An event-queue buffer is only
popped when there is an event to put in it, so none is ever held either.

Malformed chains, decided as QEMU's virtio-scsi does (``virtio_scsi_bad_req``):
a request header or response area too short to hold the fixed headers, or a
control request of unknown type, fails the ring (logged, err notifier,
NEEDS_RESET). Everything else gets a response: BAD_TARGET for a LUN that is
not there, OVERRUN for buffers that do not fit the CDB, CHECK CONDITION with
sense data for everything SCSI itself rejects.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vvu_runtime.backends.scsi.commands import CommandSet, Overrun, scatter, take
from vvu_runtime.backends.scsi.lun import Lun
from vvu_runtime.backends.turns import LoopTurns
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.virtio.errors import DescriptorError, VirtioError
from vvu_runtime.virtio.features import RING_FEATURES
from vvu_runtime.virtio.scsi import (
    AN_RESP,
    CMD_REQ,
    CMD_RESP,
    CONTROL_QUEUE,
    CTRL_TYPE,
    EVENT,
    EVENT_QUEUE,
    EVENTS_MISSED,
    FIXED_QUEUES,
    FUNCTION_COMPLETE,
    SENSE_SIZE,
    TMF_REQ,
    AnReq,
    ControlType,
    Event,
    EventType,
    Feature,
    ResetReason,
    Response,
    TmfReq,
    TmfSubtype,
    decode_lun,
    encode_lun,
)

if TYPE_CHECKING:
    from vvu_runtime.vhost_user.vring import Vring
    from vvu_runtime.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

#: The one target this controller has; other target numbers answer BAD_TARGET.
TARGET = 0
#: Events kept for a driver that has no event buffer posted; beyond this the oldest
#: is dropped and the next one delivered carries EVENTS_MISSED (the driver rescans).
MAX_PENDING_EVENTS = 64

_REQ_SIZE = CMD_REQ.size
_RESP_SIZE = CMD_RESP.size


class BadChain(DescriptorError):
    """A chain that is not a virtio-scsi request at all (no room for its headers)."""


def _head(views: list[memoryview], size: int) -> bytes:
    """The first ``size`` bytes of ``views`` (the caller checked the length)."""
    first = views[0]
    if len(first) >= size:
        return bytes(first[:size])
    return b"".join(bytes(v) for v in views)[:size]


def _skip(views: list[memoryview], size: int) -> list[memoryview]:
    """``views`` without their first ``size`` bytes."""
    out: list[memoryview] = []
    for v in views:
        if size >= len(v):
            size -= len(v)
            continue
        out.append(v[size:] if size else v)
        size = 0
    return out


def _total(views: list[memoryview]) -> int:
    n = 0
    for v in views:
        n += len(v)
    return n


class ScsiDevice(VhostUserDevice):
    """A virtio-scsi controller with LUNs on raw images, for one vhost-user front-end."""

    #: Requests taken and completed per group, one notify per group (as in BlkDevice).
    notify_every = 16
    #: Requests served per call while an event loop runs, then the ring waits its turn.
    turn_budget = 256

    def __init__(self, luns: Iterable[Lun] = (), *, queues: int = 1, name: str = "scsi",
                 max_queue_size: int = 1024) -> None:
        if queues < 1:
            raise ValueError("a virtio-scsi device needs at least one request queue")
        self.name = name
        self.luns: dict[int, Lun] = {}
        for lun in luns:
            if lun.number in self.luns:
                raise ValueError(f"{name}: LUN {lun.number} given twice")
            self.luns[lun.number] = lun
        self._queues = queues
        self._max_queue_size = max_queue_size
        self._acked = 0
        self.commands = CommandSet()
        self._event_ring: Vring | None = None
        self._pending: deque[Event] = deque()
        self._missed = False
        self._turns = LoopTurns(lambda: self.name, self.process, log)
        self._log_budget = 20
        #: Task management functions answered, by subtype (for tests and logs).
        self.tmf_count: dict[int, int] = {}

    # --- VhostUserDevice -------------------------------------------------------------------

    def num_queues(self) -> int:
        return FIXED_QUEUES + self._queues

    def max_queue_size(self) -> int:
        return self._max_queue_size

    def features(self) -> int:
        # HOTPLUG: LUNs added and removed at runtime are announced on the event queue.
        # CHANGE (we may report parameter changes; we never need to): QEMU's
        # vhost-user-scsi acks it whatever the back-end offers (its param_change
        # property, on by default, is not in the bits it asks the back-end about),
        # and a session refuses acks of bits it did not offer.
        return Feature.HOTPLUG.mask | Feature.CHANGE.mask | int(RING_FEATURES)

    def set_features(self, features: int) -> None:
        self._acked = features

    def queue_started(self, vring: Vring) -> None:
        if vring.index == EVENT_QUEUE:
            self._event_ring = vring
        log.debug("%s: queue %d started", self.name, vring.index)

    def queue_stopped(self, vring: Vring) -> None:
        if vring is self._event_ring:
            self._event_ring = None
        log.debug("%s: queue %d stopped", self.name, vring.index)

    def reset(self) -> None:
        self._acked = 0
        self._pending.clear()
        self._missed = False
        self._event_ring = None

    def process(self, vring: Vring) -> None:
        """Serve what the driver made available on ``vring``.

        A disabled ring is left alone: for a disk, "consume without side effects"
        would mean acknowledging writes that never happened.
        """
        if not vring.enabled:
            return
        index = vring.index
        try:
            if index == CONTROL_QUEUE:
                self._process_control(vring)
            elif index == EVENT_QUEUE:
                self._flush_events()
                return
            else:
                self._process_requests(vring)
        except BadChain as exc:
            # Like QEMU's virtio_scsi_bad_req(): a driver this broken gets NEEDS_RESET.
            self._log_limited("%s: queue %d: bad descriptor chain: %s", self.name, index, exc)
            vring.fail(exc)

    def close(self) -> None:
        """Close every LUN's image (the device is not used after this)."""
        for lun in self.luns.values():
            lun.close()
        self.luns.clear()

    # --- request queues --------------------------------------------------------------------

    def _process_requests(self, vring: Vring) -> None:
        left = self.turn_budget
        while True:
            chains = vring.pop_many(self.notify_every)
            if not chains:
                return
            done: list[tuple[DescriptorChain, int]] = []
            try:
                for chain in chains:
                    done.append((chain, self.serve(chain)))
            finally:
                # Completed commands are announced even when a later chain was bad.
                if done:
                    vring.push_many(done)
                    vring.notify()
            left -= len(chains)
            if left <= 0 and self._turns.come_back(vring):
                return

    def serve(self, chain: DescriptorChain) -> int:
        """Execute one command and write its response; returns bytes written."""
        readable, writable = chain.readable, chain.writable
        rlen, wlen = _total(readable), _total(writable)
        if rlen < _REQ_SIZE:
            raise BadChain(f"command header is {rlen} bytes, needs {_REQ_SIZE}")
        if wlen < _RESP_SIZE:
            raise BadChain(f"command response area is {wlen} bytes, needs {_RESP_SIZE}")
        lun_field, _tag, _attr, _prio, _crn, cdb = CMD_REQ.unpack(_head(readable, _REQ_SIZE))
        data_out = _skip(readable, _REQ_SIZE)
        data_in = _skip(writable, _RESP_SIZE)
        number = self._address(lun_field)
        data_written = 0
        if number is None:
            status, sense, resid, response = 0, b"", wlen - _RESP_SIZE, Response.BAD_TARGET
        else:
            try:
                outcome = self.commands.execute(self.luns.get(number), cdb, data_out, data_in,
                                                tuple(self.luns))
            except Overrun as exc:
                self._log_limited("%s: %s", self.name, exc)
                status, sense, response = 0, b"", Response.OVERRUN
                resid = (rlen - _REQ_SIZE) or (wlen - _RESP_SIZE)
            else:
                status, sense, resid = outcome.status, outcome.sense, outcome.resid
                data_written = outcome.data_in
                response = Response.OK
        resp = CMD_RESP.pack(len(sense), resid, 0, status, response,
                             sense[:SENSE_SIZE])
        scatter(resp, take(writable, _RESP_SIZE))
        return _RESP_SIZE + data_written

    def _address(self, field: bytes) -> int | None:
        """The LUN number a LUN field names, None when it names nothing here
        (BAD_TARGET). LUN 0 always exists: unconfigured, it still answers INQUIRY
        and REPORT LUNS, so a guest can find the others."""
        address = decode_lun(field)
        if address is None or address[0] != TARGET:
            return None
        number = address[1]
        if number != 0 and number not in self.luns:
            return None
        return number

    # --- control queue ---------------------------------------------------------------------

    def _process_control(self, vring: Vring) -> None:
        while True:
            chain = vring.pop()
            if chain is None:
                return
            written = self._control(chain)
            vring.push(chain, written)
            vring.notify()

    def _control(self, chain: DescriptorChain) -> int:
        readable, writable = chain.readable, chain.writable
        rlen, wlen = _total(readable), _total(writable)
        if rlen < CTRL_TYPE.size:
            raise BadChain(f"control request of {rlen} bytes has no type")
        (ctype,) = CTRL_TYPE.unpack(_head(readable, CTRL_TYPE.size))
        if ctype == ControlType.TMF:
            if rlen < TMF_REQ.size or wlen < 1:
                raise BadChain(f"TMF request of {rlen} bytes, response area {wlen} bytes")
            tmf = TmfReq.unpack(_head(readable, TMF_REQ.size))
            response = self._tmf(tmf)
            scatter(bytes((response,)), writable)
            return 1
        if ctype in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
            if rlen < 16 or wlen < AN_RESP.size:
                raise BadChain(f"AN request of {rlen} bytes, response area {wlen} bytes")
            an = AnReq.unpack(_head(readable, 16))
            # No asynchronous notifications (media change and the like) on a disk.
            response = Response.OK if self._address(an.lun) is not None else \
                Response.BAD_TARGET
            scatter(AN_RESP.pack(0, response), writable)
            return AN_RESP.size
        raise BadChain(f"control request type {ctype}")

    def _tmf(self, tmf: TmfReq) -> int:
        self.tmf_count[tmf.subtype] = self.tmf_count.get(tmf.subtype, 0) + 1
        number = self._address(tmf.lun)
        try:
            subtype = TmfSubtype(tmf.subtype)
        except ValueError:
            self._log_limited("%s: TMF subtype %d is unknown", self.name, tmf.subtype)
            return Response.FUNCTION_REJECTED
        if number is None:
            return Response.BAD_TARGET
        if subtype is TmfSubtype.CLEAR_ACA:
            return Response.FUNCTION_REJECTED  # NACA is not supported
        # Nothing is in flight (module docstring): aborts and queries find no task,
        # resets have nothing to drain.
        if subtype in (TmfSubtype.LOGICAL_UNIT_RESET, TmfSubtype.I_T_NEXUS_RESET):
            log.info("%s: %s of LUN %d", self.name, subtype.name, number)
        return FUNCTION_COMPLETE

    # --- LUN set and events ----------------------------------------------------------------

    def add_lun(self, lun: Lun) -> None:
        """Attach ``lun`` and tell the driver (TRANSPORT_RESET / RESCAN)."""
        if lun.number in self.luns:
            raise ValueError(f"{self.name}: LUN {lun.number} is already attached")
        self.luns[lun.number] = lun
        log.info("%s: %s added: %s", self.name, lun.name, lun.spec.path)
        self._event(lun.number, ResetReason.RESCAN)

    def remove_lun(self, number: int) -> Lun:
        """Detach LUN ``number`` (TRANSPORT_RESET / REMOVED); the caller closes it."""
        lun = self.luns.pop(number, None)
        if lun is None:
            raise ValueError(f"{self.name}: no LUN {number} to remove")
        log.info("%s: %s removed", self.name, lun.name)
        self._event(number, ResetReason.REMOVED)
        return lun

    def _event(self, number: int, reason: ResetReason) -> None:
        if not self._acked & Feature.HOTPLUG.mask:
            # No driver, or one that does not take hotplug events: it finds the
            # new LUN set when it next scans.
            return
        if len(self._pending) >= MAX_PENDING_EVENTS:
            self._pending.popleft()
            self._missed = True
        self._pending.append(Event(EventType.TRANSPORT_RESET, encode_lun(TARGET, number),
                                   reason))
        self._flush_events()

    def _flush_events(self) -> None:
        """Put pending events into the buffers the driver posted. Runs from process()
        and from a LUN change (a signal handler): a bad buffer fails the event ring
        here rather than raising into whoever changed the LUN set."""
        vring = self._event_ring
        if vring is None or not vring.enabled or vring.failed:
            return
        try:
            self._fill_events(vring)
        except (BadChain, VirtioError) as exc:
            self._log_limited("%s: event queue: %s", self.name, exc)
            vring.fail(exc)

    def _fill_events(self, vring: Vring) -> None:
        sent = False
        while self._pending:
            chain = vring.pop()
            if chain is None:
                break
            if _total(chain.writable) < EVENT.size:
                raise BadChain(f"event buffer of {_total(chain.writable)} bytes, needs "
                               f"{EVENT.size}")
            event = self._pending.popleft()
            if self._missed:
                event = Event(event.event | EVENTS_MISSED, event.lun, event.reason)
                self._missed = False
            scatter(event.pack(), chain.writable)
            vring.push(chain, EVENT.size)
            sent = True
        if sent:
            vring.notify()

    @property
    def pending_events(self) -> int:
        return len(self._pending)

    # --- logging ---------------------------------------------------------------------------

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
