"""The fs appliance's configuration and plan, without VMs: the appliance config
kind ``fs`` (schema, every rejection), ``vvu-backend fs``'s command line (one
vvu-proxy, one supervised virtiofsd per export), the topology's ``kind: fs``
appliances and consumer ``fs:`` mounts (every validation error with its
FILE:LINE:COL), and what the plan gives each VM (the consumer's
vhost-user-fs-pci and fstab credential, the appliance's config and data disk).
The real thing is tests/acceptance/test_fs_appliance.py.
"""

from __future__ import annotations

import base64
import json
import shlex
import textwrap
from pathlib import Path

import pytest

from vvu_runtime.appliance import backend
from vvu_runtime.appliance.config import ConfigError, parse_config, schema_text
from vvu_runtime.launch.accel import Accelerator
from vvu_runtime.launch.lab import ImageFiles, LabPaths, LabPlan, fs_export_dir, plan_lab
from vvu_runtime.launch.render import FsDevice, render_devices
from vvu_runtime.launch.topology import (
    ApplianceKind,
    CheckKind,
    FsMount,
    Topology,
    TopologyError,
    json_schema,
    load_topology_text,
)
from vvu_runtime.launch.topology import schema_text as topology_schema_text

SRC = Path("lab.yaml")

LAB = """\
name: lab
appliances:
  fs1:
    kind: fs
    exports:
      - {name: share, size: 256M}
      - {name: logs, size: 64M}
  st1:
    kind: storage
    exports: [{name: disk-a, size: 64M}]
consumers:
  c1:
    fs: [fs1/share]
  c2:
    fs:
      - {appliance: fs1, export: logs, mount: /srv/logs}
checks:
  - fs: {node: c1, fs: fs1/share}
"""


def load(text: str) -> Topology:
    return load_topology_text(textwrap.dedent(text), SRC)


def problems(text: str) -> list[str]:
    with pytest.raises(TopologyError) as e:
        load(text)
    return [str(p) for p in e.value.problems]


def at(text: str, needle: str) -> str:
    assert text.count(needle) == 1, f"{needle!r} is not unique"
    offset = text.index(needle)
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"{SRC}:{line}:{col}"


# --------------------------------------------------------------------------
# The topology
# --------------------------------------------------------------------------


def test_fs_appliance_and_mounts_resolve() -> None:
    topo = load(LAB)
    fs1 = topo.appliance("fs1")
    assert fs1.kind is ApplianceKind.FS and fs1.kind.service == "vvu-fs"
    assert [(e.name, e.size) for e in fs1.exports] == [("share", 256 << 20), ("logs", 64 << 20)]
    assert dict(fs1.options) == {"cache": "auto"}
    (m1,) = topo.consumer("c1").fs
    (m2,) = topo.consumer("c2").fs
    assert (m1.link, m1.tag, m1.mount, m1.ref) == ("c1-fs0", "share", "/mnt/share", "fs1/share")
    assert (m2.link, m2.mount) == ("c2-fs0", "/srv/logs")
    assert [link for _, link in topo.links_of("fs1")] == [m1, m2]
    assert isinstance(topo.consumer("c1").links[0], FsMount)
    (check,) = topo.checks
    assert check.kind is CheckKind.FS and check.params["size"] == 4 << 20
    assert check.describe() == "fs c1 fs1/share (4 MiB)"
    assert topo.to_json()["consumers"][0]["fs"][0]["tag"] == "share"


@pytest.mark.parametrize(("change", "needle", "message"), [
    (("fs: [fs1/share]", "fs: [st1/disk-a]"), "st1/disk-a",
     'consumers.c1.fs[0].appliance: "st1" is a storage appliance; expected a fs'),
    (("fs: [fs1/share]", "fs: [fs1/shar]"), "fs1/shar]",
     'consumers.c1.fs[0].export: fs1 has no export "shar"; did you mean "share"? '
     "(its exports: share, logs)"),
    (("export: logs, mount: /srv/logs", "export: logs, mount: srv/logs"), "srv/logs",
     "consumers.c2.fs[0].mount: expected an absolute path in the consumer"),
    (("{name: logs, size: 64M}", "{name: logs, size: 64M, readonly: true}"), "readonly",
     "appliances.fs1.exports[1].readonly: unknown field (fields here: name, size)"),
    (("{name: logs, size: 64M}", "{name: logs, size: 1M}"), "1M}",
     "appliances.fs1.exports[1].size: expected a size 16M..1T"),
    (("{name: logs,", "{name: " + "x" * 37 + ","), "x" * 37,
     "appliances.fs1.exports[1].name: expected an fs export name"),
    (("fs: {node: c1, fs: fs1/share}", "fs: {node: c1, fs: fs1/logs}"), "fs1/logs}",
     'checks[0].fs.fs: c1 has no virtio-fs mount "fs1/logs"'),
    (("kind: fs\n", "kind: fs\n    options: {cache: sometimes}\n"), "sometimes",
     "appliances.fs1.options.cache: expected one of auto, always, never, metadata"),
    (("    kind: storage\n", "    kind: storage\n    options: {cache: never}\n"),
     "cache: never", "appliances.st1.options.cache: unknown field"),
])
def test_fs_topology_errors_name_the_place(change: tuple[str, str], needle: str,
                                           message: str) -> None:
    text = LAB.replace(*change)
    assert text != LAB
    found = problems(text)
    assert len(found) == 1, found
    where, _, rest = found[0].partition(": ")
    assert where == at(text, needle), found
    assert rest.startswith(message), found


