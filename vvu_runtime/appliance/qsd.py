"""The ``engine: qsd`` command line: qemu-storage-daemon behind vvu-proxy, one per export.

    vvu-proxy --link ADDR=/run/vvu/NAME.qsd.sock \\
              --exec "ADDR=qemu-storage-daemon --blockdev driver=host_device,... \\
                      --blockdev driver=raw,... \\
                      --export type=vhost-user-blk,...,addr.path=/run/vvu/NAME.qsd.sock"

vvu-proxy drives the export's VVU function, starts qemu-storage-daemon (and
restarts it whenever it exits), connects to its socket and relays the
consumer's session to it (docs/vvu-proxy.md). What the export's settings become:

* ``readonly``: ``read-only=on`` on both nodes, ``writable=off`` on the export
  (the consumer sees VIRTIO_BLK_F_RO, writes fail);
* ``options.queues``: the export's ``num-queues`` (the most the consumer may use);
* ``options.direct``: **not** ``cache.direct=on``. The back-end's buffers are
  the consumer's RAM as the VVU function's BAR2 (``resource2``), a PFN mapping
  that the kernel cannot pin for O_DIRECT (EFAULT), and qemu-storage-daemon's
  file-posix driver has no fallback for that (vvu-blk bounces,
  backends/blk/image.py): tried in the storage appliance with
  ``cache.direct=on``, every consumer read and write failed with an I/O error.
  What ``direct`` is for (docs/architecture.md "Reliability": a write
  the consumer saw completed must not live only in the appliance's page cache,
  or an appliance restart under a running consumer loses it while the
  consumer's next flush succeeds) comes instead from the export's
  ``writethrough=on``: qemu-storage-daemon flushes the data disk after every
  write, before the completion (the data disk is the host's file, so the write
  is then in the host's hands, as with O_DIRECT; tests/acceptance/test_qsd_lab.py
  finds a completed, unflushed write in the host's image at once, which without
  write-through it is not). Without ``direct`` writes sit in the appliance's
  page cache until the consumer flushes, as with vvu-blk;
* the disk's serial: qemu-storage-daemon answers GET_ID with ``vhost_user_blk``
  for every export (hard-coded in QEMU 10.x's export); the consumer's disk
  carries that, not the export's name.

``disk`` exports are block devices (``driver=host_device``), ``file`` exports
files (``driver=file``); both are a ``raw`` node with ``discard=unmap``, so a
consumer's discard frees space as with vvu-blk.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vvu_runtime.appliance.config import Export

__all__ = ["PROGRAM", "proxy_argv", "qsd_argv", "socket_path"]

PROGRAM = "qemu-storage-daemon"


def socket_path(run_dir: Path, export: Export) -> Path:
    """Where the export's qemu-storage-daemon listens (and vvu-proxy connects)."""
    return run_dir / f"{export.name}.qsd.sock"


def _value(text: str | Path) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(text).replace(",", ",,")


def qsd_argv(export: Export, image: Path, socket: Path, *, queues: int,
             direct: bool) -> list[str]:
    """qemu-storage-daemon serving ``image`` as a vhost-user-blk export on ``socket``."""
    driver = "host_device" if export.disk is not None else "file"
    ro = ",read-only=on" if export.readonly else ""
    return [
        PROGRAM,
        "--blockdev", (f"driver={driver},node-name=file0,filename={_value(image)},"
                       f"cache.direct=off,aio=threads,discard=unmap{ro}"),
        "--blockdev", f"driver=raw,node-name=disk0,file=file0,discard=unmap{ro}",
        "--export", (f"type=vhost-user-blk,id={_value(export.name)},node-name=disk0,"
                     f"writable={'off' if export.readonly else 'on'},"
                     f"writethrough={'on' if direct else 'off'},num-queues={queues},"
                     f"addr.type=unix,addr.path={_value(socket)}"),
    ]


def proxy_argv(export: Export, address: str, image: Path, run_dir: Path, *, queues: int,
               direct: bool) -> list[str]:
    """vvu-proxy on the export's VVU function ``address``, supervising its
    qemu-storage-daemon."""
    sock = socket_path(run_dir, export)
    qsd = qsd_argv(export, image, sock, queues=queues, direct=direct)
    return ["vvu-proxy", "--link", f"{address}={sock}", "--exec", f"{address}={shlex.join(qsd)}"]
