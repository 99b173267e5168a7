"""ScsiDevice (backends/scsi/device.py) against fake vrings: request queues (LUN
addressing, BAD_TARGET, OVERRUN, bad chains), the control queue (task management,
asynchronous notification) and the event queue (LUNs added and removed)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import scsi_target as t
from tests.support.scsi_target import FakeVring
from vvu_runtime.backends.scsi.device import MAX_PENDING_EVENTS, BadChain, ScsiDevice
from vvu_runtime.backends.scsi.lun import Lun, LunSpec
from vvu_runtime.backends.scsi.sense import Status
from vvu_runtime.serve.scsi import apply_luns
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.queue import DescriptorChain
from vvu_runtime.virtio.scsi import (
    AN_RESP,
    CMD_RESP,
    EVENTS_MISSED,
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

BLOCKS = 256


def make_image(tmp_path: Path, name: str, blocks: int = BLOCKS) -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(blocks * 512))
    return path


@pytest.fixture
def device(tmp_path: Path) -> Iterator[ScsiDevice]:
    luns = [Lun(LunSpec(0, str(make_image(tmp_path, "a.raw")))),
            Lun(LunSpec(3, str(make_image(tmp_path, "b.raw", 128)), read_only=True))]
    dev = ScsiDevice(luns, queues=4)
    dev.set_features(dev.features())
    yield dev
    dev.close()


def run(dev: ScsiDevice, *chains: DescriptorChain, index: int = 2) -> FakeVring:
    vring = FakeVring(list(chains), index=index)
    dev.process(vring)  # type: ignore[arg-type]
    return vring


def event_ring(dev: ScsiDevice, buffers: int) -> FakeVring:
    vring = FakeVring([DescriptorChain(head=i, writable=[memoryview(bytearray(16))])
                       for i in range(buffers)], index=1)
    dev.queue_started(vring)  # type: ignore[arg-type]
    return vring


def events_of(vring: FakeVring) -> list[Event]:
    return [Event.unpack(bytes(chain.writable[0])) for chain, _ in vring.pushed]


# --- features and queues -------------------------------------------------------------

def test_features_queues_and_constructor_checks(device: ScsiDevice, tmp_path: Path) -> None:
    feats = device.features()
    assert feats & Feature.HOTPLUG.mask and feats & Feature.CHANGE.mask
    assert not feats & (Feature.INOUT.mask | Feature.T10_PI.mask)
    assert feats & VirtioFeature.VERSION_1 and feats & VirtioFeature.EVENT_IDX
    assert device.num_queues() == 2 + 4  # control, event, four request queues
    with pytest.raises(ValueError, match="at least one request queue"):
        ScsiDevice(queues=0)
    lun = Lun(LunSpec(1, str(make_image(tmp_path, "c.raw"))))
    try:
        with pytest.raises(ValueError, match="LUN 1 given twice"):
            ScsiDevice([lun, lun])
    finally:
        lun.close()


def test_lun_field_encoding() -> None:
    assert encode_lun(0, 5) == bytes((1, 0, 0, 5, 0, 0, 0, 0))  # as Linux reads events
    assert encode_lun(0, 300) == bytes((1, 0, 0x41, 44, 0, 0, 0, 0))
    assert decode_lun(encode_lun(3, 300)) == (3, 300)
    assert decode_lun(bytes((1, 0, 0x40, 7, 0, 0, 0, 0))) == (0, 7)  # as Linux sends them
    assert decode_lun(bytes((0, 0, 0x40, 0, 0, 0, 0, 0))) is None  # first byte not 1
    assert decode_lun(bytes((1, 0, 0x80, 0, 0, 0, 0, 0))) is None  # logical unit method
    assert decode_lun(b"\x01") is None
    with pytest.raises(ValueError):
        encode_lun(0, 0x4000)


# --- request queues ------------------------------------------------------------------

def test_commands_on_every_request_queue(device: ScsiDevice, tmp_path: Path) -> None:
    for index in (2, 3, 4, 5):
        payload = bytes([index]) * 512
        w = t.command_chain(0, t.write10(index, 1), out=payload)
        r = t.command_chain(0, t.read10(index, 1), into=512, head=1)
        vring = run(device, w, r, index=index)
        assert [written for _, written in vring.pushed] == [CMD_RESP.size, CMD_RESP.size + 512]
        assert t.response_of(w).status == Status.GOOD and t.data_in_of(r) == payload
        assert vring.notified >= 1 and not vring.failed


def test_unknown_luns_and_targets_are_bad_target(device: ScsiDevice) -> None:
    for chain in (t.command_chain(1, t.inquiry(36), into=36),
                  t.command_chain(0, t.inquiry(36), into=36, target=1),
                  t.command_chain(bytes(8), t.inquiry(36), into=36),
                  t.command_chain(bytes((1, 0, 0xC0, 0, 0, 0, 0, 0)), t.cdb(0))):
        run(device, chain)
        resp = t.response_of(chain)
        assert resp.response == Response.BAD_TARGET and resp.status == 0, chain.readable
    ok = t.command_chain(3, t.inquiry(36), into=36)
    run(device, ok)
    assert t.response_of(ok).response == Response.OK and t.data_in_of(ok)[0] == 0


def test_check_condition_carries_sense(device: ScsiDevice) -> None:
    chain = t.command_chain(0, t.read10(BLOCKS, 1), into=512)
    vring = run(device, chain)
    resp = t.response_of(chain)
    assert (resp.response, resp.status) == (Response.OK, Status.CHECK_CONDITION)
    assert resp.sense_len == 18 and t.sense_of(resp.sense) == (0x5, 0x21, 0)
    assert resp.resid == 512 and vring.pushed[0][1] == CMD_RESP.size


def test_overrun_runs_nothing(device: ScsiDevice, tmp_path: Path) -> None:
    chain = t.command_chain(0, t.write10(0, 2), out=b"\xff" * 512)
    run(device, chain)
    assert t.response_of(chain).response == Response.OVERRUN
    assert (tmp_path / "a.raw").read_bytes()[:512] == bytes(512)


def test_split_headers_and_odd_layouts_are_served(device: ScsiDevice) -> None:
    """The header split over descriptors, data sharing the response's descriptor."""
    req = t.command_chain(0, t.inquiry(36), into=36)
    raw = bytes(req.readable[0])
    chain = DescriptorChain(
        head=0, readable=[memoryview(bytearray(raw[:10])), memoryview(bytearray(raw[10:]))],
        writable=[memoryview(bytearray(CMD_RESP.size + 36))])
    vring = run(device, chain)
    resp = t.response_of(chain)
    assert resp.status == Status.GOOD and vring.pushed[0][1] == CMD_RESP.size + 36
    assert t.data_in_of(chain)[8:11] == b"VVU"


