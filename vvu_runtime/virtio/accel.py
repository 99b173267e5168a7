"""Compiled accelerators of the data path, and the switch that turns them off.

An accelerated module keeps its pure-Python implementation as the reference:
the compiled one (a C extension built at install time when a compiler is
there, see ``./setup``) takes over only the hot methods, and only for inputs it
serves exactly as the reference does; everything else goes to the reference.
Which one runs is decided once per process:

* ``VVU_PURE_PYTHON=1`` (any value but empty or ``0``) forces pure Python
  everywhere: CI runs the unit tier once that way, and it is the first thing
  to try when a compiled path is suspected.
* otherwise the compiled module is used when it can be imported.

Accelerated today: ``split.SplitQueue`` (``_split_c.c``, ``split.CompiledSplitQueue``)
and the IN/OUT fast path of ``backends.blk.device.BlkDevice.serve`` (``_serve_c.c``).
"""

from __future__ import annotations

import os

__all__ = ["ENV_PURE_PYTHON", "pure_python_forced", "status"]

ENV_PURE_PYTHON = "VVU_PURE_PYTHON"


def pure_python_forced() -> bool:
    """Whether the environment asks for the pure-Python data path."""
    return os.environ.get(ENV_PURE_PYTHON, "") not in ("", "0")


def status() -> dict[str, str]:
    """Which implementation each accelerated part uses in this process (for logs and
    ``vvu-appliance-info``-style reports): ``compiled``, ``pure (forced)`` or
    ``pure (not built)``."""
    from vvu_runtime.virtio.split import compiled_split_queue

    if compiled_split_queue() is not None:
        split = "compiled"
    elif pure_python_forced():
        split = "pure (forced)"
    else:
        split = "pure (not built)"
    return {"split ring": split}
