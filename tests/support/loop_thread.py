"""An asyncio event loop in a background thread: the side of a test that a daemon
would run (a back-end session, a switch, a device model), driven from the test
body with :meth:`LoopThread.call`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """A loop running in its own thread; everything touching its objects goes through
    :meth:`call`. ``start=False`` defers the thread to :meth:`start`."""

    def __init__(self, name: str = "test-loop", *, start: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()
        if start:
            self.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run ``fn(*args)`` on the loop; its result (or its exception, raised here)."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # reported to the test
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def sync(self) -> None:
        """Wait until the loop has run everything queued so far (call_soon chains too)."""
        for _ in range(3):
            self.call(lambda: None)

    def stop(self) -> None:
        """Stop the loop and wait for its thread (which closes the loop); idempotent."""
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
