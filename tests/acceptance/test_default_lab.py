"""The README's main job: examples/default.yaml brought up by vvu-launch, checked from
outside with pytest-testinfra through the lab's own Ansible inventory.

    c1, c2 (consumer image: stock virtio-net + virtio-blk on vhost-user sockets;
            c1 also a virtio-scsi controller on vhost-user-scsi)
      -> vvu-devd per appliance (one VVU function per link)
      -> sw1 (vswitch appliance: vvu-switch) and st1 (storage appliance: vvu-blk, and
         vvu-scsi for c1's scsi export disk-s, 64 MiB, as LUN 0)

One lab for the module (a copy of the example under its own name and state
directory, so a user's own `default` lab is untouched); each test leaves it
healthy for the next. The last test brings it down and checks nothing is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra

from tests.support.launch_lab import Lab, explain, wait_until
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

REPO = Path(__file__).resolve().parents[2]
DISK = "/dev/vdb"  # c1's disk from st1 (vda is its root disk)
#: c1's SCSI disk: st1's export disk-s (LUN 0 of its own controller), unit serial = the link.
SCSI_SERIAL = "c1-disk1"
SCSI_SIZE = 64 << 20


def cli(lab: Lab, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``vvu-launch ARGS`` that must succeed."""
    r = lab.vvu(*args, timeout=timeout)
    assert r.returncode == 0, f"vvu-launch {' '.join(args)}: {explain(r)}"
    return r


def up(lab: Lab) -> None:
    cli(lab, "up", "--detach", "--no-check", "--name", lab.name, str(lab.topology))


def host(lab: Lab, name: str) -> Any:
    """A testinfra host from the lab's Ansible inventory (ansible://NAME)."""
    return testinfra.get_host(f"ansible://{name}",
                              ansible_inventory=str(lab.lab_dir / "inventory.yml"))


