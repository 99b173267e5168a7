"""Imports go the way docs/architecture.md draws them.

The layer order is written once, in pyproject.toml's [tool.vvu.layers]. Every
import under vvu_runtime (module level, function level, under TYPE_CHECKING,
relative ones resolved) is checked: nothing imports from tests, a package imports
only its own tier and the tiers below, packages that share a tier keep apart, no
module imports itself back through others, and nothing the appliance image ships
imports a host-only package (launch.appliance.HOST_ONLY).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vvu_runtime"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["vvu"]["layers"]
ORDER: list[list[str]] = CONFIG["order"]
TIER = {name: i for i, names in enumerate(ORDER) for name in names}
BASE = "base"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            # "from vvu_runtime import device" names a package, not a symbol
            if module == "vvu_runtime":
                for alias in node.names:
                    yield node.lineno, f"vvu_runtime.{alias.name}"


def _unit(module: str) -> str:
    """The layer unit of a vvu_runtime module: its subpackage, or BASE."""
    parts = module.split(".")
    if len(parts) == 1:
        return BASE  # the package itself
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return BASE


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_tier() -> None:
    units = {_unit(_module_name(p)) for p in _sources()}
    missing = sorted(units - set(TIER))
    assert not missing, f"add {missing} to [tool.vvu.layers] order in pyproject.toml"


def _violations() -> list[str]:
    bad = []
    for path in _sources():
        src = _unit(_module_name(path))
        for line, module in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module.split(".")[0] in ("tests", "fuzz", "soak", "benchmarks"):
                bad.append(f"{where} imports {module}: test, fuzz, soak and benchmark code "
                           "stays out of vvu_runtime")
                continue
            if not (module == "vvu_runtime" or module.startswith("vvu_runtime.")):
                continue
            dst = _unit(module)
            if dst == src or module == "vvu_runtime":
                continue
            if src == BASE:
                bad.append(f"{where} imports {module}: base modules import no other layer")
            elif TIER.get(dst, -1) > TIER.get(src, -1):
                bad.append(f"{where} imports {module}: {src} (tier {TIER.get(src)}) is below "
                           f"{dst} (tier {TIER.get(dst)})")
            elif TIER.get(dst) == TIER.get(src) and dst != BASE:
                bad.append(f"{where} imports {module}: {src} and {dst} share a tier and "
                           "keep apart")
    return bad


def test_imports_follow_the_layers() -> None:
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_the_guest_side_needs_no_host_only_package() -> None:
    """An appliance image gets vvu_runtime minus the wheel's HOST_ONLY: what it ships
    must not import what it lacks."""
    from vvu_runtime.appliance.wheel import HOST_ONLY as HOST_ONLY_DIRS

    HOST_ONLY = {d.rstrip("/") for d in HOST_ONLY_DIRS}

    # The device model and vvu-devd run on the host; launch drives QEMU and mkosi.
    assert {"launch", "device"} <= HOST_ONLY
    bad = []
    for path in _sources():
        src = _unit(_module_name(path))
        if src in HOST_ONLY:
            continue
        for line, module in _imports(path):
            if module.startswith("vvu_runtime.") and _unit(module) in HOST_ONLY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports host-only {module}")
    assert not bad, "\n".join(bad)


def _module_graph() -> dict[str, set[str]]:
    """vvu_runtime module -> the vvu_runtime modules it imports (any import)."""
    known = {_module_name(p) for p in _sources()}
    graph: dict[str, set[str]] = {}
    for path in _sources():
        name = _module_name(path)
        edges = graph.setdefault(name, set())
        for _, module in _imports(path):
            while module and module not in known:  # "from pkg.mod import Symbol"
                module = module.rpartition(".")[0]
            if module and module != name:
                edges.add(module)
    return graph


def test_no_import_cycles() -> None:
    """A module never imports itself back through others (not even lazily)."""
    graph = _module_graph()
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node):], node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ re-exporting its own submodules is not a cycle
            if not nxt.startswith(node + "."):
                visit(nxt, [*stack, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, module, ok", [
    ("from vvu_runtime.driver.pci import PciFunction", "vvu_runtime/backends/x.py", False),
    ("def f():\n    from vvu_runtime.launch import machine", "vvu_runtime/device/x.py", False),
    ("import tests.support.net_frames", "vvu_runtime/virtio/x.py", False),
    ("from fuzz.engine import Harness", "vvu_runtime/device/x.py", False),
    ("from vvu_runtime.device import vvu", "vvu_runtime/driver/x.py", False),
    ("from vvu_runtime.virtio.memory import GuestMemory", "vvu_runtime/vhost_user/x.py", True),
    ("from ..virtio import memory", "vvu_runtime/backends/x.py", True),
    ("from ..driver import pci", "vvu_runtime/backends/x.py", False),
    ("from vvu_runtime import driver", "vvu_runtime/virtio/x.py", False),
])
def test_the_check_catches_what_it_should(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          source: str, module: str, ok: bool) -> None:
    """The checker itself: each kind of import it must see, in a scratch tree."""
    fake_root = tmp_path
    target = fake_root / module
    target.parent.mkdir(parents=True)
    target.write_text(source + "\n")
    for d in ("virtio", "vhost_user", "backends", "device", "driver", "launch"):
        (fake_root / "vvu_runtime" / d).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake_root / "vvu_runtime")
    assert (not _violations()) == ok, _violations()
