"""The storage appliance's ``engine: qsd`` exports: the config field, the vvu-proxy
+ qemu-storage-daemon command line vvu-backend runs for them, and what vvu-proxy
tells vvu-backend (READY=1 once armed, WATCHDOG=1, the link states of its log)."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import lab_plans
from tests.support.blk_driver import BlkDriver
from tests.support.loop_thread import LoopThread
from tests.support.vvu_chain import DeviceModel, FileRam, wait_for
from vvu_runtime.appliance import backend
from vvu_runtime.appliance.config import ConfigError, parse_config
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.launch import cli as launch_cli
from vvu_runtime.launch.topology import (
    TopologyError,
    load_topology,
    load_topology_text,
)
from vvu_runtime.proxy import cli
from vvu_runtime.proxy.link import ProxyLink
from vvu_runtime.vhost_user.frontend import VhostUserFrontend, setup_queue
from vvu_runtime.vhost_user.server import VhostUserServer
from vvu_runtime.virtio.blk import RequestType, Status
from vvu_runtime.virtio.features import VirtioFeature
from vvu_runtime.virtio.vvu_abi import VvuStatus

REPO = Path(__file__).resolve().parents[2]
UP = int(VvuStatus.BACKEND_UP)
SPLIT = (1 << 64) - 1 & ~int(VirtioFeature.RING_PACKED)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def test_engine_defaults_to_vvu_blk_and_takes_qsd() -> None:
    c = parse_config("kind: storage\nexports:\n  - {name: a, disk: d0}\n"
                     "  - {name: b, disk: d1, engine: qsd}\n", "f")
    assert [e.engine for e in c.exports] == ["vvu-blk", "qsd"]


@pytest.mark.parametrize("text, message", [
    ("kind: storage\nexports:\n  - {name: a, disk: d0, engine: spdk}\n",
     "f:3: exports[0].engine: vvu-blk or qsd; got \"spdk\""),
    ("kind: storage\nexports:\n  - {name: a, disk: d0}\n  - name: b\n    disk: d1\n"
     "    protocol: scsi\n    engine: qsd\n",
     "f:7: exports[1].engine: qsd serves protocol blk only (qemu-storage-daemon has no "
     "vhost-user-scsi export); export 'b' has protocol scsi"),
])
def test_bad_engines_name_the_line_and_the_export(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "f")
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message), e.value


def test_schema_text_shows_the_engine() -> None:
    assert "engine: str (default \"vvu-blk\"): what serves the disk" in backend.schema_text()


# --------------------------------------------------------------------------
# The topology: engine on an export, into the appliance's config
# --------------------------------------------------------------------------

LAB = """\
name: lab
appliances:
  st1:
    kind: storage
    exports:
      - {name: a, size: 64M}
      - {name: b, size: 64M, engine: qsd}
consumers:
  c1: {disks: [st1/a, st1/b]}
