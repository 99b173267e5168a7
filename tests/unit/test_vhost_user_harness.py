"""The vhost-user test harness (tests/support/vhost_user_harness.py) works."""

from __future__ import annotations

from tests.support.vhost_user_harness import EchoDevice, LoopThread, open_fds, session_pair
from vvu_runtime.virtio.features import VirtioFeature


def test_loop_thread_runs_calls() -> None:
    lt = LoopThread()
    try:
        assert lt.call(lambda: 41 + 1) == 42
    finally:
        lt.stop()


def test_session_pair_connects_and_closes_without_leaks() -> None:
    lt = LoopThread()
    try:
        before = open_fds()
        dev = EchoDevice()
        with session_pair(dev, lt) as (fe, _session):
            assert fe.get_features() & int(VirtioFeature.VERSION_1)
        lt.sync()
        assert open_fds() == before
        assert dev.resets == 1
    finally:
        lt.stop()
