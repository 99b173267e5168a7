"""A vfio-user server's event loop in a background thread, for tests that drive it
with the blocking client (tests/support/vfio_user_client.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from vvu_runtime.device.vfio_user.server import VfioUserServer

T = TypeVar("T")


class ServerThread:
    """Runs a server's event loop in a background thread (tests, probes).

    Everything touching the device must run on that loop: use :meth:`call`.
    """

    def __init__(self, server_factory: Callable[[], VfioUserServer]) -> None:
        self.loop = asyncio.new_event_loop()
        self._factory = server_factory
        self.server: VfioUserServer | None = None
        self._thread = threading.Thread(target=self._run, name="vfio-user-server", daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        self.server = self.call(self._factory)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn()`` on the server's loop and return its result."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.server is not None:
            server = self.server
            self.call(server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
