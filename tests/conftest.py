"""Session fixtures shared by every test tier.

``toolchain``: vvu's tools tree (QEMU & co., see vvu_runtime.launch.toolchain).
Tests that need it are skipped, naming what is missing, when it is not built;
under CI (``CI`` set) they fail instead, because CI runs ./setup first and a
missing tool chain there is a bug, not a host limitation.

``consumer_assets``: kernel + initramfs of the tiny consumer guest
(:class:`vvu_runtime.launch.initramfs.ConsumerAssets`).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.initramfs import consumer_assets as build_assets
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError


def unavailable(why: str) -> NoReturn:
    """Skip naming the missing host capability; under CI fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must not skip: .ci/run runs ./setup first)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    tc = Toolchain()
    if not tc.is_built():
        unavailable(
            f"host capability missing: vvu tools tree (QEMU >= 10.1) not built at {tc.tree}; "
            "run ./setup"
        )
    return tc


@pytest.fixture(scope="session")
def consumer_assets(toolchain: Toolchain) -> ConsumerAssets:
    try:
        return build_assets(toolchain)
    except ToolchainError as e:
        unavailable(f"host capability missing: {e}")
