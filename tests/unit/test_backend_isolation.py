"""Tenant isolation in the backends: one hostile front-end against a real vvu-switch
(ports evil, a, b) and a real vvu-blk (exports evil, good).

Each attack goes to the evil port; then the other ports must still work (a frame
a -> b forwarded, a write and read-back on the good disk), the process must be
alive, and where the attack could make it spin, its CPU time over a short window
(utime + stime from /proc/PID/stat) must stay under half a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.blk_driver import BlkDriver
from tests.support.loop_thread import LoopThread
from tests.support.net_frames import BROADCAST, DriverPort, ether, mac, net_hdr
from tests.support.proc_cpu import cpu_share
from tests.support.vhost_user_harness import EchoDevice, session_pair
from vvu_runtime.fds import EventfdInfo, rights
from vvu_runtime.vhost_user import backend as backend_mod
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user import peer_fds
from vvu_runtime.vhost_user.errors import (
    FramingError,
    RequestError,
    TransportError,
    VhostUserError,
)
from vvu_runtime.vhost_user.frontend import (
    DriverQueue,
    GuestRam,
    VhostUserFrontend,
    setup_queue,
)
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.peer_fds import (
    Role,
    check_eventfd,
    eventfd_facts,
    protect_from_shrinking,
    same_file,
    seal_unshrinkable,
)
from vvu_runtime.vhost_user.server import LogThrottle
from vvu_runtime.vhost_user.transport import (
    MAX_FDS,
    EventFdKick,
    EventFdNotifier,
    UnixChannel,
)
from vvu_runtime.virtio.blk import RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature

ROOT = Path(__file__).resolve().parents[2]
#: Most of a core the process may use while it is under attack.
CPU_LIMIT = 0.5
EVIL_MAC = mac(9)
FULL = (1 << 64) - 2  # the largest count an eventfd holds


# ------------------------------------------------------------------ the process


def open_fds(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Backend:
    """A vvu-switch or vvu-blk process, its log and the evil socket."""

    kind: str
    proc: subprocess.Popen[bytes]
    log: Path
    evil: Path
    sockets: list[Path]
    victim_works: Callable[[], None] = lambda: None
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def assert_isolated(self, *, cpu: bool = True) -> None:
        """The other ports work, the process lives and (``cpu``) does not spin."""
        assert self.alive(), self.text()
        if cpu:
            share = cpu_share(self.pid, 1.5)
            assert share < CPU_LIMIT, f"{self.kind} used {share:.0%} of a core\n{self.text()}"
        self.victim_works()
        assert self.alive(), self.text()


def start(kind: str, args: list[str], log: Path, sockets: list[Path]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    module = {"switch": "vvu_runtime.serve.switch", "blk": "vvu_runtime.serve.blk"}[kind]
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while not all(s.exists() for s in sockets):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{kind} did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(backend: Backend) -> None:
    for close in reversed(backend.closers):
        with contextlib.suppress(Exception):
            close()
    proc = backend.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{backend.kind} ignored SIGTERM (blocked?)\n{backend.text()}")
    assert proc.returncode == 0, backend.text()
    assert not any(s.exists() for s in backend.sockets)
    assert "Traceback" not in backend.text()


@contextlib.contextmanager
def switch_backend(tmp_path: Path) -> Iterator[Backend]:
    socks = {n: tmp_path / f"{n}.sock" for n in ("evil", "a", "b")}
    log = tmp_path / "switch.log"
    proc = start("switch", [a for n, p in socks.items() for a in ("--port", f"{n}={p}")],
                 log, list(socks.values()))
    backend = Backend("switch", proc, log, socks["evil"], list(socks.values()))
    try:
        a = DriverPort(str(socks["a"]), queue_size=64)
        backend.closers.append(a.close)
        b = DriverPort(str(socks["b"]), queue_size=64)
        backend.closers.append(b.close)
        sent = [0]

        def forwarded() -> None:
            sent[0] += 1
            token = b"victim-%d" % sent[0]
            a.send(ether(BROADCAST, mac(1), 0x88B5, token))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if any(token in frame for _, frame in b.receive(1, 0.5)):
                    return
            pytest.fail(f"port a -> b: frame {token!r} not forwarded\n{backend.text()}")

        backend.victim_works = forwarded
        forwarded()
        yield backend
    finally:
        stop(backend)


@contextlib.contextmanager
def blk_backend(tmp_path: Path) -> Iterator[Backend]:
    socks = {n: tmp_path / f"{n}.sock" for n in ("evil", "good")}
    images = {n: tmp_path / f"{n}.raw" for n in socks}
    for image in images.values():
        image.write_bytes(bytes(1 << 20))
    log = tmp_path / "blk.log"
    proc = start("blk", [a for n in socks for a in ("--export", f"{socks[n]}={images[n]}")]
                 + ["--queues", "2"], log, list(socks.values()))
    backend = Backend("blk", proc, log, socks["evil"], list(socks.values()))
    try:
        fe = VhostUserFrontend.connect(socks["good"], retry_for=5)
        backend.closers.append(fe.close)
        fe.negotiate(features=fe.get_features() & ~int(VirtioFeature.RING_PACKED)
                     & ~m.VHOST_F_LOG_ALL)
        ram = GuestRam(1 << 20)
        backend.closers.append(ram.close)
        fe.set_mem_table([(ram.region, ram.fd)])
        dq = setup_queue(fe, ram, 0, 64)
        backend.closers.append(dq.close)
        drv = BlkDriver(dq, ram)
        done = [0]

        def served() -> None:
            done[0] += 1
            data = bytes([done[0]]) * 512
            assert drv.run(RequestType.OUT, done[0], out=data)[0] == Status.OK, backend.text()
            assert drv.run(RequestType.IN, done[0], into=512) == (Status.OK, data)
            assert images["good"].read_bytes()[done[0] * 512:][:512] == data

        backend.victim_works = served
        served()
        yield backend
    finally:
        stop(backend)


BACKENDS = {"switch": switch_backend, "blk": blk_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with BACKENDS[request.param](tmp_path) as b:
        yield b


# ------------------------------------------------------------------ the attacker


class Evil:
    """A hostile front-end on the evil port: a real session, rings in a memfd."""

    def __init__(self, backend: Backend, *, sealed: bool = True) -> None:
        self.backend = backend
        self.fe = VhostUserFrontend.connect(backend.evil, retry_for=5)
        backend.closers.append(self.close)
        self.fe.negotiate(features=self.fe.get_features() & ~int(VirtioFeature.RING_PACKED)
                          & ~m.VHOST_F_LOG_ALL)
        self.ram = GuestRam(1 << 20, sealed=sealed)
        self.queues: dict[int, DriverQueue] = {}

    def share_memory(self) -> None:
        self.fe.set_mem_table([(self.ram.region, self.ram.fd)])

    def queue(self, index: int) -> DriverQueue:
        dq = setup_queue(self.fe, self.ram, index, 64)
        self.queues[index] = dq
        return dq

    @property
    def work_queue(self) -> int:
        """The queue where a chain gets completed: a TX ring of the switch, a blk queue."""
        return 1 if self.backend.kind == "switch" else 0

    def add_work(self, dq: DriverQueue, read: int = 512) -> None:
        """Make one chain available that the backend will complete (no kick); on
        vvu-blk a read of ``read`` bytes."""
        ram = self.ram
        if self.backend.kind == "switch":
            # To itself: the switch learns EVIL_MAC here and drops it, nobody else sees it.
            frame = net_hdr() + ether(EVIL_MAC, EVIL_MAC, 0x88B5, b"evil")
            buf = ram.alloc(len(frame))
            ram.view(buf, len(frame))[:] = frame
            dq.ring.add([(buf, len(frame))], [], buf)
        else:
            BlkDriver(dq, ram).submit(RequestType.IN, 0, into=read)

    def close(self) -> None:
        self.fe.close()
        for dq in self.queues.values():
            dq.close()
        self.ram.close()


def refused(call: Callable[[], Any]) -> bool:
    """Whether the back-end refused the request (failure ack or dropped connection)."""
    try:
        call()
    except VhostUserError:
        return True
    return False


# ------------------------------------------------------------------ blocking fds


def test_saturated_blocking_call_eventfd_does_not_block(backend: Backend) -> None:
    """The front-end fills its call eventfd and makes the shared file blocking:
    signalling it must skip, not wait for ever."""
    evil = Evil(backend)
    evil.share_memory()
    dq = evil.queue(evil.work_queue)
    os.eventfd_write(dq.call_fd, FULL)
    os.set_blocking(dq.call_fd, True)
    for _ in range(3):
        evil.add_work(dq)
        dq.kick()
    backend.assert_isolated()
    assert os.eventfd_read(dq.call_fd) == FULL  # never written: it was full


def test_kick_eventfd_for_two_queues_is_refused(backend: Backend) -> None:
    """One blocking kick eventfd for two rings: two readers race for one count, and
    the loser of an old-style blocking read would hang the process."""
    evil = Evil(backend)
    evil.share_memory()
    dq = evil.queue(0)
    os.set_blocking(dq.kick_fd, True)
    assert refused(lambda: evil.fe.set_vring_kick(1, dq.kick_fd))
    assert "already the kick eventfd of queue 0" in backend.text()
    dq.kick()
    backend.assert_isolated()


def test_kick_eventfd_that_is_also_the_call_is_refused(backend: Backend) -> None:
    evil = Evil(backend)
    evil.share_memory()
    dq = evil.queue(evil.work_queue)
    assert refused(lambda: evil.fe.set_vring_call(evil.work_queue, dq.kick_fd))
    assert "a kick eventfd cannot have a second role" in backend.text()
    backend.assert_isolated()


def test_a_pipe_as_kick_is_refused(backend: Backend) -> None:
    evil = Evil(backend)
    evil.share_memory()
    evil.queue(0)
    r, w = os.pipe()
    try:
        assert refused(lambda: evil.fe.set_vring_kick(0, r))
        os.write(w, b"x")  # readable for ever if it had been taken
    finally:
        os.close(r)
        os.close(w)
    assert "the fd is not an eventfd" in backend.text()
    backend.assert_isolated()


# ------------------------------------------------------------------ kick storms


def test_semaphore_kick_with_a_huge_count_does_not_spin(backend: Backend) -> None:
    """A semaphore eventfd gives 1 per read and stays readable for 2^64 reads."""
    evil = Evil(backend)
    evil.share_memory()
    evil.queue(0)
    storm = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
    try:
        was_refused = refused(lambda: evil.fe.set_vring_kick(0, storm))
        facts = eventfd_facts(storm)
        assert facts is not None
        if facts.semaphore is not None:  # this kernel shows the mode: refused outright
            assert was_refused and "semaphore mode" in backend.text()
        os.eventfd_write(storm, FULL)
        backend.assert_isolated()
    finally:
        os.close(storm)


def test_ring_flood_does_not_starve_the_other_port(backend: Backend) -> None:
    """The evil driver republishes the same chain as fast as the backend consumes
    it: the backend does real work for it, but other ports still get their turn."""
    evil = Evil(backend)
    evil.share_memory()
    dq = evil.queue(evil.work_queue)
    evil.add_work(dq, read=256 << 10)  # slow requests: the flooder easily keeps ahead
    ring = dq.ring
    size = 64
    avail = evil.ram.view(ring.avail_addr, 4 + 2 * size).cast("H")
    used = evil.ram.view(ring.used_addr, 4).cast("H")
    head = avail[2]
    for i in range(size):
        avail[2 + i] = head
    stop_flood = threading.Event()

    def flood() -> None:
        n = 0
        while not stop_flood.is_set():
            avail[1] = (used[1] + size) & 0xFFFF
            n += 1
            if n % 4096 == 0:  # in case it ever ran dry
                os.eventfd_write(dq.kick_fd, 1)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        deadline = time.monotonic() + 5
        while used[1] < 2 * size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert used[1] >= 2 * size, "the flood never got going"
        backend.assert_isolated(cpu=False)  # it is busy on purpose: fairness, not idleness
    finally:
        stop_flood.set()
        flooder.join(5)


# ------------------------------------------------------------------ shrinking memory


def test_memory_the_frontend_could_shrink_is_sealed_first(backend: Backend) -> None:
    """Memory the front-end can shrink under the mapping would turn the next ring
    access into SIGBUS for every port: a memfd that allows sealing gets
    F_SEAL_SHRINK from the backend before it is mapped."""
    evil = Evil(backend, sealed=False)
    evil.share_memory()
    dq = evil.queue(evil.work_queue)
    with pytest.raises(PermissionError):
        os.ftruncate(evil.ram.fd, 0)
    evil.add_work(dq)
    dq.kick()
    assert dq.wait_call(), backend.text()  # its own ring still works, too
    backend.assert_isolated(cpu=False)


# ------------------------------------------------------------------ per-peer caps


def test_fds_of_a_never_finished_message_are_capped(backend: Backend) -> None:
    """A message that never ends, with 16 fds on every byte, must not fill the
    process's fd table."""
    before = len(open_fds(backend.pid))
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(backend.evil))
        sock.sendmsg([m.HEADER.pack(FR.SET_MEM_TABLE, 1, 200)], rights([efd] * 16))
        sent = 0
        with contextlib.suppress(OSError):  # the back-end hangs up on us: good
            for _ in range(64):
                sock.sendmsg([b"\0"], rights([efd] * 16))
                sent += 1
        held = len(open_fds(backend.pid)) - before
        assert held < 40, f"{held} fds held for one connection ({sent} chunks sent)"
        backend.assert_isolated(cpu=False)
        assert len(open_fds(backend.pid)) - before < 40
    finally:
        sock.close()
        os.close(efd)


