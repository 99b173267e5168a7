"""Regression tests for what the fuzz harnesses found (docs/fuzzing.md, "Findings").

Each test replays the shape of one finding against the code that was fixed.
"""

from __future__ import annotations

import struct

import pytest

from tests.support.kick_sources import RegularFileKickTransport
from tests.support.vhost_user_harness import EchoDevice, LoopThread, session_pair
from vvu_runtime.device.errors import MessageError
from vvu_runtime.device.vfio_user.protocol import Version
from vvu_runtime.vhost_user.frontend import GuestRam, setup_queue


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                       # nesting past the recursion limit
    b'{"capabilities":{"x":' + b"9" * 100_000 + b"}}",      # past int's digit limit
], ids=["deep-nesting", "huge-number"])
def test_version_json_that_python_cannot_parse_is_a_parse_error(body: bytes) -> None:
    # Found by the vfio-user harness: these raised RecursionError / ValueError out of
    # Version.unpack, which the server logged as an internal error (answered EIO).
    with pytest.raises(MessageError, match="capability JSON does not parse"):
        Version.unpack(struct.pack("<HH", 0, 0) + body + b"\0")


def test_a_kick_source_the_loop_cannot_wait_on_is_polled_instead() -> None:
    # Found by the session harness: a memfd as the kick fd made epoll refuse
    # add_reader (EPERM) inside SET_VRING_KICK; the session logged an internal error
    # and dropped the connection. Such a ring is now polled, as with a NOFD kick.
    lt = LoopThread()
    ram = GuestRam(1 << 20)
    try:
        with session_pair(EchoDevice(), lt, transport=RegularFileKickTransport()) as (
                fe, session):
            fe.negotiate()
            fe.set_mem_table([(ram.region, ram.fd)])
            dq = setup_queue(fe, ram, 0, 8)
            src, dst = ram.alloc(2), ram.alloc(8)
            ram.view(src, 2)[:] = b"ok"
            dq.ring.add([(src, 2)], [(dst, 8)], token=dst)
            assert dq.wait_call(), "the polled ring was not served"
            assert dq.ring.get_used() == [(dst, 2)]
            assert bytes(ram.view(dst, 2)) == b"OK"
            assert fe.get_queue_num() == 2
            assert not session.closed
            dq.close()
    finally:
        ram.close()
        lt.stop()