def test_an_export_serves_one_consumer() -> None:
    text = LAB.replace("fs: [fs1/share]", "fs: [fs1/share, fs1/share]")
    (problem,) = problems(text)
    assert problem == (f"{SRC}:13:21: consumers.c1.fs[1].export: export fs1/share is already "
                       "mounted by consumers.c1.fs[0] (lab.yaml:13:10); each export serves "
                       "one consumer")


def test_two_fs_entries_cannot_share_a_mount_point() -> None:
    text = LAB.replace("fs: [fs1/share]", "fs: [fs1/share, {appliance: fs1, export: logs, "
                       "mount: /mnt/share}]").replace("  c2:\n    fs:\n      - {appliance: "
                                                      "fs1, export: logs, mount: /srv/logs}\n",
                                                      "")
    (problem,) = problems(text)
    assert "consumers.c1.fs[1].mount: /mnt/share is already the mount point" in problem


def test_schema_documents_fs() -> None:
    text = topology_schema_text()
    for section in ("## appliances.NAME.exports[] (fs)", "## consumers.NAME.fs[]",
                    "## checks[].fs", "## appliances.NAME.options (fs)"):
        assert section in text
    defs = json_schema()["$defs"]
    assert defs["fs-mount"]["required"] == ["appliance", "export"]
    assert "fs" in defs["consumer"]["properties"]


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------

IMAGES = {k: ImageFiles(Path(f"/i/{k}.vmlinuz"), Path(f"/i/{k}.initrd"), "root=x",
                        Path(f"/i/{k}.raw")) for k in ("fs", "storage", "consumer")}


def _plan() -> LabPlan:
    topo = load(LAB)
    paths = LabPaths(name="lab", root=Path("/labs/lab"), run=Path("/run/vvu/lab"))
    return plan_lab(topo, paths, accel=Accelerator.TCG, accel_reason="test",
                    public_key="ssh-ed25519 AAAA k", images=IMAGES,
                    ports={"fs1": 1, "st1": 2, "c1": 3, "c2": 4})


def _credential(argv: list[str], name: str) -> str:
    prefix = f"type=11,value=io.systemd.credential.binary:{name}="
    (value,) = [a[len(prefix):] for a in argv if a.startswith(prefix)]
    return base64.b64decode(value).decode()


def test_plan_gives_the_consumer_virtio_fs_and_its_mount() -> None:
    plan = _plan()
    c2 = plan.node("c2")
    argv = shlex.join(c2.argv)
    assert ("-chardev socket,id=fs0-chr,path=/run/vvu/lab/c2-fs0.vu -device "
            "vhost-user-fs-pci,id=fs0,chardev=fs0-chr,tag=logs,queue-size=128") in argv
    # vhost-user needs the consumer's RAM shared: the RAM file is its memory backend.
    assert "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vvu-lab-lab-c2.ram," \
           "share=on" in argv
    assert "reconnect-ms" not in argv.split("vhost-user-fs-pci")[0].split("fs0-chr")[-2]
    assert _credential(c2.argv, "fstab.extra") == "logs /srv/logs virtiofs defaults,nofail 0 0\n"
    assert c2.links == ["c2-fs0"]
    assert [(lk.name, lk.kind, lk.appliance) for lk in plan.links] == [
        ("c1-fs0", "fs", "fs1"), ("c2-fs0", "fs", "fs1")]


def test_plan_gives_the_fs_appliance_its_config_and_data_disks() -> None:
    plan = _plan()
    fs1 = plan.node("fs1")
    config = json.loads(_credential(fs1.argv, "vvu.appliance"))
    assert config == {"kind": "fs", "options": {"cache": "auto"}, "exports": [
        {"name": "c1-fs0", "disk": "share", "path": "share"},
        {"name": "c2-fs0", "disk": "logs", "path": "share"}]}
    parse_config(json.dumps(config), "plan")  # what the appliance will accept
    argv = shlex.join(fs1.argv)
    assert "file=/labs/lab/disks/fs1-share.raw,format=raw" in argv
    assert "virtio-blk-pci,drive=data1,serial=logs" in argv
    assert plan.data_disks[Path("/labs/lab/disks/fs1-logs.raw")] == 64 << 20
    assert "--device c1-fs0:/run/vvu/lab/c1-fs0.vu:" in shlex.join(fs1.devd_argv)
    assert fs_export_dir("fs1", "share") == "/run/vvu/disks/share/share"


