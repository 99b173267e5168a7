"""A logical unit: a raw image (file or block device) with SCSI's view of it.

The image access itself (preadv/pwritev straight into guest memory, fdatasync,
hole punching) is the blk backend's :class:`RawImage`; a LUN adds what SCSI
names: logical block size and count, write protection, and identity (a serial
number and a NAA designator) that stays the same across restarts for the
same image, so guests' /dev/disk/by-id links survive.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vvu_runtime.backends.blk.image import ImageError, RawImage

BLOCK_SIZE = 512
BLOCK_SHIFT = 9
#: Logical blocks per physical block, as a power of two: 4 KiB "physical" blocks,
#: which is what page-cache-backed images really have (guests then align to 4 KiB).
PHYSICAL_EXPONENT = 3
#: INQUIRY's unit serial number is ASCII; we keep it short enough for every reader.
SERIAL_MAX = 32


@dataclass(frozen=True, slots=True)
class LunSpec:
    """What the configuration asks for one LUN."""

    lun: int
    path: str
    read_only: bool = False
    serial: str = ""

    def key(self) -> tuple[str, bool, str]:
        """What makes two specs the same LUN (a change means remove and re-add)."""
        return (os.path.realpath(self.path), self.read_only, self.serial)


def _default_serial(path: str) -> str:
    """A stable serial from the image's real path (same image: same identity)."""
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()
    return "vvu" + digest[:17]


class Lun:
    """One LUN of the target, open on its image."""

    def __init__(self, spec: LunSpec, *, direct: bool = False) -> None:
        if not 0 <= spec.lun <= 0x3FFF:
            raise ImageError(f"LUN number {spec.lun} is not between 0 and 16383")
        serial = spec.serial or _default_serial(spec.path)
        if not serial.isascii() or not serial.isprintable() or len(serial) > SERIAL_MAX:
            raise ImageError(f"LUN {spec.lun}: serial {serial!r} must be printable ASCII, "
                             f"at most {SERIAL_MAX} characters")
        self.spec = spec
        self.number = spec.lun
        self.image = RawImage(spec.path, read_only=spec.read_only, direct=direct)
        self.read_only = spec.read_only
        self.serial = serial
        self.blocks = self.image.size // BLOCK_SIZE
        if self.blocks == 0:
            self.image.close()
            raise ImageError(f"LUN {spec.lun}: image {spec.path} is smaller than one "
                             f"{BLOCK_SIZE}-byte block")
        # NAA 3 (locally assigned), 60 bits from the serial: unique per image.
        naa = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:8], "big")
        self.naa = ((0x3 << 60) | (naa & ((1 << 60) - 1))).to_bytes(8, "big")
        self.fd = self.image.fd

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<Lun {self.number} {self.spec.path} {self.blocks} blocks {mode}>"

    @property
    def name(self) -> str:
        return f"LUN {self.number} ({os.path.basename(self.spec.path)})"

    def read(self, buffers: Sequence[memoryview], lba: int) -> None:
        self.image.readv(buffers, lba << BLOCK_SHIFT)

    def write(self, buffers: Sequence[memoryview], lba: int, *, fua: bool = False) -> None:
        self.image.writev(buffers, lba << BLOCK_SHIFT, dsync=fua)

    def sync(self) -> None:
        self.image.flush()

    def unmap(self, lba: int, blocks: int) -> None:
        """Deallocate: punch a hole (PUNCH_HOLE | KEEP_SIZE); reads give zeroes after."""
        self.image.write_zeroes(lba << BLOCK_SHIFT, blocks << BLOCK_SHIFT, unmap=True)

    def write_zeroes(self, lba: int, blocks: int) -> None:
        self.image.write_zeroes(lba << BLOCK_SHIFT, blocks << BLOCK_SHIFT, unmap=False)

    def write_pattern(self, block: bytes, lba: int, blocks: int) -> None:
        """WRITE SAME with a non-zero block: the block repeated, 1 MiB at a time."""
        per_chunk = max(1, (1 << 20) // BLOCK_SIZE)
        chunk = memoryview(block * min(per_chunk, blocks))
        done = 0
        while done < blocks:
            take = min(per_chunk, blocks - done)
            self.image.writev([chunk[:take * BLOCK_SIZE]], (lba + done) << BLOCK_SHIFT)
            done += take

    def close(self) -> None:
        self.image.close()
