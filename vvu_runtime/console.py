"""What every vvu command shares at its edge: one logging setup, one fatal-error
path (:func:`die`, as mkosi's), and :func:`run_main`, the wrapper that turns
errors into one ``PROG: error: ...`` line and an exit status.

Exit statuses: 0 success, 1 failure, 2 usage (argparse's), 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from vvu_runtime.errors import VvuError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_program = "vvu"


class Fatal(SystemExit):
    """Raised by :func:`die` once the message is out: the exit status is ``code``."""


def set_program(name: str) -> None:
    """The name messages start with (``run_main`` and ``setup_logging`` set it)."""
    global _program
    _program = name


def say(msg: str) -> None:
    """One line to stderr, as ``PROG: msg``."""
    print(f"{_program}: {msg}", file=sys.stderr, flush=True)


def die(msg: str, status: int = EXIT_FAILURE) -> NoReturn:
    """Print ``PROG: error: msg`` and end the command with ``status``."""
    say(f"error: {msg}")
    raise Fatal(status)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our stderr handler (so a second setup replaces it instead of doubling lines)."""


def setup_logging(program: str, level: str | int = "INFO") -> logging.Handler:
    """Log to stderr as ``program: LEVEL logger: message``; idempotent. Returns the handler."""
    set_program(program)
    if isinstance(level, str):
        level = level.upper()
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{program}: %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def run_main(main: Callable[[], int | None], *, program: str,
             errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body; its exit status.

    :func:`die` ends it with its status; a :class:`VvuError` (or one of
    ``errors``: another layer's tree) that escapes becomes ``PROG: error: ...``
    and 1; Ctrl-C becomes ``PROG: interrupted`` and 130. Anything else is a bug
    and keeps its traceback.
    """
    set_program(program)
    reported: tuple[type[BaseException], ...] = (VvuError, *errors)
    try:
        status = main()
    except Fatal as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except reported as exc:
        say(f"error: {exc}")
        return EXIT_FAILURE
    return EXIT_OK if status is None else status


__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Fatal",
    "die",
    "run_main",
    "say",
    "set_program",
    "setup_logging",
]
