"""Compiled accelerators of the data path, and the switch that turns them off.

An accelerated module keeps its pure-Python implementation as the reference:
the compiled one (a C extension built at install time when a compiler is
there, see ``./setup``) takes over only the hot methods, and only for inputs it
serves exactly as the reference does; everything else goes to the reference.
Which one runs is decided once per process:

* ``VVU_PURE_PYTHON=1`` (any value but empty or ``0``) forces pure Python
  everywhere: CI runs the unit tier once that way, and it is the first thing
  to try when a compiled path is suspected.
* otherwise the compiled module is used when it can be imported and is not
  older than its C sources (:func:`current`): an extension left from before a
  ``git pull`` would run the new Python against the old C, so it is set aside,
  with a warning that says to run ``./setup``.

Accelerated today: ``split.SplitQueue`` (``_split_c.c``, ``split.CompiledSplitQueue``),
the IN/OUT fast path of ``backends.blk.device.BlkDevice.serve`` (``_serve_c.c``) and
the bursts of ``backends.switch.switch.Switch.forward_chains`` (``_forward_c.c``,
which walks the compiled rings through ``_split_core.h`` and ``_split_c``'s capsule).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

__all__ = ["ENV_PURE_PYTHON", "build", "current", "pure_python_forced", "status"]

log = logging.getLogger(__name__)

#: vvu_runtime/, where the C sources sit next to the modules built from them.
PACKAGE = Path(__file__).resolve().parents[1]

ENV_PURE_PYTHON = "VVU_PURE_PYTHON"


def pure_python_forced() -> bool:
    """Whether the environment asks for the pure-Python data path."""
    return os.environ.get(ENV_PURE_PYTHON, "") not in ("", "0")


def current(module: ModuleType, *sources: str) -> bool:
    """Whether compiled ``module`` is at least as new as each of its ``sources``
    (paths under vvu_runtime/). A source that is not there (an install without
    them) does not count against it. When one is newer, the module was built
    from other code than the Python beside it: log why and return False, so the
    caller keeps the pure-Python path."""
    built = Path(module.__file__ or "")
    try:
        built_at = built.stat().st_mtime
    except OSError:
        return True  # not a file (a frozen or test module): nothing to compare
    for source in sources:
        try:
            changed_at = (PACKAGE / source).stat().st_mtime
        except OSError:
            continue
        if changed_at > built_at:
            log.warning("%s is older than %s: it was built from other sources, so the "
                        "pure-Python path runs instead; run ./setup (or `python -m "
                        "vvu_runtime.virtio.accel build`) to rebuild it",
                        built.name, PACKAGE / source)
            return False
    return True


def status() -> dict[str, str]:
    """Which implementation each accelerated part uses in this process (for logs and
    ``vvu-appliance-info``-style reports): ``compiled``, ``pure (forced)`` or
    ``pure (not built)``."""
    from vvu_runtime.virtio.split import compiled_split_queue, split_built

    if compiled_split_queue() is not None:
        split = "compiled"
    elif pure_python_forced():
        split = "pure (forced)"
    elif split_built():
        split = "pure (compiled module older than its sources: run ./setup)"
    else:
        split = "pure (not built)"
    return {"split ring": split}


def build(src: Path, out: Path | None = None) -> list[Path]:
    """Compile every accelerator (``vvu_runtime/**/_*.c`` of checkout ``src``) for the
    running Python, in place or under ``out`` (same relative paths); returns the
    modules. The same flags as the editable install, without setuptools: for a
    worktree run from its source (``PYTHONPATH``) and for the appliance image
    build (``appliances/base/mkosi.build.chroot``). Stdlib only."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    built = []
    for c in sorted((src / "vvu_runtime").rglob("_*.c")):
        target = (out or src) / f"{c.relative_to(src).with_suffix('')}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*cc, "-shared", "-fPIC", "-O2", f"-I{include}", str(c), "-o",
                        str(target)], check=True)
        built.append(target)
    return built


def main(argv: list[str] | None = None) -> int:
    """``python -m vvu_runtime.virtio.accel build [SRC [OUT]]``: see :func:`build`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "build" or len(args) > 3:
        print("usage: python -m vvu_runtime.virtio.accel build [SRC [OUT]]", file=sys.stderr)
        return 2
    src = Path(args[1]) if len(args) > 1 else Path(__file__).resolve().parents[2]
    out = Path(args[2]) if len(args) > 2 else None
    for module in build(src, out):
        print(f"built {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
