"""The harnesses, by name (the order ``python -m fuzz`` runs them in)."""

from __future__ import annotations

from collections.abc import Callable

from fuzz.engine import Harness


def _codec() -> Harness:
    from fuzz.harnesses.codec import CodecHarness
    return CodecHarness()


def _rings() -> Harness:
    from fuzz.harnesses.rings import RingsHarness
    return RingsHarness()


def _session() -> Harness:
    from fuzz.harnesses.session import SessionHarness
    return SessionHarness()


def _registers() -> Harness:
    from fuzz.harnesses.registers import RegistersHarness
    return RegistersHarness()


def _vfio_user() -> Harness:
    from fuzz.harnesses.vfio_user import VfioUserHarness
    return VfioUserHarness()


def _tunnel() -> Harness:
    from fuzz.harnesses.tunnel import TunnelHarness
    return TunnelHarness()


#: name -> factory (imported lazily: a harness's imports cost only when it runs).
HARNESSES: dict[str, Callable[[], Harness]] = {
    "codec": _codec,
    "rings": _rings,
    "session": _session,
    "vfio-user": _vfio_user,
    "registers": _registers,
    "tunnel": _tunnel,
}
