"""vvu_runtime.fds: the fd and socket toolkit both protocols share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from vvu_runtime.fds import FdError, Outbox, close_fds, is_eventfd, remove_stale_socket
from vvu_runtime.vhost_user.transport import UnixChannel


def test_close_fds_closes_and_empties() -> None:
    fds = [os.eventfd(0), os.eventfd(0)]
    assert all(is_eventfd(fd) for fd in fds)
    kept = list(fds)
    close_fds(fds)
    assert fds == [] and not any(is_eventfd(fd) for fd in kept)


def test_is_eventfd_refuses_other_fds() -> None:
    r, w = os.pipe()
    try:
        assert not is_eventfd(r)
    finally:
        close_fds([r, w])


def test_stale_socket_replaced_live_and_files_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    with pytest.raises(FdError, match="another process is listening"):
        remove_stale_socket(path)
    live.close()  # the file stays: now stale
    remove_stale_socket(path)
    assert not os.path.exists(path)
    Path(path).write_text("data")
    with pytest.raises(FdError, match="exists and is not a socket"):
        remove_stale_socket(path)
    remove_stale_socket(str(tmp_path / "absent.sock"))


def test_outbox_queues_what_the_peer_does_not_read_and_drains_later() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    loop = asyncio.new_event_loop()
    drained: list[bool] = []
    errors: list[OSError] = []
    try:
        box = Outbox(a, loop, on_error=errors.append, on_drained=lambda: drained.append(True))
        chunk = bytes(1 << 20)
        start = time.monotonic()
        for _ in range(8):
            box.send(chunk)
        assert time.monotonic() - start < 1.0  # never waits for the peer
        assert box.pending > 0 and box.writing
        got = 0
        b.setblocking(False)
        deadline = time.monotonic() + 10
        while got < 8 * len(chunk) and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.001))
            with contextlib.suppress(BlockingIOError):
                got += len(b.recv(1 << 20))
        assert got == 8 * len(chunk) and box.empty and drained == [True] and not errors
    finally:
        loop.close()
        a.close()
        b.close()


def test_unix_channel_on_a_loop_never_blocks_on_a_silent_peer() -> None:
    a, b = socket.socketpair()
    loop = asyncio.new_event_loop()
    try:
        ch = UnixChannel(a, name="test")
        ch.use_loop(loop)
        start = time.monotonic()
        for _ in range(64):
            ch.send_frame(1, 1, bytes(4000))
        assert time.monotonic() - start < 1.0
    finally:
        ch.close()
        loop.close()
        b.close()


def test_eventfd_take_never_blocks_on_a_blocking_shared_file():
    from vvu_runtime.fds import eventfd_take
    fd = os.eventfd(0)  # blocking, as a peer may leave it
    try:
        assert eventfd_take(fd) == 0
        os.eventfd_write(fd, 7)
        assert eventfd_take(fd) == 7
        assert eventfd_take(fd) == 0
    finally:
        os.close(fd)


def test_eventfd_signal_skips_a_saturated_blocking_counter():
    from vvu_runtime.fds import eventfd_signal, eventfd_take
    fd = os.eventfd(0)
    try:
        assert eventfd_signal(fd) is True
        assert eventfd_take(fd) == 1
        os.eventfd_write(fd, 2**64 - 2)  # saturated: one more write would block
        os.set_blocking(fd, True)
        assert eventfd_signal(fd) is False
        assert eventfd_take(fd) == 2**64 - 2
        os.close(fd)
        assert eventfd_signal(fd) is False  # closed under us: nothing written, no raise
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)


def test_eventfd_info_tells_eventfds_apart_and_shows_semaphore_mode() -> None:
    from vvu_runtime.fds import eventfd_info
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
    dup = os.dup(a)
    try:
        ia, ib, idup = eventfd_info(a), eventfd_info(b), eventfd_info(dup)
        if ia.ident is None:
            pytest.skip("this kernel's fdinfo has no eventfd-id (an older kernel)")
        assert ia.ident == idup.ident != ib.ident
        if ib.semaphore is not None:  # newer kernels show it
            assert (ia.semaphore, ib.semaphore) == (False, True)
    finally:
        for fd in (a, b, dup):
            os.close(fd)
    with pytest.raises(FdError, match="cannot read its fdinfo"):
        eventfd_info(a)


def test_unix_listener_suspend_refuses_connects_and_resume_listens_again(
        tmp_path: Path) -> None:
    from vvu_runtime.fds import UnixListener
    path = str(tmp_path / "s.sock")
    listener = UnixListener(path, 4)
    try:
        listener.suspend()
        assert not listener.listening and os.path.exists(path)
        with socket.socket(socket.AF_UNIX) as c, pytest.raises(ConnectionRefusedError):
            c.connect(path)
        listener.resume()
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            accepted = listener.accept()
            assert accepted is not None
            accepted.close()
        listener.suspend()
    finally:
        listener.close()
    assert not os.path.exists(path)  # removed even when closed while suspended
