"""The images (appliances/): built by mkosi, booted under TCG, checked with pytest-testinfra.

* vswitch: built with plain ``mkosi -C appliances/vswitch build`` (the user's
  way, no extra flags), booted with two VVU functions from ``vvu-devd`` and the
  config as the ``vvu.appliance`` credential (links listed in the other order
  than the PCI functions: they are matched by uuid). Checked over SSH with the
  key given as ``ssh.authorized_keys.root``: backend unit active and READY
  (Type=notify) with each link in STATUS, functions on vfio-pci, nothing
  failed, ``is-system-running`` = running, config valid, the installed
  runtime's version and digest = the checkout's, another key refused, only the
  listed units enabled. Two busybox consumers then ping each other through it.
* storage: two exports (two vvu-blk under vvu-backend): a whole data disk named
  by serial, served to a stock vhost-user-blk consumer, and a file created on a
  blank second data disk; then booted without the debug console and with a
  bad config: a login prompt that refuses root without password, and the unit
  ``failed`` with the config error (file, line, field) in ``systemctl status``.
* consumer: fio, iperf3, mkfs.ext4, nc, ping, kernel modules virtio-net/blk/scsi
  and virtiofs, SSH with the given key, a lab NIC configured from a
  ``network.network.*`` credential.

Boot-to-ready (QEMU start -> every link BACKEND_UP as vvu-devd reports it) is
printed (``-s``) and kept as a user property of the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vvu_runtime.appliance.wheel import project_version, source_digest
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.appliance import (
    ApplianceImage,
    ApplianceMachine,
    appliance_names,
    build_appliance,
    ssh_key,
)
from vvu_runtime.launch.initramfs import ConsumerAssets
from vvu_runtime.launch.machine import QemuMachine
from vvu_runtime.launch.toolchain import Toolchain

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

LINKS = ("c1-nic0", "c2-nic0")
#: Enabled unit files of an appliance (appliances/README.md says why each).
ENABLED = {"ssh.service", "systemd-networkd.service", "systemd-networkd.socket",
           "systemd-network-generator.service"}


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class DeviceModel:
    """``vvu-devd`` serving one VVU device per link (consumer RAM: sparse /dev/shm files)."""

    RAM_MIB = 128

    def __init__(self, workdir: Path, names: tuple[str, ...]) -> None:
        prefix = f"/dev/shm/vvu-test-image-{os.getpid()}-{workdir.name}"
        self.names = names
        self.rams = [Path(f"{prefix}-{n}.ram") for n in names]
        self.vfio_sockets = [workdir / f"{n}.vfio" for n in names]
        self.vhost_sockets = [workdir / f"{n}.vhost" for n in names]
        self.log_path = workdir / "devd.log"
        argv = [sys.executable, "-m", "vvu_runtime.device.devd"]
        for name, ram, vhost, vfio in zip(names, self.rams, self.vhost_sockets,
                                          self.vfio_sockets, strict=True):
            with ram.open("wb") as f:
                f.truncate(self.RAM_MIB << 20)
            argv += ["--device", f"{name}:{vhost}:{vfio}:{ram}"]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            _wait_for(lambda: "serving" in self.log() or self.proc.poll() is not None,
                      "vvu-devd", 30)
        finally:
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"vvu-devd did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def backend_up(self) -> int:
        return self.log().count("driver set BACKEND_UP")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for ram in self.rams:
            ram.unlink(missing_ok=True)


def _boot(vm: ApplianceMachine, devd: DeviceModel | None, links: int) -> float:
    """Launch ``vm``; seconds from QEMU's start to every link BACKEND_UP (0: no devd)."""
    start = time.monotonic()
    vm.launch()
    ready = 0.0
    if devd is not None:
        _wait_for(lambda: devd.backend_up() >= links, "every link BACKEND_UP", 180)
        ready = time.monotonic() - start
    vm.wait_for_boot()
    vm.wait_for_ssh()
    return ready


# --------------------------------------------------------------------------
# vswitch, built by plain mkosi
# --------------------------------------------------------------------------


def _mkosi(toolchain: Toolchain) -> str:
    for candidate in (shutil.which("mkosi"), str(toolchain.mkosi_wrapper),
                      str(Path(sys.executable).with_name("mkosi"))):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no mkosi command: run ./setup (it installs the mkosi wrapper)")


