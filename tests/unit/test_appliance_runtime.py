"""The appliance's guest side (vvu_runtime.appliance): config schema and reader,
VVU functions and their uuids, the runtime wheel, vvu-backend's plan and supervision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest

from vvu_runtime.appliance import backend, config, functions, wheel
from vvu_runtime.appliance.config import ConfigError, parse_config, parse_document
from vvu_runtime.device.vvu import VvuDevice, default_uuid

REPO = Path(__file__).resolve().parents[2]

STORAGE_YAML = """\
# the storage appliance
kind: storage
exports:
  - name: c1-disk0
    disk: data0            # served whole
    readonly: true
  - name: c2-disk0
    file: {disk: data0, path: c2.img, size: 256M}
options:
  direct: true
"""


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def test_yaml_subset_and_json_give_the_same_config() -> None:
    y = parse_config(STORAGE_YAML, "a.yaml")
    j = parse_config(json.dumps({
        "kind": "storage",
        "exports": [{"name": "c1-disk0", "disk": "data0", "readonly": True},
                    {"name": "c2-disk0", "file": {"disk": "data0", "path": "c2.img",
                                                  "size": "256M"}}],
        "options": {"direct": True}}), "cred")
    assert y.exports == j.exports and y.options == j.options
    assert y.exports[1].file is not None and y.exports[1].file.size == 256 << 20
    assert y.link_names == ["c1-disk0", "c2-disk0"] and y.backend == "blk"
    assert y.options == {"direct": True, "queues": 4, "poll_us": 50, "busy_poll_us": 0}


def test_vswitch_contract_example() -> None:
    c = parse_config('{"kind": "vswitch", "links": [{"name": "c1-nic0"}, {"name": "c2-nic0"}],'
                     ' "options": {"busy_poll_us": 0}}', "credential vvu.appliance")
    assert c.link_names == ["c1-nic0", "c2-nic0"] and c.backend == "switch"


def test_reader_keeps_lines() -> None:
    doc = parse_document(STORAGE_YAML)
    exports = doc.value["exports"]
    assert exports.line == 3 and exports.value[1].line == 7
    assert exports.value[1].value["file"].value["size"].value == "256M"
    flow = parse_document('{\n  "kind": "vswitch",\n  "links": [\n    {"name": "a"}\n  ]\n}\n')
    assert flow.value["links"].line == 3
    assert flow.value["links"].value[0].value["name"].line == 4


def test_every_error_names_file_line_and_field() -> None:
    bad = textwrap.dedent("""\
        kind: storage
        exports:
          - name: c1-disk0
            readonly: 3
          - name: c1-disk0
            disk: x
            file: {disk: y, path: /abs, size: lots}
            colour: red
        options:
          queues: 0
        """)
    with pytest.raises(ConfigError) as e:
        parse_config(bad, "/etc/vvu/appliance.yaml")
    problems = e.value.problems
    assert problems == [
        "/etc/vvu/appliance.yaml:3: exports[0].disk: required (one of disk, file)",
        "/etc/vvu/appliance.yaml:4: exports[0].readonly: must be true or false, not 3",
        "/etc/vvu/appliance.yaml:5: exports[1].disk: only one may be given, not "
        "['disk', 'file'] (one of disk, file)",
        "/etc/vvu/appliance.yaml:5: exports[1].name: 'c1-disk0' is used twice",
        "/etc/vvu/appliance.yaml:7: exports[1].file.path: a relative path on the data disk's "
        "file system (no '..'); got \"/abs\"",
        "/etc/vvu/appliance.yaml:7: exports[1].file.size: a size: bytes or N[K|M|G|T] "
        "(e.g. 256M); got \"lots\"",
        "/etc/vvu/appliance.yaml:8: exports[1].colour: unknown field (known: name, disk, "
        "file, readonly, protocol, engine)",
        "/etc/vvu/appliance.yaml:10: options.queues: between 1 and 64; got 0",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("", "f:1: the configuration must be a mapping with 'kind'"),
    ("kind: nope\n", "f:1: kind: must be one of vswitch, storage, fs (got \"nope\")"),
    ('{"kind": "vswitch", "links": [}', "f:1: unexpected '}'"),
    ("kind: vswitch\nlinks:\n  - name: a\n   x: 1\n", "f:4: expected '- item' at column 3"),
    ("kind: vswitch\nlinks: []\n", "f:2: links: must list at least one entry"),
    ("kind: vswitch\n", "f:1: links: required"),
    ("kind: vswitch\nlinks:\n\t- name: a\n", "f:3: a tab in the indentation"),
    ("kind: vswitch\nlinks: [{name: bad/name}]\n", "f:2: links[0].name: a name"),
    ("kind: vswitch\nlinks: &x [1]\n", "f:2: unsupported YAML"),
])
def test_bad_configs(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "f")
    assert str(e.value).startswith(message), str(e.value)


def test_load_prefers_the_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    file = tmp_path / "appliance.yaml"
    file.write_text("kind: vswitch\nlinks:\n  - name: from-file\n")
    assert config.load_config([creds], file).link_names == ["from-file"]
    (creds / "vvu.appliance").write_text('{"kind": "vswitch", "links": [{"name": "cred"}]}')
    loaded = config.load_config([creds], file)
    assert loaded.link_names == ["cred"] and loaded.source == "credential vvu.appliance"
    with pytest.raises(ConfigError, match=r"no configuration: write .* or pass the credential"):
        config.load_config([], tmp_path / "missing.yaml")


def test_schema_text_lists_every_field() -> None:
    text = config.schema_text()
    for word in ("links:", "exports:", "file:", "busy_poll_us", "readonly", "size"):
        assert word in text


# --------------------------------------------------------------------------
# VVU functions: the uuid through the device's PCI_CFG window
# --------------------------------------------------------------------------


def test_uuid_read_through_the_pci_cfg_window(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ram = tmp_path / "c1.ram"
    ram.write_bytes(bytes(1 << 20))
    device = VvuDevice(name="c1-nic0", ram_file=ram)
    sysfs = tmp_path / "devices"
    dev = sysfs / "0000:01:00.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1af4\n")
    (dev / "device").write_text("0x107f\n")
    (dev / "config").write_bytes(b"")
    other = sysfs / "0000:00:03.0"
    other.mkdir()
    (other / "vendor").write_text("0x1af4\n")
    (other / "device").write_text("0x1000\n")
    # The sysfs config file of the function is the device model's config space.
    real_pread, real_pwrite = os.pread, os.pwrite
    cfg_fds: set[int] = set()
    real_open = os.open

    def fake_open(path: object, flags: int, *a: object) -> int:
        fd = real_open(path, flags, *a)  # type: ignore[arg-type]
        if str(path).endswith("0000:01:00.0/config"):
            cfg_fds.add(fd)
        return fd

    def pread(fd: int, n: int, off: int) -> bytes:
        return device.config.read(off, n) if fd in cfg_fds else real_pread(fd, n, off)

    def pwrite(fd: int, data: bytes, off: int) -> int:
        if fd in cfg_fds:
            device.config.write(off, data)
            return len(data)
        return real_pwrite(fd, data, off)

    monkeypatch.setattr(functions.os, "open", fake_open)
    monkeypatch.setattr(functions.os, "pread", pread)
    monkeypatch.setattr(functions.os, "pwrite", pwrite)
    found = functions.find_functions(sysfs)
    assert [f.address for f in found] == ["0000:01:00.0"]
    assert found[0].uuid is not None and found[0].uuid.bytes == default_uuid("c1-nic0")
    assert found[0].uuid == functions.link_uuid("c1-nic0")


def test_functions_match_links_by_uuid_in_any_order() -> None:
    c = parse_config('{"kind": "vswitch", "links": [{"name": "b"}, {"name": "a"}, '
                     '{"name": "gone"}]}', "f")
    fns = [functions.VvuFunction("0000:01:00.0", functions.link_uuid("a")),
           functions.VvuFunction("0000:02:00.0", functions.link_uuid("b")),
           functions.VvuFunction("0000:03:00.0", None, "unreadable")]
    matched, missing = backend.match_functions(c, fns)
    assert matched == {"a": "0000:01:00.0", "b": "0000:02:00.0"}
    assert missing == [f"no VVU function for link gone (uuid {functions.link_uuid('gone')})"]


# --------------------------------------------------------------------------
# The wheel
# --------------------------------------------------------------------------


def test_wheel_ships_the_guest_side_with_version_and_digest(tmp_path: Path) -> None:
    whl = wheel.build_wheel(REPO, tmp_path / "dist")
    version = wheel.project_version(REPO)
    assert whl.name == f"vvu_runtime-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        info = f"vvu_runtime-{version}.dist-info"
        assert f"{info}/METADATA" in names and f"{info}/RECORD" in names
        assert "vvu_runtime/appliance/backend.py" in names
        assert "vvu_runtime/serve/switch.py" in names
        assert not [n for n in names if n.startswith(("vvu_runtime/launch/",
                                                      "vvu_runtime/device/"))]
        assert "vvu_runtime/device/devd.py" not in names
        # The C sources go, the host's builds of them do not (built for another Python).
        assert "vvu_runtime/virtio/_split_c.c" in names
        assert not [n for n in names if n.endswith(".so")]
        source = json.loads(z.read(f"{info}/vvu-source.json"))
        assert source["digest"] == wheel.source_digest(REPO / "vvu_runtime")
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "vvu-backend = vvu_runtime.appliance.backend:main" in entry_points
    assert "vvu-devd" not in entry_points and "vvu-toolchain" not in entry_points
    # The same sources give the same wheel.
    assert wheel.build_wheel(REPO, tmp_path / "again").read_bytes() == whl.read_bytes()

    root = tmp_path / "root"
    scripts = wheel.install_wheel(whl, root)
    assert {"vvu-switch", "vvu-blk", "vvu-backend", "vvu-appliance-info"} <= set(scripts)
    site = root / wheel.SITE_PACKAGES
    assert wheel.source_digest(site / "vvu_runtime") == source["digest"]
    record = (site / info / "RECORD").read_text()
    assert "../../../bin/vvu-backend,sha256=" in record and f"{info}/INSTALLER," in record
    assert os.access(root / "usr/bin/vvu-backend", os.X_OK)
    # vvu-appliance-info on the installed tree (a python with only that on its path).
    out = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
         "from vvu_runtime.appliance.info import main; sys.exit(main(['--json']))", str(site)],
        capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["version"], data["digest"], data["verified"]) == (version, source["digest"], True)


def test_digest_follows_guest_sources_only(tmp_path: Path) -> None:
    pkg = tmp_path / "vvu_runtime"
    for rel in ("__init__.py", "driver/__init__.py", "launch/machine.py", "device/devd.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(f"# {rel}\n")
    first = wheel.source_digest(pkg)
    (pkg / "launch/machine.py").write_text("# changed\n")
    (pkg / "driver/__pycache__").mkdir()
    (pkg / "driver/__pycache__/x.pyc").write_bytes(b"junk")
    (pkg / "driver/_ext.cpython-313-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    assert wheel.source_digest(pkg) == first
    (pkg / "driver/__init__.py").write_text("X = 2\n")
    assert wheel.source_digest(pkg) != first


# --------------------------------------------------------------------------
# vvu-backend
# --------------------------------------------------------------------------


def test_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = parse_config('{"kind": "vswitch", "links": [{"name": "b"}, {"name": "a"}],'
                     ' "options": {"busy_poll_us": 20, "queues": 2}}', "f")
    (b,) = backend.commands(c, {"a": "0000:01:00.0", "b": "0000:02:00.0"})
    assert b.argv == ["vvu-switch", "--vvu", "b=0000:02:00.0", "--vvu", "a=0000:01:00.0",
                      "--queues", "2", "--busy-poll", "20"]
    assert b.links == {"0000:02:00.0": "b", "0000:01:00.0": "a"}

    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    disks = tmp_path / "by-id"
    disks.mkdir()
    (disks / "virtio-data0").write_bytes(b"")
    monkeypatch.setattr(backend, "disk_path", lambda serial: disks / f"virtio-{serial}")
    s = parse_config('{"kind": "storage", "exports": [{"name": "c1-disk0", "disk": "data0",'
                     ' "readonly": true}], "options": {"direct": true, "busy_poll_us": 800}}',
                     "f")
    (b,) = backend.commands(s, {"c1-disk0": "0000:03:00.0"})
    assert b.argv == ["vvu-blk", "--vvu", "0000:03:00.0", "--image", str(disks / "virtio-data0"),
                      "--serial", "c1-disk0", "--queues", "4", "--poll-us", "50",
                      "--busy-poll", "800", "--read-only", "--direct"]
    with pytest.raises(ConfigError, match="busy_poll_us"):
        parse_config('{"kind": "storage", "exports": [], "options": {"busy_poll_us": -1}}', "f")


def test_file_export_on_a_mounted_data_disk(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    disks = tmp_path / "by-id"
    disks.mkdir()
    (disks / "virtio-data0").write_bytes(b"")
    monkeypatch.setattr(backend, "disk_path", lambda serial: disks / f"virtio-{serial}")
    mounted = tmp_path / "run/disks/data0"
    monkeypatch.setattr(backend.os.path, "ismount", lambda p: Path(p) == mounted)
    mounted.mkdir(parents=True)
    s = parse_config('{"kind": "storage", "exports": [{"name": "x", "file": {"disk": "data0",'
                     ' "path": "sub/x.img", "size": "1M"}}]}', "f")
    path = backend.export_image(s.exports[0])
    assert path == mounted / "sub/x.img" and path.stat().st_size == 1 << 20
    assert path.stat().st_blocks == 0  # sparse
    path.write_bytes(b"data")  # an existing file is kept as it is
    assert backend.export_image(s.exports[0]).read_bytes() == b"data"


def test_config_errors_exit_78_with_every_problem(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "appliance.yaml"
    bad.write_text("kind: vswitch\nlinks:\n  - nome: x\n")
    assert backend.main(["switch", "--config", str(bad)]) == backend.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"config error: {bad}:3: links[0].name: required" in err
    assert f"config error: {bad}:3: links[0].nome: unknown field" in err
    good = tmp_path / "storage.yaml"
    good.write_text(STORAGE_YAML)
    assert backend.main(["switch", "--config", str(good)]) == backend.EXIT_CONFIG
    assert "kind is 'storage', but vvu-switch serves kind 'vswitch'" in capsys.readouterr().err
    assert backend.main(["--schema"]) == 0


def _notify_listener(path: Path) -> tuple[socket.socket, list[str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    got: list[str] = []

    def read() -> None:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except OSError:
                return

    threading.Thread(target=read, daemon=True).start()
    return sock, got


FAKE_BACKEND = """\
import os, socket, sys, time
addr = sys.argv[1]
def notify(m):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(m.encode(), os.environ["NOTIFY_SOCKET"])
print(f"vvu-blk: INFO x: disk @ vvu {addr}: ready for a front-end (BACKEND_UP)",
      file=sys.stderr, flush=True)
