"""vvu-blk's device behind the real back-end session, driven by the in-process
front-end over a socketpair: the whole vhost-user-blk path without QEMU."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blk_driver import BlkDriver
from tests.support.vhost_user_harness import LoopThread, session_pair
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio.blk import BlkConfig, BlkRequestHeader, BlkSegment, RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.queue import RingAddresses

RAM = 4 << 20
SECTORS = 2048  # 1 MiB image
QSIZE = 64


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(SECTORS * 512))
    return p


def start(fe: VhostUserFrontend, ram: GuestRam, packed: bool = False) -> tuple[int, int]:
    # Split rings unless asked: QEMU (packed=off by default) and libblkio use them.
    mask = (1 << 64) - 1 if packed else (1 << 64) - 1 & ~int(VirtioFeature.RING_PACKED)
    offered, pf = fe.negotiate(features=mask)
    fe.set_mem_table([(ram.region, ram.fd)])
    return offered, pf


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_read_write_flush_through_the_session(lt: LoopThread, image_path: Path,
                                              ring: str) -> None:
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image, serial="e2e-disk")
        ram = GuestRam(RAM)
        with session_pair(dev, lt) as (fe, _session):
            _, pf = start(fe, ram, packed=ring == "packed")
            assert pf & PF.CONFIG.mask and pf & PF.INFLIGHT_SHMFD.mask
            cfg = BlkConfig.unpack(fe.get_config(0, 60))
            assert cfg.capacity == SECTORS and cfg.num_queues == 1
            drv = BlkDriver(setup_queue(fe, ram, 0, QSIZE), ram)

            pattern = os.urandom(8192)
            assert drv.run(RequestType.OUT, 100, out=pattern) == (Status.OK, b"")
            assert drv.run(RequestType.FLUSH) == (Status.OK, b"")
            assert image_path.read_bytes()[100 * 512:100 * 512 + 8192] == pattern
            assert drv.run(RequestType.IN, 100, into=8192) == (Status.OK, pattern)
            st, ident = drv.run(RequestType.GET_ID, into=20)
            assert (st, ident) == (Status.OK, b"e2e-disk".ljust(20, b"\0"))
            assert drv.run(RequestType.IN, SECTORS, into=512)[0] == Status.IOERR
            assert drv.run(RequestType.GET_LIFETIME, into=8)[0] == Status.UNSUPP
            seg = BlkSegment(100, 8, 1).pack()
            assert drv.run(RequestType.WRITE_ZEROES, out=seg) == (Status.OK, b"")
            assert drv.run(RequestType.IN, 100, into=4096) == (Status.OK, bytes(4096))

            # A batch: many requests, one kick, all completed.
            statuses = [drv.submit(RequestType.OUT, 8 * i, out=bytes([i]) * 4096)[1]
                        for i in range(20)]
            drv.complete(20)
            assert all(drv.status(s) == Status.OK for s in statuses)
            data = image_path.read_bytes()
            assert all(data[4096 * i:4096 * (i + 1)] == bytes([i]) * 4096 for i in range(20))
            drv.dq.close()
        ram.close()


def test_multiqueue(lt: LoopThread, image_path: Path) -> None:
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image, queues=4)
        ram = GuestRam(RAM)
        with session_pair(dev, lt) as (fe, _session):
            start(fe, ram)
            assert fe.get_queue_num() == 4
            assert BlkConfig.unpack(fe.get_config(0, 60)).num_queues == 4
            drivers = [BlkDriver(setup_queue(fe, ram, q, QSIZE), ram) for q in range(4)]
            for q, drv in enumerate(drivers):
                assert drv.run(RequestType.OUT, 8 * q, out=bytes([q + 1]) * 4096)[0] == Status.OK
            for q, drv in enumerate(drivers):
                assert drv.run(RequestType.IN, 8 * q, into=4096) == (Status.OK,
                                                                   bytes([q + 1]) * 4096)
                drv.dq.close()
        ram.close()


def test_bad_chain_fails_the_ring(lt: LoopThread, image_path: Path) -> None:
    with RawImage(str(image_path)) as image:
        dev = BlkDevice(image)
        ram = GuestRam(RAM)
        with session_pair(dev, lt) as (fe, session):
            start(fe, ram)
            dq = setup_queue(fe, ram, 0, QSIZE)
            hdr = ram.alloc(16)
            ram.view(hdr, 16)[:] = BlkRequestHeader(RequestType.IN, 0, 0).pack()
            dq.ring.add([(hdr, 16)], [], token=0)  # no status byte at all
            dq.kick()
            for _ in range(20):
                lt.sync()
                if dq.err_signalled():
                    break
            assert dq.err_signalled()
            assert session.needs_reset
            dq.close()
        ram.close()


class CrashingBlkDevice(BlkDevice):
    """Serves requests but "dies" before completing the ones after the first ``keep``:
    the I/O happened, the used ring never heard of it (a kill -9 between the two)."""

    def __init__(self, image: RawImage, keep: int) -> None:
        super().__init__(image)
        self.keep = keep

    def process(self, vring: Vring) -> None:
        while (chain := vring.pop()) is not None:
            written = self.serve(chain)
            if self.keep > 0:
                self.keep -= 1
                vring.push(chain, written)
        vring.notify()


@pytest.mark.parametrize("base", ["used", "used+inflight"])
def test_reconnect_mid_io_loses_nothing(lt: LoopThread, image_path: Path, base: str) -> None:
    """Requests popped but never completed by a dead back-end are served again by the
    next one, from the inflight area; every write ends up acknowledged and on disk."""
    ram = GuestRam(RAM)
    with RawImage(str(image_path)) as image:
        with session_pair(CrashingBlkDevice(image, keep=3), lt) as (fe, _session):
            start(fe, ram)
            info, inflight_fd = fe.get_inflight_fd(1, QSIZE)
            fe.set_inflight_fd(info, inflight_fd)
            dq = setup_queue(fe, ram, 0, QSIZE)
            drv = BlkDriver(dq, ram)
            writes = {i: os.urandom(4096) for i in range(10)}
            status = {i: drv.submit(RequestType.OUT, 8 * i, out=d, token=i)[1]
                      for i, d in writes.items()}
            acked = {t for t, _ in drv.complete(3)}
            assert acked == {0, 1, 2}
            lt.sync()
            assert not dq.ring.has_used()
        # The front-end (QEMU) reconnects with the same inflight area and its ring.
        with session_pair(BlkDevice(image), lt) as (fe2, _session2):
            start(fe2, ram)
            fe2.set_inflight_fd(info, inflight_fd)
            used_idx = struct.unpack_from("<H", ram.view(dq.ring.used_addr + 2, 2))[0]
            fe2.set_vring_num(0, QSIZE)
            # QEMU could not GET_VRING_BASE from the dead back-end, so it restored
            # last_avail_idx from the used ring (virtio_queue_restore_last_avail_idx):
            # the back-end must skip the inflight entries itself.
            # ("used+inflight": what a front-end that knows the count would send.)
            fe2.set_vring_base(0, used_idx + (7 if base == "used+inflight" else 0))
            fe2.set_vring_addr(0, RingAddresses(ram.uva(dq.ring.desc_addr),
                                                ram.uva(dq.ring.avail_addr),
                                                ram.uva(dq.ring.used_addr)))
            fe2.set_vring_call(0, dq.call_fd)
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            fe2.set_vring_kick(0, kick)
            fe2.set_vring_enable(0, True)
            acked |= {t for t, _ in drv.complete(7)}
            os.close(kick)
    assert acked == set(writes)
    assert all(drv.status(status[i]) == Status.OK for i in writes)
    data = image_path.read_bytes()
    for i, d in writes.items():
        assert data[4096 * i:4096 * (i + 1)] == d
    os.close(inflight_fd)
    dq.close()
    ram.close()
