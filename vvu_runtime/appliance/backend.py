"""``vvu-backend``: the entry point of an appliance's backend unit (``Type=notify``).

    vvu-backend {switch,blk,fs}         run (vvu-switch / vvu-blk / vvu-fs.service)
    vvu-backend {switch,blk,fs} --check   validate the config, match the functions, print
                                        the command lines; exit 0, or 78 on a config error
    vvu-backend --schema                print the configuration schema

1. Reads the appliance config (:mod:`~vvu_runtime.appliance.config`: the
   credential ``vvu.appliance``, else ``/etc/vvu/appliance.yaml``). A missing or
   invalid one: every problem (``FILE:LINE: FIELD: message``) on stderr (the
   journal, ``systemctl status``), ``STATUS=``, exit 78 (EX_CONFIG). The unit has
   ``RestartPreventExitStatus=78``: it ends ``failed``, no restart loop.
2. Matches every configured link to its VVU function by the uuid in the
   function's device config (:mod:`~vvu_runtime.appliance.functions`), waiting
   up to :data:`FUNCTION_TIMEOUT` s with ``STATUS=waiting for the VVU function
   of link X``; then exit 3 (also not restarted: the functions are cold-plugged,
   a missing one will not come). Functions no link names are left alone.
3. Storage: waits for each data disk (``/dev/disk/by-id/virtio-SERIAL``); for a
   ``file`` export mounts the disk's file system at ``/run/vvu/disks/SERIAL``
   (making an ext4 one on a blank disk) and creates the file, sparse, if missing.
4. Runs ``vvu-switch --vvu NAME=ADDR ...`` (for ``options.engine: testpmd``
   ``vvu-proxy --listen`` on both links, supervising one stock ``dpdk-testpmd``,
   appliance/testpmd.py) or, one per export, ``vvu-blk --vvu
   ADDR --serial NAME ...`` / ``vvu-scsi --vvu ADDR --config /run/vvu/scsi/NAME.json``
   (a scsi export's LUN file holds the disk as LUN 0, written afresh at each
   start: LUNs added to it take effect on SIGHUP, ``systemctl reload``) / for
   ``engine: qsd`` ``vvu-proxy`` supervising qemu-storage-daemon
   (appliance/qsd.py); or (fs) one ``vvu-proxy`` with a link per export, each
   supervising its own stock ``virtiofsd`` (it exits when its front-end goes).
   A single backend runs in this process (one Python start-up less: seconds
   under TCG) and talks to systemd itself (serve/runner.py and proxy/cli.py send
   ``READY=1`` once every link has BACKEND_UP set, ``WATCHDOG=1`` from their
   event loops). Several (a storage appliance with more
   exports) are child processes, each with its own ``NOTIFY_SOCKET`` here.
5. Tells systemd ``READY=1`` when every backend is ready, i.e. every configured
   link is BACKEND_UP; ``STATUS=`` holds each link's state (waiting for the VVU
   function / waiting for front-end / connected / waiting for back-end (vvu-proxy's
   back-end is down or restarting) / needs reset / dead);
   ``WATCHDOG=1`` only while every backend pings, so ``WatchdogSec=`` restarts
   a wedged one. The same states are in ``/run/vvu/status.json``.

When a backend exits, the others are stopped and ``vvu-backend`` exits with its
status (``Restart=on-failure``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from vvu_runtime.appliance import qsd, testpmd
from vvu_runtime.appliance.config import (
    ApplianceConfig,
    ConfigError,
    Export,
    FsExport,
    load_config,
    schema_text,
)
from vvu_runtime.appliance.functions import VvuFunction, find_functions, link_uuid

__all__ = ["EXIT_CONFIG", "EXIT_NO_FUNCTION", "main", "sd_notify"]

EXIT_CONFIG = 78  # EX_CONFIG: RestartPreventExitStatus= in the units
EXIT_NO_FUNCTION = 3
FUNCTION_TIMEOUT = float(os.environ.get("VVU_FUNCTION_TIMEOUT", "30"))
DISK_TIMEOUT = 30.0
RUN_DIR = Path(os.environ.get("VVU_RUN_DIR", "/run/vvu"))
SYSTEM_CREDENTIALS = Path("/run/credentials/@system")
PROGRAMS = {"switch": "vvu-switch", "blk": "vvu-blk", "fs": "vvu-proxy"}
KINDS = {"switch": "vswitch", "blk": "storage", "fs": "fs"}
#: Debian's virtiofsd is not on PATH.
VIRTIOFSD = "/usr/libexec/virtiofsd"

#: The backends' log lines that change a link's state (driver/endpoint.py,
#: vhost_user/backend.py, proxy/); ``addr`` is the VVU function's PCI address.
_ADDR = r"(?P<addr>[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])"
LOG_STATES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"@ vvu {_ADDR}: ready for a front-end"), "waiting for front-end"),
    # The session's name: "DEVICE (vvu ADDR connection N)".
    (re.compile(rf"vvu {_ADDR} connection \d+\)?: front-end connected"), "connected"),
    (re.compile(rf"@ vvu {_ADDR}: front-end disconnected"), "waiting for front-end"),
    # vvu-proxy (proxy/link.py, relay.py): "proxy SOCKET @ vvu ADDR[ #N]: ...".
    (re.compile(rf"@ vvu {_ADDR} #\d+: consumer connected"), "connected"),
    (re.compile(rf"@ vvu {_ADDR}: waiting for the back-end"), "waiting for back-end"),
    (re.compile(rf"@ vvu {_ADDR}: the device needs a reset"), "needs reset"),
    (re.compile(rf"@ vvu {_ADDR}: .*dead until the appliance restarts"), "dead"),
)


def _say(msg: str) -> None:
    print(f"vvu-backend: {msg}", file=sys.stderr, flush=True)


def sd_notify(message: str) -> None:
    """One datagram to ``$NOTIFY_SOCKET`` (systemd's notification protocol), if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(
        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
    ) as sock:
        sock.sendto(message.encode(), address)