"""


def test_topology_engine_defaults_to_vvu_blk_and_is_in_the_resolved_lab() -> None:
    topo = load_topology_text(LAB, Path("/labs/lab.yaml"))
    assert [(e.name, e.engine) for e in topo.appliance("st1").exports] == [
        ("a", "vvu-blk"), ("b", "qsd")]
    assert topo.to_json()["appliances"][0]["exports"][1]["engine"] == "qsd"


def test_a_bad_engine_is_reported_at_its_value() -> None:
    text = LAB.replace("engine: qsd", "engine: qemu")
    with pytest.raises(TopologyError) as e:
        load_topology_text(text, Path("lab.yaml"))
    assert [str(p) for p in e.value.problems] == [
        'lab.yaml:7:38: appliances.st1.exports[1].engine: expected one of vvu-blk, qsd, '
        'got "qemu"']


def test_the_qsd_engine_with_protocol_scsi_is_refused_at_the_engine() -> None:
    text = LAB.replace("engine: qsd}", "engine: qsd, protocol: scsi}")
    with pytest.raises(TopologyError) as e:
        load_topology_text(text, Path("lab.yaml"))
    assert [str(p) for p in e.value.problems] == [
        'lab.yaml:7:38: appliances.st1.exports[1].engine: export "b": engine qsd serves '
        "vhost-user-blk only; protocol scsi needs engine vvu-blk (vvu-scsi)"]


def test_schema_command_documents_the_engine(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_cli.main(["schema"]) == 0
    assert "| engine | one of vvu-blk, qsd | vvu-blk | what serves the disk" in \
        capsys.readouterr().out


def test_the_launcher_passes_the_engine_to_the_appliance() -> None:
    lab = lab_plans.plan(load_topology_text(LAB, Path("/labs/lab.yaml")))
    text = lab_plans.appliance_config(lab, "st1")
    # vvu-blk exports are rendered as before (no engine key); the appliance reads both.
    assert json.loads(text)["exports"] == [
        {"name": "c1-disk0", "disk": "a", "readonly": False, "protocol": "blk"},
        {"name": "c1-disk1", "disk": "b", "readonly": False, "protocol": "blk",
         "engine": "qsd"}]
    config = parse_config(text, "credential vvu.appliance")
    assert [e.engine for e in config.exports] == ["vvu-blk", "qsd"]


def test_the_qsd_example_is_one_qsd_export_and_its_consumer() -> None:
    topo = load_topology(REPO / "examples" / "qsd.yaml")
    (st1,) = topo.appliances
    assert [e.engine for e in st1.exports] == ["qsd"]
    (c1,) = topo.consumers
    assert [d.ref for d in c1.disks] == ["st1/disk"]
    assert "disk" in {c.kind.value for c in topo.checks}
    config = parse_config(lab_plans.appliance_config(lab_plans.plan(topo), "st1"), "credential")
    assert [(e.name, e.engine) for e in config.exports] == [("c1-disk0", "qsd")]


# --------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------


@pytest.fixture
def disks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path / "run")
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    for serial in ("data0", "data1"):
        (by_id / f"virtio-{serial}").write_bytes(b"")
    monkeypatch.setattr(backend, "disk_path", lambda serial: by_id / f"virtio-{serial}")
    mounted = tmp_path / "run/disks/data1"
    mounted.mkdir(parents=True)
    monkeypatch.setattr(backend.os.path, "ismount", lambda p: Path(p) == mounted)
    return by_id


def _exec(argv: list[str]) -> tuple[str, str, list[str]]:
    """(vvu-proxy's --link, its --exec address, the back-end command it will run)."""
    args = cli.parse_args(argv[1:])  # vvu-proxy takes the command line it is given
    ((address, sock),) = args.link
    ((exec_address, command),) = args.commands
    assert exec_address == address
    return address, sock, shlex.split(command)


def test_qsd_export_runs_vvu_proxy_supervising_qemu_storage_daemon(disks: Path) -> None:
    s = parse_config('{"kind": "storage", "options": {"direct": true, "queues": 2},'
                     ' "exports": [{"name": "c1-disk0", "disk": "data0", "engine": "qsd"},'
                     ' {"name": "c2-disk0", "disk": "data0"}]}', "f")
    qsd_b, blk_b = backend.commands(s, {"c1-disk0": "0000:03:00.0", "c2-disk0": "0000:04:00.0"})
    assert qsd_b.argv[0] == "vvu-proxy" and qsd_b.links == {"0000:03:00.0": "c1-disk0"}
    assert blk_b.argv[0] == "vvu-blk" and "--direct" in blk_b.argv
    address, sock, command = _exec(qsd_b.argv)
    assert (address, sock) == ("0000:03:00.0", str(backend.RUN_DIR / "c1-disk0.qsd.sock"))
    image = disks / "virtio-data0"
    assert command == [
        "qemu-storage-daemon",
        "--blockdev", f"driver=host_device,node-name=file0,filename={image},cache.direct=off,"
                      "aio=threads,discard=unmap",
        "--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap",
        "--export", "type=vhost-user-blk,id=c1-disk0,node-name=disk0,writable=on,"
                    f"writethrough=on,num-queues=2,addr.type=unix,addr.path={sock}"]


def test_qsd_read_only_file_export_without_direct(disks: Path) -> None:
    s = parse_config("kind: storage\nexports:\n  - name: ro\n    engine: qsd\n"
                     "    readonly: true\n    file: {disk: data1, path: \"a,b.img\", size: 1M}\n"
                     "options: {direct: false}\n", "f")
    (b,) = backend.commands(s, {"ro": "0000:05:00.0"})
    _, _, command = _exec(b.argv)
    image = backend.RUN_DIR / "disks/data1/a,b.img"
    assert image.stat().st_size == 1 << 20  # made ready as for vvu-blk
    assert command[1:5] == [
        "--blockdev", f"driver=file,node-name=file0,filename={str(image).replace(',', ',,')},"
                      "cache.direct=off,aio=threads,discard=unmap,read-only=on",
        "--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap,read-only=on"]
    assert ",writable=off,writethrough=off,num-queues=4," in command[6]


def test_check_prints_the_qsd_command_without_preparing(
        disks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "appliance.yaml"
    conf.write_text("kind: storage\nexports:\n  - {name: q, disk: data0, engine: qsd}\n")
    monkeypatch.setattr(backend, "discover", lambda config, timeout: {"q": "0000:06:00.0"})
    assert backend.main(["blk", "--check", "--config", str(conf)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("vvu-proxy --link 0000:06:00.0=") and "qemu-storage-daemon" in line


# --------------------------------------------------------------------------
# vvu-proxy under vvu-backend
# --------------------------------------------------------------------------


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


@pytest.fixture
def loops() -> Iterator[tuple[LoopThread, LoopThread]]:
    """(the appliance's loop: the proxy; the back-end's loop: a separate program)."""
    appliance, back = LoopThread("appliance"), LoopThread("backend")
    yield appliance, back
    appliance.stop()
    back.stop()


def test_proxy_is_ready_once_armed_pings_the_watchdog_and_reports_link_states(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        loops: tuple[LoopThread, LoopThread]) -> None:
    app, back = loops
    monkeypatch.setattr(backend, "RUN_DIR", tmp_path)
    listener, got = _notify_listener(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    model = DeviceModel(tmp_path, "disk0")
    model.pci.address = "0000:00:05.0"  # what vvu-backend's patterns read in the log
    config = parse_config('{"kind": "storage", "exports": [{"name": "disk0", "disk": "d0",'
                          ' "engine": "qsd"}]}', "f")
    states = backend.LinkStates(config, backend.Backend(["vvu-proxy"],
                                                        {model.pci.address: "disk0"}))
    runtime_log = logging.getLogger("vvu_runtime")
    level = runtime_log.level
    runtime_log.addHandler(states)
    runtime_log.setLevel(logging.INFO)
    (image_path := tmp_path / "disk.raw").write_bytes(bytes(1 << 20))
    sock = str(tmp_path / "qsd.sock")
    link = ProxyLink(sock, pci=model.pci, loop=app.loop, retry=0.05)
    stop = asyncio.Event()
    served = asyncio.run_coroutine_threadsafe(cli.serve([link], stop), app.loop)
    try:
        with RawImage(str(image_path)) as image:
            # No back-end yet: the link is not armed and nobody hears READY=1.
            wait_for(lambda: states.states["disk0"] == "waiting for back-end", what="waiting")
            time.sleep(0.3)
            assert model.status() == 0 and "READY=1" not in got
            server = VhostUserServer(sock, BlkDevice(image), loop=back.loop)
            back.call(server.start)
            wait_for(lambda: "READY=1" in got, what="READY=1 once armed")
            assert model.status() == UP
            assert states.states["disk0"] == "waiting for front-end"
            wait_for(lambda: got.count("WATCHDOG=1") >= 2, what="watchdog pings")
            # A consumer comes and goes: connected, then the back-end starts afresh.
            fe = VhostUserFrontend.connect(model.sock_path, retry_for=10.0, timeout=5.0)
            fe.negotiate(features=SPLIT)
            fe.get_queue_num()
            ram = FileRam(model.ram_path)
            fe.set_mem_table([(ram.region, ram.fd)])
            drv = BlkDriver(setup_queue(fe, ram, 0, 64), ram)
            assert drv.run(RequestType.OUT, 8, out=bytes(range(256)) * 16) == (Status.OK, b"")
            assert states.states["disk0"] == "connected"
            drv.dq.close()
            fe.close()
            ram.close()
            wait_for(lambda: back.call(lambda: server.connections) == 2, what="reconnected")
            wait_for(lambda: states.states["disk0"] == "waiting for front-end", what="re-armed")
            app.loop.call_soon_threadsafe(stop.set)
            served.result(10)
            back.call(server.close)
    finally:
        runtime_log.removeHandler(states)
        runtime_log.setLevel(level)
        app.loop.call_soon_threadsafe(stop.set)
        model.close()
        listener.close()
    assert got.count("READY=1") == 1 and got[-1] == "STOPPING=1"
    doc = json.loads((tmp_path / "status.json").read_text())
    assert [x["state"] for x in doc["links"]] == ["waiting for front-end"]
