"""``vvu-devd`` in its own process, for the tests that drive it from outside (the
unit tests with a vfio-user client, the QEMU tests with a real appliance)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.vfio_user_client import VfioUserClient


class DevdProcess:
    """``vvu-devd --device NAME:VHOST:VFIO:RAM ...`` (``devices``), logging to ``log_path``.

    Starts at once and waits until it serves every device (or fails, with its log).
    """

    def __init__(self, devices: Sequence[tuple[str, Path, Path, Path]], log_path: Path,
                 *extra: str, timeout: float = 20.0,
                 queues: Mapping[str, int] | None = None) -> None:
        """``queues``: a device's own MAX_QUEUES field (else ``--max-queues``)."""
        self.devices = {name: (vhost, vfio, ram) for name, vhost, vfio, ram in devices}
        self.log_path = log_path
        argv = [sys.executable, "-m", "vvu_runtime.device.devd", *extra]
        for name, vhost, vfio, ram in devices:
            own = f":{queues[name]}" if queues and name in queues else ""
            argv += ["--device", f"{name}:{vhost}:{vfio}:{ram}{own}"]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        n = len(devices)
        self.wait_log(f"serving {n} VVU device{'' if n == 1 else 's'}", timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the vvu-devd log:\n{self.log()}")
            time.sleep(0.02)

    def client(self, name: str) -> VfioUserClient:
        """A vfio-user client on device ``name``, past VERSION."""
        c = VfioUserClient.connect(str(self.devices[name][1]))
        c.version()
        return c

    def table(self, name: str | None = None) -> dict[str, str]:
        """SIGUSR1's counters table, as column -> value of device ``name``'s row
        (default: the first row)."""
        seen = self.log().count("counters (SIGUSR1)")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while self.log().count("counters (SIGUSR1)") <= seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no counters table in the vvu-devd log:\n{self.log()}")
            time.sleep(0.05)
        block = self.log().rsplit("counters (SIGUSR1):\n", 1)[1].splitlines()
        # Columns are separated by two spaces; names and values have at most one.
        names = re.split(r"\s{2,}", block[0].strip())
        rows = [dict(zip(names, re.split(r"\s{2,}", line.strip()), strict=True))
                for line in block[2:2 + len(self.devices)]]
        return next((r for r in rows if name is None or r.get("device") == name), rows[0])

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 15 s); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
