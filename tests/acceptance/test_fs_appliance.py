"""virtio-fs through an appliance: examples/fs.yaml brought up by vvu-launch.

    c1 (consumer image: stock vhost-user-fs-pci, tag "share", mounted at /mnt/share
        at boot from the fstab.extra credential)
      -> vvu-devd (one VVU function)
      -> fs1 (fs appliance: vvu-proxy, which supervises a stock virtiofsd sharing
         /run/vvu/disks/share/share, the ext4 file system the appliance made on its
         data disk at first boot)

One lab for the module (a copy of the example under its own name and state
directory). Files written in the consumer are compared (sha256) with the same
files read inside the appliance, and the other way round; then virtiofsd is
SIGKILLed inside the appliance: the test records what the consumer sees and how
it recovers (QEMU's vhost-user-fs has no reconnect, docs/vvu-proxy.md). The
last test brings the lab down and checks nothing is left.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.launch_lab import Lab, explain, wait_until
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

REPO = Path(__file__).resolve().parents[2]
MNT = "/mnt/share"
#: Where fs1's virtiofsd shares from (vvu_runtime.launch.lab.fs_export_dir).
EXPORT = "/run/vvu/disks/share/share"


def cli(lab: Lab, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = lab.vvu(*args, timeout=timeout)
    assert r.returncode == 0, f"vvu-launch {' '.join(args)}: {explain(r)}"
    return r


def sh(lab: Lab, node: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``vvu-launch ssh NODE -- COMMAND`` (the lab's own key and ssh_config)."""
    return lab.vvu("ssh", "--lab", lab.name, node, "--", command, timeout=timeout)


def out(lab: Lab, node: str, command: str, timeout: float = 120) -> str:
    r = sh(lab, node, command, timeout)
    assert r.returncode == 0, f"{node}: {command}: {explain(r)}"
    return r.stdout


