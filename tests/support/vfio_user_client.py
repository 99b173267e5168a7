"""A small blocking vfio-user client that talks the way QEMU 11.1.3's does.

For tests and probes: it negotiates VERSION with QEMU's exact proposal, asks for
region info with argsz=32 first and retries with the size the server reports,
sends SET_IRQS eventfds, posted writes and REGION_WRITE_MULTI. It is not a
device emulator: no MSI-X table emulation, no DMA_READ/WRITE service.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from vvu_runtime.device.errors import PeerHungUp, ProtocolError, RemoteError
from vvu_runtime.device.vfio_user.protocol import (
    HEADER_SIZE,
    MAX_MSG_FDS,
    CapHeader,
    Command,
    DeviceInfo,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    Header,
    IrqInfo,
    IrqSet,
    Message,
    MsgFlags,
    RegionAccess,
    RegionInfo,
    SparseMmapCap,
    Version,
    WriteMulti,
    WriteMultiEntry,
)
from vvu_runtime.fds import close_fds, fds_from_ancdata

#: What QEMU 11.1.3 proposes, verbatim (reference/qemu-vfio-user-client.md).
QEMU_CAPABILITIES: dict[str, object] = {
    "pgsizes": 4096,
    "max_msg_fds": 16,
    "max_dma_maps": 65535,
    "max_data_xfer_size": 1048576,
    "migration": {"max_bitmap_size": 268435456, "pgsize": 4096},
    "write_multiple": True,
}


@dataclass(frozen=True, slots=True)
class RegionInfoResult:
    info: RegionInfo
    sparse: SparseMmapCap | None
    #: The region's fd (MMAP regions); the caller owns it.
    fd: int | None
    #: argsz values of each request sent (shows the retry).
    requests: tuple[int, ...]


class VfioUserClient:
    """Blocking request/reply client over a connected UNIX stream socket."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self._next_id = 1

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> VfioUserClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- raw messaging --------------------------------------------------------------

    def next_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return msg_id

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                # The fds went with the first byte; a big message may need more calls.
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerHungUp(f"the server closed the connection: {exc}") from exc

    def send(self, command: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             no_reply: bool = False, msg_id: int | None = None) -> Header:
        header = Header(self.next_id() if msg_id is None else msg_id, command,
                        HEADER_SIZE + len(payload), MsgFlags.NO_REPLY if no_reply else 0)
        self.send_raw(header.pack() + payload, fds)
        return header

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        space = socket.CMSG_SPACE(MAX_MSG_FDS * array.array("i").itemsize)
        while len(buf) < n:
            try:
                data, anc, _, _ = self.sock.recvmsg(n - len(buf), space)
            except ConnectionResetError as exc:
                raise PeerHungUp("the server reset the connection") from exc
            fds.extend(fds_from_ancdata(anc))
            if not data:
                raise PeerHungUp("the server closed the connection")
            buf += data
        return bytes(buf)

    def receive(self) -> Message:
        """One message: header with its fds, then exactly size-16 bytes."""
        fds: list[int] = []
        header = Header.unpack(self._recv_exact(HEADER_SIZE, fds))
        if header.size < HEADER_SIZE:
            raise ProtocolError(f"reply header claims {header.size} bytes")
        payload = self._recv_exact(header.size - HEADER_SIZE, fds)
        return Message(header, payload, fds)

    def request(self, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        """Send and wait for the matching reply; an error reply raises RemoteError."""
        sent = self.send(command, payload, fds)
        reply = self.receive()
        h = reply.header
        if h.msg_id != sent.msg_id or h.command != command or not h.is_reply:
            close_fds(reply.fds)
            raise ProtocolError(f"expected the reply to {sent.describe()}, got "
                                f"{h.describe()} flags {h.flags:#x}")
        if h.is_error:
            close_fds(reply.fds)
            raise RemoteError(f"{Command.name_of(command)} failed: {os.strerror(h.error)}",
                              errno=h.error)
        return reply

    # --- commands, as QEMU issues them ------------------------------------------------

    def version(self, caps: dict[str, object] | None = None) -> Version:
        proposal = Version(0, 0, QEMU_CAPABILITIES if caps is None else caps)
        reply = self.request(Command.VERSION, proposal.pack())
        if not reply.payload.endswith(b"\0"):
            raise ProtocolError("corrupt version reply (no NUL at the end)")
        return Version.unpack(reply.payload)

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE) -> None:
        payload = DmaMap(DmaMap.STRUCT.size, flags, offset, iova, size).pack()
        self.request(Command.DMA_MAP, payload, [fd] if fd is not None else [])

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> DmaUnmap:
        reply = self.request(Command.DMA_UNMAP,
                             DmaUnmap(DmaUnmap.STRUCT.size, flags, iova, size).pack())
        if len(reply.payload) != DmaUnmap.STRUCT.size:
            raise ProtocolError(f"DMA_UNMAP reply of {len(reply.payload)} bytes is larger "
                                "than the receive buffer")
        return DmaUnmap.unpack(reply.payload)

    def dma_unmap_all(self) -> DmaUnmap:
        return self.dma_unmap(0, 0, DmaUnmapFlags.ALL)

    def get_info(self) -> DeviceInfo:
        reply = self.request(Command.DEVICE_GET_INFO,
                             DeviceInfo(DeviceInfo.STRUCT.size, 0, 0, 0).pack())
        return DeviceInfo.unpack(reply.payload)

    def get_region_info(self, index: int) -> RegionInfoResult:
        """QEMU's argsz dance: ask with 32, retry with what the server needs."""
        argsz = RegionInfo.STRUCT.size
        sent: list[int] = []
        while True:
            sent.append(argsz)
            req = RegionInfo(argsz, 0, index, 0, 0, 0).pack() + bytes(argsz - 32)
            reply = self.request(Command.DEVICE_GET_REGION_INFO, req)
            if len(reply.payload) > argsz:
                close_fds(reply.fds)
                raise ProtocolError(f"region {index} info reply of {len(reply.payload)} bytes "
                                    f"exceeds argsz {argsz}")
            info = RegionInfo.unpack(reply.payload)
            if info.flags & 8 and not 32 <= info.cap_offset <= info.argsz:
                close_fds(reply.fds)
                raise ProtocolError(f"region {index}: cap_offset {info.cap_offset} outside "
                                    f"[32, {info.argsz}] (QEMU fails realize with EINVAL)")
            if info.argsz > argsz:
                close_fds(reply.fds)
                if len(sent) > 2:
                    raise ProtocolError(f"region {index}: argsz keeps growing")
                argsz = info.argsz
                continue
            if len(reply.fds) > 1:
                close_fds(reply.fds)
                raise ProtocolError(f"region {index}: {len(reply.fds)} fds, QEMU takes one")
            sparse = None
            if info.flags & 8:
                cap = reply.payload[info.cap_offset:]
                CapHeader.unpack(cap)
                sparse = SparseMmapCap.unpack(cap)
            return RegionInfoResult(info, sparse, reply.fds[0] if reply.fds else None,
                                    tuple(sent))

    def get_irq_info(self, index: int) -> IrqInfo:
        reply = self.request(Command.DEVICE_GET_IRQ_INFO,
                             IrqInfo(IrqInfo.STRUCT.size, 0, index, 0).pack())
        return IrqInfo.unpack(reply.payload)

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0,
                 fds: Sequence[int] = (), data: bytes = b"") -> None:
        payload = IrqSet(IrqSet.STRUCT.size + len(data), flags, index, start, count).pack()
        self.request(Command.DEVICE_SET_IRQS, payload + data, fds)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, RegionAccess(offset, index, count).pack())
        got = RegionAccess.unpack(reply.payload)
        data = reply.payload[RegionAccess.STRUCT.size:]
        if got.count > count or len(data) != got.count:
            raise ProtocolError(f"REGION_READ reply: count {got.count}, {len(data)} bytes")
        return data

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        payload = RegionAccess(offset, index, len(data)).pack() + data
        if posted:
            self.send(Command.REGION_WRITE, payload, no_reply=True)
        else:
            self.request(Command.REGION_WRITE, payload)

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]], *,
                           posted: bool = True) -> int | None:
        """``writes`` are (region, offset, data <= 8 bytes)."""
        entries = tuple(WriteMultiEntry(off, reg, len(d), d.ljust(8, b"\0"))
                        for reg, off, d in writes)
        payload = WriteMulti(entries).pack()
        if posted:
            self.send(Command.REGION_WRITE_MULTI, payload, no_reply=True)
            return None
        reply = self.request(Command.REGION_WRITE_MULTI, payload)
        return int.from_bytes(reply.payload[:8], "little")

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

    # --- conveniences -----------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(7, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.region_write(7, offset, value.to_bytes(size, "little"))


__all__ = ["QEMU_CAPABILITIES", "RegionInfoResult", "VfioUserClient"]
