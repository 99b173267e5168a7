"""The switch end to end in one process: real vhost-user sessions and split rings,
driven by our front-end and driver rings over UNIX sockets and memfds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.loop_thread import LoopThread
from tests.support.net_frames import (
    BROADCAST,
    DriverPort,
    ether,
    l4_checksum_ok,
    mac,
    net_hdr,
    tcp4_frame,
    with_partial_csum,
)
from vvu_runtime.backends.switch.port import SwitchPort
from vvu_runtime.backends.switch.switch import Switch
from vvu_runtime.vhost_user.server import VhostUserServer
from vvu_runtime.virtio.net import GsoType, HdrFlags, NetFeature

T = TypeVar("T")


class Rig:
    def __init__(self, tmp: Path, names: list[str], **port_kw: Any) -> None:
        self.loop = LoopThread()
        self.switch = Switch()
        self.ports = {n: SwitchPort(self.switch, n, **port_kw) for n in names}
        self.paths = {n: str(tmp / f"{n}.sock") for n in names}
        self.servers = {n: VhostUserServer(self.paths[n], p, loop=self.loop.loop)
                        for n, p in self.ports.items()}
        for s in self.servers.values():
            self.loop.call(s.start)

    def close(self) -> None:
        for s in self.servers.values():
            self.loop.call(s.close)
        self.loop.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, ["a", "b", "c"])
    yield r
    r.close()


def test_frames_cross_the_switch(rig: Rig) -> None:
    with DriverPort(rig.paths["a"]) as a, DriverPort(rig.paths["b"]) as b, \
            DriverPort(rig.paths["c"]) as c:
        hello = ether(BROADCAST, mac(1), 0x0806, bytes(28))
        a.send(hello)
        [(hb, fb)] = b.receive()
        [(_, fc)] = c.receive()
        assert fb == fc == hello and hb.num_buffers == 1
        reply = ether(mac(1), mac(2), 0x0800, os.urandom(100))
        b.send(reply)
        assert [f for _, f in a.receive()] == [reply]
        assert c.receive(timeout=0.3) == []  # learned: not flooded
        counters = rig.loop.call(lambda: rig.switch.ports[0].counters)
        assert counters.in_packets == 1 and counters.out_packets == 1


def test_burst_and_mergeable_large_frames(rig: Rig) -> None:
    with DriverPort(rig.paths["a"], tx_buffer=65600) as a, \
            DriverPort(rig.paths["b"], rx_buffer=1536) as b:
        frames = [ether(BROADCAST, mac(1), 0x0800, bytes([i]) * 60) for i in range(200)]
        for f in frames:
            a.send(f, kick=False)
        a.txq.kick()
        got = b.receive(200)
        assert [f for _, f in got] == frames
        big = tcp4_frame(BROADCAST, mac(1), os.urandom(9000))
        a.send(big)
        [(h, f)] = b.receive()
        assert f == big and h.num_buffers == -(-(len(big) + 12) // 1536)


def test_tso_end_to_end_and_software_fallback(rig: Rig) -> None:
    no_tso = (NetFeature.GUEST_TSO4.mask | NetFeature.GUEST_TSO6.mask
              | NetFeature.GUEST_CSUM.mask | NetFeature.GUEST_UFO.mask
              | NetFeature.GUEST_USO4.mask | NetFeature.GUEST_USO6.mask)
    with DriverPort(rig.paths["a"], tx_buffer=65600) as a, \
            DriverPort(rig.paths["b"], rx_buffer=4096) as b, \
            DriverPort(rig.paths["c"], exclude=no_tso) as c:
        assert a.features & NetFeature.HOST_TSO4.mask
        assert not c.features & NetFeature.GUEST_TSO4.mask
        payload = os.urandom(60000)
        frame, start, off = with_partial_csum(tcp4_frame(BROADCAST, mac(1), payload))
        a.send(frame, net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, start, off))
        [(hb, fb)] = b.receive()
        assert fb == frame and hb.gso_type == GsoType.TCPV4  # in one piece
        got = c.receive(42)
        assert len(got) == 42
        assert all(h.gso_type == 0 and l4_checksum_ok(f) for h, f in got)
        assert b"".join(f[54:] for _, f in got) == payload


def test_reconnect_keeps_the_switch_and_other_ports(rig: Rig) -> None:
    b = DriverPort(rig.paths["b"])
    try:
        with DriverPort(rig.paths["a"]) as a:
            a.send(ether(BROADCAST, mac(1), 0x0806, bytes(28)))
            assert len(b.receive()) == 1
        # a went away; b keeps working towards c
        with DriverPort(rig.paths["c"]) as c:
            b.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))
            assert len(c.receive()) == 1
        # a comes back on the same socket
        with DriverPort(rig.paths["a"]) as a2:
            b.send(ether(mac(1), mac(2), 0x0800, bytes(50)))
            assert len(a2.receive()) == 1
    finally:
        b.close()


def test_multiqueue_port(tmp_path: Path) -> None:
    r = Rig(tmp_path, ["a", "b"], queue_pairs=2)
    try:
        from vvu_runtime.vhost_user.frontend import VhostUserFrontend

        fe = VhostUserFrontend.connect(r.paths["a"])
        fe.negotiate()
        assert fe.get_queue_num() == 4
        assert fe.get_features() & NetFeature.MQ.mask
        fe.close()
    finally:
        r.close()