def wait(predicate: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    wait_until(what, lambda: predicate() or None, timeout, interval=2)


@pytest.fixture(scope="module")
def lab(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # testinfra's ansible:// hosts run ansible-inventory: the venv's, also when the
    # venv is not activated (.venv/bin/python -m pytest).
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{path}"
    lab = Lab(name=f"acc-default-{os.getpid() % 100000}",
              topology=REPO / "examples" / "default.yaml",
              state_dir=tmp_path_factory.mktemp("state"))
    try:
        up(lab)
        yield lab
    finally:
        lab.vvu("down", lab.name, timeout=300)
        os.environ["PATH"] = path


def test_checks_of_the_default_topology_pass(lab: Lab) -> None:
    r = cli(lab, "check", lab.name, "--json")
    results = json.loads(r.stdout)
    assert [c["ok"] for c in results] == [True] * 7, results
    # The SCSI disk's check found it by its unit serial, as an sd device.
    (scsi,) = [c for c in results if c["check"] == "disk c1 st1/disk-s"]
    assert re.match(r"/dev/sd[a-z]+[,:] ", scsi["detail"]), scsi
    kinds = {c["check"].split()[0] for c in results}
    assert kinds == {"ping", "transfer", "disk", "command"}


def test_status_shows_every_node_ready_and_every_link_up(lab: Lab) -> None:
    st = lab.status()
    assert st["phase"] == "running"
    assert {(n["name"], n["role"], n["kind"], n["state"]) for n in st["nodes"]} == {
        ("sw1", "appliance", "vswitch", "ready"), ("st1", "appliance", "storage", "ready"),
        ("c1", "consumer", "consumer", "ready"), ("c2", "consumer", "consumer", "ready")}
    for n in st["nodes"]:
        assert Path(f"/proc/{n['pid']}").exists(), n
        if n["role"] == "appliance":  # the image's runtime is this checkout's
            assert n["runtime"]["matches_checkout"], n
    assert {lk["name"] for lk in st["links"]} == {"c1-nic0", "c2-nic0", "c1-disk0", "c1-disk1",
                                                  "c2-disk0"}
    for lk in st["links"]:
        assert "BACKEND_UP" in lk["status"] and "FRONTEND_UP" in lk["status"], lk
        assert lk["messages"] > 0 and lk["errors"] == 0, lk
    text = cli(lab, "status", lab.name).stdout
    assert re.search(r"^c1-disk0\s+blk\s+c1\s+st1\s", text, re.M), text
    assert re.search(r"^c1-disk1\s+scsi\s+c1\s+st1\s", text, re.M), text


def test_nodes_through_the_inventory(lab: Lab) -> None:
    sw1, st1, c1, c2 = (host(lab, n) for n in ("sw1", "st1", "c1", "c2"))
    assert sw1.check_output("hostname") == "sw1"
    assert sw1.service("vvu-switch").is_running
    assert st1.service("vvu-blk").is_running
    # The VVU functions are bound to vfio-pci in the appliances.
    assert "vfio-pci" in sw1.check_output(
        "for d in /sys/bus/pci/devices/*; do grep -q 0x107f $d/device && "
        "basename $(readlink $d/driver); done")
    assert "10.10.1.10/24" in c1.check_output("ip -o -4 addr")
    assert "10.10.1.11/24" in c2.check_output("ip -o -4 addr")


def test_consumers_ping_and_move_a_file_through_the_switch_appliance(lab: Lab) -> None:
    c1, c2 = host(lab, "c1"), host(lab, "c2")
    assert c1.run("ping -c 3 -W 2 10.10.1.11").rc == 0
    tok = secrets.token_hex(4)
    c1.check_output(f"head -c 4194304 /dev/urandom > /tmp/x-{tok}")
    want = c1.check_output(f"sha256sum /tmp/x-{tok}").split()[0]
    c2.check_output(f"(sleep 120 | timeout 120 nc -l 5311 > /tmp/y-{tok}) "
                    ">/dev/null 2>&1 &")
    wait(lambda: c2.run("ss -ltn | grep -q ':5311 '").rc == 0, "c2 listening", 60)
    c1.check_output(f"nc -N -w 30 10.10.1.11 5311 < /tmp/x-{tok}")
    wait(lambda: c2.check_output(f"sha256sum /tmp/y-{tok}").split()[0] == want,
         "the file on c2", 60)


# ------------------------------------------------------------------ c1's SCSI disk (vvu-scsi)
# Through the storage appliance: c1's vhost-user-scsi-pci -> vvu-devd -> VVU function
# -> vvu-scsi in st1 -> st1's data disk -> the lab's disks/st1-disk-s.raw on the host.


def _sd_with_serial(c1: Any, serial: str) -> str | None:
    """The sd device whose unit serial (VPD 0x80 as the kernel read it) is ``serial``."""
    out: str = c1.check_output(
        "for d in /sys/block/sd*; do [ -e $d/device/vpd_pg80 ] && "
        f"[ \"$(tail -c +5 $d/device/vpd_pg80)\" = {serial} ] && echo /dev/${{d##*/}}; "
        "done; true")
    found = out.split()
    assert len(found) <= 1, found
    return found[0] if found else None


def _scsi_disk(c1: Any) -> str:
    dev = _sd_with_serial(c1, SCSI_SERIAL)
    assert dev is not None, c1.check_output("lsscsi -g; ls /sys/block")
    return dev


def _st1_journal_count(st1: Any, text: str) -> int:
    """Lines of vvu-blk.service's journal (its backends' logs) containing ``text``."""
    return int(st1.check_output(f"journalctl -u vvu-blk -o cat | grep -cF {shlex.quote(text)} "
                                "|| true"))


def test_the_scsi_disk_is_a_vvu_scsi_lun_served_inside_the_storage_appliance(lab: Lab) -> None:
    st1, c1 = host(lab, "st1"), host(lab, "c1")
    # st1 runs vvu-scsi (not vvu-blk) for c1's scsi export, from its LUN file.
    procs = st1.check_output("ps -eo args")
    assert re.search(r"vvu-scsi --vvu \S+ --config /run/vvu/scsi/c1-disk1\.json", procs), procs
    luns = json.loads(st1.check_output("cat /run/vvu/scsi/c1-disk1.json"))
    assert luns == {"luns": [{"lun": 0, "image": "/dev/disk/by-id/virtio-disk-s",
                              "read_only": False, "serial": SCSI_SERIAL}]}
    dev = _scsi_disk(c1)
    name = dev.rpartition("/")[2]
    # lsscsi: a disk, vendor VVU, model vvu-scsi disk, at LUN 0 of its controller.
    listing = c1.check_output("lsscsi")
    line = next((x for x in listing.splitlines() if x.split()[-1:] == [dev]), listing)
    assert re.match(r"\[\d+:0:0:0\]\s+disk\s+VVU\s+vvu-scsi disk\s+0001\s+/dev/sd", line), line
    assert int(c1.check_output(f"cat /sys/block/{name}/size")) * 512 == SCSI_SIZE
    assert c1.check_output(f"cat /sys/block/{name}/device/vendor").strip() == "VVU"
    # A file system, 8 MiB written, read back after dropping the page cache.
    tok = secrets.token_hex(4)
    c1.check_output(f"mkfs.ext4 -q -F {dev} && mkdir -p /mnt/s && mount {dev} /mnt/s && "
                    f"head -c 8388608 /dev/urandom > /tmp/s-{tok} && cp /tmp/s-{tok} /mnt/s/f && "
                    "sync")
    want = c1.check_output(f"sha256sum < /tmp/s-{tok}").split()[0]
    got = c1.check_output("echo 3 > /proc/sys/vm/drop_caches && sha256sum < /mnt/s/f && "
                          f"umount /mnt/s && rm -f /tmp/s-{tok}").split()[0]
    assert got == want


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_fstrim_in_the_consumer_frees_the_blocks_of_the_host_file(lab: Lab) -> None:
    c1 = host(lab, "c1")
    dev = _scsi_disk(c1)
    backing = lab.lab_dir / "disks" / "st1-disk-s.raw"  # st1's data disk (discard=unmap)
    c1.check_output(f"blkid {dev} || mkfs.ext4 -q -F {dev}")
    c1.check_output(f"mkdir -p /mnt/s && mount {dev} /mnt/s && fstrim /mnt/s")
    try:
        empty = _allocated(backing)
        c1.check_output("head -c 25165824 /dev/urandom > /mnt/s/big && sync")
        full = _allocated(backing)
        assert full - empty >= 20 << 20, (empty, full)  # 24 MiB reached the host file
        out = c1.check_output("rm /mnt/s/big && sync && fstrim -v /mnt/s")
        assert re.search(r"/mnt/s: \d+(\.\d+)? \w+ \(\d+ bytes\) trimmed", out), out
        wait(lambda: _allocated(backing) <= empty + (4 << 20),
             f"the host file's blocks freed (before fstrim {full}, empty {empty})", 60)
    finally:
        c1.run("umount /mnt/s")


def test_a_lun_added_in_the_appliance_appears_in_the_consumer_without_a_reboot(
        lab: Lab) -> None:
    st1, c1 = host(lab, "st1"), host(lab, "c1")
    boot_id = c1.check_output("cat /proc/sys/kernel/random/boot_id")
    serial = f"hot-{secrets.token_hex(3)}"
    luns = "/run/vvu/scsi/c1-disk1.json"
    original = st1.check_output(f"cat {luns}")
    added = json.loads(original)
    added["luns"].append({"lun": 1, "image": "/var/tmp/lun1.img", "serial": serial})
    st1.check_output(f"truncate -s 16M /var/tmp/lun1.img && "
                     f"echo {shlex.quote(json.dumps(added))} > {luns} && systemctl reload vvu-blk")
    try:
        wait(lambda: _sd_with_serial(c1, serial) is not None, "the new LUN in c1", 60)
        dev = _sd_with_serial(c1, serial)
        assert dev is not None
        name = dev.rpartition("/")[2]
        listing = c1.check_output("lsscsi")
        assert re.search(rf"\[\d+:0:0:1\]\s+disk\s+VVU\s+vvu-scsi disk\s+0001\s+{dev}\s*$",
                         listing, re.M), listing
        assert int(c1.check_output(f"cat /sys/block/{name}/size")) * 512 == 16 << 20
        tok = secrets.token_hex(4)
        c1.check_output(f"head -c 1048576 /dev/urandom > /tmp/l-{tok} && "
                        f"dd if=/tmp/l-{tok} of={dev} bs=65536 oflag=direct status=none")
        want = c1.check_output(f"sha256sum < /tmp/l-{tok} && rm /tmp/l-{tok}").split()[0]
        assert st1.check_output("head -c 1048576 /var/tmp/lun1.img | sha256sum").split()[0] \
            == want  # the bytes are in the appliance's backing file
        assert c1.check_output("cat /proc/sys/kernel/random/boot_id") == boot_id
    finally:
        # Back to the configured LUN set: the LUN goes away in c1 too (REMOVED event).
        st1.check_output(f"echo {shlex.quote(original.strip())} > {luns} && "
                         "systemctl reload vvu-blk")
        wait(lambda: _sd_with_serial(c1, serial) is None, "the LUN gone from c1", 60)
        st1.check_output("rm -f /var/tmp/lun1.img")
    wait(lambda: _st1_journal_count(st1, "LUNs removed [1], added none") >= 1,
         "vvu-scsi to log the LUN removed", 30)
    assert _scsi_disk(c1)  # LUN 0 stayed


def _naa(serial: str) -> str:
    """vvu-scsi's NAA designator of a LUN: locally assigned (3), 60 bits of sha256(serial)."""
    low = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:8], "big")
    return f"{(0x3 << 60) | (low & ((1 << 60) - 1)):016x}"


