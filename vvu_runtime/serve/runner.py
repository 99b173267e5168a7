"""The shared runner of backend programs (``vvu-switch``, ``vvu-blk``).

A backend CLI parses its own options, builds one :class:`VhostUserDevice` per
vhost-user socket, and hands them to :func:`run`::

    from vvu_runtime.serve.runner import Endpoint, run

    def main() -> int:
        args = parse()
        endpoints = [Endpoint(PortDevice(sw, name), path) for name, path in args.ports]
        return run(endpoints, program="vvu-switch", log_level=args.log_level,
                   setup=lambda loop: sw.attach_uplink(loop))

``run(endpoints, *, program, log_level, setup, cleanup, ready) -> int``

* ``endpoints``: :class:`Endpoint` objects, or ``(device, socket_path)`` pairs
  (server mode). Inside an appliance an Endpoint with ``vvu=PCI_ADDRESS`` serves
  the device over that virtio-vhost-user function instead of a socket
  (``vvu_runtime.driver``). One device per socket; the device object lives as long as the
  process and sees ``reset()`` on every disconnect, so a reconnecting QEMU finds
  it ready again.
* ``program``: the name logs and messages start with.
* ``log_level``: a ``logging`` level name or number. Logs go to stderr as
  ``program: LEVEL logger: message``; every session line names its device
  (``device.name``, e.g. ``port vm1``) so a multi-port switch's log is readable.
* ``setup(loop)``: called inside the running event loop before the sockets
  listen (attach an uplink reader, start timers). An exception here ends the run
  with exit code 1 and a one-line message.
* ``cleanup()``: called after all sessions stopped and sockets are removed.
* ``ready()``: called once every socket listens (or every client connected once).

Behaviour: one asyncio event loop runs every session; SIGTERM and SIGINT stop
listening, end the sessions (each ring stopped, ``device.reset()``, memory
unmapped, fds closed), remove the listening socket files, and return 0. A socket
path that cannot be bound (bad directory, a live socket already there) returns 1
with a clear message, as does any unexpected error (logged with a traceback).
A stale socket file left by a dead process is replaced.

Exit codes: :data:`EXIT_OK` 0, :data:`EXIT_FAILURE` 1 (CLIs use 2 for usage errors,
as argparse does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vvu_runtime.console import EXIT_FAILURE, EXIT_OK, setup_logging
from vvu_runtime.driver.access import PciAccess
from vvu_runtime.vhost_user.device import VhostUserDevice
from vvu_runtime.vhost_user.errors import VhostUserError

if TYPE_CHECKING:
    from vvu_runtime.driver.endpoint import VvuEndpoint

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Endpoint:
    """One vhost-user socket and the device served on it.

    ``client=False`` (default): listen on ``socket_path`` (QEMU connects with
    ``-chardev socket,path=...,reconnect-ms=...``). ``client=True``: connect to a
    QEMU listening there (``-chardev socket,path=...,server=on``), retrying every
    ``retry_interval`` seconds, and again after each disconnect.

    ``vvu="0000:00:05.0"`` (no ``socket_path``): serve over the VVU PCI function at
    that address, reached the ``vvu_access`` way (:class:`PciAccess`).
    """

    device: VhostUserDevice
    socket_path: str | os.PathLike[str] = ""
    client: bool = False
    retry_interval: float = 1.0
    vvu: str | None = None
    vvu_access: PciAccess = PciAccess.AUTO

    def describe(self) -> str:
        if self.vvu is not None:
            return f"serving the VVU device {self.vvu} ({self.vvu_access})"
        mode = "connecting to" if self.client else "listening on"
        return f"{mode} {os.fspath(self.socket_path)}"


EndpointSpec = Endpoint | tuple[VhostUserDevice, "str | os.PathLike[str]"]


def _endpoint(spec: EndpointSpec) -> Endpoint:
    if isinstance(spec, Endpoint):
        return spec
    device, path = spec
    return Endpoint(device, path)


async def serve(endpoints: Sequence[EndpointSpec], stop: asyncio.Event, *,
                ready: Callable[[], None] | None = None) -> None:
    """Serve ``endpoints`` in the running loop until ``stop`` is set, then clean up.

    Raises :class:`VhostUserError` (or OSError) when a socket cannot be set up; what
    was already set up is closed first.
    """
    from vvu_runtime.vhost_user.server import VhostUserClient, VhostUserServer

    servers: list[VhostUserServer | VhostUserClient | VvuEndpoint] = []
    try:
        for spec in endpoints:
            ep = _endpoint(spec)
            if ep.vvu is not None:
                from vvu_runtime.driver.endpoint import VvuEndpoint

                vvu = VvuEndpoint(ep.device, ep.vvu, access=ep.vvu_access)
                vvu.start()  # TransportError naming the function if it cannot be used
                servers.append(vvu)
            elif ep.client:
                client = VhostUserClient(ep.socket_path, ep.device,
                                         retry_interval=ep.retry_interval)
                client.start()
                servers.append(client)
            else:
                server = VhostUserServer(ep.socket_path, ep.device)
                server.start()
                servers.append(server)
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        for s in servers:
            s.close()


def sd_notify(message: str) -> None:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``...) to ``$NOTIFY_SOCKET``, if set.

    The sd_notify protocol: one datagram on a UNIX socket (``@`` = abstract).
    Under systemd (``Type=notify``) or under the appliance's ``vvu-backend``.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %r: %s", message, exc)


def keep_watchdog(loop: asyncio.AbstractEventLoop) -> None:
    """Ping ``WATCHDOG=1`` from the event loop at half ``$WATCHDOG_USEC``: a wedged
    loop stops the pings and systemd (WatchdogSec=) restarts the backend."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return
    if usec <= 0 or pid != os.getpid():
        return
    interval = usec / 2e6

    def ping() -> None:
        sd_notify("WATCHDOG=1")
        loop.call_later(interval, ping)

    ping()


def run(endpoints: Sequence[EndpointSpec], *, program: str = "vvu",
        log_level: str | int = "INFO",
        setup: Callable[[asyncio.AbstractEventLoop], None] | None = None,
        cleanup: Callable[[], None] | None = None,
        ready: Callable[[], None] | None = None) -> int:
    """Run the backend until SIGTERM/SIGINT; returns the process exit code."""
    setup_logging(program, log_level)
    if not endpoints:
        log.error("no vhost-user sockets to serve")
        return EXIT_FAILURE

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if setup is not None:
                setup(loop)

            def announce() -> None:
                for spec in endpoints:
                    ep = _endpoint(spec)
                    log.info("%s: %s", ep.device.name, ep.describe())
                if ready is not None:
                    ready()
                # Every endpoint is up (a VVU one has BACKEND_UP set): tell systemd.
                sd_notify("READY=1")
                keep_watchdog(loop)

            await serve(endpoints, stop, ready=announce)
            sd_notify("STOPPING=1")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return EXIT_OK

    code = EXIT_FAILURE
    try:
        code = asyncio.run(main())
    except (VhostUserError, OSError) as exc:
        log.error("%s", exc)
    except Exception:
        log.exception("unexpected error")
    finally:
        if cleanup is not None:
            try:
                cleanup()
            except Exception:
                log.exception("cleanup failed")
    return code
