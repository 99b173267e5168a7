"""``vvu-blk``: a vhost-user-blk target on a raw image.

    vvu-blk --socket /run/vvu/disk0.sock --image disk0.raw [--read-only]
            [--queues N] [--direct] [--serial ID] [--connect]
    vvu-blk --vvu 0000:00:05.0 --image disk0.raw [...]   (inside an appliance VM)
    vvu-blk --export /run/vvu/a.sock=a.raw --export /run/vvu/b.sock=b.raw [...]
    vvu-blk --print-capabilities

(``--socket-path``, ``--blk-file`` and ``--read-only-mode`` are accepted too, the
names vhost-user.rst's back-end program conventions use.)

Listens on ``--socket`` (QEMU: ``-chardev socket,id=c,path=SOCK,reconnect-ms=1000
-device vhost-user-blk-pci,chardev=c``); with ``--connect`` it connects to a
front-end listening there instead (``-chardev socket,...,server=on``). With
``--vvu`` it serves the consumer behind that virtio-vhost-user PCI function instead
(``--vvu-access``: vfio-pci behind a vIOMMU, or the sysfs poll-mode path). Runs
until SIGTERM/SIGINT, then removes the socket file. Exit codes: 0 clean stop,
1 runtime failure, 2 usage error (bad option, unusable image).

``--export SOCKET=IMAGE`` (repeated) serves several disks from one process, one
listening socket each, with the other options applying to every one; the
exports share the process but not each other's faults (docs/architecture.md,
"Reliability").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import ImageError, RawImage
from vvu_runtime.console import EXIT_USAGE, die, run_main
from vvu_runtime.driver.access import PciAccess
from vvu_runtime.virtio.blk import ID_BYTES

log = logging.getLogger(__name__)

PROGRAM = "vvu-blk"
#: QEMU's vhost-user-blk accepts at most this many queues (VIRTIO_QUEUE_MAX / 2 would
#: be more, but the virtio-blk config field and Linux's blk-mq make 256 plenty).
MAX_QUEUES = 256
#: QEMU's vhost-user-blk-pci asks for one queue per vCPU unless told otherwise, and
#: refuses a back-end offering fewer: offer enough for ordinary VMs by default.
#: Unused queues cost nothing.
DEFAULT_QUEUES = 16


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="vhost-user-blk target serving a raw disk image.",
    )
    parser.add_argument("--socket", "--socket-path", metavar="PATH",
                        help="vhost-user UNIX socket to listen on (or connect to with --connect)")
    parser.add_argument("--image", "--blk-file", metavar="FILE",
                        help="raw image file or block device")
    parser.add_argument("--export", action="append", default=[], metavar="SOCKET=IMAGE",
                        type=_export,
                        help="serve IMAGE on the socket SOCKET (repeatable: one process, "
                             "several disks; instead of --socket and --image)")
    parser.add_argument("--read-only", "--read-only-mode", action="store_true",
                        help="offer a read-only disk (VIRTIO_BLK_F_RO); writes fail with IOERR")
    parser.add_argument("--queues", type=int, default=DEFAULT_QUEUES, metavar="N",
                        help="most request queues offered (multiqueue); the front-end uses "
                             f"as many as it wants up to this; default {DEFAULT_QUEUES}")
    parser.add_argument("--direct", action="store_true",
                        help="open the image O_DIRECT (bypass the host page cache)")
    parser.add_argument("--serial", default="", metavar="ID",
                        help=f"disk serial returned by GET_ID (at most {ID_BYTES} bytes)")
    parser.add_argument("--poll-us", type=float, default=BlkDevice.poll_us, metavar="US",
                        help="after a busy batch, poll the ring this long before sleeping "
                             f"(0: never poll); default {BlkDevice.poll_us:g}")
    parser.add_argument("--busy-poll", type=float, default=BlkDevice.busy_poll_us,
                        metavar="US",
                        help="after serving requests, poll the ring this long with the "
                             "driver's kicks off: a next request within the window needs "
                             "no kick or wakeup (queue depth 1), for a CPU spinning that "
                             "long; default 0: never")
    parser.add_argument("--connect", action="store_true",
                        help="connect to a front-end listening on --socket instead of listening")
    parser.add_argument("--vvu", metavar="PCI_ADDRESS",
                        help="serve over this virtio-vhost-user PCI function (inside an "
                        "appliance VM) instead of a socket")
    parser.add_argument("--vvu-access", choices=[a.value for a in PciAccess],
                        default=PciAccess.AUTO.value,
                        help="how to reach the --vvu function: vfio-pci (needs a vIOMMU), "
                        "sysfs (poll mode), or auto (vfio when it has an IOMMU group)")
    parser.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR; default INFO")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the vhost-user back-end capabilities (JSON) and exit")
    args = parser.parse_args(argv)
    if args.print_capabilities:
        return args
    if args.export:
        if args.socket is not None or args.image is not None or args.vvu is not None:
            parser.error("--export replaces --socket, --image and --vvu")
        if args.connect:
            parser.error("--connect goes with --socket, not --export")
        sockets = [sock for sock, _ in args.export]
        if len(set(sockets)) != len(sockets):
            parser.error("two --export options name the same socket")
    elif args.socket is not None and args.vvu is not None:
        parser.error("give --socket or --vvu, not both")
    if args.vvu is not None and args.connect:
        parser.error("--connect goes with --socket, not --vvu")
    for name in ("socket", "image"):
        if getattr(args, name) is None and not args.export and not (
                name == "socket" and args.vvu is not None):
            parser.error(f"--{name} is required")
    if not 1 <= args.queues <= MAX_QUEUES:
        parser.error(f"--queues must be between 1 and {MAX_QUEUES}")
    if args.poll_us < 0:
        parser.error("--poll-us cannot be negative")
    if not 0 <= args.busy_poll <= 1_000_000:
        parser.error("--busy-poll must be between 0 and 1000000 microseconds")
    if len(args.serial.encode()) > ID_BYTES:
        parser.error(f"--serial is at most {ID_BYTES} bytes")
    return args


def _export(text: str) -> tuple[str, str]:
    sock, sep, image = text.partition("=")
    if not sep or not sock or not image:
        raise argparse.ArgumentTypeError(f"{text!r} is not SOCKET=IMAGE")
    return sock, image


#: ``--print-capabilities`` answer, per vhost-user.rst "Backend program conventions"
#: (vhost-user.json): a block back-end taking --blk-file and --read-only-mode.
CAPABILITIES = {"type": "block", "features": ["blk-file", "read-only"]}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _serve(args), program=PROGRAM)


def _serve(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    # Imported here so that --help works even while the session layer is incomplete.
    from vvu_runtime.serve.runner import Endpoint, run

    exports: list[tuple[str, str]] = args.export or [(args.socket, args.image)]
    images: list[RawImage] = []
    try:
        endpoints: list[Endpoint] = []
        devices: list[BlkDevice] = []
        for sock, path in exports:
            try:
                image = RawImage(path, read_only=args.read_only, direct=args.direct)
            except ImageError as exc:
                die(str(exc), EXIT_USAGE)
            images.append(image)
            where = args.vvu if args.vvu is not None else os.path.basename(sock)
            device = BlkDevice(image, queues=args.queues, serial=args.serial,
                               name=f"disk {os.path.basename(path)} @ {where}")
            device.poll_us = args.poll_us
            device.busy_poll_us = args.busy_poll
            devices.append(device)
            endpoints.append(
                Endpoint(device, vvu=args.vvu, vvu_access=PciAccess(args.vvu_access))
                if args.vvu is not None else Endpoint(device, sock, client=args.connect))

        def announce() -> None:
            mode = "read-only" if args.read_only else "read-write"
            cache = ", O_DIRECT" if args.direct else ""
            poll = f", busy poll {args.busy_poll:g} us" if args.busy_poll else ""
            for dev in devices:
                log.info("%s: %s, %d sectors of 512 bytes, blk_size %d, %d queue(s), %s%s%s",
                         dev.name, dev.image.path, dev.capacity, dev.blk_size, args.queues,
                         mode, cache, poll)

        return run(endpoints, program=PROGRAM, log_level=args.log_level, ready=announce)
    finally:
        for image in images:
            image.close()

if __name__ == "__main__":
    sys.exit(main())