def test_sg3_utils_in_the_consumer_read_what_vvu_scsi_serves(lab: Lab) -> None:
    c1 = host(lab, "c1")
    dev = _scsi_disk(c1)
    inq = c1.check_output(f"sg_inq {dev}")
    assert re.search(r"Vendor identification: VVU\s*$", inq, re.M), inq
    assert re.search(r"Product identification: vvu-scsi disk\s*$", inq, re.M), inq
    assert re.search(r"version=0x06 \s*\[SPC-4\]", inq), inq
    cap = c1.check_output(f"sg_readcap --long {dev}")
    assert f"Device size: {SCSI_SIZE} bytes" in cap, cap
    assert re.search(rf"Number of logical blocks={SCSI_SIZE // 512}\b", cap), cap
    assert "Logical block length=512 bytes" in cap and "lbpme=1" in cap, cap
    pages = c1.check_output(f"sg_vpd --page=0x00 {dev}")
    for name in ("Unit serial number", "Device identification", "Block limits",
                 "Block device characteristics", "Logical block provisioning"):
        assert name in pages, pages
    sn = c1.check_output(f"sg_vpd --page=0x80 {dev}")
    assert re.search(rf"serial number: {SCSI_SERIAL}\s*$", sn, re.M), sn
    di = c1.check_output(f"sg_vpd --page=0x83 {dev}")
    assert re.search(r"designator type: NAA", di), di
    assert f"0x{_naa(SCSI_SERIAL)}" in di.lower(), di
    assert re.search(r"designator type: T10 vendor identification", di), di
    assert re.search(rf"vendor specific: {SCSI_SERIAL}\s*$", di, re.M), di
    # The kernel's world-wide id is the T10 designator (it ranks a locally assigned NAA,
    # type 3, below T10 vendor identification).
    wwid = c1.check_output(f"cat /sys/block/{dev.rpartition('/')[2]}/device/wwid").strip()
    assert wwid == f"t10.VVU     {SCSI_SERIAL}", wwid
    bl = c1.check_output(f"sg_vpd --page=0xb0 {dev}")
    assert _vpd_number(bl, "Maximum transfer length") == 65535, bl
    assert _vpd_number(bl, "Maximum unmap LBA count") == 4194304, bl
    assert _vpd_number(bl, "Maximum unmap block descriptor count") == 64, bl


