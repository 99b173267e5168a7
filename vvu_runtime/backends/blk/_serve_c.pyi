# Type stub of the C extension _serve_c.c (see BlkDevice.serve and BlkDevice.process).
from collections.abc import Callable

from vvu_runtime.virtio.inflight import SplitInflight
from vvu_runtime.virtio.queue import Virtqueue

def serve_fast(readable: list[memoryview], writable: list[memoryview], fd: int,
               capacity_bytes: int, write_ok: bool, bounce: memoryview = ..., align: int = ...,
               /) -> int: ...
def serve_burst(ring: Virtqueue, tracker: SplitInflight | None, notify: Callable[[], None],
                limit: int, budget: int, spin_us: float, turn_s: float, fd: int,
                capacity_bytes: int, write_ok: bool, bounce: memoryview = ..., align: int = ...,
                /) -> tuple[int, int]: ...
