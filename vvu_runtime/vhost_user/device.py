"""The contract between a vhost-user session and the device logic it drives.

A backend (``vvu_runtime.backends``) implements :class:`VhostUserDevice`; the
session (``backend.BackendSession``) owns the protocol, the memory table and the
vrings, and calls the device when rings start, stop or are kicked. The device
never sees a message, a socket or a transport: the same device runs over a UNIX
socket on a host and over the VVU transport inside an appliance.

Devices touch rings only through :class:`Vring` (``pop``/``push``/``notify``),
so that inflight tracking, dirty logging and interrupt suppression stay in one
place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vvu_runtime.vhost_user.vring import Vring


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

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The front-end went away or sent RESET_DEVICE: forget negotiated state."""
