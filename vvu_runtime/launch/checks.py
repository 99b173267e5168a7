"""The topology's ``checks:`` (netlab's ``validate``), run against a running lab.

Each check runs commands on the lab's nodes (:mod:`vvu_runtime.launch.shell`)
and gives a :class:`CheckResult`; a check that cannot even run (a node not
reachable) fails with the reason. Kinds:

* ``ping``: ``from`` pings ``to``'s address on a switch both are on;
* ``transfer``: ``size`` bytes of random data from ``from`` to ``to`` with nc
  through the switch, sha256 compared on both ends;
* ``disk``: a file system on one of a consumer's disks (made only if the disk
  has none: a check never destroys data), a file written, synced, the page
  cache dropped, read back and compared. A blk disk is the n-th vhost-user
  virtio-blk disk (``vdX`` after the root disk); a scsi disk is the ``sdX``
  whose unit serial (VPD page 0x80, in sysfs) is the export's;
* ``command``: a command on any node, its exit status and (optionally) output
  matched against a regular expression;
* ``fs``: files of several sizes (the largest ``size``) and a small directory
  tree written through a consumer's virtio-fs mount, the page cache dropped,
  their sha256 read back there and compared with the same files read in the fs
  appliance's export (over SSH into the appliance); removed afterwards.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vvu_runtime.launch.shell import CommandResult, ConsoleShell, NodeShell, ShellError, SshShell

__all__ = ["CheckResult", "LabAccess", "run_checks"]

#: Port the transfer check's receiver listens on.
TRANSFER_PORT = 5201
#: Whether this netcat is netcat-openbsd (has -N; busybox nc has not). Its help puts a
#: tab before "-N" (1.229), so the pattern takes any blank.
HAS_N = "nc -h 2>&1 | grep -q -- '[[:space:]]-N'"
#: A lab disk's serial is its link's name cut to this (the storage appliance's export
#: serial: virtio-blk's GET_ID has 20 bytes; vvu-scsi reports the same in VPD 0x80).
SERIAL_MAX = 20


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail,
                "seconds": round(self.seconds, 2)}


class CheckFailed(Exception):
    pass


class LabAccess:
    """Shells to a running lab's nodes, from its resolved topology (``topology.json``)."""

    def __init__(self, plan: Mapping[str, Any], key: Path) -> None:
        self.plan = plan
        self.key = key
        self.nodes = {n["name"]: n for n in plan["nodes"]}
        self._shells: dict[str, NodeShell] = {}

    def shell(self, node: str) -> NodeShell:
        if node not in self.nodes:
            raise ShellError(f"no node {node!r} in lab {self.plan['name']}")
        if node not in self._shells:
            n = self.nodes[node]
            if n["ssh_port"] is not None:
                self._shells[node] = SshShell(node, n["ssh_port"], self.key)
            elif n["console_shell"]:
                self._shells[node] = ConsoleShell(node, Path(n["console_socket"]))
            else:
                raise ShellError(f"{node}: no SSH and no console shell")
        return self._shells[node]

    def run(self, node: str, command: str, timeout: float = 60.0) -> CommandResult:
        return self.shell(node).run(command, timeout=timeout)

    def close(self) -> None:
        for s in self._shells.values():
            s.close()
        self._shells.clear()

    def address(self, src: str, dst: str) -> str:
        """``dst``'s IPv4 address on a switch ``src`` is also on."""
        a, b = self.nodes[src]["addresses"], self.nodes[dst]["addresses"]
        for switch in a:
            if switch in b:
                return str(b[switch]).split("/")[0]
        raise CheckFailed(f"{src} and {dst} share no switch")


def _checked(r: CommandResult, what: str) -> str:
    if not r.ok:
        raise CheckFailed(f"{what} exited {r.status}: {(r.stdout + r.stderr).strip()[-300:]}")
    return r.stdout


