# Type stub of the C extension _serve_c.c (see BlkDevice.serve).

def serve_fast(readable: list[memoryview], writable: list[memoryview], fd: int,
               capacity_bytes: int, write_ok: bool, bounce: memoryview = ..., align: int = ...,
               /) -> int: ...
