"""The vhost-user codec: every message round-trips, every rejection is precise,
and decoding arbitrary bytes only ever raises ProtocolError."""

from __future__ import annotations

import contextlib
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import (
    FdCountError,
    FlagsError,
    FramingError,
    PayloadSizeError,
    PayloadValueError,
    ProtocolError,
    UnknownRequestError,
)
from vvu_runtime.vhost_user.messages import BackendRequest as BR
from vvu_runtime.vhost_user.messages import Direction
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.vhost_user.transport import UnixChannel
from vvu_runtime.virtio.memory import MemoryRegion

REGION = MemoryRegion(0x1000, 0x20000, 0x7F00_0000_0000, 0x3000)

#: One example payload per payload class (and the fd count a request needs).
EXAMPLES: dict[type, object] = {
    m.Empty: m.EMPTY,
    m.U64: m.U64(0x1234_5678_9ABC_DEF0),
    m.VringState: m.VringState(3, 256),
    m.VringFile: m.VringFile(5, False),
    m.VringAddr: m.VringAddr(1, 1, 0x1000, 0x2000, 0x3000, 0x4000),
    m.MemoryTable: m.MemoryTable((REGION, MemoryRegion(0x100000, 0x1000, 0x1000, 0))),
    m.SingleRegion: m.SingleRegion(REGION),
    m.LogArea: m.LogArea(0x1000, 0x2000),
    m.Iotlb: m.Iotlb(0x1000, 0x2000, 0x3000, 3, m.IotlbType.UPDATE),
    m.ConfigSpace: m.ConfigSpace(4, 0, b"\x01\x02\x03\x04"),
    m.VringArea: m.VringArea(0x101, 4096, 0),
    m.Inflight: m.Inflight(4096, 0, 2, 128),
    m.SharedObject: m.SharedObject(bytes(range(16))),
    m.DeviceStateTransfer: m.DeviceStateTransfer(0, 0),
    m.ShmemMap: m.ShmemMap(1, 0x1000, 0x2000, 0x3000, 1),
    m.ShmemConfig: m.ShmemConfig(2, (4096, 8192, 0, 0, 0, 0, 0, 0)),
    m.Opaque: m.Opaque(b"opaque bytes"),
}


def fds_for(spec: m.MessageSpec, payload: object) -> int:
    if isinstance(payload, m.MemoryTable):
        return len(payload.regions)
    if isinstance(payload, m.VringFile):
        return 0 if payload.nofd else 1
    return spec.fds[0]


ALL = [(d, spec) for d in Direction for spec in d.table.values()]


@pytest.mark.parametrize(("direction", "spec"), ALL,
                         ids=[f"{d.name}-{s.request.name}" for d, s in ALL])
def test_every_request_round_trips(direction: Direction, spec: m.MessageSpec) -> None:
    payload = EXAMPLES[spec.payload]
    code, flags, data = m.encode(spec.request, payload)  # type: ignore[arg-type]
    assert flags == 1
    got_code, got = m.decode(direction, code, flags, data, fds_for(spec, payload))
    assert got_code is spec.request
    assert got == payload
    # With NEED_REPLY too.
    code, flags, data = m.encode(spec.request, payload, need_reply=True)  # type: ignore[arg-type]
    assert flags == 1 | 8
    assert m.decode(direction, code, flags, data, fds_for(spec, payload))[1] == payload


@pytest.mark.parametrize(("direction", "spec"), ALL,
                         ids=[f"{d.name}-{s.request.name}" for d, s in ALL])
def test_every_reply_round_trips(direction: Direction, spec: m.MessageSpec) -> None:
    if spec.reply_payload is not None and spec.reply is m.Reply.ALWAYS:
        payload = EXAMPLES[spec.reply_payload]
        code, flags, data = m.encode(spec.request, payload, reply=True)  # type: ignore[arg-type]
        _, got = m.decode(direction, code, flags, data, spec.reply_fds[0], reply=True)
        assert got == payload
    # Every request may be answered with a REPLY_ACK u64 (unless its own reply is 8 bytes).
    code, flags, data = m.encode(spec.request, m.U64(1), reply=True)
    _, got = m.decode(direction, code, flags, data, 0, reply=True)
    assert isinstance(got, (m.U64, m.VringState, m.Opaque))


def test_header_is_12_bytes_native_endian() -> None:
    raw = m.encode_bytes(FR.SET_VRING_NUM, m.VringState(1, 256))
    assert raw[:12] == struct.pack("=III", 8, 1, 8)
    assert m.parse_header(raw[:12]) == (8, 1, 8)
    with pytest.raises(FramingError):
        m.parse_header(raw[:11])


