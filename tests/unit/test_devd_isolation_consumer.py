"""One consumer cannot stop ``vvu-devd`` or another link (issue 9, the consumer side).

A real ``vvu-devd`` process serves two devices: ``att0``, whose front-end is
the attacker, and ``ok0``, a well-behaved link. Both appliances are the driver
double over a vfio-user client (rings in DMA-mapped memfds, MSI-X eventfds);
the consumers are ``vhost_user.frontend`` over devd's real sockets. Each test
mounts one attack through ``att0``'s front-end (the fds it passes share their
open files with the attacker, who may change their flags or counters at any
time) and then proves, while the attack stands:

* devd's CPU stays low (utime + stime from /proc/PID/stat over one second);
* ``ok0`` still completes a message round trip (front-end → rxq → txq →
  front-end) and a kick → MSI-X interrupt;
* devd answers SIGTERM and exits 0, with no traceback in its log.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.devd import DevdProcess
from tests.support.proc_cpu import cpu_share
from tests.support.vhost_user_harness import EchoDevice
from tests.support.vvu_chain import Appliance, DeviceModel
from tests.support.vvu_driver_double import (
    CONFIG_VECTOR,
    TIMEOUT,
    N,
    VvuDriverDouble,
    attach_driver,
    fired,
    header,
    wait_for,
)
from vvu_runtime.device import tunnel as tunnel_mod
from vvu_runtime.device.tunnel import SEMAPHORE_STREAK
from vvu_runtime.fds import EventfdInfo
from vvu_runtime.vhost_user import messages as m
from vvu_runtime.vhost_user.errors import ConnectionClosed, TransportError
from vvu_runtime.vhost_user.frontend import VhostUserFrontend
from vvu_runtime.vhost_user.messages import FrontendRequest as FR
from vvu_runtime.virtio.vvu_abi import VvuStatus

MiB = 1 << 20
UP = VvuStatus.BACKEND_UP | VvuStatus.FRONTEND_UP
#: devd's share of one core allowed while an attack stands (a spinning devd
#: takes a whole core; an idle one a few per cent).
CPU_LIMIT = 0.25
EVENTFD_MAX = (1 << 64) - 2


def assert_dropped(fe: VhostUserFrontend) -> None:
    """devd closes ``fe``'s connection (EOF or reset; not a silence that times out)."""
    try:
        frame = fe.channel.recv_frame(TIMEOUT)
    except ConnectionClosed:
        return
    except TransportError as exc:
        assert "no message within" not in str(exc), "the connection was not dropped"
        return
    raise AssertionError(f"a message instead of the drop: request {frame.request}")


@dataclass
class Link:
    """One device of the devd process: its appliance driver and front-ends."""

    name: str
    vhost: Path
    driver: VvuDriverDouble
    frontends: list[VhostUserFrontend] = field(default_factory=list)

    def connect(self) -> VhostUserFrontend:
        fe = VhostUserFrontend.connect(self.vhost, timeout=TIMEOUT)
        self.frontends.append(fe)
        return fe

    def up(self) -> VhostUserFrontend:
        """BACKEND_UP, a front-end connects, FRONTEND_UP with a config interrupt."""
        self.driver.set_backend_up()
        fe = self.connect()
        wait_for(lambda: self.driver.vvu_status == UP, f"{self.name}: FRONTEND_UP")
        assert fired(self.driver.vectors[CONFIG_VECTOR])
        return fe

    def forwarded(self, request: FR) -> None:
        """The next rxq message is ``request`` (so devd has consumed its fds)."""
        assert header(self.driver.recv())[0] == request

    def round_trip(self, fe: VhostUserFrontend) -> None:
        """GET_FEATURES through rxq, its reply through txq."""
        fe.channel.send_frame(*m.encode(FR.GET_FEATURES))
        assert header(self.driver.recv()) == (FR.GET_FEATURES, 1, 0)
        self.driver.reply(FR.GET_FEATURES, m.U64(0x1234))
        frame = fe.channel.recv_frame(TIMEOUT)
        assert (frame.request, frame.payload) == (FR.GET_FEATURES, m.U64(0x1234).pack())

    def kick_interrupts(self, fe: VhostUserFrontend, index: int = 0) -> None:
        """A kick eventfd for vring ``index``; a kick raises its MSI-X vector."""
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            fe.set_vring_kick(index, kick)
            self.forwarded(FR.SET_VRING_KICK)
            os.eventfd_write(kick, 1)
            assert fired(self.driver.vectors[3 + index])
        finally:
            os.close(kick)

    def close(self) -> None:
        for fe in self.frontends:
            fe.close()
        self.driver.close()


