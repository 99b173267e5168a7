"""A toy virtio device on the vfio-user server: virtio-rng (entropy source).

It exists to prove the lower half of the device model end to end before the VVU
device sits on it: with the default virtio device ID 4, a stock guest's
``virtio_rng`` drives it through the whole transport (feature negotiation, a
queue in DMA-mapped guest RAM, MSI-X completions) and ``/dev/hwrng`` reads
return our bytes. The device ID is configurable, so the same device also shows
how an unknown ID (the VVU situation) enumerates.

Run it by hand::

    python -m tests.support.entropy --socket /tmp/rng.sock
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

from vvu_runtime.device.errors import DeviceModelError
from vvu_runtime.device.pci import Bar, MappedBar
from vvu_runtime.device.vfio_user.protocol import SparseArea
from vvu_runtime.device.vfio_user.server import VfioUserServer
from vvu_runtime.device.virtio_pci import VirtioPciCapType, VirtioPciDevice, VirtioStructure

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4
#: Written at offset 0 of the optional shared-memory BAR, for the guest to find.
SHM_MARKER = b"VVU-SHARED-MEMORY-BAR2"
#: Every byte of the trapped hole page of the shared-memory BAR reads as this.
HOLE_BYTE = 0x5A


class EntropyDevice(VirtioPciDevice):
    """virtio-rng: one queue; every writable buffer the driver posts is filled.

    With ``shared_memory`` (bytes, a power of two >= 16 KiB) it also carries what
    the VVU device will: BAR2, a 64-bit prefetchable memfd BAR the client mmaps
    into the guest, described by a shared-memory capability (type 8, shmid 1),
    with a trapped page in the middle (sparse mmap: two areas around the hole).
    """

    def __init__(self, *, name: str = "entropy", virtio_device_id: int = VIRTIO_ID_RNG,
                 source: Callable[[int], bytes] = os.urandom, queue_size: int = 256,
                 shared_memory: int = 0) -> None:
        extra_bars: list[Bar] = []
        structures: list[VirtioStructure] = []
        if shared_memory:
            if shared_memory < 0x4000 or shared_memory & (shared_memory - 1):
                raise DeviceModelError(f"{name}: shared memory of {shared_memory:#x} bytes: "
                                       "use a power of two >= 16 KiB")
            fd = os.memfd_create(f"vvu-{name}-bar2", os.MFD_CLOEXEC)
            os.ftruncate(fd, shared_memory)
            os.pwrite(fd, SHM_MARKER, 0)
            self.hole = shared_memory // 2
            bar = MappedBar(2, shared_memory, fd, name="shared memory", areas=[
                SparseArea(0, self.hole),
                SparseArea(self.hole + 0x1000, shared_memory - self.hole - 0x1000)])
            bar.add_range("hole", self.hole, 0x1000, lambda o, n: bytes([HOLE_BYTE]) * n,
                          lambda o, d: None)
            extra_bars.append(bar)
            structures.append(VirtioStructure("shm", VirtioPciCapType.SHARED_MEMORY_CFG, 2, 0,
                                              shared_memory, cap_id=1,
                                              doc="shared memory (mmapped, hole trapped)"))
        super().__init__(name=name, virtio_device_id=virtio_device_id, num_queues=1,
                         queue_max_size=queue_size, extra_bars=extra_bars,
                         extra_structures=structures)
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
        prog="python -m tests.support.entropy",
        description="Serve a virtio-rng device to QEMU's vfio-user-pci client.")
    parser.add_argument("--socket", required=True, help="UNIX socket path to listen on")
    parser.add_argument("--device-id", type=int, default=VIRTIO_ID_RNG,
                        help="virtio device ID (default 4, virtio-rng; PCI ID 0x1040+ID)")
    parser.add_argument("--name", default="entropy", help="device name in logs")
    parser.add_argument("--shared-memory", type=lambda v: int(v, 0), default=0,
                        help="also expose BAR2: a memfd of this many bytes (power of two), "
                        "mmapped by QEMU, with a trapped page in the middle")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = EntropyDevice(name=args.name, virtio_device_id=args.device_id,
                           shared_memory=args.shared_memory)
    asyncio.run(serve(args.socket, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
