"""The benchmarks' pure helpers (benchmarks/process_cpu.py, guest_output.py, ratio_table.py,
host_daemon.py, and the command lines of vvu_bench's qsd engine and fs_bench's workload).

Real parts where there are some: /proc of real child processes, dd and /proc/uptime of
this host run through a real shell, a stand-in daemon that binds a real socket. The
benchmarks themselves (VMs) run from benchmarks/ and print their ratios.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from benchmarks import fs_bench, vvu_bench
from benchmarks.guest_output import (
    DdReport,
    GuestOutputError,
    block_requests,
    parse_dd,
    parse_times,
    timed,
)
from benchmarks.host_daemon import DaemonError, HostDaemon
from benchmarks.process_cpu import (
    TICK,
    CpuMeter,
    StatError,
    cpu_ticks,
    descendants,
    find_descendant,
    proc_cpu,
    tree_cpu,
)
from benchmarks.ratio_table import Column, ratio, render_table
from vvu_runtime.appliance import qsd

# ----------------------------------------------------------------------------- /proc CPU

#: A child that burns at least this much CPU, says so, then sleeps until killed.
BURN = 0.2
BURNER = textwrap.dedent(f"""
    import os, sys, time
    while sum(os.times()[:2]) < {BURN}:
        pass
    print("burnt", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_cpu_ticks_reads_utime_and_stime_after_the_command_name() -> None:
    # A comm with spaces and parentheses: fields are counted from the last ")".
    line = "4242 (qemu (x) d) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 99"
    assert cpu_ticks(line) == 12
    own = Path("/proc/self/stat").read_text()
    fields = own.rsplit(")", 1)[1].split()
    assert cpu_ticks(own) == int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("line", ["", "no parentheses here 1 2 3", "1 (x) S 1 2",
                                  "1 (x) S 1 2 3 4 5 6 7 8 9 10 u s 0"])
def test_cpu_ticks_refuses_what_is_not_a_stat_line(line: str) -> None:
    with pytest.raises(StatError):
        cpu_ticks(line)


def test_proc_cpu_counts_a_real_process_and_zero_for_none_or_gone(
        burner: subprocess.Popen[str]) -> None:
    assert burner.stdout is not None and burner.stdout.readline().strip() == "burnt"
    assert proc_cpu(burner.pid) >= BURN - 1 / TICK  # ticks round down
    assert proc_cpu(None) == 0.0
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert proc_cpu(gone.pid) == 0.0


def test_cpu_meter_charges_the_time_between_start_and_stop(
        burner: subprocess.Popen[str]) -> None:
    meter = CpuMeter({"burner": burner.pid, "nobody": None})
    meter.start()
    assert burner.stdout is not None and burner.stdout.readline().strip() == "burnt"
    spent = meter.stop()
    assert set(spent) == {"burner", "nobody"}
    assert spent["nobody"] == 0.0
    # started before the child's interpreter was up: the whole burn falls in between
    assert spent["burner"] >= BURN - 2 / TICK


def test_tree_cpu_counts_the_processes_below_a_wrapper() -> None:
    # ": " after the child keeps sh alive as its parent (no exec of the last command).
    wrapper = subprocess.Popen(["/bin/sh", "-c", '"$@"; :', "sh", sys.executable, "-c", BURNER],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wrapper.stdout is not None and wrapper.stdout.readline().strip() == "burnt"
        assert proc_cpu(wrapper.pid) < BURN / 2  # sh itself only waits
        assert tree_cpu(wrapper.pid) >= BURN - 2 / TICK
        assert tree_cpu(None) == 0.0
    finally:
        os.killpg(wrapper.pid, signal.SIGKILL)
        wrapper.wait()


def test_find_descendant_finds_a_program_below_a_wrapper() -> None:
    wrapper = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & wait"])
    try:
        for _ in range(200):
            found = find_descendant(wrapper.pid, "/usr/bin/sleep")
            if found is not None:
                break
            subprocess.run(["sleep", "0.01"], check=True)
        assert found is not None and found != wrapper.pid
        assert Path(f"/proc/{found}/comm").read_text().strip() == "sleep"
        assert found in set(descendants(wrapper.pid))
        assert find_descendant(wrapper.pid, "no-such-program") is None
    finally:
        for pid in reversed(list(descendants(wrapper.pid))):
            os.kill(pid, signal.SIGKILL)
        wrapper.wait()


# ----------------------------------------------------------------------------- guest output

def _sh(command: str) -> str:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          check=True).stdout


def test_parse_dd_reads_coreutils_dd_of_this_host(tmp_path: Path) -> None:
    out = _sh(f"dd if=/dev/zero of={tmp_path}/f bs=4096 count=5 2>&1")
    [report] = parse_dd(out)
    assert (report.full, report.partial, report.nbytes) == (5, 0, 20480)
    assert report.seconds is not None and report.seconds > 0


def test_parse_dd_reads_several_busybox_summaries_and_partial_records() -> None:
    busybox = "256+0 records in\n256+0 records out\n255+1 records in\n255+1 records out\n"
    assert parse_dd(busybox) == [DdReport(256, 0), DdReport(255, 1)]


@pytest.mark.parametrize("text", ["", "dd: /dev/vda: Input/output error\n0+0 records in\n"])
def test_parse_dd_refuses_output_without_a_summary(text: str) -> None:
    with pytest.raises(GuestOutputError, match="records out"):
        parse_dd(text)


def test_timed_and_parse_times_use_the_clock_of_the_shell_that_ran_it() -> None:
    out = _sh(timed("sleep 0.2"))
    assert parse_times(out) > 0  # /proc/uptime has 10 ms resolution
    assert parse_times("x\nTIMES 10.50 12.75\n") == pytest.approx(2.25)


@pytest.mark.parametrize("text", ["", "TIMES 5.0\n", "TIMES 9.0 8.0\n"])
def test_parse_times_refuses_a_missing_or_backward_reading(text: str) -> None:
    with pytest.raises(GuestOutputError):
        parse_times(text)


def test_block_requests_sums_reads_writes_and_flushes() -> None:
    # Field order of Documentation/block/stat.rst: reads 1, writes 5, flushes 15.
    new = "10 0 80 5 20 0 160 7 0 9 12 0 0 0 3 1"
    old = "10 0 80 5 20 0 160 7 0 9 12"
    assert block_requests(new) == 33
    assert block_requests(old) == 30
    real = next(iter(sorted(Path("/sys/block").glob("*/stat"))), None)
    if real is not None:
        f = [int(x) for x in real.read_text().split()]
        assert block_requests(real.read_text()) == f[0] + f[4] + (f[14] if len(f) > 14 else 0)


@pytest.mark.parametrize("text", ["", "1 2 3", "a b c d e f g h i j k"])
def test_block_requests_refuses_what_is_not_a_stat_line(text: str) -> None:
    with pytest.raises(GuestOutputError):
        block_requests(text)


# ----------------------------------------------------------------------------- ratio tables

def test_ratio_is_none_when_a_side_is_missing_or_the_denominator_zero() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0) is None
    assert ratio(0, 3.0) == 0


