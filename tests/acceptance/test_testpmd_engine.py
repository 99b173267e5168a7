"""A stock DPDK switch inside the vswitch appliance, brought up by vvu-launch:
examples/testpmd.yaml (``options.engine: testpmd``), its consumers busybox initramfs.

    c1, c2 (busybox initramfs, stock QEMU virtio-net on vhost-user sockets)
      -> vvu-devd on the host (one VVU function per NIC)
      -> sw1 (vswitch appliance): vvu-switch.service -> vvu-backend -> vvu-proxy
         --listen (a vhost-user socket per link) -> one dpdk-testpmd (Debian's
         DPDK 24.11), its two net_vhost ports connected as clients, io forward
         between them, supervised by vvu-proxy (--exec-all)

* the example's own checks pass (``vvu-launch check``: ping, an 8 MiB TCP
  transfer whose sha256 is compared at both ends, dpdk-testpmd running), and the
  unit runs vvu-proxy and testpmd, not vvu-switch;
* testpmd's own forward counters (its ``--stats-period`` reports in the unit's
  journal, read through the appliance's shell) rise by at least the frames of
  a ping run between the consumers, on both ports;
* ``kill -9`` of dpdk-testpmd in the appliance: vvu-proxy starts a new one (the
  unit keeps its process, systemd restarts nothing), the consumers' QEMUs
  reconnect, ping works again;
* stopping the unit stops testpmd too; ``vvu-launch down`` leaves nothing (no
  process, no RAM file in /dev/shm, no socket or runtime directory).

One lab (one appliance boot) for the module. Run with
``flock /tmp/vvu-heavy.lock python -m pytest tests/acceptance/test_testpmd_engine.py``.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.support.launch_lab import Lab, detached_lab, explain, wait_until
from vvu_runtime.appliance.testpmd import PROGRAM as TESTPMD
from vvu_runtime.appliance.testpmd import STATS_PERIOD, PortCounters, parse_port_stats
from vvu_runtime.launch.checks import LabAccess
from vvu_runtime.launch.initramfs import ConsumerAssets

pytestmark = [pytest.mark.integration, pytest.mark.acceptance, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
UNIT = "vvu-switch"
PINGS = 10


def topology(name: str, assets: ConsumerAssets) -> str:
    """examples/testpmd.yaml under another name, its consumers booted from the
    initramfs (seconds under TCG, not a minute)."""
    yaml = YAML()
    data = yaml.load((REPO / "examples" / "testpmd.yaml").read_text())
    data["name"] = name
    data["options"] = {"boot_timeout": 600}
    assert data["appliances"]["sw1"]["options"]["engine"] == "testpmd"
    for c in ("c1", "c2"):
        data["consumers"][c].update(memory="128M", image={"kernel": str(assets.kernel),
                                                          "initrd": str(assets.initrd)})
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@dataclass
class PmdLab:
    lab: Lab
    access: LabAccess

    def run(self, node: str, command: str, timeout: float = 120.0) -> str:
        r = self.access.run(node, command, timeout=timeout)
        assert r.ok, f"{node}: {command!r} exited {r.status}: {r.stdout}{r.stderr}"
        return r.stdout

    def pids(self) -> list[int]:
        return [int(p) for p in self.run("sw1", f"pidof {TESTPMD} || true").split()]

    def journal(self) -> str:
        return self.run("sw1", f"journalctl -u {UNIT} -o cat --no-pager")

    def counters(self) -> dict[int, PortCounters]:
        """testpmd's last report of each port (it prints one every STATS_PERIOD s)."""
        return parse_port_stats(self.journal())

    def ping(self, count: int, deadline_s: int = 30) -> bool:
        ip = self.access.address("c1", "c2")
        r = self.access.run("c1", f"ping -c {count} -w {deadline_s} {ip}",
                            timeout=deadline_s + 30)
        return r.ok


@pytest.fixture(scope="module")
def pmd(consumer_assets: ConsumerAssets) -> Iterator[PmdLab]:
    with detached_lab("testpmd", lambda name: topology(name, consumer_assets),
                      ("sw1", "c1", "c2")) as (lab, access):
        yield PmdLab(lab, access)


