"""The vhost-user message codec: request codes, payload layouts, the message tables.

Wire format (all native byte order): a 12-byte header ``u32 request, u32 flags,
u32 size`` followed by ``size`` bytes of payload; file descriptors travel beside
the message (SCM_RIGHTS on the socket transport). Flags: bits 0-1 version (must
be 1), bit 2 REPLY, bit 3 NEED_REPLY; other bits are reserved and refused.

Each request of each direction has one :class:`MessageSpec` in
:data:`FRONTEND_TABLE` / :data:`BACKEND_TABLE`: the payload class of the request
and of the reply, how many fds the request and the reply may carry, and whether a
reply is always owed. :func:`decode` checks a received frame against the table and
returns a typed :class:`Message`, or raises a :class:`ProtocolError` subclass
naming the request and the problem. :func:`encode` is the inverse for both
directions and for replies.

Payload classes are frozen dataclasses with a ``STRUCT`` (fixed layouts) and
``pack()`` / ``unpack(data)``; variable layouts (memory table, config space,
opaque) implement the same two methods.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag
from typing import ClassVar, Protocol, TypeVar

from vvu_runtime.fds import close_fds
from vvu_runtime.vhost_user.errors import (
    FdCountError,
    FlagsError,
    FramingError,
    PayloadSizeError,
    PayloadValueError,
    ProtocolError,
    UnknownRequestError,
)
from vvu_runtime.virtio.memory import MemoryRegion

# ------------------------------------------------------------------ codes and flags

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3


class HeaderFlags(IntFlag):
    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


KNOWN_FLAGS = VERSION_MASK | int(HeaderFlags.REPLY) | int(HeaderFlags.NEED_REPLY)


class FrontendRequest(IntEnum):
    """Requests the front-end sends to the back-end (vhost-user.rst, front-end messages)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(IntEnum):
    """Requests the back-end sends on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10
    MEM_READ = 11


class ProtocolFeature(IntEnum):
    """Bit numbers of the protocol features (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    SHMEM = 20

    @property
    def mask(self) -> int:
        return 1 << self.value


def protocol_mask(*features: ProtocolFeature) -> int:
    mask = 0
    for f in features:
        mask |= 1 << f.value
    return mask


#: Virtio feature bits the vhost-user protocol itself uses.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_F_LOG_ALL = 1 << 26

VRING_IDX_MASK = 0xFF
VRING_NOFD = 0x100
VRING_F_LOG = 0x1
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
CONFIG_HDR_SIZE = 12

# ------------------------------------------------------------------ payloads


class Payload(Protocol):
    def pack(self) -> bytes: ...


P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload."""

    SIZES: ClassVar[tuple[int, ...]] = (0,)

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        return EMPTY


EMPTY = Empty()


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64 (features, status, acks, queue counts ...)."""

    value: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class VringState:
    """``u32 index, u32 num``: ring size, base, enable, endian, in-band kick/call/err."""

    index: int
    num: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 index, bit 8 NOFD."""

    index: int
    nofd: bool
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index | (VRING_NOFD if self.nofd else 0))

    @classmethod
    def unpack(cls, data: bytes) -> VringFile:
        (value,) = cls.STRUCT.unpack(data)
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise PayloadValueError(f"vring fd payload {value:#x} sets reserved bits")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log`` (used before avail)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.flags, self.desc, self.used, self.avail,
                                self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        return cls(*cls.STRUCT.unpack(data))


REGION = struct.Struct("=QQQQ")


def _pack_region(r: MemoryRegion) -> bytes:
    return REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def _unpack_region(data: bytes | memoryview, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(*REGION.unpack_from(data, offset))


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """``u32 nregions, u32 padding, region[nregions]`` (SET_MEM_TABLE), at most 8 regions."""

    regions: tuple[MemoryRegion, ...]
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")
    SIZES: ClassVar[tuple[int, ...]] = tuple(8 + 32 * n for n in range(MAX_MEM_REGIONS + 1))

    def pack(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(
            _pack_region(r) for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryTable:
        nregions, _ = cls.HEAD.unpack_from(data)
        if nregions > MAX_MEM_REGIONS:
            raise PayloadValueError(f"{nregions} memory regions, at most {MAX_MEM_REGIONS}")
        if len(data) != 8 + 32 * nregions:
            raise PayloadSizeError(
                f"payload is {len(data)} bytes, expected {8 + 32 * nregions} for "
                f"{nregions} regions")
        return cls(tuple(_unpack_region(data, 8 + 32 * i) for i in range(nregions)))


@dataclass(frozen=True, slots=True)
class SingleRegion:
    """``u64 padding, region`` (ADD_MEM_REG / REM_MEM_REG)."""

    region: MemoryRegion
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q32s")

    def pack(self) -> bytes:
        return struct.pack("=Q", 0) + _pack_region(self.region)

    @classmethod
    def unpack(cls, data: bytes) -> SingleRegion:
        return cls(_unpack_region(data, 8))


@dataclass(frozen=True, slots=True)
class LogArea:
    """``u64 mmap_size, u64 mmap_offset`` (SET_LOG_BASE)."""

    mmap_size: int
    mmap_offset: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> LogArea:
        return cls(*cls.STRUCT.unpack(data))


class IotlbType(IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


@dataclass(frozen=True, slots=True)
class Iotlb:
    """struct vhost_iotlb_msg: ``u64 iova, u64 size, u64 uaddr, u8 perm, u8 type`` (32 B)."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, data: bytes) -> Iotlb:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """``u32 offset, u32 size, u32 flags, u8 payload[size]`` (GET/SET_CONFIG), size <= 256."""

    offset: int
    flags: int
    data: bytes
    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")
    SIZES: ClassVar[tuple[int, ...]] = tuple(range(CONFIG_HDR_SIZE,
                                                   CONFIG_HDR_SIZE + MAX_CONFIG_SIZE + 1))
    WRITABLE: ClassVar[int] = 0
    LIVE_MIGRATION: ClassVar[int] = 1

    @property
    def size(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        offset, size, flags = cls.HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise PayloadValueError(f"config size {size} is more than {MAX_CONFIG_SIZE}")
        if size != len(data) - CONFIG_HDR_SIZE:
            raise PayloadSizeError(
                f"config header says {size} bytes but {len(data) - CONFIG_HDR_SIZE} follow")
        if offset + size > MAX_CONFIG_SIZE:
            raise PayloadValueError(f"config range [{offset}, +{size}) is past "
                                    f"{MAX_CONFIG_SIZE} bytes")
        return cls(offset, flags, bytes(data[CONFIG_HDR_SIZE:]))


@dataclass(frozen=True, slots=True)
class VringArea:
    """``u64 index_flags, u64 size, u64 offset`` (BACKEND_VRING_HOST_NOTIFIER_MSG)."""

    index_flags: int
    size: int
    offset: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index_flags, self.size, self.offset)

    @classmethod
    def unpack(cls, data: bytes) -> VringArea:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class Inflight:
    """``u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size``.

    C compilers pad the struct to 24 bytes and QEMU sends 24; a packed 20-byte
    form is accepted too.
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    SIZES: ClassVar[tuple[int, ...]] = (24, 20)

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.num_queues,
                                self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Inflight:
        return cls(*struct.unpack_from("=QQHH", data))


@dataclass(frozen=True, slots=True)
class SharedObject:
    """VhostUserShared: a 16-byte UUID."""

    uuid: bytes
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=16s")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.uuid)

    @classmethod
    def unpack(cls, data: bytes) -> SharedObject:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """``u32 direction (0 save, 1 load), u32 phase (0 stopped)`` (SET_DEVICE_STATE_FD)."""

    direction: int
    phase: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.direction, self.phase)

    @classmethod
    def unpack(cls, data: bytes) -> DeviceStateTransfer:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class ShmemMap:
    """``u8 shmid, u8 pad[7], u64 fd_offset, u64 shm_offset, u64 len, u64 flags``."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=B7xQQQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.shmid, self.fd_offset, self.shm_offset, self.len,
                                self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> ShmemMap:
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """``u32 nregions, u32 padding, u64 memory_sizes[8]`` (GET_SHMEM_CONFIG reply)."""

    nregions: int
    memory_sizes: tuple[int, ...]
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II8Q")

    def pack(self) -> bytes:
        sizes = tuple(self.memory_sizes) + (0,) * (8 - len(self.memory_sizes))
        return self.STRUCT.pack(self.nregions, 0, *sizes[:8])

    @classmethod
    def unpack(cls, data: bytes) -> ShmemConfig:
        nregions, _, *sizes = cls.STRUCT.unpack(data)
        if nregions > 8:
            raise PayloadValueError(f"{nregions} shared memory regions, at most 8")
        return cls(nregions, tuple(sizes))


@dataclass(frozen=True, slots=True)
class Opaque:
    """Bytes the codec does not interpret (crypto sessions, MEM_READ proposal)."""

    data: bytes
    SIZES: ClassVar[tuple[int, ...]] = tuple(range(0, 1024 + 1))

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Opaque:
        return cls(bytes(data))


def _sizes(cls: type) -> tuple[int, ...]:
    sizes: tuple[int, ...] | None = getattr(cls, "SIZES", None)
    if sizes is not None:
        return sizes
    st: struct.Struct = cls.STRUCT  # type: ignore[attr-defined]
    return (st.size,)


# ------------------------------------------------------------------ the tables


class Reply(Enum):
    """When a request is answered."""

    NEVER = "never"                  # only the REPLY_ACK u64 if NEED_REPLY was set
    ALWAYS = "always"                # a reply payload, whatever the flags
    CONDITIONAL = "conditional"      # a reply depending on negotiated features
                                     # (SET_LOG_BASE with LOG_SHMFD, SET_MEM_TABLE
                                     # with postcopy)


@dataclass(frozen=True)
class MessageSpec:
    """One row of a message table."""

    request: IntEnum
    payload: type
    fds: tuple[int, int] = (0, 0)
    reply: Reply = Reply.NEVER
    reply_payload: type | None = None
    reply_fds: tuple[int, int] = (0, 0)
    sizes: tuple[int, ...] = field(default=())
    #: The protocol feature that must be negotiated before this request is valid.
    needs: ProtocolFeature | None = None

    def __post_init__(self) -> None:
        if not self.sizes:
            object.__setattr__(self, "sizes", _sizes(self.payload))

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def reply_sizes(self) -> tuple[int, ...]:
        sizes = set(_sizes(self.reply_payload)) if self.reply_payload else set()
        sizes.add(8)  # a REPLY_ACK u64
        return tuple(sorted(sizes))


FR = FrontendRequest
BR = BackendRequest


def _table(*specs: MessageSpec) -> dict[int, MessageSpec]:
    return {int(s.request): s for s in specs}


#: Front-end → back-end requests, and the back-end's replies to them.
FRONTEND_TABLE: dict[int, MessageSpec] = _table(
    MessageSpec(FR.GET_FEATURES, Empty, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.SET_FEATURES, U64),
    MessageSpec(FR.SET_OWNER, Empty),
    MessageSpec(FR.RESET_OWNER, Empty),
    MessageSpec(FR.SET_MEM_TABLE, MemoryTable, fds=(0, MAX_MEM_REGIONS),
                reply=Reply.CONDITIONAL, reply_payload=MemoryTable),
    MessageSpec(FR.SET_LOG_BASE, LogArea, fds=(0, 1), reply=Reply.CONDITIONAL,
                reply_payload=U64),
    MessageSpec(FR.SET_LOG_FD, Empty, fds=(0, 1)),
    MessageSpec(FR.SET_VRING_NUM, VringState),
    MessageSpec(FR.SET_VRING_ADDR, VringAddr),
    MessageSpec(FR.SET_VRING_BASE, VringState),
    MessageSpec(FR.GET_VRING_BASE, VringState, reply=Reply.ALWAYS, reply_payload=VringState),
    MessageSpec(FR.SET_VRING_KICK, VringFile, fds=(0, 1)),
    MessageSpec(FR.SET_VRING_CALL, VringFile, fds=(0, 1)),
    MessageSpec(FR.SET_VRING_ERR, VringFile, fds=(0, 1)),
    MessageSpec(FR.GET_PROTOCOL_FEATURES, Empty, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.SET_PROTOCOL_FEATURES, U64),
    MessageSpec(FR.GET_QUEUE_NUM, Empty, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.SET_VRING_ENABLE, VringState),
    MessageSpec(FR.SEND_RARP, U64),
    MessageSpec(FR.NET_SET_MTU, U64),
    MessageSpec(FR.SET_BACKEND_REQ_FD, Empty, fds=(1, 1)),
    MessageSpec(FR.IOTLB_MSG, Iotlb, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.SET_VRING_ENDIAN, VringState),
    MessageSpec(FR.GET_CONFIG, ConfigSpace, reply=Reply.ALWAYS, reply_payload=ConfigSpace,
                needs=ProtocolFeature.CONFIG),
    MessageSpec(FR.SET_CONFIG, ConfigSpace, needs=ProtocolFeature.CONFIG),
    MessageSpec(FR.CREATE_CRYPTO_SESSION, Opaque, reply=Reply.ALWAYS, reply_payload=Opaque),
    MessageSpec(FR.CLOSE_CRYPTO_SESSION, U64),
    MessageSpec(FR.POSTCOPY_ADVISE, Empty, reply=Reply.ALWAYS, reply_payload=Empty,
                reply_fds=(0, 1)),
    MessageSpec(FR.POSTCOPY_LISTEN, Empty),
    MessageSpec(FR.POSTCOPY_END, Empty, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.GET_INFLIGHT_FD, Inflight, reply=Reply.ALWAYS, reply_payload=Inflight,
                reply_fds=(0, 1)),
    MessageSpec(FR.SET_INFLIGHT_FD, Inflight, fds=(1, 1)),
    MessageSpec(FR.GPU_SET_SOCKET, Empty, fds=(1, 1)),
    MessageSpec(FR.RESET_DEVICE, Empty, needs=ProtocolFeature.RESET_DEVICE),
    MessageSpec(FR.VRING_KICK, VringState),
    MessageSpec(FR.GET_MAX_MEM_SLOTS, Empty, reply=Reply.ALWAYS, reply_payload=U64,
                needs=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    MessageSpec(FR.ADD_MEM_REG, SingleRegion, fds=(1, 1), reply=Reply.CONDITIONAL,
                reply_payload=SingleRegion, needs=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    MessageSpec(FR.REM_MEM_REG, SingleRegion, fds=(0, 1), reply=Reply.CONDITIONAL,
                reply_payload=SingleRegion, needs=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    MessageSpec(FR.SET_STATUS, U64),
    MessageSpec(FR.GET_STATUS, Empty, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.GET_SHARED_OBJECT, SharedObject, reply=Reply.ALWAYS, reply_payload=U64,
                reply_fds=(0, 1)),
    MessageSpec(FR.SET_DEVICE_STATE_FD, DeviceStateTransfer, fds=(1, 1), reply=Reply.ALWAYS,
                reply_payload=U64, reply_fds=(0, 1)),
    MessageSpec(FR.CHECK_DEVICE_STATE, Empty, reply=Reply.ALWAYS, reply_payload=U64),
    MessageSpec(FR.GET_SHMEM_CONFIG, Empty, reply=Reply.ALWAYS, reply_payload=ShmemConfig),
)

#: Back-end → front-end requests (backend channel), and the front-end's replies.
BACKEND_TABLE: dict[int, MessageSpec] = _table(
    MessageSpec(BR.IOTLB_MSG, Iotlb),
    MessageSpec(BR.CONFIG_CHANGE_MSG, Empty),
    MessageSpec(BR.VRING_HOST_NOTIFIER_MSG, VringArea, fds=(0, 1)),
    MessageSpec(BR.VRING_CALL, VringState),
    MessageSpec(BR.VRING_ERR, VringState),
    MessageSpec(BR.SHARED_OBJECT_ADD, SharedObject),
    MessageSpec(BR.SHARED_OBJECT_REMOVE, SharedObject),
    MessageSpec(BR.SHARED_OBJECT_LOOKUP, SharedObject, reply=Reply.ALWAYS, reply_payload=U64,
                reply_fds=(0, 1)),
    MessageSpec(BR.SHMEM_MAP, ShmemMap, fds=(1, 1)),
    MessageSpec(BR.SHMEM_UNMAP, ShmemMap),
    MessageSpec(BR.MEM_READ, Opaque),
)


class Direction(Enum):
    """Who sends the *requests* of a channel."""

    FRONTEND = "front-end"   # the main socket: requests from the front-end
    BACKEND = "back-end"     # the backend channel: requests from the back-end

    @property
    def table(self) -> dict[int, MessageSpec]:
        return FRONTEND_TABLE if self is Direction.FRONTEND else BACKEND_TABLE

    def code(self, request: int) -> IntEnum | int:
        enum: type[IntEnum] = FrontendRequest if self is Direction.FRONTEND else BackendRequest
        try:
            return enum(request)
        except ValueError:
            return request


def max_payload(table: dict[int, MessageSpec]) -> int:
    """The biggest payload any request or reply of ``table`` may have."""
    return max(max(max(s.sizes), max(s.reply_sizes)) for s in table.values())


#: Bound on any payload: 1024 (opaque crypto sessions); memory tables need 264 and
#: config spaces 268.
MAX_PAYLOAD = max(max_payload(FRONTEND_TABLE), max_payload(BACKEND_TABLE))


def request_limits(direction: Direction, replies: bool) -> dict[int, int]:
    """Per-request payload bounds for a channel reading requests (or replies) of
    ``direction``: what :class:`UnixChannel` checks before reading a payload."""
    if replies:
        return {code: max(s.reply_sizes) for code, s in direction.table.items()}
    return {code: s.max_size for code, s in direction.table.items()}


# ------------------------------------------------------------------ messages


@dataclass(slots=True)
class Message:
    """A decoded message: request code, header flags, typed payload, owned fds."""

    request: IntEnum
    flags: int
    payload: object
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def name(self) -> str:
        return self.request.name

    def get(self, kind: type[P]) -> P:
        """The payload as ``kind`` (decode guaranteed the type; this narrows it)."""
        payload = self.payload
        if not isinstance(payload, kind):
            raise ProtocolError(f"{self.name}: payload is {type(payload).__name__}, "
                                f"expected {kind.__name__}", int(self.request))
        return payload

    def take_fd(self) -> int | None:
        """Remove and return the first fd (the caller now owns it), or None."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        close_fds(self.fds)