def credential_dirs() -> list[Path]:
    dirs = [Path(d) for d in [os.environ.get("CREDENTIALS_DIRECTORY")] if d]
    return [*dirs, SYSTEM_CREDENTIALS]


# --------------------------------------------------------------------------
# Links and functions
# --------------------------------------------------------------------------


def match_functions(
    config: ApplianceConfig, functions: Sequence[VvuFunction]
) -> tuple[dict[str, str], list[str]]:
    """(link name -> PCI address, problems) for the configured links."""
    by_uuid = {f.uuid: f.address for f in functions if f.uuid is not None}
    matched: dict[str, str] = {}
    missing: list[str] = []
    for name in config.link_names:
        addr = by_uuid.get(link_uuid(name))
        if addr is None:
            missing.append(f"no VVU function for link {name} (uuid {link_uuid(name)})")
        else:
            matched[name] = addr
    return matched, missing


def _function_cache() -> Path:
    return RUN_DIR / "functions.json"


def discover(config: ApplianceConfig, timeout: float) -> dict[str, str]:
    """Wait until every link has its function; ``SystemExit(EXIT_NO_FUNCTION)`` after ``timeout``.

    The uuids read are kept in /run/vvu/functions.json: a restarted backend finds
    the functions bound to vfio-pci, whose BAR may not be readable through sysfs.
    """
    cache: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(_function_cache().read_text())
    deadline = time.monotonic() + timeout
    while True:
        functions = []
        for f in find_functions():
            if f.uuid is None and f.address in cache:
                import uuid as uuidlib

                f = VvuFunction(f.address, uuidlib.UUID(cache[f.address]))
            functions.append(f)
        matched, missing = match_functions(config, functions)
        if not missing:
            break
        sd_notify("STATUS=" + "; ".join(missing))
        if time.monotonic() > deadline:
            seen = ", ".join(f"{f.address} (uuid {f.uuid or f.error})" for f in functions)
            for m in missing:
                _say(f"error: {m}")
            _say(f"VVU functions present: {seen or 'none'}")
            sd_notify("STATUS=failed: " + "; ".join(missing))
            raise SystemExit(EXIT_NO_FUNCTION)
        time.sleep(0.5)
    with contextlib.suppress(OSError):
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        _function_cache().write_text(
            json.dumps({f.address: str(f.uuid) for f in functions if f.uuid is not None}))
    for f in functions:
        if f.address not in matched.values():
            _say(f"VVU function {f.address} (uuid {f.uuid}) belongs to no configured link: "
                 "left alone")
    return matched


# --------------------------------------------------------------------------
# Storage: data disks and files
# --------------------------------------------------------------------------