def sha256s(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            sums[name] = digest
    return sums


@pytest.fixture(scope="module")
def lab(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(name=f"acc-fs-{os.getpid() % 100000}", topology=REPO / "examples" / "fs.yaml",
              state_dir=tmp_path_factory.mktemp("state"))
    start = time.monotonic()
    try:
        cli(lab, "up", "--detach", "--no-check", "--name", lab.name, str(lab.topology))
        print(f"\nfs lab up (images checked, both VMs ready): {time.monotonic() - start:.0f} s")
        yield lab
    finally:
        lab.vvu("down", lab.name, timeout=300)


def test_checks_of_the_fs_topology_pass(lab: Lab) -> None:
    r = cli(lab, "check", lab.name, "--json")
    results = json.loads(r.stdout)
    assert [c["ok"] for c in results] == [True] * 3, results
    assert results[0]["check"].startswith("fs c1 fs1/share")
    print(f"\n{results[0]['detail']}")


def test_the_share_is_virtiofs_mounted_at_boot(lab: Lab) -> None:
    assert out(lab, "c1", f"findmnt -n -o FSTYPE,SOURCE {MNT}").split() == ["virtiofs", "share"]
    st = lab.status()
    (link,) = st["links"]
    assert link["name"] == "c1-fs0" and "BACKEND_UP" in link["status"], link
    assert "FRONTEND_UP" in link["status"] and link["errors"] == 0, link
    # The appliance made an ext4 file system on its blank data disk and shares a directory.
    assert out(lab, "fs1", f"findmnt -n -o FSTYPE --target {EXPORT}").strip() == "ext4"
    assert "virtiofsd" in out(lab, "fs1", "systemctl status vvu-fs --no-pager -l")


def test_files_written_in_the_consumer_are_in_the_appliance_export(lab: Lab) -> None:
    top = f"t-{secrets.token_hex(4)}"
    sizes = [0, 1, 4095, 4096, 65537, 1 << 20, (8 << 20) + 3]
    files = [f"f{s}" for s in sizes] + ["d/e/f/leaf", "d/e/mid", "d/top"]
    make = " && ".join(f"head -c {s} /dev/urandom > f{s}" for s in sizes)
    # One SSH command per side and step: each costs seconds under TCG.
    mine = sha256s(out(lab, "c1", f"mkdir -p {MNT}/{top}/d/e/f && cd {MNT}/{top} && {make} && "
                       "head -c 3000 /dev/urandom > d/e/f/leaf && echo mid > d/e/mid && "
                       "head -c 70000 /dev/urandom > d/top && sync && "
                       "echo 3 > /proc/sys/vm/drop_caches && sha256sum " + " ".join(files),
                       timeout=300))
    there = out(lab, "fs1", f"cd {EXPORT}/{top} && sha256sum {' '.join(files)} && "
                "find . -type f | sort")
    theirs = sha256s(there)
    assert len(mine) == len(files) and mine == theirs
    listing = [w for w in there.split() if w.startswith("./")]
    assert listing == sorted(f"./{f}" for f in files)
    out(lab, "c1", f"rm -rf {MNT}/{top}")
    assert out(lab, "fs1", f"test -e {EXPORT}/{top} && echo there || echo gone").strip() == \
        "gone"


def test_a_file_made_in_the_appliance_appears_in_the_consumer(lab: Lab) -> None:
    name = f"from-appliance-{secrets.token_hex(4)}"
    want = out(lab, "fs1", f"head -c 300000 /dev/urandom > {EXPORT}/{name} && sync && "
               f"sha256sum {EXPORT}/{name}").split()[0]
    # cache=auto: the consumer's kernel may keep a directory's entries for 1 s.
    got = wait_until(f"{name} in c1", lambda: (sh(lab, "c1", f"sha256sum {MNT}/{name}")
                                               .stdout.split() or [None])[0], 60, interval=1)
    assert got == want
    out(lab, "fs1", f"rm -f {EXPORT}/{name}")


def test_virtiofsd_killed_in_the_appliance(lab: Lab) -> None:
    """What a stock front-end sees when virtiofsd dies, and how it recovers.

    vvu-proxy restarts virtiofsd and re-arms the link on its own. QEMU's
    vhost-user-fs cannot reconnect (no chardev event handler, unlike
    vhost-user-blk/-net): the consumer's device stays without a back-end, so
    requests on the old mount never complete. What heals the consumer is a new
    QEMU: the lab supervisor restarts a consumer whose QEMU is gone, and the new
    one mounts the share again, with every file still there.
    """
    keep = f"kept-{secrets.token_hex(4)}"
    want = out(lab, "c1", f"head -c 200000 /dev/urandom > {MNT}/{keep} && sync && "
               f"sha256sum {MNT}/{keep}").split()[0]
    pids = out(lab, "fs1", "pidof virtiofsd").split()
    c1 = lab.node("c1")
    killed = time.monotonic()
    out(lab, "fs1", f"kill -9 {' '.join(pids)}")
    new = wait_until("vvu-proxy to restart virtiofsd", lambda: (
        sh(lab, "fs1", "pidof virtiofsd").stdout.split() or None), 60, interval=0.5)
    assert set(new).isdisjoint(pids)
    wait_until("the link armed again", lambda: all(
        "BACKEND_UP" in lk["status"] for lk in lab.status()["links"]) or None, 120, interval=1)
    print(f"\nvirtiofsd SIGKILLed; restarted and the link armed again after "
          f"{time.monotonic() - killed:.1f} s")
    journal = out(lab, "fs1", "journalctl -u vvu-fs --no-pager -o cat | tail -n 40")
    assert "back-end exited with status -9" in journal or "back-end exited" in journal, journal

    # The consumer's view: its QEMU lost the vhost-user connection for good, and a
    # process touching the old mount blocks in D state: `timeout` SIGKILLs it after
    # 10 s (and exits 137) but it stays there, the kill pending. Probed in the
    # background: an SSH command waiting on it would never return.
    out(lab, "c1", f"(timeout -s KILL 10 ls {MNT} > /dev/null 2>&1; echo $? > /tmp/ls-status)"
        " < /dev/null > /dev/null 2>&1 &")
    time.sleep(20)
    stuck = out(lab, "c1", "cat /tmp/ls-status 2>/dev/null || echo no-status; "
                "ps -o stat=,comm= -C ls || true")
    qemu_log = (lab.lab_dir / "logs" / "c1.qemu.log").read_text(errors="replace")
    running = Path(f"/proc/{c1['pid']}").exists()
    print(f"consumer 20 s after `timeout -s KILL 10 ls {MNT}`: {' | '.join(stuck.split())}; "
          f"QEMU still running: {running}; QEMU log tail: {qemu_log.strip().splitlines()[-2:]}")
    status, state, comm = stuck.split()
    assert status == "137" and state.startswith("D") and comm == "ls", stuck
    assert running
    devd = json.loads((lab.run_dir / "fs1.devd.json").read_text())["devices"][0]
    assert "BACKEND_UP" in devd["status"] and devd["conns"] == "1", devd  # no reconnect

    # Recovery: a new consumer QEMU (the supervisor restarts a consumer whose QEMU exited).
    if running:
        os.kill(c1["pid"], signal.SIGKILL)
    wait_until("c1 restarted and ready", lambda: (
        (n := lab.node("c1"))["state"] == "ready" and n["pid"] != c1["pid"]) or None,
        400, interval=2)
    assert out(lab, "c1", f"findmnt -n -o FSTYPE {MNT}").strip() == "virtiofs"
    assert out(lab, "c1", f"sha256sum {MNT}/{keep}").split()[0] == want
    name = f"after-{secrets.token_hex(4)}"
    out(lab, "c1", f"echo back > {MNT}/{name} && sync")
    assert out(lab, "fs1", f"cat {EXPORT}/{name}").strip() == "back"
    out(lab, "c1", f"rm -f {MNT}/{name} {MNT}/{keep}")
    print(f"consumer healed (new QEMU, share mounted at boot, data intact) "
          f"{time.monotonic() - killed:.0f} s after the kill")


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    cli(lab, "down", lab.name)
    assert lab.leftovers() == []
    assert lab.status()["phase"] == "stopped"
    cli(lab, "down", lab.name, "--cleanup")
    assert not lab.lab_dir.exists()
