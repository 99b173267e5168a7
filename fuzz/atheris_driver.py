"""Run one harness under atheris (coverage-guided, libFuzzer) instead of fuzz.engine.

``python -m fuzz.atheris_driver HARNESS [libFuzzer options]``, e.g.
``-runs=1000000 -seed=1 -timeout=5 -artifact_prefix=findings/``. atheris is not
a dependency (install it in a venv of your own); libFuzzer owns the process and
exits when done, so this runs one harness per process. A finding (an unexpected
exception, a logged traceback, a leaked fd, a hang past ``-timeout``) makes
libFuzzer save the input; replay it with ``python -m fuzz HARNESS --replay FILE``.
"""

from __future__ import annotations

import contextlib
import sys

from fuzz.engine import Finding, describe_fds, open_fds, watching_logs
from fuzz.harnesses import HARNESSES


def main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 2 or argv[1] not in HARNESSES:
        sys.exit(f"usage: python -m fuzz.atheris_driver HARNESS [libFuzzer options] "
                 f"(harnesses: {', '.join(HARNESSES)})")
    name = argv.pop(1)
    with atheris.instrument_imports(include=["vvu_runtime", "fuzz"]):
        harness = HARNESSES[name]()
    logs = watching_logs()
    harness.watch = logs.__enter__()
    harness.open()
    baseline = open_fds()

    def one_input(data: bytes) -> None:
        with contextlib.suppress(*harness.expected):
            harness.run_one(data)
        logged = harness.take_logged()
        if logged:
            raise Finding("logged with a traceback:\n" + logged[0])
        if harness.checks_fds_each_case:
            now = open_fds()
            if now - baseline:
                raise Finding(f"fds left open: {describe_fds(now - baseline)}")

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