def disk_path(serial: str) -> Path:
    return Path(f"/dev/disk/by-id/virtio-{serial}")


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f} s: is the data "
                               "disk attached with that serial?")
        sd_notify(f"STATUS=waiting for {path}")
        time.sleep(0.2)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def data_mount(serial: str) -> Path:
    """The file system of data disk ``serial``, mounted at /run/vvu/disks/SERIAL (an
    ext4 one is made first on a blank disk; a disk with anything else is refused)."""
    dev = disk_path(serial)
    _wait_for(dev, DISK_TIMEOUT)
    mnt = RUN_DIR / "disks" / serial
    if os.path.ismount(mnt):
        return mnt
    mnt.mkdir(parents=True, exist_ok=True)
    if _run(["mount", str(dev), str(mnt)]).returncode != 0:
        probe = _run(["blkid", "-p", str(dev)])
        if probe.returncode != 2:  # 2: nothing found, a blank disk
            raise RuntimeError(f"cannot mount {dev} (data disk {serial}) and it is not "
                               f"blank: {probe.stdout.strip() or probe.stderr.strip()}")
        _say(f"data disk {serial} is blank: making an ext4 file system on it")
        mk = _run(["mkfs.ext4", "-q", "-L", serial[:16], str(dev)])
        if mk.returncode != 0:
            raise RuntimeError(f"mkfs.ext4 {dev}: {mk.stderr.strip()}")
        mounted = _run(["mount", str(dev), str(mnt)])
        if mounted.returncode != 0:
            raise RuntimeError(f"mount {dev}: {mounted.stderr.strip()}")
    return mnt


def export_image(export: Export) -> Path:
    """The block device or file ``export`` serves, made ready (see the module docstring)."""
    if export.disk is not None:
        dev = disk_path(export.disk)
        _wait_for(dev, DISK_TIMEOUT)
        return dev
    assert export.file is not None
    f = export.file
    path = data_mount(f.disk) / f.path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.truncate(f.size)
        _say(f"export {export.name}: created {path} ({f.size} bytes, sparse)")
    return path


def share_dir(share: FsExport, *, prepare: bool = True) -> Path:
    """The directory ``share`` exports (``prepare``: mounted and made if missing)."""
    if not prepare:
        return RUN_DIR / "disks" / share.disk / share.path
    path = data_mount(share.disk) / share.path
    path.mkdir(parents=True, exist_ok=True)
    return path


def fs_socket(share: FsExport) -> Path:
    """Where that share's virtiofsd listens and vvu-proxy connects."""
    return RUN_DIR / "fs" / f"{share.name}.sock"


def virtiofsd_argv(share: FsExport, directory: Path, options: dict[str, object]) -> list[str]:
    """A stock virtiofsd for one share (it serves one front-end, then exits)."""
    return [VIRTIOFSD, f"--socket-path={fs_socket(share)}", f"--shared-dir={directory}",
            f"--cache={options['cache']}", f"--sandbox={options['sandbox']}"]


# --------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------


@dataclass
class Backend:
    """One backend process and the links it serves."""

    argv: list[str]
    links: dict[str, str]  # PCI address -> link name
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    ready: bool = False
    last_ping: float = field(default_factory=time.monotonic)
    buffer: bytes = b""


def planned_image(export: Export) -> Path:
    """Where ``export`` will be served from, without preparing anything (``--check``)."""
    if export.disk is not None:
        return disk_path(export.disk)
    assert export.file is not None
    return RUN_DIR / "disks" / export.file.disk / export.file.path


def scsi_luns_path(export: Export) -> Path:
    """The LUN file (vvu-scsi ``--config``) of a ``protocol: scsi`` export."""
    return RUN_DIR / "scsi" / f"{export.name}.json"


def write_scsi_luns(export: Export, image: Path) -> Path:
    """Write the export's LUN file afresh: the disk as LUN 0. LUNs added to it at
    run time last until the backend restarts (the appliance config is the truth)."""
    path = scsi_luns_path(export)
    path.parent.mkdir(parents=True, exist_ok=True)
    lun0 = {"lun": 0, "image": str(image), "read_only": export.readonly,
            "serial": export.serial}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"luns": [lun0]}, indent=2) + "\n")
    tmp.replace(path)
    return path