def _name(direction: Direction, request: int) -> str:
    code = direction.code(request)
    return code.name if isinstance(code, IntEnum) else f"request {request}"


def check_flags(direction: Direction, request: int, flags: int, *, reply: bool) -> None:
    """Version must be 1; REPLY set exactly on replies; no reserved bits."""
    name = _name(direction, request)
    if flags & VERSION_MASK != VERSION:
        raise FramingError(f"{name}: header version {flags & VERSION_MASK}, expected 1",
                           request)
    if flags & ~KNOWN_FLAGS:
        raise FlagsError(f"{name}: reserved header flag bits {flags & ~KNOWN_FLAGS:#x} set",
                         request)
    if bool(flags & HeaderFlags.REPLY) != reply:
        what = "a reply without the REPLY flag" if reply else "a request with the REPLY flag"
        raise FlagsError(f"{name}: {what}", request)


def decode(direction: Direction, request: int, flags: int, payload: bytes,
           nfds: int = 0, *, reply: bool = False,
           check_fds: bool = True) -> tuple[IntEnum, object]:
    """Check one message against the table; returns (request code, typed payload).

    ``direction`` names who sends the requests of this channel; ``reply=True``
    decodes a reply to such a request. Raises a :class:`ProtocolError` subclass.
    The fds themselves are not touched (the channel closes them on error).
    ``check_fds=False`` skips the fd-count rules (a transport that strips fds).
    """
    spec = direction.table.get(request)
    if spec is None:
        raise UnknownRequestError(
            f"unknown {direction.value} request code {request}", request)
    name = spec.request.name
    check_flags(direction, request, flags, reply=reply)
    size = len(payload)
    if reply:
        sizes, fd_range = spec.reply_sizes, spec.reply_fds
        kind: type = spec.reply_payload or U64
        if size == 8 and (spec.reply is not Reply.ALWAYS or 8 not in _sizes(kind)):
            kind = U64  # a REPLY_ACK status
        elif spec.request is FR.GET_CONFIG and size == 0:
            kind = Empty  # a 0-length GET_CONFIG reply reports an error
            sizes = (0,)
    else:
        sizes, fd_range, kind = spec.sizes, spec.fds, spec.payload
    if size not in sizes:
        expected = (f"{sizes[0]}" if len(sizes) == 1 else
                    f"{sizes[0]}..{sizes[-1]}" if sizes == tuple(range(sizes[0], sizes[-1] + 1))
                    else " or ".join(str(s) for s in sizes))
        raise PayloadSizeError(f"{name}: payload is {size} bytes, expected {expected}",
                               request)
    lo, hi = fd_range
    if check_fds and not lo <= nfds <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise FdCountError(f"{name}: {nfds} file descriptors, expected {want}", request)
    unpack: Callable[[bytes], object] = kind.unpack  # type: ignore[attr-defined]
    try:
        value = unpack(payload)
    except ProtocolError as exc:
        exc.request = request
        exc.args = (f"{name}: {exc.args[0]}",)
        raise
    except (struct.error, ValueError) as exc:  # pragma: no cover - sizes checked above
        raise PayloadSizeError(f"{name}: cannot unpack payload: {exc}", request) from exc
    if not check_fds:
        return spec.request, value
    if isinstance(value, VringFile) and not reply:
        if value.nofd and nfds:
            raise PayloadValueError(f"{name}: NOFD flag set but an fd is attached", request)
        if not value.nofd and not nfds:
            raise FdCountError(f"{name}: no fd attached and the NOFD flag is not set",
                               request)
    if isinstance(value, MemoryTable) and not reply and nfds != len(value.regions):
        raise FdCountError(
            f"{name}: {len(value.regions)} regions but {nfds} file descriptors", request)
    return spec.request, value


