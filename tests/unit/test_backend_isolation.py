"""Tenant isolation in the backends: one hostile front-end against a real vvu-switch
(ports evil, a, b) and a real vvu-blk (exports evil, good).

Each attack goes to the evil port; then the other ports must still work (a frame
a -> b forwarded, a write and read-back on the good disk), the process must be
alive, and where the attack could make it spin, its CPU time over a short window
(utime + stime from /proc/PID/stat) must stay under half a core.
"""

from __future__ import annotations

import contextlib
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
from tests.support.net_frames import BROADCAST, DriverPort, ether, mac, net_hdr
from vvu_runtime.fds import rights
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import VhostUserError
from vvu_runtime.vhost_user.frontend import (
    DriverQueue,
    GuestRam,
    VhostUserFrontend,
    setup_queue,
)
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.peer_fds import eventfd_facts
from vvu_runtime.virtio.blk import RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature

ROOT = Path(__file__).resolve().parents[2]
HZ = os.sysconf("SC_CLK_TCK")
#: Most of a core the process may use while it is under attack.
CPU_LIMIT = 0.5
EVIL_MAC = mac(9)
FULL = (1 << 64) - 2  # the largest count an eventfd holds


# ------------------------------------------------------------------ the process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def cpu_share(pid: int, window: float = 1.5) -> float:
    """Share of one core ``pid`` used over ``window`` seconds."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


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
            share = cpu_share(self.pid)
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


def test_unsealed_memfd_is_refused_and_truncating_it_is_harmless(backend: Backend) -> None:
    """Memory the front-end can shrink under the mapping would turn the next ring
    access into SIGBUS for every port: an unsealed memfd is refused."""
    evil = Evil(backend, sealed=False)
    assert refused(evil.share_memory)
    assert "not sealed against shrinking (F_SEAL_SHRINK)" in backend.text()
    with contextlib.suppress(VhostUserError):
        dq = evil.queue(evil.work_queue)
        evil.add_work(dq)
        os.ftruncate(evil.ram.fd, 0)
        dq.kick()
    os.ftruncate(evil.ram.fd, 0)
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
        share = cpu_share(pid)
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

