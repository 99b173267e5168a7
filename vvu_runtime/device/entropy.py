"""A toy virtio device on the vfio-user server: virtio-rng (entropy source).

It exists to prove the lower half of the device model end to end before the VVU
device sits on it: with the default virtio device ID 4, a stock guest's
``virtio_rng`` drives it through the whole transport (feature negotiation, a
queue in DMA-mapped guest RAM, MSI-X completions) and ``/dev/hwrng`` reads
return our bytes. The device ID is configurable, so the same device also shows
how an unknown ID (the VVU situation) enumerates.

Run it by hand::

    python -m vvu_runtime.device.entropy --socket /tmp/rng.sock
    qemu-system-x86_64 ... -device \
        '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/tmp/rng.sock"}}'
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.virtio_pci import VirtioPciDevice

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4


class EntropyDevice(VirtioPciDevice):
    """virtio-rng: one queue; every writable buffer the driver posts is filled."""

    def __init__(self, *, name: str = "entropy", virtio_device_id: int = VIRTIO_ID_RNG,
                 source: Callable[[int], bytes] = os.urandom, queue_size: int = 256) -> None:
        super().__init__(name=name, virtio_device_id=virtio_device_id, num_queues=1,
                         queue_max_size=queue_size)
        self._source = source
        #: Bytes handed out so far.
        self.served = 0

    def queue_notified(self, index: int) -> None:
        ring = self.queues[index].ring
        assert ring is not None
        while (chain := ring.pop()) is not None:
            written = chain.write(self._source(chain.writable_len))
            self.served += written
            ring.push(chain, written)
        if ring.should_notify():
            self.interrupt_queue(index)


async def serve(socket_path: str, device: VirtioPciDevice) -> None:
    """Serve ``device`` on ``socket_path`` until SIGTERM/SIGINT."""
    server = VfioUserServer(device, socket_path)
    server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.close)
    try:
        await server.serve_forever()
    finally:
        server.close()
        device.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vvu_runtime.device.entropy",
        description="Serve a virtio-rng device to QEMU's vfio-user-pci client.")
    parser.add_argument("--socket", required=True, help="UNIX socket path to listen on")
    parser.add_argument("--device-id", type=int, default=VIRTIO_ID_RNG,
                        help="virtio device ID (default 4, virtio-rng; PCI ID 0x1040+ID)")
    parser.add_argument("--name", default="entropy", help="device name in logs")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = EntropyDevice(name=args.name, virtio_device_id=args.device_id)
    asyncio.run(serve(args.socket, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
