"""Shared pieces of the vhost-user tests: back-end sessions on an event-loop thread
(``LoopThread``, from loop_thread), a tiny echo device, fd counting.
(tests/unit/test_vhost_user_harness.py checks the harness itself.)"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.loop_thread import LoopThread
from vvu_runtime.vhost_user.backend import BackendSession
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.frontend import VhostUserFrontend
from vvu_runtime.vhost_user.server import backend_channel
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio.features import RING_FEATURES, VirtioFeature

ECHO_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX
                    | VirtioFeature.INDIRECT_DESC)


def open_fds() -> int:
    """Open fds of this process, after collecting garbage (earlier tests' mappings)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class EchoDevice(VhostUserDevice):
    """Copies each chain's readable bytes, upper-cased, into its writable part."""

    name = "echo"

    def __init__(self, queues: int = 2, config: bytes = bytes(range(16))) -> None:
        self.queues = queues
        self.config = bytearray(config)
        self.started: list[int] = []
        self.stopped: list[int] = []
        self.resets = 0
        self.acked = 0
        self.processed = 0
        self.hold = False          # keep chains (for inflight tests)
        self.held: list[Any] = []
        self.raise_in_process: BaseException | None = None

    def num_queues(self) -> int:
        return self.queues

    def features(self) -> int:
        return ECHO_FEATURES & int(RING_FEATURES)

    def set_features(self, features: int) -> None:
        self.acked = features

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.config):
            raise ValueError("write past the config space")
        self.config[offset:offset + len(data)] = data

    def queue_started(self, vring: Vring) -> None:
        self.started.append(vring.index)

    def queue_stopped(self, vring: Vring) -> None:
        self.stopped.append(vring.index)
        self.held = [(v, c) for v, c in self.held if v is not vring]

    def process(self, vring: Vring) -> None:
        if self.raise_in_process is not None:
            raise self.raise_in_process
        while True:
            chain = vring.pop()
            if chain is None:
                break
            self.processed += 1
            if self.hold:
                self.held.append((vring, chain))
                continue
            data = chain.read().upper() if vring.enabled else b""
            written = chain.write(data)
            vring.push(chain, written)
        vring.notify()

    def complete_held(self) -> None:
        for vring, chain in self.held:
            vring.push(chain, chain.write(chain.read().upper()))
            vring.notify()
        self.held = []

    def reset(self) -> None:
        self.resets += 1


@contextmanager
def session_pair(device: VhostUserDevice, lt: LoopThread, **kwargs: Any
                 ) -> Iterator[tuple[VhostUserFrontend, BackendSession]]:
    """A back-end session on ``lt`` and a front-end connected to it by a socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def make() -> BackendSession:
        s = BackendSession(backend_channel(a, "test"), device, loop=lt.loop, **kwargs)
        s.start()
        return s

    session = lt.call(make)
    fe = VhostUserFrontend.from_socket(b, timeout=5)
    try:
        yield fe, session
    finally:
        fe.close()
        lt.call(session.close)


__all__ = ["ECHO_FEATURES", "EchoDevice", "LoopThread", "open_fds", "session_pair"]