@pytest.fixture(scope="module")
def plain_vswitch(toolchain: Toolchain) -> tuple[ApplianceImage, float]:
    """``mkosi -C appliances/vswitch build``, exactly as a user runs it after ./setup."""
    images = toolchain.repo / "images"
    for old in images.glob("vvu-vswitch*"):
        old.unlink()
    start = time.monotonic()
    result = subprocess.run([_mkosi(toolchain), "-C", "appliances/vswitch", "build"],
                            cwd=toolchain.repo, capture_output=True, text=True, check=False,
                            timeout=1800)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = [images / f"vvu-vswitch.{ext}" for ext in ("raw", "vmlinuz", "initrd", "cmdline",
                                                      "manifest")]
    assert all(f.is_file() for f in files), sorted(p.name for p in images.iterdir())
    image = ApplianceImage(
        name="vswitch", image_id="vvu-vswitch", disk=files[0], kernel=files[1],
        initrd=files[2], cmdline=files[3].read_text().strip(), ssh_key=ssh_key(toolchain),
        inputs="plain mkosi", built_at=time.time(), build_seconds=took)
    return image, took


@pytest.fixture(scope="module")
def devd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceModel]:
    model = DeviceModel(tmp_path_factory.mktemp("devd"), LINKS)
    try:
        yield model
    finally:
        model.stop()


@pytest.fixture(scope="module")
def vswitch(toolchain: Toolchain, plain_vswitch: tuple[ApplianceImage, float],
            devd: DeviceModel) -> Iterator[tuple[ApplianceMachine, float]]:
    image, _ = plain_vswitch
    config = {"kind": "vswitch", "links": [{"name": n} for n in reversed(LINKS)]}
    vm = ApplianceMachine(toolchain, image, accel=Accelerator.TCG, config=config)
    for sock in devd.vfio_sockets:
        vm.add_vfio_user_device(sock)
    try:
        ready = _boot(vm, devd, len(LINKS))
        print(f"\nvswitch: QEMU start -> both links BACKEND_UP: {ready:.1f} s", file=sys.stderr)
        yield vm, ready
    finally:
        vm.shutdown()


@pytest.fixture(scope="module")
def host(vswitch: tuple[ApplianceMachine, float]) -> Any:
    return vswitch[0].testinfra_host()


def test_plain_mkosi_build_gives_boot_files_and_a_manifest(
    plain_vswitch: tuple[ApplianceImage, float], record_property: Any,
) -> None:
    image, took = plain_vswitch
    record_property("build_seconds", round(took))
    words = image.cmdline.split()
    for arg in ("console=ttyS0", "intel_iommu=on", "iommu=pt", "rw"):
        assert arg in words
    assert any(w.startswith("root=") for w in words)
    assert 0 < image.initrd.stat().st_size < 8 << 20  # busybox + virtio_blk only
    manifest = json.loads(image.disk.with_suffix(".manifest").read_text())
    packages = {p["name"]: p["version"] for p in manifest["packages"]}
    assert "python3" in packages and "openssh-server" in packages
    assert "linux-image-cloud-amd64" in packages
    assert image.disk.stat().st_blocks * 512 <= 260 << 20


def test_backend_unit_is_ready_with_every_link(host: Any,
                                               vswitch: tuple[ApplianceMachine, float],
                                               record_property: Any) -> None:
    record_property("boot_to_ready_seconds", round(vswitch[1], 1))
    unit = host.service("vvu-switch")
    assert unit.is_enabled and unit.is_running
    props = dict(line.split("=", 1) for line in host.check_output(
        "systemctl show -p Type,ActiveState,SubState,StatusText,NotifyAccess,WatchdogUSec "
        "vvu-switch").splitlines())
    assert (props["Type"], props["ActiveState"], props["SubState"]) == (
        "notify", "active", "running")  # Type=notify: active only after READY=1
    assert props["WatchdogUSec"] == "20s"
    for name in LINKS:
        assert f"{name}: waiting for front-end" in props["StatusText"]
    status = json.loads(host.file("/run/vvu/status.json").content_string)
    assert status["ready"] and {x["name"]: x["function"] for x in status["links"]} == {
        "c1-nic0": "0000:01:00.0", "c2-nic0": "0000:02:00.0"}


def test_boot_timeline_is_reported(host: Any, vswitch: tuple[ApplianceMachine, float]) -> None:
    """Not a check: where the boot time goes (shown with -s), for the README."""
    _wait_for(lambda: host.run("systemctl is-system-running").stdout.strip() != "starting",
              "the boot to finish", 60)
    print(f"\nQEMU start -> READY: {vswitch[1]:.1f} s", file=sys.stderr)
    for cmd in ("systemd-analyze", "systemd-analyze critical-chain vvu-switch.service",
                "journalctl -b -u vvu-switch -o short-monotonic --no-pager",
                "systemd-analyze blame --no-pager"):
        print(f"$ {cmd}\n{host.run(cmd).stdout}", file=sys.stderr)