def _vpd_number(text: str, label: str) -> int | None:
    """A number sg_vpd prints after ``label:``: decimal ("65535 blocks", sg3-utils
    1.46) or hex ("0xffff", 1.48, the consumer image's)."""
    m = re.search(rf"^\s*{re.escape(label)}: (0x[0-9a-fA-F]+|\d+)\b", text, re.M)
    return int(m.group(1), 0) if m else None


def test_a_logical_unit_reset_from_the_consumer_reaches_vvu_scsi(lab: Lab) -> None:
    st1, c1 = host(lab, "st1"), host(lab, "c1")
    dev = _scsi_disk(c1)
    line = "LOGICAL_UNIT_RESET of LUN 0"
    before = _st1_journal_count(st1, line)
    # sg_reset -d: SG_SCSI_RESET_DEVICE -> virtio_scsi's device reset handler -> a
    # VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET on the control queue.
    c1.check_output(f"sg_reset --device {dev}")
    wait(lambda: _st1_journal_count(st1, line) > before, "vvu-scsi to log the LU reset", 30)
    tok = secrets.token_hex(4)
    c1.check_output(f"head -c 262144 /dev/urandom > /tmp/r-{tok} && "
                    f"dd if=/tmp/r-{tok} of={dev} bs=4096 seek=1024 oflag=direct status=none")
    got = c1.check_output(f"dd if={dev} bs=4096 skip=1024 count=64 iflag=direct status=none "
                          f"| sha256sum; sha256sum < /tmp/r-{tok}; rm /tmp/r-{tok}")
    a, b = (x.split()[0] for x in got.splitlines())
    assert a == b