def test_accept_out_of_fds_does_not_spin(backend: Backend) -> None:
    """With the fd table full, accept() fails: the listener must rest, not spin and
    flood the log; once fds are back, the waiting front-end is served."""
    pid = backend.pid
    taken = set(open_fds(pid))
    lowest_free = next(n for n in range(len(taken) + 1) if n not in taken)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    result: list[Any] = []

    def connect() -> None:
        try:
            fe = VhostUserFrontend.connect(backend.evil, timeout=15)
            try:
                result.append(fe.get_features())
            finally:
                fe.close()
        except VhostUserError as exc:
            result.append(exc)

    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        waiting = threading.Thread(target=connect)
        waiting.start()
        time.sleep(0.2)  # let it reach the backlog
        share = cpu_share(pid, 1.5)
        assert share < CPU_LIMIT, f"accept() out of fds: {share:.0%} of a core"
        backend.victim_works()
        lines = [ln for ln in backend.text().splitlines() if "accept on " in ln]
        assert 1 <= len(lines) <= 3, "\n".join(lines[:10])
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    waiting.join(20)
    if not result or not isinstance(result[0], int):
        # A listener may drop what it cannot take; then a new front-end gets in.
        connect()
    assert isinstance(result[-1], int), result
    backend.assert_isolated(cpu=False)


