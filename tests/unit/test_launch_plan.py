"""vvu-launch's plan: QEMU command lines from qemu/*.j2 against reviewed golden files,
the lab's files and credentials, and the access files (ssh_config, inventory).

Regenerate the golden files after a reviewed template change with
``VVU_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_launch_plan.py``.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.lab import (
    ImageFiles,
    LabError,
    LabPaths,
    LabPlan,
    plan_lab,
    write_access_files,
)
from vvu_runtime.launch.render import (
    BlkDevice,
    Credential,
    DataDisk,
    NetDevice,
    RenderError,
    ScsiDevice,
    VvuFunctionDevice,
    render_devices,
)
from vvu_runtime.launch.topology import load_topology, load_topology_text

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGolden vvu-lab-default"
IMAGES = {
    kind: ImageFiles(kernel=Path(f"/images/vvu-{kind}.vmlinuz"),
                     initrd=Path(f"/images/vvu-{kind}.initrd"),
                     cmdline="root=PARTLABEL=root-x86-64 rw console=ttyS0 intel_iommu=on",
                     disk=Path(f"/images/vvu-{kind}.raw"))
    for kind in ("vswitch", "storage", "fs", "consumer")
}
PORTS = {"sw1": 40001, "st1": 40002, "c1": 40003, "c2": 40004, "fs1": 40005}


def _plan(text: str | None = None, source: Path | None = None) -> LabPlan:
    if text is None:
        source = source or REPO / "examples" / "default.yaml"
        topo = load_topology(source)
    else:
        topo = load_topology_text(text, source or Path("/labs/t.yaml"))
    paths = LabPaths(name=topo.name, root=Path(f"/labs/{topo.name}"),
                     run=Path(f"/run/vvu/{topo.name}"))
    return plan_lab(topo, paths, accel=Accelerator.TCG, accel_reason="test",
                    public_key=KEY, images=IMAGES, ports=PORTS)


def _grouped(argv: list[str]) -> str:
    """One option and its value per line: reviewable diffs."""
    lines: list[str] = []
    for a in argv:
        if a.startswith("-") or not lines:
            lines.append(shlex.quote(a))
        else:
            lines[-1] += " " + shlex.quote(a)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("node", ["sw1", "st1", "c1", "c2"])
def test_default_example_renders_the_golden_command_lines(node: str) -> None:
    plan = _plan()
    got = _grouped(plan.node(node).argv)
    golden = GOLDEN / f"default-{node}.txt"
    if os.environ.get("VVU_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


@pytest.mark.parametrize("node", ["fs1", "c1"])
def test_fs_example_renders_the_golden_command_lines(node: str) -> None:
    plan = _plan(source=REPO / "examples" / "fs.yaml")
    got = _grouped(plan.node(node).argv)
    golden = GOLDEN / f"fs-{node}.txt"
    if os.environ.get("VVU_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


def test_devd_command_lines_name_every_link() -> None:
    plan = _plan()
    sw1 = plan.node("sw1")
    specs = [sw1.devd_argv[i + 1] for i, a in enumerate(sw1.devd_argv) if a == "--device"]
    # The last field is the function's max_vhost_queues: one RX and one TX queue.
    assert specs == [
        "c1-nic0:/run/vvu/default/c1-nic0.vu:/run/vvu/default/c1-nic0.vfio:"
        "/dev/shm/vvu-lab-default-c1.ram:2",
        "c2-nic0:/run/vvu/default/c2-nic0.vu:/run/vvu/default/c2-nic0.vfio:"
        "/dev/shm/vvu-lab-default-c2.ram:2",
    ]
    assert "--status-file" in sw1.devd_argv
    # A consumer's RAM file is shared by every appliance it has a link to.
    st1 = plan.node("st1")
    assert "/dev/shm/vvu-lab-default-c1.ram" in " ".join(st1.devd_argv)


def test_each_link_gets_the_queues_its_device_uses_not_devd_s_default() -> None:
    """Every queue is an MSI-X vector in the appliance: at vvu-devd's default of 64 a
    1-vCPU appliance had room for two links. A link gets what its device can use."""
    plan = _plan()
    st1 = plan.node("st1")
    queues = {s.split(":")[0]: int(s.rsplit(":", 1)[1])
              for i, s in enumerate(st1.devd_argv) if st1.devd_argv[i - 1] == "--device"}
    # blk: the export's request queues (options.queues, default 1); scsi: those plus
    # the control and event queues.
    assert queues == {"c1-disk0": 1, "c1-disk1": 3, "c2-disk0": 1}
    text = (REPO / "examples" / "default.yaml").read_text()
    four = _plan(text.replace("kind: storage\n", "kind: storage\n    options: {queues: 4}\n"))
    st1 = four.node("st1")
    assert [s.rsplit(":", 1)[1] for i, s in enumerate(st1.devd_argv)
            if st1.devd_argv[i - 1] == "--device"] == ["4", "6", "4"]


def _credentials(argv: list[str]) -> dict[str, str]:
    out = {}
    for i, a in enumerate(argv):
        if a == "-smbios":
            value = argv[i + 1].split("io.systemd.credential.binary:", 1)[1]
            name, b64 = value.split("=", 1)
            out[name] = base64.b64decode(b64).decode()
    return out


def test_appliances_get_their_config_and_the_lab_key_as_credentials() -> None:
    plan = _plan()
    sw1 = _credentials(plan.node("sw1").argv)
    assert sw1["ssh.authorized_keys.root"] == KEY
    assert json.loads(sw1["vvu.appliance"]) == {
        "kind": "vswitch", "options": {"busy_poll_us": 0},
        "links": [{"name": "c1-nic0"}, {"name": "c2-nic0"}]}
    st1 = _credentials(plan.node("st1").argv)
    config = json.loads(st1["vvu.appliance"])
    assert config["kind"] == "storage"
    assert config["exports"] == [
        {"name": "c1-disk0", "disk": "disk-a", "readonly": False, "protocol": "blk"},
        {"name": "c1-disk1", "disk": "disk-s", "readonly": False, "protocol": "scsi"},
        {"name": "c2-disk0", "disk": "disk-b", "readonly": False, "protocol": "blk"},
    ]
    argv = " ".join(plan.node("st1").argv)
    assert "virtio-blk-pci,drive=data0,serial=disk-a" in argv
    assert "/labs/default/disks/st1-disk-a.raw" in argv


def test_consumers_get_addresses_and_macs_as_network_credentials() -> None:
    plan = _plan()
    creds = _credentials(plan.node("c2").argv)
    net = creds["network.network.50-vvu-nic0"]
    assert "Address=10.10.1.11/24" in net
    nic = load_topology(REPO / "examples" / "default.yaml").consumer("c2").nics[0]
    assert f"MACAddress={nic.mac}" in net
    assert json.loads(creds["vvu.consumer-net"]) == [{"mac": nic.mac,
                                                      "address": "10.10.1.11/24"}]
    assert plan.node("c2").addresses == {"sw1": "10.10.1.11/24"}


def test_files_and_ports() -> None:
    plan = _plan()
    assert plan.ram_files == {
        Path("/dev/shm/vvu-lab-default-c1.ram"): 512,
        Path("/dev/shm/vvu-lab-default-c2.ram"): 512,
    }
    assert plan.data_disks == {Path("/labs/default/disks/st1-disk-a.raw"): 256 << 20,
                               Path("/labs/default/disks/st1-disk-b.raw"): 256 << 20,
                               Path("/labs/default/disks/st1-disk-s.raw"): 64 << 20}
    assert {n.name: n.ssh_port for n in plan.nodes} == {
        k: v for k, v in PORTS.items() if k != "fs1"}
    text = plan.describe()
    assert "truncate -s 512M /dev/shm/vvu-lab-default-c1.ram" in text
    assert text.count("qemu-system-x86_64") == 4


def test_appliance_is_blocked_from_migrating_and_has_a_viommu_first() -> None:
    argv = _plan().node("sw1").argv
    assert "ivshmem-plain,memdev=vvu-no-migrate,master=off" in argv
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "intel-iommu,caching-mode=on"


POLL = """
name: p
appliances:
  sw: {kind: vswitch, access: poll}