def _write_on_disk(c1: Any, text: str) -> None:
    c1.check_output(f"blkid {DISK} || mkfs.ext4 -q -F {DISK}")
    c1.check_output(f"mkdir -p /mnt/d && mount {DISK} /mnt/d && echo {text} > /mnt/d/token "
                    "&& sync && umount /mnt/d")


def _read_from_disk(c1: Any) -> str:
    out: str = c1.check_output(f"mkdir -p /mnt/d && mount {DISK} /mnt/d && cat /mnt/d/token; "
                               "umount /mnt/d")
    return out.strip()


def test_a_file_on_a_storage_appliance_disk_survives_down_and_up(lab: Lab) -> None:
    tok = secrets.token_hex(8)
    _write_on_disk(host(lab, "c1"), tok)
    cli(lab, "down", lab.name)
    assert lab.leftovers() == []
    up(lab)
    assert _read_from_disk(host(lab, "c1")) == tok


def test_consumers_recover_when_the_backend_inside_an_appliance_is_killed(lab: Lab) -> None:
    c1 = host(lab, "c1")
    tok = secrets.token_hex(8)
    _write_on_disk(c1, tok)
    st1, sw1 = host(lab, "st1"), host(lab, "sw1")
    before = {n: lab.node(n)["pid"] for n in ("c1", "c2", "st1", "sw1")}
    st1.check_output("systemctl kill -s KILL vvu-blk.service")
    sw1.check_output("systemctl kill -s KILL vvu-switch.service")
    # systemd restarts them; the consumers' QEMU reconnects to the same links.
    wait(lambda: st1.service("vvu-blk").is_running and sw1.service("vvu-switch").is_running,
         "the backends running again", 120)
    assert _read_from_disk(c1) == tok
    wait(lambda: c1.run(f"dd if={_scsi_disk(c1)} of=/dev/null bs=4096 count=16 "
                        "iflag=direct").rc == 0, "c1's SCSI disk (vvu-scsi) to work again", 120)
    wait(lambda: c1.run("ping -c 1 -W 2 10.10.1.11").rc == 0, "c1 pinging c2 again", 120)
    assert {n: lab.node(n)["pid"] for n in before} == before


def test_a_killed_vvu_devd_is_healed_without_restarting_a_consumer(lab: Lab) -> None:
    st1 = lab.node("st1")
    consumers = {n: lab.node(n)["pid"] for n in ("c1", "c2")}
    os.kill(st1["devd_pid"], signal.SIGKILL)
    wait(lambda: lab.node("st1")["restarts"] == st1["restarts"] + 1
         and lab.node("st1")["state"] == "ready", "st1 healed", 400)
    assert {n: lab.node(n)["pid"] for n in consumers} == consumers
    tok = secrets.token_hex(8)
    c1 = host(lab, "c1")
    wait(lambda: c1.run(f"dd if={DISK} of=/dev/null bs=4096 count=16 iflag=direct").rc == 0,
         "c1's disk to work again", 120)
    _write_on_disk(c1, tok)
    assert _read_from_disk(c1) == tok
    wait(lambda: c1.run(f"dd if={_scsi_disk(c1)} of=/dev/null bs=4096 count=16 "
                        "iflag=direct").rc == 0, "c1's SCSI disk to work again", 120)


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    cli(lab, "down", lab.name)
    assert lab.leftovers() == []
    assert lab.status()["phase"] == "stopped"
    assert (lab.lab_dir / "disks").is_dir()  # data survives down; --cleanup removes it
    cli(lab, "down", lab.name, "--cleanup")
    assert not lab.lab_dir.exists()
