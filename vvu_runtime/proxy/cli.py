"""``vvu-proxy``: stock vhost-user back-ends behind VVU functions (inside an appliance).

    vvu-proxy --link 0000:00:05.0=/run/vvu/disk0.sock [--link PCI=SOCKET ...]
              [--listen] [--exec PCI=COMMAND ... | --exec-all COMMAND]
              [--access auto|vfio|sysfs]

For each ``--link`` the proxy drives that VVU function and re-exports the
consumer's vhost-user session on SOCKET: by default the back-end listens there
and the proxy connects (qemu-storage-daemon ``--export vhost-user-blk,
addr.type=unix,addr.path=SOCKET``, virtiofsd ``--socket-path SOCKET``); with
``--listen`` the proxy listens and the back-end connects (DPDK ``client=1``).
``--exec PCI=COMMAND`` starts COMMAND (split like a shell would, no shell) as
that link's back-end and restarts it whenever it exits (virtiofsd exits when
its front-end goes). ``--exec-all COMMAND`` starts one back-end for every link
and restarts it whenever it exits (DPDK testpmd with a ``net_vhost`` port per
link, appliance/testpmd.py). Runs until SIGTERM/SIGINT; the links share one event loop
and not each other's faults. Exit codes: 0 clean stop, 1 runtime failure, 2
usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
from collections.abc import Sequence

from vvu_runtime.console import EXIT_OK, EXIT_USAGE, die, run_main, setup_logging
from vvu_runtime.driver.access import PciAccess
from vvu_runtime.driver.pci import normalize_address
from vvu_runtime.proxy.link import BackendMode, BackendProcess, ProxyLink
from vvu_runtime.serve.runner import keep_watchdog, sd_notify

log = logging.getLogger(__name__)

PROGRAM = "vvu-proxy"


def _pair(text: str) -> tuple[str, str]:
    address, sep, value = text.partition("=")
    if not sep or not address or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PCI_ADDRESS=VALUE")
    try:
        return normalize_address(address), value
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Re-export VVU functions as vhost-user sockets for unmodified back-ends.")
    parser.add_argument("--link", action="append", default=[], type=_pair,
                        metavar="PCI=SOCKET", required=True,
                        help="the VVU function at PCI and the back-end's socket (repeatable)")
    parser.add_argument("--listen", action="store_true",
                        help="listen on each SOCKET for the back-end to connect (default: "
                             "connect to a back-end listening there)")
    parser.add_argument("--exec", action="append", default=[], type=_pair,
                        metavar="PCI=COMMAND", dest="commands",
                        help="start COMMAND as that link's back-end and restart it on exit")
    parser.add_argument("--exec-all", metavar="COMMAND", dest="shared",
                        help="start COMMAND as the one back-end of every link (e.g. DPDK "
                             "testpmd with a port per link) and restart it on exit")
    parser.add_argument("--access", type=PciAccess, default=PciAccess.AUTO,
                        choices=list(PciAccess),
                        help="how the VVU functions are reached (default: auto)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    links = [a for a, _ in args.link]
    if len(set(links)) != len(links):
        die("a VVU function is given to --link twice", EXIT_USAGE)
    unknown = [a for a, _ in args.commands if a not in links]
    if unknown:
        die(f"--exec for {', '.join(unknown)}, which no --link names", EXIT_USAGE)
    if args.shared is not None and args.commands:
        die("--exec-all and --exec both name back-ends: give one back-end per link "
            "(--exec) or one for all (--exec-all)", EXIT_USAGE)
    if args.shared is not None and not shlex.split(args.shared):
        die("--exec-all: an empty command", EXIT_USAGE)
    return args


async def _until_armed(links: Sequence[ProxyLink]) -> None:
    for link in links:
        await link.armed.wait()
    log.info("every link is BACKEND_UP (its back-end connected): ready")
    sd_notify("READY=1")
    keep_watchdog(asyncio.get_running_loop())


async def serve(links: Sequence[ProxyLink], stop: asyncio.Event,
                shared: BackendProcess | None = None) -> None:
    """Start every link (then ``shared``, the back-end of them all, once each
    link listens or connects), run until ``stop``, close them all (``shared``
    first: it leaves while its connections are still up). systemd (or vvu-backend)
    hears READY=1 once every link was armed, i.e. had its back-end connected, as
    vvu-blk's READY=1 means every link is BACKEND_UP; then WATCHDOG=1 from the loop."""
    started: list[ProxyLink] = []
    ready: asyncio.Task[None] | None = None
    try:
        for link in links:
            link.start()
            started.append(link)
        if shared is not None:
            shared.start()
        ready = asyncio.get_running_loop().create_task(_until_armed(started))
        await stop.wait()
        sd_notify("STOPPING=1")
    finally:
        if ready is not None:
            ready.cancel()
        if shared is not None:
            shared.close()
        for link in started:
            link.close()


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        setup_logging(PROGRAM, args.log_level)
        commands = {a: shlex.split(c) for a, c in args.commands}
        mode = BackendMode.LISTEN if args.listen else BackendMode.CONNECT

        async def run() -> int:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            links = [ProxyLink(path, address, mode=mode, command=commands.get(address, ()),
                               access=args.access, loop=loop)
                     for address, path in args.link]
            shared = (None if args.shared is None else
                      BackendProcess(shlex.split(args.shared), loop, name="every link"))
            await serve(links, stop, shared)
            log.info("stopped")
            return EXIT_OK

        return asyncio.run(run())

    return run_main(body, program=PROGRAM)


__all__ = ["main", "parse_args", "serve"]
