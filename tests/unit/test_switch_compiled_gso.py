"""The compiled burst (``_forward_c.c``) with offloads and merged receive buffers,
against the reference (the Python loop of ``Switch.forward_chains``).

Same method as ``test_switch_compiled.py`` (whose ports, rings and comparison
this reuses): every scenario is built twice from scratch and run with and
without the compiled burst; guest memory, counters, FDB, ring states,
notifications, clock reads and exceptions must come out identical. Here the
frames carry NEEDS_CSUM and GSO types (TSO, USO, UFO, ECN, unknown ones), are up
to 64 KiB, come in one buffer or in chains of several descriptors, direct or
through an indirect table (as Linux sends a TSO frame: header, headers, page
fragments), well-formed or broken (loops, bad links, bad tables, writable
buffers, addresses outside memory); and receivers take them whole, merged over
several RX chains
(MRG_RXBUF, ``num_buffers``), or not at all (offloads to do in software, no
MRG_RXBUF, rings that run dry in the middle of a frame, broken chains among the
ones a merge would take). Receive chains can also be published between rounds,
so that a merge reaches the ring's shadow index and refreshes there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.net_frames import (
    BROADCAST,
    mac,
    net_hdr,
    tcp4_frame,
    tcp6_frame,
    udp4_frame,
    with_partial_csum,
)
from tests.unit.test_switch_compiled import (
    HOLE,
    SPLIT,
    Guest,
    Scenario,
    World,
    build,
    snapshot,
)
from vvu_runtime.backends.switch.switch import Drop
from vvu_runtime.virtio.features import DescFlag, VirtioFeature
from vvu_runtime.virtio.net import GsoType, HdrFlags, NetFeature
from vvu_runtime.virtio.split import DESC

NEEDS_CSUM = int(HdrFlags.NEEDS_CSUM)
ECN = 0x80
TCPV4, TCPV6, UDP, UDP_L4 = (int(GsoType.TCPV4), int(GsoType.TCPV6), int(GsoType.UDP),
                             int(GsoType.UDP_L4))
MB = 1 << 20
#: A receiver without TSO (the switch segments for it in software).
NO_GUEST_TSO = SPLIT & ~NetFeature.GUEST_TSO4.mask & ~NetFeature.GUEST_TSO6.mask
#: A receiver without mergeable buffers (a 12-byte header all the same: VERSION_1).
NO_MRG = SPLIT & ~NetFeature.MRG_RXBUF.mask
#: A sender that did not negotiate TSO.
NO_HOST_TSO = SPLIT & ~NetFeature.HOST_TSO4.mask & ~NetFeature.HOST_TSO6.mask
NO_ECN = SPLIT & ~NetFeature.GUEST_ECN.mask & ~NetFeature.HOST_ECN.mask
NO_USO6 = SPLIT & ~NetFeature.GUEST_USO6.mask
NO_INDIRECT = SPLIT & ~int(VirtioFeature.INDIRECT_DESC)
LEGACY = SPLIT & ~int(VirtioFeature.VERSION_1) & ~NetFeature.MRG_RXBUF.mask
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)

#: A round: the clock, the frames (sender, header, frame, kind), and receive chains
#: (port, size, kind) the driver publishes before them.
Round = tuple[float, list[tuple[int, bytes, bytes, str]], list[tuple[int, int, str]]]


@dataclass
class GsoScenario:
    """A :class:`Scenario` plus receive chains published between rounds."""

    base: Scenario
    rounds: list[Round] = field(default_factory=list)


def _cuts(n: int, shape: str, hs: int) -> list[int]:
    """Lengths of the pieces a frame of ``n`` bytes is sent in."""
    if shape == "tiny":  # the header and the Ethernet header over pieces of 1-5 bytes
        cuts = [1, 3, 5, 2, 4, 1, 5, 3]
    elif shape == "frags":  # virtio header | L2-L4 headers | 4 KiB page fragments
        cuts = [hs, 54] + [4096] * 64
    elif shape == "three":
        cuts = [hs, 54]
    else:  # "two"
        cuts = [hs]
    out, left = [], n
    for c in cuts:
        if left <= c:
            break
        out.append(c)
        left -= c
    return [*out, left]


def send_pieces(g: Guest, data: bytes, kind: str) -> None:
    """A transmit chain of several readable descriptors: ``chain-SHAPE`` (in the ring)
    or ``ind-SHAPE`` (an indirect table), SHAPE one of two/three/frags/tiny, with an
    optional ``+FAULT``: zero (an empty descriptor in the middle), empty (an empty
    last one: one readable buffer left), writable, hole (a buffer outside memory),
    loop, link (the first descriptor's next is past the table), and for tables
    nested, next (INDIRECT|NEXT), badlen, tablehole (the table outside memory)."""
    how, _, fault = kind.partition("+")
    where, shape = how.split("-")
    buf = g.gpa + g.next_tx_buf
    g.view(buf, len(data))[:] = data
    pieces, off = [], 0
    for c in _cuts(len(data), shape, g.hs):
        pieces.append([buf + off, c, 0])
        off += c
    table_at = buf + -(-len(data) // 16) * 16
    g.next_tx_buf += -(-(len(data) + 16 * (len(pieces) + 8)) // 64) * 64
    if g.next_tx_buf + 70 * 1024 > g.big:
        g.next_tx_buf = g.tx_bufs
    if fault == "zero":
        pieces.insert(1, [buf, 0, 0])
    elif fault == "empty":
        pieces = [[buf, len(data), 0], [buf, 0, 0]]
    elif fault == "writable":
        pieces[-1][2] = WRITE
    elif fault == "hole":
        pieces[-1][0] = HOLE
    # Ring descriptors for a chain; a table's own indexes for an indirect one.
    idx = [g.alloc_desc(1) for _ in pieces] if where == "chain" else list(range(len(pieces)))
    descs = []
    for k, (addr, length, flags) in enumerate(pieces):
        last = k == len(pieces) - 1
        nxt = idx[0] if last and fault == "loop" else idx[k + 1] if not last else 0
        if fault == "link" and k == 0:
            # Past the table from the first descriptor: the rest is never reached.
            nxt = (1 << 15) if where == "chain" else len(pieces) + 3
        link = not last or fault == "loop"
        descs.append((idx[k], addr, length, flags | (NEXT if link else 0), nxt))
    if where == "chain":
        for i, addr, length, flags, nxt in descs:
            g.desc(1, i, addr, length, flags, nxt)
        g.publish(1, idx[0])
        return
    # Room for the table, a nested one and the entry a bad link names: the ones a
    # walk must not follow hold well-formed descriptors, so following them shows.
    room = g.view(table_at, 16 * (len(descs) + 5))
    room[:] = bytes(len(room))
    if fault == "nested":
        i, addr, length, flags, nxt = descs[-1]
        nested = table_at + 16 * (len(descs) + 4)
        DESC.pack_into(room, 16 * (len(descs) + 4), addr, length, flags & ~NEXT, 0)
        descs[-1] = (i, nested, 16, INDIRECT, 0)
    for i, addr, length, flags, nxt in descs:
        DESC.pack_into(room, 16 * i, addr, length, flags, nxt)
    head = g.alloc_desc(1)
    length = 16 * len(descs) + (3 if fault == "badlen" else 0)
    g.desc(1, head, HOLE if fault == "tablehole" else table_at, length,
           INDIRECT | (NEXT if fault == "next" else 0), 0)
    g.publish(1, head)


def send(g: Guest, data: bytes, kind: str) -> None:
    if kind.startswith(("chain-", "ind-")):
        send_pieces(g, data, kind)
    else:
        g.send(data, kind)


def run(sc: GsoScenario, compiled: bool) -> tuple[World, dict[str, object]]:
    w = build(sc.base, compiled)
    error = None
    try:
        for now, frames, rx in sc.rounds:
            w.clock.now = now
            for k, size, kind in rx:
                w.guests[k].add_rx(size, kind)
            senders: list[int] = []
            for k, hdr, frame, kind in frames:
                send(w.guests[k], hdr + frame, kind)
                if k not in senders:
                    senders.append(k)
            for k in senders:
                w.guests[k].port.process(w.guests[k].rings[1])
    except Exception as exc:  # compared between the runs, not hidden
        error = f"{type(exc).__name__}: {exc}"
    return w, snapshot(w, error)


def same(sc: GsoScenario) -> list[str]:
    """Run ``sc`` both ways, demand identical results; what the compiled burst said."""
    wc, got = run(sc, compiled=True)
    _, want = run(sc, compiled=False)
    for key in want:
        assert got[key] == want[key], key
    return wc.bursts


# -- frames -------------------------------------------------------------------------------

def payload(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def tso4(size: int, dst: int = 11, src: int = 10) -> tuple[bytes, bytes]:
    """A TCP/IPv4 super-frame of ``size`` bytes as a TSO guest sends it."""
    frame, start, off = with_partial_csum(tcp4_frame(mac(dst), mac(src), payload(size - 54)))
    return net_hdr(NEEDS_CSUM, TCPV4, 54, 1448, start, off), frame


def tso6(size: int, dst: int = 11, src: int = 10) -> tuple[bytes, bytes]:
    frame, start, off = with_partial_csum(tcp6_frame(mac(dst), mac(src), payload(size - 74)))
    return net_hdr(NEEDS_CSUM, TCPV6, 74, 1428, start, off), frame


def uso4(size: int, dst: int = 11, src: int = 10, gso: int = UDP_L4) -> tuple[bytes, bytes]:
    frame, start, off = with_partial_csum(udp4_frame(mac(dst), mac(src), payload(size - 42)))
    return net_hdr(NEEDS_CSUM, gso, 42, 1400, start, off), frame


def sends(frames: list[tuple[bytes, bytes]], sender: int = 0,
          kind: str = "one") -> list[tuple[int, bytes, bytes, str]]:
    return [(sender, h, f, kind) for h, f in frames]


def learned(features: list[int] | None = None, rx: list[list[tuple[int, str]]] | None = None,
            region: int = 8 * MB) -> Scenario:
    """p0 (MAC 10) sends; MAC 11 lives on p1, 12 on p2."""
    return Scenario(features=features or [SPLIT, SPLIT, SPLIT],
                    fdb=[(10, 0, 999.0), (11, 1, 999.0), (12, 2, 999.0)],
                    rx=rx if rx is not None else [[], [(70 * 1024, "one")] * 30, []],
                    region=region)


def one_round(base: Scenario, frames: list[tuple[int, bytes, bytes, str]]) -> GsoScenario:
    return GsoScenario(base, [(1000.0, frames, [])])


# -- the cases the compiled burst forwards ------------------------------------------------

def test_tso_frames_in_one_buffer_are_forwarded_by_the_compiled_burst() -> None:
    sc = one_round(learned(), sends([tso4(65535)] * 6 + [tso4(9000)] * 6))
    assert same(sc)[0] == "forwarded"
    w, _ = run(sc, compiled=True)
    c = w.guests[1].port.counters
    assert (c.out_packets, w.guests[0].port.counters.in_gso, c.segmented) == (12, 12, 0)


def test_tso_frames_merged_over_4k_buffers() -> None:
    """17 chains for a 64 KiB frame: num_buffers, the chain order of deliver_batch
    (pop_many for the burst first, then each frame's further chains) and the
    written lengths must be Python's."""
    sc = one_round(learned(rx=[[], [(4096, "one")] * 240, []]),
                   sends([tso4(65535)] * 5 + [tso4(3000)] * 3 + [tso4(20000)] * 4))
    assert same(sc)[0] == "forwarded"


def test_merges_over_uneven_buffers_and_tiny_ones() -> None:
    sizes = [(4096, "one"), (100, "one"), (7, "one"), (1, "one"), (12, "one"), (9000, "one"),
             (1500, "one")] * 30
    sc = one_round(learned(rx=[[], sizes, []]),
                   sends([tso4(30000), tso4(65535), tso4(200), tso4(12000)]))
    assert same(sc)[0] == "forwarded"


def test_plain_tso_and_merged_frames_to_two_receivers_in_one_burst() -> None:
    frames = []
    for i in range(30):
        frames += sends([tso4(8000 + 297 * i, dst=11 + i % 2)])
        frames += [(0, net_hdr(), udp4_frame(mac(11 + (i + 1) % 2), mac(10), bytes(22)), "one")]
    sc = one_round(learned(rx=[[], [(2048, "one")] * 250, [(4096, "one")] * 250]), frames)
    assert "forwarded" in same(sc)


def test_tso6_uso_and_gso_without_needs_csum() -> None:
    _, f = tso4(30000)
    no_csum = net_hdr(0, TCPV4, 54, 1448, 0, 0)
    frames = [*sends([tso6(40000), uso4(30000), tso6(1000)]), (0, no_csum, f, "one")]
    sc = one_round(learned(rx=[[], [(4096, "one")] * 200, []]), frames)
    assert same(sc)[0] == "forwarded"


def test_ecn_passed_to_a_receiver_with_ecn() -> None:
    h, f = tso4(20000)
    ecn = bytes([h[0], h[1] | ECN]) + h[2:]
    assert same(one_round(learned(), sends([(ecn, f)] * 3)))[0] == "forwarded"


def test_merge_refreshes_at_the_shadow_index() -> None:
    """Round 1 leaves the receiver's shadow index just past a few chains; round 2's
    chains are published after it, so a merge must re-read avail idx where
    Python's pop() would (and EVENT_IDX's avail_event comes out the same)."""
    sc = GsoScenario(learned(rx=[[], [(4096, "one")] * 20, []]), [
        (1000.0, sends([tso4(30000)]), []),
        (1000.0, sends([tso4(4000), tso4(60000), tso4(30000)]), [(1, 4096, "one")] * 60),
        (1000.0, sends([tso4(60000)] * 2), [(1, 4096, "one")] * 10),
        (1000.0, sends([tso4(60000)] * 2), [(1, 4096, "one")] * 40),
    ])
    assert same(sc).count("forwarded") >= 2


SHAPES = ["chain-two", "chain-three", "chain-frags", "chain-tiny", "ind-two", "ind-three",
          "ind-frags", "ind-tiny"]


def test_tso_frames_over_several_descriptors_are_forwarded_by_the_compiled_burst() -> None:
    """Linux's way: header, headers and page fragments, in the ring or an indirect
    table; each frame delivered alone between the batches, as the Python loop does."""
    frames = []
    for i, shape in enumerate(SHAPES * 2):
        frames += sends([tso4(9000 + 3500 * i, dst=11 + i % 2)], kind=shape)
        frames += [(0, net_hdr(), udp4_frame(mac(11 + i % 2), mac(10), bytes(30)), "one")]
    sc = one_round(learned(rx=[[], [(4096, "one")] * 250, [(70 * 1024, "one")] * 30]), frames)
    assert same(sc)[0] == "forwarded"
    w, _ = run(sc, compiled=True)
    assert w.guests[1].port.counters.out_packets + w.guests[2].port.counters.out_packets == 32


def test_several_descriptors_with_a_legacy_header() -> None:
    sc = one_round(learned(features=[LEGACY, LEGACY, SPLIT], rx=[[], [(70 * 1024, "one")] * 20,
                                                                  []]),
                   [(0, net_hdr(size=10), tso4(9000)[1], shape) for shape in SHAPES])
    assert same(sc)[0] == "forwarded"


def test_several_descriptors_when_the_receive_ring_runs_dry() -> None:
    """Frames delivered alone pop one chain each, refreshing where Python's pop()
    does (EVENT_IDX's avail_event included); the ones without a chain are
    rx_ring_full, batched or not."""
    frames = []
    for shape in SHAPES:
        frames += sends([tso4(3000)], kind=shape) + sends([tso4(3000)] * 2)
    for chains in (0, 1, 3, 7, 12):
        sc = GsoScenario(learned(rx=[[], [(9000, "one")] * chains, []]),
                         [(1000.0, frames, []), (1000.0, frames[:6], [(1, 9000, "one")] * 4)])
        assert same(sc)[0] == "forwarded", chains


def test_one_readable_buffer_among_empty_ones_is_a_single_frame() -> None:
    sc = one_round(learned(), sends([tso4(9000)] * 3, kind="chain-two+empty")
                   + sends([tso4(9000)] * 3, kind="ind-two+empty"))
    assert same(sc)[0] == "forwarded"


# -- hostile and unusual: handed back to Python, results identical ------------------------

def _rx(*chains: tuple[int, str], n: int = 1) -> Scenario:
    return learned(rx=[[], list(chains) * n, []])


HOSTILE: list[tuple[str, GsoScenario]] = [
    ("receiver without tso: segmented in software",
     one_round(learned(features=[SPLIT, NO_GUEST_TSO, SPLIT]), sends([tso4(20000)] * 3))),
    ("receiver without guest csum: completed in software",
     one_round(learned(features=[SPLIT, SPLIT & ~NetFeature.GUEST_CSUM.mask, SPLIT]),
               sends([uso4(300, gso=0)] * 3))),
    ("sender without host tso", one_round(learned(features=[NO_HOST_TSO, SPLIT, SPLIT]),
                                          sends([tso4(20000)] * 3))),
    ("ecn to a receiver without ecn", one_round(
        learned(features=[SPLIT, NO_ECN, SPLIT]),
        sends([(bytes([NEEDS_CSUM, TCPV4 | ECN]) + tso4(9000)[0][2:], tso4(9000)[1])] * 2))),
    ("ecn from a sender without ecn", one_round(
        learned(features=[NO_ECN, SPLIT, SPLIT]),
        sends([(bytes([NEEDS_CSUM, TCPV4 | ECN]) + tso4(9000)[0][2:], tso4(9000)[1])] * 2))),
    ("uso to a receiver with uso4 only", one_round(learned(features=[SPLIT, NO_USO6, SPLIT]),
                                                   sends([uso4(9000)] * 3))),
    ("ufo", one_round(learned(), sends([uso4(9000, gso=UDP)] * 3))),
    ("unknown gso type", one_round(learned(), sends([(bytes([1, 0x7E]) + tso4(9000)[0][2:],
                                                      tso4(9000)[1])] * 2))),
    ("gso with data_valid", one_round(learned(), sends([(bytes([2, TCPV4]) + tso4(9000)[0][2:],
                                                         tso4(9000)[1])] * 2))),
    ("gso with needs_csum and data_valid", one_round(
        learned(), sends([(bytes([3, TCPV4]) + tso4(9000)[0][2:], tso4(9000)[1])] * 2))),
    ("gso type on a malformed frame", one_round(
        learned(features=[SPLIT, NO_GUEST_TSO, SPLIT]),
        sends([(tso4(9000)[0], tso4(9000)[1][:20] + bytes(200))] * 2))),
    ("gso frame oversize", one_round(learned(), sends([tso4(9000)], kind="oversize"))),
    ("gso frame, split header", one_round(learned(), sends([tso4(9000)] * 2, kind="split"))),
    ("tso buffer one byte short, no merge",
     one_round(learned(features=[SPLIT, NO_MRG, SPLIT], rx=[[], [(9011, "one")] * 4, []]),
               sends([tso4(9000)] * 2))),
    ("tso buffer exactly the frame, no merge",
     one_round(learned(features=[SPLIT, NO_MRG, SPLIT], rx=[[], [(9012, "one")] * 4, []]),
               sends([tso4(9000)] * 2))),
    ("merge runs the ring dry", one_round(_rx((4096, "one"), n=20),
                                          sends([tso4(65535)] * 2))),
    ("merge runs the ring dry on the last chain", one_round(_rx((4096, "one"), n=17 + 16),
                                                           sends([tso4(65535)] * 2))),
    ("ring dry before the merge", one_round(_rx((4096, "one"), n=3), sends([tso4(65535)] * 5))),
    ("merge meets a zero-length buffer", one_round(
        learned(rx=[[], [(4096, "one")] * 5 + [(0, "one")] + [(4096, "one")] * 40, []]),
        sends([tso4(65535)]))),
    ("first buffer of a merge is empty", one_round(
        learned(rx=[[], [(0, "one")] + [(4096, "one")] * 40, []]), sends([tso4(30000)]))),
    ("merge meets a chain of two", one_round(
        learned(rx=[[], [(4096, "one")] * 5 + [(4096, "two")] + [(4096, "one")] * 40, []]),
        sends([tso4(65535)]))),
    ("merge meets a readable chain", one_round(
        learned(rx=[[], [(4096, "one")] * 5 + [(4096, "readable")] + [(4096, "one")] * 40, []]),
        sends([tso4(65535)]))),
    ("merge meets a buffer outside memory", one_round(
        learned(rx=[[], [(4096, "one")] * 5 + [(4096, "hole")] + [(4096, "one")] * 40, []]),
        sends([tso4(65535)]))),
    ("merge meets a buffer over the ring", one_round(
        learned(rx=[[], [(4096, "one")] * 5 + [(64, "ring")] + [(4096, "one")] * 40, []]),
        sends([tso4(65535)]))),
    ("merge to a receiver without mrg_rxbuf", one_round(
        learned(features=[SPLIT, NO_MRG, SPLIT], rx=[[], [(4096, "one")] * 40, []]),
        sends([tso4(20000)] * 2))),
]


@pytest.mark.parametrize("name,sc", HOSTILE, ids=[n for n, _ in HOSTILE])
def test_hostile_and_unusual_offload_bursts_match_python(name: str, sc: GsoScenario) -> None:
    # The compiled burst saw the burst (and forwarded or handed it back).
    assert same(sc), name


CHAIN_FAULTS = [f"{where}-{shape}+{fault}" for where, shape, fault in [
    ("chain", "three", "zero"), ("ind", "frags", "zero"), ("chain", "three", "writable"),
    ("ind", "three", "writable"), ("chain", "frags", "hole"), ("ind", "tiny", "hole"),
    ("chain", "three", "loop"), ("ind", "three", "loop"), ("chain", "two", "link"),
    ("ind", "frags", "link"), ("ind", "three", "nested"), ("ind", "two", "next"),
    ("ind", "two", "badlen"), ("ind", "frags", "tablehole")]]


@pytest.mark.parametrize("kind", CHAIN_FAULTS)
def test_broken_or_odd_chains_among_good_ones_match_python(kind: str) -> None:
    frames = (sends([tso4(9000)] * 2, kind="chain-three") + sends([tso4(9000)], kind=kind)
              + sends([tso4(9000)] * 2, kind="ind-frags"))
    assert same(one_round(learned(rx=[[], [(4096, "one")] * 200, []]), frames))


def test_indirect_table_without_indirect_desc() -> None:
    sc = one_round(learned(features=[NO_INDIRECT, SPLIT, SPLIT]),
                   sends([tso4(9000)], kind="chain-three") + sends([tso4(9000)], kind="ind-two"))
    assert same(sc)


def test_software_offload_bursts_are_handed_back() -> None:
    """The guard: a frame to segment or checksum in software is Python's."""
    sc = one_round(learned(features=[SPLIT, NO_GUEST_TSO, SPLIT]), sends([tso4(9000)]))
    assert same(sc)[0] == "deferred"
    sc = one_round(_rx((4096, "one"), n=20), sends([tso4(65535)] * 2))
    assert same(sc)[0] == "deferred"


# -- arbitrary mixes ----------------------------------------------------------------------

RX_KINDS = ["one"] * 8 + ["two", "readable", "hole", "ring"]
FEATURES = [SPLIT, SPLIT, SPLIT, NO_GUEST_TSO, NO_MRG, NO_HOST_TSO, NO_ECN, NO_INDIRECT]


@st.composite
def frames(draw: st.DrawFn) -> tuple[int, bytes, bytes, str]:
    kind = draw(st.sampled_from(["tso4", "tso6", "uso", "ufo", "plain", "ecn", "raw"]))
    size = draw(st.sampled_from([60, 200, 1514, 4000, 9000, 16000]))
    dst = draw(st.sampled_from([11, 11, 12, 13]))
    src = draw(st.sampled_from([10, 10, 10, 12]))
    if kind == "tso4":
        h, f = tso4(max(size, 60), dst, src)
    elif kind == "tso6":
        h, f = tso6(max(size, 80), dst, src)
    elif kind in ("uso", "ufo"):
        h, f = uso4(size, dst, src, UDP_L4 if kind == "uso" else UDP)
    elif kind == "ecn":
        h, f = tso4(max(size, 60), dst, src)
        h = bytes([h[0], h[1] | ECN]) + h[2:]
    elif kind == "raw":
        h = bytes([draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([0, 1, 3, 4, 5,
                                                                               0x81, 0x7F]))])
        h += bytes(10)
        f = udp4_frame(mac(dst), mac(src), bytes(size - 42))
    else:
        h, f = net_hdr(), udp4_frame(mac(dst), mac(src), bytes(size - 42))
    return (draw(st.integers(0, 1)), h, f,
            draw(st.sampled_from(["one"] * 8 + ["split", "writable", "empty"] + SHAPES
                                 + CHAIN_FAULTS)))


@st.composite
def scenarios(draw: st.DrawFn) -> GsoScenario:
    rx_sizes = st.sampled_from([4096, 4096, 2048, 16384, 17000, 100, 0, 9000])
    chains = st.lists(st.tuples(rx_sizes, st.sampled_from(RX_KINDS)), max_size=60)
    base = Scenario(features=[draw(st.sampled_from(FEATURES)) for _ in range(3)],
                    fdb=[(10, 0, 999.0), (11, 1, 999.0), (12, 2, 999.0)],
                    rx=[draw(chains) for _ in range(3)], region=4 * MB)
    rounds: list[Round] = []
    for _ in range(draw(st.integers(1, 3))):
        rx = [(k, size, kind) for k in (1, 2)
              for size, kind in draw(st.lists(st.tuples(rx_sizes, st.sampled_from(RX_KINDS)),
                                              max_size=30))]
        rounds.append((1000.0, draw(st.lists(frames(), max_size=24)), rx))
    return GsoScenario(base, rounds)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_arbitrary_offload_bursts_match_python(sc: GsoScenario) -> None:
    same(sc)


def test_the_burst_counts_gso_frames_as_python_does() -> None:
    """in_gso is counted for every GSO frame the loop looks at, a bad source too."""
    h, f = tso4(9000)
    bad = f[:6] + BROADCAST + f[12:]
    sc = one_round(learned(), sends([(h, f)] * 3 + [(h, bad)]))
    assert same(sc)[0] == "forwarded"
    w, _ = run(sc, compiled=True)
    c = w.guests[0].port.counters
    assert (c.in_gso, c.drops) == (4, {Drop.BAD_SOURCE: 1})
