"""The vfio-user server engine: one listening socket, one client, one device.

Runs on an asyncio event loop with ``add_reader`` on raw sockets, so the device
built on top (the VVU device, which also waits on vhost-user sockets and kick
eventfds) shares the same loop and thread; nothing here blocks.

States, refused with :class:`~vvu_runtime.device.errors.StateError` when a call
does not fit::

    server:   IDLE --start()--> LISTENING --client--> CONNECTED --hang-up--> LISTENING
                 \\--attach(sock)---------------------> CONNECTED --hang-up--> IDLE
              any --close()--> CLOSED
    session:  AWAITING_VERSION --VERSION--> RUNNING --EOF/framing lost--> CLOSED

Receive discipline (as QEMU sends): the 16-byte header with ``recvmsg``
collecting fds, then exactly ``size - 16`` more bytes, never reading past the
message. A malformed message gets an error reply (ERROR flag, errno) and serving
goes on; only a header claiming fewer than 16 bytes (framing lost) or a hang-up
ends the session. Any exception from device code is logged with the device name
and answered with EIO: the server never dies on input (DESIGN decision 3).
Posted writes (NO_REPLY) are never answered, not even on error: QEMU would take an
unsolicited reply for a protocol violation.
"""

from __future__ import annotations

import array
import asyncio
import enum
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from vvu_runtime.device.errors import (
    DeviceError,
    FramingError,
    MessageError,
    PeerHungUp,
    StateError,
    UnsupportedCommand,
)
from vvu_runtime.device.vfio_user.device import VfioUserDevice
from vvu_runtime.device.vfio_user.protocol import (
    HEADER_SIZE,
    MAX_DATA_XFER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_MSG_FDS,
    MSG_TYPE_MASK,
    SERVER_CAPABILITIES,
    Command,
    DeviceInfo,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    Header,
    IrqInfo,
    IrqSet,
    IrqSetFlags,
    Message,
    MsgFlags,
    RegionAccess,
    RegionFlags,
    RegionInfo,
    SparseMmapCap,
    Version,
    WriteMulti,
    WriteMultiEntry,
    encode,
    error_reply,
    reply_header,
)
from vvu_runtime.fds import FdError, Outbox, UnixListener, close_fds, fds_from_ancdata

log = logging.getLogger(__name__)


#: Messages handled per readable event before yielding to other fds on the loop.
BATCH = 64
#: Stop reading while this much reply data waits for the peer to read it,
SEND_HIGH_WATER = 4 << 20
#: or this many replies,
MAX_QUEUED_REPLIES = 256
#: or this many fds in them (region fds are duplicated while queued: a client that
#: asks for region info without reading would otherwise fill our fd table).
MAX_QUEUED_FDS = MAX_MSG_FDS


