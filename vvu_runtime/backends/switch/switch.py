"""The L2 learning switch: forwarding, flooding, offload decisions, counters.

One :class:`Switch` owns the forwarding database and every port. A port is a
:class:`ForwardingPort`: a vhost-user connection (``port.SwitchPort``) or the TAP uplink
(``uplink.TapUplink``). Frames enter through :meth:`Switch.forward_chains`
(a vhost-user TX ring was kicked) or :meth:`Switch.forward_buffer` (the uplink
read a frame) and leave through :meth:`ForwardingPort.deliver`.

The forwarding loop is the hot path and is written for speed (measured with
``benchmarks/switch_bench.py``): TX chains are taken in bursts; per frame, one
``struct`` call yields the header flags and both MACs, the source is learned
once per burst, and a plain (or accepted-offload) unicast frame is only
appended to its destination's batch; after the burst each destination takes
its batch with one ``pop_many`` on its RX ring, one slice copy per frame, one
``push_many`` and one notification. Anything unusual (multicast, unknown
destination, an offload to do in software, several source descriptors) first
flushes the batches, so frames never overtake each other, and goes through
:meth:`Switch._forward_slow`. Everything off the hot path is written for clarity.

Offloads are decided per destination. A frame with NEEDS_CSUM or a GSO type
is passed on untouched (header included) to a port that negotiated the
matching GUEST_* feature; any other port gets the result of
:func:`offload.software_offload` (checksum completed, segments cut), computed
at most once per frame and variant even when flooding.

Errors are attributed to whoever caused them: a broken TX chain fails the
sender's ring; a broken RX ring fails that destination ring only and the frame
counts as dropped there; malformed frames are dropped and counted at the ingress
port. Nothing a guest sends raises out of the loop.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vvu_runtime.backends.switch.fdb import (
    DEFAULT_AGEING_TIME,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_PER_PORT,
    Fdb,
)
from vvu_runtime.backends.switch.offload import OffloadError, SoftFrame, software_offload
from vvu_runtime.virtio import accel
from vvu_runtime.virtio.errors import VirtioError
from vvu_runtime.virtio.net import ETH_HLEN, GSO_ECN, GsoType, HdrFlags, NetFeature

if TYPE_CHECKING:
    from vvu_runtime.virtio.queue import DescriptorChain

#: _forward_c.forward_burst: (tx ring, port, hdr_size, limit, max_len, fdb table,
#: ageing, clock, send_csum, send_gso) -> a BurstResult, or None / the time read: not done.
ForwardBurst = Callable[..., "BurstResult | float | None"]

try:  # the compiled burst of forward_chains (virtio/accel.py); absent without a compiler
    from vvu_runtime.backends.switch import _forward_c
except ImportError:
    _compiled_forward_burst: ForwardBurst | None = None
else:
    _compiled_forward_burst = _forward_c.forward_burst if accel.current(
        _forward_c, "backends/switch/_forward_c.c", "virtio/_split_core.h") else None

log = logging.getLogger(__name__)

#: Largest frame accepted from a port: a 64 KiB GSO frame plus Ethernet, VLAN and
#: virtio headers. Anything longer is dropped (a guest can describe gigabytes).
MAX_FRAME_LEN = 65535 + ETH_HLEN + 8 + 12
#: TX chains taken per burst: enough to amortise the per-burst costs (clock read,
#: used-index publish, one notification per touched RX queue), small enough that
#: a receiver sees the first frames while the sender is still being drained.
BURST = 64

_MAC_PAIR = struct.Struct("6s6s")
_ZERO_MAC = bytes(6)


_HEAD_STRUCTS = {n: struct.Struct(f"<BB{n - 2}x6s6s") for n in (10, 12)}


def _head_struct(hdr_size: int) -> struct.Struct:
    """flags, gso_type, destination and source MAC of a header + frame buffer."""
    return _HEAD_STRUCTS.get(hdr_size) or struct.Struct(f"<BB{hdr_size - 2}x6s6s")

_U16 = struct.Struct("<H")
_NEEDS_CSUM = int(HdrFlags.NEEDS_CSUM)
_DATA_VALID = int(HdrFlags.DATA_VALID)
_UDP_L4 = int(GsoType.UDP_L4)


class Drop(enum.Enum):
    """Why a frame was dropped; each is counted on the port it is attributed to."""

    # attributed to the ingress port
    RUNT = "runt"  # shorter than a virtio-net header + Ethernet header
    OVERSIZE = "oversize"  # longer than any frame a NIC would send
    BAD_SOURCE = "bad_source"  # multicast or all-zero source MAC
    OFFLOAD_NOT_NEGOTIATED = "offload_not_negotiated"  # GSO/csum the port did not negotiate
    OFFLOAD_MALFORMED = "offload_malformed"  # headers do not allow the software offload
    HAIRPIN = "hairpin"  # destination is the port it came from
    TX_DISABLED = "tx_queue_disabled"  # sent on a started but disabled ring
    TX_RING_ERROR = "tx_ring_error"  # a broken TX chain; the ring was failed
    # attributed to the destination port
    PORT_DOWN = "port_down"  # no RX ring started (or none enabled)
    RX_RING_FULL = "rx_ring_full"  # no buffer available
    RX_BUFFER_SMALL = "rx_buffer_small"  # frame larger than one buffer, no MRG_RXBUF
    RX_RING_ERROR = "rx_ring_error"  # the destination ring broke; it was failed
    UPLINK_ERROR = "uplink_error"  # the TAP refused the frame
    # tunnels (vxlan.py): on the tunnel the packet came from or went to
    SPLIT_HORIZON = "split_horizon"  # tunnel to tunnel: never (ingress tunnel)
    MTU_EXCEEDED = "mtu_exceeded"  # does not fit the underlay MTU with VXLAN's 50 bytes
    TUNNEL_TRUNCATED = "tunnel_truncated"  # shorter than a VXLAN header
    TUNNEL_BAD_FLAGS = "tunnel_bad_flags"  # the I flag (valid VNI) is not set
    TUNNEL_WRONG_VNI = "tunnel_wrong_vni"  # not the VNI of a tunnel with that peer
    TUNNEL_OVERSIZE = "tunnel_oversize"  # inner frame larger than the underlay MTU allows
    TUNNEL_SEND_ERROR = "tunnel_send_error"  # the UDP socket refused the packet


class RingLike(Protocol):
    """What the switch uses of a ``vhost_user.vring.Vring`` (fakes in tests)."""

    index: int
    enabled: bool
    name: str

    def pop(self) -> DescriptorChain | None: ...

    def pop_many(self, limit: int) -> list[DescriptorChain]: ...

    def push(self, chain: DescriptorChain, written: int) -> None: ...

    def push_many(self, completions: Iterable[tuple[DescriptorChain, int]]) -> None: ...

    def notify(self) -> None: ...

    def has_available(self) -> bool: ...

    def kick_suppression(self, suppress: bool) -> bool: ...

    def fail(self, exc: BaseException) -> None: ...


@dataclass(slots=True)
class PortCounters:
    """Per-port counters, from the switch's point of view: ``in`` = frames the
    switch received from the port, ``out`` = frames it sent to the port."""

    in_packets: int = 0
    in_bytes: int = 0
    out_packets: int = 0
    out_bytes: int = 0
    flooded: int = 0  # frames from this port that were flooded
    segmented: int = 0  # frames to this port that needed a software offload
    in_gso: int = 0  # frames from this port with a GSO type (TSO/UFO/USO super-frames)
    drops: dict[Drop, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def drop(self, reason: Drop, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n


def offload_table(features: int, *, guest: bool) -> tuple[bool, list[bool], bool, bool]:
    """What a port's negotiated ``features`` allow, as lookup tables for the hot path.

    ``guest=True``: what may be *delivered* to the port as-is (GUEST_* bits);
    ``guest=False``: what the port may *send* (CSUM/HOST_* bits).
    Returns ``(csum, gso_ok[256] indexed by the gso_type byte, uso4, uso6)``;
    ``gso_ok[UDP_L4]`` is only True when both IPv4 and IPv6 USO are allowed.
    """
    def on(bit: NetFeature) -> bool:
        return bool(features >> bit & 1)

    if guest:
        csum = on(NetFeature.GUEST_CSUM)
        tso4, tso6 = on(NetFeature.GUEST_TSO4), on(NetFeature.GUEST_TSO6)
        ecn, ufo = on(NetFeature.GUEST_ECN), on(NetFeature.GUEST_UFO)
        uso4, uso6 = on(NetFeature.GUEST_USO4), on(NetFeature.GUEST_USO6)
    else:
        csum = on(NetFeature.CSUM)
        tso4, tso6 = on(NetFeature.HOST_TSO4), on(NetFeature.HOST_TSO6)
        ecn, ufo = on(NetFeature.HOST_ECN), on(NetFeature.HOST_UFO)
        uso4 = uso6 = on(NetFeature.HOST_USO)
    # Offloads need checksum offload underneath (the spec makes them depend on it).
    table = [False] * 256
    table[GsoType.NONE] = True
    if csum:
        table[GsoType.TCPV4] = tso4
        table[GsoType.TCPV6] = tso6
        table[GsoType.UDP] = ufo
        table[_UDP_L4] = uso4 and uso6
        table[GsoType.TCPV4 | GSO_ECN] = tso4 and ecn
        table[GsoType.TCPV6 | GSO_ECN] = tso6 and ecn
    return csum, table, csum and uso4, csum and uso6


class PortKind(enum.Enum):
    """What a port is, as logs name it ("port vm1", "uplink tap0")."""

    PORT = "port"      # a vhost-user connection
    UPLINK = "uplink"  # the host's TAP device
    TUNNEL = "tunnel"  # a VXLAN tunnel to a switch on another host (vxlan.py)


class ForwardingPort:
    """Something frames are forwarded to: a vhost-user port or the uplink.

    Subclasses set ``hdr_size`` and the offload tables when features are known
    and implement :meth:`deliver`.
    """

    #: Whether the DATA_VALID flag of this port's frames may be believed (only the
    #: host kernel's TAP; a guest's DATA_VALID is stripped).
    trusted_data_valid = False

    def __init__(self, port_name: str, *, kind: PortKind = PortKind.PORT) -> None:
        #: The operator's name for the port (``--port NAME=...``), used in tables.
        self.port_name = port_name
        self.kind = kind
        #: How logs name it ("port vm1", "uplink tap0").
        self.name = f"{kind.value} {port_name}"
        self.counters = PortCounters()
        self.switch: Switch | None = None
        self.hdr_size = 12
        self.set_offloads(0)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def set_offloads(self, features: int, *, send: int | None = None) -> None:
        """Derive the hot-path tables from negotiated virtio-net ``features``
        (``send`` when what the port may send differs from ``features``)."""
        (self.accept_csum, self.accept_gso, self.accept_uso4,
         self.accept_uso6) = offload_table(features, guest=True)
        self.send_csum, self.send_gso, self.send_uso4, self.send_uso6 = offload_table(
            features if send is None else send, guest=False)

    @property
    def up(self) -> bool:
        """Whether frames can be delivered now."""
        return False

    def deliver(self, frame: ForwardedFrame) -> None:
        """Send ``frame`` out of this port (count it, or count why not)."""
        raise NotImplementedError

    def deliver_plain(self, frame: ForwardedFrame) -> None:
        """:meth:`deliver` for a frame whose header has no flags and no GSO type
        (``frame.flags``/``gso_type`` are not set on this path)."""
        frame.flags = frame.gso_type = 0
        self.deliver(frame)

    #: Header size of frames :meth:`deliver_batch` takes, or -1: no batching.
    batch_hdr_size = -1

    def deliver_batch(self, bufs: list[memoryview]) -> None:
        """Deliver frames that are each one buffer (header of ``batch_hdr_size``
        bytes first) and whose header flags this port accepts as they are."""
        raise NotImplementedError

    def fast_rx(self, hdr_size: int) -> tuple[object, bool, Touchable, list[bool], bool] | None:
        """For the compiled burst (``_forward_c.c``): ``(ring, accept_csum, queue,
        accept_gso, mergeable)`` when :meth:`deliver_batch` of frames with
        ``hdr_size``-byte headers would go straight into ``ring`` (the split ring of
        ``queue``, touched after the burst; frames whose offloads ``accept_csum`` and
        ``accept_gso`` allow go as they are; with ``mergeable`` a frame may span
        several chains); None: this port is served by the Python path."""
        return None

    def accepts(self, frame: ForwardedFrame) -> bool:
        """Whether ``frame``'s offloads may be delivered to this port untouched."""
        if frame.flags & _NEEDS_CSUM and not self.accept_csum:
            return False
        gso = frame.gso_type
        if gso == _UDP_L4 and not self.accept_gso[gso]:
            return self.accept_uso6 if frame.is_ipv6() else self.accept_uso4
        return self.accept_gso[gso]

    def status_line(self) -> str:
        """Short state for the status table ("up 2/2 rxq", "down")."""
        return "up" if self.up else "down"