def test_request_codes_cover_the_spec() -> None:
    assert [int(r) for r in FR] == list(range(1, 45))
    assert [int(r) for r in BR] == list(range(1, 12))
    assert set(m.FRONTEND_TABLE) == set(range(1, 45))
    assert set(m.BACKEND_TABLE) == set(range(1, 12))


def test_payload_sizes_match_the_c_layouts() -> None:
    assert m.VringAddr.STRUCT.size == 40
    assert m.Iotlb.STRUCT.size == 32
    assert m.Inflight.STRUCT.size == 24
    assert m.ShmemMap.STRUCT.size == 40
    assert m.ShmemConfig.STRUCT.size == 72
    assert len(m.SingleRegion(REGION).pack()) == 40
    assert len(m.MemoryTable((REGION,) * 8).pack()) == 264
    assert m.MAX_PAYLOAD >= 12 + 256


def test_max_payload_is_computed_from_the_table() -> None:
    assert m.max_payload(m.FRONTEND_TABLE) == m.MAX_PAYLOAD
    limits = m.request_limits(Direction.FRONTEND, False)
    assert limits[FR.GET_FEATURES] == 0
    assert limits[FR.SET_MEM_TABLE] == 264
    assert limits[FR.GET_CONFIG] == 268


def test_packed_20_byte_inflight_is_accepted() -> None:
    data = struct.pack("=QQHH", 4096, 0, 1, 64)
    assert m.decode(Direction.FRONTEND, FR.GET_INFLIGHT_FD, 1, data)[1] == m.Inflight(
        4096, 0, 1, 64)


@pytest.mark.parametrize(("request_", "payload", "nfds", "error", "text"), [
    (FR.SET_VRING_NUM, b"\0" * 12, 0, PayloadSizeError, "SET_VRING_NUM: payload is 12 bytes, "
                                                        "expected 8"),
    (FR.GET_FEATURES, b"\0" * 8, 0, PayloadSizeError, "GET_FEATURES"),
    (FR.SET_VRING_ADDR, b"\0" * 39, 0, PayloadSizeError, "expected 40"),
    (FR.SET_OWNER, b"", 1, FdCountError, "SET_OWNER: 1 file descriptors, expected 0"),
    (FR.SET_BACKEND_REQ_FD, b"", 0, FdCountError, "expected 1"),
    (FR.SET_VRING_KICK, struct.pack("=Q", 0), 0, FdCountError, "NOFD"),
    (FR.SET_VRING_CALL, struct.pack("=Q", 0x100), 1, PayloadValueError, "NOFD"),
    (FR.SET_VRING_ERR, struct.pack("=Q", 0x200), 0, PayloadValueError, "reserved"),
    (FR.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(32 * 9), 0, PayloadSizeError,
     "SET_MEM_TABLE"),
    (FR.SET_MEM_TABLE, struct.pack("=II", 2, 0) + bytes(32), 1, PayloadSizeError, "2 regions"),
    (FR.SET_MEM_TABLE, struct.pack("=II", 1, 0) + bytes(32), 0, FdCountError,
     "1 regions but 0"),
    (FR.GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(4), 0, PayloadSizeError,
     "says 8 bytes but 4"),
    (FR.GET_CONFIG, struct.pack("=III", 250, 10, 0) + bytes(10), 0, PayloadValueError,
     "past 256"),
    (FR.SET_CONFIG, struct.pack("=III", 0, 300, 0) + bytes(256), 0, PayloadValueError,
     "more than 256"),
    (999, b"", 0, UnknownRequestError, "unknown front-end request code 999"),
])
def test_rejections_name_the_request_and_the_problem(
        request_: int, payload: bytes, nfds: int, error: type[ProtocolError], text: str) -> None:
    with pytest.raises(error, match=text) as info:
        m.decode(Direction.FRONTEND, request_, 1, payload, nfds)
    assert info.value.request == request_


