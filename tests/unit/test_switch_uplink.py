"""The TAP uplink: against a fake TAP (a SEQPACKET socketpair has the same
one-frame-per-read semantics), and against a real TAP in a private network
namespace (needs root and ``unshare``; skipped, naming what is missing, without).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
from vvu_runtime.backends.switch.port import BASE_FEATURES, OFFLOAD_FEATURES, SwitchPort
from vvu_runtime.backends.switch.switch import Drop, Switch
from vvu_runtime.backends.switch.uplink import (
    _OFFLOAD_CHOICES,
    _TO_KERNEL,
    TapUplink,
    UplinkError,
    tun_offloads_to_features,
)
from vvu_runtime.virtio.net import GsoType, HdrFlags, NetFeature, VirtioNetHdr


class FakeTap:
    def __init__(self, switch: Switch) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.kernel.settimeout(2)
        self.up = TapUplink(switch, "tap0")
        self.up.fd = self.ours.fileno()
        self.up.set_offloads(_TO_KERNEL, send=tun_offloads_to_features(_OFFLOAD_CHOICES[0]))

    def close(self) -> None:
        self.up.fd = -1
        self.ours.close()
        self.kernel.close()


def _guest(switch: Switch, name: str, features: int = BASE_FEATURES) -> tuple[SwitchPort,
                                                                              FakeRing,
                                                                              FakeRing]:
    port = SwitchPort(switch, name)
    port.set_features(features)
    rx, tx = FakeRing(0), FakeRing(1)
    for _ in range(64):
        rx.add_rx(4096)
    port.queue_started(rx)
    port.queue_started(tx)
    return port, rx, tx


@pytest.fixture
def switch() -> Switch:
    return Switch()


@pytest.fixture
def tap(switch: Switch) -> Iterator[FakeTap]:
    t = FakeTap(switch)
    yield t
    t.close()


def test_guest_frames_go_to_the_kernel_with_their_header(switch: Switch, tap: FakeTap) -> None:
    port, _, tx = _guest(switch, "vm1")
    frame, start, off = with_partial_csum(tcp4_frame(BROADCAST, mac(1), os.urandom(30000)))
    hdr = net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, start, off)
    tx.add_tx(hdr, frame)  # header in its own descriptor, as Linux sends TCP
    port.process(tx)
    got = tap.kernel.recv(70000)
    assert got == hdr + frame  # the kernel takes TSO as it is
    assert tap.up.counters.out_packets == 1


def test_kernel_frames_reach_guests(switch: Switch, tap: FakeTap) -> None:
    _, rx, _ = _guest(switch, "vm1")
    f = ether(BROADCAST, mac(9), 0x0806, bytes(28))
    tap.kernel.send(net_hdr() + f)
    tap.kernel.send(net_hdr() + f)
    tap.up.on_readable()
    assert [d for _, d in rx.received_frames()] == [f, f]
    assert rx.notifications == 1  # once per batch read
    assert tap.up.counters.in_packets == 2
    assert mac(9) in switch.fdb


def test_kernel_tso_segmented_for_a_guest_without_it(switch: Switch, tap: FakeTap) -> None:
    _, rx, _ = _guest(switch, "vm1", BASE_FEATURES & ~OFFLOAD_FEATURES)
    frame, start, off = with_partial_csum(tcp4_frame(BROADCAST, mac(9), os.urandom(5000)))
    tap.kernel.send(net_hdr(HdrFlags.NEEDS_CSUM, GsoType.TCPV4, 54, 1448, start, off) + frame)
    tap.up.on_readable()
    got = rx.received_frames()
    assert len(got) == 4 and all(l4_checksum_ok(d) for _, d in got)


def test_data_valid_from_the_kernel_is_believed(switch: Switch, tap: FakeTap) -> None:
    _, rx, _ = _guest(switch, "vm1")
    f = ether(BROADCAST, mac(9), 0x0800, bytes(50))
    tap.kernel.send(net_hdr(HdrFlags.DATA_VALID) + f)
    tap.up.on_readable()
    [(h, _)] = rx.received_frames()
    assert h.flags == HdrFlags.DATA_VALID


def test_write_failure_is_counted_not_raised(switch: Switch, tap: FakeTap) -> None:
    port, _, tx = _guest(switch, "vm1")
    tap.kernel.close()
    tx.add_tx(net_hdr() + ether(BROADCAST, mac(1), 0x0800, bytes(50)))
    port.process(tx)
    assert tap.up.counters.drops == {Drop.UPLINK_ERROR: 1}


def test_offload_mapping() -> None:
    assert tun_offloads_to_features(0) == 0
    f = tun_offloads_to_features(_OFFLOAD_CHOICES[0])
    for bit in (NetFeature.CSUM, NetFeature.HOST_TSO4, NetFeature.HOST_TSO6,
                NetFeature.HOST_ECN, NetFeature.HOST_UFO, NetFeature.HOST_USO):
        assert f & bit.mask
    with pytest.raises(ValueError):
        TapUplink(Switch(), "a-name-much-too-long")


def test_open_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import vvu_runtime.backends.switch.uplink as uplink_mod

    monkeypatch.setattr(uplink_mod, "TUN_DEVICE", "/nonexistent/tun")
    up = TapUplink(Switch(), "tap9")
    with pytest.raises(UplinkError, match="uplink tap9: cannot open /nonexistent/tun") as info:
        up.open()
    assert info.value.errno == 2 and up.fd == -1


# --------------------------------------------------------------------------- real TAP

def _unshare_works() -> str | None:
    if os.geteuid() != 0:
        return "host capability missing: root (CAP_NET_ADMIN) for a TAP device"
    if not os.path.exists("/dev/net/tun"):
        return "host capability missing: /dev/net/tun"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "host capability missing: unshare(1) and ip(8)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"host capability missing: network namespaces ({probe.stderr.decode().strip()})"
    return None


def test_real_tap_in_a_network_namespace() -> None:
    why = _unshare_works()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    # Run as a module from the checkout root, so its tests.support imports resolve.
    proc = subprocess.run(["unshare", "--net", sys.executable, "-m", __name__, "scenario"],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["arp_reply"] and result["ping_reply"]
    assert result["uso_passthrough"] == [int(GsoType.UDP_L4), 1400]
    assert result["uso_segmented"] >= 4


def _scenario(tmp: Path) -> dict[str, object]:
    """Runs inside a fresh network namespace: a switch with one guest port and
    the uplink; the guest talks to the namespace's own stack."""
    from tests.support.loop_thread import LoopThread
    from tests.support.net_frames import DriverPort
    from vvu_runtime.vhost_user.server import VhostUserServer

    lt = LoopThread()
    loop, call = lt.loop, lt.call

    sw = Switch()
    ports = {n: SwitchPort(sw, n) for n in ("full", "plain")}
    servers = [VhostUserServer(f"{tmp}/{n}.sock", p, loop=loop) for n, p in ports.items()]
    uplink = TapUplink(sw, "vvutap0")
    for s in servers:
        call(s.start)
    call(lambda: uplink.attach(loop))
    ip = ["ip"]
    subprocess.run([*ip, "link", "set", "lo", "up"], check=True)
    subprocess.run([*ip, "link", "set", "vvutap0", "up"], check=True)
    subprocess.run([*ip, "addr", "add", "10.9.0.1/24", "dev", "vvutap0"], check=True)
    subprocess.run([*ip, "neigh", "add", "10.9.0.2", "lladdr", "02:00:00:00:00:01",
                    "dev", "vvutap0"], check=True)
    subprocess.run([*ip, "neigh", "add", "10.9.0.3", "lladdr", "02:00:00:00:00:02",
                    "dev", "vvutap0"], check=True)
    out: dict[str, object] = {}
    no_uso = NetFeature.GUEST_USO4.mask | NetFeature.GUEST_USO6.mask | \
        NetFeature.GUEST_CSUM.mask
    with DriverPort(f"{tmp}/full.sock", rx_buffer=4096) as g, \
            DriverPort(f"{tmp}/plain.sock", exclude=no_uso) as p:
        p.send(ether(BROADCAST, mac(2), 0x0806, bytes(28)))  # be known (a gratuitous hi)
        # ARP: who has 10.9.0.1? tell 10.9.0.2
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(1),
                          bytes([10, 9, 0, 2]), bytes(6), bytes([10, 9, 0, 1]))
        g.send(ether(BROADCAST, mac(1), 0x0806, arp))
        replies = [f for _, f in g.receive(3, timeout=3)]
        out["arp_reply"] = any(f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02"
                               for f in replies)
        # ICMP echo to the namespace's address
        from tests.support.net_frames import ipv4
        from vvu_runtime.backends.switch.offload import checksum_finish, checksum_sum

        icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x77, 1) + b"vvu-ping" * 4)
        struct.pack_into("!H", icmp, 2, checksum_finish(checksum_sum(icmp)))
        link = json.loads(subprocess.run([*ip, "-j", "link", "show", "vvutap0"], check=True,
                                         capture_output=True, text=True).stdout)
        tap_mac = bytes.fromhex(link[0]["address"].replace(":", ""))
        g.send(ether(tap_mac, mac(1), 0x0800,
                     ipv4(bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1]), 1, bytes(icmp), frag=0)))
        got = [f for _, f in g.receive(5, timeout=3)]
        out["ping_reply"] = any(f[23] == 1 and f[34] == 0 for f in got if len(f) > 34)
        # The kernel sends one 8400-byte UDP GSO packet (UDP_SEGMENT): the guest with
        # USO gets it whole, the guest without gets datagrams cut by the switch.
        udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_sock.setsockopt(socket.SOL_UDP, 103, 1400)  # UDP_SEGMENT
        udp_sock.sendto(os.urandom(8400), ("10.9.0.2", 5001))
        frames = g.receive(1, timeout=3)
        uso: list[int] = []
        for h, _f in frames:
            if isinstance(h, VirtioNetHdr) and h.gso_type:
                uso = [h.gso_type, h.gso_size]
        out["uso_passthrough"] = uso
        udp_sock.sendto(os.urandom(8400), ("10.9.0.3", 5001))
        segs = [f for _, f in p.receive(8, timeout=3)
                if f[12:14] == b"\x08\x00" and f[23] == 17]
        out["uso_segmented"] = sum(1 for f in segs if l4_checksum_ok(f))
        out["drops"] = {pt.port_name: {r.value: n for r, n in pt.counters.drops.items()}
                        for pt in sw.ports}
    return out


if __name__ == "__main__" and sys.argv[1:] == ["scenario"]:
    # The namespace's vhost-user sockets live in a directory removed with the run.
    with tempfile.TemporaryDirectory(prefix="vvu-uplink-") as _tmp:
        print(json.dumps(_scenario(Path(_tmp))))