def test_fs_device_template_quotes_its_values() -> None:
    argv = render_devices(FsDevice("fs3", Path("/run/a,b.vu"), "t,ag", queue_size=256))
    assert argv == ["-chardev", "socket,id=fs3-chr,path=/run/a,,b.vu", "-device",
                    "vhost-user-fs-pci,id=fs3,chardev=fs3-chr,tag=t,,ag,queue-size=256"]


# --------------------------------------------------------------------------
# The appliance side: config kind fs and vvu-backend fs
# --------------------------------------------------------------------------


def test_appliance_config_kind_fs() -> None:
    c = parse_config("kind: fs\nexports:\n  - name: c1-fs0\n    disk: data0\n"
                     "    path: share\n  - {name: c2-fs0, disk: data1}\n"
                     "options: {cache: never}\n", "f")
    assert c.link_names == ["c1-fs0", "c2-fs0"] and c.backend == "fs"
    assert [(s.disk, s.path) for s in c.shares] == [("data0", "share"), ("data1", ".")]
    assert c.options == {"cache": "never", "sandbox": "namespace"}
    assert "kind fs:" in schema_text()


@pytest.mark.parametrize(("text", "message"), [
    ("kind: fs\nexports: [{name: a}]\n", "f:2: exports[0].disk: required"),
    ("kind: fs\nexports: [{name: a, disk: d, path: /etc}]\n",
     "f:2: exports[0].path: a relative path"),
    ("kind: fs\nexports: [{name: a, disk: d, path: ../x}]\n",
     "f:2: exports[0].path: a relative path"),
    ("kind: fs\nexports: [{name: a, disk: d}]\noptions: {sandbox: jail}\n",
     "f:3: options.sandbox: namespace, chroot, none"),
    ("kind: fs\nexports: [{name: a, disk: d, readonly: true}]\n",
     "f:2: exports[0].readonly: unknown field"),
    ("kind: fs\nexports: [{name: a, disk: d}, {name: a, disk: e}]\n",
     "f:2: exports[1].name: 'a' is used twice"),
])
def test_appliance_config_kind_fs_rejections(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "f")
    assert str(e.value).startswith(message), str(e.value)


def test_backend_runs_one_proxy_with_a_virtiofsd_per_export(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    c = parse_config('{"kind": "fs", "exports": [{"name": "c1-fs0", "disk": "data0", '
                     '"path": "share"}, {"name": "c2-fs0", "disk": "data1"}]}', "f")
    addrs = {"c1-fs0": "0000:03:00.0", "c2-fs0": "0000:04:00.0"}
    (b,) = backend.commands(c, addrs, prepare=False)
    run = tmp_path / "run"
    assert b.links == {"0000:03:00.0": "c1-fs0", "0000:04:00.0": "c2-fs0"}
    assert b.argv[0] == "vvu-proxy"
    assert [b.argv[i + 1] for i, a in enumerate(b.argv) if a == "--link"] == [
        f"0000:03:00.0={run}/fs/c1-fs0.sock", f"0000:04:00.0={run}/fs/c2-fs0.sock"]
    execs = [b.argv[i + 1] for i, a in enumerate(b.argv) if a == "--exec"]
    assert [e.partition("=")[0] for e in execs] == ["0000:03:00.0", "0000:04:00.0"]
    assert [shlex.split(e.partition("=")[2]) for e in execs] == [
        [backend.VIRTIOFSD, f"--socket-path={run}/fs/c1-fs0.sock",
         f"--shared-dir={run}/disks/data0/share", "--cache=auto", "--sandbox=namespace"],
        [backend.VIRTIOFSD, f"--socket-path={run}/fs/c2-fs0.sock",
         f"--shared-dir={run}/disks/data1", "--cache=auto", "--sandbox=namespace"]]


def test_backend_prepares_the_shared_directory(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    disks = tmp_path / "by-id"
    disks.mkdir()
    (disks / "virtio-data0").write_bytes(b"")
    monkeypatch.setattr(backend, "disk_path", lambda serial: disks / f"virtio-{serial}")
    mounted = tmp_path / "run/disks/data0"
    monkeypatch.setattr(backend.os.path, "ismount", lambda p: Path(p) == mounted)
    c = parse_config('{"kind": "fs", "exports": [{"name": "x", "disk": "data0", '
                     '"path": "a/share"}]}', "f")
    (b,) = backend.commands(c, {"x": "0000:05:00.0"})
    assert (mounted / "a/share").is_dir()
    assert (tmp_path / "run/fs").is_dir()  # where virtiofsd makes its socket
    assert f"--shared-dir={mounted}/a/share" in b.argv[4]
