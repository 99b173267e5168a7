"""vvu_runtime.launch.appliance without mkosi or QEMU: staging, input digests,
build records, the QEMU command line, the CLI, and the appliances' in-guest
vvu-backend helper (against a fake sysfs and fake backend programs)."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from vvu_runtime.launch import appliance
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.appliance import (
    ApplianceImage,
    ApplianceMachine,
    ApplianceMissing,
    find_appliance,
)
from vvu_runtime.launch.render import DoorbellCompanion, RenderError
from vvu_runtime.launch.toolchain import Toolchain

REPO = Path(__file__).resolve().parents[2]

PYPROJECT = """\
[project]
name = "x"
[project.scripts]
vvu-switch = "vvu_runtime.serve.switch:main"
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
    _write(repo / "appliances/standalone.conf", "[Match]\nImage=main\n")
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
    assert appliance.appliance_names(tc) == ["consumer", "fs", "storage", "vswitch"]
    assert appliance.image_id(tc, "vswitch") == "vvu-vswitch"
    assert appliance.image_id(tc, "storage") == "vvu-storage"
    assert appliance.image_id(tc, "consumer") == "vvu-consumer"
    with pytest.raises(appliance.ApplianceError, match=r"no appliance 'nope'.*storage, vswitch"):
        appliance.image_id(tc, "nope")


def test_root_builds_every_appliance_as_a_subimage() -> None:
    tc = Toolchain(repo=REPO)
    subimages = sorted(p.parent.name for p in (REPO / "mkosi.images").glob("*/mkosi.conf"))
    assert subimages == appliance.appliance_names(tc)
    for name in subimages:
        conf = (REPO / "mkosi.images" / name / "mkosi.conf").read_text()
        assert f"Include=%D/appliances/{name}" in conf
        # Standalone settings (tools tree, caches) only when built on its own.
        own = (REPO / "appliances" / name / "mkosi.conf").read_text()
        assert "Include=../standalone.conf" in own
    standalone = (REPO / "appliances/standalone.conf").read_text()
    assert "[Match]\nImage=main" in standalone
    assert "ToolsTree=$VVU_CACHE_DIR/tools/tree" in standalone


def test_ssh_key_is_made_once_and_never_staged(fake: Toolchain) -> None:
    key = appliance.ssh_key(fake)
    first = key.read_bytes()
    assert appliance.ssh_key(fake) == key and key.read_bytes() == first
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    # No image config ships a key or an authorized_keys file.
    assert not list((REPO / "appliances").rglob("authorized_keys*"))


def _digest(tc: Toolchain, name: str = "vswitch") -> str:
    return appliance._inputs_digest(tc, name)


