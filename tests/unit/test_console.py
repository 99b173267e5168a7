"""vvu_runtime.console: one fatal-error path and one logging setup for every command."""

from __future__ import annotations

import logging

import pytest

from vvu_runtime.console import Fatal, die, run_main, setup_logging
from vvu_runtime.driver.errors import PciError
from vvu_runtime.vhost_user.errors import TransportError


def test_die_prints_one_line_and_carries_its_status(capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        die("the image is missing", 2)

    assert run_main(body, program="vvu-x") == 2
    assert capsys.readouterr().err == "vvu-x: error: the image is missing\n"
    with pytest.raises(Fatal) as exc:  # outside run_main it ends the process
        die("gone")
    assert exc.value.code == 1


@pytest.mark.parametrize("error", [TransportError("socket gone"), PciError("no function")])
def test_layer_errors_become_one_line(capsys: pytest.CaptureFixture[str],
                                      error: Exception) -> None:
    def body() -> int:
        raise error

    assert run_main(body, program="vvu-x") == 1
    err = capsys.readouterr().err
    assert err == f"vvu-x: error: {error}\n" and "Traceback" not in err


def test_interrupt_is_130_and_bugs_keep_their_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert run_main(interrupted, program="vvu-x") == 130
    assert capsys.readouterr().err == "vvu-x: interrupted\n"

    def bug() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_main(bug, program="vvu-x")
    assert run_main(lambda: None, program="vvu-x") == 0


def test_setup_logging_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        setup_logging("vvu-x", "info")
        handler = setup_logging("vvu-x", "INFO")
        logging.getLogger("vvu_runtime.test").info("hello")
        assert capsys.readouterr().err == "vvu-x: INFO vvu_runtime.test: hello\n"
    finally:
        root.removeHandler(handler)
    assert root.handlers == before
