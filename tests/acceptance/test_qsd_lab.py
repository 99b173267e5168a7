"""An unmodified storage engine inside the storage appliance, brought up by vvu-launch:
examples/qsd.yaml (an export with ``engine: qsd``), its consumer a busybox initramfs.

    c1 (busybox initramfs, stock QEMU vhost-user-blk-pci)
      -> vvu-devd on the host (one VVU function)
      -> st1 (storage appliance): vvu-blk.service -> vvu-backend -> vvu-proxy
      -> qemu-storage-daemon's vhost-user-blk export (libvhost-user), supervised by
         vvu-proxy, serving st1's data disk

* the example's own checks pass (``vvu-launch check``; its disk check needs a
  mkfs the busybox consumer lacks: the raw data checks below replace it);
* 1 MiB random patterns written by the consumer read back with the same sha256 in
  the consumer, in the appliance's data disk and in its image on the host; a write
  the consumer saw completed, not flushed, is already in the host's image (the
  export writes through: ``direct`` without O_DIRECT, appliance/qsd.py);
* the consumer writes records with O_DIRECT + fsync, ``ACK i`` only once each
  completed; mid-stream qemu-storage-daemon is SIGKILLed inside the appliance;
  vvu-proxy restarts it (the unit and vvu-proxy itself keep running), the
  consumer's QEMU reconnects; every acknowledged record is in the image (read in
  the appliance and on the host) and nothing reported an error;
* stopping the unit stops qemu-storage-daemon too; ``vvu-launch down`` leaves nothing.

One lab (one appliance boot) for the module. Run with
``flock /tmp/vvu-heavy.lock python -m pytest tests/acceptance/test_qsd_lab.py``.
"""

from __future__ import annotations

import hashlib
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
from tests.support.vvu_rig import acked, record, records_script
from vvu_runtime.appliance.qsd import PROGRAM as QSD
from vvu_runtime.launch.checks import LabAccess
from vvu_runtime.launch.initramfs import ConsumerAssets