@pytest.mark.parametrize(("flags", "error"), [
    (0x0, FramingError),         # version 0
    (0x2, FramingError),         # version 2
    (0x5, FlagsError),           # REPLY on a request
    (0x11, FlagsError),          # reserved bit 4
    (0x1 | 1 << 31, FlagsError),
])
def test_bad_flags(flags: int, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        m.decode(Direction.FRONTEND, FR.SET_OWNER, flags, b"")


def test_reply_without_reply_flag_is_refused() -> None:
    with pytest.raises(FlagsError, match="without the REPLY flag"):
        m.decode(Direction.FRONTEND, FR.GET_FEATURES, 1, bytes(8), reply=True)


def test_empty_get_config_reply_reports_failure() -> None:
    _, payload = m.decode(Direction.FRONTEND, FR.GET_CONFIG, 5, b"", reply=True)
    assert payload == m.EMPTY


def test_feature_names() -> None:
    names = {0: "MQ", 3: "REPLY_ACK"}
    assert m.features_by_name(0b1001 | 1 << 5, names) == ["MQ", "REPLY_ACK", "bit 5"]


# ---------------------------------------------------------------- fuzz

@settings(max_examples=3000, deadline=None)
@given(request=st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1)),
       flags=st.one_of(st.sampled_from([1, 5, 9, 13]), st.integers(0, 2**32 - 1)),
       payload=st.binary(max_size=300), nfds=st.integers(0, 10), reply=st.booleans(),
       direction=st.sampled_from(list(Direction)))
def test_decode_only_raises_protocol_errors(request: int, flags: int, payload: bytes,
                                            nfds: int, reply: bool,
                                            direction: Direction) -> None:
    with contextlib.suppress(ProtocolError):
        m.decode(direction, request, flags, payload, nfds, reply=reply)


@settings(max_examples=1500, deadline=None)
@given(spec=st.sampled_from([s for s in m.FRONTEND_TABLE.values()]),
       payload=st.binary(min_size=0, max_size=300), nfds=st.integers(0, 9))
def test_decode_of_right_codes_with_random_payloads(spec: m.MessageSpec, payload: bytes,
                                                     nfds: int) -> None:
    for data in (payload, payload[:spec.max_size].ljust(min(spec.sizes), b"\0")):
        with contextlib.suppress(ProtocolError):
            m.decode(Direction.FRONTEND, spec.request, 1, data, nfds)


# ---------------------------------------------------------------- the channel

def test_channel_passes_fds_and_closes_them_on_oversized_messages() -> None:
    a, b = socket.socketpair()
    rx = UnixChannel(a, limit_for=m.request_limits(Direction.FRONTEND, False))
    tx = UnixChannel(b)
    r, w = os.pipe()
    try:
        tx.send_frame(FR.SET_VRING_KICK, 1, m.VringFile(0, False).pack(), [r])
        frame = rx.recv_frame(2)
        assert frame.request == FR.SET_VRING_KICK and len(frame.fds) == 1
        frame.close_fds()
        before = len(os.listdir("/proc/self/fd"))
        tx.send_frame(FR.GET_FEATURES, 1, bytes(64), [r])  # GET_FEATURES takes 0 bytes
        with pytest.raises(FramingError, match="64-byte payload"):
            rx.recv_frame(2)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(r)
        os.close(w)
        rx.close()
        tx.close()


def test_channel_reassembles_split_messages() -> None:
    a, b = socket.socketpair()
    rx = UnixChannel(a)
    raw = m.encode_bytes(FR.SET_VRING_ADDR, EXAMPLES[m.VringAddr])  # type: ignore[arg-type]
    try:
        for i in range(0, len(raw), 5):
            b.send(raw[i:i + 5])
            frame = rx.recv_frame_nowait()
            if i + 5 < len(raw):
                assert frame is None
        assert frame is not None and frame.request == FR.SET_VRING_ADDR
        assert m.decode(Direction.FRONTEND, frame.request, frame.flags, frame.payload)[1] \
            == EXAMPLES[m.VringAddr]
    finally:
        rx.close()
        b.close()


def test_channel_reports_hangup_mid_message() -> None:
    from vvu_runtime.vhost_user.errors import ConnectionClosed, TransportError

    a, b = socket.socketpair()
    rx = UnixChannel(a)
    b.send(struct.pack("=III", 1, 1, 8) + b"\0\0")
    b.close()
    with pytest.raises(TransportError) as info:
        rx.recv_frame(2)
    assert not isinstance(info.value, ConnectionClosed)
    rx.close()
    a2, b2 = socket.socketpair()
    rx2 = UnixChannel(a2)
    b2.close()
    with pytest.raises(ConnectionClosed):
        rx2.recv_frame(2)
    rx2.close()


def test_channel_truncated_fds_are_closed() -> None:
    a, b = socket.socketpair()
    rx = UnixChannel(a)
    fds = [os.eventfd(0) for _ in range(40)]
    try:
        before = len(os.listdir("/proc/self/fd"))
        b.sendmsg([struct.pack("=III", 3, 1, 0)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        with pytest.raises(FramingError, match="truncated"):
            rx.recv_frame(2)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in fds:
            os.close(fd)
        rx.close()
        b.close()