def test_vvu_functions_are_on_vfio_pci(host: Any) -> None:
    lspci = host.check_output("lspci -n -D -d 1af4:107f").splitlines()
    functions = [line.split()[0] for line in lspci]
    assert functions == ["0000:01:00.0", "0000:02:00.0"], lspci
    for fn in functions:
        assert host.file(f"/sys/bus/pci/devices/{fn}/driver").linked_to.endswith("/vfio-pci")
    assert host.file("/sys/module/vfio_pci").is_directory
    assert "intel_iommu=on" in host.file("/proc/cmdline").content_string


def test_system_is_running_with_nothing_failed(host: Any) -> None:
    _wait_for(lambda: host.run("systemctl is-system-running").stdout.strip() != "starting",
              "the boot to finish", 60)
    assert host.run("systemctl is-system-running").stdout.strip() == "running"
    assert host.check_output("systemctl --failed --no-legend --plain") == ""
    assert host.check_output("systemctl get-default") == "multi-user.target"


def test_config_is_valid(host: Any) -> None:
    check = host.run("vvu-backend switch --check")
    assert check.rc == 0, check.stderr
    assert check.stdout.split() == [
        "vvu-switch", "--vvu", "c2-nic0=0000:02:00.0", "--vvu", "c1-nic0=0000:01:00.0",
        "--queues", "1", "--busy-poll", "0"]
    assert "credential vvu.appliance: vswitch" in check.stderr


def test_installed_runtime_is_the_checkouts(toolchain: Toolchain, host: Any) -> None:
    info = json.loads(host.check_output("vvu-appliance-info --json"))
    assert info["version"] == project_version(toolchain.repo)
    assert info["digest"] == source_digest(toolchain.repo / "vvu_runtime")
    assert info["verified"] and info["image"] == "vvu-vswitch"
    dist = host.check_output("ls -d /usr/lib/python3/dist-packages/vvu_runtime-*.dist-info")
    assert host.file(f"{dist}/RECORD").exists and host.file(f"{dist}/METADATA").exists
    assert host.run("python3 -c 'import vvu_runtime.launch'").rc != 0  # host-only
    assert host.run("python3 -c 'import vvu_runtime.device'").rc != 0
    assert host.run_test("python3 -c 'import vvu_runtime.driver, vvu_runtime.backends'").rc == 0


def test_the_appliance_runs_the_compiled_data_path(host: Any) -> None:
    """Built in the image (mkosi.build.chroot) and not set aside as older than its
    sources (accel.current): under TCG the pure-Python path would be far slower."""
    probe = host.run(
        "python3 -c 'from vvu_runtime.virtio import accel; "
        "from vvu_runtime.backends.blk import device; "
        "from vvu_runtime.backends.switch import switch; "
        "print(accel.status()[\"split ring\"], device._compiled_serve_fast is not None, "
        "switch._compiled_forward_burst is not None)'")
    assert probe.rc == 0, probe.stderr
    assert probe.stdout.split() == ["compiled", "True", "True"], probe.stdout + probe.stderr
    assert "older than" not in probe.stderr, probe.stderr


def test_ssh_accepts_the_given_key_only(host: Any, vswitch: tuple[ApplianceMachine, float],
                                        tmp_path: Path) -> None:
    vm = vswitch[0]
    assert host.user().name == "root"
    # sshd reads root's keys from the credential only (systemd's tmpfiles may copy it
    # to ~/.ssh/authorized_keys too: never read).
    root = host.check_output("sshd -T -C user=root,host=x,addr=127.0.0.1")
    assert "authorizedkeysfile /run/credentials/@system/ssh.authorized_keys.root" in root
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    # Another key only: refused; the one given as the credential: accepted.
    refused = subprocess.run(
        ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(other),
         "-p", str(vm.ssh_port), "root@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    accepted = subprocess.run(vm.ssh_argv("true"), capture_output=True, text=True, timeout=60,
                              check=False)
    assert accepted.returncode == 0, accepted.stderr
    assert host.check_output("passwd -S root").split()[1] == "L"  # locked: no password
    config = host.check_output("sshd -T")
    assert "passwordauthentication no" in config
    assert "authorizedkeysfile none" in config


