"""The switch's compiled burst (``_forward_c.c``) against the reference (the Python
loop of ``Switch.forward_chains``).

Every scenario is built twice from scratch - ports with real split rings (the
compiled ``SplitQueue``) in their own guest memory, an FDB, frames and receive
buffers written by the driver side - and run once with the compiled burst and
once with it switched off. Both runs must leave byte-identical guest memory
(frames delivered, used rings, event indexes), the same counters, FDB entries
and FDB counters, the same ring states (failed, positions), the same
notifications, and raise the same exception if any.

The C code may only forward a burst it can forward exactly as Python would and
must leave everything else untouched; a guard test checks that it does forward
the common bursts itself, and that the hostile ones below reach it and are
handed back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.net_frames import BROADCAST, mac, net_hdr, udp4_frame
from tests.unit.test_split_compiled import compiled_class, compiler_present
from vvu_runtime.backends.switch import switch as switch_mod
from vvu_runtime.backends.switch.port import BASE_FEATURES, SwitchPort
from vvu_runtime.backends.switch.switch import MAX_FRAME_LEN, Switch
from vvu_runtime.vhost_user.transport import Notifier
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio.features import DescFlag, VirtioFeature
from vvu_runtime.virtio.memory import GuestMemory, memfd_region
from vvu_runtime.virtio.net import NetFeature
from vvu_runtime.virtio.queue import RingAddresses
from vvu_runtime.virtio.split import DESC, split_ring_layout

RING_PACKED = int(VirtioFeature.RING_PACKED)
SPLIT = BASE_FEATURES & ~RING_PACKED
NO_CSUM = SPLIT & ~NetFeature.CSUM.mask & ~NetFeature.GUEST_CSUM.mask
#: A legacy 10-byte header: neither VERSION_1 nor MRG_RXBUF.
LEGACY = SPLIT & ~int(VirtioFeature.VERSION_1) & ~NetFeature.MRG_RXBUF.mask
W = int(DescFlag.WRITE)
N = int(DescFlag.NEXT)

SIZE = 256  # ring entries
REGION = 1 << 20  # a port's memory, unless a scenario asks for more
RX_RING, TX_RING = 0x1000, 0x8000  # ring offsets in a port's memory
# Receive buffers from REGION/16, transmit buffers from 6/16, the oversize frame at
# half (0x1_0000, 0x6_0000, 0x8_0000 in 1 MiB); they scale with a bigger region.
HOLE = 0xF0_0000_0000  # mapped by nobody


def compiled_burst() -> Callable[..., object]:
    compiled_class()  # fails or skips as the ring's tests do
    fn = switch_mod._compiled_forward_burst
    if fn is None:
        if compiler_present():
            pytest.fail("a C compiler is here but the switch burst is not built: run ./setup "
                        "(a worktree: python -m vvu_runtime.virtio.accel build)", pytrace=False)
        pytest.skip("host capability missing: C compiler or Python headers")
    return fn


class Counting(Notifier):
    def __init__(self) -> None:
        self.count = 0

    def signal(self) -> None:
        self.count += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class Guest:
    """One port: its memory (own region), RX ring 0 and TX ring 1, and the driver side."""

    def __init__(self, sw: Switch, k: int, features: int, region: int = REGION) -> None:
        self.gpa = (k + 1) << 32
        self.mem = GuestMemory()
        self.region = region
        self.rx_bufs, self.tx_bufs, self.big = region // 16, 6 * region // 16, region // 2
        mapped, fd = memfd_region(region, guest_phys_addr=self.gpa,
                                  userspace_addr=0x7F00_0000_0000 + (k << 28))
        os.close(fd)
        # Recognisable bytes everywhere (a frame landing in the wrong place shows).
        mapped.view[:] = bytes((k * 37 + i) & 0xFF for i in range(256)) * (region // 256)
        self.mem.add(mapped)
        self.uva = 0x7F00_0000_0000 + (k << 28)
        self.port = SwitchPort(sw, f"p{k}", queue_size=SIZE)
        self.port.set_features(features)
        self.hs = self.port.hdr_size
        self.rings: dict[int, Vring] = {}
        self.avail_idx = {0: 0, 1: 0}
        self.calls = {0: Counting(), 1: Counting()}
        self.errs = {0: Counting(), 1: Counting()}
        self.next_rx_buf = self.rx_bufs
        self.next_tx_buf = self.tx_bufs
        self.next_desc = {0: 0, 1: 0}
        lay = split_ring_layout(SIZE)
        for index, off in ((0, RX_RING), (1, TX_RING)):
            base = self.gpa + off
            self.view(base, lay.total)[:] = bytes(lay.total)
            # The compiled ring in both runs, also under VVU_PURE_PYTHON=1: the
            # burst needs it, and test_split_compiled holds it to the Python ring.
            v = Vring(index, f"p{k}", queue_factory=compiled_class())
            v.size = SIZE
            v.addresses = RingAddresses(self.uva + off + lay.desc_offset,
                                        self.uva + off + lay.avail_offset,
                                        self.uva + off + lay.used_offset)
            v.kick_nofd = True
            v.enabled = True
            v.features = features
            v.call = self.calls[index]
            v.err = self.errs[index]
            v.start(self.mem)
            self.rings[index] = v
        self.port.queue_started(self.rings[0])
        self.port.queue_started(self.rings[1])

    def view(self, gpa: int, n: int) -> memoryview:
        return self.mem.translate(gpa, n)

    def desc(self, index: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        lay = split_ring_layout(SIZE)
        off = RX_RING if index == 0 else TX_RING
        DESC.pack_into(self.view(self.gpa + off + lay.desc_offset + 16 * i, 16), 0,
                       addr, length, flags, nxt)

    def publish(self, index: int, head: int) -> None:
        lay = split_ring_layout(SIZE)
        off = RX_RING if index == 0 else TX_RING
        avail = self.view(self.gpa + off + lay.avail_offset, 4 + 2 * SIZE).cast("H")
        idx = self.avail_idx[index]
        avail[2 + idx % SIZE] = head
        self.avail_idx[index] = (idx + 1) & 0xFFFF
        avail[1] = self.avail_idx[index]

    def alloc_desc(self, index: int) -> int:
        i = self.next_desc[index]
        self.next_desc[index] = (i + 1) % SIZE
        return i

    def add_rx(self, size: int, kind: str = "one") -> None:
        """A receive chain: ``one`` writable buffer, ``two`` (a chain), ``readable``
        (no writable buffer), ``hole`` (outside memory), ``ring`` (over this ring's
        own descriptor table)."""
        buf = self.gpa + self.next_rx_buf
        self.next_rx_buf += -(-size // 64) * 64
        if self.next_rx_buf > self.tx_bufs:
            self.next_rx_buf = self.rx_bufs
        i = self.alloc_desc(0)
        if kind == "two":
            j = self.alloc_desc(0)
            self.desc(0, i, buf, size // 2, W | N, j)
            self.desc(0, j, buf + size // 2, size - size // 2, W)
        elif kind == "readable":
            self.desc(0, i, buf, size, 0)
        elif kind == "hole":
            self.desc(0, i, HOLE, size, W)
        elif kind == "ring":
            self.desc(0, i, self.gpa + RX_RING, size, W)
        else:
            self.desc(0, i, buf, size, W)
        self.publish(0, i)

    def send(self, data: bytes, kind: str = "one") -> None:
        """A transmit chain: ``one`` readable buffer, ``split`` (header in its own
        descriptor), ``writable``, ``hole``, ``head`` (avail names a head past the
        ring), ``empty`` (length 0), ``oversize`` (MAX_FRAME_LEN + 1 bytes)."""
        if kind == "head":
            self.publish(1, SIZE + 3)
            return
        if kind == "oversize":
            buf, n = self.gpa + self.big, MAX_FRAME_LEN + 1
            self.view(buf, len(data))[:] = data
        else:
            buf, n = self.gpa + self.next_tx_buf, len(data)
            self.next_tx_buf += -(-max(n, 1) // 64) * 64
            if self.next_tx_buf + 4096 > self.big:
                self.next_tx_buf = self.tx_bufs
            self.view(buf, n)[:] = data
        i = self.alloc_desc(1)
        if kind == "split":
            j = self.alloc_desc(1)
            self.desc(1, i, buf, self.hs, N, j)
            self.desc(1, j, buf + self.hs, n - self.hs, 0)
        elif kind == "writable":
            self.desc(1, i, buf, n, W)
        elif kind == "hole":
            self.desc(1, i, HOLE, n, 0)
        elif kind == "empty":
            self.desc(1, i, buf, 0, 0)
        else:
            self.desc(1, i, buf, n, 0)
        self.publish(1, i)


@dataclass
class Scenario:
    """What a test sets up; built twice, identically."""

    features: list[int] = field(default_factory=lambda: [SPLIT, SPLIT, SPLIT])
    #: (mac number, port index, seen) learned before the run
    fdb: list[tuple[int, int, float]] = field(default_factory=list)
    #: per port: (size, kind) of receive chains
    rx: list[list[tuple[int, str]]] = field(default_factory=list)
    #: rounds of (sender, header, frame, kind); the clock value per round
    rounds: list[tuple[float, list[tuple[int, bytes, bytes, str]]]] = field(default_factory=list)
    ageing: float = 300.0
    max_per_port: int = 4096
    region: int = REGION  # each port's memory


@dataclass
class World:
    sw: Switch
    clock: Clock
    guests: list[Guest]
    bursts: list[str]  # what the compiled burst answered, per call (forwarded/empty/deferred)


def build(sc: Scenario, compiled: bool) -> World:
    clock = Clock()
    sw = Switch(ageing_time=sc.ageing, max_fdb_per_port=sc.max_per_port, clock=clock)
    guests = [Guest(sw, k, f, sc.region) for k, f in enumerate(sc.features)]
    for n, k, seen in sc.fdb:
        sw.fdb.learn(mac(n), guests[k].port, seen)
    for g, chains in zip(guests, sc.rx, strict=False):
        for size, kind in chains:
            g.add_rx(size, kind)
    bursts: list[str] = []
    if compiled:
        real = compiled_burst()

        def spy(*args: object) -> object:
            res = real(*args)
            bursts.append("deferred" if type(res) is not tuple else
                          "forwarded" if res[0] else "empty")
            return res

        sw._forward_burst = spy  # type: ignore[assignment]
    else:
        sw._forward_burst = None
    return World(sw, clock, guests, bursts)


def run(sc: Scenario, compiled: bool) -> tuple[World, dict[str, object]]:
    w = build(sc, compiled)
    error = None
    try:
        for now, frames in sc.rounds:
            w.clock.now = now
            senders = []
            for k, hdr, frame, kind in frames:
                w.guests[k].send(hdr + frame, kind)
                if k not in senders:
                    senders.append(k)
            for k in senders:
                w.guests[k].port.process(w.guests[k].rings[1])
    except Exception as exc:  # compared between the runs, not hidden
        error = f"{type(exc).__name__}: {exc}"
    return w, snapshot(w, error)


def snapshot(w: World, error: str | None) -> dict[str, object]:
    out: dict[str, object] = {"error": error, "clock reads": w.clock.reads}
    for g in w.guests:
        q = g.port.rx_queues[0] if g.port.rx_queues else None
        rings = {}
        for index, v in g.rings.items():
            queue = v.queue
            rings[index] = (v.failed, v.started, v.base, g.calls[index].count,
                            g.errs[index].count,
                            None if queue is None else (queue.get_base(),
                                                        queue.used_idx))  # type: ignore[attr-defined]
        out[g.port.port_name] = {
            "memory": bytes(g.mem.translate(g.gpa, g.region)),
            "counters": asdict(g.port.counters),
            "rings": rings,
            "rxq": None if q is None else ([c.head for c in q.reserve],
                                           [(c.head, n) for c, n in q.pending], q.broken),
        }
    out["fdb"] = sorted((m, e.port.port_name, e.seen) for m, e in w.sw.fdb)
    out["fdb counters"] = asdict(w.sw.fdb.counters)
    return out


def same(sc: Scenario) -> list[str]:
    """Run ``sc`` both ways, demand identical results; what the compiled burst said."""
    wc, got = run(sc, compiled=True)
    _, want = run(sc, compiled=False)
    for key in want:
        assert got[key] == want[key], key
    return wc.bursts


# -- scenarios ------------------------------------------------------------------------------

def frame(dst: int, src: int, size: int = 64) -> bytes:
    """A UDP frame of ``size`` bytes (a runt below 42); MAC -1 is the broadcast address."""
    if size < 42:
        return bytes([2] * size)
    return udp4_frame(mac(dst) if dst >= 0 else BROADCAST,
                      mac(src) if src >= 0 else BROADCAST, bytes(size - 42))


def plain(n: int, dst: int = 11, src: int = 10, sender: int = 0, kind: str = "one",
          hdr: bytes | None = None) -> list[tuple[int, bytes, bytes, str]]:
    return [(sender, net_hdr() if hdr is None else hdr, frame(dst, src, 60 + i % 40), kind)
            for i in range(n)]


def learned(**kw: object) -> Scenario:
    """p0 (MAC 10) sends; MAC 11 lives on p1, 12 on p2; receive buffers everywhere."""
    sc = Scenario(fdb=[(10, 0, 999.0), (11, 1, 999.0), (12, 2, 999.0)],
                  rx=[[(2048, "one")] * 200 for _ in range(3)])
    for k, v in kw.items():
        setattr(sc, k, v)
    return sc


def test_plain_unicast_is_forwarded_by_the_compiled_burst() -> None:
    sc = learned(rounds=[(1000.0, plain(150) + plain(20, dst=12))])
    bursts = same(sc)
    assert bursts.count("forwarded") >= 3  # 170 frames: three bursts, then the empty pop
    w, _ = run(sc, compiled=True)
    assert w.guests[1].port.counters.out_packets == 150
    assert w.guests[2].port.counters.out_packets == 20


def test_two_destinations_in_one_burst() -> None:
    frames = [f for i in range(40) for f in plain(1, dst=11 + i % 2)]
    assert "forwarded" in same(learned(rounds=[(1000.0, frames)]))


def test_needs_csum_to_a_receiver_that_accepts_it() -> None:
    hdr = net_hdr(1, 0, 0, 0, 34, 6)
    assert "forwarded" in same(learned(rounds=[(1000.0, plain(30, hdr=hdr))]))


#: (name, scenario): hostile and unusual inputs; each must come out as in Python.
HOSTILE: list[tuple[str, Scenario]] = [
    ("runts", learned(rounds=[(1000.0, [*plain(5), (0, net_hdr(), b"\x02" * 5, "one"),
                                        *plain(5)])])),
    ("empty descriptor", learned(rounds=[(1000.0, plain(5) + plain(1, kind="empty"))])),
    ("oversize", learned(rounds=[(1000.0, plain(3) + plain(1, kind="oversize") + plain(3))])),
    ("bad source", learned(rounds=[(1000.0, plain(3) + plain(2, src=-1) + plain(3))])),
    ("zero source", learned(rounds=[(1000.0, [*plain(2), (0, net_hdr(), mac(11) + bytes(56),
                                                          "one"), *plain(2)])])),
    ("hairpin", learned(rounds=[(1000.0, plain(3) + plain(3, dst=10) + plain(3))])),
    ("broadcast", learned(rounds=[(1000.0, plain(3) + plain(1, dst=-1) + plain(3))])),
    ("unknown destination", learned(rounds=[(1000.0, plain(3, dst=99) + plain(3))])),
    ("aged destination", learned(rounds=[(1300.5, plain(4))])),
    ("source to learn", learned(rounds=[(1000.0, plain(4, src=20) + plain(4))])),
    ("source moves", learned(rounds=[(1000.0, plain(4, src=12))])),
    ("source table full", learned(max_per_port=1, rounds=[(1000.0, plain(3, src=21))])),
    ("split header", learned(rounds=[(1000.0, plain(3) + plain(2, kind="split") + plain(3))])),
    ("writable tx buffer", learned(rounds=[(1000.0, plain(3) + plain(1, kind="writable"))])),
    ("tx buffer outside memory", learned(rounds=[(1000.0, plain(3) + plain(1, kind="hole")
                                                  + plain(3))])),
    ("tx head past the ring", learned(rounds=[(1000.0, plain(3) + plain(1, kind="head"))])),
    ("gso", learned(rounds=[(1000.0, plain(2) + plain(2, hdr=net_hdr(1, 1, 54, 1448, 34, 16)))])),
    ("data_valid from a guest", learned(rounds=[(1000.0, plain(3, hdr=net_hdr(2)))])),
    ("needs_csum not negotiated", learned(features=[NO_CSUM, SPLIT, SPLIT],
                                          rounds=[(1000.0, plain(3, hdr=net_hdr(1, 0, 0, 0,
                                                                               34, 6)))])),
    ("needs_csum to a receiver without it", learned(
        features=[SPLIT, NO_CSUM, SPLIT], rounds=[(1000.0, plain(3, hdr=net_hdr(1, 0, 0, 0,
                                                                               34, 6)))])),
    ("legacy header at the receiver", learned(features=[SPLIT, LEGACY, SPLIT],
                                              rounds=[(1000.0, plain(5))])),
    ("rx ring runs dry", Scenario(fdb=[(10, 0, 999.0), (11, 1, 999.0)],
                                  rx=[[], [(2048, "one")] * 7, []],
                                  rounds=[(1000.0, plain(20))])),
    ("rx ring empty", Scenario(fdb=[(10, 0, 999.0), (11, 1, 999.0)],
                               rounds=[(1000.0, plain(10))])),
    ("rx buffer too small (merge)", Scenario(
        fdb=[(10, 0, 999.0), (11, 1, 999.0)],
        rx=[[], [(2048, "one")] * 3 + [(40, "one")] * 6 + [(2048, "one")] * 5, []],
        rounds=[(1000.0, plain(8))])),
    ("rx buffer exactly the frame", Scenario(fdb=[(10, 0, 999.0), (11, 1, 999.0)],
                                             rx=[[], [(72, "one")] * 3, []],
                                             rounds=[(1000.0, plain(1))])),
    ("rx buffer one byte short", Scenario(fdb=[(10, 0, 999.0), (11, 1, 999.0)],
                                          rx=[[], [(71, "one")] * 3, []],
                                          rounds=[(1000.0, plain(1))])),
    ("rx chain of two buffers", Scenario(
        fdb=[(10, 0, 999.0), (11, 1, 999.0)],
        rx=[[], [(2048, "one")] * 2 + [(2048, "two")] + [(2048, "one")] * 5, []],
        rounds=[(1000.0, plain(6))])),
    ("rx chain without writable buffer", Scenario(
        fdb=[(10, 0, 999.0), (11, 1, 999.0)],
        rx=[[], [(2048, "one")] * 2 + [(2048, "readable")] + [(2048, "one")] * 5, []],
        rounds=[(1000.0, plain(6))])),
    ("rx buffer outside memory", Scenario(
        fdb=[(10, 0, 999.0), (11, 1, 999.0)],
        rx=[[], [(2048, "one")] * 2 + [(2048, "hole")] + [(2048, "one")] * 5, []],
        rounds=[(1000.0, plain(6))])),
    ("rx buffer outside memory first", Scenario(
        fdb=[(10, 0, 999.0), (11, 1, 999.0)],
        rx=[[], [(2048, "hole")] + [(2048, "one")] * 5, []], rounds=[(1000.0, plain(6))])),
]


@pytest.mark.parametrize("name,sc", HOSTILE, ids=[n for n, _ in HOSTILE])
def test_hostile_and_unusual_bursts_match_python(name: str, sc: Scenario) -> None:
    bursts = same(sc)
    # The burst with the odd frame reached the C code and was handed back (or, for
    # the counted drops, forwarded there).
    assert bursts, name


def test_odd_bursts_are_handed_back_and_clean_ones_forwarded() -> None:
    """The guard: C forwards the drops it can count and the chains it can walk, and
    defers the rest."""
    assert same(learned(rounds=[(1000.0, plain(3) + plain(2, dst=10))]))[0] == "forwarded"
    assert same(learned(rounds=[(1000.0, plain(3) + plain(1, kind="split"))]))[0] == "forwarded"
    assert same(learned(rounds=[(1000.0, plain(3) + plain(1, kind="writable"))]))[0] == \
        "deferred"
    assert same(learned(rounds=[(1000.0, plain(3, dst=99))]))[0] == "deferred"


def test_rx_buffer_over_a_ring_is_deferred() -> None:
    """A receive buffer over the receiver's own descriptor table: the frame copies
    overwrite descriptors, so the order of the writes is Python's to decide."""
    sc = Scenario(fdb=[(10, 0, 999.0), (11, 1, 999.0)],
                  rx=[[], [(2048, "one")] * 2 + [(2048, "ring")] + [(2048, "one")] * 5, []],
                  rounds=[(1000.0, plain(6)), (1000.0, plain(6))])
    assert same(sc)[0] == "deferred"


