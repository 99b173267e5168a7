# Type stub of the C extension _forward_c.c (see Switch.forward_chains).
from collections.abc import Callable
from typing import Any

def forward_burst(tx: object, port: object, hdr_size: int, limit: int, max_len: int,
                  fdb_table: dict[bytes, Any], ageing: float, clock: Callable[[], float],
                  send_csum: bool, send_gso: list[bool], /) -> tuple[Any, ...] | float | None: ...