# ------------------------------------------------------------------ exports of vvu-blk


def test_blk_export_options(tmp_path: Path) -> None:
    from vvu_runtime.serve.blk import parse_args

    args = parse_args(["--export", "/s/a.sock=/i/a.raw", "--export", "/s/b.sock=/i/b.raw"])
    assert args.export == [("/s/a.sock", "/i/a.raw"), ("/s/b.sock", "/i/b.raw")]
    for argv in (["--export", "noequals"], ["--export", "=x"],
                 ["--export", "a=x", "--export", "a=y"],
                 ["--export", "a=x", "--socket", "b"]):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2



# ------------------------------------------------------------------ the pieces, in-process


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


def finishes(fn: Callable[[], Any]) -> bool:
    """Run ``fn`` in a thread; whether it returned (a blocked call never does)."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(10)
    return not worker.is_alive()


def test_notifier_skips_a_full_blocking_eventfd() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    notifier = EventFdNotifier(os.dup(fd))
    try:
        os.eventfd_write(fd, FULL)
        os.set_blocking(fd, True)
        assert finishes(notifier.signal)
        assert os.eventfd_read(fd) == FULL
        notifier.signal()  # room again: this one is written
        assert os.eventfd_read(fd) == 1
    finally:
        notifier.close()
        os.close(fd)


def test_kick_drain_never_blocks_and_reports_a_storm() -> None:
    plain = os.eventfd(0, os.EFD_CLOEXEC)
    sem = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
    kick, storm = EventFdKick(os.dup(plain)), EventFdKick(os.dup(sem))
    try:
        os.set_blocking(plain, True)  # the peer's doing: the file is shared
        assert finishes(kick.drain)  # empty and blocking: a plain read would hang
        os.eventfd_write(plain, 5)
        assert kick.drain() is False
        assert finishes(kick.drain)
        os.eventfd_write(sem, FULL)
        assert storm.drain() is True  # a count of 1 per read, and more behind it
    finally:
        for k in (kick, storm):
            k.close()
        os.close(plain)
        os.close(sem)


def test_eventfd_identity_by_fdinfo_and_by_kcmp(monkeypatch: pytest.MonkeyPatch) -> None:
    a = os.eventfd(0, os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_CLOEXEC)
    a2 = os.dup(a)
    try:
        held = [(Role.KICK, 0, a)]
        check_eventfd(Role.KICK, 1, b, "kick 1", held)  # another eventfd: fine
        check_eventfd(Role.KICK, 0, a2, "kick 0", held)  # replacing itself: fine
        check_eventfd(Role.CALL, 3, b, "call 3", [(Role.CALL, 2, b)])  # calls may share
        with pytest.raises(RequestError, match="kick 1: this eventfd is already the kick"):
            check_eventfd(Role.KICK, 1, a2, "kick 1", held)
        with pytest.raises(RequestError, match="already the kick eventfd of queue 0"):
            check_eventfd(Role.ERR, 0, a2, "err 0", held)
        assert same_file(a, a2) is True and same_file(a, b) is False
        # A kernel whose fdinfo has no eventfd-id: kcmp tells them apart.
        monkeypatch.setattr(peer_fds, "eventfd_facts",
                            lambda fd: EventfdInfo(None, None) if fd in (a, a2, b) else None)
        with pytest.raises(RequestError, match="already the kick eventfd"):
            check_eventfd(Role.LOG, 0, a2, "SET_LOG_FD", held)
        check_eventfd(Role.LOG, 0, b, "SET_LOG_FD", held)
    finally:
        for fd in (a, b, a2):
            os.close(fd)


def test_memfds_are_sealed_against_shrinking(tmp_path: Path) -> None:
    sealable = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    sealed = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    unsealable = os.memfd_create("unsealable", os.MFD_CLOEXEC)
    plain = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for fd in (sealable, sealed, unsealable, plain):
            os.ftruncate(fd, 8192)
        seal_unshrinkable(sealed)
        assert protect_from_shrinking(sealed, "guest RAM") is None
        assert protect_from_shrinking(sealable, "guest RAM") is None
        with pytest.raises(PermissionError):
            os.ftruncate(sealable, 4096)  # sealed by us
        os.ftruncate(sealable, 16384)  # growing is still the front-end's business
        warning = protect_from_shrinking(unsealable, "guest RAM")
        assert warning is not None and "guest RAM: " in warning
        assert "MFD_ALLOW_SEALING" in warning and "seal=off" in warning
        # A RAM file cannot be sealed: the doc's residual risk, no warning per connection.
        assert protect_from_shrinking(plain, "guest RAM") is None
    finally:
        for fd in (sealable, sealed, unsealable, plain):
            os.close(fd)


def test_fds_of_one_partial_message_are_capped() -> None:
    ours, theirs = socket.socketpair()
    channel = UnixChannel(ours, max_payload=4096, name="peer")
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    before = len(os.listdir("/proc/self/fd"))
    try:
        theirs.sendmsg([m.HEADER.pack(FR.SET_MEM_TABLE, 1, 100)], rights([efd] * 10))
        assert channel.recv_frame_nowait() is None
        theirs.sendmsg([b"\0"], rights([efd] * 10))
        with pytest.raises(FramingError, match=f"more than {MAX_FDS} fds sent for one message"):
            channel.recv_frame_nowait()
        assert len(os.listdir("/proc/self/fd")) == before  # what came was closed
    finally:
        channel.close()
        theirs.close()
        os.close(efd)


def test_fds_are_not_queued_for_a_peer_that_does_not_read() -> None:
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    channel = UnixChannel(ours, name="peer")
    channel.use_loop(loop)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        big = bytes(60000)
        for _ in range(100):  # until the socket stops taking more
            channel.send_frame(FR.GET_CONFIG, 4, big[:4096])
        with pytest.raises(TransportError, match="not queueing 1 more fds"):
            channel.send_frame(FR.GET_INFLIGHT_FD, 4, bytes(16), [efd])
    finally:
        channel.close()
        theirs.close()
        os.close(efd)
        loop.close()


def test_backend_request_acks_are_awaited_through_the_loop(lt: LoopThread) -> None:
    """config_changed returns at once; the front-end's ack, sent only after the
    session answered another request, is read later from the loop."""
    with session_pair(EchoDevice(), lt) as (fe, session):
        fe.negotiate()
        fe.set_backend_req_fd()
        assert lt.call(session.config_changed) is True
        assert fe.get_queue_num() == 2  # the loop is free while the ack is due
        msg = fe.recv_backend_request(timeout=5)  # and answers it now
        assert msg.request is m.BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
        lt.sync()
        backend = session.backend
        assert backend is not None and not backend.closed
        assert lt.call(session.config_changed) is True  # and again
        fe.recv_backend_request(timeout=5)


def test_a_frontend_that_never_acks_loses_only_its_backend_channel(
        lt: LoopThread, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backend_mod, "BACKEND_REPLY_TIMEOUT", 0.2)
    with session_pair(EchoDevice(), lt) as (fe, session):
        fe.negotiate()
        channel = fe.set_backend_req_fd()
        channel.sock.setblocking(True)  # shared with the back-end: no help to it
        assert lt.call(session.config_changed) is True
        channel.sock.send(m.HEADER.pack(0, 0, 0)[:6])  # half a header, never the rest
        deadline = time.monotonic() + 10
        while not lt.call(lambda: session.backend is None or session.backend.closed):
            assert time.monotonic() < deadline, "the unanswered request never timed out"
            time.sleep(0.05)
        assert "did not answer CONFIG_CHANGE_MSG" in caplog.text
        assert fe.get_queue_num() == 2  # the session goes on
        assert lt.call(session.config_changed) is False  # no channel any more


def test_kick_storm_without_a_visible_semaphore_mode_backs_off(
        lt: LoopThread, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On a kernel whose fdinfo does not show the mode, a semaphore kick gets in;
    the session then listens to it at most once per KICK_BACKOFF."""
    monkeypatch.setattr(peer_fds, "eventfd_facts", lambda fd: EventfdInfo(None, None))

    class Counting(EchoDevice):
        calls = 0

        def process(self, vring: Any) -> None:
            Counting.calls += 1
            super().process(vring)

    dev = Counting()
    ram = GuestRam(1 << 20)
    with session_pair(dev, lt) as (fe, _):
        fe.negotiate()
        fe.set_mem_table([(ram.region, ram.fd)])
        dq = setup_queue(fe, ram, 0, 8)
        storm = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
        try:
            fe.set_vring_kick(0, storm)
            os.eventfd_write(storm, FULL)
            lt.sync()
            before = Counting.calls
            time.sleep(0.5)
            calls = lt.call(lambda: Counting.calls) - before
            # One per back-off at most (0.5 s / 2 ms = 250); a spinning loop makes ~10^5.
            assert calls < 2000, calls
            assert "the kick stays signalled after each read" in caplog.text
            src, dst = ram.alloc(4), ram.alloc(8)
            ram.view(src, 4)[:] = b"ring"
            dq.ring.add([(src, 4)], [(dst, 8)], token=dst)  # still served, without a kick
            assert dq.wait_call()
            assert dq.ring.get_used() == [(dst, 4)]
        finally:
            os.close(storm)
            dq.close()
    ram.close()


def test_log_throttle_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("test.throttle"), interval=3600)
    for i in range(5):
        throttle.error("accept failed %d", i)
    assert caplog.text.count("accept failed") == 1
    throttle._next = 0.0  # the interval is over
    throttle.warning("accept failed %d", 9)
    assert "accept failed 9 (4 more like this in the last 3600 s)" in caplog.text
