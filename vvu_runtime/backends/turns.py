"""Giving the event loop back in the middle of a busy ring, and coming back to it.

A storage device that drains a ring without end would starve every other ring
and session of its process. After a turn's budget it asks :class:`LoopTurns` to
serve the ring again once the loop ran what else is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from vvu_runtime.virtio.errors import VirtioError

if TYPE_CHECKING:
    from vvu_runtime.vhost_user.vring import Vring


class LoopTurns:
    """Resumes ``serve(vring)`` from the event loop, at most once pending per ring."""

    def __init__(self, name: Callable[[], str], serve: Callable[[Vring], None],
                 log: logging.Logger) -> None:
        self._name = name
        self._serve = serve
        self._log = log
        self._pending: set[int] = set()

    def come_back(self, vring: Vring) -> bool:
        """Serve ``vring`` again once the event loop ran what else is ready; False
        without a running loop (a test driving the device: go on serving)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if vring.index not in self._pending:
            self._pending.add(vring.index)
            loop.call_soon(self._resume, vring)
        return True

    def _resume(self, vring: Vring) -> None:
        self._pending.discard(vring.index)
        if not vring.started or vring.failed:
            return  # stopped, failed or reset since: the session restarts it
        try:
            self._serve(vring)
        except VirtioError as exc:
            vring.fail(exc)
        except Exception:
            self._log.exception("%s: error serving queue %d", self._name(), vring.index)