class MessageReader:
    """Splits a non-blocking stream socket into :class:`Message` objects.

    :meth:`receive` returns None when the socket has no more bytes for now; it
    keeps partial messages between calls, so a peer that dribbles bytes cannot
    stall the loop.
    """

    _ANC_SPACE = socket.CMSG_SPACE(MAX_MSG_FDS * array.array("i").itemsize)

    def __init__(self, sock: socket.socket, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.sock = sock
        self.max_size = max_size
        self._head = bytearray()
        self._header: Header | None = None
        self._body = bytearray()
        self._drop = 0
        self._fds: list[int] = []
        self._truncated = False

    def _recv(self, want: int) -> bytes | None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(want, self._ANC_SPACE,
                                                    socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError as exc:
            raise PeerHungUp("the client reset the connection") from exc
        got = fds_from_ancdata(anc)
        room = MAX_MSG_FDS - len(self._fds)
        if len(got) > room or flags & socket.MSG_CTRUNC:
            # A message may carry at most MAX_MSG_FDS fds, however many pieces it
            # arrives in: close the rest now, so that one never-finished message cannot
            # fill our fd table; the message is refused when it ends.
            self._truncated = True
            extra = got[max(room, 0):]
            got = got[:max(room, 0)]
            close_fds(extra)
        self._fds.extend(got)
        if not data:
            partial = self._header is not None or bool(self._head)
            raise PeerHungUp("the client closed the connection"
                                   + (" in the middle of a message" if partial else ""))
        return data

    def receive(self) -> Message | None:
        while True:
            if self._header is None:
                data = self._recv(HEADER_SIZE - len(self._head))
                if data is None:
                    return None
                self._head += data
                if len(self._head) < HEADER_SIZE:
                    continue
                header = Header.unpack(self._head)
                self._head.clear()
                if header.size < HEADER_SIZE:
                    self._header = None
                    fds, self._fds = self._fds, []
                    close_fds(fds)
                    raise FramingError(
                        f"{header.describe()}: the header says the message is {header.size} "
                        f"bytes, less than the {HEADER_SIZE}-byte header itself")
                self._header = header
                body = header.size - HEADER_SIZE
                self._drop = body if header.size > self.max_size else 0
            header = self._header
            if self._drop:
                data = self._recv(min(self._drop, 1 << 16))
                if data is None:
                    return None
                self._drop -= len(data)
                if self._drop:
                    continue
                return self._finish(header, b"", oversized=True)
            missing = header.size - HEADER_SIZE - len(self._body)
            if missing:
                data = self._recv(missing)
                if data is None:
                    return None
                self._body += data
                if len(self._body) < header.size - HEADER_SIZE:
                    continue
            return self._finish(header, bytes(self._body))

    def _finish(self, header: Header, payload: bytes, oversized: bool = False) -> Message:
        msg = Message(header, payload, self._fds, self._truncated, oversized)
        self._header = None
        self._body = bytearray()
        self._fds = []
        self._truncated = False
        return msg

    def discard(self) -> None:
        """Close fds of a partial message (connection going away)."""
        close_fds(self._fds)
        self._fds = []


@dataclass(slots=True)
class Reply:
    """What a handler answers: payload after the header, and fds to pass along."""

    payload: bytes = b""
    fds: list[int] = field(default_factory=list)


class SessionState(enum.Enum):
    AWAITING_VERSION = "awaiting VERSION"
    RUNNING = "running"
    CLOSED = "closed"


class ServerState(enum.Enum):
    IDLE = "idle"
    LISTENING = "listening"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(slots=True)
class SessionStats:
    messages: int = 0
    errors: int = 0
    #: Messages that asked for no reply (posted writes).
    posted: int = 0
    by_command: dict[str, int] = field(default_factory=dict)


class Session:
    """One client connection: framing, dispatch, replies."""

    def __init__(self, server: VfioUserServer, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.server = server
        self.device = server.device
        self.sock = sock
        self.state = SessionState.AWAITING_VERSION
        self.stats = SessionStats()
        self.client_caps: dict[str, object] = {}
        self._reader = MessageReader(sock)
        self._loop = server.loop
        self._outbox = Outbox(sock, self._loop, on_drained=self._resume_reading,
                              on_error=lambda exc: self.close(f"cannot send to the client: {exc}"))
        self._reading = False
        self._handlers: dict[int, Callable[[Message], Reply | None]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.DEVICE_RESET: self._reset,
        }

    @property
    def name(self) -> str:
        return self.device.name

    def start(self) -> None:
        self.device.client_connected()
        self._resume_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self.state is not SessionState.CLOSED:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    # --- receiving ------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(BATCH):
            if self.state is SessionState.CLOSED or not self._reading:
                return
            try:
                msg = self._reader.receive()
            except PeerHungUp as exc:
                self.close(str(exc))
                return
            except FramingError as exc:
                log.error("%s: %s; closing the connection (framing lost)", self.name, exc)
                self.close("framing lost")
                return
            except OSError as exc:
                self.close(f"socket error: {exc}")
                return
            if msg is None:
                return
            self.handle(msg)

    def handle(self, msg: Message) -> None:
        """Serve one message: reply (or error reply) unless NO_REPLY; close its fds."""
        header = msg.header
        self.stats.messages += 1
        if header.no_reply:
            self.stats.posted += 1
        key = Command.name_of(header.command)
        self.stats.by_command[key] = self.stats.by_command.get(key, 0) + 1
        reply: Reply | None = None
        try:
            reply = self._dispatch(msg)
        except DeviceError as exc:
            self._refuse(header, exc.errno, str(exc))
        except Exception as exc:
            log.exception("%s: internal error while handling %s", self.name, header.describe())
            self._refuse(header, errno.EIO, f"internal error: {exc!r}", logged=True)
        else:
            if reply is not None and not header.no_reply:
                self._send(encode(reply_header(header), reply.payload), reply.fds)
        finally:
            close_fds(msg.fds)

    def _refuse(self, header: Header, err: int, why: str, logged: bool = False) -> None:
        self.stats.errors += 1
        if not logged:
            log.warning("%s: refused %s: %s (%s)", self.name, header.describe(), why,
                        errno.errorcode.get(err, err))
        if header.no_reply:
            return
        self._send(error_reply(header, err), [])

    def _dispatch(self, msg: Message) -> Reply | None:
        header = msg.header
        if header.flags & MSG_TYPE_MASK != MsgFlags.COMMAND:
            raise MessageError(f"message type {header.flags & MSG_TYPE_MASK} is not a command "
                               "(the server sends no requests, so expects no replies)")
        if header.flags & MsgFlags.ERROR:
            raise MessageError("a command with the ERROR flag set (only replies carry it)")
        if msg.oversized:
            raise MessageError(f"message of {header.size} bytes exceeds the {MAX_MESSAGE_SIZE}"
                               " bytes we accept (max_data_xfer_size)", errno=errno.E2BIG)
        if msg.fds_truncated:
            raise MessageError(f"more than {MAX_MSG_FDS} fds attached (max_msg_fds)")
        handler = self._handlers.get(header.command)
        if handler is None:
            raise UnsupportedCommand(f"{Command.name_of(header.command)} is not implemented by "
                                     "this server")
        if self.state is SessionState.AWAITING_VERSION and header.command != Command.VERSION:
            raise MessageError("VERSION must be the first message")
        if msg.fds and header.command not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS):
            raise MessageError(f"{len(msg.fds)} fds attached to a message that takes none")
        log.debug("%s: %s", self.name, header.describe())
        return handler(msg)

    # --- handlers ------------------------------------------------------------------

    def _version(self, msg: Message) -> Reply:
        if self.state is not SessionState.AWAITING_VERSION:
            raise MessageError("VERSION was already negotiated")
        proposal = Version.unpack(msg.payload)
        if proposal.major != 0:
            raise MessageError(f"protocol version {proposal.major}.{proposal.minor} proposed; "
                               "this server speaks 0.0", errno=errno.ENOTSUP)
        self.client_caps = proposal.capabilities
        self.state = SessionState.RUNNING
        log.info("%s: client negotiated vfio-user 0.0, capabilities %s", self.name,
                 proposal.capabilities)
        return Reply(Version(0, 0, dict(SERVER_CAPABILITIES)).pack())

    def _dma_map(self, msg: Message) -> Reply:
        req = DmaMap.unpack(msg.payload)
        if req.argsz < DmaMap.STRUCT.size:
            raise MessageError(f"DMA_MAP argsz {req.argsz} < {DmaMap.STRUCT.size}")
        if req.flags & ~int(DmaMapFlags.READ | DmaMapFlags.WRITE):
            raise MessageError(f"DMA_MAP flags {req.flags:#x} has unknown bits")
        if len(msg.fds) > 1:
            raise MessageError(f"DMA_MAP carries {len(msg.fds)} fds, at most 1")
        self.device.dma.map(req.iova, req.size, readable=bool(req.flags & DmaMapFlags.READ),
                            writable=bool(req.flags & DmaMapFlags.WRITE),
                            fd=msg.fds[0] if msg.fds else None, fd_offset=req.offset)
        return Reply()

    def _dma_unmap(self, msg: Message) -> Reply:
        req = DmaUnmap.unpack(msg.payload)
        if req.argsz < DmaUnmap.STRUCT.size:
            raise MessageError(f"DMA_UNMAP argsz {req.argsz} < {DmaUnmap.STRUCT.size}")
        if req.flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise MessageError("DMA_UNMAP with GET_DIRTY_BITMAP: dirty tracking is not "
                               "supported", errno=errno.ENOTSUP)
        if req.flags & ~int(DmaUnmapFlags.ALL):
            raise MessageError(f"DMA_UNMAP flags {req.flags:#x} has unknown bits")
        if req.flags & DmaUnmapFlags.ALL:
            self.device.dma.unmap_all()
        else:
            self.device.dma.unmap(req.iova, req.size)
        # QEMU's receive buffer is exactly the request's size: echo the 24 bytes only.
        return Reply(req.pack())

    def _get_info(self, msg: Message) -> Reply:
        req = DeviceInfo.unpack(msg.payload)
        if req.argsz < DeviceInfo.STRUCT.size:
            raise MessageError(f"DEVICE_GET_INFO argsz {req.argsz} < {DeviceInfo.STRUCT.size}")
        d = self.device
        return Reply(DeviceInfo(DeviceInfo.STRUCT.size, d.device_flags, d.num_regions,
                                d.num_irqs).pack())

    def _get_region_info(self, msg: Message) -> Reply:
        req = RegionInfo.unpack(msg.payload)
        fixed = RegionInfo.STRUCT.size
        if req.argsz < fixed:
            raise MessageError(f"DEVICE_GET_REGION_INFO argsz {req.argsz} < {fixed}")
        desc = self.device.region_info(req.index)
        caps = b""
        if desc.sparse_areas:
            caps = SparseMmapCap(desc.sparse_areas).pack()
        flags = desc.flags | (RegionFlags.CAPS if caps else 0)
        needed = fixed + len(caps)
        # QEMU checks cap_offset lies in [32, argsz] whenever CAPS is set, also in the
        # truncated first reply: always point at the spot right after the fixed part.
        info = RegionInfo(needed, flags, req.index, fixed if caps else 0, desc.size,
                          desc.fd_offset)
        if req.argsz < needed:
            # The client retries with the argsz we report; send the fd only then, since
            # QEMU takes exactly one fd per region.
            return Reply(info.pack())
        fds = [desc.fd] if desc.flags & RegionFlags.MMAP and desc.fd is not None else []
        return Reply(info.pack() + caps, fds)

    def _get_irq_info(self, msg: Message) -> Reply:
        req = IrqInfo.unpack(msg.payload)
        if req.argsz < IrqInfo.STRUCT.size:
            raise MessageError(f"DEVICE_GET_IRQ_INFO argsz {req.argsz} < {IrqInfo.STRUCT.size}")
        desc = self.device.irq_info(req.index)
        return Reply(IrqInfo(IrqInfo.STRUCT.size, desc.flags, req.index, desc.count).pack())

    def _set_irqs(self, msg: Message) -> Reply:
        req = IrqSet.unpack(msg.payload)
        fixed = IrqSet.STRUCT.size
        if req.argsz < fixed:
            raise MessageError(f"DEVICE_SET_IRQS argsz {req.argsz} < {fixed}")
        if req.argsz != len(msg.payload):
            # QEMU sends argsz = the payload it sends (20 with eventfds, which travel
            # out of band; 20 + count with DATA_BOOL).
            raise MessageError(f"DEVICE_SET_IRQS argsz {req.argsz} does not match the "
                               f"{len(msg.payload)}-byte payload")
        data = msg.payload[fixed:]
        if req.flags & IrqSetFlags.DATA_BOOL and len(data) < req.count:
            raise MessageError(f"DEVICE_SET_IRQS DATA_BOOL: {len(data)} bytes for "
                               f"{req.count} vectors")
        if req.flags & IrqSetFlags.DATA_BOOL:
            data = data[:req.count]
        self.device.set_irqs(req.flags, req.index, req.start, req.count, msg.fds, data)
        return Reply()

    def _region_read(self, msg: Message) -> Reply:
        req = RegionAccess.unpack(msg.payload)
        if len(msg.payload) != RegionAccess.STRUCT.size:
            raise MessageError(f"REGION_READ payload is {len(msg.payload)} bytes, expected "
                               f"{RegionAccess.STRUCT.size}")
        if req.count > MAX_DATA_XFER_SIZE:
            raise MessageError(f"REGION_READ of {req.count} bytes exceeds max_data_xfer_size",
                               errno=errno.E2BIG)
        data = self.device.region_read(req.region, req.offset, req.count)
        if len(data) != req.count:
            raise DeviceError(f"region {req.region} read handler returned {len(data)} bytes "
                              f"for {req.count}", errno=errno.EIO)
        return Reply(req.pack() + data)

    def _region_write(self, msg: Message) -> Reply:
        req = RegionAccess.unpack(msg.payload)
        data = msg.payload[RegionAccess.STRUCT.size:]
        if len(data) != req.count:
            raise MessageError(f"REGION_WRITE says {req.count} bytes but carries {len(data)}")
        self.device.region_write(req.region, req.offset, data)
        return Reply(req.pack())

    def _region_write_multi(self, msg: Message) -> Reply:
        req = WriteMulti.unpack(msg.payload)
        for e in req.entries:
            if e.count > WriteMultiEntry.MAX_DATA:
                raise MessageError(f"REGION_WRITE_MULTI entry of {e.count} bytes (at most 8)")
        # Applied in order; the first failure ends the batch with an error reply.
        for e in req.entries:
            self.device.region_write(e.region, e.offset, e.data[:e.count])
        return Reply(WriteMulti.STRUCT.pack(len(req.entries)))

    def _reset(self, msg: Message) -> Reply:
        if msg.payload:
            raise MessageError(f"DEVICE_RESET carries {len(msg.payload)} payload bytes")
        log.info("%s: DEVICE_RESET", self.name)
        self.device.reset()
        return Reply()

    # --- sending ---------------------------------------------------------------------

    def _send(self, data: bytes, fds: list[int]) -> None:
        if self.state is SessionState.CLOSED:
            return
        self._outbox.send(data, fds)
        box = self._outbox
        if (box.pending > SEND_HIGH_WATER or box.queued_messages > MAX_QUEUED_REPLIES
                or box.queued_fds > MAX_QUEUED_FDS):
            self._pause_reading()  # until the client has read what waits (on_drained)

    # --- teardown -------------------------------------------------------------------

    def close(self, why: str = "closed by the server") -> None:
        if self.state is SessionState.CLOSED:
            return
        self._pause_reading()
        self._outbox.close()
        self.state = SessionState.CLOSED
        self._reader.discard()
        self.sock.close()
        log.info("%s: client disconnected (%s) after %d messages (%d posted), %d refused; %s",
                 self.name, why, self.stats.messages, self.stats.posted, self.stats.errors,
                 ", ".join(f"{k} {v}" for k, v in sorted(self.stats.by_command.items())))
        try:
            self.device.client_disconnected()
        except Exception:
            log.exception("%s: error while cleaning up after the client left", self.name)
        self.server._session_closed(self)


class VfioUserServer:
    """Serves one :class:`VfioUserDevice` on one UNIX socket, one client at a time."""

    def __init__(self, device: VfioUserDevice, path: str | os.PathLike[str] | None = None,
                 *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.device = device
        self.path = os.fspath(path) if path is not None else None
        self._loop = loop
        self.state = ServerState.IDLE
        self.session: Session | None = None
        self._listener: UnixListener | None = None
        self._closed: asyncio.Event | None = None
        #: How many clients were served (finished sessions).
        self.sessions_served = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _closed_event(self) -> asyncio.Event:
        if self._closed is None:
            self._closed = asyncio.Event()
        return self._closed

    def start(self) -> None:
        """Bind and listen on ``path`` (a stale socket there is replaced). Needs a loop."""
        if self.state is not ServerState.IDLE:
            raise StateError(f"{self.device.name}: start() in state {self.state.value}")
        if self.path is None:
            raise StateError(f"{self.device.name}: start() needs a socket path")
        self._closed_event()
        try:
            self._listener = UnixListener(self.path, 1)
        except FdError as exc:
            raise StateError(f"{self.device.name}: {exc}") from exc
        self._listener.watch(self.loop, self._accept)
        self.state = ServerState.LISTENING
        log.info("%s: vfio-user server listening on %s", self.device.name, self.path)

    def attach(self, sock: socket.socket) -> Session:
        """Serve an already connected socket (tests use a socketpair). Needs a loop."""
        if self.state not in (ServerState.IDLE, ServerState.LISTENING):
            raise StateError(f"{self.device.name}: attach() in state {self.state.value}")
        self._closed_event()
        return self._serve(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock = self._listener.accept()
        except OSError as exc:
            log.warning("%s: accept failed: %s", self.device.name, exc)
            return
        if sock is None:
            return
        if self.session is not None:
            log.warning("%s: a second client connected while one is served; refused (one "
                        "client per device)", self.device.name)
            sock.close()
            return
        self._serve(sock)

    def _serve(self, sock: socket.socket) -> Session:
        session = Session(self, sock)
        self.session = session
        self.state = ServerState.CONNECTED
        log.info("%s: client connected", self.device.name)
        session.start()
        return session

    def _session_closed(self, session: Session) -> None:
        if self.session is session:
            self.session = None
            self.sessions_served += 1
            if self.state is not ServerState.CLOSED:
                self.state = (ServerState.LISTENING if self._listener is not None
                              else ServerState.IDLE)

    async def serve_forever(self) -> None:
        """Until :meth:`close`."""
        await self._closed_event().wait()

    def close(self) -> None:
        """Stop listening, drop the client, release the device's client state."""
        if self.state is ServerState.CLOSED:
            return
        self.state = ServerState.CLOSED
        if self.session is not None:
            self.session.close("server shutting down")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._closed is not None:
            self._closed.set()
