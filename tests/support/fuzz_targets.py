"""Tiny fuzz harnesses with known bugs, to check that the engine sees each kind of
finding (tests/unit/test_fuzz_engine.py). They plant their bug behind a two-byte
prefix so that random inputs rarely hit it and the seeds do."""

from __future__ import annotations

import os
import time

from fuzz.engine import Harness
from vvu_runtime.errors import VvuError

TRIGGER = b"\xde\xad"


class RefusingTarget(Harness):
    """Refuses odd-length inputs with a VvuError (expected) and never fails."""

    name = "refusing"

    def run_one(self, data: bytes) -> int:
        if len(data) % 2:
            raise VvuError(f"{len(data)} bytes: odd length refused")
        return len(data) % 7


class CrashingTarget(Harness):
    """Raises a KeyError (outside the error tree) on the trigger prefix."""

    name = "crashing"

    def seeds(self) -> list[bytes]:
        return [TRIGGER + b"x"]

    def run_one(self, data: bytes) -> int:
        if data.startswith(TRIGGER):
            raise KeyError("planted")
        return 0


class HangingTarget(Harness):
    """Sleeps far past any case limit on the trigger prefix."""

    name = "hanging"

    def seeds(self) -> list[bytes]:
        return [TRIGGER]

    def run_one(self, data: bytes) -> int:
        if data.startswith(TRIGGER):
            time.sleep(3600)
        return 0


class LeakingTarget(Harness):
    """Opens /dev/null and keeps it on the trigger prefix (closed by close())."""

    name = "leaking"

    def __init__(self) -> None:
        self.kept: list[int] = []

    def seeds(self) -> list[bytes]:
        return [TRIGGER]

    def run_one(self, data: bytes) -> int:
        if data.startswith(TRIGGER) and not self.kept:
            self.kept.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        return 0

    def close(self) -> None:
        for fd in self.kept:
            os.close(fd)
