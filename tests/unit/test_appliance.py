"""vvu_runtime.launch.appliance without mkosi or QEMU: staging, input digests,
build records, the QEMU command line, the CLI, and the appliances' in-guest
vvu-backend helper (against a fake sysfs and fake backend programs)."""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from vvu_runtime.launch import appliance
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.appliance import (
    ApplianceImage,
    ApplianceMachine,
    ApplianceMissing,
    find_appliance,
)
from vvu_runtime.launch.toolchain import Toolchain

REPO = Path(__file__).resolve().parents[2]
BACKEND_SCRIPT = REPO / "appliances/base/mkosi.extra/usr/lib/vvu/vvu-backend"

PYPROJECT = """\
[project]
name = "x"
[project.scripts]
vvu-switch = "vvu_runtime.backends.switch.cli:main"
vvu-toolchain = "vvu_runtime.launch.toolchain:main"
other = "elsewhere:main"
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def fake(tmp_path: Path) -> Toolchain:
    """A checkout with appliances and a tiny vvu_runtime, and a cache with 'mkosi'."""
    repo = tmp_path / "repo"
    _write(repo / "pyproject.toml", PYPROJECT)
    _write(repo / "vvu_runtime/__init__.py", "")
    _write(repo / "vvu_runtime/driver/__init__.py", "X = 1\n")
    _write(repo / "vvu_runtime/driver/__pycache__/__init__.cpython-311.pyc", "junk")
    _write(repo / "vvu_runtime/launch/__init__.py", "")
    _write(repo / "vvu_runtime/launch/machine.py", "import qemu\n")
    _write(repo / "appliances/base/mkosi.conf", "[Distribution]\nDistribution=debian\n")
    _write(repo / "appliances/base/mkosi.extra/etc/motd", "hi\n")
    for name in ("vswitch", "storage"):
        _write(
            repo / f"appliances/{name}/mkosi.conf",
            f"[Include]\nInclude=../base\n\n[Output]\nImageId=vvu-{name}\n",
        )
    cache = tmp_path / "cache"
    mkosi_root = cache / "mkosi/27.1-1"
    _write(mkosi_root / "usr/lib/python3/dist-packages/mkosi/__main__.py", "")
    _write(
        cache / "mkosi/current.json",
        json.dumps({"version": "27.1-1", "root": str(mkosi_root)}),
    )
    return Toolchain(cache_dir=cache, repo=repo)


def test_names_and_image_ids_of_the_real_checkout() -> None:
    tc = Toolchain(repo=REPO)
    assert appliance.appliance_names(tc) == ["storage", "vswitch"]
    assert appliance.image_id(tc, "vswitch") == "vvu-vswitch"
    assert appliance.image_id(tc, "storage") == "vvu-storage"
    with pytest.raises(appliance.ApplianceError, match=r"no appliance 'nope'.*storage, vswitch"):
        appliance.image_id(tc, "nope")


def test_staging_ships_guest_packages_scripts_and_the_key(fake: Toolchain) -> None:
    files = {f.path: f for f in appliance._staged_files(fake, "vswitch")}
    site = "usr/lib/python3/dist-packages/vvu_runtime"
    assert f"{site}/__init__.py" in files
    assert files[f"{site}/driver/__init__.py"].data == b"X = 1\n"
    assert not any("__pycache__" in p or "/launch/" in p for p in files)
    # Console scripts only for guest-side modules.
    script = files["usr/bin/vvu-switch"]
    assert script.mode == 0o755
    assert b"from vvu_runtime.backends.switch.cli import main" in script.data
    assert "usr/bin/vvu-toolchain" not in files and "usr/bin/other" not in files
    key = appliance.ssh_key(fake)
    assert files["root/.ssh/authorized_keys"].data == key.with_suffix(".pub").read_bytes()
    assert files["root/.ssh/authorized_keys"].mode == 0o600
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    info = json.loads(files["usr/lib/vvu/build-info.json"].data)
    assert info["appliance"] == "vswitch" and len(info["vvu_runtime_sha256"]) == 64


def test_ssh_key_is_made_once(fake: Toolchain) -> None:
    key = appliance.ssh_key(fake)
    first = key.read_bytes()
    assert appliance.ssh_key(fake) == key and key.read_bytes() == first


def test_stage_is_written_with_modes(fake: Toolchain, tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    appliance._write_stage(appliance._staged_files(fake, "storage"), stage)
    assert stat.S_IMODE((stage / "root/.ssh").stat().st_mode) == 0o700
    assert stat.S_IMODE((stage / "root/.ssh/authorized_keys").stat().st_mode) == 0o600
    assert os.access(stage / "usr/bin/vvu-switch", os.X_OK)


def _digest(tc: Toolchain, name: str = "vswitch") -> str:
    return appliance._inputs_digest(tc, name, appliance._staged_files(tc, name))


def test_digest_is_stable_and_follows_every_input(fake: Toolchain) -> None:
    base = _digest(fake)
    assert _digest(fake) == base
    assert _digest(fake, "storage") != base
    # Host-only code is not in the image.
    _write(fake.repo / "vvu_runtime/launch/machine.py", "import qemu  # changed\n")
    assert _digest(fake) == base
    # Guest code, shared and per-appliance configuration, the tools tree: rebuild.
    changes: list[Callable[[], object]] = [
        lambda: _write(fake.repo / "vvu_runtime/driver/__init__.py", "X = 2\n"),
        lambda: _write(fake.repo / "appliances/base/mkosi.extra/etc/motd", "hello\n"),
        lambda: (fake.repo / "appliances/base/mkosi.extra/etc/motd").chmod(0o600),
        lambda: _write(fake.repo / "appliances/vswitch/mkosi.extra/etc/issue", "x\n"),
        lambda: _write(fake.stamp_file, json.dumps({"inputs": "new tools tree"})),
    ]
    seen = {base}
    for change in changes:
        change()
        digest = _digest(fake)
        assert digest not in seen
        seen.add(digest)


def _fake_image(tc: Toolchain, out: Path, name: str = "vswitch") -> ApplianceImage:
    iid = f"vvu-{name}"
    paths = appliance._image_paths(out, iid)
    for p in paths:
        _write(p, f"{p.name}\n")
    return ApplianceImage(
        name=name, image_id=iid, disk=paths[0], kernel=paths[1], initrd=paths[2],
        cmdline="root=PARTLABEL=root-x86-64 rw console=ttyS0 intel_iommu=on iommu=pt",
        ssh_key=tc.cache_dir / "key", inputs="abc", built_at=1.0, build_seconds=2.0,
    )  # fmt: skip


def test_records_find_images_until_their_files_change(fake: Toolchain, tmp_path: Path) -> None:
    out = tmp_path / "images"
    with pytest.raises(ApplianceMissing, match="vvu-appliance build vswitch"):
        find_appliance(fake, "vswitch", output_dir=out)
    image = _fake_image(fake, out)
    appliance._save_record(fake, out, image)
    found = find_appliance(fake, "vswitch", output_dir=out)
    assert found == image and not found.rebuilt
    # Another output directory has its own records.
    with pytest.raises(ApplianceMissing):
        find_appliance(fake, "vswitch", output_dir=tmp_path / "elsewhere")
    # A replaced kernel is not the one that build produced.
    image.kernel.write_text("another kernel\n")
    with pytest.raises(ApplianceMissing):
        find_appliance(fake, "vswitch", output_dir=out)


def test_status_rows(fake: Toolchain, tmp_path: Path) -> None:
    out = tmp_path / "images"
    image = _fake_image(fake, out)
    appliance._save_record(fake, out, image)
    rows = {r.name: r for r in appliance.appliance_status(fake, output_dir=out)}
    assert rows["storage"].state == "not built" and rows["storage"].image is None
    assert rows["vswitch"].state.startswith("stale")  # inputs "abc" are not today's
    appliance._save_record(
        fake, out, ApplianceImage(**{**image.__dict__, "inputs": _digest(fake)})
    )
    rows = {r.name: r for r in appliance.appliance_status(fake, output_dir=out)}
    assert rows["vswitch"].state == "up to date"


def _machine(tc: Toolchain, tmp_path: Path, accel: Accelerator, **kw: object) -> ApplianceMachine:
    return ApplianceMachine(tc, _fake_image(tc, tmp_path / "images"), accel=accel, **kw)  # type: ignore[arg-type]


def test_qemu_arguments(fake: Toolchain, tmp_path: Path) -> None:
    vm = _machine(fake, tmp_path, Accelerator.TCG)
    dev = vm.add_vfio_user_device("/tmp/vvu0.sock")
    assert dev == "vvu0" and vm.add_vfio_user_device("/tmp/x.sock", device_id="x") == "x"
    args = vm._compose_args(2222)
    joined = " ".join(args)
    iommu = args.index("intel-iommu,caching-mode=on")
    vfio = [i for i, a in enumerate(args) if '"vfio-user-pci"' in a]
    assert len(vfio) == 2 and iommu < min(vfio)
    assert iommu == 1  # before every other device
    first = json.loads(args[vfio[0]])
    assert first["socket"] == {"type": "unix", "path": "/tmp/vvu0.sock"}
    assert first["bus"] == "vvu-rp1" and "pcie-root-port,id=vvu-rp1,chassis=1,slot=1" in args
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert f"file={vm.image.disk},format=raw" in joined and "snapshot=on" in joined
    assert vm.machine_type == "q35" and vm.shared_memory  # vfio-user DMA needs fds
    assert vm.append.split().count("console=ttyS0") == 0  # QemuMachine adds it once
    assert "intel_iommu=on" in vm.append and "root=PARTLABEL=root-x86-64" in vm.append
    assert (vm.boot_banner, vm.prompt) == (appliance.BOOT_BANNER, appliance.PROMPT)
    # Stable across relaunches (another port), devices not duplicated.
    again = vm._compose_args(2223)
    assert len(again) == len(args) and "hostfwd=tcp:127.0.0.1:2223-:22" in " ".join(again)


def test_qemu_arguments_under_kvm_and_persistent(fake: Toolchain, tmp_path: Path) -> None:
    vm = _machine(fake, tmp_path, Accelerator.KVM, persistent=True)
    assert vm.machine_type == "q35,kernel-irqchip=split"
    assert "snapshot=on" not in " ".join(vm._compose_args(2222))


def test_cli_status_without_images(
    fake: Toolchain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("VVU_CACHE_DIR", str(fake.cache_dir))
    rc = appliance.main(["status", "--output-dir", str(tmp_path / "none")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[0].split()[:2] == ["appliance", "state"]
    assert [line.split()[0] for line in out[1:]] == ["storage", "vswitch"]
    assert all("not built" in line for line in out[1:])


# --------------------------------------------------------------------------
# The in-guest helper behind vvu-switch.service / vvu-blk.service
# --------------------------------------------------------------------------


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    sysfs = tmp_path / "sys/bus/pci/devices"
    for addr, device in [
        ("0000:00:03.0", "0x1000"),  # virtio-net: not ours
        ("0000:02:00.0", "0x107f"),
        ("0000:01:00.0", "0x107f"),
    ]:
        _write(sysfs / addr / "vendor", "0x1af4\n")
        _write(sysfs / addr / "device", device + "\n")
    monkeypatch.setenv("VVU_SYSFS_PCI", str(sysfs))
    creds = tmp_path / "credentials"
    creds.mkdir()
    monkeypatch.setenv("VVU_SYSTEM_CREDENTIALS", str(creds))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for var in ("VVU_SWITCH_ARGS", "VVU_BLK_IMAGES", "VVU_BLK_ARGS", "VVU_PCI_IDS"):
        monkeypatch.delenv(var, raising=False)
    loader = importlib.machinery.SourceFileLoader("vvu_backend_under_test", str(BACKEND_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.BIN = bindir  # type: ignore[attr-defined]
    module.CREDS = creds  # type: ignore[attr-defined]
    return module


def _program(backend: ModuleType, name: str, help_text: str) -> None:
    path = backend.BIN / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\n")
    path.chmod(0o755)


def test_backend_finds_vvu_functions_in_address_order(backend: ModuleType) -> None:
    assert backend.vvu_functions() == ["0000:01:00.0", "0000:02:00.0"]
    os.environ["VVU_PCI_IDS"] = "1af4:1000"
    try:
        assert backend.vvu_functions() == ["0000:00:03.0"]
    finally:
        del os.environ["VVU_PCI_IDS"]


def test_backend_not_ready_without_vvu_option(
    backend: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    _program(backend, "vvu-switch", "usage: vvu-switch [--port NAME=SOCKET]")
    assert backend.main(["switch", "--check"]) == 1
    assert "vvu-switch has no --vvu option" in capsys.readouterr().err
    assert backend.main(["switch"]) == 2  # run without --check: a failure, not a skip


def test_backend_switch_command(
    backend: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _program(backend, "vvu-switch", "  --vvu NAME=PCI_ADDRESS  a port on a VVU function")
    monkeypatch.setenv("VVU_SWITCH_ARGS", "--queues 2 --uplink tap0")
    assert backend.main(["switch", "--check"]) == 0
    assert backend.main(["switch", "--print"]) == 0
    assert capsys.readouterr().out.strip() == (
        "vvu-switch --vvu vvu0=0000:01:00.0 --vvu vvu1=0000:02:00.0 --queues 2 --uplink tap0"
    )


def test_backend_blk_commands(
    backend: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _program(
        backend, "vvu-blk",
        "usage: vvu-blk [--vvu-access {auto,vfio,sysfs}] [--vvu PCI_ADDRESS]\n"
        "  --vvu-access {auto,vfio,sysfs}\n  --vvu PCI_ADDRESS  the VVU function to serve",
    )  # fmt: skip
    assert backend.main(["blk", "--check"]) == 1
    assert "VVU_BLK_IMAGES" in capsys.readouterr().err
    monkeypatch.setenv("VVU_BLK_IMAGES", "/dev/vdb")
    assert backend.main(["blk", "--check"]) == 1
    assert "no image for VVU function(s) 0000:02:00.0" in capsys.readouterr().err
    monkeypatch.setenv("VVU_BLK_IMAGES", "0000:02:00.0=/b.raw 0000:01:00.0=/a.raw")
    monkeypatch.setenv("VVU_BLK_ARGS", "--direct")
    assert backend.main(["blk", "--print"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "vvu-blk --vvu 0000:01:00.0 --image /a.raw --direct",
        "vvu-blk --vvu 0000:02:00.0 --image /b.raw --direct",
    ]


def test_backend_supervises_one_process_per_disk(backend: ModuleType, tmp_path: Path) -> None:
    quick = [sys.executable, "-c", "import sys; sys.exit(3)"]
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    # The first to end decides the status; the other is stopped.
    assert backend.supervise([slow, quick]) == 3


def test_backend_settings_from_credentials_before_the_environment(
    backend: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    _program(backend, "vvu-blk", "  --vvu PCI_ADDRESS")
    monkeypatch.setenv("VVU_BLK_IMAGES", "/env/a /env/b")
    (backend.CREDS / "vvu.blk-images").write_text("/system/a /system/b\n")
    unit = tmp_path / "unit-credentials"
    unit.mkdir()
    (unit / "vvu.blk-args").write_text("--read-only")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(unit))
    assert backend.main(["blk", "--print"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "vvu-blk --vvu 0000:01:00.0 --image /system/a --read-only",
        "vvu-blk --vvu 0000:02:00.0 --image /system/b --read-only",
    ]


def test_credentials_become_smbios_strings(fake: Toolchain, tmp_path: Path) -> None:
    vm = _machine(fake, tmp_path, Accelerator.TCG, credentials={"vvu.blk-images": "/dev/a,b c"})
    args = vm._compose_args(2222)
    value = args[args.index("-smbios") + 1]
    prefix = "type=11,value=io.systemd.credential.binary:vvu.blk-images="
    assert value.startswith(prefix) and "," not in value[len(prefix) :]
    assert base64.b64decode(value[len(prefix) :]) == b"/dev/a,b c"
    with pytest.raises(ValueError, match="credential name"):
        _machine(fake, tmp_path, Accelerator.TCG, credentials={"bad name": "x"})
