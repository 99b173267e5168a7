"""Frame builders, checksum verifiers and a fake ring, for tests and benchmarks.

Nothing on the packet path imports this module.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from vvu_runtime.backends.switch.offload import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    checksum_finish,
    checksum_sum,
    parse_layout,
)
from vvu_runtime.virtio.net import HDR_SIZE, VirtioNetHdr
from vvu_runtime.virtio.queue import DescriptorChain


def mac(n: int) -> bytes:
    """A locally administered unicast MAC numbered ``n``: 02:00:00:00:xx:xx."""
    return bytes([2, 0, 0, 0, (n >> 8) & 0xFF, n & 0xFF])


BROADCAST = b"\xff" * 6


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes = b"") -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 0x1234,
         ttl: int = 64, frag: int = 0x4000) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag,
                                ttl, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum_finish(checksum_sum(hdr)))
    return bytes(hdr) + payload


def ipv6(src: bytes, dst: bytes, nexthdr: int, payload: bytes, hop: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nexthdr, hop, src,
                       dst) + payload


def tcp(sport: int, dport: int, seq: int, payload: bytes, *, flags: int = 0x18,
        ack: int = 0, window: int = 65535) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0,
                       0) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


IP4_A = bytes([10, 0, 0, 1])
IP4_B = bytes([10, 0, 0, 2])
IP6_A = bytes.fromhex("fd000000000000000000000000000001")
IP6_B = bytes.fromhex("fd000000000000000000000000000002")


def tcp4_frame(dst: bytes, src: bytes, payload: bytes, *, seq: int = 1000,
               flags: int = 0x18, sport: int = 40000, dport: int = 5001) -> bytes:
    """An IPv4 TCP frame with its TCP checksum field 0 (fill with a helper below)."""
    return ether(dst, src, 0x0800, ipv4(IP4_A, IP4_B, IPPROTO_TCP,
                                        tcp(sport, dport, seq, payload, flags=flags)))


def tcp6_frame(dst: bytes, src: bytes, payload: bytes, *, seq: int = 1000,
               flags: int = 0x18) -> bytes:
    return ether(dst, src, 0x86DD, ipv6(IP6_A, IP6_B, IPPROTO_TCP,
                                        tcp(40000, 5001, seq, payload, flags=flags)))


def udp4_frame(dst: bytes, src: bytes, payload: bytes, *, sport: int = 40000,
               dport: int = 5001) -> bytes:
    return ether(dst, src, 0x0800, ipv4(IP4_A, IP4_B, IPPROTO_UDP, udp(sport, dport, payload),
                                        frag=0))


def udp6_frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return ether(dst, src, 0x86DD, ipv6(IP6_A, IP6_B, IPPROTO_UDP, udp(40000, 5001, payload)))


def _l4_sums(frame: bytes | bytearray) -> tuple[int, int, int]:
    """(l4 offset, pseudo-header sum, checksum field offset) of a TCP/UDP frame."""
    lay = parse_layout(frame)
    l4_len = len(frame) - lay.l4
    addrs = frame[lay.l3 + 8:lay.l3 + 40] if lay.ipv6 else frame[lay.l3 + 12:lay.l3 + 20]
    pseudo = checksum_sum(addrs, lay.proto + l4_len)
    return lay.l4, pseudo, 16 if lay.proto == IPPROTO_TCP else 6


def with_partial_csum(frame: bytes) -> tuple[bytes, int, int]:
    """The frame as a guest with CSUM sends it: L4 field = pseudo-header seed.

    Returns (frame, csum_start, csum_offset).
    """
    l4, pseudo, at = _l4_sums(frame)
    out = bytearray(frame)
    folded = pseudo % 0xFFFF or 0xFFFF
    struct.pack_into("!H", out, l4 + at, folded)
    return bytes(out), l4, at


def with_full_csum(frame: bytes) -> bytes:
    """The frame with a correct L4 checksum."""
    l4, pseudo, at = _l4_sums(frame)
    out = bytearray(frame)
    struct.pack_into("!H", out, l4 + at, 0)
    struct.pack_into("!H", out, l4 + at, checksum_finish(checksum_sum(out[l4:], pseudo)))
    return bytes(out)


def l4_checksum_ok(frame: bytes | bytearray) -> bool:
    """Whether the TCP/UDP checksum of ``frame`` verifies."""
    l4, pseudo, _ = _l4_sums(frame)
    return checksum_sum(frame[l4:], pseudo) % 0xFFFF == 0


def ipv4_header_ok(frame: bytes | bytearray, l3: int = 14) -> bool:
    ihl = (frame[l3] & 0x0F) * 4
    return checksum_sum(frame[l3:l3 + ihl]) % 0xFFFF == 0


def net_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, size: int = HDR_SIZE) -> bytes:
    return VirtioNetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                        0).pack(size)


# --------------------------------------------------------------------------- fake ring

@dataclass
class FakeRing:
    """A ring in plain Python memory with the Vring device API (pop/push/notify/fail)."""

    index: int
    enabled: bool = True
    name: str = "fake"
    avail: deque[DescriptorChain] = field(default_factory=deque)
    used: list[tuple[DescriptorChain, int]] = field(default_factory=list)
    notifications: int = 0
    failed: BaseException | None = None
    pop_error: BaseException | None = None
    push_error: BaseException | None = None
    kicks_suppressed: bool = False
    _next_head: int = 0

    def pop(self) -> DescriptorChain | None:
        if self.failed is not None:
            return None
        if self.pop_error is not None and self.avail:
            raise self.pop_error
        return self.avail.popleft() if self.avail else None

    def pop_many(self, limit: int) -> list[DescriptorChain]:
        out: list[DescriptorChain] = []
        while len(out) < limit:
            chain = self.pop()
            if chain is None:
                break
            out.append(chain)
        return out

    def push_many(self, completions: Iterable[tuple[DescriptorChain, int]]) -> None:
        for chain, written in completions:
            self.push(chain, written)

    def push(self, chain: DescriptorChain, written: int) -> None:
        if self.push_error is not None:
            raise self.push_error
        if written > sum(len(w) for w in chain.writable):
            raise AssertionError(f"pushed {written} bytes into a smaller chain")
        self.used.append((chain, written))

    def notify(self) -> None:
        self.notifications += 1

    def has_available(self) -> bool:
        return bool(self.avail) and self.failed is None

    def kick_suppression(self, suppress: bool) -> bool:
        self.kicks_suppressed = suppress
        return self.has_available()

    def fail(self, exc: BaseException) -> None:
        self.failed = exc

    def add_tx(self, *parts: bytes) -> DescriptorChain:
        """A driver → device chain made of ``parts`` (one descriptor each)."""
        chain = DescriptorChain(self._next_head, readable=[memoryview(p) for p in parts])
        self._next_head += 1
        self.avail.append(chain)
        return chain

    def add_rx(self, *sizes: int) -> DescriptorChain:
        """A device-writable chain of buffers of ``sizes`` bytes."""
        chain = DescriptorChain(self._next_head,
                                writable=[memoryview(bytearray(s)) for s in sizes])
        self._next_head += 1
        self.avail.append(chain)
        return chain

    def received(self) -> list[bytes]:
        """Bytes written into each used chain, in order (header included)."""
        out = []
        for chain, written in self.used:
            data = b"".join(bytes(w) for w in chain.writable)[:written]
            out.append(data)
        return out

    def received_frames(self, hdr_size: int = HDR_SIZE,
                        mergeable: bool = True) -> list[tuple[VirtioNetHdr, bytes]]:
        """Reassemble merged buffers into (header, frame) pairs."""
        out: list[tuple[VirtioNetHdr, bytes]] = []
        chunks = self.received()
        i = 0
        while i < len(chunks):
            hdr = VirtioNetHdr.unpack(chunks[i], hdr_size)
            count = hdr.num_buffers if mergeable and hdr_size == HDR_SIZE else 1
            data = chunks[i][hdr_size:] + b"".join(chunks[i + 1:i + count])
            out.append((hdr, data))
            i += max(count, 1)
        return out


# --------------------------------------------------------------------------- driver side

class DriverPort:
    """A virtio-net driver in this process, connected to a switch port.

    Does what a guest's virtio-net driver does, through the vhost-user front-end
    (``vhost_user.frontend``) and a split driver ring: negotiates, shares a memfd
    as guest RAM, fills the receive ring, sends frames with a virtio-net header,
    and reassembles received frames (MRG_RXBUF). For tests and tools; the
    benchmark drives rings in bulk instead.
    """

    def __init__(self, path: str, *, exclude: int = 0, queue_size: int = 256,
                 rx_buffer: int = 2048, tx_buffer: int = 2048, timeout: float = 5.0) -> None:
        from vvu_runtime.vhost_user import messages as m
        from vvu_runtime.vhost_user.frontend import GuestRam, VhostUserFrontend, setup_queue

        self.fe = VhostUserFrontend.connect(path, retry_for=timeout)
        offered = self.fe.get_features()
        self.fe.negotiate(features=offered & ~m.VHOST_F_LOG_ALL & ~exclude)
        self.features = self.fe.features
        self.queue_size = queue_size
        self.rx_buffer = rx_buffer
        self.tx_buffer = tx_buffer
        rings = 2 * (queue_size * 18 + 4096 * 3)
        self.ram = GuestRam(queue_size * (rx_buffer + tx_buffer) + rings + (1 << 20))
        self.fe.set_mem_table([(self.ram.region, self.ram.fd)])
        self.rxq = setup_queue(self.fe, self.ram, 0, queue_size)
        self.txq = setup_queue(self.fe, self.ram, 1, queue_size)
        self.mergeable = bool(self.features >> 15 & 1)
        self._tx_free = [self.ram.alloc(tx_buffer) for _ in range(queue_size)]
        self._rx_bufs = [self.ram.alloc(rx_buffer) for _ in range(queue_size)]
        for gpa in self._rx_bufs:
            self.rxq.ring.add([], [(gpa, rx_buffer)], gpa)
        self.rxq.kick()
        self._partial: list[bytes] = []
        self._partial_left = 0

    def close(self) -> None:
        self.fe.close()
        self.rxq.close()
        self.txq.close()
        self.ram.close()

    def __enter__(self) -> DriverPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reclaim_tx(self) -> None:
        for gpa, _ in self.txq.ring.get_used():
            self._tx_free.append(gpa)

    def send(self, frame: bytes, hdr: bytes | None = None, *, kick: bool = True) -> None:
        """Queue one frame (header defaults to all zeroes) and kick."""
        data = (net_hdr() if hdr is None else hdr) + frame
        if len(data) > self.tx_buffer:
            raise ValueError(f"{len(data)}-byte frame does not fit {self.tx_buffer}-byte buffers")
        if not self._tx_free:
            self._reclaim_tx()
        if not self._tx_free:
            self.txq.wait_call(1.0)
            self._reclaim_tx()
        gpa = self._tx_free.pop()
        self.ram.view(gpa, len(data))[:] = data
        self.txq.ring.add([(gpa, len(data))], [], gpa)
        if kick and self.txq.ring.kick_needed():
            self.txq.kick()

    def receive(self, count: int = 1, timeout: float = 5.0) -> list[tuple[VirtioNetHdr, bytes]]:
        """Wait until ``count`` frames arrived (or ``timeout``); returns what came."""
        import time

        out: list[tuple[VirtioNetHdr, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            out.extend(self.poll())
            if len(out) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self.rxq.ring.enable_interrupts():
                self.rxq.wait_call(min(left, 0.2))
        return out

    def poll(self) -> list[tuple[VirtioNetHdr, bytes]]:
        """Frames received so far (buffers go back to the ring)."""
        out: list[tuple[VirtioNetHdr, bytes]] = []
        used = self.rxq.ring.get_used()
        for gpa, written in used:
            chunk = bytes(self.ram.view(gpa, written))
            self.rxq.ring.add([], [(gpa, self.rx_buffer)], gpa)
            if self._partial_left:
                self._partial.append(chunk)
                self._partial_left -= 1
            else:
                hdr = VirtioNetHdr.unpack(chunk)
                self._partial = [chunk]
                self._partial_left = (hdr.num_buffers - 1) if self.mergeable else 0
            if not self._partial_left:
                whole = b"".join(self._partial)
                out.append((VirtioNetHdr.unpack(whole), whole[HDR_SIZE:]))
                self._partial = []
        if used and self.rxq.ring.kick_needed():
            self.rxq.kick()
        return out