def decode_message(direction: Direction, request: int, flags: int, payload: bytes,
                   fds: list[int], *, reply: bool = False, check_fds: bool = True) -> Message:
    """:func:`decode` into a :class:`Message` that owns ``fds`` (not closed on error)."""
    code, value = decode(direction, request, flags, payload, len(fds), reply=reply,
                         check_fds=check_fds)
    return Message(code, flags, value, fds)


def encode(request: int, payload: Payload | None = None, *, reply: bool = False,
           need_reply: bool = False) -> tuple[int, int, bytes]:
    """(request, flags, payload bytes) of a request or reply of either direction."""
    flags = VERSION
    if reply:
        flags |= HeaderFlags.REPLY
    if need_reply:
        flags |= HeaderFlags.NEED_REPLY
    data = payload.pack() if payload is not None else b""
    return int(request), int(flags), data


def encode_bytes(request: int, payload: Payload | None = None, *, reply: bool = False,
                 need_reply: bool = False) -> bytes:
    """Header and payload as one byte string."""
    return format_message(*encode(request, payload, reply=reply, need_reply=need_reply))


def format_message(request: int, flags: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One whole message: the header, then ``payload``."""
    return HEADER.pack(request, flags, len(payload)) + bytes(payload)


def parse_message(data: bytes | bytearray | memoryview) -> tuple[int, int, bytes]:
    """(request, flags, payload) of one whole message (a VVU rxq buffer holds one);
    FramingError if it is shorter than a header or its size field lies."""
    if len(data) < HEADER_SIZE:
        raise FramingError(f"a message of {len(data)} bytes is shorter than a header")
    request, flags, size = HEADER.unpack_from(data)
    if HEADER_SIZE + size != len(data):
        raise FramingError(f"message {request}: header says {size} payload bytes, the "
                           f"buffer holds {len(data) - HEADER_SIZE}")
    return request, flags, bytes(data[HEADER_SIZE:])


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header."""
    if len(data) != HEADER_SIZE:
        raise FramingError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    return request, flags, size


def features_by_name(bits: int, names: dict[int, str]) -> list[str]:
    """Names of the set bits (``bit N`` for unnamed ones), lowest first."""
    out = []
    n = 0
    while bits >> n:
        if bits >> n & 1:
            out.append(names.get(n, f"bit {n}"))
        n += 1
    return out