consumers:
  a: {memory: 128M, nics: [sw]}
"""


def test_doorbell_bypass_is_opt_in_per_appliance() -> None:
    plain = _plan(POLL).node("sw")
    assert not any("ivshmem-doorbell" in a for a in plain.argv)
    assert "--doorbell-socket" not in plain.devd_argv
    node = _plan(POLL.replace("access: poll", "access: poll, doorbell_bypass: true")).node("sw")
    sock = node.devd_argv[node.devd_argv.index("--doorbell-socket") + 1]
    assert f"socket,id=vvu-doorbell,path={sock}" in node.argv
    # One vector per call of the largest link (2 queues) and the fence.
    assert "ivshmem-doorbell,id=vvu-doorbell,chardev=vvu-doorbell,vectors=3" in node.argv


def test_poll_mode_appliance_has_no_viommu() -> None:
    argv = _plan(POLL).node("sw").argv
    assert "intel-iommu,caching-mode=on" not in argv
    assert any('"driver":"vfio-user-pci"' in a for a in argv)


def test_initramfs_consumer_has_no_ssh_and_gets_its_address_on_the_command_line(
        tmp_path: Path) -> None:
    (tmp_path / "k").write_text("")
    (tmp_path / "i").write_text("")
    text = POLL.replace("a: {memory: 128M, nics: [sw]}",
                        "a: {memory: 128M, nics: [sw], image: {kernel: k, initrd: i}}")
    plan = _plan(text, tmp_path / "t.yaml")
    a = plan.node("a")
    assert a.kind == "initramfs" and a.ssh_port is None and a.console_shell
    append = a.argv[a.argv.index("-append") + 1]
    assert "vvu.ip=10.77.0.10/24" in append
    assert "hostfwd" not in " ".join(a.argv)


def test_a_socket_path_that_does_not_fit_is_a_clear_error() -> None:
    topo = load_topology_text(POLL, Path("/t.yaml"))
    paths = LabPaths(name="p", root=Path("/labs/p"), run=Path("/run/" + "x" * 100))
    with pytest.raises(LabError, match="longer than 107 bytes"):
        plan_lab(topo, paths, accel=Accelerator.TCG, accel_reason="", public_key=KEY,
                 images=IMAGES)


def test_access_files(tmp_path: Path) -> None:
    plan = _plan()
    object.__setattr__(plan, "paths", LabPaths(name="default", root=tmp_path, run=tmp_path))
    write_access_files(plan)
    inv = YAML(typ="safe").load(plan.paths.inventory.read_text())
    assert set(inv["all"]["children"]) == {"appliances", "consumers", "vswitch", "storage",
                                           "consumer"}
    assert set(inv["all"]["children"]["consumers"]["hosts"]) == {"c1", "c2"}
    c1 = inv["all"]["hosts"]["c1"]
    assert (c1["ansible_host"], c1["ansible_port"], c1["ansible_user"]) == \
        ("127.0.0.1", 40003, "root")
    assert c1["ansible_ssh_private_key_file"] == str(tmp_path / "id_ed25519")
    ssh = plan.paths.ssh_config.read_text()
    assert "Host c1.default c1\n    HostName 127.0.0.1\n    Port 40003\n" in ssh
    hosts = plan.paths.testinfra_hosts.read_text().split()
    assert f"paramiko://sw1?ssh_config={tmp_path}/ssh_config" in hosts


def test_device_templates_quote_and_escape() -> None:
    argv = render_devices(
        NetDevice("net0", Path("/r/a,b.vu"), "52:54:00:00:00:09", reconnect_ms=500, queues=2),
        BlkDevice("blk0", Path("/r/with space.vu")),
        VvuFunctionDevice(3, Path("/r/f.vfio")),
        DataDisk("data0", Path("/d/x.raw"), "ser", readonly=True),
        Credential("vvu.appliance", '{"kind": "vswitch"}'),
    )
    assert "socket,id=net0-chr,path=/r/a,,b.vu,reconnect-ms=500" in argv
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:09,mq=on,vectors=6" in argv
    assert "socket,id=blk0-chr,path=/r/with space.vu,reconnect-ms=1000" in argv
    assert "pcie-root-port,id=vvu-rp3,chassis=4,slot=4" in argv
    assert json.loads(argv[argv.index("pcie-root-port,id=vvu-rp3,chassis=4,slot=4") + 2]) == {
        "driver": "vfio-user-pci", "id": "vvu3", "bus": "vvu-rp3",
        "socket": {"type": "unix", "path": "/r/f.vfio"}}
    assert "file=/d/x.raw,format=raw,if=none,id=data0,discard=unmap,readonly=on" in argv
    with pytest.raises(RenderError, match="credential name"):
        Credential("bad name", "x")


def test_a_scsi_export_gives_its_consumer_a_vhost_user_scsi_controller() -> None:
    plan = _plan()
    argv = plan.node("c1").argv
    # c1's disks: st1/disk-a (blk, the first vhost-user disk), st1/disk-s (scsi).
    blk = argv.index("vhost-user-blk-pci,id=blk0,chardev=blk0-chr,num-queues=1")
    scsi = argv.index("vhost-user-scsi-pci,id=scsi1,chardev=scsi1-chr,num_queues=1")
    assert blk < scsi
    assert "socket,id=scsi1-chr,path=/run/vvu/default/c1-disk1.vu,reconnect-ms=1000" in argv
    assert not any("scsi" in a for a in plan.node("c2").argv)
    assert {lk.name: lk.kind for lk in plan.links}["c1-disk1"] == "scsi"
    (config,) = [json.loads(base64.b64decode(a.rpartition("vvu.appliance=")[2]))
                 for a in plan.node("st1").argv if "vvu.appliance=" in a]
    assert {e["name"]: e["protocol"] for e in config["exports"]} == {
        "c1-disk0": "blk", "c1-disk1": "scsi", "c2-disk0": "blk"}


def test_scsi_device_template() -> None:
    argv = render_devices(ScsiDevice("scsi2", Path("/r/a,b.vu"), reconnect_ms=0, queues=3))
    assert argv == ["-chardev", "socket,id=scsi2-chr,path=/r/a,,b.vu",
                    "-device", "vhost-user-scsi-pci,id=scsi2,chardev=scsi2-chr,num_queues=3"]
