"""The vswitch appliance's ``engine: testpmd``: the config field and its refusals
(appliance config and topology, with their exact places), the lab's appliance
config, the vvu-proxy + dpdk-testpmd command line vvu-backend runs, the counters
read from testpmd's reports, and vvu-proxy's ``--exec-all`` supervision of a
stand-in testpmd (tests/support/fake_testpmd.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import lab_plans
from tests.unit.test_topology import at, load, only_problem, problems
from vvu_runtime.appliance import backend, testpmd
from vvu_runtime.appliance.config import ConfigError, parse_config
from vvu_runtime.launch.topology import load_topology
from vvu_runtime.proxy import cli
from vvu_runtime.proxy.link import BackendProcess

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "support" / "fake_testpmd.py"

# --------------------------------------------------------------------------
# The appliance config
# --------------------------------------------------------------------------

TWO = '{"kind": "vswitch", "links": [{"name": "c1-nic0"}, {"name": "c2-nic0"}]'


def test_engine_defaults_to_vvu_switch_and_takes_testpmd() -> None:
    assert parse_config(TWO + "}", "f").options["engine"] == "vvu-switch"
    c = parse_config(TWO + ', "options": {"engine": "testpmd"}}', "f")
    assert c.options["engine"] == "testpmd" and c.link_names == ["c1-nic0", "c2-nic0"]


@pytest.mark.parametrize("text, messages", [
    ("kind: vswitch\nlinks: [{name: a}]\noptions: {engine: dpdk}\n",
     ['f:3: options.engine: vvu-switch or testpmd; got "dpdk"']),
    ("kind: vswitch\nlinks:\n  - {name: a}\n  - {name: b}\n  - {name: c}\n"
     "options: {engine: testpmd}\n",
     ["f:2: links: engine testpmd forwards between exactly 2 ports (io forward), and 3 "
      "links are given: give 2, or use engine vvu-switch"]),
    ("kind: vswitch\nlinks: [{name: a}, {name: b}]\noptions:\n  engine: testpmd\n"
     "  busy_poll_us: 50\n  queues: 2\n",
     ["f:5: options.busy_poll_us: a vvu-switch option; engine testpmd busy-polls one queue "
      "pair per port by itself: remove busy_poll_us, or use engine vvu-switch",
      "f:6: options.queues: a vvu-switch option; engine testpmd busy-polls one queue "
      "pair per port by itself: remove queues, or use engine vvu-switch"]),
    ("kind: vswitch\nlinks: [{name: a}, {name: b}]\noptions: {engine: testpmd}\n"
     "tunnels: [{name: sw2, remote: 192.0.2.2, vni: 100}]\n",
     ["f:4: tunnels: engine testpmd has no tunnels (it forwards between its 2 ports only): "
      "remove it, or use engine vvu-switch"]),
])
def test_what_testpmd_cannot_do_is_refused_at_its_line(text: str, messages: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "f")
    assert e.value.problems == messages


def test_schema_text_shows_the_engine() -> None:
    assert 'engine: str (default "vvu-switch"): what forwards the frames' in \
        backend.schema_text()


# --------------------------------------------------------------------------
# The topology
# --------------------------------------------------------------------------

LAB = """\
name: lab
appliances:
  sw1:
    kind: vswitch
    options: {engine: testpmd}
consumers:
  c1: {nics: [sw1]}
  c2: {nics: [sw1]}
