"""``vvu-switch``: an L2 learning switch over vhost-user-net sockets.

    vvu-switch --port vm1=/run/vvu/vm1.sock --port vm2=/run/vvu/vm2.sock \\
               [--uplink tap0] [--queues 2] [--status-file /run/vvu/switch.status]
    vvu-switch --vvu vm1=0000:00:05.0 --vvu vm2=0000:00:06.0 [...]   (in an appliance VM)

Each ``--port NAME=SOCKET`` listens on SOCKET for one vhost-user-net front-end
(QEMU ``-chardev socket,id=c,path=SOCKET,reconnect-ms=1000 -netdev
vhost-user,id=n,chardev=c``); a front-end may disconnect and come back without
restarting the switch. Each ``--vvu NAME=PCI_ADDRESS`` is a port whose front-end
sits behind that virtio-vhost-user function (inside an appliance VM;
``--vvu-access`` picks vfio-pci or the sysfs poll mode); both kinds mix.
``--uplink`` attaches a TAP interface (it must exist or be creatable, and be
brought up by the operator). Each ``--tunnel NAME=ADDRESS[,port=P],vni=V`` is a
VXLAN port to the switch at ADDRESS (``backends/switch/vxlan.py``), all of them
on one UDP socket bound to ``--tunnel-bind``:``--tunnel-port``; frames longer
than ``--underlay-mtu`` allows are dropped and counted, never fragmented.

Counters: ``kill -USR1 <pid>`` logs the per-port table; ``--stats-interval``
logs it periodically; ``--status-file`` keeps it in a file (JSON if the name
ends in ``.json``, else the same text table), rewritten every second.
SIGTERM or SIGINT stop the switch and remove the sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vvu_runtime.backends.switch.fdb import (
    DEFAULT_AGEING_TIME,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_PER_PORT,
)
from vvu_runtime.backends.switch.port import SwitchPort
from vvu_runtime.backends.switch.switch import Switch
from vvu_runtime.backends.switch.uplink import TapUplink
from vvu_runtime.backends.switch.vxlan import (
    DEFAULT_MTU,
    MIN_MTU,
    VXLAN_PORT,
    TunnelEndpoint,
    TunnelSpec,
    VxlanTunnel,
)
from vvu_runtime.console import run_main
from vvu_runtime.driver.access import PciAccess
from vvu_runtime.serve.runner import Endpoint, run

log = logging.getLogger("vvu_runtime.backends.switch")

PROGRAM = "vvu-switch"
STATUS_FILE_PERIOD = 1.0


@dataclass(frozen=True)
class PortSpec:
    name: str
    socket: str
    #: PCI address of the port's VVU function (then ``socket`` is empty).
    vvu: str | None = None


def _port_spec(text: str) -> PortSpec:
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SOCKET")
    if any(c.isspace() for c in name) or len(name) > 32:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a port name is up to 32 characters without spaces")
    return PortSpec(name, path)


def _vvu_spec(text: str) -> PortSpec:
    spec = _port_spec(text)
    return PortSpec(spec.name, "", vvu=spec.socket.strip())


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return parse


def _tunnel_spec(text: str) -> TunnelSpec:
    try:
        return TunnelSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="L2 learning switch whose ports are vhost-user-net front-ends "
                    "(on UNIX sockets, or behind VVU functions in an appliance).",
        epilog="kill -USR1 logs the per-port counters; SIGTERM stops and removes the sockets.")
    p.add_argument("--port", metavar="NAME=SOCKET", action="append", type=_port_spec,
                   default=[], help="a switch port listening on SOCKET (repeat for more)")
    p.add_argument("--vvu", metavar="NAME=PCI_ADDRESS", action="append", type=_vvu_spec,
                   default=[], help="a switch port behind a virtio-vhost-user PCI function "
                   "(inside an appliance VM; repeat for more)")
    p.add_argument("--vvu-access", choices=[a.value for a in PciAccess],
                        default=PciAccess.AUTO.value,
                   help="how to reach --vvu functions: vfio-pci (needs a vIOMMU), sysfs "
                   "(poll mode), or auto (vfio when the function has an IOMMU group)")
    p.add_argument("--uplink", metavar="TAPNAME",
                   help="attach a TAP interface as an extra port (needs CAP_NET_ADMIN)")
    p.add_argument("--tunnel", metavar="NAME=ADDRESS[,port=P],vni=V", action="append",
                   type=_tunnel_spec, default=[],
                   help="a VXLAN tunnel port to the switch at ADDRESS (repeat for more)")
    p.add_argument("--tunnel-bind", metavar="ADDRESS", default="0.0.0.0",
                   help="the local address of the tunnels' UDP socket (default 0.0.0.0)")
    p.add_argument("--tunnel-port", metavar="PORT", type=_positive(int), default=VXLAN_PORT,
                   help=f"the tunnels' local UDP port (default {VXLAN_PORT})")
    p.add_argument("--underlay-mtu", metavar="BYTES", type=_positive(int), default=DEFAULT_MTU,
                   help=f"MTU of the network the tunnels cross (default {DEFAULT_MTU}); "
                        "frames longer than it minus 36 bytes are dropped")
    p.add_argument("--queues", metavar="N", type=_positive(int), default=1,
                   help="queue pairs offered on every port (default 1)")
    p.add_argument("--queue-size", metavar="N", type=_positive(int), default=1024,
                   help="largest ring size accepted (default 1024)")
    p.add_argument("--ageing-time", metavar="SECONDS", type=_positive(float),
                   default=DEFAULT_AGEING_TIME,
                   help=f"forget a MAC address not seen for this long "
                        f"(default {DEFAULT_AGEING_TIME:g})")
    p.add_argument("--fdb-max", metavar="N", type=_positive(int), default=DEFAULT_MAX_ENTRIES,
                   help=f"most addresses learned in total (default {DEFAULT_MAX_ENTRIES})")
    p.add_argument("--fdb-max-per-port", metavar="N", type=_positive(int),
                   default=DEFAULT_MAX_PER_PORT,
                   help=f"most addresses learned per port (default {DEFAULT_MAX_PER_PORT})")
    p.add_argument("--busy-poll", metavar="USEC", type=_non_negative, default=0.0,
                   help="keep polling a port's transmit ring this long after it ran dry, "
                        "with the guest's kicks off (more throughput, more CPU; default 0)")
    p.add_argument("--no-offloads", action="store_true",
                   help="offer no checksum or segmentation offloads to the front-ends")
    p.add_argument("--stats-interval", metavar="SECONDS", type=_non_negative, default=0.0,
                   help="log the counter table this often (default 0: only on SIGUSR1)")
    p.add_argument("--status-file", metavar="PATH",
                   help="keep the counter table in PATH (JSON if it ends in .json)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user back-end capabilities as JSON and exit")
    return p


class StatusReporter:
    """Logs the counter table and keeps the status file current."""

    def __init__(self, switch: Switch, status_file: str | None) -> None:
        self.switch = switch
        self.status_file = status_file

    def log_table(self) -> None:
        log.info("port counters (in = received from the port, out = sent to it):\n%s",
                 self.switch.status_table())

    def report(self) -> None:
        """SIGUSR1: the status file and the table in the log, now."""
        self.write()
        self.log_table()

    def write(self) -> None:
        path = self.status_file
        if path is None:
            return
        if path.endswith(".json"):
            text = json.dumps(self.switch.status_dict(), indent=1) + "\n"
        else:
            text = self.switch.status_table() + "\n"
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", path, exc)
            self.status_file = None  # say it once, not every second


def _every(loop: asyncio.AbstractEventLoop, period: float,
           action: Callable[[], object]) -> None:
    """Call ``action()`` every ``period`` seconds; an error is logged, not fatal."""
    def tick() -> None:
        try:
            action()
        except Exception:
            log.exception("periodic task failed")
        loop.call_later(period, tick)
    loop.call_later(period, tick)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    specs: list[PortSpec] = args.port + args.vvu
    if not specs:
        parser.error("give at least one --port NAME=SOCKET or --vvu NAME=PCI_ADDRESS")
    names = ([spec.name for spec in specs] + ([args.uplink] if args.uplink else [])
             + [t.name for t in args.tunnel])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        parser.error(f"port name(s) used twice: {', '.join(dupes)}")
    sockets = [os.path.abspath(spec.socket) for spec in args.port]
    if len(set(sockets)) != len(sockets):
        parser.error("two ports on the same socket path")
    functions = [spec.vvu for spec in args.vvu]
    if len(set(functions)) != len(functions):
        parser.error("two ports on the same VVU function")
    if args.queues > 0x8000:
        parser.error("--queues: at most 32768 queue pairs")
    if not MIN_MTU <= args.underlay_mtu <= 65535:
        parser.error(f"--underlay-mtu: {MIN_MTU}..65535")
    if args.tunnel_port > 65535:
        parser.error("--tunnel-port: at most 65535")

    switch = Switch(ageing_time=args.ageing_time, max_fdb_entries=args.fdb_max,
                    max_fdb_per_port=args.fdb_max_per_port)
    ports = [SwitchPort(switch, spec.name, queue_pairs=args.queues,
                        offloads=not args.no_offloads, queue_size=args.queue_size,
                        busy_poll=args.busy_poll / 1e6)
             for spec in specs]
    endpoint: TunnelEndpoint | None = None
    try:
        uplink = TapUplink(switch, args.uplink) if args.uplink else None
        if args.tunnel:
            endpoint = TunnelEndpoint(switch, args.tunnel_bind, args.tunnel_port,
                                      args.underlay_mtu)
            for t in args.tunnel:
                VxlanTunnel(endpoint, t.name, t.remote, t.vni, t.port)
    except ValueError as exc:
        parser.error(str(exc))
    reporter = StatusReporter(switch, args.status_file)

    def setup(loop: asyncio.AbstractEventLoop) -> None:
        if uplink is not None:
            uplink.attach(loop)
        if endpoint is not None:
            endpoint.attach(loop)
        loop.add_signal_handler(signal.SIGUSR1, reporter.report)
        _every(loop, min(args.ageing_time / 2, 30.0), switch.age)
        if args.stats_interval:
            _every(loop, args.stats_interval, reporter.log_table)
        if args.status_file:
            reporter.write()
            _every(loop, STATUS_FILE_PERIOD, reporter.write)

    def cleanup() -> None:
        if uplink is not None:
            uplink.close()
        if endpoint is not None:
            endpoint.close()
        reporter.write()
        reporter.log_table()

    endpoints = [Endpoint(port, vvu=spec.vvu, vvu_access=PciAccess(args.vvu_access)) if spec.vvu
                 else Endpoint(port, spec.socket)
                 for port, spec in zip(ports, specs, strict=True)]
    return run_main(lambda: run(endpoints, program=PROGRAM, log_level=args.log_level,
                                setup=setup, cleanup=cleanup), program=PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
