"""Verified records on a block device: the soak tests' writer and checker.

A record is one 4 KiB block: a magic, the run's id, its sequence number, a payload
that depends on both, and a SHA-256 over all of that. ``write`` (run inside a
consumer VM) writes record N to block ``first + N`` with O_DIRECT, then fsyncs
the device, and only after fsync returned appends ``ACK N`` to its log: an
acknowledged record is one the guest's FLUSH completed for. ``verify`` reads the
acknowledged blocks back with O_DIRECT; :func:`find_records` does the same on a
host file (a storage appliance's data-disk image).

This file runs as a script in guests with only Python's standard library
(``python3 records.py write|verify ...``), and is imported by the tests, so the
format has one definition.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

BLOCK = 4096
MAGIC = b"VVUSOAK1"
#: magic, run id (16 bytes), sequence number; then payload; SHA-256 of all before it last.
HEAD = struct.Struct("<8s16sQ")
DIGEST = 32
PAYLOAD = BLOCK - HEAD.size - DIGEST


def record(run: bytes, seq: int) -> bytes:
    """The block of record ``seq`` of run ``run`` (16 bytes)."""
    head = HEAD.pack(MAGIC, run, seq)
    # Payload differs per record, so a block left from another record cannot pass.
    seed = hashlib.sha256(run + seq.to_bytes(8, "little")).digest()
    payload = (seed * (PAYLOAD // len(seed) + 1))[:PAYLOAD]
    body = head + payload
    return body + hashlib.sha256(body).digest()


@dataclass(frozen=True)
class Found:
    """What a block holds: ``seq`` of ``run`` if it is an intact record, else None."""

    run: bytes
    seq: int | None


def parse(block: bytes) -> Found:
    """The record a block holds, checked (magic, checksum, payload); seq None if not one."""
    magic, run, seq = HEAD.unpack_from(block)
    if magic != MAGIC or len(block) != BLOCK:
        return Found(b"", None)
    body, digest = block[:-DIGEST], block[-DIGEST:]
    if hashlib.sha256(body).digest() != digest or record(run, seq) != block:
        return Found(run, None)
    return Found(run, seq)


@dataclass(frozen=True)
class Verdict:
    """Acknowledged records checked against what the blocks hold."""

    acknowledged: int
    verified: int
    #: ``seq: what the block held instead`` for each acknowledged record not found.
    lost: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"acknowledged": self.acknowledged, "verified": self.verified,
                "lost": list(self.lost)}


def check(run: bytes, first: int, acked: Iterable[int],
          read_block: Callable[[int], bytes]) -> Verdict:
    """Read every acknowledged record's block and check it holds exactly that record."""
    seqs = sorted(set(acked))
    lost = []
    for seq in seqs:
        found = parse(read_block(first + seq))
        if found.run != run or found.seq != seq:
            held = "not a record" if found.seq is None else f"run {found.run.hex()} seq {found.seq}"
            lost.append(f"{seq}: {held}")
    return Verdict(len(seqs), len(seqs) - len(lost), tuple(lost))


class BlockReader:
    """Reads 4 KiB blocks of a device or file (O_DIRECT when asked: past the guest's cache)."""

    def __init__(self, path: str, direct: bool) -> None:
        self.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        self.buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT needs

    def __call__(self, index: int) -> bytes:
        n = os.preadv(self.fd, [self.buf], index * BLOCK)
        return bytes(self.buf[:n])

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def acked_in(log_lines: Iterable[str]) -> list[int]:
    """Sequence numbers a writer's log acknowledged."""
    return [int(line.split()[1]) for line in log_lines if line.startswith("ACK ")]


def find_records(path: str, run: bytes, first: int, acked: Iterable[int]) -> Verdict:
    """Check acknowledged records in a host file (page cache included: what QEMU wrote)."""
    reader = BlockReader(path, direct=False)
    try:
        return check(run, first, acked, reader)
    finally:
        reader.close()


# -- the guest side -----------------------------------------------------------------------


def write(device: str, run: bytes, first: int, count: int, log: str, stop: str,
          pause: float, hold: str | None = None) -> int:
    """Write records 0..count-1 until ``stop`` exists; log ACK after each fsync.

    A failed write or fsync is logged (``ERR seq errno``) and retried: such a record is
    not acknowledged until a later fsync covering it returns. With ``hold``, each
    completed write is logged (``WRITTEN seq``) and its fsync waits until the file
    ``hold`` exists: the window in which a device may still hold the data in a
    volatile cache, stretched so that a test can disrupt the device inside it.
    """
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    seq = 0
    with open(log, "a", buffering=1) as out:
        out.write(f"START {os.getpid()}\n")
        while seq < count and not os.path.exists(stop):
            buf[:] = record(run, seq)
            try:
                os.pwritev(fd, [buf], (first + seq) * BLOCK)
                if hold is not None:
                    out.write(f"WRITTEN {seq}\n")
                    while not os.path.exists(hold):
                        time.sleep(0.1)
                os.fsync(fd)
            except OSError as e:
                out.write(f"ERR {seq} {e.errno}\n")
                time.sleep(0.5)
                continue
            out.write(f"ACK {seq}\n")
            seq += 1
            if pause:
                time.sleep(pause)
        out.write(f"DONE {seq}\n")
    os.close(fd)
    return 0


def _lines(path: str) -> Iterator[str]:
    with open(path) as f:
        yield from f


def verify(device: str, run: bytes, first: int, log: str) -> int:
    """Print the verdict of the log's acknowledged records, read back with O_DIRECT."""
    reader = BlockReader(device, direct=True)
    try:
        verdict = check(run, first, acked_in(_lines(log)), reader)
    finally:
        reader.close()
    print(json.dumps(verdict.to_json()))
    return 0 if not verdict.lost else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write or verify soak records on a block device")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("write", "verify"):
        s = sub.add_parser(name)
        s.add_argument("device")
        s.add_argument("--run", required=True, help="the run's id, 32 hex digits")
        s.add_argument("--first", type=int, default=0, help="block of record 0")
        s.add_argument("--log", required=True)
        if name == "write":
            s.add_argument("--count", type=int, required=True, help="stop after this many")
            s.add_argument("--stop", required=True, help="stop when this file exists")
            s.add_argument("--pause", type=float, default=0.0, help="seconds between records")
            s.add_argument("--hold", help="after each write, wait for this file before fsync")
    a = p.parse_args(argv)
    run = bytes.fromhex(a.run)
    if a.cmd == "write":
        return write(a.device, run, a.first, a.count, a.log, a.stop, a.pause, a.hold)
    return verify(a.device, run, a.first, a.log)


if __name__ == "__main__":
    sys.exit(main())