def _retry(fn: Callable[[], str], attempts: int, pause: float) -> str:
    for i in range(attempts):
        try:
            return fn()
        except (CheckFailed, ShellError):
            if i == attempts - 1:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")


def check_ping(lab: LabAccess, p: Mapping[str, Any]) -> str:
    src, dst = p["from"], p["to"]
    ip = lab.address(src, dst)
    count = int(p.get("count", 3))

    def once() -> str:
        out = _checked(lab.run(src, f"ping -c {count} -W 2 {ip}", timeout=30 + 3 * count),
                       f"ping {ip}")
        m = re.search(r"(\d+)% packet loss", out)
        rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
        loss = m.group(1) if m else "?"
        return f"{ip}: {loss}% loss" + (f", avg {rtt.group(1)} ms" if rtt else "")

    # The first frames also teach the switch where everyone is: allow a few tries.
    return _retry(once, attempts=5, pause=2)


def check_transfer(lab: LabAccess, p: Mapping[str, Any]) -> str:
    src, dst = p["from"], p["to"]
    ip = lab.address(src, dst)
    size = int(p["size"])  # bytes: the topology loader resolved it (default 8M)
    tok = secrets.token_hex(4)
    tx, rx, rx_pid = f"/tmp/vvu-tx-{tok}", f"/tmp/vvu-rx-{tok}", f"/tmp/vvu-rx-{tok}.pid"
    mib = max(1, size >> 20)
    # netcat-openbsd (has -N) takes the port as an argument, busybox nc wants -p. The
    # listener's stdin must never end: busybox nc closes the connection at its EOF. No fd
    # of the background pipeline may be the shell's (an SSH channel would stay open). $! is
    # the last command's pid: GNU timeout passes a SIGTERM on to nc, busybox timeout is nc.
    listen = (f"L='-l -p {TRANSFER_PORT}'; {HAS_N} && "
              f"L='-l {TRANSFER_PORT}'; sleep 300 </dev/null 2>/dev/null | "
              f"timeout 300 nc $L > {rx} 2>/dev/null & echo $! > {rx_pid}")
    # netcat-openbsd needs -N to close the connection at EOF (without it the sender sits
    # out its 30 s idle timeout after the data, and that is in the rate); busybox nc
    # closes anyway.
    send = (f"N=; {HAS_N} && N=-N; "
            f"nc $N -w 30 {ip} {TRANSFER_PORT} < {tx}")
    got = ""
    try:
        _checked(lab.run(src, f"head -c {size} /dev/urandom > {tx} && sha256sum {tx}"),
                 "make data")
        want = lab.run(src, f"sha256sum {tx}").stdout.split()[0]
        _checked(lab.run(dst, listen), "start the receiver")
        _retry(lambda: _checked(
            lab.run(dst, f"netstat -ltn 2>/dev/null | grep -q ':{TRANSFER_PORT} '"
                         f" || ss -ltn | grep -q ':{TRANSFER_PORT} '"),
            "receiver listening"), attempts=20, pause=0.5)
        start = time.monotonic()
        _retry(lambda: _checked(lab.run(src, send, timeout=300), f"nc to {ip}"), attempts=3,
               pause=2)
        took = time.monotonic() - start
        for _ in range(30):
            got = lab.run(dst, f"sha256sum {rx} 2>/dev/null").stdout.split(" ")[0]
            if got == want:
                break
            time.sleep(1)
    finally:
        # A receiver left listening (the send failed) would take the next transfer's data
        # and leave that check's receiver unable to listen.
        with contextlib.suppress(ShellError):
            lab.run(dst, f"kill $(cat {rx_pid} 2>/dev/null) 2>/dev/null; rm -f {rx} {rx_pid}")
        with contextlib.suppress(ShellError):
            lab.run(src, f"rm -f {tx}")
    if got != want:
        raise CheckFailed(f"sha256 differs: sent {want[:16]}…, received {got[:16] or 'nothing'}…")
    return f"{mib} MiB to {ip}, sha256 equal, {size / max(took, 1e-3) / 2**20:.1f} MiB/s"