"""


def test_a_testpmd_switch_gets_two_cpus_unless_told() -> None:
    topo = load(LAB)
    sw1 = topo.appliance("sw1")
    assert (sw1.cpus, sw1.memory_mib, sw1.options["engine"]) == (2, 1024, "testpmd")
    told = load(LAB.replace("kind: vswitch\n", "kind: vswitch\n    cpus: 3\n"))
    assert told.appliance("sw1").cpus == 3
    # A vvu-switch keeps the default of every appliance.
    assert load(LAB.replace("    options: {engine: testpmd}\n", "")).appliance("sw1").cpus == 1


def test_the_engine_may_come_from_defaults() -> None:
    text = LAB.replace("    options: {engine: testpmd}\n", "") + \
        "defaults:\n  vswitch: {options: {engine: testpmd}}\n"
    assert load(text).appliance("sw1").options["engine"] == "testpmd"
    one = text.replace("  c2: {nics: [sw1]}\n", "")
    assert only_problem(one).startswith(f"{at(one, 'engine: testpmd', 'testpmd')}: "
                                        "defaults.vswitch.options.engine: engine testpmd")


def test_one_nic_is_refused_at_the_engine() -> None:
    text = LAB.replace("  c2: {nics: [sw1]}\n", "")
    assert only_problem(text) == (
        f"{at(text, 'engine: testpmd', 'testpmd')}: appliances.sw1.options.engine: engine "
        "testpmd forwards between exactly 2 ports (io forward), and sw1 has 1 consumer "
        "NICs: c1 (lab.yaml:7:15); give it 2, or use engine vvu-switch")


def test_three_nics_are_refused_at_the_engine() -> None:
    text = LAB + "  c3: {nics: [sw1]}\n"
    assert only_problem(text).startswith(
        f"{at(text, 'engine: testpmd', 'testpmd')}: appliances.sw1.options.engine: engine "
        "testpmd forwards between exactly 2 ports (io forward), and sw1 has 3 consumer NICs")


@pytest.mark.parametrize("change, needle, message", [
    ("    cpus: 1\n", "cpus: 1\n", "appliances.sw1.cpus: engine testpmd needs at least 2 cpus "
     "(one busy-polls both ports, the other runs the rest); got 1: set 2 or leave cpus out"),
    ("    memory: 256M\n", "256M\n", "appliances.sw1.memory: engine testpmd needs at "
     "least 512M (testpmd alone takes 128M without hugepages); got 256M"),
])
def test_too_small_an_appliance_is_refused_where_it_is_sized(change: str, needle: str,
                                                             message: str) -> None:
    text = LAB.replace("kind: vswitch\n", "kind: vswitch\n" + change)
    value = needle.split(": ")[-1]
    assert only_problem(text) == f"{at(text, needle, value)}: {message}"


def test_busy_poll_is_refused_at_its_key() -> None:
    text = LAB.replace("{engine: testpmd}", "{engine: testpmd, busy_poll_us: 20}")
    assert only_problem(text) == (
        f"{at(text, 'busy_poll_us: 20', '20')}: appliances.sw1.options.busy_poll_us: a vvu-switch "
        "option; engine testpmd busy-polls by itself: remove it, or use engine vvu-switch")


def test_tunnels_are_refused_at_the_engine() -> None:
    text = """\
        name: lab
        hosts:
          h1: {address: 192.0.2.1}
          h2: {address: 192.0.2.2}
        appliances:
          sw1: {kind: vswitch, host: h1, options: {engine: testpmd}}
          sw2: {kind: vswitch, host: h2, tunnels: [{peer: sw1, vni: 100}]}
        consumers:
          c1: {host: h1, nics: [sw1]}
          c2: {host: h1, nics: [sw1]}
          c3: {host: h2, nics: [sw2]}
        """
    assert problems(text) == [
        f"{at(text, 'engine: testpmd', 'testpmd')}: appliances.sw1.options.engine: engine "
        "testpmd has no tunnels (it forwards between its 2 ports only), and sw1 has one to "
        f"sw2 ({at(text, '{peer: sw1')}); remove it, or use engine vvu-switch"]


def test_a_bad_engine_is_refused_at_its_value() -> None:
    text = LAB.replace("engine: testpmd", "engine: ovs")
    assert only_problem(text) == (
        f"{at(text, 'ovs')}: appliances.sw1.options.engine: expected one of vvu-switch, "
        'testpmd, got "ovs"')


# --------------------------------------------------------------------------
# The lab: the appliance's config
# --------------------------------------------------------------------------


def test_the_example_runs_testpmd_with_two_links_and_two_cpus() -> None:
    topo = load_topology(REPO / "examples" / "testpmd.yaml")
    plan = lab_plans.plan(topo)
    text = lab_plans.appliance_config(plan, "sw1")
    assert json.loads(text) == {"kind": "vswitch", "options": {"engine": "testpmd"},
                                "links": [{"name": "c1-nic0"}, {"name": "c2-nic0"}]}
    assert parse_config(text, "credential").options["engine"] == "testpmd"
    argv = plan.node("sw1").argv
    assert argv[argv.index("-smp") + 1].split(",")[0] in ("2", "cpus=2")


def test_a_vvu_switch_lab_config_is_unchanged() -> None:
    lab = lab_plans.plan(load(LAB.replace("    options: {engine: testpmd}\n", "")))
    text = lab_plans.appliance_config(lab, "sw1")
    assert json.loads(text)["options"] == {"busy_poll_us": 0}


# --------------------------------------------------------------------------
# The command line vvu-backend runs
# --------------------------------------------------------------------------

MATCHED = {"c1-nic0": "0000:03:00.0", "c2-nic0": "0000:04:00.0"}


def test_backend_runs_one_proxy_listening_on_both_links_with_one_testpmd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path)
    config = parse_config(TWO + ', "options": {"engine": "testpmd"}}', "f")
    (b,) = backend.commands(config, MATCHED)
    assert b.links == {"0000:03:00.0": "c1-nic0", "0000:04:00.0": "c2-nic0"}
    assert (tmp_path / "testpmd").is_dir()  # where the sockets go
    assert b.argv[0] == "vvu-proxy"
    args = cli.parse_args(b.argv[1:])
    sockets = [str(tmp_path / "testpmd" / f"{n}.sock") for n in MATCHED]
    assert args.listen and args.commands == []
    assert args.link == list(zip(MATCHED.values(), sockets, strict=True))
    pmd = shlex.split(args.shared)
    assert pmd[:3] == ["stdbuf", "-oL", "dpdk-testpmd"]
    eal, app = pmd[3:pmd.index("--")], pmd[pmd.index("--") + 1:]
    vdevs = [eal[i + 1] for i, a in enumerate(eal) if a == "--vdev"]
    assert vdevs == [f"net_vhost{i},iface={s},client=1,queues=1" for i, s in enumerate(sockets)]
    assert {"--no-huge", "--no-pci", "--no-shconf"} <= set(eal)
    assert eal[eal.index("-m") + 1] == "128" and eal[eal.index("-l") + 1] == "0,1"
    assert {"--forward-mode=io", "--auto-start", "--stats-period=5"} <= set(app)


def test_a_vvu_switch_config_still_runs_vvu_switch() -> None:
    (b,) = backend.commands(parse_config(TWO + "}", "f"), MATCHED)
    assert b.argv[:5] == ["vvu-switch", "--vvu", "c1-nic0=0000:03:00.0",
                          "--vvu", "c2-nic0=0000:04:00.0"]


def test_testpmd_argv_takes_exactly_two_ports() -> None:
    with pytest.raises(ValueError, match="exactly 2 ports, got 3"):
        testpmd.testpmd_argv([Path("/a"), Path("/b"), Path("/c")])
    with pytest.raises(ValueError, match="cannot hold a comma"):
        testpmd.testpmd_argv([Path("/a,b"), Path("/c")])
    with pytest.raises(ValueError, match="not a vswitch with engine testpmd"):
        testpmd.proxy_argv(parse_config(TWO + "}", "f"), MATCHED, Path("/run/vvu"))


@pytest.mark.parametrize("argv, says", [
    (["--link", "00:05.0=/a.sock", "--exec", "00:05.0=x", "--exec-all", "y"],
     "--exec-all and --exec both name back-ends"),
    (["--link", "00:05.0=/a.sock", "--exec-all", "  "], "--exec-all: an empty command"),
])
def test_exec_all_usage_errors(argv: list[str], says: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "vvu-proxy: error:" in err and says in err, err


# --------------------------------------------------------------------------
# Counters from testpmd's periodic report
# --------------------------------------------------------------------------

REPORT = """\
\x1b[2J\x1b[1;1H
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: {rx0:<10} RX-missed: 0          RX-bytes:  9000
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: {tx0:<10} TX-errors: 0          TX-bytes:  8000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: {rx1:<10} RX-missed: 0          RX-bytes:  8000
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: {tx1:<10} TX-errors: 0          TX-bytes:  9000
  ############################################################################
"""


def test_the_last_report_of_each_port_is_read() -> None:
    text = (REPORT.format(rx0=1, tx0=2, rx1=2, tx1=1)
            + REPORT.format(rx0=70, tx0=65, rx1=65, tx1=70))
    assert testpmd.parse_port_stats(text) == {
        0: testpmd.PortCounters(70, 65), 1: testpmd.PortCounters(65, 70)}


def test_a_report_cut_short_keeps_the_previous_counts() -> None:
    whole = REPORT.format(rx0=5, tx0=6, rx1=6, tx1=5)
    cut = REPORT.format(rx0=9, tx0=9, rx1=9, tx1=9).split("RX-errors")[0]
    # port 0's last block lacks TX-packets: its earlier one stands; no port 1 block follows.
    assert testpmd.parse_port_stats(whole + cut) == {
        0: testpmd.PortCounters(5, 6), 1: testpmd.PortCounters(6, 5)}
    assert testpmd.parse_port_stats("no report yet\n") == {}


# --------------------------------------------------------------------------
# Supervision: vvu-proxy --exec-all restarts the one back-end it runs
# --------------------------------------------------------------------------


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_exec_all_restarts_a_killed_back_end_and_stops_it_on_close(tmp_path: Path) -> None:
    log = tmp_path / "testpmd.log"

    async def scenario() -> tuple[BackendProcess, list[int]]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        shared = BackendProcess([sys.executable, str(FAKE), str(log)], loop, name="every link")
        serving = loop.create_task(cli.serve([], stop, shared))
        await _until(lambda: len(_lines(log)) == 1, "the first start")
        first = int(_lines(log)[0].split()[1])
        os.kill(first, signal.SIGKILL)  # what the acceptance test does to dpdk-testpmd
        await _until(lambda: len(_lines(log)) == 2, "the restart")
        second = int(_lines(log)[1].split()[1])
        stop.set()
        await serving
        return shared, [first, second]

    shared, (first, second) = asyncio.run(scenario())
    assert first != second
    assert (shared.starts, shared.exits, shared.running) == (2, 1, False)
    # The restarted one was asked to stop (SIGTERM) and did, and nothing is left running.
    assert _lines(log) == [f"started {first}", f"started {second}", f"stopped {second}"]
    assert not _alive(first) and not _alive(second)
