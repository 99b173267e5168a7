"""The README's main job: examples/default.yaml brought up by vvu-launch, checked from
outside with pytest-testinfra through the lab's own Ansible inventory.

    c1, c2 (consumer image: stock virtio-net + virtio-blk on vhost-user sockets)
      -> vvu-devd per appliance (one VVU function per link)
      -> sw1 (vswitch appliance: vvu-switch) and st1 (storage appliance: vvu-blk)

One lab for the module (a copy of the example under its own name and state
directory, so a user's own `default` lab is untouched); each test leaves it
healthy for the next. The last test brings it down and checks nothing is left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
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
    assert [c["ok"] for c in results] == [True] * 6, results
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
    assert {lk["name"] for lk in st["links"]} == {"c1-nic0", "c2-nic0", "c1-disk0", "c2-disk0"}
    for lk in st["links"]:
        assert "BACKEND_UP" in lk["status"] and "FRONTEND_UP" in lk["status"], lk
        assert lk["messages"] > 0 and lk["errors"] == 0, lk
    text = cli(lab, "status", lab.name).stdout
    assert re.search(r"^c1-disk0\s+blk\s+c1\s+st1\s", text, re.M), text


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


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    cli(lab, "down", lab.name)
    assert lab.leftovers() == []
    assert lab.status()["phase"] == "stopped"
    assert (lab.lab_dir / "disks").is_dir()  # data survives down; --cleanup removes it
    cli(lab, "down", lab.name, "--cleanup")
    assert not lab.lab_dir.exists()
