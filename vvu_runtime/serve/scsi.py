"""``vvu-scsi``: a vhost-user-scsi target, one controller with several LUNs.

    vvu-scsi --socket /run/vvu/scsi0.sock --lun disk0.raw --lun 1=disk1.raw,ro
             [--queues N] [--direct] [--connect]
    vvu-scsi --socket /run/vvu/scsi0.sock --config luns.json
    vvu-scsi --vvu 0000:00:05.0 --lun disk0.raw [...]     (inside an appliance VM)
    vvu-scsi --print-capabilities

``--lun [N=]IMAGE[,ro][,serial=S]`` (repeatable) attaches a raw image file or
block device as LUN N of target 0 (default: the next free number), read-only
with ``ro``. ``--config FILE`` takes the LUN set from a JSON file instead::

    {"luns": [{"lun": 0, "image": "disk0.raw"},
              {"lun": 1, "image": "disk1.raw", "read_only": true, "serial": "D1"}]}

and SIGHUP re-reads it: LUNs that appeared are attached and LUNs that went away
(or changed image, mode or serial) detached, each announced to the guest on the
event queue (TRANSPORT_RESET, RESCAN / REMOVED), no reboot needed.

QEMU: ``-chardev socket,id=c,path=SOCK -device vhost-user-scsi-pci,chardev=c``
(``num_queues=`` at most ``--queues``). Runs until SIGTERM/SIGINT. Exit codes:
0 clean stop, 1 runtime failure, 2 usage error (bad option, unusable image).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from vvu_runtime.backends.blk.image import ImageError
from vvu_runtime.backends.scsi.device import ScsiDevice
from vvu_runtime.backends.scsi.lun import Lun, LunSpec
from vvu_runtime.console import EXIT_USAGE, die, run_main
from vvu_runtime.driver.access import PciAccess
from vvu_runtime.virtio.scsi import MAX_LUN

log = logging.getLogger(__name__)

PROGRAM = "vvu-scsi"
MAX_QUEUES = 254  # VIRTIO_QUEUE_MAX (1024) is not the limit; Linux's blk-mq makes this plenty
#: QEMU's vhost-user-scsi-pci asks for one request queue per vCPU unless told
#: otherwise and refuses a back-end offering fewer: offer enough by default.
DEFAULT_QUEUES = 16


class ConfigError(Exception):
    """The LUN configuration is unusable (the message names the file and the fault)."""


def parse_lun(text: str, number: int) -> LunSpec:
    """``[N=]IMAGE[,ro][,serial=S]``; ``number`` when N is not given."""
    head, *opts = text.split(",")
    if "=" in head:
        num, _, path = head.partition("=")
        try:
            number = int(num)
        except ValueError:
            raise ValueError(f"--lun {text!r}: LUN number {num!r} is not an integer") from None
    else:
        path = head
    if not path:
        raise ValueError(f"--lun {text!r} names no image")
    read_only, serial = False, ""
    for opt in opts:
        if opt == "ro":
            read_only = True
        elif opt.startswith("serial="):
            serial = opt.partition("=")[2]
        else:
            raise ValueError(f"--lun {text!r}: unknown option {opt!r} (ro, serial=S)")
    if not 0 <= number <= MAX_LUN:
        raise ValueError(f"--lun {text!r}: LUN number {number} is not between 0 and {MAX_LUN}")
    return LunSpec(number, path, read_only, serial)


def load_config(path: str) -> list[LunSpec]:
    """The LUN set of a JSON config file; raises ConfigError naming the fault."""
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("luns"), list):
        raise ConfigError(f"{path}: needs an object with a list 'luns'")
    specs: list[LunSpec] = []
    for i, item in enumerate(data["luns"]):
        where = f"{path}: luns[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} is not an object")
        unknown = set(item) - {"lun", "image", "read_only", "serial"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        number, image = item.get("lun", i), item.get("image")
        if not isinstance(number, int) or isinstance(number, bool) or \
                not 0 <= number <= MAX_LUN:
            raise ConfigError(f"{where}: 'lun' must be an integer 0..{MAX_LUN}")
        if not isinstance(image, str) or not image:
            raise ConfigError(f"{where}: 'image' must be a path")
        read_only, serial = item.get("read_only", False), item.get("serial", "")
        if not isinstance(read_only, bool) or not isinstance(serial, str):
            raise ConfigError(f"{where}: 'read_only' is a boolean, 'serial' a string")
        if not os.path.isabs(image):
            image = os.path.join(os.path.dirname(os.path.abspath(path)), image)
        specs.append(LunSpec(number, image, read_only, serial))
    _check_unique(specs, path)
    return specs


def _check_unique(specs: Sequence[LunSpec], where: str) -> None:
    seen: set[int] = set()
    for spec in specs:
        if spec.lun in seen:
            raise ConfigError(f"{where}: LUN {spec.lun} is given twice")
        seen.add(spec.lun)


def apply_luns(device: ScsiDevice, specs: Sequence[LunSpec], *, direct: bool = False
               ) -> tuple[list[int], list[int]]:
    """Make the device's LUN set ``specs``: (LUNs removed, LUNs added).

    A LUN whose image cannot be opened is logged and left out; the rest still apply.
    """
    wanted = {s.lun: s for s in specs}
    removed: list[int] = []
    added: list[int] = []
    for number, lun in sorted(device.luns.items()):
        spec = wanted.get(number)
        if spec is None or spec.key() != lun.spec.key():
            device.remove_lun(number).close()
            removed.append(number)
    for number, spec in sorted(wanted.items()):
        if number in device.luns:
            continue
        try:
            lun = Lun(spec, direct=direct)
        except ImageError as exc:
            log.error("%s: LUN %d not attached: %s", device.name, number, exc)
            continue
        device.add_lun(lun)
        added.append(number)
    return removed, added


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="vhost-user-scsi target: one controller, LUNs on raw images.")
    parser.add_argument("--socket", "--socket-path", metavar="PATH",
                        help="vhost-user UNIX socket to listen on (or connect to with --connect)")
    parser.add_argument("--lun", action="append", default=[], metavar="[N=]IMAGE[,ro]",
                        help="attach IMAGE (raw file or block device) as LUN N, read-only "
                             "with ',ro', serial with ',serial=S' (repeatable)")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON file with the LUN set (instead of --lun); SIGHUP re-reads it")
    parser.add_argument("--queues", type=int, default=DEFAULT_QUEUES, metavar="N",
                        help=f"most request queues offered; default {DEFAULT_QUEUES}")
    parser.add_argument("--direct", action="store_true",
                        help="open the images O_DIRECT (bypass the host page cache)")
    parser.add_argument("--connect", action="store_true",
                        help="connect to a front-end listening on --socket instead of listening")
    parser.add_argument("--vvu", metavar="PCI_ADDRESS",
                        help="serve over this virtio-vhost-user PCI function (inside an "
                             "appliance VM) instead of a socket")
    parser.add_argument("--vvu-access", choices=[a.value for a in PciAccess],
                        default=PciAccess.AUTO.value,
                        help="how to reach the --vvu function: vfio, sysfs or auto")
    parser.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR; default INFO")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the vhost-user back-end capabilities (JSON) and exit")
    args = parser.parse_args(argv)
    if args.print_capabilities:
        return args
    if (args.socket is None) == (args.vvu is None):
        parser.error("give --socket or --vvu (one of them)")
    if args.vvu is not None and args.connect:
        parser.error("--connect goes with --socket, not --vvu")
    if args.lun and args.config:
        parser.error("give --lun or --config, not both")
    if not args.lun and not args.config:
        parser.error("no LUNs: give --lun IMAGE (repeatable) or --config FILE")
    if not 1 <= args.queues <= MAX_QUEUES:
        parser.error(f"--queues must be between 1 and {MAX_QUEUES}")
    specs: list[LunSpec] = []
    for text in args.lun:
        nxt = max((s.lun for s in specs), default=-1) + 1
        try:
            specs.append(parse_lun(text, nxt))
        except ValueError as exc:
            parser.error(str(exc))
    try:
        _check_unique(specs, "--lun")
    except ConfigError as exc:
        parser.error(str(exc))
    args.specs = specs
    return args


#: ``--print-capabilities`` answer (vhost-user.rst "Backend program conventions").
CAPABILITIES = {"type": "scsi"}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _serve(args), program=PROGRAM)


def _serve(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    from vvu_runtime.serve.runner import Endpoint, run

    specs: list[LunSpec] = args.specs
    if args.config:
        try:
            specs = load_config(args.config)
        except ConfigError as exc:
            die(str(exc), EXIT_USAGE)
    where = args.vvu if args.vvu is not None else os.path.basename(args.socket)
    device = ScsiDevice(queues=args.queues, name=f"scsi @ {where}")
    try:
        for spec in specs:
            try:
                device.luns[spec.lun] = Lun(spec, direct=args.direct)
            except ImageError as exc:
                die(str(exc), EXIT_USAGE)
        endpoint = (Endpoint(device, vvu=args.vvu, vvu_access=PciAccess(args.vvu_access))
                    if args.vvu is not None else Endpoint(device, args.socket,
                                                          client=args.connect))

        def reload() -> None:
            if not args.config:
                log.warning("SIGHUP: no --config file to re-read; LUN set unchanged")
                return
            try:
                new = load_config(args.config)
            except ConfigError as exc:
                log.error("SIGHUP: %s; LUN set unchanged", exc)
                return
            removed, added = apply_luns(device, new, direct=args.direct)
            log.info("SIGHUP: LUNs removed %s, added %s", removed or "none", added or "none")

        def setup(loop: asyncio.AbstractEventLoop) -> None:
            loop.add_signal_handler(signal.SIGHUP, reload)

        def announce() -> None:
            for lun in sorted(device.luns.values(), key=lambda x: x.number):
                log.info("%s: %s: %s, %d blocks of 512 bytes, %s, serial %s", device.name,
                         lun.name, lun.spec.path, lun.blocks,
                         "read-only" if lun.read_only else "read-write", lun.serial)

        return run([endpoint], program=PROGRAM, log_level=args.log_level, setup=setup,
                   ready=announce)
    finally:
        device.close()


if __name__ == "__main__":
    sys.exit(main())
