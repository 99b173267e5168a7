"""The switch with vhost-user ports over fake rings: learning, flooding, drops,
MRG_RXBUF, offload decisions, multiqueue, error attribution, counters."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.net_frames import (
    BROADCAST,
    FakeRing,
    ether,
    ipv4_header_ok,
    l4_checksum_ok,
    mac,
    net_hdr,
    tcp4_frame,
    udp4_frame,
    udp6_frame,
    with_partial_csum,
)
from vvu_runtime.backends.switch.port import BASE_FEATURES, OFFLOAD_FEATURES, SwitchPort
from vvu_runtime.backends.switch.switch import Drop, Switch
from vvu_runtime.virtio.errors import DescriptorError, GuestMemoryError
from vvu_runtime.virtio.net import GsoType, HdrFlags, NetFeature

ALL = BASE_FEATURES
NO_OFFLOADS = BASE_FEATURES & ~OFFLOAD_FEATURES
NO_MRG = ALL & ~NetFeature.MRG_RXBUF.mask


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """A port with its fake rings, as a guest would see it."""

    def __init__(self, switch: Switch, name: str, features: int = ALL, pairs: int = 1,
                 rx_buffers: int = 64, rx_size: int = 2048) -> None:
        self.port = SwitchPort(switch, name, queue_pairs=pairs)
        self.port.set_features(features & self.port.features())
        self.rx = [FakeRing(2 * k, name=f"{name} rx{k}") for k in range(pairs)]
        self.tx = [FakeRing(2 * k + 1, name=f"{name} tx{k}") for k in range(pairs)]
        for ring in self.rx:
            for _ in range(rx_buffers):
                ring.add_rx(rx_size)
            self.port.queue_started(ring)
        for ring in self.tx:
            self.port.queue_started(ring)

    def send(self, frame: bytes, hdr: bytes | None = None, queue: int = 0,
             split: bool = False) -> None:
        hdr = net_hdr() if hdr is None else hdr
        ring = self.tx[queue]
        if split:
            ring.add_tx(hdr, frame)
        else:
            ring.add_tx(hdr + frame)
        self.port.process(ring)

    def frames(self, queue: int = 0) -> list[bytes]:
        return [f for _, f in self.rx[queue].received_frames()]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def switch(clock: Clock) -> Switch:
    return Switch(ageing_time=300, clock=clock)


def test_unknown_unicast_floods_then_learns(switch: Switch) -> None:
    a, b, c = (Node(switch, n) for n in "abc")
    f1 = ether(mac(2), mac(1), 0x0800, bytes(50))
    a.send(f1)
    assert b.frames() == [f1] and c.frames() == [f1] and a.frames() == []
    assert a.port.counters.flooded == 1
    # b answers: a is known now, so only a gets it.
    f2 = ether(mac(1), mac(2), 0x0800, bytes(50))
    b.send(f2)
    assert a.frames() == [f2] and c.frames() == [f1]
    # and a -> b is unicast now
    a.send(f1)
    assert b.frames() == [f1, f1] and c.frames() == [f1]
    assert a.port.counters.in_packets == 2 and b.port.counters.out_packets == 2
    assert b.port.counters.out_bytes == 2 * len(f1)


def test_broadcast_and_multicast_flood_without_hairpin(switch: Switch) -> None:
    a, b, c = (Node(switch, n) for n in "abc")
    bc = ether(BROADCAST, mac(1), 0x0806, bytes(28))
    mc = ether(bytes.fromhex("01005e000001"), mac(1), 0x0800, bytes(40))
    a.send(bc)
    a.send(mc)
    assert b.frames() == [bc, mc] and c.frames() == [bc, mc]
    assert a.frames() == []


def test_hairpin_dropped(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.send(ether(BROADCAST, mac(1), 0x0806, bytes(28)))
    a.send(ether(BROADCAST, mac(3), 0x0806, bytes(28)))
    # mac(3) lives on a; a frame from a to mac(3) goes nowhere.
    a.send(ether(mac(3), mac(1), 0x0800, bytes(50)))
    assert a.port.counters.drops == {Drop.HAIRPIN: 1}
    assert len(b.frames()) == 2


def test_bad_sources_and_runts_dropped(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.send(ether(mac(2), BROADCAST, 0x0800, bytes(50)))
    a.send(ether(mac(2), bytes(6), 0x0800, bytes(50)))
    a.tx[0].add_tx(net_hdr() + bytes(5))
    a.port.process(a.tx[0])
    assert a.port.counters.drops == {Drop.BAD_SOURCE: 2, Drop.RUNT: 1}
    assert b.frames() == []
    assert len(a.tx[0].used) == 3  # every chain is returned


def test_a_fast_sender_yields_the_event_loop(switch: Switch) -> None:
    """More than a budget of frames: served in slices, other work runs between."""
    import asyncio

    from vvu_runtime.backends.switch.port import TX_BUDGET
    from vvu_runtime.backends.switch.switch import BURST

    a = Node(switch, "a")
    b = Node(switch, "b", rx_buffers=3000, rx_size=128)
    total = TX_BUDGET * BURST * 2 + 10
    for i in range(total):
        a.tx[0].add_tx(net_hdr() + ether(BROADCAST, mac(1), 0x0800, i.to_bytes(4, "big") * 12))
    seen: list[int] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        a.port.process(a.tx[0])
        seen.append(len(a.tx[0].used))  # after the first slice
        loop.call_soon(lambda: seen.append(len(a.tx[0].used)))  # another port's turn
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(run())
    assert seen[0] == TX_BUDGET * BURST
    assert TX_BUDGET * BURST <= seen[1] < total  # other callbacks ran in between
    assert len(a.tx[0].used) == total and len(b.frames()) == total


def test_busy_poll_turns_kicks_back_on(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.port.busy_poll = 0.002
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert len(b.frames()) == 1
    assert a.tx[0].kicks_suppressed is False


def test_oversize_frames_dropped(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b", rx_buffers=200)
    huge = ether(BROADCAST, mac(1), 0x0800, bytes(70000))
    a.send(huge)
    a.send(huge, split=True)
    assert a.port.counters.drops == {Drop.OVERSIZE: 2}
    assert b.frames() == []


def test_tx_chains_returned_and_notified_once_per_batch(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    for i in range(10):
        a.tx[0].add_tx(net_hdr() + ether(BROADCAST, mac(1), 0x0800, bytes([i]) * 50))
    a.port.process(a.tx[0])
    assert len(a.tx[0].used) == 10 and all(w == 0 for _, w in a.tx[0].used)
    assert a.tx[0].notifications >= 1  # per burst (the ring decides whether to signal)
    assert b.rx[0].notifications == 1
    assert len(b.frames()) == 10


def test_header_in_its_own_descriptor(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    f = ether(BROADCAST, mac(1), 0x0800, os.urandom(100))
    a.send(f, split=True)
    assert b.frames() == [f]


def test_rx_full_drops_and_counts_on_destination(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", rx_buffers=2)
    for _ in range(5):
        a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert len(b.frames()) == 2
    assert b.port.counters.drops == {Drop.RX_RING_FULL: 3}
    assert a.port.counters.drops == {}


def test_mergeable_rx_spans_buffers(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", rx_size=1000)
    big = tcp4_frame(BROADCAST, mac(1), os.urandom(3500))
    a.send(big)
    [(hdr, data)] = b.rx[0].received_frames()
    assert hdr.num_buffers == 4 and data == big
    assert len(b.rx[0].used) == 4


def test_mergeable_frame_kept_chains_when_ring_runs_dry(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", rx_buffers=2, rx_size=1000)
    a.send(udp4_frame(BROADCAST, mac(1), bytes(2500)))  # needs 3 buffers, has 2
    assert b.port.counters.drops == {Drop.RX_RING_FULL: 1}
    assert b.rx[0].used == []
    # The two popped chains are used for the next (small) frames, not lost.
    small = ether(BROADCAST, mac(1), 0x0800, bytes(60))
    a.send(small)
    a.send(small)
    assert b.frames() == [small, small]


def test_without_mergeable_a_frame_must_fit_one_chain(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", features=NO_MRG, rx_buffers=4, rx_size=1000)
    a.send(udp4_frame(BROADCAST, mac(1), bytes(2500)))
    assert b.port.counters.drops == {Drop.RX_BUFFER_SMALL: 1}
    small = udp4_frame(BROADCAST, mac(1), bytes(100))
    a.send(small)
    [(hdr, data)] = b.rx[0].received_frames(mergeable=False)
    assert data == small and hdr.num_buffers == 1


def test_chain_of_several_writable_buffers(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", features=NO_MRG, rx_buffers=0)
    b.rx[0].add_rx(12, 100, 4096)
    f = udp4_frame(BROADCAST, mac(1), os.urandom(1000))
    a.send(f)
    [(_, data)] = b.rx[0].received_frames(mergeable=False)
    assert data == f


def test_hostile_tx_chain_fails_the_senders_ring_only(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.tx[0].add_tx(net_hdr() + ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    a.tx[0].pop_error = DescriptorError("loop in descriptor chain")
    a.port.process(a.tx[0])
    assert isinstance(a.tx[0].failed, DescriptorError)
    assert a.port.counters.drops == {Drop.TX_RING_ERROR: 1}
    assert b.rx[0].failed is None
    # b still works towards a
    b.send(ether(BROADCAST, mac(2), 0x0800, bytes(50)))
    assert len(a.frames()) == 1


def test_broken_destination_ring_is_the_destinations_fault(switch: Switch) -> None:
    a, b, c = (Node(switch, n) for n in "abc")
    b.rx[0].pop_error = GuestMemoryError("buffer outside guest memory")
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert isinstance(b.rx[0].failed, GuestMemoryError)
    assert b.port.counters.drops == {Drop.RX_RING_ERROR: 1}
    assert a.tx[0].failed is None and a.port.counters.drops == {}
    assert len(c.frames()) == 1  # the flood went on


def test_destination_ring_breaking_in_the_middle_of_a_burst(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", rx_buffers=0)
    b.rx[0].add_rx(2048)
    b.rx[0].add_tx(b"a readable-only chain in a receive ring")
    b.rx[0].add_rx(2048)
    b.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))  # b is known: unicast, batched
    for i in range(3):
        a.tx[0].add_tx(net_hdr() + ether(mac(2), mac(1), 0x0800, bytes([i]) * 60))
    a.port.process(a.tx[0])
    assert isinstance(b.rx[0].failed, DescriptorError)
    # the first frame was written but never published: it is lost with the ring
    assert b.port.counters.out_packets == 0 and b.port.counters.out_bytes == 0
    assert b.port.counters.drops == {Drop.RX_RING_ERROR: 3}
    assert a.tx[0].failed is None and len(a.tx[0].used) == 3
    assert b.rx[0].used == []  # nothing is published on a failed ring


def test_push_error_on_destination(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    b.rx[0].push_error = GuestMemoryError("used ring outside memory")
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert b.rx[0].failed is not None and a.tx[0].failed is None
    assert b.port.counters.out_packets == 0
    assert b.port.counters.drops == {Drop.RX_RING_ERROR: 1}


def test_rx_chain_without_writable_buffer_fails_destination(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", rx_buffers=0)
    b.rx[0].add_tx(b"readable only")
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert isinstance(b.rx[0].failed, DescriptorError)


def test_disabled_tx_ring_drops(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.tx[0].enabled = False
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert b.frames() == [] and a.port.counters.drops == {Drop.TX_DISABLED: 1}
    assert len(a.tx[0].used) == 1


def test_disabled_rx_ring_not_filled(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    b.rx[0].enabled = False
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert b.rx[0].used == [] and b.port.counters.drops == {Drop.PORT_DOWN: 1}


def test_port_down_flushes_learned_addresses(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    assert mac(1) in switch.fdb
    a.port.queue_stopped(a.rx[0])
    assert mac(1) not in switch.fdb and not a.port.up
    b.send(ether(mac(1), mac(2), 0x0800, bytes(50)))  # flooded to nobody up
    assert a.rx[0].used == []


def test_reset_then_reconnect(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.port.queue_stopped(a.rx[0])
    a.port.queue_stopped(a.tx[0])
    a.port.reset()
    assert a.port.status_line() == "down"
    # the same port object serves the next connection
    a2_rx, a2_tx = FakeRing(0), FakeRing(1)
    for _ in range(4):
        a2_rx.add_rx(2048)
    a.port.set_features(ALL)
    a.port.queue_started(a2_rx)
    a.port.queue_started(a2_tx)
    b.send(ether(BROADCAST, mac(2), 0x0800, bytes(50)))
    assert len(a2_rx.used) == 1


def test_ageing_makes_unicast_flood_again(switch: Switch, clock: Clock) -> None:
    a, b, c = (Node(switch, n) for n in "abc")
    b.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))
    a.send(ether(mac(2), mac(1), 0x0800, bytes(50)))
    assert len(c.frames()) == 1  # only the broadcast
    clock.now += 301
    a.send(ether(mac(2), mac(1), 0x0800, bytes(50)))
    assert len(c.frames()) == 2  # aged out: flooded
    # The lookup aged b's address out; a's was learned again at the new time.
    assert mac(2) not in switch.fdb and mac(1) in switch.fdb
    assert switch.age() == 0  # the timer finds nothing else stale yet
    clock.now += 301
    assert switch.age() == 1 and len(switch.fdb) == 0
    assert switch.fdb.counters.aged == 2


# ------------------------------------------------------------------ offloads

def _tso_frame(payload: int = 20000) -> tuple[bytes, bytes]:
    frame, start, off = with_partial_csum(tcp4_frame(mac(2), mac(1), os.urandom(payload)))
    hdr = net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, start, off)
    return frame, hdr


def test_tso_passes_through_to_a_tso_receiver(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", rx_size=4096)
    b.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))
    frame, hdr = _tso_frame()
    a.send(frame, hdr)
    [(got_hdr, data)] = b.rx[0].received_frames()
    assert data == frame
    assert got_hdr.gso_type == GsoType.TCPV4 and got_hdr.gso_size == 1448
    assert got_hdr.flags == HdrFlags.NEEDS_CSUM and got_hdr.csum_start == 34
    assert b.port.counters.segmented == 0
    assert a.port.counters.in_gso == 1


def test_tso_segmented_for_a_receiver_without_offloads(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", features=NO_OFFLOADS)
    b.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))
    frame, hdr = _tso_frame()
    a.send(frame, hdr)
    got = b.rx[0].received_frames()
    assert len(got) == 14
    payload = b""
    for h, data in got:
        assert h.gso_type == 0 and h.flags == 0
        assert l4_checksum_ok(data) and ipv4_header_ok(data)
        payload += data[54:]
    assert payload == frame[54:]
    assert b.port.counters.segmented == 1


def test_tso_segmented_with_partial_csum_for_csum_only_receiver(switch: Switch) -> None:
    a = Node(switch, "a")
    features = NO_OFFLOADS | NetFeature.GUEST_CSUM.mask | NetFeature.CSUM.mask
    b = Node(switch, "b", features=features)
    b.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))
    frame, hdr = _tso_frame(5000)
    a.send(frame, hdr)
    got = b.rx[0].received_frames()
    assert len(got) == 4
    assert all(h.flags == HdrFlags.NEEDS_CSUM and h.csum_start == 34 for h, _ in got)


def test_flood_mixes_pass_through_and_segmentation(switch: Switch) -> None:
    a = Node(switch, "a")
    fast = Node(switch, "fast", rx_size=4096)
    slow = Node(switch, "slow", features=NO_OFFLOADS)
    frame, hdr = _tso_frame(4000)
    a.send(frame, hdr)  # unknown destination: flooded
    assert len(fast.rx[0].received_frames()) == 1
    assert len(slow.rx[0].received_frames()) == 3


def test_partial_checksum_completed_for_receiver_without_guest_csum(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", features=NO_OFFLOADS)
    frame, start, off = with_partial_csum(udp4_frame(BROADCAST, mac(1), os.urandom(300)))
    a.send(frame, net_hdr(HdrFlags.NEEDS_CSUM, 0, 0, 0, start, off))
    [(h, data)] = b.rx[0].received_frames()
    assert h.flags == 0 and l4_checksum_ok(data)


def test_offload_the_sender_did_not_negotiate_is_dropped(switch: Switch) -> None:
    a = Node(switch, "a", features=NO_OFFLOADS)
    b = Node(switch, "b")
    frame, hdr = _tso_frame(3000)
    a.send(frame, hdr)
    assert a.port.counters.drops == {Drop.OFFLOAD_NOT_NEGOTIATED: 1}
    assert b.frames() == []


def test_malformed_gso_frame_dropped_at_ingress(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", features=NO_OFFLOADS)
    bogus = ether(BROADCAST, mac(1), 0x0806, bytes(3000))
    a.send(bogus, net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, 34, 16))
    assert a.port.counters.drops == {Drop.OFFLOAD_MALFORMED: 1}
    assert b.frames() == []


def test_data_valid_from_a_guest_is_stripped(switch: Switch) -> None:
    a, b = Node(switch, "a"), Node(switch, "b")
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)), net_hdr(HdrFlags.DATA_VALID))
    [(h, _)] = b.rx[0].received_frames()
    assert h.flags == 0


def test_uso_by_ip_version(switch: Switch) -> None:
    a = Node(switch, "a")
    only4 = ALL & ~NetFeature.GUEST_USO6.mask
    b = Node(switch, "b", features=only4, rx_size=4096)
    f4, s4, o4 = with_partial_csum(udp4_frame(BROADCAST, mac(1), os.urandom(3000)))
    f6, s6, o6 = with_partial_csum(udp6_frame(BROADCAST, mac(1), os.urandom(3000)))
    a.send(f4, net_hdr(HdrFlags.NEEDS_CSUM, GsoType.UDP_L4, 42, 1000, s4, o4))
    a.send(f6, net_hdr(HdrFlags.NEEDS_CSUM, GsoType.UDP_L4, 62, 1000, s6, o6))
    got = b.rx[0].received_frames()
    assert got[0][0].gso_type == GsoType.UDP_L4  # v4 passed through
    assert len(got) == 1 + 3  # v6 cut into three datagrams


# ------------------------------------------------------------------ multiqueue

def test_multiqueue_rx_queue_per_flow(switch: Switch) -> None:
    a = Node(switch, "a", pairs=1)
    b = Node(switch, "b", pairs=4)
    assert b.port.num_queues() == 8 and b.port.features() & NetFeature.MQ.mask
    flows = [udp4_frame(BROADCAST, mac(1), bytes(20), sport=1000 + i) for i in range(32)]
    for _ in range(3):
        for f in flows:
            a.send(f)
    seen = [set(b.frames(q)) for q in range(4)]
    assert sum(1 for s in seen if s) >= 2  # spread over queues
    for f in flows:  # each flow on exactly one queue
        assert sum(1 for s in seen if f in s) == 1


def test_multiqueue_only_enabled_queues(switch: Switch) -> None:
    a = Node(switch, "a")
    b = Node(switch, "b", pairs=4)
    for ring in b.rx[1:]:
        ring.enabled = False
    for i in range(20):
        a.send(udp4_frame(BROADCAST, mac(1), bytes(20), sport=2000 + i))
    assert len(b.frames(0)) == 20
    assert b.port.status_line() == "up 1/4q"


def test_sending_on_any_tx_queue(switch: Switch) -> None:
    a = Node(switch, "a", pairs=2)
    b = Node(switch, "b")
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)), queue=1)
    assert len(b.frames()) == 1


# ------------------------------------------------------------------ status

def test_status_table(switch: Switch) -> None:
    a = Node(switch, "vm1")
    Node(switch, "vm2", rx_buffers=0)
    a.send(ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    table = switch.status_table()
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["port", "state"]
    assert lines[1].startswith("vm1") and "up 1/1q" in lines[1]
    assert "drops on vm2: rx_ring_full=1" in table
    assert "fdb: 1 address(es)" in table
    status = switch.status_dict()
    assert status["ports"]["vm2"]["drops"] == {"rx_ring_full": 1}  # type: ignore[index]


def test_duplicate_port_names_refused(switch: Switch) -> None:
    SwitchPort(switch, "x")
    with pytest.raises(ValueError, match="twice"):
        SwitchPort(switch, "x")


# ------------------------------------------------------------------ hostile input

_frames = st.tuples(
    st.sampled_from([0, 1, 2, 3, 5, 0x81, 0xFF]),  # flags
    st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 2, 0xFF]),  # gso_type
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),  # hdr_len, gso_size
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),  # csum_start, csum_offset
    st.binary(min_size=0, max_size=300),  # the rest of the frame
    st.sampled_from([mac(2), mac(3), BROADCAST, mac(9), mac(1)]),  # destination
    st.integers(0, 4),  # how to split into descriptors
    st.booleans(),  # a TCP-looking body
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_frames, min_size=1, max_size=12))
def test_hostile_frames_never_raise(frames: list[tuple[int, int, int, int, int, int, bytes,
                                                     bytes, int, bool]]) -> None:
    switch = Switch(clock=Clock())
    a = Node(switch, "a")
    Node(switch, "b", features=NO_OFFLOADS, rx_size=256)
    Node(switch, "c", features=NO_MRG, rx_buffers=3, rx_size=1500)
    Node(switch, "d", rx_buffers=40, rx_size=64)
    switch.fdb.learn(mac(2), switch.ports[1], 0)
    switch.fdb.learn(mac(3), switch.ports[2], 0)
    for flags, gso, hdr_len, gso_size, start, off, body, dst, split, tcp in frames:
        if tcp:
            body = tcp4_frame(dst, mac(1), body)[12:]
        frame = dst + mac(1) + body
        hdr = net_hdr(flags, gso, hdr_len, gso_size, start, off)
        data = hdr + frame
        cut = [0, 12, 14, 20, len(data) // 2][split]
        if 0 < cut < len(data):
            a.tx[0].add_tx(data[:cut], data[cut:])
        else:
            a.tx[0].add_tx(data)
    a.port.process(a.tx[0])
    assert a.tx[0].failed is None
    assert len(a.tx[0].used) == len(frames)  # every chain given back