notify("READY=1")
time.sleep(float(sys.argv[2]))
sys.exit(int(sys.argv[3]))
"""


def test_supervisor_is_ready_when_every_backend_is(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    (tmp_path / "run").mkdir()
    sock, got = _notify_listener(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    script = tmp_path / "fake.py"
    script.write_text(FAKE_BACKEND)
    c = parse_config('{"kind": "storage", "exports": [{"name": "a", "disk": "d1"},'
                     ' {"name": "b", "disk": "d2"}]}', "f")
    b1 = backend.Backend([sys.executable, str(script), "0000:01:00.0", "4", "0"],
                         {"0000:01:00.0": "a"})
    b2 = backend.Backend([sys.executable, str(script), "0000:02:00.0", "30", "0"],
                         {"0000:02:00.0": "b"})
    sup = backend.Supervisor(c, [b1, b2])
    start = time.monotonic()
    rc = sup.run()  # b1 exits (0) first: the other is stopped, the unit fails (restart)
    assert time.monotonic() - start < 30
    assert rc == 1
    assert b2.proc is not None and b2.proc.returncode != 0
    assert "READY=1" in got
    assert any(m == "STATUS=a: waiting for front-end; b: waiting for front-end" for m in got)
    status = json.loads((tmp_path / "run/status.json").read_text())
    assert status["ready"] and [x["state"] for x in status["links"]] == [
        "waiting for front-end", "waiting for front-end"]
    sock.close()


def test_daemon_notifies_ready_and_watchdog(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from vvu_runtime.serve import runner as daemon

    sock, got = _notify_listener(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon.sd_notify("READY=1")
    import asyncio

    async def briefly() -> None:
        daemon.keep_watchdog(asyncio.get_running_loop())
        await asyncio.sleep(0.35)

    asyncio.run(briefly())
    time.sleep(0.1)
    assert got[0] == "READY=1" and got.count("WATCHDOG=1") >= 2
    sock.close()


def test_link_states_follow_the_backends_log_lines(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setattr(backend, "RUN_DIR", tmp_path)
    sock, got = _notify_listener(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    c = parse_config('{"kind": "vswitch", "links": [{"name": "a"}, {"name": "b"}]}', "f")
    states = backend.LinkStates(c, backend.Backend(["vvu-switch"], {"0000:01:00.0": "a",
                                                                     "0000:02:00.0": "b"}))
    log = logging.getLogger("test.linkstates")
    log.addHandler(states)
    log.setLevel(logging.INFO)
    try:
        # The lines driver/endpoint.py and vhost_user/backend.py write.
        log.info("%s: ready for a front-end (BACKEND_UP)", "port a @ vvu 0000:01:00.0")
        log.info("%s: ready for a front-end (BACKEND_UP)", "port b @ vvu 0000:02:00.0")
        log.info("%s: front-end connected", "port b (vvu 0000:02:00.0 connection 1)")
        assert states.states == {"a": "waiting for front-end", "b": "connected"}
        log.info("%s: front-end disconnected (FRONTEND_UP cleared)", "port b @ vvu 0000:02:00.0")
        log.error("%s: the device needs a reset; re-initialising it", "port a @ vvu 0000:01:00.0")
        assert states.states == {"a": "needs reset", "b": "waiting for front-end"}
    finally:
        log.removeHandler(states)
    time.sleep(0.1)
    assert "STATUS=a: waiting for front-end; b: connected" in got
    doc = json.loads((tmp_path / "status.json").read_text())
    assert doc["ready"] and [x["state"] for x in doc["links"]] == [
        "needs reset", "waiting for front-end"]
    sock.close()