@pytest.mark.parametrize("readable,writable", [
    ([50], [200]),  # header one byte short
    ([51], [107]),  # response area one byte short
    ([], [200]),
    ([60], []),
])
def test_bad_chains_fail_the_ring(device: ScsiDevice, readable: list[int],
                                  writable: list[int]) -> None:
    good = t.command_chain(0, t.cdb(0))
    bad = DescriptorChain(head=1, readable=[memoryview(bytearray(n)) for n in readable],
                          writable=[memoryview(bytearray(n)) for n in writable])
    vring = run(device, good, bad)
    assert vring.failed and isinstance(vring.failures[0], BadChain)
    assert [c.head for c, _ in vring.pushed] == [0]  # what completed before is announced


def test_disabled_ring_is_left_alone(device: ScsiDevice) -> None:
    vring = FakeVring([t.command_chain(0, t.cdb(0))])
    vring.enabled = False
    device.process(vring)  # type: ignore[arg-type]
    assert vring.pushed == [] and len(vring.available) == 1


# --- control queue -------------------------------------------------------------------

def tmf_chain(subtype: int, lun: int | bytes, head: int = 0) -> DescriptorChain:
    field = lun if isinstance(lun, bytes) else encode_lun(0, lun)
    return DescriptorChain(head=head, readable=[memoryview(bytearray(
        TmfReq(subtype, field, 99).pack()))], writable=[memoryview(bytearray(1))])