def test_only_the_listed_units_are_enabled(host: Any) -> None:
    enabled = {line.split()[0] for line in host.check_output(
        "systemctl list-unit-files --state=enabled --no-legend --plain").splitlines()}
    assert enabled == ENABLED | {"vvu-switch.service"}


def test_two_consumers_ping_through_the_appliance(
    toolchain: Toolchain, consumer_assets: ConsumerAssets, devd: DeviceModel,
    vswitch: tuple[ApplianceMachine, float], host: Any,
) -> None:  # fmt: skip
    with contextlib.ExitStack() as stack:
        consumers = []
        for i, (ram, sock) in enumerate(zip(devd.rams, devd.vhost_sockets, strict=True)):
            vm = QemuMachine(
                toolchain, name=f"consumer{i}", kernel=consumer_assets.kernel,
                initrd=consumer_assets.initrd, append=f"vvu.ip=10.0.0.{i + 1}/24",
                memory_mib=DeviceModel.RAM_MIB, memory_file=ram,
                args=["-chardev", f"socket,id=net0,path={sock},reconnect-ms=1000",
                      "-netdev", "vhost-user,id=n0,chardev=net0",
                      "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0{i + 1}"],
            )  # fmt: skip
            consumers.append(stack.enter_context(vm))
        deadline = time.monotonic() + 90
        while True:  # the links come up while the switch learns
            rc, out = consumers[0].console.run("ping -c 1 -W 2 10.0.0.2")
            if rc == 0:
                break
            assert time.monotonic() < deadline, f"10.0.0.2 unreachable:\n{out}"
        out = consumers[1].console.check("ping -c 3 -W 5 10.0.0.1")
        assert "3 packets received" in out, out
        status = host.check_output("systemctl show -p StatusText --value vvu-switch")
        assert status == "c2-nic0: connected; c1-nic0: connected", status


def test_watchdog_restarts_a_wedged_backend(host: Any, devd: DeviceModel) -> None:
    before = devd.backend_up()
    pid = host.check_output("systemctl show -p MainPID --value vvu-switch")
    host.check_output(f"kill -STOP {pid}")  # wedged: no more WATCHDOG=1
    _wait_for(lambda: host.check_output("systemctl show -p NRestarts --value vvu-switch") == "1",
              "systemd to restart the wedged backend (WatchdogSec=20)", 90)
    _wait_for(lambda: host.service("vvu-switch").is_running and devd.backend_up() >= before + 2,
              "the restarted backend to arm both links again", 90)
    journal = host.check_output("journalctl -b -u vvu-switch --no-pager")
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert host.check_output("systemctl show -p MainPID --value vvu-switch") != pid


# --------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_image(toolchain: Toolchain) -> ApplianceImage:
    return build_appliance(toolchain, "storage")