def test_render_table_aligns_columns_and_prints_missing_values_as_dashes() -> None:
    lines = render_table("workload", [Column("host", ".0f"), Column("ratio", ".3f", 8)],
                         [("write 4 KiB", [1234.4, 0.5]), ("read", [None, None])])
    # the label column: the longest label + 2; a column: its width or its title + 2
    assert lines[0] == "workload       host   ratio"
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2] == "write 4 KiB    1234   0.500"
    assert lines[3] == "read              -       -"


def test_render_table_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="row 'x' has 1 cells for 2 columns"):
        render_table("w", [Column("a"), Column("b")], [("x", [1.0])])


# ----------------------------------------------------------------------------- host daemons

#: A stand-in daemon: binds its socket (argv[1]) and waits; "fail" exits at once.
STAND_IN = textwrap.dedent("""
    import socket, sys, time
    if sys.argv[1] == "fail":
        print("no such export", flush=True)
        sys.exit(3)
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen()
    time.sleep(60)
""")


def _through_a_wrapper(argv: Sequence[str]) -> list[str]:
    """Like ``mkosi sandbox``: the daemon runs one process below what is started."""
    return ["/bin/sh", "-c", '"$@"; exit $?', "sh", *argv]


def _alive(pid: int) -> bool:
    """Running (a killed daemon whose wrapper died too is a zombie until init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _live_members(group: int) -> list[int]:
    """Running processes of a process group (zombies waiting for init do not count)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def test_host_daemon_finds_the_daemon_below_its_wrapper_and_leaves_nothing(
        tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    daemon = HostDaemon(_through_a_wrapper, [sys.executable, "-c", STAND_IN, str(sock)], sock,
                        tmp_path / "d.log")
    with daemon:
        assert daemon.pid is not None and daemon.proc is not None
        assert daemon.pid != daemon.proc.pid  # the daemon, not its wrapper
        assert sock.exists()
        pid, group = daemon.pid, daemon.proc.pid
    assert not sock.exists()
    assert not _alive(pid)
    assert _live_members(group) == []


def test_host_daemon_that_exits_early_is_an_error_with_its_output(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    daemon = HostDaemon(_through_a_wrapper, [sys.executable, "-c", STAND_IN, "fail"], sock,
                        tmp_path / "d.log", start_timeout=30)
    with pytest.raises(DaemonError, match=r"(?s)exited \(3\).*no such export"):
        daemon.start()
    assert daemon.proc is None


# ----------------------------------------------------------------------------- command lines

def test_qsd_engine_serves_a_raw_file_with_one_queue_like_the_appliance() -> None:
    export = vvu_bench.qsd_export("/tmp/w/disk.raw")
    argv = qsd.qsd_argv(export, Path("/tmp/w/disk.raw"), Path("/tmp/w/q.sock"),
                                  queues=1, direct=False)
    assert argv[0] == "qemu-storage-daemon"
    assert "driver=file,node-name=file0,filename=/tmp/w/disk.raw" in argv[2]
    assert "num-queues=1" in argv[-1] and "addr.path=/tmp/w/q.sock" in argv[-1]


def test_vvu_bench_refuses_an_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        vvu_bench.main(["--engines", "vvu-blk,spdk"])
    assert exc.value.code == 2
    assert "choose from vvu-blk, qsd" in capsys.readouterr().err


def test_engine_table_prints_the_four_setups_and_their_ratios(
        capsys: pytest.CaptureFixture[str]) -> None:
    phase = vvu_bench.Phase("write", 4096, 1)  # 256 blocks
    seconds = {"host": 1.0, "host-qsd": 2.0, "appliance": 4.0, "appl-qsd": 8.0}
    by = {(m, phase): vvu_bench.Sample(m, phase, s, phase.count * 4096, 256, 0)
          for m, s in seconds.items()}
    vvu_bench.print_engines(by, [phase])
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("write 4 KiB"))
    # IOPS 256 / 128 / 64 / 32, then appl-qsd/appl, host-qsd/host, appl/host x2
    assert row.split()[3:] == ["256", "128", "64", "32", "0.500", "0.500", "0.250", "0.250"]


def test_fs_workload_commands() -> None:
    plan = fs_bench.phases(8, 128, 3)
    assert [p.name for p in plan] == ["write 4 KiB", "read 4 KiB", "write 64 KiB",
                                      "read 64 KiB", "create x3", "stat x3", "unlink x3"]
    write, read = plan[0], plan[1]
    assert write.count == 2 and write.nbytes == 8192
    assert write.command(True) == ("dd if=/dev/zero of=/mnt/share/seq4k bs=4096 count=2 "
                                   "oflag=direct conv=fsync 2>&1")
    assert "oflag" not in write.command(False)
    assert read.command(True).endswith("count=2 iflag=direct 2>&1")
    assert "drop_caches" in read.setup()
    create, stat, unlink = plan[4:]
    assert create.command(True) == "touch $(seq -f /mnt/share/meta/f%g 1 3)"
    assert create.setup() == "rm -rf /mnt/share/meta && mkdir /mnt/share/meta"
    assert stat.command(True).startswith("stat -c %s $(seq")
    assert unlink.command(False).startswith("rm $(seq")
    assert fs_bench.virtiofsd_argv("/s.sock", "/d", cache="never", sandbox="none") == [
        "/usr/libexec/virtiofsd", "--socket-path=/s.sock", "--shared-dir=/d", "--cache=never",
        "--sandbox=none"]


def test_fs_rounds_report_the_median_round_and_their_spread() -> None:
    phase = fs_bench.FsPhase("create", 100)
    rounds = [fs_bench.FsSample("host", phase, s, {"virtiofsd": c})
              for s, c in ((2.0, 0.2), (1.0, 0.1), (4.0, 0.4), (1.25, 0.125))]
    middle = fs_bench.median_sample(rounds)
    assert (middle.seconds, middle.cpu) == (1.25, {"virtiofsd": 0.125})  # the lower middle
    assert fs_bench.median_sample(rounds[:3]).seconds == 2.0
    # rates 50, 100, 25, 80 ops/s: (100 - 25) / 80
    assert fs_bench.spread(rounds) == pytest.approx(75 / 80)
    assert fs_bench.best_rate(rounds) == 100.0
    assert fs_bench.best_rate([]) is None
    with pytest.raises(ValueError):
        fs_bench.median_sample([])