class ForwardedFrame:
    """The frame being forwarded: where its bytes are and what its header says.

    One instance per switch, reused for every frame (no allocation per frame);
    batched frames never touch it. ``views`` hold the virtio-net header
    (``hdr_size`` bytes, the sender's size) followed by the Ethernet frame,
    possibly scattered. ``flags``/``gso_type`` are set only when the header has
    any (otherwise the frame goes out through :meth:`ForwardingPort.deliver_plain`). Slow
    paths compute what they need (a linear copy, the flow hash, software
    offloads) on demand; those caches belong to the frame whose ``views`` they
    were made for.
    """

    __slots__ = ("_cache_key", "_hash", "_linear", "_soft", "flags", "gso_type", "hdr_size",
                 "ingress", "length", "rewrite_flags", "views")

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.hdr_size = 12
        self.length = 0  # header + frame
        self.flags = 0
        self.gso_type = 0
        self.ingress: ForwardingPort | None = None
        #: The header's flags differ from the sender's (a DATA_VALID not believed):
        #: receivers write ``flags`` instead of copying the byte.
        self.rewrite_flags = False
        self._cache_key: object = None
        self._hash: int | None = None
        self._soft: dict[bool, list[SoftFrame]] | None = None
        self._linear: bytes | None = None

    def _cached(self) -> None:
        """Drop the slow-path caches if they belong to an earlier frame. They are
        keyed by the identity of ``views`` (the chain's own list, kept alive by the
        key), so the hot path never has to reset anything."""
        if self._cache_key is not self.views:
            self._cache_key = self.views
            self._hash = None
            self._soft = None
            self._linear = None

    def linear(self) -> bytes:
        """Header and frame as one bytes object (slow paths only)."""
        self._cached()
        if self._linear is None:
            views = self.views
            self._linear = bytes(views[0]) if len(views) == 1 else b"".join(views)
        return self._linear

    def header(self) -> memoryview:
        """The sender's virtio-net header."""
        v0 = self.views[0]
        hs = self.hdr_size
        return v0[:hs] if len(v0) >= hs else memoryview(self.linear())[:hs]

    def payload_views(self) -> list[memoryview]:
        """The Ethernet frame as a list of views (the sender's header skipped)."""
        skip = self.hdr_size
        out: list[memoryview] = []
        for v in self.views:
            n = len(v)
            if skip >= n:
                skip -= n
                continue
            out.append(v[skip:] if skip else v)
            skip = 0
        return out

    def _eth(self) -> memoryview:
        """At least the Ethernet header, contiguous."""
        v0 = self.views[0]
        hs = self.hdr_size
        if len(v0) >= hs + 64 or len(self.views) == 1:
            return v0[hs:]
        return memoryview(self.linear())[hs:]

    def ethertype(self) -> int:
        eth = self._eth()
        et = eth[12] << 8 | eth[13]
        if et in (0x8100, 0x88A8) and len(eth) >= 18:
            et = eth[16] << 8 | eth[17]
        return et

    def is_ipv6(self) -> bool:
        return self.ethertype() == 0x86DD

    def flow_hash(self) -> int:
        """A hash of the flow (IP addresses and ports, else MACs) to pick an RX queue."""
        self._cached()
        h = self._hash
        if h is not None:
            return h
        lin = self._eth()
        n = len(lin)
        et = lin[12] << 8 | lin[13]
        if et == 0x0800 and n >= 34:
            ihl = (lin[14] & 0x0F) * 4
            key = bytes(lin[26:34])
            # Ports only for unfragmented TCP/UDP, so all fragments stay together.
            if lin[23] in (6, 17) and not (lin[20] << 8 | lin[21]) & 0x3FFF \
                    and n >= 14 + ihl + 4:
                key += bytes(lin[14 + ihl:18 + ihl])
        elif et == 0x86DD and n >= 54:
            key = bytes(lin[22:54])
            if lin[20] in (6, 17) and n >= 58:
                key += bytes(lin[54:58])
        else:
            key = bytes(lin[0:12])
        h = self._hash = zlib.crc32(key)
        return h

    def software(self, partial_ok: bool) -> list[SoftFrame]:
        """The frames a NIC would put on the wire for this one (cached per variant).

        Raises OffloadError for frames whose headers do not allow it.
        """
        self._cached()
        soft = self._soft
        if soft is None:
            soft = self._soft = {}
        done = soft.get(partial_ok)
        if done is None:
            lin = memoryview(self.linear())
            hs = self.hdr_size
            done = software_offload(
                lin[hs:], self.flags, self.gso_type,
                gso_size=int(_U16.unpack_from(lin, 4)[0]),
                csum_start=int(_U16.unpack_from(lin, 6)[0]),
                csum_offset=int(_U16.unpack_from(lin, 8)[0]),
                partial_ok=partial_ok)
            soft[partial_ok] = done
        return done


