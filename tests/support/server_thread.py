"""A vfio-user server's event loop in a background thread, for tests that drive it
with the blocking client (tests/support/vfio_user_client.py)."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.loop_thread import LoopThread
from vvu_runtime.device.vfio_user.server import VfioUserServer


class ServerThread(LoopThread):
    """Runs a server's event loop in a background thread (a context manager).

    Everything touching the device must run on that loop: use :meth:`call`.
    """

    def __init__(self, server_factory: Callable[[], VfioUserServer]) -> None:
        super().__init__("vfio-user-server", start=False)
        self._factory = server_factory
        self.server: VfioUserServer | None = None

    def __enter__(self) -> ServerThread:
        self.start()
        self.server = self.call(self._factory)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            self.call(self.server.close)
        super().stop()