class Rig:
    """``vvu-devd`` serving ``att0`` and ``ok0``, both appliances up, ``ok0`` connected."""

    def __init__(self, tmp: Path) -> None:
        devices = []
        for name in ("att0", "ok0"):
            ram = tmp / f"{name}.ram"
            with ram.open("wb") as f:
                f.truncate(8 * MiB)
            devices.append((name, tmp / f"{name}.vhost", tmp / f"{name}.vfio", ram))
        self.devd = DevdProcess(devices, tmp / "devd.log", "--max-queues", str(N))
        self.links: dict[str, Link] = {}
        try:
            for name, vhost, _, _ in devices:
                driver = attach_driver(self.devd.client(name), name)
                self.links[name] = Link(name, vhost, driver)
                driver.bring_up()
            self.ok_fe = self.ok.up()
        except BaseException:
            self.close()
            raise

    @property
    def att(self) -> Link:
        return self.links["att0"]

    @property
    def ok(self) -> Link:
        return self.links["ok0"]

    def cpu_share(self, seconds: float = 1.0) -> float:
        """devd's CPU time over ``seconds`` of wall time, as a share of one core."""
        return cpu_share(self.devd.proc.pid, seconds)

    def assert_isolated(self) -> None:
        """While the attack stands: low CPU, and ``ok0`` serves."""
        assert self.devd.proc.poll() is None, self.devd.log()
        share = self.cpu_share()
        assert share < CPU_LIMIT, f"vvu-devd used {share:.0%} of a core during the attack"
        self.ok.round_trip(self.ok_fe)
        self.ok.kick_interrupts(self.ok_fe)

    def stop(self) -> str:
        """SIGTERM: devd exits 0 (not killed); its log."""
        assert self.devd.stop() == 0, f"vvu-devd did not exit on SIGTERM:\n{self.devd.log()}"
        log = self.devd.log()
        assert "Traceback" not in log
        for vhost, vfio, _ in self.devd.devices.values():
            assert not vhost.exists() and not vfio.exists(), "a socket file left behind"
        return log

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.devd.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def test_a_blocking_backend_request_socket_with_half_a_header(rig: Rig) -> None:
    fe = rig.att.up()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fe.channel.send_frame(*m.encode(FR.SET_BACKEND_REQ_FD, m.EMPTY), [theirs.fileno()])
        rig.att.forwarded(FR.SET_BACKEND_REQ_FD)
        # devd's copy shares theirs' open file: make it blocking, then half a header.
        theirs.setblocking(True)
        ours.send(m.HEADER.pack(1, 0, 0)[:6])
        rig.assert_isolated()
        # att0 still works too: the half message waits for its other half.
        rig.att.round_trip(fe)
        log = rig.stop()
    assert "att0: front-end error" not in log


def test_a_kick_eventfd_shared_by_two_vrings_and_made_blocking(rig: Rig) -> None:
    fe = rig.att.up()
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.set_vring_kick(0, kick)
        rig.att.forwarded(FR.SET_VRING_KICK)
        fe.set_vring_kick(1, kick)
        os.set_blocking(kick, True)
        # The second role is refused: the link drops, naming both roles.
        assert_dropped(fe)
        rig.devd.wait_log("SET_VRING_KICK: vring 1: the eventfd given as the kick of vring 1 "
                          "is already the kick of vring 0 of this link")
        for _ in range(3):
            os.eventfd_write(kick, 1)
        rig.assert_isolated()
    finally:
        os.close(kick)
    assert rig.devd.table("att0")["resets"] == "1"
    rig.stop()


def test_one_eventfd_as_kick_and_call_is_refused_and_the_link_serves_again(rig: Rig) -> None:
    fe = rig.att.up()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.set_vring_kick(0, efd)
        rig.att.forwarded(FR.SET_VRING_KICK)
        fe.set_vring_call(0, efd)
        assert_dropped(fe)
        rig.devd.wait_log("SET_VRING_CALL: vring 0: the eventfd given as the call of vring 0 "
                          "is already the kick of vring 0 of this link")
        rig.assert_isolated()
        # Across links too: ok0's consumer cannot take an eventfd att0 holds.
        fe = rig.att.up()
        fe.set_vring_call(2, efd)
        rig.att.forwarded(FR.SET_VRING_CALL)
        rig.ok_fe.set_vring_err(1, efd)
        assert_dropped(rig.ok_fe)
        rig.devd.wait_log("SET_VRING_ERR: vring 1: the eventfd given as the err of vring 1 "
                          "is already the call of vring 2 of device att0")
        # att0 keeps serving, with its call eventfd working.
        rig.att.round_trip(fe)
        rig.att.driver.doorbell(2)
        assert fired(efd)
        # Once att0's consumer is gone, the eventfd is free for ok0's.
        fe.close()
        wait_for(lambda: rig.att.driver.vvu_status == 0, "att0: the disconnect")
        ok_fe = rig.ok.up()
        ok_fe.set_vring_err(1, efd)
        rig.ok.forwarded(FR.SET_VRING_ERR)
        rig.ok.driver.doorbell(N + 1)  # err doorbell of vring 1
        assert fired(efd)
    finally:
        os.close(efd)
    rig.stop()


