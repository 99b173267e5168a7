"""CPU per Gbit/s through a VXLAN tunnel: encapsulation side and decapsulation side.

Two switches in this process, each with one guest port on in-memory rings
(tests/support/net_frames.FakeRing: no vhost-user, no guest; the rings cost a
few Python operations per frame) and a tunnel endpoint on loopback
(127.0.0.1 <-> 127.0.0.2). Frames are the largest a tunnel over a 1500-byte
underlay carries (1464 bytes, 1450 of IP). The sending side's CPU (guest TX
ring -> switch -> VXLAN encapsulation -> sendmsg) and the receiving side's
(recvfrom_into -> checks -> switch -> guest RX ring) are timed separately with
``time.process_time`` (this process only; the kernel's UDP work inside the
system calls counts, loopback delivery on the sender's side counts there).

    PYTHONPATH=. python benchmarks/tunnel_bench.py [--frames 200000]

Prints frames/s and CPU seconds per Gbit/s of frame bytes for each side.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from tests.support.net_frames import FakeRing, ether, mac, net_hdr
from vvu_runtime.backends.switch.port import BASE_FEATURES, SwitchPort
from vvu_runtime.backends.switch.switch import Switch
from vvu_runtime.backends.switch.vxlan import TunnelEndpoint, VxlanTunnel, max_frame

BURST = 64


def _side(address: str, peer: str, port: int, peer_port: int) -> tuple[Switch, SwitchPort,
                                                                         FakeRing, FakeRing,
                                                                         TunnelEndpoint]:
    switch = Switch()
    guest = SwitchPort(switch, "vm")
    guest.set_features(BASE_FEATURES)
    rx, tx = FakeRing(0), FakeRing(1)
    guest.queue_started(rx)
    guest.queue_started(tx)
    endpoint = TunnelEndpoint(switch, address, port)
    VxlanTunnel(endpoint, "peer", peer, 100, peer_port)
    return switch, guest, rx, tx, endpoint


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000)
    args = ap.parse_args()
    pa, pb = _free_port("127.0.0.1"), _free_port("127.0.0.2")
    sa, ga, _, txa, ea = _side("127.0.0.1", "127.0.0.2", pa, pb)
    sb, gb, rxb, _, eb = _side("127.0.0.2", "127.0.0.1", pb, pa)
    # A learned unicast destination on both switches (the common case).
    sa.fdb.learn(mac(2), ea.tunnels[0], sa.clock())
    sb.fdb.learn(mac(2), gb, sb.clock())
    ea.open()
    eb.open()
    assert ea.sock is not None and eb.sock is not None
    for s in (ea.sock, eb.sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    size = max_frame(1500)
    frame = ether(mac(2), mac(1), 0x0800, bytes(size - 14))
    hdr = net_hdr()
    send_cpu = recv_cpu = 0.0
    done = 0
    wall = time.monotonic()
    try:
        while done < args.frames:
            for _ in range(BURST):
                txa.add_tx(hdr, frame)
                rxb.add_rx(2048)
            t0 = time.process_time()
            ga.process(txa)
            t1 = time.process_time()
            eb.on_readable()
            t2 = time.process_time()
            send_cpu += t1 - t0
            recv_cpu += t2 - t1
            done += BURST
            txa.used.clear()
            rxb.used.clear()
        wall = time.monotonic() - wall
    finally:
        ea.close()
        eb.close()
    received = eb.tunnels[0].counters.in_packets
    gbit = received * size * 8 / 1e9
    print(f"frames {done} of {size} bytes sent, {received} received "
          f"({ea.tunnels[0].counters.dropped} dropped at the sender, "
          f"{eb.counters.unknown_peer} unknown) in {wall:.1f} s wall")
    for side, cpu in (("encapsulate + send", send_cpu), ("receive + decapsulate", recv_cpu)):
        print(f"{side:24} {done / cpu:10,.0f} frames/s of CPU, {cpu / gbit:.2f} CPU-s per Gbit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
