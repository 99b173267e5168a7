"""vvu-scsi's device behind the real back-end session, driven by the in-process
front-end over a socketpair: the whole vhost-user-scsi path without QEMU
(control, event and two request queues; split and packed rings)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import scsi_target as t
from tests.support.scsi_driver import ScsiDriver
from tests.support.vhost_user_harness import LoopThread, session_pair
from vvu_runtime.backends.scsi.device import ScsiDevice
from vvu_runtime.backends.scsi.lun import Lun, LunSpec
from vvu_runtime.backends.scsi.sense import Status
from vvu_runtime.vhost_user.frontend import GuestRam, setup_queue
from vvu_runtime.vhost_user.messages import ProtocolFeature as PF
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.scsi import (
    EventType,
    Feature,
    ResetReason,
    Response,
    TmfSubtype,
    encode_lun,
)

RAM = 8 << 20
BLOCKS = 2048
QSIZE = 64


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


def image(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(BLOCKS * 512))
    return p


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_scsi_through_the_session(lt: LoopThread, tmp_path: Path, ring: str) -> None:
    dev = ScsiDevice([Lun(LunSpec(0, str(image(tmp_path, "a.raw")), serial="S0"))],
                     queues=2)
    ram = GuestRam(RAM)
    try:
        with session_pair(dev, lt) as (fe, _session):
            mask = (1 << 64) - 1
            if ring == "split":
                mask &= ~int(VirtioFeature.RING_PACKED)
            offered, pf = fe.negotiate(features=mask)
            assert offered & Feature.HOTPLUG.mask and pf & PF.MQ.mask
            assert not pf & PF.CONFIG.mask  # QEMU owns the virtio-scsi config space
            fe.set_mem_table([(ram.region, ram.fd)])
            assert fe.get_queue_num() == 4
            queues = [setup_queue(fe, ram, q, QSIZE) for q in range(4)]
            drv = ScsiDriver(ram, queues[0], queues[1], queues[2:])

            resp, data, _ = drv.command(0, t.inquiry(36), into=36)
            assert resp.response == Response.OK and data[8:16] == b"VVU     "
            resp, data, _ = drv.command(0, t.read_capacity16(), into=32)
            assert int.from_bytes(data[:8], "big") == BLOCKS - 1
            payload = os.urandom(8192)
            for q in (0, 1):  # both request queues serve the same LUN
                resp, _, written = drv.command(0, t.write10(64 * q, 16), out=payload, queue=q)
                assert resp.status == Status.GOOD and written == 108
                resp, back, written = drv.command(0, t.read16(64 * q, 16), into=8192, queue=1 - q)
                assert back == payload and written == 108 + 8192 and resp.resid == 0
            resp, _, _ = drv.command(0, t.sync_cache16())
            assert resp.status == Status.GOOD
            resp, _, _ = drv.command(0, t.read10(BLOCKS, 1), into=512)
            assert resp.status == Status.CHECK_CONDITION
            assert t.sense_of(resp.sense) == (0x5, 0x21, 0)
            resp, _, written = drv.command(4, t.cdb(0))
            assert resp.response == Response.BAD_TARGET and written == 108
            resp, data, _ = drv.command(0, t.report_luns(), into=64)
            assert data[:4] == (8).to_bytes(4, "big")

            assert drv.tmf(TmfSubtype.ABORT_TASK, 0, tag=5) == Response.OK
            assert drv.tmf(TmfSubtype.LOGICAL_UNIT_RESET, 0) == Response.OK
            assert drv.tmf(TmfSubtype.LOGICAL_UNIT_RESET, 9) == Response.BAD_TARGET
            assert drv.an_query(0) == (0, Response.OK)

            # A LUN added at runtime: announced in a buffer the driver posted.
            drv.post_event_buffers(2)
            extra = Lun(LunSpec(6, str(image(tmp_path, "b.raw"))))
            lt.call(dev.add_lun, extra)
            (event,) = drv.events(1)
            assert (event.event, event.lun, event.reason) == (
                EventType.TRANSPORT_RESET, encode_lun(0, 6), ResetReason.RESCAN)
            resp, data, _ = drv.command(6, t.read_capacity10(), into=8)
            assert resp.status == Status.GOOD and data[4:] == (512).to_bytes(4, "big")
            lt.call(lambda: dev.remove_lun(6).close())
            (event,) = drv.events(1)
            assert event.reason == ResetReason.REMOVED
            resp, _, _ = drv.command(6, t.cdb(0))
            assert resp.response == Response.BAD_TARGET
    finally:
        dev.close()
        ram.close()
