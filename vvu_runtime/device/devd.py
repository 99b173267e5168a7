"""``vvu-devd``: one process serving every VVU device of one appliance.

Usage::

    vvu-devd --device NAME:VHOST_SOCKET:VFIO_SOCKET:RAM_FILE[:MAX_QUEUES] [--device ...]
             [--max-queues 64] [--virtio-id 63] [--log-level INFO] [--log-dir DIR]
             [--doorbell-socket PATH]

Each ``--device`` is one consumer link (DESIGN decision 2: one VVU device per
consumer): the consumer QEMU connects to ``VHOST_SOCKET`` (``-chardev
socket,path=VHOST_SOCKET,reconnect-ms=...`` with ``memory-backend-file,
mem-path=RAM_FILE,share=on``), the appliance QEMU to ``VFIO_SOCKET``
(``-device vfio-user-pci``), and ``RAM_FILE`` is the consumer's RAM, provisioned
at its final size before either VM starts. Paths must not contain ``:``.
``MAX_QUEUES`` is that device's ``max_vhost_queues`` (else ``--max-queues``):
each queue is an MSI-X vector in the appliance, where an x86 vCPU has room for
about 200, so a launcher that knows a link's queue count should give it.

One asyncio loop runs every device (vfio-user server, vhost-user tunnel, kick
eventfds). Bad input on one device resets that device's link only and is
logged with its name; the process never exits because of it (a dead device
model is a dead device in the appliance for the rest of its life, DESIGN
decision 3). Every log line starts with the device name; ``--log-dir`` also
writes each device's lines to ``DIR/NAME.log``.

``--doorbell-socket PATH`` also makes ``vvu-devd`` the ivshmem server of the
appliance (``device/ivshmem.py``): the appliance's QEMU gets an
``ivshmem-doorbell`` device on that socket, every device is one of its peers,
and the driver rings the consumer's calls through it instead of the trapped VVU
doorbells (docs/vvu-abi.md "Doorbell bypass"). Off by default.

Signals: SIGTERM/SIGINT close every socket (the socket files are removed) and
exit 0; SIGUSR1 prints the counters table to stderr, as does the exit.
Exit codes: 0 after a signal, 1 if a device cannot be set up (a RAM file that
is missing or empty, a socket path that is taken), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vvu_runtime.console import EXIT_FAILURE, EXIT_OK, run_main, setup_logging
from vvu_runtime.device.errors import DeviceError
from vvu_runtime.device.ivshmem import DoorbellPeer, IvshmemServer
from vvu_runtime.device.tunnel import VhostUserTunnel
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.vvu import DEFAULT_MAX_QUEUES, DEFAULT_QUEUE_SIZE, VvuDevice
from vvu_runtime.vhost_user.errors import VhostUserError
from vvu_runtime.virtio.vvu_abi import MAX_VHOST_QUEUES, VIRTIO_ID_VVU

log = logging.getLogger("vvu_runtime.device.devd")

PROGRAM = "vvu-devd"
#: Logged once every socket is bound (launchers and tests wait for it).
READY_MESSAGE = "serving"
#: How often --status-file is refreshed (seconds).
STATUS_INTERVAL = 0.5


@dataclass(frozen=True)
class DeviceSpec:
    """One ``--device NAME:VHOST_SOCKET:VFIO_SOCKET:RAM_FILE``."""

    name: str
    vhost_socket: str
    vfio_socket: str
    ram_file: str
    #: This device's max_vhost_queues; None: vvu-devd's ``--max-queues``.
    max_queues: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        parts = text.split(":")
        if len(parts) not in (4, 5) or not all(parts):
            raise ValueError(f"{text!r}: expected NAME:VHOST_SOCKET:VFIO_SOCKET:RAM_FILE"
                             "[:MAX_QUEUES] (non-empty fields; paths cannot contain ':')")
        name = parts[0]
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"{text!r}: device name {name!r}: use letters, digits, '-', '_', "
                             "'.'")
        queues = None
        if len(parts) == 5:
            if not parts[4].isdigit() or not 1 <= int(parts[4]) <= MAX_VHOST_QUEUES:
                raise ValueError(f"{text!r}: MAX_QUEUES {parts[4]!r} is not a number in "
                                 f"1..{MAX_VHOST_QUEUES}")
            queues = int(parts[4])
        name, vhost, vfio, ram = parts[:4]
        return cls(name, vhost, vfio, ram, queues)


class VvuFunction:
    """One VVU device with its vhost-user tunnel and vfio-user server."""

    def __init__(self, spec: DeviceSpec, *, max_queues: int = DEFAULT_MAX_QUEUES,
                 virtio_id: int = VIRTIO_ID_VVU, queue_size: int = DEFAULT_QUEUE_SIZE,
                 loop: asyncio.AbstractEventLoop | None = None,
                 doorbell: DoorbellPeer | None = None, refuse_while_down: bool = False) -> None:
        self.spec = spec
        self.doorbell = doorbell
        self.device = VvuDevice(name=spec.name, ram_file=spec.ram_file, max_queues=max_queues,
                                virtio_id=virtio_id, queue_size=queue_size,
                                doorbell=doorbell)
        self.tunnel = VhostUserTunnel(self.device, spec.vhost_socket, loop=loop,
                                      refuse_while_down=refuse_while_down)
        if doorbell is not None:
            self.tunnel.on_calls = doorbell.set_calls
        self.server = VfioUserServer(self.device, spec.vfio_socket, loop=loop)

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        self.tunnel.start()
        self.server.start()

    def close(self) -> None:
        """Close both sockets (their files are removed) and release the device."""
        self.server.close()
        self.tunnel.close()
        self.device.close()

    def row(self) -> dict[str, str]:
        s = self.device.stats
        appliance = self.server.state.value
        return {
            "device": self.name,
            "appliance": appliance,
            "consumer": self.tunnel.state,
            "status": self.device.describe_state(),
            "conns": str(s.connections),
            "rx msgs": str(s.rx_messages),
            "tx replies": str(s.tx_replies),
            "tx reqs": str(s.tx_requests),
            "tx dropped": str(s.tx_dropped),
            "kicks": str(s.kicks),
            "unrouted": str(s.kicks_unrouted),
            "kicks merged": str(s.kicks_coalesced),
            "doorbells": str(s.doorbells),
            "no fd": str(s.doorbells_unset),
            "db merged": str(s.doorbells_coalesced),
            "rxq notifies": str(s.rxq_notifies),
            "txq notifies": str(s.txq_notifies),
            "errors": str(s.errors),
            "resets": str(s.link_resets),
        } | ({} if self.doorbell is None else {
            # Announcements of this link's peer to the appliance's QEMU, and how
            # many it was seen to install (the rest were signalled on a timeout).
            "bypass announced": str(self.doorbell.announcements),
            "bypass applied": str(self.doorbell.applied),
        })


def counters_table(functions: Sequence[VvuFunction]) -> str:
    """The per-device counters as an aligned text table."""
    rows = [f.row() for f in functions]
    if not rows:
        return "(no devices)"
    columns = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    numeric = {c for c in columns if all(r[c].isdigit() for r in rows)}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].rjust(width[c]) if c in numeric else values[c].ljust(width[c])
                         for c in columns).rstrip()

    header = {c: c for c in columns}
    rule = {c: "-" * width[c] for c in columns}
    return "\n".join([line(header), line(rule), *(line(r) for r in rows)])


class _DeviceLogFilter(logging.Filter):
    """Lines of one device: the code base starts every device log line with ``NAME:``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.prefix = f"{name}:"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage().startswith(self.prefix)


