"""The soak tests' record format and writer (tests/support/records.py), on a real file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import records


def _device(tmp_path: Path, blocks: int) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(blocks * records.BLOCK))
    return path


def _o_direct_works(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_written_records_are_acknowledged_and_verified(tmp_path: Path) -> None:
    dev = _device(tmp_path, 64)
    if not _o_direct_works(dev):
        pytest.skip(f"host capability missing: O_DIRECT on the file system of {tmp_path}")
    run, log = bytes(range(16)), tmp_path / "log"
    assert records.write(str(dev), run, 4, 20, str(log), str(tmp_path / "stop"), 0) == 0
    lines = log.read_text().splitlines()
    assert records.acked_in(lines) == list(range(20)) and lines[-1] == "DONE 20"
    verdict = records.find_records(str(dev), run, 4, range(20))
    assert (verdict.acknowledged, verdict.verified, verdict.lost) == (20, 20, ())


def test_a_changed_stale_or_foreign_block_is_reported_lost(tmp_path: Path) -> None:
    run, other = b"A" * 16, b"B" * 16
    blocks = [records.record(run, s) for s in range(4)]
    blocks[1] = blocks[1][:100] + b"x" + blocks[1][101:]  # one byte changed
    blocks[2] = records.record(other, 2)  # another run's record
    blocks[3] = bytes(records.BLOCK)  # never written
    verdict = records.check(run, 0, range(4), lambda i: blocks[i])
    assert verdict.verified == 1
    assert verdict.lost == ("1: not a record", f"2: run {other.hex()} seq 2", "3: not a record")


def test_a_record_in_the_wrong_block_is_lost() -> None:
    run = b"C" * 16
    verdict = records.check(run, 0, [0], lambda i: records.record(run, 7))
    assert verdict.lost == ("0: run 43434343434343434343434343434343 seq 7",)


def test_records_differ_and_stop_file_ends_the_writer(tmp_path: Path) -> None:
    assert records.record(b"D" * 16, 1) != records.record(b"D" * 16, 2)
    dev = _device(tmp_path, 8)
    if not _o_direct_works(dev):
        pytest.skip(f"host capability missing: O_DIRECT on the file system of {tmp_path}")
    stop = tmp_path / "stop"
    stop.touch()
    records.write(str(dev), b"E" * 16, 0, 8, str(tmp_path / "log"), str(stop), 0)
    assert (tmp_path / "log").read_text().splitlines()[-1] == "DONE 0"


def test_a_held_writer_fsyncs_and_acknowledges_only_after_the_hold_file(
        tmp_path: Path) -> None:
    import threading
    import time

    dev = _device(tmp_path, 8)
    if not _o_direct_works(dev):
        pytest.skip(f"host capability missing: O_DIRECT on the file system of {tmp_path}")
    run, log, go = b"F" * 16, tmp_path / "log", tmp_path / "go"
    t = threading.Thread(target=records.write, args=(
        str(dev), run, 2, 1, str(log), str(tmp_path / "stop"), 0, str(go)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while (not log.exists() or "WRITTEN 0" not in log.read_text()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # held: no ACK however long it waits
        assert log.read_text().splitlines()[1:] == ["WRITTEN 0"]
        # The write itself completed before the hold (it is in the file already).
        assert records.find_records(str(dev), run, 2, [0]).verified == 1
    finally:
        go.touch()
        t.join(10)
    assert log.read_text().splitlines()[1:] == ["WRITTEN 0", "ACK 0", "DONE 1"]