def commands(config: ApplianceConfig, matched: dict[str, str], *,
             prepare: bool = True) -> list[Backend]:
    """The backend command lines; ``prepare``: wait for disks, mount, create files."""
    opts = config.options
    if config.kind == "vswitch" and opts["engine"] == "testpmd":
        # One stock testpmd for both links, supervised by vvu-proxy (appliance/testpmd.py).
        if prepare:
            testpmd.socket_path(RUN_DIR, "").parent.mkdir(parents=True, exist_ok=True)
        return [Backend(testpmd.proxy_argv(config, matched, RUN_DIR),
                        {matched[n]: n for n in config.link_names})]
    if config.kind == "vswitch":
        argv = ["vvu-switch"]
        for link in config.links:
            argv += ["--vvu", f"{link.name}={matched[link.name]}"]
        argv += ["--queues", str(opts["queues"]), "--busy-poll", str(opts["busy_poll_us"])]
        for t in config.tunnels:
            argv += ["--tunnel", f"{t.name}={t.remote},port={t.port},vni={t.vni}"]
        if config.underlay is not None and config.tunnels:
            u = config.underlay
            argv += ["--tunnel-bind", u.address, "--tunnel-port", str(u.port),
                     "--underlay-mtu", str(u.mtu)]
        return [Backend(argv, {matched[n]: n for n in config.link_names})]
    if config.kind == "fs":
        argv = ["vvu-proxy"]
        for share in config.shares:
            addr = matched[share.name]
            directory = share_dir(share, prepare=prepare)
            if prepare:
                fs_socket(share).parent.mkdir(parents=True, exist_ok=True)
            argv += ["--link", f"{addr}={fs_socket(share)}", "--exec",
                     f"{addr}={shlex.join(virtiofsd_argv(share, directory, opts))}"]
        return [Backend(argv, {matched[n]: n for n in config.link_names})]
    backends = []
    for export in config.exports:
        addr = matched[export.name]
        image = export_image(export) if prepare else planned_image(export)
        if export.engine == "qsd":
            # O_DIRECT cannot reach BAR2 memory here: `direct` is the export's
            # write-through instead (appliance/qsd.py).
            argv = qsd.proxy_argv(export, addr, image, RUN_DIR, queues=opts["queues"],
                                  direct=opts["direct"])
            backends.append(Backend(argv, {addr: export.name}))
            continue
        if export.protocol == "scsi":
            # One controller per export, the disk as its LUN 0 (same serial as GET_ID),
            # from a LUN file an operator may edit: SIGHUP (systemctl reload) applies it.
            luns = scsi_luns_path(export)
            if prepare:
                write_scsi_luns(export, image)
            argv = ["vvu-scsi", "--vvu", addr, "--config", str(luns),
                    "--queues", str(opts["queues"])]
        else:
            argv = ["vvu-blk", "--vvu", addr, "--image", str(image),
                    "--serial", export.serial, "--queues", str(opts["queues"]),
                    "--poll-us", str(opts["poll_us"]),
                    "--busy-poll", str(opts["busy_poll_us"])]
            if export.readonly:
                argv.append("--read-only")
        if opts["direct"]:
            argv.append("--direct")
        backends.append(Backend(argv, {addr: export.name}))
    return backends


# --------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------


