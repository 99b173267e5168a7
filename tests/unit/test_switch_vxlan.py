"""VXLAN tunnel ports of the switch, over real UDP sockets on loopback.

The switch under test has one guest port (a vhost-user port on fake rings) and
tunnels to "peer switches" that are plain UDP sockets on other loopback
addresses (127.0.0.2, 127.0.0.3: a tunnel is known by its peer's address).
Checked: the wire format (RFC 7348), decapsulation and learning, split horizon,
the MTU rule (dropped and counted, never fragmented), software segmentation of
offloaded frames, and hostile datagrams dropped and counted.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.net_frames import (
    BROADCAST,
    FakeRing,
    ether,
    l4_checksum_ok,
    mac,
    net_hdr,
    tcp4_frame,
    with_partial_csum,
)
from vvu_runtime.backends.switch.port import BASE_FEATURES, SwitchPort
from vvu_runtime.backends.switch.switch import Drop, Switch
from vvu_runtime.backends.switch.vxlan import (
    OVERHEAD,
    VXLAN_HLEN,
    TunnelEndpoint,
    TunnelSpec,
    VxlanTunnel,
    encode_header,
    max_frame,
)
from vvu_runtime.virtio.net import GsoType, HdrFlags

VNI = 100
MTU = 1500


def _loopback_alias_works(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(not _loopback_alias_works("127.0.0.3"),
                                reason="needs 127.0.0.2 and 127.0.0.3 on loopback (Linux)")


@dataclass
class Peer:
    """A remote switch, as far as the wire is concerned: a UDP socket."""

    sock: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return str(host), int(port)

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(data, to)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(70000))
            except BlockingIOError:
                return out


@dataclass
class Rig:
    switch: Switch
    endpoint: TunnelEndpoint
    guest: SwitchPort
    rx: FakeRing
    tx: FakeRing
    t2: VxlanTunnel
    t3: VxlanTunnel
    p2: Peer
    p3: Peer
    seen: int = 0

    def guest_sends(self, frame: bytes, hdr: bytes | None = None) -> None:
        self.tx.add_tx(hdr if hdr is not None else net_hdr(), frame)
        self.guest.process(self.tx)

    def peer_sends(self, peer: Peer, datagram: bytes) -> None:
        peer.send(datagram, self.endpoint.address)
        self.endpoint.on_readable()

    def guest_received(self) -> list[bytes]:
        """The frames the guest received since the last call."""
        frames = [d for _, d in self.rx.received_frames()]
        new, self.seen = frames[self.seen:], len(frames)
        return new


def _peer(address: str) -> Peer:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, 0))
    s.setblocking(False)
    return Peer(s)


@pytest.fixture
def rig() -> Iterator[Rig]:
    switch = Switch()
    guest = SwitchPort(switch, "vm1")
    guest.set_features(BASE_FEATURES)
    rx, tx = FakeRing(0), FakeRing(1)
    for _ in range(64):
        rx.add_rx(4096)
    guest.queue_started(rx)
    guest.queue_started(tx)
    p2, p3 = _peer("127.0.0.2"), _peer("127.0.0.3")
    endpoint = TunnelEndpoint(switch, "127.0.0.1", 0, MTU)
    t2 = VxlanTunnel(endpoint, "sw2", "127.0.0.2", VNI, p2.address[1])
    t3 = VxlanTunnel(endpoint, "sw3", "127.0.0.3", VNI, p3.address[1])
    endpoint.open()
    try:
        yield Rig(switch, endpoint, guest, rx, tx, t2, t3, p2, p3)
    finally:
        endpoint.close()
        p2.sock.close()
        p3.sock.close()


def vxlan(frame: bytes, vni: int = VNI) -> bytes:
    return encode_header(vni) + frame


# ------------------------------------------------------------------ the wire format


def test_header_is_rfc_7348() -> None:
    # flags (I) | reserved 24 | VNI 24 | reserved 8
    assert encode_header(100) == bytes([0x08, 0, 0, 0, 0, 0, 100, 0])
    assert encode_header(0xABCDEF) == bytes([0x08, 0, 0, 0, 0xAB, 0xCD, 0xEF, 0])
    assert VXLAN_HLEN == 8 and OVERHEAD == 50
    assert max_frame(1500) == 1464  # 1450 bytes of L3 packet + 14 of Ethernet
    with pytest.raises(ValueError, match=re.escape("VNI 16777216 is not 0..16777215")):
        encode_header(1 << 24)


@pytest.mark.parametrize("text, spec", [
    ("sw2=192.0.2.2,vni=100", TunnelSpec("sw2", "192.0.2.2", 100, 4789)),
    ("sw2=h2.example,port=4800,vni=7", TunnelSpec("sw2", "h2.example", 7, 4800)),
])
def test_tunnel_spec(text: str, spec: TunnelSpec) -> None:
    assert TunnelSpec.parse(text) == spec


@pytest.mark.parametrize("text, message", [
    ("sw2", "expected NAME=ADDRESS"),
    ("sw2=192.0.2.2", "vni=V .* is required"),
    ("sw2=192.0.2.2,vni=0", "vni=V .* is required"),
    ("sw2=192.0.2.2,vni=100,ttl=3", "'ttl=3' is not port=N or vni=N"),
    ("sw2=192.0.2.2,vni=100,port=70000", "port 70000 is not 1..65535"),
])
def test_bad_tunnel_spec(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TunnelSpec.parse(text)


# ------------------------------------------------------------------ forwarding


def test_a_guest_broadcast_goes_to_every_tunnel_encapsulated(rig: Rig) -> None:
    frame = ether(BROADCAST, mac(1), 0x0806, bytes(28))
    rig.guest_sends(frame)
    assert rig.p2.received() == [vxlan(frame)]
    assert rig.p3.received() == [vxlan(frame)]
    assert rig.t2.counters.out_packets == 1 and rig.t2.counters.out_bytes == len(frame)


def test_a_tunnel_frame_is_decapsulated_learned_and_never_sent_to_another_tunnel(
        rig: Rig) -> None:
    frame = ether(BROADCAST, mac(9), 0x0806, bytes(28))
    rig.peer_sends(rig.p2, vxlan(frame))
    assert rig.guest_received() == [frame]
    assert rig.p3.received() == []  # split horizon: flooded to local ports only
    assert rig.t2.counters.in_packets == 1
    # mac(9) lives behind sw2: a reply goes to sw2 alone.
    assert rig.switch.fdb.lookup(mac(9), rig.switch.clock()) is rig.t2
    reply = ether(mac(9), mac(1), 0x0806, bytes(28))
    rig.guest_sends(reply)
    assert rig.p2.received() == [vxlan(reply)]
    assert rig.p3.received() == []


def test_known_unicast_from_a_tunnel_to_a_tunnel_is_dropped(rig: Rig) -> None:
    rig.peer_sends(rig.p3, vxlan(ether(BROADCAST, mac(8), 0x0806, bytes(28))))
    rig.guest_received()
    rig.peer_sends(rig.p2, vxlan(ether(mac(8), mac(9), 0x0806, bytes(28))))
    assert rig.p3.received() == []
    assert rig.guest_received() == []
    assert rig.t2.counters.drops == {Drop.SPLIT_HORIZON: 1}


def test_frames_that_do_not_fit_the_underlay_mtu_are_dropped_and_counted(rig: Rig) -> None:
    fits = ether(BROADCAST, mac(1), 0x0800, bytes(max_frame(MTU) - 14))
    too_big = ether(BROADCAST, mac(1), 0x0800, bytes(max_frame(MTU) - 13))
    rig.guest_sends(fits)
    rig.guest_sends(too_big)
    got = rig.p2.received()
    assert got == [vxlan(fits)] and len(got[0]) + 28 == MTU  # outer IP packet: the MTU
    assert rig.t2.counters.drops == {Drop.MTU_EXCEEDED: 1}
    assert rig.t3.counters.drops == {Drop.MTU_EXCEEDED: 1}


def test_tso_from_a_guest_is_segmented_to_fit_the_tunnel(rig: Rig) -> None:
    payload = os.urandom(4000)
    frame, start, off = with_partial_csum(tcp4_frame(BROADCAST, mac(1), payload))
    rig.guest_sends(frame, net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1400, start, off))
    got = rig.p2.received()
    assert len(got) == 3  # 4000 bytes at an MSS of 1400
    inner = [d[VXLAN_HLEN:] for d in got]
    assert all(d[:VXLAN_HLEN] == encode_header(VNI) for d in got)
    assert all(l4_checksum_ok(f) and len(f) <= max_frame(MTU) for f in inner)
    assert b"".join(f[54:] for f in inner) == payload


# ------------------------------------------------------------------ hostile datagrams


def test_hostile_datagrams_are_dropped_and_counted(rig: Rig) -> None:
    good = ether(BROADCAST, mac(9), 0x0806, bytes(28))
    rig.peer_sends(rig.p2, vxlan(good)[:5])  # truncated VXLAN header
    rig.peer_sends(rig.p2, bytes(8) + good)  # I flag clear
    rig.peer_sends(rig.p2, vxlan(good, vni=101))  # no tunnel of that peer has VNI 101
    rig.peer_sends(rig.p2, vxlan(ether(BROADCAST, mac(9), 0x0800,
                                       bytes(max_frame(MTU) - 13))))  # inner frame too big
    rig.peer_sends(rig.p2, vxlan(good[:10]))  # inner runt
    rig.peer_sends(rig.p2, vxlan(ether(BROADCAST, BROADCAST, 0x0806, bytes(28))))  # bad source
    assert rig.t2.counters.drops == {
        Drop.TUNNEL_TRUNCATED: 1, Drop.TUNNEL_BAD_FLAGS: 1, Drop.TUNNEL_WRONG_VNI: 1,
        Drop.TUNNEL_OVERSIZE: 1, Drop.RUNT: 1, Drop.BAD_SOURCE: 1}
    assert rig.guest_received() == []
    assert len(rig.switch.fdb) == 0
    # Reserved bits are ignored on receipt (RFC 7348 section 5).
    noisy = bytearray(vxlan(good))
    noisy[0] |= 0xF7
    noisy[1:4] = b"\xff\xff\xff"
    noisy[7] = 0xFF
    rig.peer_sends(rig.p2, bytes(noisy))
    assert rig.guest_received() == [good]


def test_datagrams_from_unknown_peers_are_counted_on_the_endpoint(rig: Rig) -> None:
    stranger = _peer("127.0.0.4")
    try:
        stranger.send(vxlan(ether(BROADCAST, mac(7), 0x0806, bytes(28))), rig.endpoint.address)
        rig.endpoint.on_readable()
    finally:
        stranger.sock.close()
    assert rig.endpoint.counters.unknown_peer == 1
    assert rig.guest_received() == []
    assert rig.t2.counters.in_packets == rig.t3.counters.in_packets == 0


def test_two_networks_to_one_peer_are_told_apart_by_vni() -> None:
    switch = Switch()
    endpoint = TunnelEndpoint(switch, "127.0.0.1", 0, MTU)
    a = VxlanTunnel(endpoint, "a", "127.0.0.2", 100, 4789)
    b = VxlanTunnel(endpoint, "b", "127.0.0.2", 200, 4789)
    taken = "tunnel c: a already goes to 127.0.0.2 with VNI 100"
    with pytest.raises(ValueError, match=re.escape(taken)):
        VxlanTunnel(endpoint, "c", "127.0.0.2", 100, 4790)
    peer = _peer("127.0.0.2")
    endpoint.open()
    try:
        peer.send(vxlan(ether(BROADCAST, mac(9), 0x0806, bytes(28)), vni=200), endpoint.address)
        endpoint.on_readable()
    finally:
        endpoint.close()
        peer.sock.close()
    assert (a.counters.in_packets, b.counters.in_packets) == (0, 1)


# ------------------------------------------------------------------ status and life cycle


def test_per_tunnel_counters_are_in_the_status_table_and_json(rig: Rig) -> None:
    rig.guest_sends(ether(BROADCAST, mac(1), 0x0806, bytes(28)))
    rig.peer_sends(rig.p2, b"\x08")
    table = rig.switch.status_table()
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "up (vxlan 127.0.0.2:" in rows["sw2"] and "vni 100" in rows["sw2"]
    assert "drops on sw2: tunnel_truncated=1" in table
    assert f"tunnel endpoint 127.0.0.1:{rig.endpoint.address[1]}: underlay MTU 1500" in table
    data = rig.switch.status_dict()
    ports = data["ports"]
    assert isinstance(ports, dict)
    assert ports["sw3"]["out_packets"] == 1
    assert ports["sw2"]["drops"] == {"tunnel_truncated": 1}
    tunnels = data["tunnels"]
    assert isinstance(tunnels, dict) and tunnels["sw2"]["vni"] == VNI


def test_close_releases_the_socket_and_forgets_the_tunnels_addresses(rig: Rig) -> None:
    rig.peer_sends(rig.p2, vxlan(ether(BROADCAST, mac(9), 0x0806, bytes(28))))
    fd = rig.endpoint.sock.fileno() if rig.endpoint.sock else -1
    rig.endpoint.close()
    assert rig.endpoint.sock is None and not rig.t2.up
    assert len(rig.switch.fdb) == 0
    with pytest.raises(OSError):
        os.fstat(fd)
    rig.guest_sends(ether(BROADCAST, mac(1), 0x0806, bytes(28)))
    assert rig.t2.counters.drops == {}  # a down port is not flooded to


def test_a_send_the_kernel_refuses_is_counted(rig: Rig) -> None:
    rig.t2.address = ("127.0.0.2", 0)  # port 0: EINVAL from sendmsg
    rig.guest_sends(ether(BROADCAST, mac(1), 0x0806, bytes(28)))
    assert rig.t2.counters.drops == {Drop.TUNNEL_SEND_ERROR: 1}
    assert rig.p3.received() != []


def test_endpoint_binds_an_address_the_machine_does_not_have_yet() -> None:
    # In an appliance the backend starts before networkd has addressed the underlay NIC.
    endpoint = TunnelEndpoint(Switch(), "192.0.2.77", 0)
    endpoint.open()
    try:
        assert endpoint.address[0] == "192.0.2.77"
    finally:
        endpoint.close()


def test_endpoint_refuses_a_bad_mtu() -> None:
    with pytest.raises(ValueError, match=re.escape("underlay MTU 100 is not 576..65535")):
        TunnelEndpoint(Switch(), mtu=100)


def test_bind_failure_names_the_address() -> None:
    holder = _peer("127.0.0.1")
    try:
        endpoint = TunnelEndpoint(Switch(), "127.0.0.1", holder.address[1])
        with pytest.raises(OSError, match=f"tunnel endpoint 127.0.0.1:{holder.address[1]}: "
                                          "cannot bind"):
            endpoint.open()
        assert endpoint.sock is None
    finally:
        holder.sock.close()




def test_vvu_switch_command_line_takes_tunnels(capsys: pytest.CaptureFixture[str]) -> None:
    from vvu_runtime.serve.switch import build_parser, main

    args = build_parser().parse_args(["--port", "vm1=/tmp/x.sock", "--tunnel",
                                      "sw2=192.0.2.2,vni=100", "--underlay-mtu", "9000"])
    assert args.tunnel == [TunnelSpec("sw2", "192.0.2.2", 100)]
    assert (args.tunnel_bind, args.tunnel_port, args.underlay_mtu) == ("0.0.0.0", 4789, 9000)
    with pytest.raises(SystemExit) as e:
        main(["--port", "vm1=/tmp/x.sock", "--tunnel", "vm1=192.0.2.2,vni=1"])
    assert e.value.code == 2
    assert "port name(s) used twice: vm1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--port", "vm1=/tmp/x.sock", "--tunnel", "sw2=192.0.2.2"])
    assert "vni=V (1..16777215) is required" in capsys.readouterr().err
