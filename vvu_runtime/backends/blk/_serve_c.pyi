# Type stub of the C extension _serve_c.c (see BlkDevice.serve and BlkDevice.process).
from vvu_runtime.vhost_user.transport import Register32
from vvu_runtime.vhost_user.vring import Vring
from vvu_runtime.virtio.inflight import SplitInflight
from vvu_runtime.virtio.queue import Virtqueue

def serve_fast(readable: list[memoryview], writable: list[memoryview], fd: int,
               capacity_bytes: int, write_ok: bool, bounce: memoryview = ..., align: int = ...,
               /) -> int: ...
def serve_burst(ring: Virtqueue, tracker: SplitInflight | None, vring: Vring,
                bell: Register32 | None, limit: int, budget: int, spin_us: float, turn_s: float,
                fd: int, capacity_bytes: int, write_ok: bool, bounce: memoryview = ...,
                align: int = ..., /) -> tuple[int, int]: ...