def test_task_management(device: ScsiDevice) -> None:
    expect = {
        TmfSubtype.ABORT_TASK: Response.OK,
        TmfSubtype.ABORT_TASK_SET: Response.OK,
        TmfSubtype.CLEAR_TASK_SET: Response.OK,
        TmfSubtype.LOGICAL_UNIT_RESET: Response.OK,
        TmfSubtype.I_T_NEXUS_RESET: Response.OK,
        TmfSubtype.QUERY_TASK: Response.OK,
        TmfSubtype.QUERY_TASK_SET: Response.OK,
        TmfSubtype.CLEAR_ACA: Response.FUNCTION_REJECTED,
    }
    for subtype, response in expect.items():
        chain = tmf_chain(subtype, 0)
        vring = run(device, chain, index=0)
        assert vring.pushed == [(chain, 1)] and chain.writable[0][0] == response, subtype
    unknown = tmf_chain(42, 0)
    run(device, unknown, index=0)
    assert unknown.writable[0][0] == Response.FUNCTION_REJECTED
    missing = tmf_chain(TmfSubtype.LOGICAL_UNIT_RESET, 1)
    run(device, missing, index=0)
    assert missing.writable[0][0] == Response.BAD_TARGET
    assert device.tmf_count[TmfSubtype.LOGICAL_UNIT_RESET] == 2
    assert device.tmf_count[TmfSubtype.ABORT_TASK] == 1


def test_commands_after_a_lun_reset_still_work(device: ScsiDevice) -> None:
    run(device, tmf_chain(TmfSubtype.LOGICAL_UNIT_RESET, 0), index=0)
    chain = t.command_chain(0, t.cdb(0))
    run(device, chain)
    assert t.response_of(chain).status == Status.GOOD


def test_async_notification_queries(device: ScsiDevice) -> None:
    for lun, response in ((0, Response.OK), (9, Response.BAD_TARGET)):
        req = AnReq(ControlType.AN_QUERY, encode_lun(0, lun), 0xFF).pack()
        chain = DescriptorChain(head=0, readable=[memoryview(bytearray(req))],
                                writable=[memoryview(bytearray(AN_RESP.size))])
        vring = run(device, chain, index=0)
        assert vring.pushed[0][1] == AN_RESP.size
        assert AN_RESP.unpack(bytes(chain.writable[0])) == (0, response)


@pytest.mark.parametrize("payload,wlen", [
    (struct.pack("<I", 7) + bytes(20), 1),  # unknown control type
    (b"\0\0", 1),  # no type at all
    (TmfReq(0, encode_lun(0, 0), 0).pack()[:20], 1),  # truncated TMF
    (TmfReq(0, encode_lun(0, 0), 0).pack(), 0),  # no room for the response
    (AnReq(2, encode_lun(0, 0), 0).pack(), 4),
])
def test_bad_control_requests_fail_the_ring(device: ScsiDevice, payload: bytes,
                                            wlen: int) -> None:
    chain = DescriptorChain(head=0, readable=[memoryview(bytearray(payload))],
                            writable=[memoryview(bytearray(wlen))] if wlen else [])
    vring = run(device, chain, index=0)
    assert vring.failed and vring.pushed == []


# --- events --------------------------------------------------------------------------