def test_descriptors_rewritten_between_rounds() -> None:
    sc = learned(rounds=[(1000.0, plain(70)), (1001.0, plain(70, dst=12)),
                         (1400.0, plain(5)), (1400.0, plain(5, src=12))])
    assert same(sc).count("forwarded") >= 2


def test_dirty_logging_goes_to_python() -> None:
    sc = learned(rounds=[(1000.0, plain(5))])
    w = build(sc, compiled=True)
    w.guests[1].rings[0].queue.log_all = True  # type: ignore[union-attr]
    for k, hdr, fr, kind in sc.rounds[0][1]:
        w.guests[k].send(hdr + fr, kind)
    w.guests[0].port.process(w.guests[0].rings[1])
    assert w.bursts[0] == "deferred"
    assert w.guests[1].port.counters.out_packets == 5


FRAME_KINDS = ["one", "one", "one", "one", "split", "writable", "hole", "head", "empty"]
RX_KINDS = ["one", "one", "one", "two", "readable", "hole", "ring"]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    macs = st.sampled_from([10, 11, 12, 13, 20, -1])
    fdb = draw(st.lists(st.tuples(st.sampled_from([10, 11, 12, 13]), st.integers(0, 2),
                                  st.sampled_from([999.0, 600.0, 1000.0])),
                        max_size=5, unique_by=lambda t: t[0]))
    rx = [draw(st.lists(st.tuples(st.sampled_from([2048, 2048, 100, 60]),
                                  st.sampled_from(RX_KINDS)), max_size=40)) for _ in range(3)]
    hdrs = st.sampled_from([net_hdr(), net_hdr(), net_hdr(1, 0, 0, 0, 34, 6), net_hdr(2)])
    frames = st.lists(st.tuples(st.integers(0, 1), hdrs, macs, macs,
                                st.sampled_from([10, 60, 64, 200, 1500]),
                                st.sampled_from(FRAME_KINDS)), max_size=90)
    rounds = []
    for now in draw(st.lists(st.sampled_from([1000.0, 1001.0, 1300.5]), min_size=1,
                             max_size=3)):
        rounds.append((now, [(s, h, frame(d, src, size), kind)
                             for s, h, d, src, size, kind in draw(frames)]))
    features = [draw(st.sampled_from([SPLIT, SPLIT, NO_CSUM, LEGACY])) for _ in range(3)]
    return Scenario(features=features, fdb=fdb, rx=rx, rounds=rounds)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_arbitrary_bursts_match_python(sc: Scenario) -> None:
    same(sc)


def test_pure_python_switch_turns_the_burst_off(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled_burst()
    monkeypatch.setenv("VVU_PURE_PYTHON", "1")
    assert Switch()._forward_burst is None
    monkeypatch.delenv("VVU_PURE_PYTHON")
    assert Switch()._forward_burst is switch_mod._compiled_forward_burst
