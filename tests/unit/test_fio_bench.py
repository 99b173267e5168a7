"""benchmarks/fio_bench.py without VMs: fio and iperf3 reports as the consumer image's
versions print them (captured from real runs under tests/unit/golden/), rows and
ratios, and the command line's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.fio_bench import (
    APPL_QEMU,
    BACKEND,
    CONSUMER_QEMU,
    DEVD,
    FioJob,
    Measurement,
    compute_rows,
    parse_args,
    parse_fio,
    parse_iperf3,
    report_lines,
)
from benchmarks.guest_output import GuestOutputError

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


# --------------------------------------------------------------------------- fio

def test_fio_randread_qd1_as_fio_3_39_prints_it() -> None:
    r = parse_fio(golden("fio-3.39-randread-qd1.out"))
    assert r.version == "fio-3.39"
    assert (r.rw, r.iodepth) == ("randread", 1)
    assert r.ios > 0 and r.iops > 0
    # fio's IOPS are its completed I/Os over its measured runtime.
    assert r.iops == pytest.approx(r.ios / (r.runtime_ms / 1000), rel=0.02)
    assert r.bw_bytes == pytest.approx(r.iops * 4096, rel=0.02)
    assert r.clat_p99_us is not None and r.clat_p99_us >= r.lat_mean_us * 0.5


def test_fio_randwrite_qd32_reads_the_write_section() -> None:
    text = golden("fio-3.39-randwrite-qd32.out")
    r = parse_fio(text)
    assert (r.rw, r.iodepth) == ("randwrite", 32)
    job = json.loads(text[text.index("{"):text.rindex("}") + 1])["jobs"][0]
    assert r.ios == job["write"]["total_ios"] > 0
    assert job["read"]["total_ios"] == 0


def test_fio_warning_lines_before_the_json_are_skipped() -> None:
    text = "fio: some warning the console shows\n" + golden("fio-3.39-randread-qd1.out")
    assert parse_fio(text).rw == "randread"


def _fio_doc(text: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(text[text.index("{"):text.rindex("}") + 1])
    return doc


def test_fio_job_error_is_reported() -> None:
    doc = _fio_doc(golden("fio-3.39-randread-qd1.out"))
    doc["jobs"][0]["error"] = 5  # type: ignore[index]
    with pytest.raises(GuestOutputError, match="failed: error 5"):
        parse_fio(json.dumps(doc))


def test_fio_job_without_io_is_not_a_rate_of_zero() -> None:
    doc = _fio_doc(golden("fio-3.39-randread-qd1.out"))
    doc["jobs"][0]["read"]["total_ios"] = 0  # type: ignore[index]
    with pytest.raises(GuestOutputError, match="completed no reads"):
        parse_fio(json.dumps(doc))


@pytest.mark.parametrize("text, match", [
    ("fio: failed to open /dev/vdb: No such file", "no fio JSON object"),
    ('{"jobs": [}', "does not parse"),
    ('{"fio version": "fio-3.39", "jobs": []}', "expected one job, got 0"),
    ('{"jobs": [{"jobname": "x", "error": 0, "job options": {"rw": "trim"}}]}', "rw='trim'"),
    ('{"jobs": [{"jobname": "x", "error": 0, "job options": {"rw": "randread"}}]}',
     "no 'read' section"),
    ('{"jobs": [{"jobname": "x", "error": 0, "job options": {"rw": "randread"}, '
     '"read": {"total_ios": 3}}]}', "lacks 'iops'"),
])
def test_fio_malformed_reports_are_refused(text: str, match: str) -> None:
    with pytest.raises(GuestOutputError, match=match):
        parse_fio(text)


def test_fio_command_is_the_issue_workload() -> None:
    cmd = FioJob("randwrite", 8).command("/dev/vdb", 6, 1)
    for part in ("--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=8",
                 "--time_based", "--runtime=6", "--ramp_time=1", "--output-format=json",
                 "--filename=/dev/vdb"):
        assert part in cmd.split()
    assert FioJob("randread", 32).name == "randread QD32"


# --------------------------------------------------------------------------- iperf3

def test_iperf3_client_report_as_3_18_prints_it() -> None:
    r = parse_iperf3(golden("iperf3-3.18-a-to-b.out"))
    assert r.version.startswith("iperf 3.18")
    assert not r.reverse
    assert r.gbps > 0 and r.seconds > 0
    assert r.gbps == pytest.approx(r.received_bps / 1e9)


def test_iperf3_reverse_run_is_flagged() -> None:
    r = parse_iperf3(golden("iperf3-3.18-b-to-a.out"))
    assert r.reverse
    assert r.received_bps > 0


def test_iperf3_error_report_is_refused() -> None:
    text = json.dumps({"start": {}, "intervals": [], "end": {},
                       "error": "unable to connect to server: Connection refused"})
    with pytest.raises(GuestOutputError, match="Connection refused"):
        parse_iperf3(text)


def test_iperf3_without_summary_is_refused() -> None:
    with pytest.raises(GuestOutputError, match="lacks 'end'"):
        parse_iperf3('{"start": {"test_start": {}}}')


def test_iperf3_that_moved_nothing_is_refused() -> None:
    doc = json.loads(golden("iperf3-3.18-a-to-b.out")[golden("iperf3-3.18-a-to-b.out")
                                                      .index("{"):])
    doc["end"]["sum_received"]["bits_per_second"] = 0
    with pytest.raises(GuestOutputError, match="moved nothing"):
        parse_iperf3(json.dumps(doc))


# --------------------------------------------------------------------------- rows

def _storage() -> list[Measurement]:
    return [
        Measurement("appliance", "randread QD1", 250.0, 1000, 6.0,
                    {DEVD: 0.25, APPL_QEMU: 1.0, f"{CONSUMER_QEMU}": 0.5, BACKEND: 0.1},
                    {"kicks": 1000, "doorbells": 1000}, 3900.0),
        Measurement("host", "randread QD1", 1000.0, 4000, 6.0,
                    {f"{CONSUMER_QEMU}": 2.0, BACKEND: 0.4}, {}, 990.0),
        Measurement("bypass", "randread QD1", 500.0, 2000, 6.0,
                    {DEVD: 0.12, APPL_QEMU: 1.5, f"{CONSUMER_QEMU}": 1.0, BACKEND: 0.2},
                    {"kicks": 2000, "doorbells": 0}, 1950.0),
        Measurement("host", "randread QD32", 800.0, 3200, 6.0, {BACKEND: 0.3}, {}, None),
    ]


def test_rows_carry_ratio_to_host_and_costs_per_io() -> None:
    rows = compute_rows(_storage())
    assert [(r.workload, r.mode) for r in rows] == [
        ("randread QD1", "host"), ("randread QD1", "appliance"), ("randread QD1", "bypass"),
        ("randread QD32", "host")]
    host, appl, byp, qd32 = rows
    assert host.ratio == 1.0
    assert appl.ratio == pytest.approx(0.25)
    assert byp.ratio == pytest.approx(0.5)
    assert appl.devd_us == pytest.approx(250.0)  # 0.25 s / 1000 I/O
    assert appl.doorbells == pytest.approx(1.0)
    assert appl.kicks == pytest.approx(1.0)
    assert appl.appliance_qemu_us == pytest.approx(1000.0)
    assert appl.consumer_qemu_us == pytest.approx(500.0)
    assert byp.doorbells == 0.0 and byp.devd_us == pytest.approx(60.0)
    # Host mode has no vvu-devd and no appliance: missing, not zero.
    assert host.devd_us is None and host.doorbells is None and host.appliance_qemu_us is None
    assert host.backend_us == pytest.approx(100.0)
    assert qd32.consumer_qemu_us is None


def test_a_workload_without_host_run_has_no_ratio() -> None:
    rows = compute_rows([Measurement("appliance", "randwrite QD8", 10.0, 60, 6.0)])
    assert rows[0].ratio is None and rows[0].devd_us is None


def test_no_requests_means_no_per_io_figures() -> None:
    rows = compute_rows([Measurement("appliance", "w", 0.0, 0, 6.0, {DEVD: 1.0},
                                     {"doorbells": 3})])
    assert rows[0].devd_us is None and rows[0].doorbells is None


def test_switch_rows_sum_both_consumer_qemus() -> None:
    rows = compute_rows([
        Measurement("host", "iperf3 a->b", 1.0, 100, 5.0,
                    {f"{CONSUMER_QEMU} 0": 0.5, f"{CONSUMER_QEMU} 1": 0.25}),
        Measurement("appliance", "iperf3 a->b", 0.4, 40, 5.0, {DEVD: 0.01},
                    {"kicks": 20, "doorbells": 30}),
    ])
    assert rows[0].consumer_qemu_us == pytest.approx(7500.0)
    assert rows[1].ratio == pytest.approx(0.4)
    assert rows[1].doorbells == pytest.approx(0.75)
    assert rows[1].devd_us == pytest.approx(250.0)


def test_report_puts_modes_side_by_side_with_ratios() -> None:
    lines = report_lines(compute_rows(_storage()), [])
    head = next(line for line in lines if line.startswith("workload "))
    assert head.split() == ["workload", "host", "appliance", "bypass", "appliance/host",
                            "bypass/host"]
    qd1 = next(line for line in lines if line.startswith("randread QD1 "))
    assert qd1.split() == ["randread", "QD1", "1000", "250", "500", "0.25", "0.50"]
    qd32 = next(line for line in lines if line.startswith("randread QD32 "))
    assert qd32.split() == ["randread", "QD32", "800", "-", "-", "-", "-"]
    assert any("devd us/IO" in line for line in lines)
    assert not any("Switch" in line for line in lines)


# --------------------------------------------------------------------------- arguments

def test_defaults_are_the_issue_matrix() -> None:
    opts = parse_args([])
    s = opts.settings
    assert opts.only == ("storage", "switch")
    assert s.modes == ("host", "appliance", "bypass")
    assert s.ops == ("randread", "randwrite")
    assert s.depths == (1, 8, 32)
    assert s.busy_poll_us == 0 and s.busy_poll_args() == []
    assert not opts.json and opts.keep is None
    polled = parse_args(["--busy-poll", "1500"]).settings
    assert polled.busy_poll_args() == ["--busy-poll", "1500"]  # host and appliance alike


def test_lists_are_put_in_canonical_order() -> None:
    opts = parse_args(["--modes", "bypass,host", "--depths", "32,1,32", "--ops", "randwrite",
                       "--only", "switch", "--json"])
    assert opts.settings.modes == ("host", "bypass")
    assert opts.settings.depths == (1, 32)
    assert opts.settings.ops == ("randwrite",)
    assert opts.only == ("switch",) and opts.json


@pytest.mark.parametrize("argv, message", [
    (["--modes", "host,kvm"], "--modes 'host,kvm': choose from host, appliance, bypass"),
    (["--modes", ""], "--modes '': choose from"),
    (["--ops", "randrw"], "--ops 'randrw': choose from randread, randwrite"),
    (["--only", "net"], "--only 'net': choose from storage, switch"),
    (["--depths", "1,x"], "--depths '1,x': comma-separated queue depths"),
    (["--depths", "0"], "--depths '0': queue depths from 1 to 1024"),
    (["--runtime", "0"], "--runtime 0: from 1 to 600 seconds"),
    (["--ramp", "-1"], "--ramp -1: from 0 to 600 seconds"),
    (["--iperf-seconds", "601"], "--iperf-seconds 601: from 1 to 600 seconds"),
    (["--busy-poll", "-5"], "--busy-poll -5: from 0 to 1000000 µs"),
])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