def test_the_examples_checks_pass_through_testpmd(pmd: PmdLab) -> None:
    r = pmd.lab.vvu("check", pmd.lab.name, "--json", timeout=600)
    assert r.returncode == 0, explain(r)
    results = json.loads(r.stdout)
    assert len(results) == 3 and all(c["ok"] for c in results), results
    print("\n" + "\n".join(f"{c['check']}: {c['detail']} ({c['seconds']} s)" for c in results))
    # vvu-backend runs vvu-proxy, which runs the one testpmd (not vvu-switch). Read
    # until the line is there: one CI run read an empty journal for the unit once.
    started = re.compile(r"^vvu-backend: running: vvu-proxy --listen --link \S+ --link \S+ "
                         rf"--exec-all .*{TESTPMD} ", re.M)
    try:
        wait_until("vvu-backend's start line in the unit's journal",
                   lambda: started.search(pmd.journal()), 60, 2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{pmd.run('sw1', 'journalctl -b --no-pager | tail -n 60')}"
                             ) from None
    assert pmd.run("sw1", "pidof vvu-switch || echo none").strip() == "none"
    main = pmd.run("sw1", f"systemctl show -P MainPID {UNIT}").strip()
    (pid,) = pmd.pids()
    # stdbuf execs testpmd: vvu-proxy (the unit's main process) is its parent.
    assert pmd.run("sw1", f"grep PPid /proc/{pid}/status").split()[1] == main
    status = json.loads(pmd.run("sw1", "cat /run/vvu/status.json"))
    assert status["ready"] and [x["state"] for x in status["links"]] == [
        "connected", "connected"], status


def test_testpmd_counts_the_frames_it_forwards(pmd: PmdLab) -> None:
    wait_until("a testpmd report of both ports", lambda: len(pmd.counters()) == 2,
               4 * STATS_PERIOD + 30, 1)
    # A report printed after the earlier tests' traffic ended (reports lag up to a
    # period): the rise below is then this test's pings, not their tail.
    time.sleep(STATS_PERIOD + 1)
    before = pmd.counters()
    assert pmd.ping(PINGS)
    # Port 0 is c1's link, port 1 c2's: each request enters on 0 and leaves on 1,
    # each reply the other way.
    def risen() -> dict[int, PortCounters] | None:
        now = pmd.counters()
        grew = all(now[p].rx_packets - before[p].rx_packets >= PINGS
                   and now[p].tx_packets - before[p].tx_packets >= PINGS for p in (0, 1))
        return now if grew else None

    after = wait_until("testpmd's counters to show the pings", risen, 4 * STATS_PERIOD + 30, 1)
    print(f"\ntestpmd counters before/after {PINGS} pings: "
          + "; ".join(f"port {p}: rx {before[p].rx_packets}->{after[p].rx_packets}, "
                      f"tx {before[p].tx_packets}->{after[p].tx_packets}" for p in (0, 1)))


def test_a_killed_testpmd_is_restarted_and_forwards_again(pmd: PmdLab) -> None:
    main = pmd.run("sw1", f"systemctl show -P MainPID {UNIT}").strip()
    (pid,) = pmd.pids()
    pmd.run("sw1", f"kill -9 {pid}")
    down = time.monotonic()
    wait_until("vvu-proxy to start a new testpmd",
               lambda: (p := pmd.pids()) and p != [pid], 60, 0.5)
    wait_until("ping through the new testpmd", lambda: pmd.ping(1, 5) or None, 240, 1)
    print(f"\ndpdk-testpmd SIGKILLed; ping answered again after "
          f"{time.monotonic() - down:.1f} s")
    assert pmd.ping(PINGS)
    # vvu-proxy healed it alone: the unit kept its process, systemd restarted nothing.
    assert pmd.run("sw1", f"systemctl show -P MainPID {UNIT}").strip() == main
    assert pmd.run("sw1", f"systemctl show -P NRestarts {UNIT}").strip() == "0"
    log = pmd.journal()
    assert "back-end exited with status -9" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_stopping_the_unit_stops_testpmd_and_down_leaves_nothing(pmd: PmdLab) -> None:
    pmd.run("sw1", f"systemctl stop {UNIT}")
    assert pmd.pids() == []  # the supervised back-end went with vvu-proxy
    log = pmd.journal()
    assert re.search(r"vvu_runtime\.proxy\.cli: stopped$", log, re.M), log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    pmd.access.close()
    lab = pmd.lab
    down = lab.vvu("down", lab.name, "--cleanup", timeout=300)
    assert down.returncode == 0, explain(down)
    deadline = time.monotonic() + 15
    while (left := lab.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], left
    assert not any(lab.name in p.name for p in Path("/dev/shm").iterdir())
