"""A stand-in for dpdk-testpmd under vvu-proxy ``--exec-all`` (unit tests).

    python fake_testpmd.py LOG

Appends ``started PID`` to LOG, then waits; on SIGTERM appends ``stopped PID``
and exits 0, as testpmd leaves on SIGTERM. A SIGKILL leaves no line: the
supervisor's restart shows as the next ``started``.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main(log: str) -> None:
    def append(what: str) -> None:
        with open(log, "a") as f:
            f.write(f"{what} {os.getpid()}\n")

    def stop(_signum: int, _frame: object) -> None:
        append("stopped")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    append("started")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1])