def test_storage_appliance_serves_a_disk_and_a_file(
    toolchain: Toolchain, storage_image: ApplianceImage, consumer_assets: ConsumerAssets,
    tmp_path: Path, record_property: Any,
) -> None:  # fmt: skip
    """Two exports, so two vvu-blk processes under vvu-backend: a whole data disk
    (by serial) and a file it creates on a blank second data disk."""
    disks = {serial: tmp_path / f"{serial}.raw" for serial in ("data0", "data1")}
    for path in disks.values():
        with path.open("wb") as f:
            f.truncate(64 << 20)
    devd = DeviceModel(tmp_path, ("c1-disk0", "c2-disk0"))
    config = {"kind": "storage", "exports": [
        {"name": "c1-disk0", "disk": "data0"},
        {"name": "c2-disk0", "file": {"disk": "data1", "path": "c2.img", "size": "16M"}}]}
    args = []
    for serial, path in disks.items():
        args += ["-drive", f"file={path},format=raw,if=none,id={serial},cache=none,aio=threads",
                 "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]
    try:
        vm = ApplianceMachine(toolchain, storage_image, accel=Accelerator.TCG, args=args,
                              config=config)
        for sock in devd.vfio_sockets:
            vm.add_vfio_user_device(sock)
        try:
            ready = _boot(vm, devd, 2)
            print(f"\nstorage: QEMU start -> both links BACKEND_UP: {ready:.1f} s",
                  file=sys.stderr)
            record_property("boot_to_ready_seconds", round(ready, 1))
            host = vm.testinfra_host()
            _wait_for(lambda: host.service("vvu-blk").is_running, "vvu-blk READY", 60)
            status = host.check_output("systemctl show -p StatusText --value vvu-blk")
            assert status == "c1-disk0: waiting for front-end; c2-disk0: waiting for front-end"
            main = host.check_output("systemctl show -p MainPID --value vvu-blk")
            children = host.check_output(f"ps -o args= --ppid {main}").splitlines()
            assert [c.split()[1:3] for c in children] == [
                ["/usr/bin/vvu-blk", "--vvu"], ["/usr/bin/vvu-blk", "--vvu"]], children
            image = host.file("/run/vvu/disks/data1/c2.img")
            assert image.exists and image.size == 16 << 20
            consumer = QemuMachine(
                toolchain, name="blk-consumer", kernel=consumer_assets.kernel,
                initrd=consumer_assets.initrd, memory_mib=DeviceModel.RAM_MIB,
                memory_file=devd.rams[0],
                args=["-chardev", f"socket,id=blk0,path={devd.vhost_sockets[0]},reconnect-ms=1000",
                      "-device", "vhost-user-blk-pci,chardev=blk0"],
            )  # fmt: skip
            with consumer:
                con = consumer.console
                assert con.check("cat /sys/block/vda/size").strip() == str((64 << 20) // 512)
                assert con.check("cat /sys/block/vda/serial").strip() == "c1-disk0"
                con.check("echo VVU-STORAGE-APPLIANCE | dd of=/dev/vda bs=512 seek=100 "
                          "conv=fsync", timeout=120)
            assert host.run("systemctl is-system-running").stdout.strip() == "running"
        finally:
            vm.shutdown()
        with disks["data0"].open("rb") as f:
            f.seek(100 * 512)
            assert f.read(21) == b"VVU-STORAGE-APPLIANCE"
    finally:
        devd.stop()


def test_bad_config_fails_the_unit_and_the_console_wants_a_login(
    toolchain: Toolchain, storage_image: ApplianceImage,
) -> None:
    bad = {"kind": "storage", "exports": [{"name": "c1-disk0", "disk": "data0", "size": 3}]}
    vm = ApplianceMachine(toolchain, storage_image, accel=Accelerator.TCG, config=bad,
                          debug_console=False)
    with vm:
        # No debug credential: a login prompt, and root has no password to log in with.
        vm.console.write("root\n")
        vm.console.read_until("Password: ", 60)
        vm.console.write("\n")
        vm.console.read_until("Login incorrect", 60)
        host = vm.testinfra_host()
        _wait_for(lambda: host.service("vvu-blk").is_running is False and "failed" in
                  host.run("systemctl is-failed vvu-blk").stdout, "vvu-blk to fail", 120)
        status = host.run("systemctl status vvu-blk --no-pager -n 20").stdout
        want = "credential vvu.appliance:1: exports[0].size: unknown field"
        assert want in status, status
        assert "status=78" in status
        time.sleep(3)  # no restart loop: still failed, started once
        assert host.check_output("systemctl show -p NRestarts --value vvu-blk") == "0"
        assert host.check_output("systemctl --failed --no-legend --plain").split()[0] == (
            "vvu-blk.service")


# --------------------------------------------------------------------------
# consumer
# --------------------------------------------------------------------------


def test_consumer_image(toolchain: Toolchain, record_property: Any) -> None:
    assert "consumer" in appliance_names(toolchain)
    image = build_appliance(toolchain, "consumer")
    lab_mac = "52:54:00:00:00:99"
    network = f"[Match]\nMACAddress={lab_mac}\n\n[Network]\nAddress=10.0.0.1/24\n"
    vm = ApplianceMachine(
        toolchain, image, accel=Accelerator.TCG,
        credentials={"network.network.50-vvu-nic1": network},
        args=["-netdev", "user,id=lab1,restrict=on",
              "-device", f"virtio-net-pci,netdev=lab1,mac={lab_mac}"])
    start = time.monotonic()
    with vm:
        record_property("boot_to_ssh_seconds", round(time.monotonic() - start, 1))
        host = vm.testinfra_host()
        for tool in ("fio", "iperf3", "mkfs.ext4", "nc", "ping", "sha256sum"):
            assert host.exists(tool), tool
        for module in ("virtio_net", "virtio_blk", "virtio_scsi", "virtiofs"):
            assert host.run(f"modinfo -n {module}").rc == 0, module
        _wait_for(lambda: "10.0.0.1/24" in host.check_output("ip -br -4 addr"),
                  "the lab NIC's address from the credential", 60)
        assert host.run("systemctl is-system-running").stdout.strip() == "running"
        assert host.check_output("systemctl --failed --no-legend --plain") == ""
        with socket.create_connection(("127.0.0.1", vm.ssh_port or 0), timeout=10) as s:
            assert s.recv(8).startswith(b"SSH-")