def _disk_device(lab: LabAccess, node: str, position: int) -> str:
    """The consumer's ``position``-th vhost-user virtio-blk disk: in PCI order, after the
    root."""
    n = lab.nodes[node]
    skip = 0 if n["console_shell"] else 1  # image consumers boot from vda
    out = _checked(lab.run(node, "ls /sys/block"), "list disks")
    disks = sorted((d for d in out.split() if re.fullmatch(r"vd[a-z]+", d)),
                   key=lambda d: (len(d), d))
    if len(disks) <= skip + position:
        raise CheckFailed(f"{node} has no virtio-blk disk {position} "
                          f"(sees {' '.join(disks) or 'none'})")
    return f"/dev/{disks[skip + position]}"


def _scsi_device(lab: LabAccess, node: str, serial: str) -> str:
    """The consumer's SCSI disk whose unit serial number (VPD 0x80) is ``serial``."""
    # vpd_pg80 is the page as read: a 4-byte header, then the serial.
    script = ("for d in /sys/block/sd*; do [ -e $d/device/vpd_pg80 ] && "
              f'[ "$(tail -c +5 $d/device/vpd_pg80)" = {shlex.quote(serial)} ] && '
              "echo /dev/${d##*/}; done; true")

    def once() -> str:
        found = _checked(lab.run(node, script), "find the SCSI disk").split()
        if len(found) != 1:
            seen = lab.run(node, "ls /sys/block").stdout.split()
            raise CheckFailed(f"{node}: {len(found)} SCSI disks with serial {serial!r} "
                              f"({' '.join(found) or 'none'}; disks: {' '.join(seen)})")
        return found[0]

    # A LUN is scanned in the background after the controller appears: allow a few tries.
    return _retry(once, attempts=10, pause=1)


def check_disk(lab: LabAccess, p: Mapping[str, Any], consumer: Mapping[str, Any]) -> str:
    node = p["node"]
    index = int(p["index"])
    if p.get("protocol") == "scsi":
        dev = _scsi_device(lab, node, str(p["serial"]))
    else:
        dev = _disk_device(lab, node, int(p.get("position", index)))
    mnt = f"/mnt/vvu-check-{index}"
    tok = secrets.token_hex(4)
    q = shlex.quote
    has_fs = lab.run(node, f"blkid {dev}").ok
    made = ""
    if not has_fs:
        mkfs = "mkfs.ext4 -q -F" if lab.run(node, "command -v mkfs.ext4").ok else "mkfs.ext2 -q"
        _checked(lab.run(node, f"{mkfs} {dev}", timeout=180), f"mkfs on {dev}")
        made = ", made a file system"
    script = (f"mkdir -p {mnt} && (mountpoint -q {mnt} || mount {dev} {mnt}) && "
              f"head -c 1048576 /dev/urandom > {mnt}/vvu-check-{tok} && "
              f"sha256sum {mnt}/vvu-check-{tok} && sync && echo 3 > /proc/sys/vm/drop_caches && "
              f"sha256sum {mnt}/vvu-check-{tok} && rm -f {mnt}/vvu-check-{tok} && sync && "
              f"umount {mnt}")
    out = _checked(lab.run(node, f"sh -c {q(script)}", timeout=180), f"write/read on {dev}")
    sums = [line.split()[0] for line in out.splitlines() if "vvu-check-" in line]
    if len(sums) != 2 or sums[0] != sums[1]:
        raise CheckFailed(f"read back differs on {dev}: {sums}")
    return f"{dev}{made}: 1 MiB written, synced, read back equal"


def _sha256s(out: str) -> dict[str, str]:
    """``sha256sum`` output as {relative path: digest}."""
    sums = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            sums[name] = digest
    return sums