def test_luns_added_and_removed_are_announced(device: ScsiDevice, tmp_path: Path) -> None:
    events = event_ring(device, 4)
    device.add_lun(Lun(LunSpec(7, str(make_image(tmp_path, "n.raw")))))
    device.remove_lun(3).close()
    assert events_of(events) == [
        Event(EventType.TRANSPORT_RESET, encode_lun(0, 7), ResetReason.RESCAN),
        Event(EventType.TRANSPORT_RESET, encode_lun(0, 3), ResetReason.REMOVED),
    ]
    assert [w for _, w in events.pushed] == [16, 16] and events.notified == 2
    assert sorted(device.luns) == [0, 7]
    with pytest.raises(ValueError, match="no LUN 3"):
        device.remove_lun(3)
    chain = t.command_chain(3, t.cdb(0))
    run(device, chain)
    assert t.response_of(chain).response == Response.BAD_TARGET


def test_events_wait_for_buffers_and_report_missed_ones(device: ScsiDevice,
                                                        tmp_path: Path) -> None:
    events = event_ring(device, 0)
    for i in range(MAX_PENDING_EVENTS + 2):
        device._event(10 + i, ResetReason.RESCAN)
    assert device.pending_events == MAX_PENDING_EVENTS and events.pushed == []
    events.available = [DescriptorChain(head=i, writable=[memoryview(bytearray(16))])
                        for i in range(2)]
    device.process(events)  # type: ignore[arg-type]  # the driver posted buffers, kicked
    got = events_of(events)
    assert got[0].event == EventType.TRANSPORT_RESET | EVENTS_MISSED
    assert got[0].lun == encode_lun(0, 12)  # the two oldest were dropped
    assert got[1].event == EventType.TRANSPORT_RESET
    assert device.pending_events == MAX_PENDING_EVENTS - 2


def test_no_events_without_hotplug(device: ScsiDevice, tmp_path: Path) -> None:
    device.set_features(device.features() & ~Feature.HOTPLUG.mask)
    events = event_ring(device, 2)
    device.add_lun(Lun(LunSpec(4, str(make_image(tmp_path, "h.raw")))))
    assert events.pushed == [] and device.pending_events == 0
    assert 4 in device.luns


def test_short_event_buffer_fails_the_event_ring(device: ScsiDevice) -> None:
    events = FakeVring([DescriptorChain(head=0, writable=[memoryview(bytearray(8))])], index=1)
    device.queue_started(events)  # type: ignore[arg-type]
    device.process(events)  # type: ignore[arg-type]  # nothing pending: the buffer waits
    assert events.available and not events.failures
    device._event(1, ResetReason.RESCAN)  # from a LUN change: fails the ring, raises nothing
    assert events.pushed == [] and len(events.failures) == 1
    assert isinstance(events.failures[0], BadChain)


def test_reset_forgets_pending_events(device: ScsiDevice) -> None:
    device._event(1, ResetReason.RESCAN)
    assert device.pending_events == 1
    device.reset()
    assert device.pending_events == 0


def test_apply_luns_diffs_the_set(device: ScsiDevice, tmp_path: Path) -> None:
    events = event_ring(device, 8)
    a = str(tmp_path / "a.raw")
    new = str(make_image(tmp_path, "new.raw"))
    specs = [LunSpec(0, a, read_only=True), LunSpec(1, new),
             LunSpec(2, str(tmp_path / "missing.raw"))]
    removed, added = apply_luns(device, specs)
    # LUN 0 changed mode: removed and re-added; 3 went away; 2 cannot be opened.
    assert removed == [0, 3] and added == [0, 1]
    assert device.luns[0].read_only and sorted(device.luns) == [0, 1]
    reasons = [(e.lun[3], e.reason) for e in events_of(events)]
    assert reasons == [(0, ResetReason.REMOVED), (3, ResetReason.REMOVED),
                       (0, ResetReason.RESCAN), (1, ResetReason.RESCAN)]
    assert apply_luns(device, specs[:2]) == ([], [])