def test_digest_is_stable_and_follows_every_input(fake: Toolchain) -> None:
    base = _digest(fake)
    assert _digest(fake) == base
    assert _digest(fake, "storage") != base
    # Host-only code is not in the image.
    _write(fake.repo / "vvu_runtime/launch/machine.py", "import qemu  # changed\n")
    _write(fake.repo / "vvu_runtime/device/devd.py", "# the device model\n")
    assert _digest(fake) == base
    # Guest code, shared and per-appliance configuration, the tools tree: rebuild.
    changes: list[Callable[[], object]] = [
        lambda: _write(fake.repo / "vvu_runtime/driver/__init__.py", "X = 2\n"),
        lambda: _write(fake.repo / "appliances/base/mkosi.extra/etc/motd", "hello\n"),
        lambda: (fake.repo / "appliances/base/mkosi.extra/etc/motd").chmod(0o600),
        lambda: _write(fake.repo / "appliances/vswitch/mkosi.extra/etc/issue", "x\n"),
        lambda: _write(fake.repo / "appliances/standalone.conf", "[Match]\nImage=x\n"),
        lambda: _write(fake.repo / "pyproject.toml", PYPROJECT + "# v2\n"),
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
    assert first["bus"] == "vvu-rp0" and "pcie-root-port,id=vvu-rp0,chassis=1,slot=1" in args
    assert "ivshmem-plain,memdev=vvu-no-migrate,master=off" in args  # refuses migration
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert f"file={vm.image.disk},format=raw" in joined and "snapshot=on" in joined
    # vfio-user DMA needs fds, and vvu-devd maps only sealed ones: a memfd, no file.
    assert vm.machine_type == "q35" and vm.memfd and vm.memory_path is None
    assert vm.append.split().count("console=ttyS0") == 0  # QemuMachine adds it once
    assert "intel_iommu=on" in vm.append and "root=PARTLABEL=root-x86-64" in vm.append
    assert (vm.boot_banner, vm.prompt) == (appliance.BOOT_BANNER, appliance.PROMPT)
    # Stable across relaunches (another port), devices not duplicated.
    again = vm._compose_args(2223)
    assert len(again) == len(args) and "hostfwd=tcp:127.0.0.1:2223-:22" in " ".join(again)


def test_doorbell_companion_is_opt_in_and_after_the_viommu(fake: Toolchain,
                                                          tmp_path: Path) -> None:
    assert not any("ivshmem-doorbell" in a
                   for a in _machine(fake, tmp_path, Accelerator.TCG)._compose_args(2222))
    sock = tmp_path / "db,1.sock"
    vm = _machine(fake, tmp_path, Accelerator.TCG, doorbell=DoorbellCompanion(sock, 65))
    args = vm._compose_args(2222)
    device = args.index("ivshmem-doorbell,id=vvu-doorbell,chardev=vvu-doorbell,vectors=65")
    assert args[device - 3:device - 1] == ["-chardev",
                                       f"socket,id=vvu-doorbell,path={tmp_path}/db,,1.sock"]
    assert args.index("intel-iommu,caching-mode=on") < device
    # The no-migrate device stays: the companion is optional.
    assert "ivshmem-plain,memdev=vvu-no-migrate,master=off" in args


def test_poll_mode_appliance_has_no_viommu(fake: Toolchain, tmp_path: Path) -> None:
    vm = _machine(fake, tmp_path, Accelerator.KVM, viommu=False)
    assert vm.machine_type == "q35"
    assert "intel-iommu,caching-mode=on" not in vm._compose_args(2222)


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
    assert [line.split()[0] for line in out[1:]] == ["consumer", "fs", "storage", "vswitch"]
    assert all("not built" in line for line in out[1:])


def _credentials(vm: ApplianceMachine) -> dict[str, bytes]:
    args = vm._compose_args(2222)
    prefix = "type=11,value=io.systemd.credential.binary:"
    out = {}
    for i, a in enumerate(args[:-1]):
        if a == "-smbios" and args[i + 1].startswith(prefix):
            name, _, value = args[i + 1][len(prefix):].partition("=")
            assert "," not in value  # base64: nothing for QEMU to escape
            out[name] = base64.b64decode(value)
    return out


def test_credentials_become_smbios_strings(fake: Toolchain, tmp_path: Path) -> None:
    vm = _machine(fake, tmp_path, Accelerator.TCG, credentials={"vvu.x": "/dev/a,b c"})
    creds = _credentials(vm)
    assert creds["vvu.x"] == b"/dev/a,b c"
    # By default: the test key and the debug console (tests drive the root shell).
    assert creds["vvu.debug-console"] == b"1"
    assert "vvu.appliance" not in creds
    with pytest.raises(RenderError, match="credential name"):
        _machine(fake, tmp_path, Accelerator.TCG, credentials={"bad name": "x"})


def test_machine_passes_key_config_and_console_credentials(
    fake: Toolchain, tmp_path: Path
) -> None:
    key = appliance.ssh_key(fake)
    image = _fake_image(fake, tmp_path / "images")
    image = ApplianceImage(**{**image.__dict__, "ssh_key": key})
    config = {"kind": "vswitch", "links": [{"name": "c1-nic0"}]}
    vm = ApplianceMachine(fake, image, accel=Accelerator.TCG, config=config)
    creds = _credentials(vm)
    assert creds["ssh.authorized_keys.root"] == key.with_suffix(".pub").read_bytes()
    assert json.loads(creds["vvu.appliance"]) == config
    assert vm.ssh_key == key
    prod = ApplianceMachine(fake, image, accel=Accelerator.TCG, debug_console=False,
                            config='{"kind": "storage"}')
    creds = _credentials(prod)
    assert "vvu.debug-console" not in creds and creds["vvu.appliance"] == b'{"kind": "storage"}'
    assert (prod.boot_banner, prod.prompt) == ("login: ", None)
