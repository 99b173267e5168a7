"""Serve a vhost-user device over a VVU function, one front-end after another.

:class:`VvuEndpoint` is the VVU counterpart of ``vhost_user.server.VhostUserServer``
(same ``start()`` / ``close()`` / ``session``), driving the link machine of
``virtio.vvu_link`` (A.7; the device model's tunnel runs the same one) from the
driver side, as DPDK-VVU does::

    DOWN       --drain rxq, set BACKEND_UP-->  ARMED (the device accepts a front-end)
    ARMED      --config interrupt, FRONTEND_UP set-->  CONNECTED: a BackendSession
               over a VvuChannel + VvuTransport
    CONNECTED  --FRONTEND_UP cleared (front-end gone)-->  DOWN: session closed, re-armed
    any        --session ended by us (protocol error): clear BACKEND_UP-->  DOWN, re-armed
               (the device drops the front-end; it reconnects)
    any        --DEVICE_NEEDS_RESET: session closed, device re-initialised-->  DOWN, re-armed
    any        --the device reads all-ones (device model gone)-->  GONE: logged, stopped

Configuration changes arrive as the config MSI-X eventfd; without interrupts the
status register is polled every ``status_poll`` seconds.

:class:`VvuLinkEndpoint` is that machine with the session left open: what runs
on a connection (:meth:`~VvuLinkEndpoint.new_session`) and whether the link may
be armed now (:meth:`~VvuLinkEndpoint.may_arm`: vvu-proxy arms only while its
back-end is connected, and calls :meth:`~VvuLinkEndpoint.arm` when it is).
:class:`VvuEndpoint` runs a :class:`BackendSession` over our own device.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from vvu_runtime.driver.access import PciAccess, open_function
from vvu_runtime.driver.errors import DeviceFault, DeviceGone, DriverError
from vvu_runtime.driver.pci import PciFunction
from vvu_runtime.driver.transport import VvuChannel, VvuTransport
from vvu_runtime.driver.vvu import (
    VvuDriver,
    drain_eventfd,
)
from vvu_runtime.vhost_user.backend import BackendSession
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.errors import TransportError
from vvu_runtime.virtio.vvu_abi import VvuStatus
from vvu_runtime.virtio.vvu_link import LinkEvent, LinkMachine, LinkState, LinkStateError

log = logging.getLogger(__name__)

#: Status poll period without interrupts (each poll is two trapped reads).
STATUS_POLL = 0.05
#: Delay before re-initialising a device that failed.
RETRY_DELAY = 1.0


class LinkSession(Protocol):
    """What runs on one front-end connection of a link."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class VvuLinkEndpoint:
    """The link machine of the VVU function ``address`` (or the given ``pci``); what
    runs on a connection is the subclass's :meth:`new_session`."""

    def __init__(self, label: str, address: str | None = None, *,
                 pci: PciFunction | None = None, access: PciAccess = PciAccess.AUTO,
                 virtio_id: int | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 status_poll: float = STATUS_POLL, rx_size: int = 128,
                 tx_size: int = 64) -> None:
        if (address is None) == (pci is None):
            raise ValueError("give either a PCI address or a PciFunction")
        self.address = address or (pci.address if pci is not None else "")
        self.access = access
        self.virtio_id = virtio_id
        self.loop = loop
        self.status_poll = status_poll
        self.rx_size = rx_size
        self.tx_size = tx_size
        self.pci = pci
        self._owns_pci = pci is None
        self.vvu: VvuDriver | None = None
        self.session: LinkSession | None = None
        self.connections = 0
        self._timer: asyncio.TimerHandle | None = None
        self._watched: int | None = None
        self._closed = False
        self.name = f"{label} @ vvu {self.address}"
        self.link = LinkMachine(self.name)

    # -- what subclasses decide ---------------------------------------------------------
    def new_session(self, channel: VvuChannel) -> LinkSession:
        """The session of a new front-end connection (started by the caller); it must
        call :meth:`session_closed` when it ends on its own."""
        raise NotImplementedError

    def may_arm(self) -> bool:
        """Whether BACKEND_UP may be set now (False: :meth:`arm` is called later)."""
        return True

    def check_queues(self, max_vhost_queues: int) -> None:
        """Called once the device is up with its ``max_vhost_queues``."""

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Open and start the device, arm it. TransportError (with the address) on failure."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        try:
            if self.pci is None:
                self.pci = open_function(self.address, self.access)
            self.vvu = VvuDriver(self.pci, virtio_id=self.virtio_id, rx_size=self.rx_size,
                                 tx_size=self.tx_size)
            self.vvu.start()
        except DriverError as exc:
            self._release()
            raise TransportError(f"VVU device {self.address}: {exc}") from exc
        self.check_queues(self.vvu.identity.max_vhost_queues)
        self._watch()
        try:
            self._arm()
        except DriverError as exc:
            self._unwatch()
            self._release()
            raise TransportError(f"VVU device {self.address}: {exc}") from exc

    def _watch(self) -> None:
        assert self.vvu is not None and self.loop is not None
        fd = self.vvu.config_eventfd
        if fd is not None:
            self.loop.add_reader(fd, self._on_config)
            self._watched = fd
        else:
            self._timer = self.loop.call_later(self.status_poll, self._on_poll)

    def _unwatch(self) -> None:
        if self._watched is not None and self.loop is not None:
            self.loop.remove_reader(self._watched)
            self._watched = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def arm(self) -> None:
        """Arm a link that waited for :meth:`may_arm` (no-op if not DOWN or closed)."""
        if self._closed or self.vvu is None or self.session is not None \
                or self.link.state is not LinkState.DOWN:
            return
        try:
            self._arm()
        except DriverError as exc:
            log.error("%s: cannot arm: %s; re-initialising in %.0f s", self.name, exc,
                      RETRY_DELAY)
            if self.loop is not None:
                self.loop.call_later(RETRY_DELAY, self._restart)

    def drop(self) -> None:
        """End the session (if any) and clear BACKEND_UP: the device drops the
        front-end, which reconnects once the link is armed again."""
        if self._closed or self.vvu is None:
            return
        self._end_session()
        try:
            self.vvu.set_backend_up(False)
            self._down()
            self._arm()
        except DriverError as exc:
            log.error("%s: cannot re-arm: %s", self.name, exc)

    def _arm(self) -> None:
        """Forget what is left on rxq (a gone front-end's), then accept the next one."""
        assert self.vvu is not None
        if not self.may_arm():
            return  # arm() comes later
        dropped = self.vvu.drain()
        if dropped:
            log.info("%s: dropped %d message(s) of the previous front-end", self.name, dropped)
        self.vvu.set_backend_up(True)
        if not self.vvu.read_status() & VvuStatus.BACKEND_UP:
            raise DeviceFault(f"{self.address}: BACKEND_UP does not stick (device "
                              f"status {self.vvu.virtio.status:#x})")
        self.link.fire(LinkEvent.BACKEND_UP)
        log.info("%s: ready for a front-end (BACKEND_UP)", self.name)

    def _down(self) -> None:
        """The link is down (whatever the cause): the next step is to arm it again."""
        if self.link.state is not LinkState.GONE:
            self.link.fire(LinkEvent.BACKEND_DOWN)

    # -- events -----------------------------------------------------------------------------
    def _on_config(self) -> None:
        assert self.vvu is not None
        drain_eventfd(self.vvu.config_eventfd)
        self._check(reset_check=True)

    def _on_poll(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._check(reset_check=True)
        if not self._closed and self.vvu is not None and self._watched is None \
                and self.loop is not None and self._timer is None:
            self._timer = self.loop.call_later(self.status_poll, self._on_poll)

    def _check(self, *, reset_check: bool) -> None:
        vvu = self.vvu
        if vvu is None or self._closed:
            return
        try:
            if reset_check and vvu.needs_reset:
                log.error("%s: the device needs a reset; re-initialising it", self.name)
                self._end_session()
                self._down()
                vvu.start()
                self._arm()
                return
            status = vvu.read_status()
            if self.session is None:
                if status & VvuStatus.FRONTEND_UP:
                    self._open_session()
                elif not status & VvuStatus.BACKEND_UP:
                    self._down()
                    self._arm()
            elif not status & VvuStatus.FRONTEND_UP:
                log.info("%s: front-end disconnected (FRONTEND_UP cleared)", self.name)
                self.link.fire(LinkEvent.FRONTEND_GONE)
                self._end_session()
                self._arm()
        except DeviceGone as exc:
            log.error("%s: %s; this device is dead until the appliance restarts", self.name,
                      exc)
            self.link.fire(LinkEvent.DEVICE_GONE)
            self._end_session()
            self._unwatch()
            self.vvu = None
        except (DriverError, LinkStateError) as exc:
            log.error("%s: %s; re-initialising in %.0f s", self.name, exc, RETRY_DELAY)
            self._end_session()
            self._down()
            if self.loop is not None:
                self.loop.call_later(RETRY_DELAY, self._restart)

    def _restart(self) -> None:
        if self._closed or self.vvu is None or self.session is not None:
            return
        try:
            self.vvu.start()
            self._arm()
        except DriverError as exc:
            log.error("%s: %s; retrying in %.0f s", self.name, exc, RETRY_DELAY)
            if self.loop is not None:
                self.loop.call_later(RETRY_DELAY, self._restart)

    def _open_session(self) -> None:
        assert self.vvu is not None
        self.link.fire(LinkEvent.FRONTEND_UP)
        self.connections += 1
        channel = VvuChannel(self.vvu, loop=self.loop,
                             name=f"{self.name} #{self.connections}")
        self.session = self.new_session(channel)
        self.session.start()

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    def session_closed(self, session: object) -> None:
        """The session ended (front-end gone, or a fatal error on our side)."""
        if self.session is not session:
            return  # ended by _end_session: the caller re-arms
        self.session = None
        if self._closed or self.vvu is None:
            return
        # Ended on our side (the front-end may still be there): drop it, then re-arm.
        try:
            self.vvu.set_backend_up(False)
            self._down()
            self._arm()
        except DriverError as exc:
            log.error("%s: cannot re-arm: %s", self.name, exc)

    def close(self) -> None:
        """End the session, clear BACKEND_UP (the front-end reconnects to whoever comes
        next), reset the device and release the function (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        self._end_session()
        if self.vvu is not None:
            try:
                self.vvu.set_backend_up(False)
            except DriverError as exc:
                log.debug("%s: clearing BACKEND_UP failed: %s", self.name, exc)
        self._down()
        self._release()

    def _release(self) -> None:
        if self.vvu is not None:
            self.vvu.close()
            self.vvu = None
        if self.pci is not None and self._owns_pci:
            self.pci.close()
            self.pci = None


class VvuEndpoint(VvuLinkEndpoint):
    """Serve ``device`` on the VVU function ``address`` (or the given ``pci``)."""

    def __init__(self, device: VhostUserDevice, address: str | None = None, *,
                 pci: PciFunction | None = None, access: PciAccess = PciAccess.AUTO,
                 virtio_id: int | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 status_poll: float = STATUS_POLL, rx_size: int = 128,
                 tx_size: int = 64) -> None:
        super().__init__(device.name, address, pci=pci, access=access, virtio_id=virtio_id,
                         loop=loop, status_poll=status_poll, rx_size=rx_size,
                         tx_size=tx_size)
        self.device = device

    def check_queues(self, max_vhost_queues: int) -> None:
        if self.device.num_queues() > max_vhost_queues:
            log.warning("%s: the device has %d queues, the VVU device tunnels %d; queues past "
                        "that are polled and never signalled", self.name,
                        self.device.num_queues(), max_vhost_queues)

    def new_session(self, channel: VvuChannel) -> BackendSession:
        return BackendSession(channel, self.device, loop=self.loop,
                              transport=VvuTransport(channel), on_close=self.session_closed,
                              name=f"vvu {self.address} connection {self.connections}")


__all__ = ["LinkSession", "VvuEndpoint", "VvuLinkEndpoint"]