def test_a_saturated_blocking_call_eventfd(rig: Rig) -> None:
    fe = rig.att.up()
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.set_vring_call(0, call)
        rig.att.forwarded(FR.SET_VRING_CALL)
        os.eventfd_write(call, EVENTFD_MAX)
        os.set_blocking(call, True)
        # The appliance rings call doorbell 0: a write there would block devd.
        for _ in range(3):
            rig.att.driver.doorbell(0)
        rig.assert_isolated()
        assert rig.devd.table("att0")["db merged"] == "3"
        # The wake-up was pending anyway; once the consumer takes it, doorbells fire.
        assert os.eventfd_read(call) == EVENTFD_MAX
        rig.att.driver.doorbell(0)
        assert os.eventfd_read(call) == 1
        rig.att.round_trip(fe)
    finally:
        os.close(call)
    rig.stop()


def test_a_semaphore_mode_kick_storm_is_refused(rig: Rig) -> None:
    fe = rig.att.up()
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
    try:
        os.eventfd_write(kick, EVENTFD_MAX)
        fe.set_vring_kick(0, kick)
        assert_dropped(fe)
        rig.devd.wait_log("SET_VRING_KICK: vring 0: the kick eventfd was made with "
                          "EFD_SEMAPHORE")
        rig.assert_isolated()
    finally:
        os.close(kick)
    rig.stop()


def test_a_consumer_reconnecting_while_the_backend_is_down_is_refused_at_once(
        rig: Rig) -> None:
    fe = rig.att.up()
    rig.att.round_trip(fe)
    rig.att.driver.set_backend_up(False)  # the appliance's back-end went away
    assert_dropped(fe)
    # A reconnect is refused by the kernel (nobody listens), not parked in a backlog
    # where its handshake would block the consumer's QEMU.
    with pytest.raises(TransportError, match="Connection refused"):
        rig.att.connect()
    assert rig.att.vhost.exists()
    assert rig.devd.table("att0")["consumer"] == "refusing until BACKEND_UP"
    rig.assert_isolated()
    # The back-end is back: the consumer's next retry is accepted.
    again = rig.att.up()
    rig.att.round_trip(again)
    rig.stop()


def test_sigterm_ends_devd_while_the_attacks_stand(rig: Rig) -> None:
    """A half message on a blocking back-end request socket and a saturated blocking
    call eventfd at once, each doorbell rung; devd still ends on SIGTERM."""
    fe = rig.att.up()
    ours, theirs = socket.socketpair()
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.channel.send_frame(*m.encode(FR.SET_BACKEND_REQ_FD, m.EMPTY), [theirs.fileno()])
        rig.att.forwarded(FR.SET_BACKEND_REQ_FD)
        fe.set_vring_call(0, call)
        rig.att.forwarded(FR.SET_VRING_CALL)
        theirs.setblocking(True)
        ours.send(bytes(5))
        os.eventfd_write(call, EVENTFD_MAX)
        os.set_blocking(call, True)
        rig.att.driver.doorbell(0)
        rig.assert_isolated()
        rig.stop()
    finally:
        os.close(call)
        ours.close()
        theirs.close()


def test_a_semaphore_kick_storm_on_a_kernel_whose_fdinfo_does_not_say(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older kernels' fdinfo has no ``eventfd-semaphore``: the tunnel then spots a
    kick eventfd that stays readable after every read of 1 and drops the link
    (in-process chain, with the kernel's answer hidden)."""
    real = tunnel_mod.eventfd_info
    monkeypatch.setattr(tunnel_mod, "eventfd_info",
                        lambda fd: EventfdInfo(real(fd).ident, None))
    model = DeviceModel(tmp_path, "att0", max_queues=2)
    appliance = Appliance()
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
    try:
        appliance.serve(EchoDevice(), model)
        wait_for(lambda: model.status() == VvuStatus.BACKEND_UP, "BACKEND_UP")
        fe = VhostUserFrontend.connect(model.sock_path, timeout=TIMEOUT)
        try:
            fe.negotiate()
            fe.set_vring_kick(0, kick)
            os.eventfd_write(kick, EVENTFD_MAX)
            assert_dropped(fe)
        finally:
            fe.close()
        stats = model.thread.call(lambda: model.device.stats.as_dict())
        assert stats["link_resets"] == 1
        # Dropped at the SEMAPHORE_STREAK-th read of 1, not after ~2**64 notifications.
        assert stats["kicks"] == SEMAPHORE_STREAK - 1
    finally:
        os.close(kick)
        appliance.close()
        model.close()
