"""A minimal virtio-scsi driver for tests: builds requests in a front-end's guest RAM
and runs them on DriverQueues (control, event and request queues)."""

from __future__ import annotations

from vvu_runtime.vhost_user.frontend import DriverQueue, GuestRam
from vvu_runtime.virtio.scsi import (
    AN_RESP,
    CMD_RESP,
    EVENT,
    AnReq,
    CmdReq,
    CmdResp,
    Event,
    TmfReq,
    encode_lun,
)


class ScsiDriver:
    """Requests on DriverQueues, their buffers allocated in ``ram``."""

    def __init__(self, ram: GuestRam, control: DriverQueue, event: DriverQueue,
                 requests: list[DriverQueue]) -> None:
        self.ram = ram
        self.control = control
        self.event = event
        self.requests = requests
        self._tag = 0

    def _buf(self, data: bytes) -> tuple[int, int]:
        gpa = self.ram.alloc(len(data))
        self.ram.view(gpa, len(data))[:] = data
        return gpa, len(data)

    @staticmethod
    def _complete(dq: DriverQueue, expected: int = 1) -> list[tuple[object, int]]:
        dq.kick()
        done: list[tuple[object, int]] = []
        while len(done) < expected:
            assert dq.wait_call(), f"{len(done)} of {expected} completions on queue {dq.index}"
            done += dq.ring.get_used()
        return done

    def submit(self, lun: int, cdb: bytes, *, out: bytes = b"", into: int = 0,
               queue: int = 0, target: int = 0) -> tuple[int, int]:
        """Queue a command on request queue ``queue``; returns (resp gpa, data-in gpa)."""
        self._tag += 1
        req = CmdReq(encode_lun(target, lun), self._tag, 0, 0, 0, cdb.ljust(32, b"\0")).pack()
        readable = [self._buf(req)] + ([self._buf(out)] if out else [])
        resp = self.ram.alloc(CMD_RESP.size)
        data = self.ram.alloc(into) if into else 0
        writable = [(resp, CMD_RESP.size)] + ([(data, into)] if into else [])
        self.requests[queue].ring.add(readable, writable, token=(resp, data))
        return resp, data

    def command(self, lun: int, cdb: bytes, *, out: bytes = b"", into: int = 0,
                queue: int = 0, target: int = 0) -> tuple[CmdResp, bytes, int]:
        """One command to completion: (response, data-in, bytes the device wrote)."""
        resp, data = self.submit(lun, cdb, out=out, into=into, queue=queue, target=target)
        ((token, written),) = self._complete(self.requests[queue])
        assert token == (resp, data)
        r = CmdResp.unpack(bytes(self.ram.view(resp, CMD_RESP.size)))
        return r, bytes(self.ram.view(data, into)) if into else b"", written

    def tmf(self, subtype: int, lun: int, tag: int = 0) -> int:
        """A task management function to completion: its response byte."""
        req = self._buf(TmfReq(subtype, encode_lun(0, lun), tag).pack())
        resp = self.ram.alloc(1)
        self.control.ring.add([req], [(resp, 1)], token=resp)
        self._complete(self.control)
        return self.ram.view(resp, 1)[0]

    def an_query(self, lun: int) -> tuple[int, int]:
        """AN_QUERY to completion: (event_actual, response)."""
        req = self._buf(AnReq(1, encode_lun(0, lun), 0xFF).pack())
        resp = self.ram.alloc(AN_RESP.size)
        self.control.ring.add([req], [(resp, AN_RESP.size)], token=resp)
        self._complete(self.control)
        actual, response = AN_RESP.unpack(bytes(self.ram.view(resp, AN_RESP.size)))
        return actual, response

    def post_event_buffers(self, count: int) -> None:
        for _ in range(count):
            gpa = self.ram.alloc(EVENT.size)
            self.event.ring.add([], [(gpa, EVENT.size)], token=gpa)
        self.event.kick()

    def events(self, expected: int) -> list[Event]:
        """Wait for ``expected`` events (posted buffers filled in by the device)."""
        got: list[Event] = []
        while len(got) < expected:
            assert self.event.wait_call(), f"{len(got)} of {expected} events arrived"
            for gpa, written in self.event.ring.get_used():
                assert written == EVENT.size
                got.append(Event.unpack(bytes(self.ram.view(gpa, EVENT.size))))
        return got
