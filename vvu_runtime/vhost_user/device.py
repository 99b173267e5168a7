"""The contract between a vhost-user session and the device logic it drives.

A backend (``vvu_runtime.backends``) implements :class:`VhostUserDevice`; the
session (``backend.BackendSession``) owns the protocol, the memory table and the
vrings, and calls the device when rings start, stop or are kicked. The device
never sees a message, a socket or a transport: the same device runs over a UNIX
socket on a host and over the VVU transport inside an appliance.

Devices touch rings only through :class:`Vring` (``pop``/``push``/``notify``),
so that inflight tracking, dirty logging and interrupt suppression stay in one
place.

Call order, per connection (owned by the vhost_user engineer; tell them before
relying on anything not written here):

* ``features()``, ``protocol_features()``, ``num_queues()``, ``max_queue_size()``
  may be called at any time, also before a connection; return constants.
* ``set_features(f)`` after SET_FEATURES (``f`` without the vhost-user bits 26/30).
* ``queue_started(vring)`` when a ring has memory, size, addresses and a kick (or
  NOFD = polling); ``process(vring)`` on every kick from then on, and once right
  after start and after SET_VRING_ENABLE(1) so buffers made available before are
  not missed. ``process`` may see a started but disabled ring (``vring.enabled``
  False): consume without side effects (net: drop TX, leave RX alone).
* ``queue_stopped(vring)`` on GET_VRING_BASE, RESET_DEVICE, a ring failure or a
  disconnect; ``reset()`` after all rings stopped on disconnect/RESET_DEVICE/
  RESET_OWNER. The same device object then serves the next connection.
* A :class:`~vvu_runtime.virtio.errors.VirtioError` raised from ``process`` fails
  only that ring (``vring.fail``: logged, err notifier, NEEDS_RESET); any other
  exception is logged and drops the connection. Never block in these hooks: they
  run on the event loop shared by every session of the process.
* ``get_config``/``set_config``: the session offers the CONFIG protocol feature
  when the device overrides ``get_config`` (or returns ``1 << 9`` from
  ``protocol_features()``). Raise ``ValueError`` from ``set_config`` to refuse a write.
  RARP (bit 2) and NET_MTU (bit 4) may also come from ``protocol_features()``; the
  session then calls optional ``send_rarp(mac: bytes)`` / ``set_mtu(mtu: int)``.
* ``attach(control)`` when a connection starts, ``attach(None)`` when it ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vvu_runtime.vhost_user.vring import Vring


class DeviceControl(Protocol):
    """What a device may ask of the session driving it (see ``VhostUserDevice.attach``)."""

    name: str

    def config_changed(self) -> bool:
        """Send BACKEND_CONFIG_CHANGE_MSG (the front-end re-reads the config space).
        False when the front-end has no backend channel or did not take it."""
        ...


class VhostUserDevice(ABC):
    """Device logic behind one vhost-user connection."""

    #: Names this device in logs ("port vm1", "disk /srv/a.img").
    name: str = "device"

    @abstractmethod
    def num_queues(self) -> int:
        """Most queues this device serves (GET_QUEUE_NUM)."""

    def max_queue_size(self) -> int:
        """Largest ring size accepted by SET_VRING_NUM."""
        return 1024

    @abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered: device bits and ring bits (INDIRECT_DESC,
        EVENT_IDX, VERSION_1, RING_PACKED ...). The session adds the vhost-user
        bits itself (PROTOCOL_FEATURES, LOG_ALL)."""

    def protocol_features(self) -> int:
        """Device-specific protocol feature bits (CONFIG, INFLIGHT_SHMFD, ...).
        The session adds what it implements for every device."""
        return 0

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The front-end acknowledged ``features`` (SET_FEATURES)."""

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes of the virtio config space (GET_CONFIG). Zero-filled past the end."""
        return bytes(size)

    def set_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional hook
        """The front-end wrote the config space (SET_CONFIG)."""

    @abstractmethod
    def queue_started(self, vring: Vring) -> None:
        """``vring`` has memory, addresses and a kick: the device may use it."""

    @abstractmethod
    def queue_stopped(self, vring: Vring) -> None:
        """``vring`` stopped (GET_VRING_BASE, disconnect, reset): drop references to it."""

    @abstractmethod
    def process(self, vring: Vring) -> None:
        """The driver kicked ``vring`` (or a poll found work): serve what is available."""

    def attach(self, control: DeviceControl | None) -> None:  # noqa: B027 - optional hook
        """A session now drives this device (``control``), or none does (``None``,
        after ``reset()`` on disconnect). Keep ``control`` to call
        ``control.config_changed()`` when the config space changes (a resized disk,
        a link going down); call it from the event-loop thread."""

    def send_rarp(self, mac: bytes) -> None:  # noqa: B027 - optional hook
        """SEND_RARP (protocol feature RARP): announce ``mac`` after a migration."""

    def set_mtu(self, mtu: int) -> None:  # noqa: B027 - optional hook
        """NET_SET_MTU (protocol feature NET_MTU): the front-end's MTU for a net device."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The front-end went away or sent RESET_DEVICE: forget negotiated state."""