def configure_logging(level: str, log_dir: Path | None,
                      names: Sequence[str]) -> list[logging.Handler]:
    """stderr for everything (the common setup); ``log_dir/NAME.log`` per device.
    Returns the handlers added."""
    file_fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    handlers: list[logging.Handler] = [setup_logging(PROGRAM, level)]
    files: list[logging.Handler] = []
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            fh = logging.FileHandler(log_dir / f"{name}.log")
            fh.setFormatter(file_fmt)
            fh.addFilter(_DeviceLogFilter(name))
            files.append(fh)
    for h in files:
        root.addHandler(h)
    return handlers + files


async def serve(functions: Sequence[VvuFunction], stop: asyncio.Event, *,
                ready: Callable[[], None] | None = None,
                companion: IvshmemServer | None = None) -> None:
    """Start every function in the running loop, wait for ``stop``, close them all.

    A device that cannot start closes the ones already started and raises.
    """
    started: list[VvuFunction] = []
    try:
        if companion is not None:
            companion.start()  # before the appliance's QEMU starts: it connects at realize
        for f in functions:
            f.start()
            started.append(f)
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        for f in started:
            try:
                f.close()
            except Exception:
                log.exception("%s: error while closing", f.name)
        if companion is not None:
            companion.close()


def _print_table(functions: Sequence[VvuFunction], when: str) -> None:
    sys.stderr.write(f"{PROGRAM}: counters ({when}):\n{counters_table(functions)}\n")
    sys.stderr.flush()


