"""The vhost-user codec (vhost_user/messages.py): decode, encode, frame, parse.

Each case builds one message of either direction, request or reply, with the
header, payload size, payload fields and fd count mostly right for its table
row and sometimes wrong, and decodes it. A decode must either raise a
:class:`ProtocolError` or return a payload that survives a round trip
(pack → decode gives the same value; format → parse gives the same frame).
"""

from __future__ import annotations

import struct

from fuzz.engine import Finding, Harness
from fuzz.source import ByteSource
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import ProtocolError

_DIRECTIONS = (m.Direction.FRONTEND, m.Direction.BACKEND)
_CODES = {d: tuple(sorted(d.table)) for d in _DIRECTIONS}
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def _payload(src: ByteSource, kind: type, size: int) -> bytes:
    """``size`` bytes for a ``kind`` payload, with its length fields usually consistent."""
    data = bytearray(src.take(size))
    if size < 8 or src.chance(20):
        return bytes(data)
    if kind is m.MemoryTable:
        _U32.pack_into(data, 0, (size - 8) // 32)
        _U32.pack_into(data, 4, 0)
    elif kind is m.ConfigSpace and size >= m.CONFIG_HDR_SIZE:
        struct.pack_into("=II", data, 0, src.below(m.MAX_CONFIG_SIZE + 8),
                         size - m.CONFIG_HDR_SIZE)
    elif kind is m.VringFile:
        _U64.pack_into(data, 0, src.below(256) | (m.VRING_NOFD if src.chance(50) else 0))
    elif kind is m.ShmemConfig:
        _U32.pack_into(data, 0, src.below(10))
    return bytes(data)


class CodecHarness(Harness):
    name = "codec"
    doc = "vhost-user message codec: decode/encode/format/parse of every request and reply"
    expected = (ProtocolError,)
    checks_fds_each_case = False

    def run_one(self, data: bytes) -> int:
        src = ByteSource(data)
        mode = src.below(16)
        if mode == 0:
            m.parse_message(src.take(src.below(80)))
            return 1
        if mode == 1:
            m.parse_header(src.take(12 if src.usually(90) else src.below(24)))
            return 2
        direction = src.pick(_DIRECTIONS)
        reply = src.chance(35)
        request = src.uint(4) if src.chance(4) else src.pick(_CODES[direction])
        flags = m.VERSION | (m.HeaderFlags.REPLY if reply else 0)
        if src.chance(30):
            flags |= m.HeaderFlags.NEED_REPLY
        if src.chance(4):
            flags = src.uint(4)
        spec = direction.table.get(request)
        if spec is None:
            size = src.below(64)
            kind: type = m.Opaque
            fd_range = (0, 0)
        elif reply:
            size = src.pick(spec.reply_sizes)
            kind = spec.reply_payload or m.U64
            fd_range = spec.reply_fds
        else:
            size = src.pick(spec.sizes)
            kind = spec.payload
            fd_range = spec.fds
        if src.chance(8):
            size = src.below(m.MAX_PAYLOAD + 16)
        payload = _payload(src, kind, size)
        lo, hi = fd_range
        nfds = lo + src.below(hi - lo + 1)
        if kind is m.VringFile and not reply and len(payload) == 8:
            nfds = 0 if _U64.unpack_from(payload)[0] & m.VRING_NOFD else 1
        if kind is m.MemoryTable and not reply and len(payload) >= 8:
            nfds = _U32.unpack_from(payload)[0]
        if src.chance(8):
            nfds = src.below(12)
        check_fds = not src.chance(10)
        code, value = m.decode(direction, request, flags, payload, nfds, reply=reply,
                               check_fds=check_fds)
        self._round_trip(direction, request, flags, value, nfds, reply, check_fds)
        backend = direction is m.Direction.BACKEND
        return 4 + (int(code) * 2 + backend) * 2 + reply

    @staticmethod
    def _round_trip(direction: m.Direction, request: int, flags: int, value: object,
                    nfds: int, reply: bool, check_fds: bool) -> None:
        packed = value.pack()  # type: ignore[attr-defined]
        try:
            _, again = m.decode(direction, request, flags, packed, nfds, reply=reply,
                                check_fds=check_fds)
        except ProtocolError as exc:
            raise Finding(f"{direction.code(request)}: a decoded payload does not decode "
                          f"again after pack(): {exc}") from exc
        if again != value:
            raise Finding(f"{direction.code(request)}: pack/decode changed {value!r} "
                          f"into {again!r}")
        frame = m.format_message(request, flags, packed)
        if m.parse_message(frame) != (request, flags, packed):
            raise Finding(f"{direction.code(request)}: format/parse changed the frame")
        code, _, edata = m.encode(request, value,  # type: ignore[arg-type]
                                       reply=reply, need_reply=bool(flags & 8))
        if edata != packed or code != request:
            raise Finding(f"{direction.code(request)}: encode differs from pack")
