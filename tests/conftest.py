"""Session fixtures shared by every test tier.

``toolchain``: vvu's tools tree (QEMU & co., see vvu_runtime.launch.toolchain).
Tests that need it are skipped, naming what is missing, when it is not built;
under CI (``CI`` set) they fail instead, because CI runs ./setup first and a
missing tool chain there is a bug, not a host limitation.

``consumer_assets``: kernel + initramfs of the tiny consumer guest
(:class:`vvu_runtime.launch.initramfs.ConsumerAssets`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.initramfs import consumer_assets as build_assets
from vvu_runtime.launch.toolchain import Toolchain, ToolchainError

_TEMP_BEFORE = pytest.StashKey[set[Path]]()


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


# --------------------------------------------------------------------------- leaks
# Whatever a test run leaves in the shared temporary directories is a leak (mkosi's
# copies of itself, Python temp dirs, vvu's own): the run fails naming it.

_LEAK_PLACES = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
_LEAK_NAME = re.compile(r"^(tmp[a-z0-9_]{8}|mkosi-.*|vvu-.*)$")


def _temp_entries() -> set[Path]:
    found: set[Path] = set()
    for place in _LEAK_PLACES:
        with contextlib.suppress(OSError):
            found |= {p for p in place.iterdir() if _LEAK_NAME.match(p.name)}
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_TEMP_BEFORE] = _temp_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # pytest-xdist: the controlling process looks once, after every worker
    before = session.config.stash.get(_TEMP_BEFORE, None)
    if before is None:
        return
    with contextlib.suppress(OSError):
        Toolchain().collect_scratch()  # finished mkosi processes' own temporary files
    leaked = sorted(_temp_entries() - before)
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = ("this test run left temporary files behind (a leak; nothing else "
                "may run tests on this machine meanwhile):\n" +
                "\n".join(f"  {p}" for p in leaked))
        if reporter is not None:
            reporter.write_line(text, red=True)
        else:
            print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