class Switch:
    """An L2 learning switch over any number of ports."""

    def __init__(self, *, ageing_time: float = DEFAULT_AGEING_TIME,
                 max_fdb_entries: int = DEFAULT_MAX_ENTRIES,
                 max_fdb_per_port: int = DEFAULT_MAX_PER_PORT,
                 clock: Clock | None = None) -> None:
        self.fdb: Fdb[ForwardingPort] = Fdb(ageing_time, max_fdb_entries, max_fdb_per_port)
        self.ports: list[ForwardingPort] = []
        self.clock: Clock = clock or time.monotonic
        self.started_at = self.clock()
        self._frame = ForwardedFrame()
        #: RX queues written to in the current batch, notified once at its end.
        self._touched: list[Touchable] = []
        #: forward_chains' bursts in C, when built and not switched off (None: Python).
        self._forward_burst = None if accel.pure_python_forced() else _compiled_forward_burst
        #: Parts that are no port but have counters of their own (a tunnel endpoint).
        self.status_sources: list[StatusSource] = []

    # -------------------------------------------------------------------- ports
    def add_port(self, port: ForwardingPort) -> ForwardingPort:
        if any(p.port_name == port.port_name for p in self.ports):
            raise ValueError(f"port name {port.port_name!r} is used twice")
        port.switch = self
        self.ports.append(port)
        return port

    def port_down(self, port: ForwardingPort) -> None:
        """``port`` lost its link: forget the addresses learned on it."""
        n = self.fdb.flush_port(port)
        if n:
            log.info("%s: down, forgot %d learned address(es)", port.name, n)

    def touch(self, queue: Touchable) -> None:
        """Remember an RX queue written in this burst (flushed at its end)."""
        if not queue.touched:
            queue.touched = True
            self._touched.append(queue)

    def flush_notifications(self) -> None:
        touched = self._touched
        if not touched:
            return
        self._touched = []
        for q in touched:
            q.touched = False
            q.flush()

    def age(self) -> int:
        """Expire old FDB entries (called from a timer)."""
        return self.fdb.age(self.clock())

    # ------------------------------------------------------------------ ingress
    def forward_chains(self, port: ForwardingPort, ring: RingLike, hdr_size: int,
                       budget: int = 0) -> bool:
        """Drain ``ring`` (a TX ring of ``port``): forward every frame, return every chain.

        With ``budget`` > 0, stop after that many bursts and return True if the
        ring may hold more: the caller must come back (the driver will not kick
        again for buffers it already published), after letting other ports and
        control messages have the event loop. Returns False when the ring is empty.

        Works in bursts of :data:`BURST` chains: one avail read and one used-index
        publish per burst on the TX ring, and the frames delivered in the burst
        published and notified once per destination RX queue. A chain that breaks
        the ring rules fails ``ring`` (the sender's), never a destination.

        The loop is the switch's hot path: the common case (one source descriptor,
        no offload flags, a learned unicast destination) is inlined here; every
        other case goes through :meth:`_forward_slow`.
        """
        if not ring.enabled:
            self._drain_disabled(port, ring)
            return False
        frame = self._frame
        frame.hdr_size = hdr_size
        frame.ingress = port
        min_len = hdr_size + ETH_HLEN
        max_len = MAX_FRAME_LEN
        fdb = self.fdb
        table_get = fdb._table.get  # the FDB's dict, read directly on the fast path
        ageing = fdb.ageing_time
        unpack_macs = _MAC_PAIR.unpack_from
        unpack_head = _head_struct(hdr_size).unpack_from
        counters = port.counters
        slow = self._forward_slow
        send_gso = port.send_gso
        send_csum = port.send_csum
        zero_mac = _ZERO_MAC
        batches: dict[ForwardingPort, list[memoryview]] = {}
        # Per burst: destination MAC -> its batch, for plain frames (skips the
        # lookup, ageing and offload checks for every frame after the first).
        fast: dict[bytes, list[memoryview]] = {}
        fast_get = fast.get
        last_src: bytes | None
        v0: memoryview | bytes
        eth: memoryview | bytes
        flags: int
        gso: int
        dst_mac: bytes
        src_mac: bytes
        pkts = nbytes = gso_in = 0
        bursts = 0
        # The compiled burst needs the ring itself (a split ring without tracking).
        burst_c = self._forward_burst
        core = getattr(ring, "direct_queue", None) if burst_c is not None else None
        c_now: float | None = None
        try:
            while True:
                if bursts == budget:  # never true for budget 0
                    return True
                bursts += 1
                if core is not None and burst_c is not None:
                    # The whole burst in C, or nothing done (None, or the clock it read).
                    res = burst_c(core, port, hdr_size, BURST, max_len, fdb._table, ageing,
                                  self.clock, send_csum, send_gso)
                    if isinstance(res, tuple):
                        if not res[0]:
                            return False
                        pkts += res[1]
                        nbytes += res[2]
                        gso_in += res[8]
                        self._burst_counted(counters, res)
                        try:
                            ring.notify()
                        except VirtioError as exc:
                            counters.drop(Drop.TX_RING_ERROR)
                            ring.fail(exc)
                            return False
                        self.flush_notifications()
                        continue
                    c_now = res
                try:
                    chains = ring.pop_many(BURST)
                except VirtioError as exc:
                    counters.drop(Drop.TX_RING_ERROR)
                    ring.fail(exc)
                    return False
                if not chains:
                    return False
                now = self.clock() if c_now is None else c_now
                c_now = None
                last_src = None
                for chain in chains:
                    views = chain.readable
                    single = len(views) == 1
                    if single:
                        v0 = views[0]
                        n = len(v0)
                        if n < min_len or n > max_len:
                            counters.drop(Drop.RUNT if n < min_len else Drop.OVERSIZE)
                            continue
                        # Header fields and both MACs in one struct call.
                        flags, gso, dst_mac, src_mac = unpack_head(v0)
                    else:
                        n = sum(map(len, views))
                        eth, eth_off = self._scattered(views, n, hdr_size, counters)
                        if not eth:
                            continue
                        # The header: at the start of eth, or all of views[0].
                        v0 = eth if eth_off else views[0]
                        dst_mac, src_mac = unpack_macs(eth, eth_off)
                        flags = v0[0]
                        gso = v0[1]
                    pkts += 1
                    nbytes += n
                    if gso:
                        gso_in += 1
                    if src_mac != last_src:
                        if src_mac[0] & 1 or src_mac == zero_mac:
                            counters.drop(Drop.BAD_SOURCE)
                            continue
                        entry = table_get(src_mac)
                        if entry is not None and entry.port is port:
                            entry.seen = now
                        else:
                            fdb.learn(src_mac, port, now)
                        last_src = src_mac  # learned for this burst
                    if single and not flags and not gso:
                        # A destination already decided in this burst.
                        batch = fast_get(dst_mac)
                        if batch is not None:
                            batch.append(v0)  # type: ignore[arg-type]
                            continue
                    if dst_mac[0] & 1 or ((flags or gso) and (
                            flags & ~_NEEDS_CSUM or not send_gso[gso]
                            or (flags and not send_csum))):
                        # Multicast, or offload bits this port did not negotiate
                        # (checked and counted on the slow path).
                        if batches:
                            self._flush_batches(batches, fast)
                        frame.views = views
                        frame.length = n
                        slow(port, frame, dst_mac, now)
                        continue
                    entry = table_get(dst_mac)
                    if entry is None or now - entry.seen > ageing:
                        if batches:
                            self._flush_batches(batches, fast)
                        frame.views = views
                        frame.length = n
                        slow(port, frame, dst_mac, now)
                        continue
                    dst = entry.port
                    if dst is port:
                        counters.drop(Drop.HAIRPIN)
                        continue
                    if dst.batch_hdr_size == hdr_size and single and (
                            not (flags or gso) or ((flags == 0 or dst.accept_csum)
                            and dst.accept_gso[gso])):
                        # The common case: collect per destination, copy after the
                        # burst with one pop_many on the destination's RX ring.
                        # (NEEDS_CSUM/GSO frames the destination accepts go as they are.)
                        batch = batches.get(dst)
                        if batch is None:
                            batch = batches[dst] = [v0]  # type: ignore[list-item]
                        else:
                            batch.append(v0)  # type: ignore[arg-type]
                        if not (flags or gso):
                            fast[dst_mac] = batch
                        continue
                    if batches:
                        self._flush_batches(batches, fast)
                    frame.views = views
                    frame.length = n
                    if flags or gso:
                        frame.flags = flags
                        frame.gso_type = gso
                        dst.deliver(frame)
                    else:
                        dst.deliver_plain(frame)
                if batches:
                    self._flush_batches(batches, fast)
                try:
                    ring.push_many([(c, 0) for c in chains])
                    # Per burst, not per call: a sender that keeps the ring full
                    # learns early that its buffers are free (if it asked to).
                    ring.notify()
                except VirtioError as exc:
                    counters.drop(Drop.TX_RING_ERROR)
                    ring.fail(exc)
                    return False
                self.flush_notifications()
                # No early exit on a short burst: the empty pop is what re-arms
                # the driver's kicks (EVENT_IDX avail_event).
        finally:
            counters.in_packets += pkts
            counters.in_bytes += nbytes - pkts * hdr_size
            counters.in_gso += gso_in
            self.flush_notifications()
            try:
                ring.notify()
            except VirtioError as exc:
                ring.fail(exc)

    def _burst_counted(self, counters: PortCounters, res: BurstResult) -> None:
        """The counts of a compiled burst, where the Python loop counts them."""
        if res[3] or res[4] or res[5] or res[6]:
            for reason, n in zip((Drop.RUNT, Drop.OVERSIZE, Drop.BAD_SOURCE, Drop.HAIRPIN),
                                 res[3:7], strict=True):
                if n:
                    counters.drop(reason, n)
        for dst, queue, delivered, nbytes, full, touch in res[7]:
            c = dst.counters
            c.out_packets += delivered
            c.out_bytes += nbytes
            if full:
                c.drop(Drop.RX_RING_FULL, full)
            if touch:
                self.touch(queue)

    @staticmethod
    def _flush_batches(batches: dict[ForwardingPort, list[memoryview]],
                       fast: dict[bytes, list[memoryview]]) -> None:
        """Deliver the frames collected per destination (see forward_chains)."""
        fast.clear()
        for dst, bufs in batches.items():
            dst.deliver_batch(bufs)
        batches.clear()

    @staticmethod
    def _scattered(views: list[memoryview], n: int, hdr_size: int,
                   counters: PortCounters) -> tuple[memoryview | bytes, int]:
        """Where the Ethernet header of a multi-descriptor frame is; ``(b"", 0)`` if
        the frame is dropped (counted)."""
        if n < hdr_size + ETH_HLEN:
            counters.drop(Drop.RUNT)
            return b"", 0
        if n > MAX_FRAME_LEN:
            counters.drop(Drop.OVERSIZE)
            return b"", 0
        v0 = views[0]
        if len(v0) == hdr_size and len(views[1]) >= ETH_HLEN:
            # Linux puts the header in its own descriptor when the skb header is
            # cloned (every TCP segment).
            return views[1], 0
        if len(v0) >= hdr_size + ETH_HLEN:
            return v0, hdr_size
        return b"".join(views)[:hdr_size + ETH_HLEN], hdr_size

    def forward_buffer(self, port: ForwardingPort, buf: memoryview, hdr_size: int) -> None:
        """Forward one frame held in ``buf`` (virtio-net header first), e.g. from a TAP.

        The caller calls :meth:`flush_notifications` after its batch.
        """
        counters = port.counters
        n = len(buf)
        if n < hdr_size + ETH_HLEN or n > MAX_FRAME_LEN:
            counters.drop(Drop.RUNT if n < hdr_size + ETH_HLEN else Drop.OVERSIZE)
            return
        frame = self._frame
        frame.hdr_size = hdr_size
        frame.ingress = port
        frame.views = [buf]
        frame.length = n
        counters.in_packets += 1
        counters.in_bytes += n - hdr_size
        if buf[1]:
            counters.in_gso += 1
        now = self.clock()
        dst_mac, src_mac = _MAC_PAIR.unpack_from(buf, hdr_size)
        if src_mac[0] & 1 or src_mac == _ZERO_MAC:
            counters.drop(Drop.BAD_SOURCE)
            return
        self.fdb.learn(src_mac, port, now)
        self._forward_slow(port, frame, dst_mac, now)

    def _forward_slow(self, port: ForwardingPort, frame: ForwardedFrame, dst_mac: bytes,
                      now: float) -> None:
        """Everything but a plain learned unicast: offload flags, multicast, unknown."""
        hdr = frame.header()
        flags = hdr[0]
        gso = hdr[1]
        if flags or gso:
            if flags & ~_NEEDS_CSUM and not (port.trusted_data_valid and
                                             flags & ~_NEEDS_CSUM == _DATA_VALID):
                # DATA_VALID / RSC_INFO mean nothing on transmit; a guest's are dropped.
                flags &= _NEEDS_CSUM
            if flags & _NEEDS_CSUM and not port.send_csum:
                port.counters.drop(Drop.OFFLOAD_NOT_NEGOTIATED)
                return
            if not port.send_gso[gso] and not (gso == _UDP_L4 and (
                    port.send_uso6 if frame.is_ipv6() else port.send_uso4)):
                port.counters.drop(Drop.OFFLOAD_NOT_NEGOTIATED)
                return
        frame.flags = flags
        frame.gso_type = gso
        frame.rewrite_flags = flags != hdr[0]
        try:
            self._deliver_slow(port, frame, dst_mac, now, not (flags or gso))
        finally:
            frame.rewrite_flags = False

    def _deliver_slow(self, port: ForwardingPort, frame: ForwardedFrame, dst_mac: bytes, now: float,
                      plain: bool) -> None:
        # Split horizon: the tunnels of a network are a full mesh, so a frame that came
        # through one has reached every host already; sending it on would loop.
        from_tunnel = port.kind is PortKind.TUNNEL
        if dst_mac[0] & 1:
            dst = None
        else:
            dst = self.fdb.lookup(dst_mac, now)
            if dst is port:
                port.counters.drop(Drop.HAIRPIN)
                return
            if dst is not None and from_tunnel and dst.kind is PortKind.TUNNEL:
                port.counters.drop(Drop.SPLIT_HORIZON)
                return
        if dst is not None:
            if plain:
                dst.deliver_plain(frame)
            else:
                dst.deliver(frame)
            return
        port.counters.flooded += 1
        for p in self.ports:
            if p is not port and p.up and not (from_tunnel and p.kind is PortKind.TUNNEL):
                if plain:
                    p.deliver_plain(frame)
                else:
                    p.deliver(frame)

    def _drain_disabled(self, port: ForwardingPort, ring: RingLike) -> None:
        """A started but disabled TX ring: consume and drop, as the spec asks."""
        n = 0
        while True:
            try:
                chain = ring.pop()
            except VirtioError as exc:
                port.counters.drop(Drop.TX_RING_ERROR)
                ring.fail(exc)
                return
            if chain is None:
                break
            ring.push(chain, 0)
            n += 1
        if n:
            port.counters.drop(Drop.TX_DISABLED, n)
            try:
                ring.notify()
            except VirtioError as exc:
                ring.fail(exc)

    # ------------------------------------------------------------------ egress helper
    def software_frames(self, dst: ForwardingPort, frame: ForwardedFrame) -> list[SoftFrame] | None:
        """``frame`` offloaded in software for ``dst``; None (dropped, counted) if impossible."""
        try:
            soft = frame.software(partial_ok=dst.accept_csum)
        except OffloadError as exc:
            ingress = frame.ingress
            if ingress is not None:
                ingress.counters.drop(Drop.OFFLOAD_MALFORMED)
                log.debug("%s: cannot offload a frame for %s in software: %s",
                          ingress.name, dst.name, exc)
            return None
        dst.counters.segmented += 1
        return soft

    # ------------------------------------------------------------------ status
    def status_table(self) -> str:
        """The per-port counters as an aligned text table (for logs and the status file)."""
        now = self.clock()
        head = ("port", "state", "in pkts", "in bytes", "in gso", "out pkts", "out bytes",
                "flooded", "sw-offload", "drops")
        rows = [head]
        for p in self.ports:
            c = p.counters
            rows.append((p.port_name, p.status_line(), str(c.in_packets), str(c.in_bytes),
                         str(c.in_gso), str(c.out_packets), str(c.out_bytes), str(c.flooded),
                         str(c.segmented), str(c.dropped)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                 for r in rows]
        for p in self.ports:
            if p.counters.drops:
                reasons = ", ".join(f"{r.value}={n}" for r, n in
                                    sorted(p.counters.drops.items(), key=lambda kv: kv[0].value))
                lines.append(f"drops on {p.port_name}: {reasons}")
        for source in self.status_sources:
            lines += source.status_lines()
        fc = self.fdb.counters
        lines.append(f"fdb: {len(self.fdb)} address(es), ageing {self.fdb.ageing_time:g}s; "
                     f"learned {fc.learned}, moved {fc.moved}, aged {fc.aged}, "
                     f"refused (table full) {fc.refused_full}; up {now - self.started_at:.0f}s")
        return "\n".join(lines)

    def fdb_table(self) -> list[tuple[str, str, float]]:
        """(MAC, port, age in seconds) for every learned address."""
        from vvu_runtime.virtio.net import format_mac

        now = self.clock()
        return sorted((format_mac(mac), e.port.port_name, now - e.seen) for mac, e in self.fdb)

    def status_dict(self) -> dict[str, object]:
        """Counters as plain data (JSON status file)."""
        return {
            "ports": {
                p.port_name: {
                    "state": p.status_line(),
                    "in_packets": p.counters.in_packets, "in_bytes": p.counters.in_bytes,
                    "in_gso": p.counters.in_gso,
                    "out_packets": p.counters.out_packets, "out_bytes": p.counters.out_bytes,
                    "flooded": p.counters.flooded, "sw_offload": p.counters.segmented,
                    "drops": {r.value: n for r, n in p.counters.drops.items()},
                } for p in self.ports
            },
            "fdb": [{"mac": m, "port": pn, "age": round(a, 1)} for m, pn, a in self.fdb_table()],
            **{k: v for source in self.status_sources for k, v in source.status_data().items()},
        }


class Clock(Protocol):
    def __call__(self) -> float: ...


#: What ``_forward_c.forward_burst`` returns for a burst it forwarded: chains,
#: packets, bytes, runt, oversize, bad_source, hairpin, per destination
#: (port, queue, delivered, payload bytes, rx_ring_full, whether Python would have
#: touched the queue), and frames with a GSO type.
BurstResult = tuple[int, int, int, int, int, int, int,
                    list[tuple[ForwardingPort, "Touchable", int, int, int, bool]], int]


class StatusSource(Protocol):
    """Adds lines to :meth:`Switch.status_table` and keys to :meth:`Switch.status_dict`."""

    def status_lines(self) -> list[str]: ...

    def status_data(self) -> dict[str, object]: ...


class Touchable(Protocol):
    """An RX queue the switch publishes and notifies once per burst."""

    touched: bool

    def flush(self) -> None: ...

