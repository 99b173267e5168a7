"""VXLAN tunnels (RFC 7348): switch ports that reach switches on other hosts over UDP.

One :class:`TunnelEndpoint` per switch owns a UDP socket (bound in the
appliance on its underlay NIC's address, port 4789 by default) and any number
of :class:`VxlanTunnel` ports, one per peer switch. A frame leaves a tunnel as
one UDP datagram to the peer: an 8-byte VXLAN header (I flag, the VNI) and the
Ethernet frame, no FCS. Flooding is head-end replication (one unicast copy per
tunnel); the switch never sends a frame that came from a tunnel into another
tunnel (split horizon, ``switch.py``), which is loop-free because the tunnels
of a network are a full mesh (the topology loader insists).

**MTU.** VXLAN over IPv4 adds 50 bytes to an L3 packet (outer IPv4 20, UDP 8,
VXLAN 8, inner Ethernet 14), so a tunnel carries frames whose L3 packet is at
most the underlay MTU minus 50. Anything larger is dropped and counted
(``mtu_exceeded``), never fragmented: the socket sets IP_PMTUDISC_DO, so the
kernel refuses rather than fragments too. Consumers on a tunnelled network get
that smaller MTU from the launcher. Offloaded frames (TSO, partial checksums)
are segmented and checksummed in software before they are encapsulated
(a tunnel negotiates no offloads).

**Receive.** A datagram is attributed to a tunnel by its source address (the
peer's host; the source port is the sender's entropy or NAT's and is ignored)
and its VNI. Everything hostile is dropped and counted, on the tunnel of that
source address when there is one, else on the endpoint (``unknown_peer``):
shorter than a VXLAN header (``tunnel_truncated``), the I flag clear
(``tunnel_bad_flags``; the reserved bits are ignored, as RFC 7348 asks), a VNI
no tunnel of that peer has (``tunnel_wrong_vni``), an inner frame larger than
the underlay MTU allows (``tunnel_oversize``: our peers never send one, a
reassembled fragment train would be one). What is left goes through
:meth:`Switch.forward_buffer`, which checks the inner frame like any other
(runts, multicast sources).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from dataclasses import dataclass, field

from vvu_runtime.backends.switch.switch import (
    Drop,
    ForwardedFrame,
    ForwardingPort,
    PortKind,
    Switch,
)
from vvu_runtime.virtio.net import ETH_HLEN

log = logging.getLogger(__name__)

#: The IANA port of VXLAN.
VXLAN_PORT = 4789
#: flags (8 bits), reserved (24), VNI (24), reserved (8); network byte order.
VXLAN_HEADER = struct.Struct("!B3xI")
VXLAN_HLEN = VXLAN_HEADER.size
#: The I flag: the VNI is valid (RFC 7348 section 5).
FLAG_VNI = 0x08
MAX_VNI = (1 << 24) - 1
#: Outer IPv4 and UDP headers.
OUTER_HLEN = 20 + 8
#: Bytes VXLAN over IPv4 adds to an inner L3 packet: outer IPv4 + UDP + VXLAN + inner Ethernet.
OVERHEAD = OUTER_HLEN + VXLAN_HLEN + ETH_HLEN
DEFAULT_MTU = 1500
MIN_MTU = 576

#: The virtio-net header frames get inside the switch (12 bytes, all zero: no offloads).
_HDR_SIZE = 12
#: Datagrams read per readable event before other ports get the loop back.
READ_BATCH = 256
#: The largest UDP payload, with room for the virtio-net header in front.
_BUFFER = 65536 + _HDR_SIZE
#: Linux: IP_MTU_DISCOVER / IP_PMTUDISC_DO (set DF, never fragment locally).
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
#: Linux: IP_FREEBIND (bind to an address not configured yet); Python 3.11 lacks the name.
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def encode_header(vni: int) -> bytes:
    """The 8-byte VXLAN header of ``vni``."""
    if not 0 <= vni <= MAX_VNI:
        raise ValueError(f"VNI {vni} is not 0..{MAX_VNI}")
    return VXLAN_HEADER.pack(FLAG_VNI, vni << 8)


def max_frame(mtu: int) -> int:
    """The longest Ethernet frame (without FCS) a tunnel over ``mtu`` carries."""
    return mtu - OUTER_HLEN - VXLAN_HLEN


@dataclass(slots=True)
class EndpointCounters:
    """What the endpoint could not attribute to a tunnel."""

    unknown_peer: int = 0
    read_errors: int = 0


@dataclass(frozen=True)
class TunnelSpec:
    """One tunnel as the command line gives it: ``NAME=ADDRESS[,port=P],vni=V``."""

    name: str
    remote: str
    vni: int
    port: int = VXLAN_PORT

    @classmethod
    def parse(cls, text: str) -> TunnelSpec:
        name, sep, rest = text.partition("=")
        parts = rest.split(",")
        if not sep or not name.strip() or not parts[0].strip():
            raise ValueError(f"{text!r}: expected NAME=ADDRESS[,port=P],vni=V")
        opts: dict[str, int] = {}
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            if key not in ("port", "vni") or not eq or not value.isdigit():
                raise ValueError(f"{text!r}: {part!r} is not port=N or vni=N")
            opts[key] = int(value)
        if "vni" not in opts or not 0 < opts["vni"] <= MAX_VNI:
            raise ValueError(f"{text!r}: vni=V (1..{MAX_VNI}) is required")
        port = opts.get("port", VXLAN_PORT)
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port {port} is not 1..65535")
        return cls(name.strip(), parts[0].strip(), opts["vni"], port)


class VxlanTunnel(ForwardingPort):
    """A switch port whose frames go to one peer switch as VXLAN datagrams."""

    def __init__(self, endpoint: TunnelEndpoint, name: str, remote: str, vni: int,
                 port: int = VXLAN_PORT) -> None:
        if not 0 < vni <= MAX_VNI:
            raise ValueError(f"tunnel {name}: VNI {vni} is not 1..{MAX_VNI}")
        super().__init__(name, kind=PortKind.TUNNEL)
        self.endpoint = endpoint
        self.remote = remote
        self.remote_port = port
        self.vni = vni
        self.header = encode_header(vni)
        #: The peer as the socket sees it (an address, resolved once).
        self.address: tuple[str, int] = (remote, port)
        self.last_rx: float | None = None
        # No offloads: the peer's switch may hand the frame to anyone, so frames
        # are segmented and checksummed here (switch.software_frames).
        self.set_offloads(0)
        endpoint.add(self)

    @property
    def up(self) -> bool:
        return self.endpoint.sock is not None

    @property
    def max_frame(self) -> int:
        return max_frame(self.endpoint.mtu)

    def status_line(self) -> str:
        state = "up" if self.up else "down"
        if self.last_rx is None:
            heard = "nothing received"
        else:
            heard = f"last rx {time.monotonic() - self.last_rx:.0f}s ago"
        return f"{state} (vxlan {self.remote}:{self.remote_port} vni {self.vni}, {heard})"

    def deliver(self, frame: ForwardedFrame) -> None:
        if not self.accepts(frame):
            switch = self.switch
            soft = switch.software_frames(self, frame) if switch is not None else None
            for sf in soft or ():
                self._send([memoryview(sf.data)], len(sf.data))
            return
        self._send(frame.payload_views(), frame.length - frame.hdr_size)

    def _send(self, payload: list[memoryview], length: int) -> None:
        c = self.counters
        if length > self.max_frame:
            c.drop(Drop.MTU_EXCEEDED)
            return
        sock = self.endpoint.sock
        if sock is None:
            c.drop(Drop.PORT_DOWN)
            return
        try:
            sock.sendmsg([self.header, *payload], [], 0, self.address)
        except OSError as exc:
            # EMSGSIZE: the route's MTU is smaller than the configured one.
            c.drop(Drop.MTU_EXCEEDED if exc.errno == errno.EMSGSIZE else Drop.TUNNEL_SEND_ERROR)
            self.endpoint.send_error(self, exc)
            return
        c.out_packets += 1
        c.out_bytes += length


@dataclass
class TunnelEndpoint:
    """The UDP socket of a switch's tunnels, and the demultiplexing of what arrives."""

    switch: Switch
    bind: str = "0.0.0.0"
    port: int = VXLAN_PORT
    mtu: int = DEFAULT_MTU
    tunnels: list[VxlanTunnel] = field(default_factory=list)
    counters: EndpointCounters = field(default_factory=EndpointCounters)
    sock: socket.socket | None = None

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= 65535:
            raise ValueError(f"underlay MTU {self.mtu} is not {MIN_MTU}..65535")
        self._by_source: dict[str, list[VxlanTunnel]] = {}
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_errors = 0
        self.switch.status_sources.append(self)

    def add(self, tunnel: VxlanTunnel) -> None:
        for t in self.tunnels:
            if (t.remote, t.vni) == (tunnel.remote, tunnel.vni):
                raise ValueError(f"tunnel {tunnel.port_name}: {t.port_name} already goes to "
                                 f"{t.remote} with VNI {t.vni}")
        self.switch.add_port(tunnel)
        self.tunnels.append(tunnel)

    # -------------------------------------------------------------- life cycle
    def open(self) -> None:
        """Bind the socket and resolve the peers (a name is looked up once, here)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
            # The underlay address may not be configured yet when the switch starts
            # (networkd races the backend at boot): bind anyway, it arrives.
            sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
            try:
                sock.bind((self.bind, self.port))
            except OSError as exc:
                raise OSError(exc.errno, f"tunnel endpoint {self.bind}:{self.port}: cannot "
                              f"bind: {exc.strerror}") from exc
            by_source: dict[str, list[VxlanTunnel]] = {}
            for t in self.tunnels:
                try:
                    info = socket.getaddrinfo(t.remote, t.remote_port, socket.AF_INET,
                                              socket.SOCK_DGRAM)
                except OSError as exc:
                    raise OSError(f"tunnel {t.port_name}: cannot resolve {t.remote}: "
                                  f"{exc}") from exc
                host, port = info[0][4][0], info[0][4][1]
                t.address = (str(host), int(port))
                by_source.setdefault(str(host), []).append(t)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._by_source = by_source
        log.info("tunnel endpoint %s:%d (underlay MTU %d, frames up to %d bytes): %s",
                 self.bind, self.port, self.mtu, max_frame(self.mtu),
                 ", ".join(f"{t.port_name} -> {t.address[0]}:{t.address[1]} vni {t.vni}"
                           for t in self.tunnels) or "no tunnels")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open if needed and read datagrams in ``loop``."""
        if self.sock is None:
            self.open()
        assert self.sock is not None
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self.on_readable)

    def close(self) -> None:
        sock = self.sock
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        self._loop = None
        self.sock = None
        sock.close()
        for t in self.tunnels:
            self.switch.port_down(t)

    @property
    def address(self) -> tuple[str, int]:
        """Where the socket is bound (the port the kernel chose when ``port`` was 0)."""
        if self.sock is None:
            return (self.bind, self.port)
        host, port = self.sock.getsockname()
        return (str(host), int(port))

    # ------------------------------------------------------------------ ingress
    def on_readable(self) -> None:
        """Read a batch of datagrams, check and forward each."""
        sock = self.sock
        switch = self.switch
        if sock is None:
            return
        buf = self._buf
        view = self._view
        # The datagram lands after room for the virtio-net header minus the VXLAN
        # header's 8 bytes: the header is then overwritten in place (no copy).
        into = view[_HDR_SIZE - VXLAN_HLEN:]
        by_source = self._by_source
        try:
            for _ in range(READ_BATCH):
                try:
                    n, source = sock.recvfrom_into(into)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ECONNREFUSED from an earlier send's ICMP
                    self.counters.read_errors += 1
                    log.debug("tunnel endpoint: read: %s", exc)
                    continue
                tunnels = by_source.get(source[0])
                if tunnels is None:
                    self.counters.unknown_peer += 1
                    continue
                tunnel = tunnels[0]
                if n < VXLAN_HLEN:
                    tunnel.counters.drop(Drop.TUNNEL_TRUNCATED)
                    continue
                if not buf[_HDR_SIZE - VXLAN_HLEN] & FLAG_VNI:
                    tunnel.counters.drop(Drop.TUNNEL_BAD_FLAGS)
                    continue
                vni = int.from_bytes(buf[_HDR_SIZE - 4:_HDR_SIZE - 1], "big")
                if tunnel.vni != vni:
                    for t in tunnels:
                        if t.vni == vni:
                            tunnel = t
                            break
                    else:
                        tunnel.counters.drop(Drop.TUNNEL_WRONG_VNI)
                        continue
                inner = n - VXLAN_HLEN
                if inner > max_frame(self.mtu):
                    tunnel.counters.drop(Drop.TUNNEL_OVERSIZE)
                    continue
                tunnel.last_rx = time.monotonic()
                buf[0:_HDR_SIZE] = bytes(_HDR_SIZE)
                switch.forward_buffer(tunnel, view[:_HDR_SIZE + inner], _HDR_SIZE)
        finally:
            switch.flush_notifications()

    def send_error(self, tunnel: VxlanTunnel, exc: OSError) -> None:
        """Log the 1st, 2nd, 4th, 8th... send error (a dead peer must not flood the log)."""
        self._send_errors += 1
        n = self._send_errors
        if n & (n - 1) == 0:
            log.warning("%s: send to %s:%d failed (%d so far): %s", tunnel.name,
                        tunnel.address[0], tunnel.address[1], n, exc)

    # ------------------------------------------------------------------ status
    def status_lines(self) -> list[str]:
        host, port = self.address
        c = self.counters
        return [f"tunnel endpoint {host}:{port}: underlay MTU {self.mtu} (frames up to "
                f"{max_frame(self.mtu)} bytes), {len(self.tunnels)} tunnel(s); from unknown "
                f"peers {c.unknown_peer}, read errors {c.read_errors}"]

    def status_data(self) -> dict[str, object]:
        host, port = self.address
        return {
            "tunnel_endpoint": {"address": host, "port": port, "mtu": self.mtu,
                                "max_frame": max_frame(self.mtu),
                                "unknown_peer": self.counters.unknown_peer,
                                "read_errors": self.counters.read_errors},
            "tunnels": {t.port_name: {"remote": t.address[0], "port": t.address[1],
                                      "vni": t.vni, "last_rx_age": None if t.last_rx is None
                                      else round(time.monotonic() - t.last_rx, 1)}
                        for t in self.tunnels},
        }