def check_fs(lab: LabAccess, p: Mapping[str, Any]) -> str:
    node, mnt, tag = p["node"], p["mount"], p["tag"]
    size = int(p["size"])
    q = shlex.quote
    tok = secrets.token_hex(4)
    top = f"vvu-check-{tok}"
    here = f"{mnt}/{top}"
    # Sizes that cross the FUSE request sizes (4 KiB pages, 128 KiB..1 MiB writes).
    sizes = sorted({min(size, s) for s in (1, 4096, 131072 + 7, size)})
    files = [f"f{s}" for s in sizes] + ["tree/a/b/c/leaf", "tree/a/mid", "tree/top"]
    make = "".join(f"head -c {s} /dev/urandom > f{s} && " for s in sizes)
    script = (f"(mountpoint -q {q(mnt)} || (mkdir -p {q(mnt)} && mount -t virtiofs {q(tag)} "
              f"{q(mnt)})) && mkdir -p {q(here)}/tree/a/b/c && cd {q(here)} && {make}"
              "head -c 5000 /dev/urandom > tree/a/b/c/leaf && echo mid > tree/a/mid && "
              "head -c 70000 /dev/urandom > tree/top && sync && "
              "echo 3 > /proc/sys/vm/drop_caches && sha256sum " + " ".join(files))
    try:
        out = _checked(lab.run(node, f"sh -c {q(script)}", timeout=300),
                       f"write through {mnt}")
        consumer = _sha256s(out)
        there = f"{p['appliance_dir']}/{top}"
        theirs = _sha256s(_checked(
            lab.run(p["appliance"], f"cd {q(there)} && sha256sum {' '.join(files)}",
                    timeout=120), f"read {there} in {p['appliance']}"))
    finally:
        with contextlib.suppress(ShellError):
            lab.run(node, f"rm -rf {q(here)}", timeout=120)
    if len(consumer) != len(files) or consumer != theirs:
        differ = [f for f in files if consumer.get(f) != theirs.get(f)]
        raise CheckFailed(f"sha256 differs between {node}:{mnt} and {p['appliance']}: "
                          f"{', '.join(differ) or 'files missing'}")
    return (f"{len(files)} files (largest {size} B, a directory tree) through {mnt}: "
            f"sha256 equal in {node} and in {p['appliance']}")


def check_command(lab: LabAccess, p: Mapping[str, Any]) -> str:
    node, cmd = p["node"], p["run"]
    want = int(p.get("status", 0))
    r = lab.run(node, cmd, timeout=float(p.get("timeout", 60)))
    if r.status != want:
        raise CheckFailed(f"exit status {r.status}, expected {want}: "
                          f"{(r.stdout + r.stderr).strip()[-300:]}")
    pattern = p.get("output")
    if pattern and not re.search(pattern, r.stdout, re.M):
        raise CheckFailed(f"output does not match {pattern!r}: {r.stdout.strip()[-300:]!r}")
    return f"exit {r.status}" + (f", output matches {pattern!r}" if pattern else "")


def run_checks(lab: LabAccess, checks: Sequence[Mapping[str, Any]],
               progress: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run each check (``{"kind":…, "params":…, "name":…}`` from topology.json) in order."""
    results = []
    for chk in checks:
        kind, params, name = chk["kind"], chk["params"], chk["name"]
        start = time.monotonic()
        try:
            if kind == "ping":
                detail = check_ping(lab, params)
            elif kind == "transfer":
                detail = check_transfer(lab, params)
            elif kind == "disk":
                detail = check_disk(lab, params, lab.nodes[params["node"]])
            elif kind == "command":
                detail = check_command(lab, params)
            elif kind == "fs":
                detail = check_fs(lab, params)
            else:
                raise CheckFailed(f"unknown check kind {kind!r}")
            ok = True
        except (CheckFailed, ShellError) as e:
            ok, detail = False, str(e)
        result = CheckResult(name, ok, detail, time.monotonic() - start)
        results.append(result)
        if progress is not None:
            progress(result)
    lab.close()
    return results