class Supervisor:
    """Runs the backends, aggregates their readiness and watchdog pings for systemd."""

    def __init__(self, config: ApplianceConfig, backends: list[Backend]) -> None:
        self.config = config
        self.backends = backends
        self.states = {name: "starting" for name in config.link_names}
        self.addresses = {name: addr for b in backends for addr, name in b.links.items()}
        self.sel = selectors.DefaultSelector()
        self.ready_sent = False
        self.stopping = False
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.watchdog = usec / 1e6 if usec > 0 else 0.0
        self._status = ""

    def start(self) -> None:
        notify_dir = RUN_DIR / "notify"
        notify_dir.mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(self.backends):
            path = notify_dir / f"{os.getpid()}-{i}"
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.bind(str(path))
            b.notify = sock
            env = {k: v for k, v in os.environ.items()
                   if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")}
            env["NOTIFY_SOCKET"] = str(path)
            if self.watchdog:
                env["WATCHDOG_USEC"] = str(int(self.watchdog * 1e6))
            _say(f"starting: {' '.join(b.argv)}")
            b.proc = subprocess.Popen(b.argv, env=env, stdin=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
            assert b.proc.stderr is not None
            os.set_blocking(b.proc.stderr.fileno(), False)
            self.sel.register(sock, selectors.EVENT_READ, ("notify", b))
            self.sel.register(b.proc.stderr, selectors.EVENT_READ, ("log", b))
        self.report()

    def report(self) -> None:
        status = "; ".join(f"{n}: {s}" for n, s in self.states.items())
        key = f"{status}|{self.ready_sent}"
        if key != self._status:
            if status != self._status.partition("|")[0]:
                sd_notify(f"STATUS={status}")
            self._status = key
            _write_status(self.config, self.states, self.addresses, ready=self.ready_sent)

    def _on_log(self, b: Backend, stream: IO[bytes]) -> None:
        try:
            chunk = os.read(stream.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.sel.unregister(stream)
            return
        b.buffer += chunk
        *lines, b.buffer = b.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            sys.stderr.write(line + "\n")
            for pattern, state in LOG_STATES:
                m = pattern.search(line)
                if m and m["addr"] in b.links:
                    self.states[b.links[m["addr"]]] = state
        sys.stderr.flush()

    def _on_notify(self, b: Backend) -> None:
        assert b.notify is not None
        try:
            data = b.notify.recv(4096).decode(errors="replace")
        except OSError:
            return
        for line in data.splitlines():
            if line == "READY=1" and not b.ready:
                b.ready = True
                for name in b.links.values():
                    if self.states[name] == "starting":
                        self.states[name] = "waiting for front-end"
            elif line == "WATCHDOG=1":
                b.last_ping = time.monotonic()

    def run(self) -> int:
        self.start()
        next_ping = time.monotonic()
        while True:
            for key, _ in self.sel.select(timeout=0.5):
                kind, b = key.data
                if kind == "notify":
                    self._on_notify(b)
                else:
                    self._on_log(b, key.fileobj)  # type: ignore[arg-type]
            if not self.ready_sent and all(b.ready for b in self.backends):
                self.ready_sent = True
                _say("every link is BACKEND_UP: ready")
                sd_notify("READY=1")
            self.report()
            now = time.monotonic()
            if self.watchdog and now >= next_ping:
                next_ping = now + self.watchdog / 4
                # Until READY a backend is still starting: systemd's start timeout covers it.
                stale = [b for b in self.backends if b.ready and now - b.last_ping > self.watchdog]
                if stale:
                    names = ", ".join(n for b in stale for n in b.links.values())
                    sd_notify(f"STATUS=backend of {names} stopped answering")
                else:
                    sd_notify("WATCHDOG=1")
            for b in self.backends:
                assert b.proc is not None
                rc = b.proc.poll()
                if rc is not None:
                    return self._finish(b, rc)

    def _finish(self, ended: Backend, rc: int) -> int:
        if not self.stopping:
            _say(f"{ended.argv[0]} ({', '.join(ended.links.values())}) exited with {rc}; "
                 "stopping the others")
        self.stop(signal.SIGTERM)
        for b in self.backends:
            assert b.proc is not None and b.proc.stderr is not None
            with contextlib.suppress(OSError):
                rest = b.proc.stderr.read()
                if rest:
                    sys.stderr.write(rest.decode(errors="replace"))
            if b.notify is not None:
                with contextlib.suppress(OSError):
                    os.unlink(b.notify.getsockname())
                b.notify.close()
        return 0 if self.stopping else (rc if rc > 0 else 1)

    def reload(self) -> None:
        """SIGHUP (``systemctl reload``): each vvu-scsi re-reads its LUN file; the others
        have nothing to re-read."""
        for b in self.backends:
            if b.argv[0] == "vvu-scsi" and b.proc is not None and b.proc.poll() is None:
                b.proc.send_signal(signal.SIGHUP)

    def stop(self, signum: int) -> None:
        for b in self.backends:
            if b.proc is not None and b.proc.poll() is None:
                b.proc.send_signal(signum)
        for b in self.backends:
            if b.proc is not None:
                try:
                    b.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    b.proc.kill()
                    b.proc.wait()


class LinkStates(logging.Handler):
    """Follows the backend's log records (in this process) and reports each link's
    state: ``STATUS=`` and /run/vvu/status.json (:data:`LOG_STATES`)."""

    def __init__(self, config: ApplianceConfig, backend: Backend) -> None:
        super().__init__(logging.INFO)
        self.config = config
        self.backend = backend
        self.states = {name: "starting" for name in config.link_names}
        self._last = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return
        for pattern, state in LOG_STATES:
            m = pattern.search(message)
            if m and m["addr"] in self.backend.links:
                self.states[self.backend.links[m["addr"]]] = state
                self.report()

    def report(self) -> None:
        status = "; ".join(f"{n}: {s}" for n, s in self.states.items())
        if status == self._last:
            return
        self._last = status
        sd_notify(f"STATUS={status}")
        _write_status(self.config, self.states,
                      {n: a for a, n in self.backend.links.items()},
                      ready=all(s != "starting" for s in self.states.values()))


def _write_status(config: ApplianceConfig, states: dict[str, str], addresses: dict[str, str],
                  *, ready: bool) -> None:
    doc = {"kind": config.kind, "source": config.source, "ready": ready,
           "links": [{"name": n, "function": addresses.get(n), "uuid": str(link_uuid(n)),
                      "state": s} for n, s in states.items()]}
    with contextlib.suppress(OSError):
        tmp = RUN_DIR / "status.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(RUN_DIR / "status.json")


def run_in_process(config: ApplianceConfig, backend: Backend) -> int:
    """One backend process: run its CLI here (one Python start-up less under TCG).

    It talks to systemd itself (serve/runner.py): READY=1 once every endpoint
    is BACKEND_UP, WATCHDOG=1 from its event loop, STOPPING=1; :class:`LinkStates`
    adds the per-link STATUS=.
    """
    states = LinkStates(config, backend)
    logging.getLogger().addHandler(states)
    states.report()
    _say(f"running: {' '.join(backend.argv)}")
    sys.argv[0] = backend.argv[0]
    # SIGHUP (systemctl reload) must not end a backend: vvu-scsi installs its own
    # handler (re-read the LUN file), the others have nothing to re-read.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _say("SIGHUP: nothing to reload"))
    if backend.argv[0] == "vvu-switch":
        from vvu_runtime.serve.switch import main as backend_main
    elif backend.argv[0] == "vvu-proxy":
        from vvu_runtime.proxy.cli import main as backend_main
    elif backend.argv[0] == "vvu-scsi":
        from vvu_runtime.serve.scsi import main as backend_main
    else:
        from vvu_runtime.serve.blk import main as backend_main
    return int(backend_main(backend.argv[1:]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vvu-backend",
                                     description="Run the appliance's backend (see its unit).")
    parser.add_argument("backend", nargs="?", choices=sorted(PROGRAMS))
    parser.add_argument("--check", action="store_true",
                        help="validate the config, match functions, print the command lines")
    parser.add_argument("--schema", action="store_true", help="print the config schema")
    parser.add_argument("--config", type=Path, help="read this file (not the credential)")
    args = parser.parse_args(argv)
    if args.schema:
        print(schema_text(), end="")
        return 0
    if args.backend is None:
        parser.error("give the backend: switch, blk or fs")
    try:
        if args.config is not None:
            config = load_config((), args.config)
        else:
            config = load_config(credential_dirs())
    except ConfigError as e:
        for problem in e.problems:
            _say(f"config error: {problem}")
        sd_notify(f"STATUS=config error: {e.problems[0]}")
        return EXIT_CONFIG
    want = KINDS[args.backend]
    if config.kind != want:
        msg = (f"{config.source}: kind is {config.kind!r}, but vvu-{args.backend} serves "
               f"kind {want!r}")
        _say(f"config error: {msg}")
        sd_notify(f"STATUS=config error: {msg}")
        return EXIT_CONFIG
    _say(f"config {config.source}: {config.kind}, links {', '.join(config.link_names)}")
    if not args.check:
        with contextlib.suppress(OSError):
            RUN_DIR.mkdir(parents=True, exist_ok=True)
    matched = discover(config, 0 if args.check else FUNCTION_TIMEOUT)
    try:
        backends = commands(config, matched, prepare=not args.check)
    except RuntimeError as e:
        _say(f"error: {e}")
        sd_notify(f"STATUS=failed: {e}")
        return 1
    if args.check:
        for b in backends:
            print(" ".join(b.argv))
        return 0
    if len(backends) == 1:
        return run_in_process(config, backends[0])
    supervisor = Supervisor(config, backends)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stopping = True
        sd_notify("STOPPING=1")
        for b in supervisor.backends:
            if b.proc is not None and b.proc.poll() is None:
                b.proc.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: supervisor.reload())
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
