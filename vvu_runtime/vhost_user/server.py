"""Listening and connecting vhost-user endpoints (placeholder until the session lands)."""

from __future__ import annotations

import os

from vvu_runtime.vhost_user.device import VhostUserDevice


class VhostUserServer:
    """Listen on a UNIX socket path and serve one session at a time."""

    def __init__(self, path: str | os.PathLike[str], device: VhostUserDevice) -> None:
        self.path = os.fspath(path)
        self.device = device

    def start(self) -> None:
        raise NotImplementedError("vhost-user server lands with the backend session")

    def close(self) -> None:
        pass


class VhostUserClient:
    """Connect to a listening front-end, retrying, and serve the session."""

    def __init__(self, path: str | os.PathLike[str], device: VhostUserDevice, *,
                 retry_interval: float = 1.0) -> None:
        self.path = os.fspath(path)
        self.device = device
        self.retry_interval = retry_interval

    def start(self) -> None:
        raise NotImplementedError("vhost-user client lands with the backend session")

    def close(self) -> None:
        pass