def write_status(functions: Sequence[VvuFunction], path: Path) -> None:
    """The rows of the counters table as JSON, replacing ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "devices": [f.row() for f in functions]}))
    tmp.replace(path)


async def _status_writer(functions: Sequence[VvuFunction], path: Path,
                         every: float = STATUS_INTERVAL) -> None:
    """Rewrite the status file whenever a row changed (checked every ``every`` s)."""
    last: list[dict[str, str]] | None = None
    while True:
        rows = [f.row() for f in functions]
        if rows != last:
            try:
                write_status(functions, path)
                last = rows
            except OSError as exc:
                log.warning("cannot write the status file %s: %s", path, exc)
        await asyncio.sleep(every)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Serve virtio-vhost-user devices: each links one consumer VM's vhost-user "
                    "socket to a VVU PCI function of the appliance VM (vfio-user).")
    p.add_argument("--device", "-d", action="append", default=[], metavar="SPEC",
                   help="NAME:VHOST_SOCKET:VFIO_SOCKET:RAM_FILE[:MAX_QUEUES] (repeat for more "
                        "devices; MAX_QUEUES overrides --max-queues for this one)")
    p.add_argument("--max-queues", type=int, default=DEFAULT_MAX_QUEUES,
                   help=f"max_vhost_queues of a device whose --device gives none "
                        f"(1..{MAX_VHOST_QUEUES}, default {DEFAULT_MAX_QUEUES})")
    p.add_argument("--virtio-id", type=int, default=VIRTIO_ID_VVU,
                   help=f"virtio device ID (default {VIRTIO_ID_VVU}; PCI ID 0x1040 + ID)")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help=f"maximum rxq/txq size (default {DEFAULT_QUEUE_SIZE})")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-dir", type=Path, help="also write each device's log to DIR/NAME.log")
    p.add_argument("--doorbell-socket", metavar="PATH",
                   help="also serve the appliance's ivshmem-doorbell device on this socket: "
                        "call doorbells then bypass vvu-devd (docs/vvu-abi.md, "
                        "'Doorbell bypass'; the appliance QEMU needs -device "
                        "ivshmem-doorbell,chardev=...,vectors=MAX_QUEUES+1)")
    p.add_argument("--refuse-while-down", action="store_true",
                   help="refuse a front-end (ECONNREFUSED, QEMU's reconnect-ms retries) "
                        "whenever the appliance's back-end is not up, also before a link's "
                        "first session, instead of holding it in the listen backlog, where "
                        "its handshake freezes the consumer's vCPUs (for launchers that start "
                        "consumers after the appliance is ready and restart vvu-devd under "
                        "running consumers)")
    p.add_argument("--status-file", type=Path,
                   help="keep the counters table of every device in this JSON file "
                        "(rewritten atomically when it changes; launchers read link state there)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.device:
        parser.error("at least one --device is needed")
    try:
        specs = [DeviceSpec.parse(d) for d in args.device]
    except ValueError as exc:
        parser.error(str(exc))
    for what in ("name", "vhost_socket", "vfio_socket"):
        values = [getattr(s, what) for s in specs]
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            parser.error(f"two devices share the {what.replace('_', ' ')} {sorted(dup)[0]}")
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        parser.error(f"--log-level {args.log_level}: not a logging level")
    handlers = configure_logging(args.log_level, args.log_dir, [s.name for s in specs])
    try:
        return run_main(lambda: _run(specs, args), program=PROGRAM)
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def _run(specs: Sequence[DeviceSpec], args: argparse.Namespace) -> int:
    functions: list[VvuFunction] = []
    def queues(spec: DeviceSpec) -> int:
        return spec.max_queues if spec.max_queues is not None else args.max_queues

    # One ivshmem-doorbell for every device: as many vectors as the largest needs.
    companion = (IvshmemServer(args.doorbell_socket,
                               vectors=max(queues(s) for s in specs) + 1)
                 if args.doorbell_socket else None)
    try:
        for spec in specs:
            peer = companion.add_peer(spec.name) if companion is not None else None
            functions.append(VvuFunction(spec, max_queues=queues(spec),
                                         virtio_id=args.virtio_id, queue_size=args.queue_size,
                                         doorbell=peer,
                                         refuse_while_down=args.refuse_while_down))
    except DeviceError as exc:
        log.error("%s", exc)
        for f in functions:
            f.device.close()
        if companion is not None:
            companion.close()
        return EXIT_FAILURE

    async def run() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, _print_table, functions, "SIGUSR1")
        writer = (asyncio.create_task(_status_writer(functions, args.status_file))
                  if args.status_file is not None else None)

        def ready() -> None:
            for f in functions:
                log.info("%s: vhost-user %s, vfio-user %s, RAM %s (%#x bytes, BAR2 %#x)",
                         f.name, f.spec.vhost_socket, f.spec.vfio_socket,
                         f.device.ram.path, f.device.ram.size, f.device.bars[2].size)
            log.info("%s %d VVU device%s (pid %d)", READY_MESSAGE, len(functions),
                     "" if len(functions) == 1 else "s", os.getpid())

        try:
            await serve(functions, stop, ready=ready, companion=companion)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                args.status_file.unlink(missing_ok=True)
        log.info("stopped")
        return EXIT_OK

    code = EXIT_FAILURE
    try:
        code = asyncio.run(run())
    except (DeviceError, VhostUserError, OSError) as exc:
        log.error("%s", exc)
        for f in functions:
            f.device.close()
    except Exception:
        log.exception("unexpected error")
    _print_table(functions, "exit")
    return code


if __name__ == "__main__":
    sys.exit(main())