pytestmark = [pytest.mark.integration, pytest.mark.acceptance, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
EXPORT_MIB = 64
#: c1's disk from st1: a busybox consumer has no root disk.
DISK = "/dev/vda"
#: st1's data disk: the serial is the export's name (launch/lab.py).
DATA_DISK = "/dev/disk/by-id/virtio-disk"
RECORDS = 120
UNIT = "vvu-blk"


def topology(name: str, assets: ConsumerAssets) -> str:
    """examples/qsd.yaml under another name, its consumer booted from the initramfs
    (seconds under TCG, not a minute) and a smaller export (a quicker mkfs)."""
    yaml = YAML()
    data = yaml.load((REPO / "examples" / "qsd.yaml").read_text())
    data["name"] = name
    data["options"] = {"boot_timeout": 600}
    (export,) = data["appliances"]["st1"]["exports"]
    assert export["engine"] == "qsd"
    export["size"] = f"{EXPORT_MIB}M"
    data["consumers"]["c1"].update(memory="128M", image={"kernel": str(assets.kernel),
                                                         "initrd": str(assets.initrd)})
    # busybox has no mkfs for the disk check's file system: the raw data checks
    # below take its place (test_patterns_...).
    data["checks"] = [c for c in data["checks"] if "disk" not in c]
    assert data["checks"], "the example's other checks still run"
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@dataclass
class QsdLab:
    lab: Lab
    access: LabAccess

    def c1(self, command: str, timeout: float = 120.0) -> str:
        r = self.access.run("c1", command, timeout=timeout)
        assert r.ok, f"c1: {command!r} exited {r.status}: {r.stdout}{r.stderr}"
        return r.stdout

    def st1(self, command: str, timeout: float = 120.0) -> str:
        r = self.access.run("st1", command, timeout=timeout)
        assert r.ok, f"st1: {command!r} exited {r.status}: {r.stdout}{r.stderr}"
        return r.stdout

    def qsd_pids(self) -> list[int]:
        return [int(p) for p in self.st1(f"pidof {QSD} || true").split()]

    def journal(self) -> str:
        return self.st1(f"journalctl -u {UNIT} -o cat --no-pager")

    def image(self) -> Path:
        (disk,) = self.lab.plan()["data_disks"]
        return Path(disk)

    def sha256_in_appliance(self, offset: int, length: int) -> str:
        return self.st1(f"dd if={DATA_DISK} bs=512 skip={offset // 512} count={length // 512} "
                        "iflag=direct 2>/dev/null | sha256sum").split()[0]

    def sha256_on_host(self, offset: int, length: int) -> str:
        with open(self.image(), "rb") as f:
            f.seek(offset)
            return hashlib.sha256(f.read(length)).hexdigest()

    def devd_row(self) -> dict[str, str]:
        (st1,) = [n for n in self.lab.plan()["nodes"] if n["name"] == "st1"]
        rows = json.loads(Path(st1["devd_status"]).read_text())["devices"]
        (row,) = [r for r in rows if r["device"] == "c1-disk0"]
        return dict(row)


@pytest.fixture(scope="module")
def qsd(consumer_assets: ConsumerAssets) -> Iterator[QsdLab]:
    with detached_lab("qsd", lambda name: topology(name, consumer_assets),
                      ("st1", "c1")) as (lab, access):
        yield QsdLab(lab, access)


def test_the_examples_checks_pass_with_qsd_serving_the_disk(qsd: QsdLab) -> None:
    r = qsd.lab.vvu("check", qsd.lab.name, "--json", timeout=600)
    assert r.returncode == 0, explain(r)
    results = json.loads(r.stdout)
    assert [c["ok"] for c in results] == [True], results
    # vvu-backend runs vvu-proxy, which runs qemu-storage-daemon (not vvu-blk).
    assert qsd.st1(f"systemctl is-active {UNIT}").strip() == "active"
    assert re.search(r"^vvu-backend: running: vvu-proxy --link \S+ --exec \S+=qemu-storage-daemon ",
                     qsd.journal(), re.M), qsd.journal()[-2000:]
    main = qsd.st1(f"systemctl show -P MainPID {UNIT}").strip()
    (pid,) = qsd.qsd_pids()
    assert qsd.st1(f"cat /proc/{pid}/status | grep PPid").split()[1] == main
    status = json.loads(qsd.st1("cat /run/vvu/status.json"))
    assert status["ready"] and [x["state"] for x in status["links"]] == ["connected"], status


def test_patterns_read_back_equal_in_consumer_appliance_and_host(qsd: QsdLab) -> None:
    assert qsd.c1(f"cat /sys/block/{DISK[5:]}/size").strip() == str((EXPORT_MIB << 20) // 512)
    # qemu-storage-daemon's export answers GET_ID the same for every disk (appliance/qsd.py).
    assert qsd.c1(f"cat /sys/block/{DISK[5:]}/serial").strip() == "vhost_user_blk"
    c = qsd.c1
    c("dd if=/dev/urandom of=/tmp/pattern bs=65536 count=16 2>/dev/null")
    want = c("sha256sum /tmp/pattern").split()[0]
    c(f"dd if=/tmp/pattern of={DISK} bs=65536 seek=128 oflag=direct conv=fsync 2>/dev/null",
      timeout=300)
    got = c(f"dd if={DISK} bs=65536 skip=128 count=16 iflag=direct 2>/dev/null | sha256sum",
            timeout=300).split()[0]
    assert got == want
    assert qsd.sha256_in_appliance(8 << 20, 1 << 20) == want
    assert qsd.sha256_on_host(8 << 20, 1 << 20) == want

    # Completed, never flushed: already in the host's image, not only in st1's page
    # cache (what `direct: true` promises; an appliance restart would not lose it).
    c("dd if=/dev/urandom of=/tmp/unflushed bs=65536 count=16 2>/dev/null")
    want = c("sha256sum /tmp/unflushed").split()[0]
    c(f"dd if=/tmp/unflushed of={DISK} bs=65536 seek=256 oflag=direct 2>/dev/null", timeout=300)
    assert qsd.sha256_on_host(16 << 20, 1 << 20) == want


def test_qsd_killed_mid_io_loses_no_acknowledged_write(qsd: QsdLab) -> None:
    main = qsd.st1(f"systemctl show -P MainPID {UNIT}").strip()
    armed = qsd.journal().count("ready for a front-end")
    c = qsd.c1
    c("rm -f /tmp/acks")
    c(f"( {records_script(RECORDS)} ) > /dev/null 2>&1 &")
    wait_until("the consumer's first acknowledged writes",
               lambda: int(c("cat /tmp/acks 2>/dev/null | wc -l") or 0) >= 20, 300)
    (pid,) = qsd.qsd_pids()
    killed_at = len(acked(c("cat /tmp/acks")))
    assert killed_at < RECORDS
    qsd.st1(f"kill -9 {pid}")
    down = time.monotonic()
    wait_until("vvu-proxy to restart qemu-storage-daemon",
               lambda: (p := qsd.qsd_pids()) and p != [pid], 60, 0.5)
    wait_until("the link armed again",
               lambda: qsd.journal().count("ready for a front-end") > armed, 120, 0.5)
    print(f"\nqemu-storage-daemon SIGKILLed after {killed_at} ACKs; the link was armed "
          f"again after {time.monotonic() - down:.1f} s")
    wait_until("the consumer's last write",
               lambda: "DONE" in c("tail -n 1 /tmp/acks", timeout=300), 900, 2)
    acks = c("cat /tmp/acks")
    assert "ERR" not in acks, acks
    assert acked(acks) == list(range(RECORDS)), acks
    want = hashlib.sha256(b"".join(record(i) for i in range(RECORDS))).hexdigest()
    assert qsd.sha256_in_appliance(0, 512 * RECORDS) == want
    assert qsd.sha256_on_host(0, 512 * RECORDS) == want
    # vvu-proxy healed it alone: the unit kept its process, systemd restarted nothing.
    assert qsd.st1(f"systemctl show -P MainPID {UNIT}").strip() == main
    assert qsd.st1(f"systemctl show -P NRestarts {UNIT}").strip() == "0"
    log = qsd.journal()
    assert "Traceback" not in log, log[-3000:]
    assert "back-end exited with status -9" in log, log[-3000:]
    # qemu-storage-daemon's export does not offer INFLIGHT_SHMFD (it resubmits from
    # the used idx QEMU restarts the ring at): then the proxy must not make an area.
    offers = re.findall(r"the back-end offers protocol features (0x[0-9a-f]+)", log)
    assert offers, log[-3000:]
    inflight = int(offers[0], 16) >> 12 & 1
    assert ("inflight area" in log) == bool(inflight), log[-3000:]
    print(f"qemu-storage-daemon offers protocol features {offers[0]} "
          f"(INFLIGHT_SHMFD {'yes' if inflight else 'no'})")
    row = qsd.devd_row()
    assert int(row["conns"]) >= 2 and int(row["errors"]) == 0, row


def test_stopping_the_unit_stops_qsd_and_down_leaves_nothing(qsd: QsdLab) -> None:
    qsd.st1(f"systemctl stop {UNIT}")
    assert qsd.qsd_pids() == []  # the supervised back-end went with vvu-proxy
    log = qsd.journal()
    assert re.search(r"vvu_runtime\.proxy\.cli: stopped$", log, re.M), log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    qsd.access.close()
    lab = qsd.lab
    down = lab.vvu("down", lab.name, "--cleanup", timeout=300)
    assert down.returncode == 0, explain(down)
    left = wait_until_clean(lab)
    assert left == [], left


def wait_until_clean(lab: Lab, timeout: float = 15.0) -> list[str]:
    """Leftovers once processes had ``timeout`` s to go (a SIGKILLed one exits async)."""
    deadline = time.monotonic() + timeout
    while (left := lab.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
