"""The switch benchmark's DPDK peers without DPDK: testpmd's command line, its exit
report (a real one, captured from dpdk-testpmd 24.11 in the tools tree), its
life cycle against a stand-in program, OVS-DPDK's EAL options and flow counters
(captured from Open vSwitch 3.5), and the refusal of a window with no frames.

The real thing runs in tests/integration/test_switch_peers.py.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

# Modules, not names: pytest would collect ``testpmd_argv`` and ``Testpmd`` as tests.
from benchmarks import dpdk_peer, ovs_peer, switch_bench
from benchmarks.dpdk_peer import FORWARDING_STARTED, PeerError, parse_forward_stats

GOLDEN = Path(__file__).parent / "golden/testpmd-24.11-exit-report.txt"
OVS_FLOWS = Path(__file__).parent / "golden/ovs-3.5-dump-flows.txt"


def test_command_line_separates_eal_and_testpmd_options() -> None:
    argv = dpdk_peer.testpmd_argv(("/tmp/d/p0.sock", "/tmp/d/p1.sock"), (1, 0))
    assert argv[:3] == ["stdbuf", "-oL", "dpdk-testpmd"]
    eal, app = argv[3:argv.index("--")], argv[argv.index("--") + 1:]
    assert eal[:4] == ["-l", "1,0", "--main-lcore", "1"]
    # No hugepages here: anonymous memory, virtual IOVAs, no shared config files.
    assert {"--no-huge", "--iova-mode=va", "--no-shconf", "--no-pci"} <= set(eal)
    assert "--in-memory" not in eal  # EAL refuses it next to --no-huge
    assert "--vdev=net_vhost0,iface=/tmp/d/p0.sock,queues=1" in eal
    assert "--vdev=net_vhost1,iface=/tmp/d/p1.sock,queues=1" in eal
    assert {"--forward-mode=io", "--nb-cores=1", "--auto-start",
            "--disable-link-check"} <= set(app)
    assert not set(app) & {"--no-huge", "-l"}
    with pytest.raises(ValueError, match="two distinct lcores"):
        dpdk_peer.testpmd_argv(("a", "b"), (0, 0))


def test_exit_report_of_a_real_run() -> None:
    stats = parse_forward_stats(GOLDEN.read_text())
    assert sorted(stats) == [0, 1]
    assert (stats[0].rx_packets, stats[0].tx_packets, stats[0].tx_dropped) == (8466016, 0, 1)
    assert (stats[1].rx_packets, stats[1].tx_packets, stats[1].tx_dropped) == (1, 7948864,
                                                                               1034304)


def test_exit_report_cut_short_is_an_error_not_zero() -> None:
    text = GOLDEN.read_text()
    cut = text[:text.index("TX-packets: 7948864")]
    with pytest.raises(PeerError, match="port 1 lack TX"):
        parse_forward_stats(cut)
    assert parse_forward_stats("EAL: Error - exiting with code: 1\n") == {}


def _stand_in(tmp_path: Path, body: str) -> Path:
    """A program named like testpmd (its comm is what Testpmd looks for)."""
    script = tmp_path / "bin/dpdk-testpmd"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def test_life_cycle_against_a_stand_in(tmp_path: Path) -> None:
    # Creates the two "sockets", says it forwards, waits for the newline, reports.
    script = _stand_in(tmp_path, f"""\
        for a in "$@"; do
            case "$a" in --vdev=*) p=${{a#*iface=}}; : > "${{p%%,*}}";; esac
        done
        echo "{FORWARDING_STARTED.decode()}"
        read line
        cat {GOLDEN}
        """)

    def launcher(argv: Sequence[str]) -> list[str]:
        assert argv[2] == "dpdk-testpmd"
        return [str(script), *argv[3:]]

    work = tmp_path / "work"
    work.mkdir()
    with dpdk_peer.Testpmd(launcher, work, (1, 0)) as pmd:
        pmd.start(timeout=10)
        assert pmd.pid is not None and pmd.proc is not None
        assert pmd.pid in (pmd.proc.pid, *_children_of(pmd.proc.pid))
        stats = pmd.stop()
    assert stats is not None and stats[1].tx_packets == 7948864


def _children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def test_start_failure_carries_the_eal_error(tmp_path: Path) -> None:
    script = _stand_in(tmp_path, """\
        echo "EAL: Option --legacy-mem is not compatible with --in-memory"
        for i in $(seq 80); do echo "  --usage-line-$i"; done
        exit 1
        """)
    work = tmp_path / "work"
    work.mkdir()
    with dpdk_peer.Testpmd(lambda argv: [str(script), *argv[3:]], work, (1, 0)) as pmd, \
            pytest.raises(PeerError, match=r"exited \(1\)") as err:
        pmd.start(timeout=10)
    # The reason is at the top of the output, above the usage text: it must be kept.
    assert "not compatible with --in-memory" in str(err.value)
    assert "--usage-line-80" in str(err.value)


def test_ovs_counts_the_flows_into_the_receivers_port() -> None:
    text = OVS_FLOWS.read_text()
    assert ovs_peer.flow_packets_to(text, "p1") == 5834431
    assert ovs_peer.flow_packets_to(text, "p0") == 0  # the receiver's hello, flooded: 0
    # A flow that also goes elsewhere (flooded) is not forwarding to p1 alone.
    flood = text.replace("actions:p1", "actions:p1,p2")
    assert ovs_peer.flow_packets_to(flood, "p1") == 0
    assert ovs_peer.flow_packets_to("flow-dump from pmd on cpu core: 0\n", "p1") == 0


def test_ovs_eal_options_keep_it_off_hugepages() -> None:
    args = ovs_peer.eal_args().split()
    # --legacy-mem keeps OVS from adding --in-memory, which EAL refuses with --no-huge.
    assert {"--no-huge", "--legacy-mem", "--iova-mode=va", "--no-shconf"} <= set(args)
    assert "--in-memory" not in args and "--socket-mem" not in args


def test_a_window_without_frames_is_an_error_not_a_rate() -> None:
    case = switch_bench.cases()["64"]
    with pytest.raises(PeerError, match="testpmd forwarded 0 frames"):
        switch_bench.window_result("testpmd", case, 1.0, 0, 0, 5000, 1.0, 0.2, {}, None, 0.5)
    res = switch_bench.window_result("testpmd", case, 2.0, 3_000_000, 0, 3_100_000, 0.5, 0.2,
                                     {}, 3_200_000, 0.5)
    assert res.rate == pytest.approx(1.5) and res.per_cpu == pytest.approx(3.0)
